package evaluator

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

// evalAll evaluates a condition for one device in every form: the document
// evaluator, the CEL program, and an engine holding only that device. They
// must agree; the result is returned.
func evalAll(t *testing.T, cond, id string, tags map[string]any) bool {
	t.Helper()
	c, err := Compile(cond)
	if err != nil {
		t.Fatalf("Compile(%q): %v", cond, err)
	}
	want, err := c.EvalCEL(DeviceDocument(id, tags))
	if err != nil {
		t.Fatalf("EvalCEL(%q): %v", cond, err)
	}
	if got := c.Eval(id, tags); got != want {
		t.Fatalf("%q on %s %v: Eval = %v, CEL = %v", cond, id, tags, got, want)
	}
	if got := c.EvalDocument(DeviceDocument(id, tags)); got != want {
		t.Fatalf("%q on %s %v: EvalDocument = %v, CEL = %v", cond, id, tags, got, want)
	}
	for name, e := range testEngines() {
		e.PutDevice(id, tags)
		ids, err := e.Match(c)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(ids) == 1; got != want {
			t.Fatalf("%q on %s %v: %s engine Match = %v, CEL = %v", cond, id, tags, name, ids, want)
		}
		ch, err := e.PutDeployment(Deployment{ID: "d", Condition: cond})
		if err != nil {
			t.Fatal(err)
		}
		if got := len(ch) == 1; got != want {
			t.Fatalf("%q on %s %v: %s engine PutDeployment changes = %v, CEL = %v", cond, id, tags, name, ch, want)
		}
	}
	return want
}

func TestCompile_Semantics(t *testing.T) {
	prod := map[string]any{"environment": "prod", "location": "westus", "operator": "John"}
	nested := map[string]any{
		"location": map[string]any{"state": "Oregon", "zip": 97201.0},
		"arr":      []any{1.0, "x"},
		"nul":      nil,
		"n":        3.0,
		"s":        "abc",
		"b":        true,
		"dotted.k": "v",
		"neg":      -0.0,
	}
	tests := []struct {
		name string
		cond string
		id   string
		tags map[string]any
		want bool
	}{
		// The seed's examples.
		{"seed deviceId", "deviceId ='linuxprod1'", "linuxprod1", nil, true},
		{"seed deviceId other", "deviceId ='linuxprod1'", "linuxprod2", nil, false},
		{"seed tag", "tags.environment ='prod'", "d", prod, true},
		{"seed and", "tags.environment = 'prod' AND tags.location = 'westus'", "d", prod, true},
		{"seed and miss", "tags.environment = 'prod' AND tags.location = 'eastus'", "d", prod, false},
		{"seed or", "tags.environment = 'test' OR tags.location = 'westus'", "d", prod, true},
		{"seed bare not excludes", "tags.operator = 'John' AND tags.environment = 'prod' NOT deviceId = 'linuxprod1'", "linuxprod1", prod, false},
		{"seed bare not keeps", "tags.operator = 'John' AND tags.environment = 'prod' NOT deviceId = 'linuxprod1'", "linuxprod2", prod, true},
		{"seed escaped quote", "deviceId='operator''sDevice'", "operator'sDevice", nil, true},
		{"seed escaped quote other", "deviceId='operator''sDevice'", "operatorsDevice", nil, false},

		// Every comparison operator, numbers and strings.
		{"eq num", "tags.n = 3", "d", nested, true},
		{"ne num", "tags.n != 4", "d", nested, true},
		{"ne num same", "tags.n != 3", "d", nested, false},
		{"ltgt num", "tags.n <> 4", "d", nested, true},
		{"lt num", "tags.n < 4", "d", nested, true},
		{"lt num equal", "tags.n < 3", "d", nested, false},
		{"le num", "tags.n <= 3", "d", nested, true},
		{"gt num", "tags.n > 2.5", "d", nested, true},
		{"gt num neg", "tags.n > -1", "d", nested, true},
		{"ge num", "tags.n >= 3.5", "d", nested, false},
		{"eq str", "tags.s = 'abc'", "d", nested, true},
		{"lt str", "tags.s < 'abd'", "d", nested, true},
		{"ge str", "tags.s >= 'abd'", "d", nested, false},
		{"gt str prefix", "tags.s > 'ab'", "d", nested, true},
		{"deviceId lt", "deviceId < 'm'", "linux", nil, true},
		{"deviceId ne", "deviceId != 'a'", "b", nil, true},
		{"no spaces", "tags.n>=3 AND(tags.s='abc')", "d", nested, true},

		// Numbers: JSON 3, 3.0, hex, exponent and Go number types are one.
		{"3 is 3.0", "tags.n = 3.0", "d", nested, true},
		{"hex", "tags.n = 0x3", "d", nested, true},
		{"exponent", "tags.n = 30e-1", "d", nested, true},
		{"int tag", "tags.n = 3", "d", map[string]any{"n": 3}, true},
		{"int64 tag", "tags.n > 2", "d", map[string]any{"n": int64(3)}, true},
		{"json.Number tag", "tags.n = 3", "d", map[string]any{"n": json.Number("3.0")}, true},
		{"negative zero", "tags.neg = 0", "d", nested, true},
		{"negative literal", "tags.x = -2", "d", map[string]any{"x": -2.0}, true},
		{"NaN never equal", "tags.x = 1", "d", map[string]any{"x": math.NaN()}, false},
		{"NaN not equal", "tags.x != 1", "d", map[string]any{"x": math.NaN()}, true},
		{"NaN unordered", "tags.x < 1", "d", map[string]any{"x": math.NaN()}, false},

		// Booleans and null.
		{"bool", "tags.b = true", "d", nested, true},
		{"bool case", "tags.b = TRUE", "d", nested, true},
		{"bool ne", "tags.b != false", "d", nested, true},
		{"bool vs string", "tags.b = 'true'", "d", nested, false},
		{"corpus bool", "tags.dashboard=true", "d", map[string]any{"dashboard": true}, true},
		{"null eq", "tags.nul = null", "d", nested, true},
		{"null eq missing", "tags.missing = null", "d", nested, false},
		{"null eq value", "tags.s = null", "d", nested, false},
		{"not null", "tags.s != null", "d", nested, true},
		{"not null object", "tags.location != null", "d", nested, true},
		{"not null on null", "tags.nul != null", "d", nested, false},
		{"not null missing", "tags.missing != null", "d", nested, false},

		// Missing tags and type mismatches never match a comparison.
		{"missing eq", "tags.missing = 'a'", "d", nested, false},
		{"missing ne", "tags.missing != 'a'", "d", nested, false},
		{"missing lt", "tags.missing < 3", "d", nested, false},
		{"not missing", "NOT tags.missing = 'a'", "d", nested, true},
		{"nil tags", "tags.a != 'x'", "d", nil, false},
		{"string vs number", "tags.n = '3'", "d", nested, false},
		{"string vs number ne", "tags.n != '3'", "d", nested, false},
		{"number vs string lt", "tags.s < 3", "d", nested, false},
		{"object vs string", "tags.location = 'Oregon'", "d", nested, false},
		{"array vs number", "tags.arr = 1", "d", nested, false},
		{"below a string", "tags.s.x = 'a'", "d", nested, false},
		{"below an array", "tags.arr.x = 1", "d", nested, false},

		// Nested tags, any depth.
		{"nested", "tags.location.state = 'Oregon'", "d", nested, true},
		{"nested number", "tags.location.zip > 97000", "d", nested, true},
		{"corpus nested", "tags.location.state='Oregon'", "d", nested, true},
		{"deep", "tags.a.b.c.d = 1", "d", map[string]any{"a": map[string]any{"b": map[string]any{"c": map[string]any{"d": 1.0}}}}, true},
		{"dotted key is not nested", "tags.dotted.k = 'v'", "d", nested, false},
		{"nested map[string]string", "tags.m.k = 'v'", "d", map[string]any{"m": map[string]string{"k": "v"}}, true},

		// IN, NIN, IS_DEFINED.
		{"in", "tags.environment IN ['test', 'prod']", "d", prod, true},
		{"in miss", "tags.environment IN ['test', 'dev']", "d", prod, false},
		{"in mixed types", "tags.n IN ['3', 3]", "d", nested, true},
		{"in empty", "tags.n IN []", "d", nested, false},
		{"in null", "tags.nul IN [null, 1]", "d", nested, true},
		{"in missing", "tags.missing IN ['a']", "d", nested, false},
		{"in lower case", "tags.environment in ['prod']", "d", prod, true},
		{"nin", "tags.environment NIN ['test', 'dev']", "d", prod, true},
		{"nin hit", "tags.environment NIN ['prod']", "d", prod, false},
		{"nin missing", "tags.missing NIN ['a']", "d", nested, false},
		{"nin other type", "tags.n NIN ['3']", "d", nested, true},
		{"nin object", "tags.location NIN ['x']", "d", nested, true},
		{"nin empty", "tags.n nin []", "d", nested, true},
		{"nin mixed case", "tags.n NiN [3]", "d", nested, false},
		{"deviceId in", "deviceId IN ['a', 'b']", "b", nil, true},
		{"deviceId nin", "deviceId NIN ['a', 'b']", "c", nil, true},
		{"is_defined", "IS_DEFINED(tags.s)", "d", nested, true},
		{"is_defined lower", "is_defined(tags.s)", "d", nested, true},
		{"is_defined missing", "IS_DEFINED(tags.missing)", "d", nested, false},
		{"is_defined null", "IS_DEFINED(tags.nul)", "d", nested, true},
		{"is_defined object", "IS_DEFINED(tags.location)", "d", nested, true},
		{"is_defined nested", "Is_Defined(tags.location.state)", "d", nested, true},
		{"is_defined array", "IS_DEFINED(tags.arr)", "d", nested, true},
		{"is_defined deviceId", "IS_DEFINED(deviceId)", "d", nil, true},
		{"not is_defined", "NOT IS_DEFINED(tags.missing)", "d", nested, true},

		// Precedence: NOT > AND > OR; keywords in any case.
		{"or below and", "tags.n = 3 OR tags.s = 'x' AND tags.b = false", "d", nested, true},
		{"or below and 2", "tags.n = 4 OR tags.s = 'abc' AND tags.b = false", "d", nested, false},
		{"parens", "(tags.n = 3 OR tags.s = 'x') AND tags.b = false", "d", nested, false},
		{"not above and", "NOT tags.n = 4 AND tags.s = 'abc'", "d", nested, true},
		{"not above or", "NOT tags.n = 3 OR tags.s = 'abc'", "d", nested, true},
		{"not of group", "NOT (tags.n = 3 OR tags.s = 'x')", "d", nested, false},
		{"double not", "NOT NOT tags.n = 3", "d", nested, true},
		{"lower keywords", "tags.n = 3 and not tags.s = 'x' or tags.b = false", "d", nested, true},
		{"mixed keywords", "tags.n = 3 And tags.s = 'abc' oR tags.b = false", "d", nested, true},
		{"bare not chain", "tags.n = 3 NOT tags.s = 'x' NOT tags.b = false", "d", nested, true},
		{"bare not in or", "tags.n = 4 OR tags.n = 3 NOT tags.s = 'abc'", "d", nested, false},

		// All and nothing.
		{"star", "*", "d", nil, true},
		{"star spaced", "  *  ", "d", nested, true},
		{"empty", "", "d", nested, false},
		{"blank", " \t\n", "d", nested, false},

		// Strings: quotes, spaces, unicode and allowed punctuation.
		{"empty string", "tags.e = ''", "d", map[string]any{"e": ""}, true},
		{"quotes", "tags.q = '''a'''", "d", map[string]any{"q": "'a'"}, true},
		{"unicode", "tags.city = 'Zürich 東京'", "d", map[string]any{"city": "Zürich 東京"}, true},
		{"punctuation", "tags.p = '-:.+%_#*?!(),=@;$'", "d", map[string]any{"p": "-:.+%_#*?!(),=@;$"}, true},
		{"backslash", `tags.p = 'a\nb"c'`, "d", map[string]any{"p": `a\nb"c`}, true},
		{"dollar name", "tags.$version = 2", "d", map[string]any{"$version": 2.0}, true},
		{"keyword as name", "tags.in = 1 AND tags.not.and = 2", "d", map[string]any{"in": 1.0, "not": map[string]any{"and": 2.0}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := evalAll(t, tt.cond, tt.id, tt.tags); got != tt.want {
				t.Errorf("%q on %s %v = %v, want %v", tt.cond, tt.id, tt.tags, got, tt.want)
			}
		})
	}
}

func TestCompile_Errors(t *testing.T) {
	tests := []struct {
		cond string
		col  int
		msg  string // a part of the message
	}{
		{"tags.environment = 'prod' =", 27, "expected AND, OR, NOT"},
		{"deviceId = 'x' AND tags.a =", 28, "expected a value after '=', found end of input"},
		{"tags.a = 1 AND", 15, "expected a condition such as tags.environment = 'prod' after AND, found end of input"},
		{"tags.a = \"x\"", 10, "double quotes are not allowed; quote strings with single quotes"},
		{"deviceId='jetsonnano0", 10, "unterminated string"},
		{"deviceId=''$DEVICE_ID''", 12, "unexpected $DEVICE_ID after a complete condition"},
		{"tags.a = 'it''s", 10, "unterminated string"},
		{"properties.reported.x = 1", 1, "properties cannot be used in a target condition: only tags and deviceId may be used"},
		{"tags.a = 1 AND properties.desired.x = 1", 16, "only tags and deviceId may be used"},
		{"from devices.modules where tags.building=9", 1, "no SELECT, FROM or WHERE"},
		{"SELECT * FROM devices", 1, "no SELECT, FROM or WHERE"},
		{"foo.bar = 1", 1, "unknown property foo: a target condition may use only tags"},
		{"Tags.a = 1", 1, "did you mean tags?"},
		{"deviceid = 'a'", 1, "did you mean deviceId?"},
		{"tags = 'x'", 1, "name a tag below tags"},
		{"deviceId.x = 'a'", 1, "deviceId has no properties below it"},
		{"tags. = 1", 7, "expected a property name after '.', found '='"},
		{"tags.n = 3AND tags.s = 'a'", 10, "malformed number"},
		{"(tags.a = 1", 12, "expected ')' to close the '(' at column 1"},
		{"tags.a = 1)", 11, "no '(' is open"},
		{"tags.a", 7, "expected a comparison (=, !=, <>, <, <=, >, >=, IN or NIN) after tags.a, found end of input"},
		{"tags.a IN ('x')", 11, "expected a list such as ['a', 'b'] after IN"},
		{"tags.a IN ['x' 'y']", 16, "expected ',' or ']' in the list opened at column 11"},
		{"tags.a IN ['x',", 16, "expected a value in the list, found end of input"},
		{"tags.a = ['x']", 10, "a list needs IN or NIN"},
		{"tags.a NOT IN ['x']", 8, "use NIN instead of NOT IN"},
		{"tags.a == 1", 8, "use = (a single equals sign)"},
		{"tags.a = 1 && tags.b = 2", 12, "use AND instead of &&"},
		{"tags.a = 1 || tags.b = 2", 12, "use OR instead of ||"},
		{"!tags.a = 1", 1, "use NOT to negate"},
		{"tags.a + 1 = 2", 8, "arithmetic (+) is not supported"},
		{"tags.a < true", 8, "< needs a number or a string; true can only be compared with = or !="},
		{"tags.a >= null", 8, ">= needs a number or a string"},
		{"deviceId = 3", 10, "deviceId is a string: compare it with a quoted value, not 3"},
		{"deviceId IN ['a', null]", 10, "deviceId is a string"},
		{"tags.a = prod", 10, "quote strings with single quotes, e.g. 'prod'"},
		{"tags.a = tags.b", 10, "comparing two properties is not supported"},
		{"CONTAINS(tags.a, 'x')", 1, "unknown function CONTAINS: the functions are IS_DEFINED, STARTSWITH"},
		{"IS_DEFINED(tags.a", 18, "expected ')' to close IS_DEFINED("},
		{"IS_DEFINED tags.a", 1, "found IS_DEFINED"},
		{"* AND tags.a = 1", 3, "* (every device) must be the whole condition"},
		{"tags.a = 1 OR *", 15, "* (every device) must be the whole condition"},
		{"'prod' = tags.a", 1, "a comparison starts with a property"},
		{"AND tags.a = 1", 1, "found AND"},
		{"tags.a = 1.", 10, "expected digits after the decimal point"},
		{"tags.a = 1e", 10, "expected digits in the exponent"},
		{"tags.a = 12ab", 10, "malformed number"},
		{"tags.a = 0x", 10, "malformed hexadecimal number"},
		{"tags.a = 1e999", 10, "out of range"},
		{"tags.a = 'x' ; tags.b = 1", 14, "unexpected character ';'"},
		{"tags.ü = 1", 6, "unexpected character 'ü'"},
		{"tags.x = 'ü' AND tags.a = ?", 27, "unexpected character '?'"},
		{"tags.a = 'x\xff'", 12, "not valid UTF-8"},
		{strings.Repeat("(", 40) + "tags.a = 1" + strings.Repeat(")", 40), 33, "nests parentheses and NOTs more than 32 deep"},
		{strings.Repeat("NOT ", 40) + "tags.a = 1", 129, "more than 32 deep"},
		{"tags" + strings.Repeat(".a", 17) + " = 1", 38, "more than 16 names deep"},
		{"tags.a IN [" + strings.Repeat("'x',", MaxConditionLength/4) + "'x']", 1, "at most 65536 are allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.cond[:min(len(tt.cond), 40)], func(t *testing.T) {
			_, err := Compile(tt.cond)
			if err == nil {
				t.Fatalf("Compile(%q) succeeded", tt.cond)
			}
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("Compile(%q) = %T %v, want *SyntaxError", tt.cond, err, err)
			}
			if !errors.Is(err, ErrInvalidCondition) {
				t.Errorf("error does not match ErrInvalidCondition")
			}
			if se.Column != tt.col || !strings.Contains(se.Msg, tt.msg) {
				t.Errorf("Compile(%q) = %q, want column %d and %q", tt.cond, err, tt.col, tt.msg)
			}
			if prefix := fmt.Sprintf("column %d: ", se.Column); !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("Error() = %q, want prefix %q", err, prefix)
			}
		})
	}
}

func TestCompileQuery_OtherRoots(t *testing.T) {
	c, err := CompileQuery("properties.reported.lastDesiredStatus.code = 200 AND tags.env = 'prod'", "properties")
	if err != nil {
		t.Fatal(err)
	}
	if c.TargetsOnly() {
		t.Error("TargetsOnly() = true for a condition on properties")
	}
	doc := map[string]any{
		"deviceId":   "d1",
		"tags":       map[string]any{"env": "prod"},
		"properties": map[string]any{"reported": map[string]any{"lastDesiredStatus": map[string]any{"code": 200}}},
	}
	if !c.EvalDocument(doc) {
		t.Error("EvalDocument = false, want true")
	}
	if ok, err := c.EvalCEL(doc); err != nil || !ok {
		t.Errorf("EvalCEL = %v, %v; want true", ok, err)
	}
	// A target evaluation has no properties: undefined, so false.
	if c.Eval("d1", map[string]any{"env": "prod"}) {
		t.Error("Eval = true without properties")
	}
	if _, err := NewEngine().Match(c); !errors.Is(err, ErrNotTargetCondition) {
		t.Errorf("Match = %v, want ErrNotTargetCondition", err)
	}
	// A missing root is undefined, not an error.
	if ok, err := c.EvalCEL(map[string]any{}); err != nil || ok {
		t.Errorf("EvalCEL(empty) = %v, %v", ok, err)
	}
	if _, err := CompileQuery("configurations.x = 1", "properties"); err == nil || !strings.Contains(err.Error(), "may use only deviceId, tags, properties") {
		t.Errorf("unknown root error = %v", err)
	}
	for _, bad := range []string{"", "a.b", "1x", "and"} {
		if _, err := CompileQuery("tags.a = 1", bad); !errors.Is(err, ErrInvalidCondition) {
			t.Errorf("CompileQuery root %q = %v, want ErrInvalidCondition", bad, err)
		}
	}
}

func TestCondition_Accessors(t *testing.T) {
	c := MustCompile("tags.a = 1")
	if c.String() != "tags.a = 1" || c.MatchesNothing() || c.MatchesEverything() || !c.TargetsOnly() {
		t.Errorf("accessors wrong: %q %v %v %v", c.String(), c.MatchesNothing(), c.MatchesEverything(), c.TargetsOnly())
	}
	if !strings.Contains(c.CEL(), `doc["tags"]["a"] == 1.0`) {
		t.Errorf("CEL() = %s", c.CEL())
	}
	if !MustCompile("").MatchesNothing() || !MustCompile("*").MatchesEverything() {
		t.Error("empty/star accessors wrong")
	}
	defer func() {
		if recover() == nil {
			t.Error("MustCompile did not panic")
		}
	}()
	MustCompile("tags.a =")
}

// The longest conditions are either compiled or refused as too complex,
// quickly; a long list of device ids (the realistic long condition) compiles.
func TestCompile_Limits(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles 64 KiB conditions")
	}
	for _, depth := range []int{1, 4, MaxPathDepth} {
		clause := "tags" + strings.Repeat(".abc", depth) + " != 'x'"
		var b strings.Builder
		b.WriteString(clause)
		for b.Len()+len(clause)+5 < MaxConditionLength {
			b.WriteString(" OR " + clause)
		}
		start := time.Now()
		_, err := Compile(b.String())
		var se *SyntaxError
		if err != nil && (!errors.As(err, &se) || !strings.Contains(se.Msg, "too complex")) {
			t.Fatalf("depth %d: %v", depth, err)
		}
		// Typically under a second; a blow-up shows as this test timing
		// out (speed is measured by benchmarks, never asserted here).
		t.Logf("depth %d: %v in %v", depth, err, time.Since(start))
	}
	ids := "deviceId IN ['d0'"
	for i := 1; len(ids) < MaxConditionLength-20; i++ {
		ids += fmt.Sprintf(", 'device-%d'", i)
	}
	if _, err := Compile(ids + "]"); err != nil {
		t.Fatalf("long IN list: %v", err)
	}
}
