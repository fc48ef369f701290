package evaluator

import (
	"math"
	"strconv"
	"strings"
)

// kind is the JSON type of a value. Literals are null, bool, number or
// string; documents add object and array (any other Go value counts as an
// array: defined, never equal to a literal).
type kind uint8

const (
	kNull kind = iota
	kBool
	kNumber
	kString
	kObject
	kArray
)

func (k kind) String() string {
	return [...]string{"null", "bool", "number", "string", "object", "array"}[k]
}

// value is a scalar: a literal in a condition or a leaf of a document.
// Bools use f (0 or 1) so that values compare as plain structs.
type value struct {
	kind kind
	s    string
	f    float64
}

func boolValue(b bool) value {
	if b {
		return value{kind: kBool, f: 1}
	}
	return value{kind: kBool}
}

func (v value) String() string {
	switch v.kind {
	case kNull:
		return "null"
	case kBool:
		return strconv.FormatBool(v.f != 0)
	case kNumber:
		return strconv.FormatFloat(v.f, 'g', -1, 64)
	case kString:
		return "'" + strings.ReplaceAll(v.s, "'", "''") + "'"
	}
	return v.kind.String()
}

// cmpOp is a comparison operator.
type cmpOp uint8

const (
	opEq cmpOp = iota
	opNe
	opLt
	opLe
	opGt
	opGe
)

var cmpNames = [...]string{"=", "!=", "<", "<=", ">", ">="}

func (o cmpOp) String() string { return cmpNames[o] }

// holds applies o to two values of the same kind. Numbers compare as Go (and
// CEL) float64s, so NaN is unordered and unequal to everything.
func (o cmpOp) holds(a, b value) bool {
	switch a.kind {
	case kNumber:
		switch o {
		case opEq:
			return a.f == b.f
		case opNe:
			return a.f != b.f
		case opLt:
			return a.f < b.f
		case opLe:
			return a.f <= b.f
		case opGt:
			return a.f > b.f
		case opGe:
			return a.f >= b.f
		}
	case kString:
		switch o {
		case opEq:
			return a.s == b.s
		case opNe:
			return a.s != b.s
		case opLt:
			return a.s < b.s
		case opLe:
			return a.s <= b.s
		case opGt:
			return a.s > b.s
		case opGe:
			return a.s >= b.s
		}
	case kBool:
		switch o {
		case opEq:
			return a.f == b.f
		case opNe:
			return a.f != b.f
		}
	case kNull:
		return o == opEq
	}
	return false
}

// path is a property reference: a root (deviceId, tags, properties...) and
// the keys below it.
type path struct {
	root string
	segs []string
}

func (p path) String() string {
	if len(p.segs) == 0 {
		return p.root
	}
	return p.root + "." + strings.Join(p.segs, ".")
}

// key is the flattened name of a tag path as the engine indexes it: the
// keys below "tags" joined with dots (keys from conditions never contain a
// dot; see flattenKey for keys from documents).
func (p path) key() string { return strings.Join(p.segs, ".") }

type nodeOp uint8

const (
	nFalse nodeOp = iota
	nTrue
	nAnd
	nOr
	nNot
	nCmp     // path cmp val
	nIn      // path IN vals
	nNin     // path NIN vals
	nDefined // IS_DEFINED(path)
	// String and type functions of IoT Hub's query language.
	nStartsWith // STARTSWITH(path, 'prefix'): val is the prefix
	nEndsWith   // ENDSWITH(path, 'suffix'): val is the suffix
	nIsType     // IS_STRING / IS_NUMBER / IS_BOOL / IS_NULL / IS_OBJECT (path): val.kind is the type
	// path cmp path2, in queries only (never a target condition): both
	// defined, of one scalar type, and the comparison holds.
	nCmpPaths
)

// funcs are the functions a condition may call, by upper-case name: what
// node each builds and, for the type tests, the type.
var funcs = map[string]struct {
	op   nodeOp
	kind kind
}{
	"IS_DEFINED": {op: nDefined},
	"STARTSWITH": {op: nStartsWith},
	"ENDSWITH":   {op: nEndsWith},
	"IS_STRING":  {op: nIsType, kind: kString},
	"IS_NUMBER":  {op: nIsType, kind: kNumber},
	"IS_BOOL":    {op: nIsType, kind: kBool},
	"IS_NULL":    {op: nIsType, kind: kNull},
	"IS_OBJECT":  {op: nIsType, kind: kObject},
}

// funcNames lists them for messages.
const funcNames = "IS_DEFINED, STARTSWITH, ENDSWITH, IS_STRING, IS_NUMBER, IS_BOOL, IS_NULL and IS_OBJECT"

// isLeaf tells the nodes that read one path.
func (op nodeOp) isLeaf() bool {
	switch op {
	case nCmp, nIn, nNin, nDefined, nStartsWith, nEndsWith, nIsType, nCmpPaths:
		return true
	}
	return false
}

// node is the parsed condition, the single source the CEL translation, the
// document evaluator and the engine's bound plans are all derived from.
type node struct {
	op    nodeOp
	kids  []*node
	path  path
	path2 path // nCmpPaths: the right-hand property
	cmp   cmpOp
	val   value
	vals  []value
}

// Semantics, identical in every form (see DESIGN.md):
//   - path cmp v is true iff path is defined, holds the same JSON type as v,
//     and the comparison holds; except path != null, true iff path is defined
//     and not null.
//   - path IN [v...] is true iff some path = v is true.
//   - path NIN [v...] is true iff path is defined and path IN [v...] is false.
//   - IS_DEFINED(path) is true iff path exists in the document (with any
//     value, null included).
//   - STARTSWITH(path, 's') and ENDSWITH(path, 's') are true iff path holds
//     a string that starts (ends) with s, compared byte for byte: case
//     matters, as in IoT Hub.
//   - IS_STRING, IS_NUMBER, IS_BOOL, IS_NULL, IS_OBJECT(path) are true iff
//     path is defined and holds a value of that JSON type (an array is not
//     an object).
//   - AND, OR, NOT are two-valued.
//
// evalValue applies a comparison to the value found at a path (ok=false when
// the path is undefined). Every evaluator calls it, so there is one place
// where the meaning of a comparison lives outside the CEL translation.
func (n *node) evalValue(v value, ok bool) bool {
	if !ok {
		return false
	}
	switch n.op {
	case nDefined:
		return true
	case nCmp:
		if n.val.kind == kNull && n.cmp == opNe {
			return v.kind != kNull
		}
		return v.kind == n.val.kind && n.cmp.holds(v, n.val)
	case nIn:
		return inValues(v, n.vals)
	case nNin:
		return !inValues(v, n.vals)
	case nStartsWith:
		return v.kind == kString && strings.HasPrefix(v.s, n.val.s)
	case nEndsWith:
		return v.kind == kString && strings.HasSuffix(v.s, n.val.s)
	case nIsType:
		return v.kind == n.val.kind
	}
	return false
}

func inValues(v value, vals []value) bool {
	for _, w := range vals {
		if v.kind == w.kind && opEq.holds(v, w) {
			return true
		}
	}
	return false
}

// canonicalBits is the float64 identity used for interning: -0 and 0 are
// one number, and every NaN is one (never-equal) value.
func canonicalBits(f float64) uint64 {
	if f == 0 {
		return 0
	}
	if f != f {
		return 0x7ff8000000000001
	}
	return math.Float64bits(f)
}

// evalPaths applies a comparison of two properties: true iff both are
// defined, hold values of one scalar type (number, string, bool, null),
// and the comparison holds; ordering needs numbers or strings.
func (n *node) evalPaths(a value, aok bool, b value, bok bool) bool {
	if !aok || !bok || a.kind != b.kind || a.kind > kString {
		return false
	}
	if n.cmp != opEq && n.cmp != opNe && a.kind != kNumber && a.kind != kString {
		return false
	}
	return n.cmp.holds(a, b)
}
