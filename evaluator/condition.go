package evaluator

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"cel.dev/cel-go/cel"
)

// Condition is a compiled condition: the parsed form, its CEL translation
// and the CEL program. It is immutable and safe for concurrent use.
type Condition struct {
	src      string
	root     *node
	roots    []string // roots the condition may name
	onlyTags bool     // names nothing but deviceId and tags
	celSrc   string
	prg      cel.Program
}

// Compile compiles an Azure IoT Hub target condition. Only deviceId and
// tags.<name>... may be named. An empty (or all-space) condition compiles to
// one that matches no device and "*" to one that matches every device.
// Errors are *SyntaxError (with a 1-based column) and match
// ErrInvalidCondition.
func Compile(cond string) (*Condition, error) {
	return compile(cond, []string{rootDeviceID, rootTags}, true)
}

// CompileQuery compiles a condition in the same language that may also name
// the given roots, e.g. CompileQuery(q, "properties") allows
// properties.reported.x. It is meant for queries over a whole document (see
// EvalDocument), such as custom metrics over a device's reported document.
func CompileQuery(cond string, roots ...string) (*Condition, error) {
	all := []string{rootDeviceID, rootTags}
	for _, r := range roots {
		if r == "" || !isIdentStart(rune(r[0])) || strings.IndexFunc(r, func(c rune) bool { return !isIdentPart(c) }) >= 0 || isKeyword(r) {
			return nil, fmt.Errorf("%w: root %q is not a plain name", ErrInvalidCondition, r)
		}
		if !slices.Contains(all, r) {
			all = append(all, r)
		}
	}
	return compile(cond, all, false)
}

// MustCompile is Compile that panics on error, for tests and constants.
func MustCompile(cond string) *Condition {
	c, err := Compile(cond)
	if err != nil {
		panic(err)
	}
	return c
}

func compile(src string, roots []string, target bool) (*Condition, error) {
	root, err := parse(src, roots, target)
	if err != nil {
		return nil, err
	}
	c := &Condition{src: src, root: root, roots: roots, onlyTags: onlyTags(root)}
	c.celSrc = toCEL(root)
	env, err := celEnv()
	if err != nil {
		return nil, err
	}
	if len(c.celSrc) > maxCELLength {
		return nil, tooComplex(fmt.Sprintf("it translates to %d bytes of CEL", len(c.celSrc)))
	}
	ast, iss := env.Compile(c.celSrc)
	if err := iss.Err(); err != nil {
		// The translation is built to type-check; failing here means a
		// condition beyond CEL's limits (100,000 nodes).
		if strings.Contains(err.Error(), "node count exceeds limit") {
			return nil, tooComplex("its CEL form has more than 100,000 nodes")
		}
		return nil, tooComplex(err.Error())
	}
	c.prg, err = env.Program(ast, cel.EvalOptions(cel.OptOptimize))
	if err != nil {
		return nil, tooComplex(err.Error())
	}
	return c, nil
}

// maxCELLength bounds the CEL translation, which grows with the number of
// comparisons times the depth of their paths. Checked before CEL parses
// anything, it keeps the cost of the worst condition under a second on a
// small machine (refusals cost milliseconds); a 64 KiB list of device ids
// is well within it.
const maxCELLength = 256 << 10

func tooComplex(why string) error {
	return syntaxErr(1, "the condition is too complex to evaluate (%s); split it or use shorter paths", why)
}

func onlyTags(n *node) bool {
	switch n.op {
	case nAnd, nOr, nNot:
		for _, k := range n.kids {
			if !onlyTags(k) {
				return false
			}
		}
		return true
	}
	if n.op == nCmpPaths {
		return false // queries only: the engine never evaluates it
	}
	if n.op.isLeaf() {
		return n.path.root == rootDeviceID || n.path.root == rootTags
	}
	return true
}

// String returns the condition as written.
func (c *Condition) String() string { return c.src }

// CEL returns the CEL expression the condition compiles to. It reads one
// variable, doc, a map(string, dyn) with deviceId, tags and any other roots.
func (c *Condition) CEL() string { return c.celSrc }

// Semantics is the SemanticsVersion a condition needs: 2 when it calls a
// function version 1 did not have (STARTSWITH ...), else 1. A cluster
// accepts it only once every node evaluates it.
func (c *Condition) Semantics() int {
	if usesV2(c.root) {
		return 2
	}
	return 1
}

func usesV2(n *node) bool {
	switch n.op {
	case nStartsWith, nEndsWith, nIsType:
		return true
	}
	for _, k := range n.kids {
		if usesV2(k) {
			return true
		}
	}
	return false
}

// MatchesNothing reports whether the condition was empty.
func (c *Condition) MatchesNothing() bool { return c.root.op == nFalse }

// MatchesEverything reports whether the condition was "*".
func (c *Condition) MatchesEverything() bool { return c.root.op == nTrue }

// TargetsOnly reports whether the condition names nothing but deviceId and
// tags, so that the engine can evaluate it.
func (c *Condition) TargetsOnly() bool { return c.onlyTags }

// Eval reports whether a device matches. tags is the device's decoded JSON
// tags (numbers may be any Go number type). It never fails: a missing tag or
// a value of another type simply does not match.
func (c *Condition) Eval(deviceID string, tags map[string]any) bool {
	d := docView{deviceID: deviceID, hasID: true, tags: tags}
	return d.eval(c.root)
}

// EvalDocument evaluates the condition against a whole document whose
// top-level keys are the roots: {"deviceId": ..., "tags": {...},
// "properties": {...}}. A root missing from doc is undefined.
func (c *Condition) EvalDocument(doc map[string]any) bool {
	d := docView{doc: doc}
	return d.eval(c.root)
}

// EvalCEL evaluates the condition with its CEL program against a document as
// EvalDocument takes it. It is the reference the other evaluators are tested
// against; it is far slower than EvalDocument. An error means a bug.
func (c *Condition) EvalCEL(doc map[string]any) (bool, error) {
	norm, _ := normalize(doc).(map[string]any)
	if norm == nil {
		norm = map[string]any{}
	}
	out, _, err := c.prg.Eval(map[string]any{"doc": norm})
	if err != nil {
		return false, fmt.Errorf("evaluate %q: %w", c.src, err)
	}
	b, ok := out.Value().(bool)
	if !ok {
		return false, fmt.Errorf("evaluate %q: result is %T, not bool", c.src, out.Value())
	}
	return b, nil
}

// DeviceDocument is the document a target condition sees for a device.
func DeviceDocument(deviceID string, tags map[string]any) map[string]any {
	if tags == nil {
		tags = map[string]any{}
	}
	return map[string]any{rootDeviceID: deviceID, rootTags: tags}
}

var (
	celOnce sync.Once
	celE    *cel.Env
	celErr  error
)

func celEnv() (*cel.Env, error) {
	celOnce.Do(func() {
		celE, celErr = cel.NewEnv(
			cel.Variable("doc", cel.MapType(cel.StringType, cel.DynType)),
			cel.ParserExpressionSizeLimit(maxCELLength),
		)
	})
	return celE, celErr
}

// toCEL translates a condition. Every property access is guarded so that the
// program never fails at run time: each step checks that the parent is a
// map holding the key, and each comparison checks the value's type, so a
// missing tag or a type mismatch yields false, never an error.
func toCEL(n *node) string {
	var b strings.Builder
	writeCEL(&b, n)
	return b.String()
}

func writeCEL(b *strings.Builder, n *node) {
	switch n.op {
	case nFalse:
		b.WriteString("false")
	case nTrue:
		b.WriteString("true")
	case nAnd, nOr:
		sep := " && "
		if n.op == nOr {
			sep = " || "
		}
		b.WriteByte('(')
		for i, k := range n.kids {
			if i > 0 {
				b.WriteString(sep)
			}
			writeCEL(b, k)
		}
		b.WriteByte(')')
	case nNot:
		b.WriteString("!")
		writeCEL(b, n.kids[0])
	case nDefined:
		b.WriteByte('(')
		writeDefined(b, n.path)
		b.WriteByte(')')
	case nCmp:
		v := accessor(n.path)
		b.WriteByte('(')
		writeDefined(b, n.path)
		b.WriteString(" && ")
		switch {
		case n.val.kind == kNull && n.cmp == opNe:
			fmt.Fprintf(b, "type(%s) != null_type", v)
		case n.val.kind == kNull:
			fmt.Fprintf(b, "type(%s) == null_type", v)
		default:
			fmt.Fprintf(b, "type(%s) == %s && %s %s %s", v, celType(n.val.kind), v, celOp(n.cmp), celLiteral(n.val))
		}
		b.WriteByte(')')
	case nStartsWith, nEndsWith:
		v := accessor(n.path)
		fn := "startsWith"
		if n.op == nEndsWith {
			fn = "endsWith"
		}
		b.WriteByte('(')
		writeDefined(b, n.path)
		fmt.Fprintf(b, " && type(%s) == string && %s.%s(%s))", v, v, fn, celLiteral(n.val))
	case nIsType:
		typ := celType(n.val.kind)
		if n.val.kind == kObject {
			typ = "map"
		}
		b.WriteByte('(')
		writeDefined(b, n.path)
		fmt.Fprintf(b, " && type(%s) == %s)", accessor(n.path), typ)
	case nCmpPaths:
		va, vb := accessor(n.path), accessor(n.path2)
		types := "[double, string, bool, null_type]"
		if n.cmp != opEq && n.cmp != opNe {
			types = "[double, string]"
		}
		b.WriteByte('(')
		writeDefined(b, n.path)
		b.WriteString(" && ")
		writeDefined(b, n.path2)
		fmt.Fprintf(b, " && type(%s) == type(%s) && type(%s) in %s && %s %s %s)", va, vb, va, types, va, celOp(n.cmp), vb)
	case nIn, nNin:
		b.WriteByte('(')
		writeDefined(b, n.path)
		b.WriteString(" && ")
		if n.op == nNin {
			b.WriteByte('!')
		}
		writeInCEL(b, accessor(n.path), n.vals)
		b.WriteByte(')')
	}
}

// writeInCEL writes "the value equals one of vals", grouping the list by
// type so that each CEL `in` compares values of one type.
func writeInCEL(b *strings.Builder, v string, vals []value) {
	b.WriteByte('(')
	wrote := false
	for _, k := range []kind{kNull, kBool, kNumber, kString} {
		var lits []string
		for _, w := range vals {
			if w.kind == k {
				lits = append(lits, celLiteral(w))
			}
		}
		if len(lits) == 0 {
			continue
		}
		if wrote {
			b.WriteString(" || ")
		}
		wrote = true
		if k == kNull {
			fmt.Fprintf(b, "type(%s) == null_type", v)
			continue
		}
		fmt.Fprintf(b, "(type(%s) == %s && %s in [%s])", v, celType(k), v, strings.Join(lits, ", "))
	}
	if !wrote {
		b.WriteString("false")
	}
	b.WriteByte(')')
}

// writeDefined writes "the path exists": every parent is a map that holds
// the next key.
func writeDefined(b *strings.Builder, p path) {
	parent := "doc"
	keys := append([]string{p.root}, p.segs...)
	for i, k := range keys {
		if i > 0 {
			fmt.Fprintf(b, " && type(%s) == map && ", parent)
		}
		fmt.Fprintf(b, "%s in %s", strconv.Quote(k), parent)
		parent += "[" + strconv.Quote(k) + "]"
	}
}

func accessor(p path) string {
	var b strings.Builder
	b.WriteString("doc")
	for _, k := range append([]string{p.root}, p.segs...) {
		b.WriteString("[" + strconv.Quote(k) + "]")
	}
	return b.String()
}

func celType(k kind) string {
	switch k {
	case kBool:
		return "bool"
	case kNumber:
		return "double"
	case kString:
		return "string"
	}
	return "null_type"
}

func celOp(o cmpOp) string {
	if o == opEq {
		return "=="
	}
	return o.String()
}

// celLiteral renders a value as a CEL literal. strconv.Quote only emits
// escapes CEL also understands (the lexer refuses invalid UTF-8, so no \x
// byte escapes appear), and numbers always carry a '.' or an exponent so
// that CEL reads them as doubles.
func celLiteral(v value) string {
	switch v.kind {
	case kNull:
		return "null"
	case kBool:
		return strconv.FormatBool(v.f != 0)
	case kString:
		return strconv.Quote(v.s)
	}
	s := strconv.FormatFloat(v.f, 'g', -1, 64)
	if i := strings.IndexByte(s, 'e'); i >= 0 {
		if !strings.Contains(s[:i], ".") {
			s = s[:i] + ".0" + s[i:]
		}
		return s
	}
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// docView is what the document evaluator reads: either a device (id and
// tags) or a whole document.
type docView struct {
	deviceID string
	hasID    bool
	tags     map[string]any
	doc      map[string]any
}

func (d *docView) eval(n *node) bool {
	switch n.op {
	case nTrue:
		return true
	case nAnd:
		for _, k := range n.kids {
			if !d.eval(k) {
				return false
			}
		}
		return true
	case nOr:
		for _, k := range n.kids {
			if d.eval(k) {
				return true
			}
		}
		return false
	case nNot:
		return !d.eval(n.kids[0])
	}
	if n.op == nCmpPaths {
		a, aok := d.lookup(n.path)
		b, bok := d.lookup(n.path2)
		return n.evalPaths(a, aok, b, bok)
	}
	if n.op.isLeaf() {
		v, ok := d.lookup(n.path)
		return n.evalValue(v, ok)
	}
	return false
}

func (d *docView) lookup(p path) (value, bool) {
	var cur any
	if d.doc != nil {
		var ok bool
		if cur, ok = d.doc[p.root]; !ok {
			return value{}, false
		}
	} else {
		switch p.root {
		case rootDeviceID:
			if !d.hasID {
				return value{}, false
			}
			return value{kind: kString, s: d.deviceID}, true
		case rootTags:
			if d.tags == nil {
				return value{}, false
			}
			cur = d.tags
		default:
			return value{}, false
		}
	}
	for _, s := range p.segs {
		var ok bool
		switch m := cur.(type) {
		case map[string]any:
			cur, ok = m[s]
		case map[string]string:
			cur, ok = m[s]
		}
		if !ok {
			return value{}, false
		}
	}
	return classify(cur), true
}

// classify maps a decoded JSON value (or any Go value) to a kind and, for
// scalars, its value.
func classify(v any) value {
	switch x := v.(type) {
	case nil:
		return value{kind: kNull}
	case bool:
		return boolValue(x)
	case string:
		return value{kind: kString, s: x}
	case map[string]any, map[string]string:
		return value{kind: kObject}
	}
	if f, ok := number(v); ok {
		return value{kind: kNumber, f: f}
	}
	return value{kind: kArray}
}

// number converts the number types a decoder or a Go caller may produce.
func number(v any) (float64, bool) {
	switch x := v.(type) {
	case float64:
		return x, true
	case float32:
		return float64(x), true
	case int:
		return float64(x), true
	case int8:
		return float64(x), true
	case int16:
		return float64(x), true
	case int32:
		return float64(x), true
	case int64:
		return float64(x), true
	case uint:
		return float64(x), true
	case uint8:
		return float64(x), true
	case uint16:
		return float64(x), true
	case uint32:
		return float64(x), true
	case uint64:
		return float64(x), true
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	}
	return 0, false
}

// normalize deep-copies a document into the shapes CEL is given: numbers as
// float64, objects as map[string]any, and any other value as an (opaque)
// empty list.
func normalize(v any) any {
	switch x := v.(type) {
	case nil, bool, string:
		return x
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = normalize(e)
		}
		return m
	case map[string]string:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = e
		}
		return m
	}
	if f, ok := number(v); ok {
		return f
	}
	return []any{}
}
