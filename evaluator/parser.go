package evaluator

import (
	"strings"
)

// Limits that keep every accepted condition cheap to compile, within CEL's
// parser limits, and safe for the recursive evaluators.
const (
	// MaxConditionLength is the longest condition accepted, in bytes.
	MaxConditionLength = 64 << 10
	// MaxNesting bounds parentheses and NOTs nested inside each other.
	MaxNesting = 32
	// MaxPathDepth bounds the keys in one property path (tags.a.b.c is 3).
	// Azure limits twin documents to 10 levels, so 16 leaves room.
	MaxPathDepth = 16
)

const (
	rootDeviceID = "deviceId"
	rootTags     = "tags"
	// rootModuleID names a module twin in a module-level metric query
	// (FROM devices.modules): a string, like deviceId.
	rootModuleID = "moduleId"
)

// isScalarRoot tells the roots that are strings, with nothing below them.
func isScalarRoot(r string) bool { return r == rootDeviceID || r == rootModuleID }

var keywords = map[string]bool{
	"AND": true, "OR": true, "NOT": true, "IN": true, "NIN": true,
	"TRUE": true, "FALSE": true, "NULL": true,
}

// isKeyword tells the words a property path may not start with: the
// operators, the literals and the function names, in any case.
func isKeyword(s string) bool {
	u := strings.ToUpper(s)
	_, fn := funcs[u]
	return keywords[u] || fn
}

type parser struct {
	toks   []token
	pos    int
	roots  []string // names a path may start with, deviceId and tags first
	target bool     // a target condition: only deviceId and tags
	depth  int
}

// parse turns a condition into its syntax tree. An empty condition is
// false (it targets no device) and "*" alone is true (every device).
func parse(src string, roots []string, target bool) (*node, error) {
	if len(src) > MaxConditionLength {
		return nil, syntaxErr(1, "the condition is %d bytes long; at most %d are allowed", len(src), MaxConditionLength)
	}
	toks, err := lex(src)
	if err != nil {
		return nil, err
	}
	p := &parser{toks: toks, roots: roots, target: target}
	first := p.peek()
	switch {
	case first.kind == tEOF:
		return &node{op: nFalse}, nil
	case first.kind == tStar:
		p.next()
		if t := p.peek(); t.kind != tEOF {
			return nil, syntaxErr(t.col, "* (every device) must be the whole condition; found %s after it", t.describe())
		}
		return &node{op: nTrue}, nil
	case first.kind == tIdent && isQueryClause(first.text):
		return nil, syntaxErr(first.col, "write only the condition: a target condition has no SELECT, FROM or WHERE clause (found %s)", first.text)
	}
	n, err := p.parseOr()
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tEOF {
		msg := "unexpected %s after a complete condition; expected AND, OR, NOT or the end of the condition"
		if t.kind == tIdent && strings.HasPrefix(t.text, "$") {
			msg += " (an unexpanded shell variable?)"
		}
		if t.kind == tRParen {
			msg = "unexpected %s: no '(' is open"
		}
		return nil, syntaxErr(t.col, msg, t.describe())
	}
	return n, nil
}

func isQueryClause(s string) bool {
	switch strings.ToUpper(s) {
	case "SELECT", "FROM", "WHERE":
		return true
	}
	return false
}

func (p *parser) peek() token { return p.toks[p.pos] }

func (p *parser) peekAt(k int) token {
	if p.pos+k < len(p.toks) {
		return p.toks[p.pos+k]
	}
	return p.toks[len(p.toks)-1]
}

func (p *parser) next() token {
	t := p.toks[p.pos]
	if t.kind != tEOF {
		p.pos++
	}
	return t
}

// after describes the token just consumed, for "expected X after Y".
func (p *parser) after() string {
	if p.pos == 0 {
		return "at the start"
	}
	return "after " + p.toks[p.pos-1].describe()
}

func (p *parser) isWord(t token, w string) bool {
	return t.kind == tIdent && strings.EqualFold(t.text, w)
}

func (p *parser) enter(col int) error {
	p.depth++
	if p.depth > MaxNesting {
		return syntaxErr(col, "the condition nests parentheses and NOTs more than %d deep", MaxNesting)
	}
	return nil
}

func (p *parser) parseOr() (*node, error) {
	left, err := p.parseAnd()
	if err != nil {
		return nil, err
	}
	for p.isWord(p.peek(), "OR") {
		p.next()
		right, err := p.parseAnd()
		if err != nil {
			return nil, err
		}
		left = join(nOr, left, right)
	}
	return left, nil
}

// parseAnd also takes a bare NOT after a complete operand as AND NOT, as
// Azure does: "tags.a = 'x' NOT deviceId = 'd'".
func (p *parser) parseAnd() (*node, error) {
	left, err := p.parseNot()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		switch {
		case p.isWord(t, "AND"):
			p.next()
		case p.isWord(t, "NOT"):
			// AND NOT: parseNot consumes the NOT.
		default:
			return left, nil
		}
		right, err := p.parseNot()
		if err != nil {
			return nil, err
		}
		left = join(nAnd, left, right)
	}
}

func join(op nodeOp, a, b *node) *node {
	var kids []*node
	for _, n := range []*node{a, b} {
		if n.op == op {
			kids = append(kids, n.kids...)
		} else {
			kids = append(kids, n)
		}
	}
	return &node{op: op, kids: kids}
}

func (p *parser) parseNot() (*node, error) {
	t := p.peek()
	if !p.isWord(t, "NOT") {
		return p.parsePrimary()
	}
	p.next()
	if err := p.enter(t.col); err != nil {
		return nil, err
	}
	kid, err := p.parseNot()
	if err != nil {
		return nil, err
	}
	p.depth--
	return &node{op: nNot, kids: []*node{kid}}, nil
}

func (p *parser) parsePrimary() (*node, error) {
	t := p.peek()
	switch t.kind {
	case tLParen:
		p.next()
		if err := p.enter(t.col); err != nil {
			return nil, err
		}
		n, err := p.parseOr()
		if err != nil {
			return nil, err
		}
		if c := p.peek(); c.kind != tRParen {
			return nil, syntaxErr(c.col, "expected ')' to close the '(' at column %d, found %s", t.col, c.describe())
		}
		p.next()
		p.depth--
		return n, nil
	case tIdent:
		if p.peekAt(1).kind == tLParen {
			if _, ok := funcs[strings.ToUpper(t.text)]; ok {
				return p.parseFunc()
			}
			if !isKeyword(t.text) {
				return nil, syntaxErr(t.col, "unknown function %s%s: the functions are %s", t.text, funcHint(t.text), funcNames)
			}
		}
		if isKeyword(t.text) {
			return nil, syntaxErr(t.col, "expected a condition such as tags.environment = 'prod' %s, found %s", p.after(), strings.ToUpper(t.text))
		}
		pth, err := p.parsePath()
		if err != nil {
			return nil, err
		}
		return p.parseComparison(pth)
	case tString, tNumber:
		return nil, syntaxErr(t.col, "a comparison starts with a property such as tags.environment or deviceId, found the value %s", t.describe())
	case tStar:
		return nil, syntaxErr(t.col, "* (every device) must be the whole condition")
	}
	return nil, syntaxErr(t.col, "expected a condition such as tags.environment = 'prod' %s, found %s", p.after(), t.describe())
}

// parseFunc parses a function call: IS_DEFINED(path), a type test such
// as IS_STRING(path), or STARTSWITH(path, 'prefix') / ENDSWITH(path,
// 'suffix'). Names are keywords (any case); the string argument is a
// literal, compared as written (case matters).
func (p *parser) parseFunc() (*node, error) {
	fn := p.next()
	name := strings.ToUpper(fn.text)
	f := funcs[name]
	p.next() // (
	example := name + "(tags.site)"
	if f.op == nStartsWith || f.op == nEndsWith {
		example = name + "(tags.site, 'plant-')"
	}
	if t := p.peek(); t.kind != tIdent || isKeyword(t.text) {
		if t.kind == tRParen {
			return nil, syntaxErr(t.col, "%s needs a property as its first argument, e.g. %s", name, example)
		}
		return nil, syntaxErr(t.col, "%s's first argument must be a property such as tags.site, not %s (e.g. %s)", name, t.describe(), example)
	}
	pth, err := p.parsePath()
	if err != nil {
		return nil, err
	}
	n := &node{op: f.op, path: pth, val: value{kind: f.kind}}
	if f.op == nStartsWith || f.op == nEndsWith {
		c := p.peek()
		if c.kind != tComma {
			return nil, syntaxErr(c.col, "%s needs two arguments, a property and a quoted string, e.g. %s; found %s", name, example, c.describe())
		}
		p.next()
		v := p.peek()
		if v.kind != tString {
			what := v.describe()
			if v.kind == tIdent && p.peekAt(1).kind == tDot {
				what = "a property (comparing two properties is not supported)"
			}
			return nil, syntaxErr(v.col, "%s's second argument must be a quoted string such as 'plant-', not %s", name, what)
		}
		p.next()
		n.val = value{kind: kString, s: v.str}
	}
	if c := p.peek(); c.kind != tRParen {
		if c.kind == tComma {
			return nil, syntaxErr(c.col, "%s takes %s; found a further argument", name, map[bool]string{true: "two arguments", false: "one property"}[f.op == nStartsWith || f.op == nEndsWith])
		}
		return nil, syntaxErr(c.col, "expected ')' to close %s(, found %s", fn.text, c.describe())
	}
	p.next()
	return n, nil
}

// funcHint suggests the function a misspelt name may have meant (the
// routing language spells them STARTS_WITH, ENDS_WITH).
func funcHint(name string) string {
	squeezed := strings.ReplaceAll(strings.ToUpper(name), "_", "")
	for f := range funcs {
		if strings.ReplaceAll(f, "_", "") == squeezed {
			return "; did you mean " + f + "?"
		}
	}
	return ""
}

func (p *parser) parsePath() (path, error) {
	t := p.peek()
	if t.kind != tIdent {
		return path{}, syntaxErr(t.col, "expected a property such as tags.environment %s, found %s", p.after(), t.describe())
	}
	p.next()
	if err := p.checkRoot(t); err != nil {
		return path{}, err
	}
	pth := path{root: t.text}
	for p.peek().kind == tDot {
		p.next()
		s := p.peek()
		if s.kind != tIdent {
			return path{}, syntaxErr(s.col, "expected a property name after '.', found %s", s.describe())
		}
		p.next()
		if len(pth.segs) == MaxPathDepth {
			return path{}, syntaxErr(s.col, "the property path is more than %d names deep", MaxPathDepth)
		}
		pth.segs = append(pth.segs, s.text)
	}
	switch {
	case isScalarRoot(pth.root) && len(pth.segs) > 0:
		return path{}, syntaxErr(t.col, "%s has no properties below it", pth.root)
	case !isScalarRoot(pth.root) && len(pth.segs) == 0:
		if pth.root == rootTags {
			return path{}, syntaxErr(t.col, "name a tag below tags, e.g. tags.environment")
		}
		return path{}, syntaxErr(t.col, "name a property below %s, e.g. %s.name", pth.root, pth.root)
	}
	return pth, nil
}

func (p *parser) checkRoot(t token) error {
	for _, r := range p.roots {
		if t.text == r {
			return nil
		}
	}
	for _, r := range p.roots {
		if strings.EqualFold(t.text, r) {
			return syntaxErr(t.col, "unknown property %s; did you mean %s? (names are case-sensitive)", t.text, r)
		}
	}
	if p.target {
		switch t.text {
		case "properties", "configurations", "capabilities", "status", "moduleId":
			return syntaxErr(t.col, "%s cannot be used in a target condition: only tags and deviceId may be used (e.g. tags.environment = 'prod')", t.text)
		}
		return syntaxErr(t.col, "unknown property %s: a target condition may use only tags (e.g. tags.environment) and deviceId", t.text)
	}
	return syntaxErr(t.col, "unknown property %s: this condition may use only %s", t.text, strings.Join(p.roots, ", "))
}

func (p *parser) parseComparison(pth path) (*node, error) {
	t := p.peek()
	var n *node
	switch {
	case t.kind == tOp && !p.target && p.peekAt(1).kind == tIdent && !isKeyword(p.peekAt(1).text):
		// A query may compare two properties, as Azure's system metrics
		// do: properties.desired.$version = properties.reported.lastDesiredVersion.
		p.next()
		right, err := p.parsePath()
		if err != nil {
			return nil, err
		}
		n = &node{op: nCmpPaths, path: pth, cmp: cmpOf(t.text), path2: right}
		return n, nil
	case t.kind == tOp:
		p.next()
		v, err := p.parseValue("after '" + t.text + "'")
		if err != nil {
			return nil, err
		}
		n = &node{op: nCmp, path: pth, cmp: cmpOf(t.text), val: v}
		if n.cmp != opEq && n.cmp != opNe && v.kind != kNumber && v.kind != kString {
			return nil, syntaxErr(t.col, "%s needs a number or a string; %s can only be compared with = or !=", t.text, v)
		}
	case p.isWord(t, "IN") || p.isWord(t, "NIN"):
		p.next()
		vals, err := p.parseList(strings.ToUpper(t.text))
		if err != nil {
			return nil, err
		}
		n = &node{op: nIn, path: pth, vals: vals}
		if strings.EqualFold(t.text, "NIN") {
			n.op = nNin
		}
	case p.isWord(t, "NOT") && p.isWord(p.peekAt(1), "IN"):
		return nil, syntaxErr(t.col, "use NIN instead of NOT IN")
	default:
		return nil, syntaxErr(t.col, "expected a comparison (=, !=, <>, <, <=, >, >=, IN or NIN) after %s, found %s", pth, t.describe())
	}
	if isScalarRoot(pth.root) {
		vals := n.vals
		if n.op == nCmp {
			vals = []value{n.val}
		}
		for _, v := range vals {
			if v.kind != kString {
				return nil, syntaxErr(t.col, "%s is a string: compare it with a quoted value, not %s", pth.root, v)
			}
		}
	}
	return n, nil
}

func cmpOf(s string) cmpOp {
	switch s {
	case "=":
		return opEq
	case "!=", "<>":
		return opNe
	case "<":
		return opLt
	case "<=":
		return opLe
	case ">":
		return opGt
	}
	return opGe
}

func (p *parser) parseValue(ctx string) (value, error) {
	t := p.peek()
	switch t.kind {
	case tString:
		p.next()
		return value{kind: kString, s: t.str}, nil
	case tNumber:
		p.next()
		return value{kind: kNumber, f: t.num}, nil
	case tIdent:
		switch strings.ToUpper(t.text) {
		case "TRUE":
			p.next()
			return boolValue(true), nil
		case "FALSE":
			p.next()
			return boolValue(false), nil
		case "NULL":
			p.next()
			return value{kind: kNull}, nil
		}
		if p.peekAt(1).kind == tDot {
			return value{}, syntaxErr(t.col, "expected a value %s, found %s: comparing two properties is not supported", ctx, t.text)
		}
		return value{}, syntaxErr(t.col, "expected a value %s, found %s: quote strings with single quotes, e.g. '%s'", ctx, t.text, t.text)
	case tLBrack:
		return value{}, syntaxErr(t.col, "a list needs IN or NIN, e.g. tags.location IN ['westus', 'eastus']")
	}
	return value{}, syntaxErr(t.col, "expected a value %s, found %s", ctx, t.describe())
}

func (p *parser) parseList(op string) ([]value, error) {
	open := p.peek()
	if open.kind != tLBrack {
		return nil, syntaxErr(open.col, "expected a list such as ['a', 'b'] after %s, found %s", op, open.describe())
	}
	p.next()
	vals := []value{}
	if p.peek().kind == tRBrack {
		p.next()
		return vals, nil
	}
	for {
		v, err := p.parseValue("in the list")
		if err != nil {
			return nil, err
		}
		vals = append(vals, v)
		t := p.next()
		switch t.kind {
		case tComma:
			continue
		case tRBrack:
			return vals, nil
		}
		return nil, syntaxErr(t.col, "expected ',' or ']' in the list opened at column %d, found %s", open.col, t.describe())
	}
}
