package evaluator

import (
	"math"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

type tokKind uint8

const (
	tEOF tokKind = iota
	tIdent
	tString
	tNumber
	tOp // = != <> < <= > >=
	tLParen
	tRParen
	tLBrack
	tRBrack
	tComma
	tDot
	tStar
)

type token struct {
	kind tokKind
	col  int     // 1-based column of the first character
	text string  // source text (identifiers, operators, numbers)
	str  string  // decoded value of a string literal
	num  float64 // value of a number literal
	// quoted: an identifier written [[name]] (any characters but "]]").
	quoted bool
}

// describe names a token the way an error message should show it.
func (t token) describe() string {
	switch t.kind {
	case tEOF:
		return "end of input"
	case tString:
		return "'" + strings.ReplaceAll(t.str, "'", "''") + "'"
	case tIdent:
		return t.text
	}
	return "'" + t.text + "'"
}

// lex splits a condition into tokens. Columns count runes, 1-based.
func lex(src string) ([]token, error) {
	var toks []token
	col := 1
	i := 0
	for i < len(src) {
		r, size := utf8.DecodeRuneInString(src[i:])
		if r == utf8.RuneError && size == 1 {
			return nil, syntaxErr(col, "the condition is not valid UTF-8")
		}
		start := col
		switch {
		case unicode.IsSpace(r):
			i += size
			col++
			continue
		case r == '\'':
			s, n, runes, err := lexString(src[i:], start)
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{kind: tString, col: start, text: src[i : i+n], str: s})
			i += n
			col += runes
			continue
		case r == '"':
			return nil, syntaxErr(start, "double quotes are not allowed; quote strings with single quotes, e.g. tags.environment = 'prod'")
		case isIdentStart(r):
			j := i + size
			for j < len(src) {
				r2, s2 := utf8.DecodeRuneInString(src[j:])
				if !isIdentPart(r2) {
					break
				}
				j += s2
			}
			toks = append(toks, token{kind: tIdent, col: start, text: src[i:j]})
			col += j - i // identifiers are ASCII
			i = j
			continue
		case r >= '0' && r <= '9' || r == '-' && i+1 < len(src) && src[i+1] >= '0' && src[i+1] <= '9':
			tok, n, err := lexNumber(src[i:], start)
			if err != nil {
				return nil, err
			}
			toks = append(toks, tok)
			i += n
			col += n
			continue
		}
		// Punctuation and operators: all ASCII.
		two := ""
		if i+1 < len(src) {
			two = src[i : i+2]
		}
		var t token
		switch {
		case two == "!=" || two == "<>" || two == "<=" || two == ">=":
			t = token{kind: tOp, text: two}
		case two == "==":
			return nil, syntaxErr(start, "use = (a single equals sign) to compare")
		case two == "&&":
			return nil, syntaxErr(start, "use AND instead of &&")
		case two == "||":
			return nil, syntaxErr(start, "use OR instead of ||")
		case r == '=' || r == '<' || r == '>':
			t = token{kind: tOp, text: string(r)}
		case r == '(':
			t = token{kind: tLParen, text: "("}
		case r == ')':
			t = token{kind: tRParen, text: ")"}
		case r == '[' && two == "[[" && len(toks) > 0 && toks[len(toks)-1].kind == tDot:
			// IoT Hub's quoting of a property name after a dot:
			// configurations.[[my-deployment]].status. The name is
			// anything up to "]]".
			end := strings.Index(src[i+2:], "]]")
			if end < 0 {
				return nil, syntaxErr(start, "unterminated [[ : a quoted property name ends with ]]")
			}
			name := src[i+2 : i+2+end]
			if name == "" {
				return nil, syntaxErr(start, "empty property name in [[ ]]")
			}
			n := 2 + end + 2
			toks = append(toks, token{kind: tIdent, col: start, text: name, quoted: true})
			i += n
			col += utf8.RuneCountInString(src[i-n : i])
			continue
		case r == '[':
			t = token{kind: tLBrack, text: "["}
		case r == ']':
			t = token{kind: tRBrack, text: "]"}
		case r == ',':
			t = token{kind: tComma, text: ","}
		case r == '.':
			t = token{kind: tDot, text: "."}
		case r == '*':
			t = token{kind: tStar, text: "*"}
		case r == '!':
			return nil, syntaxErr(start, "use NOT to negate, or != to compare")
		case r == '+' || r == '-' || r == '/' || r == '%':
			return nil, syntaxErr(start, "arithmetic (%c) is not supported in a condition", r)
		default:
			return nil, syntaxErr(start, "unexpected character %q", r)
		}
		t.col = start
		toks = append(toks, t)
		i += len(t.text)
		col += len(t.text)
	}
	toks = append(toks, token{kind: tEOF, col: col})
	return toks, nil
}

// lexString reads a single-quoted string at the start of s, where a doubled
// quote stands for one quote. It returns the value, the bytes and the runes
// consumed.
func lexString(s string, col int) (string, int, int, error) {
	var b strings.Builder
	runes := 1
	i := 1
	for i < len(s) {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			return "", 0, 0, syntaxErr(col+runes, "the condition is not valid UTF-8")
		}
		if r == '\'' {
			if i+1 < len(s) && s[i+1] == '\'' {
				b.WriteByte('\'')
				i += 2
				runes += 2
				continue
			}
			return b.String(), i + 1, runes + 1, nil
		}
		b.WriteString(s[i : i+size])
		i += size
		runes++
	}
	return "", 0, 0, syntaxErr(col, "unterminated string: the quote opened here is never closed (write '' for a quote inside a string)")
}

// lexNumber reads a decimal number (-12, 3.5, 1e6) or a hexadecimal integer
// (0x1F). All numbers are float64, like JSON numbers decoded by Go.
func lexNumber(s string, col int) (token, int, error) {
	i := 0
	if s[0] == '-' {
		i++
	}
	digits := func() int {
		n := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			n++
		}
		return n
	}
	if strings.HasPrefix(s[i:], "0x") || strings.HasPrefix(s[i:], "0X") {
		i += 2
		j := i
		for i < len(s) && isHex(s[i]) {
			i++
		}
		if i == j {
			return token{}, 0, syntaxErr(col, "malformed hexadecimal number %q", s[:i])
		}
		if i < len(s) && isIdentPartByte(s[i]) {
			return token{}, 0, syntaxErr(col, "malformed number %q", s[:i+1])
		}
		u, err := strconv.ParseUint(s[j:i], 16, 64)
		if err != nil {
			return token{}, 0, syntaxErr(col, "number %s is out of range", s[:i])
		}
		f := float64(u)
		if s[0] == '-' {
			f = -f
		}
		return token{kind: tNumber, col: col, text: s[:i], num: f}, i, nil
	}
	digits()
	if i < len(s) && s[i] == '.' {
		i++
		if digits() == 0 {
			return token{}, 0, syntaxErr(col, "malformed number %q: expected digits after the decimal point", s[:i])
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if digits() == 0 {
			return token{}, 0, syntaxErr(col, "malformed number %q: expected digits in the exponent", s[:i])
		}
	}
	if i < len(s) && (isIdentPartByte(s[i]) || s[i] == '.') {
		return token{}, 0, syntaxErr(col, "malformed number %q", s[:i+1])
	}
	f, err := strconv.ParseFloat(s[:i], 64)
	if err != nil || math.IsInf(f, 0) {
		return token{}, 0, syntaxErr(col, "number %s is out of range", s[:i])
	}
	if f == 0 {
		f = 0 // -0 compares equal to 0 everywhere; keep one spelling
	}
	return token{kind: tNumber, col: col, text: s[:i], num: f}, i, nil
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// Identifiers are ASCII: letters, digits, _ and $ ($ for names such as
// properties.desired.$version), not starting with a digit.
func isIdentStart(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '_' || r == '$'
}

func isIdentPart(r rune) bool { return isIdentStart(r) || r >= '0' && r <= '9' }

func isIdentPartByte(c byte) bool { return isIdentPart(rune(c)) }
