package routing

import (
	"fmt"
	"strings"
)

// The syntax tree of a condition, as parsed; compile.go checks its types
// and turns it into a function.
type (
	node interface{ column() int }

	// litNode is a literal: a string, number, true/false, null or undefined.
	litNode struct {
		col int
		typ vtype
		val value
	}
	// propNode is an application property named by a bare name.
	propNode struct {
		col  int
		name string
	}
	// sysPropNode is "$name": an application property of that exact name if
	// the message has one, else a system property or a $body query; or
	// "{$name}" (escaped): only the system property or $body query.
	sysPropNode struct {
		col     int
		name    string // with its '$'
		escaped bool
	}
	callNode struct {
		col  int
		name string
		args []node
	}
	unaryNode struct {
		col int
		op  tokKind
		x   node
	}
	binaryNode struct {
		col  int
		op   tokKind
		text string
		l, r node
	}
)

func (n *litNode) column() int     { return n.col }
func (n *propNode) column() int    { return n.col }
func (n *sysPropNode) column() int { return n.col }
func (n *callNode) column() int    { return n.col }
func (n *unaryNode) column() int   { return n.col }
func (n *binaryNode) column() int  { return n.col }

// parser reads one route's tokens.
type parser struct {
	toks []token
	pos  int
}

func (p *parser) peek() token { return p.toks[p.pos] }

func (p *parser) next() token {
	t := p.toks[p.pos]
	if t.kind != tEOF {
		p.pos++
	}
	return t
}

func (p *parser) errorf(t token, format string, args ...any) *SyntaxError {
	return &SyntaxError{Column: t.col, Msg: fmt.Sprintf(format, args...)}
}

// unexpected describes a token that cannot stand where it is.
func (p *parser) unexpected(t token, want string) *SyntaxError {
	switch t.kind {
	case tUnterminated:
		return p.errorf(t, "unterminated string")
	case tUnknown:
		return p.errorf(t, "invalid symbol %s", quote(t.text))
	}
	return p.errorf(t, "expected %s, found %s", want, t.describe())
}

// parsedRoute is a route's parts before compilation.
type parsedRoute struct {
	source    token // the first token of the source, for its column
	path      string
	condition node // nil without WHERE
	sink      Sink
}

// parseRoute parses `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`.
// Unlike edgeHub, which stops after the sink, anything after it is an error.
func parseRoute(text string) (*parsedRoute, error) {
	p := &parser{toks: lex(text)}
	if p.peek().kind == tEOF {
		return nil, p.errorf(p.peek(), `the route is empty: write "FROM <source> [WHERE <condition>] INTO <sink>"`)
	}
	if p.peek().kind == tSelect {
		p.next()
		if t := p.next(); t.kind != tMul {
			return nil, p.unexpected(t, "'*' after SELECT")
		}
	}
	if t := p.next(); t.kind != tFrom {
		return nil, p.unexpected(t, "FROM")
	}
	r := &parsedRoute{source: p.peek()}
	path, err := p.sourcePath()
	if err != nil {
		return nil, err
	}
	r.path = path
	if p.peek().kind == tWhere {
		p.next()
		if k := p.peek().kind; k == tInto || k == tEOF {
			return nil, p.unexpected(p.peek(), "a condition after WHERE")
		}
		cond, err := p.expr(0)
		if err != nil {
			return nil, err
		}
		r.condition = cond
	}
	switch t := p.next(); t.kind {
	case tInto:
	case tRParen:
		return nil, p.errorf(t, "unmatched closing ')'")
	default:
		want := "WHERE or INTO"
		if r.condition != nil {
			want = "an operator or INTO"
		}
		return nil, p.unexpected(t, want)
	}
	sink, err := p.sink()
	if err != nil {
		return nil, err
	}
	r.sink = sink
	if t := p.peek(); t.kind != tEOF {
		return nil, p.errorf(t, "unexpected %s after the sink: the route ends with INTO <sink>", t.describe())
	}
	return r, nil
}

// sourcePath reads the source: '/' item ('/' item)*, each item '*' or a name.
func (p *parser) sourcePath() (string, error) {
	var b strings.Builder
	for {
		t := p.peek()
		if t.kind != tDiv {
			if b.Len() == 0 {
				return "", p.unexpected(t, `a source path such as /messages/* or /messages/modules/<module>/outputs/<output>`)
			}
			return b.String(), nil
		}
		p.next()
		b.WriteByte('/')
		item := p.next()
		switch item.kind {
		case tMul, tID:
			b.WriteString(item.text)
		default:
			return "", p.unexpected(item, "a path segment or '*' after '/'")
		}
	}
}

// sink reads $upstream or BrokeredEndpoint("/modules/<m>/inputs/<i>").
func (p *parser) sink() (Sink, error) {
	t := p.next()
	switch t.kind {
	case tSysProp:
		if !strings.EqualFold(t.text, "$upstream") {
			return Sink{}, p.errorf(t, "unknown system endpoint %s: the only one is $upstream", quote(t.text))
		}
		return Sink{Kind: SinkUpstream}, nil
	case tID:
		if !strings.EqualFold(t.text, "BrokeredEndpoint") {
			return Sink{}, p.errorf(t, `unknown endpoint %s: write $upstream or BrokeredEndpoint("/modules/<module>/inputs/<input>")`, quote(t.text))
		}
		if lp := p.next(); lp.kind != tLParen {
			return Sink{}, p.unexpected(lp, "'(' after BrokeredEndpoint")
		}
		arg := p.next()
		if arg.kind != tString {
			return Sink{}, p.unexpected(arg, `a quoted address such as "/modules/<module>/inputs/<input>"`)
		}
		if rp := p.next(); rp.kind != tRParen {
			return Sink{}, p.unexpected(rp, "')' after the endpoint's address")
		}
		s, msg := parseBrokeredAddress(unescape(arg.text[1 : len(arg.text)-1]))
		if msg != "" {
			return Sink{}, p.errorf(arg, "%s", msg)
		}
		return s, nil
	}
	return Sink{}, p.unexpected(t, `a sink: $upstream or BrokeredEndpoint("/modules/<module>/inputs/<input>")`)
}

// parseBrokeredAddress reads "/modules/<m>/inputs/<i>" (the slashes around it
// optional, as in edgeHub).
func parseBrokeredAddress(addr string) (Sink, string) {
	a := strings.TrimSpace(addr)
	a = strings.TrimPrefix(a, "/")
	a = strings.TrimSuffix(a, "/")
	parts := strings.Split(a, "/")
	bad := fmt.Sprintf("endpoint address %s must be /modules/<module>/inputs/<input>", quote(addr))
	if len(parts) != 4 || parts[0] != "modules" || parts[2] != "inputs" {
		return Sink{}, bad
	}
	for _, seg := range []string{parts[1], parts[3]} {
		if seg == "" || strings.ContainsAny(seg, "+#*\x00") || strings.TrimSpace(seg) != seg {
			return Sink{}, bad + fmt.Sprintf(" (got %s, which no module or input can be named)", quote(seg))
		}
	}
	return Sink{Kind: SinkModuleInput, Module: parts[1], Input: parts[3]}, ""
}

// Binary operators by precedence, lowest first, as Condition.g4 lists
// them (ANTLR gives earlier alternatives the higher precedence).
var binaryLevels = [][]tokKind{
	{tCoalesce},
	{tOr},
	{tAnd},
	{tEq, tNe1, tNe2},
	{tLt, tLe, tGt, tGe},
	{tPlus, tMinus, tConcat},
	{tMul, tDiv, tMod},
}

// expr parses a condition at a precedence level; all binary operators are
// left-associative. Prefix '-' and NOT bind tighter than every binary
// operator, as in edgeHub: NOT a = b is (NOT a) = b.
func (p *parser) expr(level int) (node, error) {
	if level == len(binaryLevels) {
		return p.unary()
	}
	left, err := p.expr(level + 1)
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		if !hasKind(binaryLevels[level], t.kind) {
			return left, nil
		}
		p.next()
		right, err := p.expr(level + 1)
		if err != nil {
			return nil, err
		}
		left = &binaryNode{col: t.col, op: t.kind, text: t.text, l: left, r: right}
	}
}

func hasKind(ks []tokKind, k tokKind) bool {
	for _, x := range ks {
		if x == k {
			return true
		}
	}
	return false
}

func (p *parser) unary() (node, error) {
	t := p.peek()
	if t.kind == tMinus || t.kind == tNot {
		p.next()
		x, err := p.unary()
		if err != nil {
			return nil, err
		}
		return &unaryNode{col: t.col, op: t.kind, x: x}, nil
	}
	return p.primary()
}

func (p *parser) primary() (node, error) {
	t := p.next()
	switch t.kind {
	case tLParen:
		x, err := p.expr(0)
		if err != nil {
			return nil, err
		}
		if c := p.next(); c.kind != tRParen {
			if c.kind == tEOF || c.kind == tInto {
				return nil, p.errorf(t, "missing closing ')'")
			}
			return nil, p.unexpected(c, "an operator or ')'")
		}
		return x, nil
	case tString:
		return &litNode{col: t.col, typ: typString, val: strVal(unescape(t.text[1 : len(t.text)-1]))}, nil
	case tInteger, tReal, tHex:
		f, ok := parseNumber(t)
		if !ok {
			return &litNode{col: t.col, typ: typNumber, val: undef}, nil
		}
		return &litNode{col: t.col, typ: typNumber, val: numVal(f)}, nil
	case tTrue, tFalse:
		return &litNode{col: t.col, typ: typBool, val: boolVal(t.kind == tTrue)}, nil
	case tNull:
		return &litNode{col: t.col, typ: typNull, val: null}, nil
	case tUndefined:
		return &litNode{col: t.col, typ: typUndefined, val: undef}, nil
	case tSysProp:
		return &sysPropNode{col: t.col, name: t.text}, nil
	case tLBrace:
		name := p.next()
		if name.kind != tSysProp {
			return nil, p.unexpected(name, "a system property such as $contentType after '{'")
		}
		if c := p.next(); c.kind != tRBrace {
			return nil, p.unexpected(c, "'}'")
		}
		return &sysPropNode{col: t.col, name: name.text, escaped: true}, nil
	case tID:
		if p.peek().kind != tLParen {
			return &propNode{col: t.col, name: t.text}, nil
		}
		p.next()
		call := &callNode{col: t.col, name: t.text}
		if p.peek().kind == tRParen {
			p.next()
			return call, nil
		}
		for {
			arg, err := p.expr(0)
			if err != nil {
				return nil, err
			}
			call.args = append(call.args, arg)
			switch c := p.next(); c.kind {
			case tComma:
				continue
			case tRParen:
				return call, nil
			default:
				return nil, p.unexpected(c, "',' or ')' in the arguments of "+t.text)
			}
		}
	case tRParen:
		return nil, p.errorf(t, "unmatched closing ')'")
	}
	return nil, p.unexpected(t, "a value, a property or a function")
}

// unescape resolves \", \', \\ and \uXXXX, as edgeHub's Unescape does.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' || i+1 == len(s) {
			b.WriteByte(c)
			continue
		}
		switch n := s[i+1]; {
		case n == '"' || n == '\'' || n == '\\':
			b.WriteByte(n)
			i++
		case (n == 'u' || n == 'U') && i+5 < len(s) && isHex(s[i+2]) && isHex(s[i+3]) && isHex(s[i+4]) && isHex(s[i+5]):
			var r rune
			for _, h := range s[i+2 : i+6] {
				r = r*16 + rune(hexVal(byte(h)))
			}
			b.WriteRune(r)
			i += 5
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	}
	return int(c-'A') + 10
}
