package evaluator

import (
	"errors"
	"strings"
	"testing"
)

// The string and type functions of IoT Hub's query language, as target
// conditions use them: what they match (in every evaluator: evalAll
// checks the document evaluator, CEL and the engines agree), on tags that
// are missing or of another type, and how a wrong call is refused.
func TestCompile_Functions(t *testing.T) {
	tags := map[string]any{
		"site":  "Plant-7",
		"line":  "press-03",
		"n":     3.0,
		"flag":  false,
		"nul":   nil,
		"obj":   map[string]any{"k": "v"},
		"arr":   []any{"plant"},
		"empty": "",
	}
	valid := []struct {
		cond string
		id   string
		want bool
	}{
		// STARTSWITH / ENDSWITH on strings, case-sensitive as in IoT Hub.
		{"STARTSWITH(tags.site, 'Plant-')", "d", true},
		{"STARTSWITH(tags.site, 'plant-')", "d", false},
		{"startswith(tags.site, 'Plant')", "d", true}, // the name in any case
		{"STARTSWITH(tags.site, '')", "d", true},
		{"STARTSWITH(tags.empty, '')", "d", true},
		{"STARTSWITH(tags.site, 'Plant-7-x')", "d", false},
		{"ENDSWITH(tags.line, '-03')", "d", true},
		{"ENDSWITH(tags.line, '-3')", "d", false},
		{"EndsWith(tags.line, 'PRESS-03')", "d", false},
		{"STARTSWITH(deviceId, 'press-')", "press-01", true},
		{"STARTSWITH(deviceId, 'Press-')", "press-01", false},
		{"ENDSWITH(deviceId, '01')", "press-01", true},
		{"NOT STARTSWITH(tags.site, 'x') AND ENDSWITH(tags.site, '7')", "d", true},
		// Missing and wrong-typed tags never match.
		{"STARTSWITH(tags.missing, '')", "d", false},
		{"STARTSWITH(tags.n, '3')", "d", false},
		{"STARTSWITH(tags.obj, '')", "d", false},
		{"STARTSWITH(tags.arr, 'plant')", "d", false},
		{"ENDSWITH(tags.nul, '')", "d", false},
		{"STARTSWITH(tags.obj.k, 'v')", "d", true},
		{"NOT STARTSWITH(tags.missing, 'a')", "d", true},
		// Type tests.
		{"IS_STRING(tags.site)", "d", true},
		{"IS_STRING(tags.n)", "d", false},
		{"IS_STRING(tags.missing)", "d", false},
		{"IS_STRING(deviceId)", "d", true},
		{"IS_NUMBER(tags.n)", "d", true},
		{"IS_NUMBER(tags.site)", "d", false},
		{"IS_NUMBER(deviceId)", "d", false},
		{"IS_BOOL(tags.flag)", "d", true},
		{"IS_BOOL(tags.n)", "d", false},
		{"IS_NULL(tags.nul)", "d", true},
		{"IS_NULL(tags.missing)", "d", false},
		{"IS_NULL(tags.site)", "d", false},
		{"IS_OBJECT(tags.obj)", "d", true},
		{"IS_OBJECT(tags.arr)", "d", false},
		{"IS_OBJECT(tags.nul)", "d", false},
		{"is_object(tags.obj.k)", "d", false},
		{"IS_DEFINED(tags.nul) AND NOT IS_NULL(tags.site)", "d", true},
	}
	for _, tt := range valid {
		t.Run(tt.cond, func(t *testing.T) {
			if got := evalAll(t, tt.cond, tt.id, tags); got != tt.want {
				t.Fatalf("%q on %s = %v, want %v", tt.cond, tt.id, got, tt.want)
			}
		})
	}

	invalid := []struct {
		cond string
		col  int
		msg  string
	}{
		{"STARTSWITH(tags.site)", 21, "STARTSWITH needs two arguments, a property and a quoted string"},
		{"STARTSWITH(tags.site, 3)", 23, "STARTSWITH's second argument must be a quoted string such as 'plant-', not '3'"},
		{"STARTSWITH(tags.site, tags.line)", 23, "comparing two properties is not supported"},
		{"STARTSWITH(tags.site, \"x\")", 23, "double quotes are not allowed"},
		{"STARTSWITH('Plant', tags.site)", 12, "STARTSWITH's first argument must be a property such as tags.site, not 'Plant'"},
		{"ENDSWITH()", 10, "ENDSWITH needs a property as its first argument"},
		{"ENDSWITH(tags.a, 'x', 'y')", 21, "ENDSWITH takes two arguments; found a further argument"},
		{"IS_STRING(tags.a, 'x')", 17, "IS_STRING takes one property; found a further argument"},
		{"IS_NUMBER(tags.a", 17, "expected ')' to close IS_NUMBER("},
		{"IS_BOOL(3)", 9, "IS_BOOL's first argument must be a property"},
		{"IS_NULL(properties.reported.x)", 9, "only tags and deviceId may be used"},
		{"IS_OBJECT(Tags.x)", 11, "did you mean tags?"},
		{"STARTS_WITH(tags.a, 'x')", 1, "unknown function STARTS_WITH; did you mean STARTSWITH?"},
		{"ENDS_WITH(tags.a, 'x')", 1, "did you mean ENDSWITH?"},
		{"IS_ARRAY(tags.a)", 1, "unknown function IS_ARRAY: the functions are IS_DEFINED, STARTSWITH, ENDSWITH, IS_STRING, IS_NUMBER, IS_BOOL, IS_NULL and IS_OBJECT"},
		{"tags.a = 1 AND STARTSWITH tags.a", 16, "found STARTSWITH"},
		{"STARTSWITH(tags.a, 'x') = true", 25, "expected AND, OR, NOT or the end of the condition"},
	}
	for _, tt := range invalid {
		t.Run(tt.cond, func(t *testing.T) {
			_, err := Compile(tt.cond)
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("Compile(%q) = %v, want a *SyntaxError", tt.cond, err)
			}
			if se.Column != tt.col || !strings.Contains(se.Msg, tt.msg) {
				t.Fatalf("Compile(%q) = %q, want column %d and %q", tt.cond, err, tt.col, tt.msg)
			}
		})
	}
}

// A deviceId prefix is answered from the id order, also while devices are
// added and deleted around it (deleted slots keep their ids until the
// order is compacted, so the search stays sorted).
func TestEngine_DeviceIDPrefixIndexed(t *testing.T) {
	for name, e := range testEngines() {
		t.Run(name, func(t *testing.T) {
			for _, id := range []string{"press-01", "press-02", "pressure", "pump-1", "a", "press-10"} {
				e.PutDevice(id, nil)
			}
			e.DeleteDevice("press-02")
			e.PutDevice("press-03", nil)
			e.DeleteDevice("a")
			ch, err := e.PutDeployment(Deployment{ID: "p", Condition: "STARTSWITH(deviceId, 'press-')"})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, c := range ch {
				got = append(got, c.DeviceID)
			}
			if want := "press-01,press-03,press-10"; strings.Join(got, ",") != want {
				t.Fatalf("applied to %v, want %s", got, want)
			}
			e.PutDevice("press-02", nil) // a device created later is matched too
			if e.Applied("press-02") != "p" || e.Applied("pressure") != "" {
				t.Fatalf("press-02 → %q, pressure → %q", e.Applied("press-02"), e.Applied("pressure"))
			}
			s, exact := e.setEval(e.mustBind(t, "STARTSWITH(deviceId, 'press-')"))
			if !exact || s.count() != 4 {
				t.Fatalf("setEval: %d devices, exact %v; want 4 from the index", s.count(), exact)
			}
		})
	}
}

func (e *Engine) mustBind(t *testing.T, cond string) *pnode {
	t.Helper()
	c, err := Compile(cond)
	if err != nil {
		t.Fatal(err)
	}
	b := binder{d: &e.d}
	return b.bind(c.root)
}
