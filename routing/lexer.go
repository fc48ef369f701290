package routing

import (
	"strings"
	"unicode/utf8"
)

// tokKind is a token of edgeHub's route grammar (Routing.Core's
// GrammarLexer.g4, Condition.g4 and Route.g4).
type tokKind uint8

const (
	tEOF tokKind = iota
	tSelect
	tFrom
	tWhere
	tInto
	tString
	tUnterminated
	tInteger
	tHex
	tReal
	tTrue
	tFalse
	tNull
	tUndefined
	tLParen
	tRParen
	tComma
	tPlus
	tMinus
	tMul
	tDiv
	tMod
	tAnd
	tOr
	tNot
	tEq
	tNe1
	tNe2
	tLe
	tGe
	tGt
	tLt
	tConcat
	tCoalesce
	tLBrace
	tRBrace
	tSysProp
	tID
	tQueryPath
	tUnknown
)

var tokNames = [...]string{
	tEOF: "end of route", tSelect: "SELECT", tFrom: "FROM", tWhere: "WHERE", tInto: "INTO",
	tString: "string", tUnterminated: "unterminated string", tInteger: "number", tHex: "number", tReal: "number",
	tTrue: "true", tFalse: "false", tNull: "null", tUndefined: "undefined",
	tLParen: "'('", tRParen: "')'", tComma: "','", tPlus: "'+'", tMinus: "'-'", tMul: "'*'", tDiv: "'/'", tMod: "'%'",
	tAnd: "AND", tOr: "OR", tNot: "NOT", tEq: "'='", tNe1: "'!='", tNe2: "'<>'", tLe: "'<='", tGe: "'>='",
	tGt: "'>'", tLt: "'<'", tConcat: "'||'", tCoalesce: "'??'", tLBrace: "'{'", tRBrace: "'}'",
	tSysProp: "system property", tID: "name", tQueryPath: "path", tUnknown: "character",
}

// token is one lexeme. col is 1-based and counts characters (runes) from
// the start of the route text.
type token struct {
	kind tokKind
	text string
	col  int
}

// describe names a token for an error message.
func (t token) describe() string {
	switch t.kind {
	case tEOF:
		return "the end of the route"
	case tID, tSysProp, tQueryPath, tInteger, tHex, tReal, tString, tUnterminated, tUnknown:
		return quote(t.text)
	}
	return tokNames[t.kind]
}

func quote(s string) string {
	if len(s) > 40 {
		s = s[:40] + "…"
	}
	return "'" + s + "'"
}

// lex splits a route into tokens the way edgeHub's ANTLR lexer does: at each
// position the longest match of any rule wins, and among matches of equal
// length the rule defined first. Whitespace is skipped, /* comments */ are
// dropped. The result always ends with a tEOF token. This reproduces
// edgeHub's quirks on purpose, so that a route means here what it means
// there: names may hold characters such as '-', '+', '*', '!' or '.'
// ("a-b" is one name, so arithmetic needs spaces), and a leading '-' is part
// of a number.
func lex(src string) []token {
	var toks []token
	col := 1
	for i := 0; i < len(src); {
		c := src[i]
		if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
			i++
			col++
			continue
		}
		kind, n := longest(src[i:])
		text := src[i : i+n]
		if kind != tComment {
			toks = append(toks, token{kind: tokKind(kind), text: text, col: col})
		}
		col += utf8.RuneCountInString(text)
		i += n
	}
	return append(toks, token{kind: tEOF, col: col})
}

// tComment marks a comment match in longest; it never becomes a token.
const tComment = 255

// longest returns the rule that matches the longest prefix of s (s is not
// empty and does not start with whitespace), in GrammarLexer.g4's order for
// ties, and the length of the match.
func longest(s string) (uint8, int) {
	bestKind, best := uint8(tUnknown), 0
	try := func(k uint8, n int) {
		if n > best {
			bestKind, best = k, n
		}
	}
	// Literal tokens of the parser grammar ('{', '}', '*' and '/' are
	// implicit tokens defined before the lexer's rules) and the keywords.
	switch s[0] {
	case '{':
		try(uint8(tLBrace), 1)
	case '}':
		try(uint8(tRBrace), 1)
	}
	try(uint8(tSelect), keyword(s, "select"))
	try(uint8(tFrom), keyword(s, "from"))
	try(uint8(tWhere), keyword(s, "where"))
	try(uint8(tInto), keyword(s, "into"))
	str, term := stringLen(s)
	if term {
		try(uint8(tString), str)
	} else {
		try(uint8(tUnterminated), str)
	}
	try(uint8(tInteger), integerLen(s))
	try(uint8(tHex), hexLen(s))
	try(uint8(tReal), realLen(s))
	try(uint8(tTrue), exact(s, "true"))
	try(uint8(tFalse), exact(s, "false"))
	try(uint8(tNull), exact(s, "null"))
	try(uint8(tUndefined), exact(s, "undefined"))
	try(uint8(tAnd), keyword(s, "and"))
	try(uint8(tOr), keyword(s, "or"))
	try(uint8(tNot), keyword(s, "not"))
	for _, p := range punctuation {
		if strings.HasPrefix(s, p.text) {
			try(uint8(p.kind), len(p.text))
		}
	}
	if s[0] == '$' {
		if n := runLen(s[1:], isQueryPathChar); n > 0 {
			try(uint8(tSysProp), 1+n)
		}
	}
	try(uint8(tID), runLen(s, isIDChar))
	try(uint8(tQueryPath), runLen(s, isQueryPathChar))
	if strings.HasPrefix(s, "/*") {
		if end := strings.Index(s[2:], "*/"); end >= 0 {
			try(tComment, end+4)
		}
	}
	if best == 0 {
		_, n := utf8.DecodeRuneInString(s)
		return uint8(tUnknown), n
	}
	return bestKind, best
}

// punctuation in GrammarLexer.g4's order. (AND, OR and NOT come between
// '%' and '=' there; a word and a symbol never match the same text, so
// they are tried separately.)
var punctuation = []struct {
	text string
	kind tokKind
}{
	{"(", tLParen}, {")", tRParen}, {",", tComma}, {"+", tPlus}, {"-", tMinus},
	{"*", tMul}, {"/", tDiv}, {"%", tMod},
	{"=", tEq}, {"!=", tNe1}, {"<>", tNe2}, {"<=", tLe}, {">=", tGe}, {">", tGt}, {"<", tLt},
	{"||", tConcat}, {"??", tCoalesce},
}

// keyword matches a case-insensitive keyword.
func keyword(s, kw string) int {
	if len(s) >= len(kw) && strings.EqualFold(s[:len(kw)], kw) {
		return len(kw)
	}
	return 0
}

// exact matches a case-sensitive literal (true, false, null, undefined).
func exact(s, lit string) int {
	if strings.HasPrefix(s, lit) {
		return len(lit)
	}
	return 0
}

// stringLen matches STRING ('...' or "..." with \", \', \\ and \uXXXX
// escapes) or, when there is no closing quote, UNTERMINATED_STRING: the
// same without the closing quote (it stops at an escape it does not know).
func stringLen(s string) (n int, terminated bool) {
	q := s[0]
	if q != '"' && q != '\'' {
		return 0, false
	}
	i := 1
	for i < len(s) {
		switch c := s[i]; {
		case c == q:
			return i + 1, true
		case c == '\\':
			if i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\'' || s[i+1] == '\\') {
				i += 2
				continue
			}
			if i+5 < len(s) && s[i+1] == 'u' && isHex(s[i+2]) && isHex(s[i+3]) && isHex(s[i+4]) && isHex(s[i+5]) {
				i += 6
				continue
			}
			return i, false
		default:
			i++
		}
	}
	return i, false
}

func integerLen(s string) int {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	d := digits(s[i:])
	if d == 0 {
		return 0
	}
	return i + d
}

func hexLen(s string) int {
	if len(s) < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X') {
		return 0
	}
	n := 2
	for n < len(s) && isHex(s[n]) {
		n++
	}
	if n == 2 {
		return 0
	}
	return n
}

// realLen matches REAL_LITERAL: '-'? [0-9]* '.' [0-9]+ EXP? | '-'? [0-9]* EXP.
func realLen(s string) int {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	i += digits(s[i:])
	best := 0
	if i < len(s) && s[i] == '.' {
		if f := digits(s[i+1:]); f > 0 {
			j := i + 1 + f
			best = j + expLen(s[j:])
		}
	}
	if e := expLen(s[i:]); e > 0 && i+e > best {
		best = i + e
	}
	return best
}

func expLen(s string) int {
	if len(s) < 2 || (s[0] != 'e' && s[0] != 'E') {
		return 0
	}
	i := 1
	if s[i] == '+' || s[i] == '-' {
		i++
	}
	d := digits(s[i:])
	if d == 0 {
		return 0
	}
	return i + d
}

func digits(s string) int {
	n := 0
	for n < len(s) && s[n] >= '0' && s[n] <= '9' {
		n++
	}
	return n
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// runLen is the length of the longest prefix of s whose runes all satisfy ok.
func runLen(s string, ok func(rune) bool) int {
	for i, r := range s {
		if !ok(r) {
			return i
		}
	}
	return len(s)
}

// isIDChar is ID_CHARS: ~[()<>@,;:\\"/[\]?={} \t\n\r].
func isIDChar(r rune) bool {
	return !strings.ContainsRune("()<>@,;:\\\"/[]?={} \t\n\r", r) && r != utf8.RuneError
}

// isQueryPathChar is QUERY_PATH_CHARS: ~[()<>@,;:\\"/?={} \t\n\r] (ID_CHARS
// plus '[' and ']', so that $body.a[0] is one token).
func isQueryPathChar(r rune) bool {
	return !strings.ContainsRune("()<>@,;:\\\"/?={} \t\n\r", r) && r != utf8.RuneError
}
