package routing

import (
	"math"
	"strconv"
	"strings"
)

// kind is a runtime value's kind, in the order of edgeHub's QueryValueType
// (values of different kinds compare by it).
type kind uint8

const (
	kUndefined kind = iota
	kBool
	kNumber
	kString
	kNull
	kObject // a $body query that found an object or array: read as undefined
)

// value is a condition's runtime value. Booleans are three-valued: an
// undefined value is edgeHub's Bool.Undefined.
type value struct {
	k kind
	b bool
	n float64
	s string
}

var (
	undef = value{}
	null  = value{k: kNull}
)

func boolVal(b bool) value  { return value{k: kBool, b: b} }
func strVal(s string) value { return value{k: kString, s: s} }

// numVal makes a number; NaN is undefined, as in edgeHub (which represents
// an undefined number as NaN).
func numVal(f float64) value {
	if math.IsNaN(f) {
		return undef
	}
	return value{k: kNumber, n: f}
}

func (v value) defined() bool { return v.k != kUndefined }

// isTrue is the final conversion of a condition to a match: only a boolean
// true matches; false, undefined, null and any non-boolean do not.
func (v value) isTrue() bool { return v.k == kBool && v.b }

// vtype is a condition's static type, as edgeHub's compiler types
// expressions: application and system properties are strings, literals
// have their type, and $body queries are dynamic (QueryValue).
type vtype uint8

const (
	typUndefined vtype = iota
	typString
	typNumber
	typBool
	typNull
	typDynamic
)

func (t vtype) String() string {
	return [...]string{"undefined", "string", "number", "bool", "null", "dynamic"}[t]
}

// supportsDynamic: a dynamic value may stand where these types are expected
// (edgeHub's QueryValue.IsSupportedType).
func (t vtype) supportsDynamic() bool {
	return t == typString || t == typNumber || t == typBool || t == typNull
}

// matches reports whether an argument of type got is accepted where want
// is expected; a dynamic value on either side is accepted when dyn allows
// it (edgeHub's Args.Match).
func matches(want, got vtype, dyn bool) bool {
	if want == got {
		return true
	}
	if !dyn {
		return false
	}
	return (got == typDynamic && want.supportsDynamic()) || (want == typDynamic && got.supportsDynamic())
}

// compareValues returns edgeHub's three-valued comparison: undefined if
// either side is undefined, else the comparison of op, ordering values of
// different kinds by kind (so '=' is false and '!=' true across kinds).
func compareValues(op tokKind, a, b value) value {
	if !a.defined() || !b.defined() || a.k == kObject || b.k == kObject {
		return undef
	}
	var c int
	switch {
	case a.k != b.k:
		c = cmpInt(int(a.k), int(b.k))
	case a.k == kBool:
		c = cmpInt(b2i(a.b), b2i(b.b))
	case a.k == kNumber:
		switch {
		case a.n < b.n:
			c = -1
		case a.n > b.n:
			c = 1
		}
	case a.k == kString:
		c = strings.Compare(a.s, b.s) // ordinal, as edgeHub's StringComparison.Ordinal
	}
	switch op {
	case tEq:
		return boolVal(c == 0)
	case tNe1, tNe2:
		return boolVal(c != 0)
	case tLt:
		return boolVal(c < 0)
	case tLe:
		return boolVal(c <= 0)
	case tGt:
		return boolVal(c > 0)
	}
	return boolVal(c >= 0)
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// and3, or3, not3 are three-valued logic on booleans, undefined being the
// unknown value (edgeHub's Bool operators).
func and3(a, b value) value {
	switch {
	case a.k == kBool && !a.b, b.k == kBool && !b.b:
		return boolVal(false)
	case a.k == kBool && b.k == kBool:
		return boolVal(true)
	}
	return undef
}

func or3(a, b value) value {
	switch {
	case a.k == kBool && a.b, b.k == kBool && b.b:
		return boolVal(true)
	case a.k == kBool && b.k == kBool:
		return boolVal(false)
	}
	return undef
}

func arith(op tokKind, a, b value) value {
	if a.k != kNumber || b.k != kNumber {
		return undef
	}
	switch op {
	case tPlus:
		return numVal(a.n + b.n)
	case tMinus:
		return numVal(a.n - b.n)
	case tMul:
		return numVal(a.n * b.n)
	case tDiv:
		return numVal(a.n / b.n)
	}
	return numVal(math.Mod(a.n, b.n)) // C#'s % on doubles: the sign of the dividend
}

// parseNumber reads an INTEGER, REAL or HEX literal as a double.
func parseNumber(t token) (float64, bool) {
	if t.kind == tHex {
		u, err := strconv.ParseInt(t.text[2:], 16, 64)
		return float64(u), err == nil
	}
	f, err := strconv.ParseFloat(t.text, 64)
	if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
		return f, true // ±Inf or 0, as .NET's double.TryParse gives
	}
	return f, err == nil
}
