package routing

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf16"
)

// evalFn computes a condition's value for one message.
type evalFn func(*evalCtx) value

// compiled is a type-checked expression.
type compiled struct {
	fn  evalFn
	typ vtype
}

func constant(v value, t vtype) compiled {
	return compiled{fn: func(*evalCtx) value { return v }, typ: t}
}

// compileCondition type-checks a condition as edgeHub's ConditionVisitor
// does and returns a function that tells whether a message matches.
func compileCondition(n node) (func(*evalCtx) bool, error) {
	c, err := compileNode(n)
	if err != nil {
		return nil, err
	}
	fn := c.fn
	return func(ctx *evalCtx) bool { return fn(ctx).isTrue() }, nil
}

func typeErr(col int, format string, args ...any) *SyntaxError {
	return &SyntaxError{Column: col, Msg: fmt.Sprintf(format, args...)}
}

func compileNode(n node) (compiled, error) {
	switch n := n.(type) {
	case *litNode:
		return constant(n.val, n.typ), nil
	case *propNode:
		name := n.name
		return compiled{typ: typString, fn: func(ctx *evalCtx) value {
			if v, ok := lookup(ctx.m.Properties, name); ok {
				return strVal(v)
			}
			return undef
		}}, nil
	case *sysPropNode:
		return compileSysProp(n)
	case *unaryNode:
		return compileUnary(n)
	case *binaryNode:
		return compileBinary(n)
	case *callNode:
		return compileCall(n)
	}
	panic(fmt.Sprintf("routing: unknown node %T", n))
}

// compileSysProp resolves "$name" the way edgeHub does: an application
// property with that exact name wins; otherwise "$body.<path>" is a query
// of the JSON body and any other name a system property. "{$name}" skips
// the application property.
func compileSysProp(n *sysPropNode) (compiled, error) {
	name := n.name
	if len(name) >= len(bodyPrefix) && strings.EqualFold(name[:len(bodyPrefix)], bodyPrefix) {
		path, err := parseBodyPath(name[len(bodyPrefix):])
		if err != nil {
			return compiled{}, typeErr(n.col, "invalid $body query %s: %v", quote(name), err)
		}
		if n.escaped || strings.ContainsAny(name, "[]") {
			return compiled{typ: typDynamic, fn: func(ctx *evalCtx) value { return ctx.bodyQuery(path) }}, nil
		}
		return compiled{typ: typDynamic, fn: func(ctx *evalCtx) value {
			if v, ok := lookup(ctx.m.Properties, name); ok {
				return strVal(v)
			}
			return ctx.bodyQuery(path)
		}}, nil
	}
	if strings.ContainsAny(name, "[]") {
		return constant(undef, typUndefined), nil // no property name holds brackets
	}
	sys := name[1:]
	if n.escaped {
		return compiled{typ: typString, fn: func(ctx *evalCtx) value {
			if v, ok := lookup(ctx.m.SystemProperties, sys); ok {
				return strVal(v)
			}
			return undef
		}}, nil
	}
	return compiled{typ: typString, fn: func(ctx *evalCtx) value {
		if v, ok := lookup(ctx.m.Properties, name); ok {
			return strVal(v)
		}
		if v, ok := lookup(ctx.m.SystemProperties, sys); ok {
			return strVal(v)
		}
		return undef
	}}, nil
}

// lookup finds a property by name, ignoring case as edgeHub's message
// dictionaries do (an exact match first).
func lookup(m map[string]string, name string) (string, bool) {
	if v, ok := m[name]; ok {
		return v, true
	}
	for k, v := range m {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return "", false
}

func compileUnary(n *unaryNode) (compiled, error) {
	x, err := compileNode(n.x)
	if err != nil {
		return compiled{}, err
	}
	xf := x.fn
	if n.op == tMinus {
		if !matches(typNumber, x.typ, true) {
			return compiled{}, typeErr(n.col, "operator '-' needs a number; got %s", x.typ)
		}
		return compiled{typ: typNumber, fn: func(ctx *evalCtx) value {
			v := xf(ctx)
			if v.k != kNumber {
				return undef
			}
			return numVal(-v.n)
		}}, nil
	}
	// NOT takes a bool or null (NOT null is true), or a dynamic value.
	if x.typ == typNull {
		return constant(boolVal(true), typBool), nil
	}
	if !matches(typBool, x.typ, true) {
		return compiled{}, typeErr(n.col, "operator NOT needs a bool; got %s (NOT binds tighter than comparisons: write NOT (a = b))", x.typ)
	}
	return compiled{typ: typBool, fn: func(ctx *evalCtx) value {
		v := xf(ctx)
		if v.k != kBool {
			return undef
		}
		return boolVal(!v.b)
	}}, nil
}

func compileBinary(n *binaryNode) (compiled, error) {
	l, err := compileNode(n.l)
	if err != nil {
		return compiled{}, err
	}
	r, err := compileNode(n.r)
	if err != nil {
		return compiled{}, err
	}
	lf, rf := l.fn, r.fn
	dyn := l.typ == typDynamic || r.typ == typDynamic
	operands := func(want string) error {
		return typeErr(n.col, "invalid operands to operator '%s': have %s and %s, expected %s%s",
			n.text, l.typ, r.typ, want, propertyHint(l.typ, r.typ))
	}
	switch n.op {
	case tMul, tDiv, tMod, tPlus, tMinus:
		if !matches(typNumber, l.typ, true) || !matches(typNumber, r.typ, true) {
			return compiled{}, operands("number and number")
		}
		op := n.op
		return compiled{typ: typNumber, fn: func(ctx *evalCtx) value { return arith(op, lf(ctx), rf(ctx)) }}, nil
	case tConcat:
		if !matches(typString, l.typ, true) || !matches(typString, r.typ, true) {
			return compiled{}, operands("string and string")
		}
		return compiled{typ: typString, fn: func(ctx *evalCtx) value { return concat(lf(ctx), rf(ctx)) }}, nil
	case tLt, tLe, tGt, tGe, tEq, tNe1, tNe2:
		if !matches(l.typ, r.typ, true) {
			return compiled{}, operands(l.typ.String() + " and " + l.typ.String())
		}
		op := n.op
		return compiled{typ: typBool, fn: func(ctx *evalCtx) value { return compareValues(op, lf(ctx), rf(ctx)) }}, nil
	case tAnd, tOr:
		logical := func(t vtype) bool {
			return t == typNull || t == typBool || t == typUndefined || t == typDynamic
		}
		if !logical(l.typ) || !(logical(r.typ) || l.typ == typDynamic) {
			return compiled{}, operands("bool and bool")
		}
		return compileLogical(n.op, l, r, dyn), nil
	case tCoalesce:
		if !matches(l.typ, r.typ, true) {
			return compiled{}, operands(l.typ.String() + " and " + l.typ.String())
		}
		if l.typ == typUndefined {
			return r, nil
		}
		t := l.typ
		if dyn {
			t = typDynamic
		}
		return compiled{typ: t, fn: func(ctx *evalCtx) value {
			if v := lf(ctx); v.defined() {
				return v
			}
			return rf(ctx)
		}}, nil
	}
	panic("routing: unknown binary operator " + n.text)
}

// propertyHint explains the commonest type error: properties are strings.
func propertyHint(l, r vtype) string {
	if (l == typString && r == typNumber) || (l == typNumber && r == typString) {
		return " (application and system properties are strings: compare with a string such as '30', or convert with as_number(...))"
	}
	return ""
}

// compileLogical builds AND and OR. With a dynamic operand both sides must
// be booleans at runtime (else undefined); otherwise null follows edgeHub's
// Null operators: null AND x is null (no match), null OR x is x.
func compileLogical(op tokKind, l, r compiled, dyn bool) compiled {
	lf, rf := l.fn, r.fn
	combine := and3
	if op == tOr {
		combine = or3
	}
	if dyn {
		return compiled{typ: typBool, fn: func(ctx *evalCtx) value {
			a, b := lf(ctx), rf(ctx)
			if a.k != kBool || b.k != kBool {
				return undef
			}
			return combine(a, b)
		}}
	}
	switch {
	case op == tAnd && (l.typ == typNull || r.typ == typNull):
		return constant(null, typNull)
	case op == tOr && l.typ == typNull && r.typ == typNull:
		return constant(null, typNull)
	case op == tOr && l.typ == typNull:
		return r
	case op == tOr && r.typ == typNull:
		return l
	}
	return compiled{typ: typBool, fn: func(ctx *evalCtx) value { return combine(lf(ctx), rf(ctx)) }}
}

func concat(vs ...value) value {
	var b strings.Builder
	for _, v := range vs {
		if v.k != kString {
			return undef
		}
		b.WriteString(v.s)
	}
	return strVal(b.String())
}

// builtin is one signature of a built-in function (edgeHub's
// BuiltinExecutor): the argument types, whether dynamic values are
// accepted for them, and the implementation.
type builtin struct {
	args     []vtype
	variadic bool // the last type repeats; at least len(args)-1 arguments
	any      int  // > 0: any arguments of this arity (and args is nil)
	dyn      bool
	ret      vtype
	fn       func(args []value) value
}

func (b builtin) accepts(types []vtype) bool {
	if b.any > 0 {
		return len(types) == b.any
	}
	if b.variadic {
		n := len(b.args) - 1
		if len(types) < n {
			return false
		}
		for i, t := range types {
			if !matches(b.args[min(i, n)], t, b.dyn) {
				return false
			}
		}
		return true
	}
	if len(types) != len(b.args) {
		return false
	}
	for i, t := range types {
		if !matches(b.args[i], t, b.dyn) {
			return false
		}
	}
	return true
}

func (b builtin) signature(name string) string {
	if b.any > 0 {
		return name + "(any)"
	}
	parts := make([]string, len(b.args))
	for i, t := range b.args {
		parts[i] = t.String()
	}
	if b.variadic {
		parts[len(parts)-1] += ", ..."
	}
	return name + "(" + strings.Join(parts, ", ") + ")"
}

func num1(f func(float64) float64) []builtin {
	return []builtin{{args: []vtype{typNumber}, dyn: true, ret: typNumber, fn: func(a []value) value {
		if a[0].k != kNumber {
			return undef
		}
		return numVal(f(a[0].n))
	}}}
}

func str2(f func(s, frag string) value, ret vtype) []builtin {
	return []builtin{{args: []vtype{typString, typString}, dyn: true, ret: ret, fn: func(a []value) value {
		if a[0].k != kString || a[1].k != kString {
			return undef
		}
		return f(a[0].s, a[1].s)
	}}}
}

func str1(f func(string) value, ret vtype) []builtin {
	return []builtin{{args: []vtype{typString}, dyn: true, ret: ret, fn: func(a []value) value {
		if a[0].k != kString {
			return undef
		}
		return f(a[0].s)
	}}}
}

func constFalse() builtin {
	return builtin{any: 1, ret: typBool, fn: func([]value) value { return boolVal(false) }}
}

// builtins are IoT Hub's routing query functions, by lowercase name.
var builtins = map[string][]builtin{
	"abs":     num1(math.Abs),
	"exp":     num1(math.Exp),
	"ceiling": num1(math.Ceil),
	"floor":   num1(math.Floor),
	"sqrt":    num1(math.Sqrt),
	"square":  num1(func(x float64) float64 { return x * x }),
	"sign": num1(func(x float64) float64 {
		switch {
		case x > 0:
			return 1
		case x < 0:
			return -1
		}
		return 0
	}),
	"power": {{args: []vtype{typNumber, typNumber}, dyn: true, ret: typNumber, fn: func(a []value) value {
		if a[0].k != kNumber || a[1].k != kNumber {
			return undef
		}
		return numVal(math.Pow(a[0].n, a[1].n))
	}}},
	"as_number": {
		{args: []vtype{typString}, dyn: true, ret: typNumber, fn: func(a []value) value {
			switch a[0].k {
			case kNumber:
				return a[0]
			case kString:
				f, err := strconv.ParseFloat(strings.TrimSpace(a[0].s), 64)
				if err != nil {
					return undef
				}
				return numVal(f)
			}
			return undef
		}},
		{args: []vtype{typNumber}, dyn: true, ret: typNumber, fn: func(a []value) value {
			if a[0].k != kNumber {
				return undef
			}
			return a[0]
		}},
	},
	"is_bool": {
		{args: []vtype{typBool}, dyn: true, ret: typBool, fn: func(a []value) value {
			if !a[0].defined() {
				return undef
			}
			return boolVal(a[0].k == kBool)
		}},
		constFalse(),
	},
	"is_defined": {
		{args: []vtype{typString}, ret: typBool, fn: isDefined},
		{args: []vtype{typNumber}, ret: typBool, fn: isDefined},
		{args: []vtype{typBool}, ret: typBool, fn: isDefined},
		{args: []vtype{typUndefined}, ret: typBool, fn: func([]value) value { return boolVal(false) }},
		{args: []vtype{typNull}, ret: typBool, fn: func([]value) value { return boolVal(true) }},
		{args: []vtype{typDynamic}, ret: typBool, fn: isDefined},
	},
	"is_null": {
		{args: []vtype{typString}, ret: typBool, fn: func([]value) value { return boolVal(false) }},
		{args: []vtype{typDynamic}, ret: typBool, fn: func(a []value) value {
			if !a[0].defined() {
				return undef
			}
			return boolVal(a[0].k == kNull)
		}},
		{args: []vtype{typNull}, ret: typBool, fn: func([]value) value { return boolVal(true) }},
		constFalse(),
	},
	"is_number": {
		{args: []vtype{typNumber}, dyn: true, ret: typBool, fn: func(a []value) value {
			return boolVal(a[0].k == kNumber && !math.IsInf(a[0].n, 0))
		}},
		constFalse(),
	},
	"is_string": {
		{args: []vtype{typString}, dyn: true, ret: typBool, fn: func(a []value) value { return boolVal(a[0].k == kString) }},
		constFalse(),
	},
	"concat": {{args: []vtype{typString, typString, typString}, variadic: true, dyn: true, ret: typString,
		fn: func(a []value) value { return concat(a...) }}},
	"length": str1(func(s string) value { return numVal(float64(len(utf16.Encode([]rune(s))))) }, typNumber),
	"lower":  str1(func(s string) value { return strVal(strings.ToLower(s)) }, typString),
	"upper":  str1(func(s string) value { return strVal(strings.ToUpper(s)) }, typString),
	"substring": {
		{args: []vtype{typString, typNumber}, dyn: true, ret: typString, fn: func(a []value) value {
			if a[0].k != kString || a[1].k != kNumber {
				return undef
			}
			u := utf16.Encode([]rune(a[0].s))
			start := a[1].n
			if start < 0 || start > float64(len(u)) {
				return undef
			}
			return strVal(string(utf16.Decode(u[int(start):])))
		}},
		{args: []vtype{typString, typNumber, typNumber}, dyn: true, ret: typString, fn: func(a []value) value {
			if a[0].k != kString || a[1].k != kNumber || a[2].k != kNumber {
				return undef
			}
			u := utf16.Encode([]rune(a[0].s))
			start, n := a[1].n, a[2].n
			if start < 0 || start >= float64(len(u)) || n < 0 || n > float64(len(u))-float64(int(start)) {
				return undef
			}
			return strVal(string(utf16.Decode(u[int(start) : int(start)+int(n)])))
		}},
	},
	"index_of": str2(func(s, frag string) value {
		i := strings.Index(s, frag)
		if i < 0 {
			return numVal(-1)
		}
		return numVal(float64(len(utf16.Encode([]rune(s[:i])))))
	}, typNumber),
	"starts_with": str2(func(s, f string) value { return boolVal(strings.HasPrefix(s, f)) }, typBool),
	"ends_with":   str2(func(s, f string) value { return boolVal(strings.HasSuffix(s, f)) }, typBool),
	"contains":    str2(func(s, f string) value { return boolVal(strings.Contains(s, f)) }, typBool),
}

func isDefined(a []value) value { return boolVal(a[0].defined()) }

func compileCall(n *callNode) (compiled, error) {
	name := strings.ToLower(n.name)
	if name == "twin_change_includes" {
		return compiled{}, typeErr(n.col, "twin_change_includes applies to twin change notifications, which this hub does not route")
	}
	sigs, ok := builtins[name]
	if !ok {
		return compiled{}, typeErr(n.col, "unknown function %s", quote(n.name))
	}
	args := make([]compiled, len(n.args))
	types := make([]vtype, len(n.args))
	for i, a := range n.args {
		c, err := compileNode(a)
		if err != nil {
			return compiled{}, err
		}
		args[i], types[i] = c, c.typ
	}
	for _, b := range sigs {
		if !b.accepts(types) {
			continue
		}
		fns := make([]evalFn, len(args))
		for i, a := range args {
			fns[i] = a.fn
		}
		fn := b.fn
		return compiled{typ: b.ret, fn: func(ctx *evalCtx) value {
			vals := make([]value, len(fns))
			for i, f := range fns {
				vals[i] = f(ctx)
			}
			return fn(vals)
		}}, nil
	}
	given := make([]string, len(types))
	for i, t := range types {
		given[i] = t.String()
	}
	want := make([]string, len(sigs))
	for i, b := range sigs {
		want[i] = b.signature(name)
	}
	return compiled{}, typeErr(n.col, "invalid arguments to function %s: %s(%s); expected %s",
		quote(n.name), name, strings.Join(given, ", "), strings.Join(want, " or "))
}
