package evaluator

import (
	"errors"
	"strings"
	"testing"
)

// Azure's system metric queries, in its own words: module-level, scoped
// with configurations.[[id]] (a quoted property name) and comparing two
// properties of the $edgeAgent twin.
func TestMetric_AzureSystemQueries(t *testing.T) {
	const id = "presses-v1.2"
	applied := "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND configurations.[[" + id + "]].status = 'Applied'"
	reported := applied + " AND properties.desired.$version = properties.reported.lastDesiredVersion"
	queries := map[string]string{
		"targeted":  "SELECT deviceId FROM devices WHERE IS_DEFINED(configurations.[[" + id + "]])",
		"applied":   applied,
		"succeeded": reported + " AND properties.reported.lastDesiredStatus.code = 200",
		"failed":    reported + " AND properties.reported.lastDesiredStatus.code != 200",
	}
	report := func(version float64, code float64) map[string]any {
		return map[string]any{"lastDesiredVersion": version, "lastDesiredStatus": map[string]any{"code": code}}
	}
	devices := []struct {
		d    MetricDevice
		want string // the queries it counts for
	}{
		{MetricDevice{ID: "ok", Configurations: map[string]string{id: "Applied"}, DesiredVersion: 7, Report: report(7, 200)}, "targeted applied succeeded"},
		{MetricDevice{ID: "refused", Configurations: map[string]string{id: "Applied"}, DesiredVersion: 7, Report: report(7, 400)}, "targeted applied failed"},
		{MetricDevice{ID: "behind", Configurations: map[string]string{id: "Applied"}, DesiredVersion: 9, Report: report(7, 200)}, "targeted applied"},
		{MetricDevice{ID: "silent", Configurations: map[string]string{id: "Applied"}, DesiredVersion: 9, Report: map[string]any{}}, "targeted applied"},
		{MetricDevice{ID: "other", Configurations: map[string]string{id: "Targeted", "x": "Applied"}, DesiredVersion: 3, Report: report(3, 200)}, "targeted"},
		{MetricDevice{ID: "none", Configurations: map[string]string{"x": "Applied"}, DesiredVersion: 3, Report: report(3, 200)}, ""},
	}
	for name, q := range queries {
		m, err := CompileMetric(q)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, dv := range devices {
			if got, want := m.MatchesDevice(dv.d), strings.Contains(" "+dv.want+" ", " "+name+" "); got != want {
				t.Errorf("%s on %s = %v, want %v", name, dv.d.ID, got, want)
			}
		}
	}
}

// Comparing two properties (queries only), and [[ ]] names: every
// evaluator agrees (CEL is the reference), and a target condition still
// refuses them.
func TestCompileQuery_PropertyComparison(t *testing.T) {
	doc := map[string]any{
		"deviceId": "d",
		"properties": map[string]any{
			"desired":  map[string]any{"$version": 5.0, "s": "a", "b": true, "n": nil, "o": map[string]any{}},
			"reported": map[string]any{"v": 5.0, "w": 6.0, "s": "b", "b": true, "n": nil, "o": map[string]any{}, "odd.key": 1.0},
		},
		"configurations": map[string]any{"a-b.c": map[string]any{"status": "Applied"}},
	}
	for _, tc := range []struct {
		cond string
		want bool
	}{
		{"properties.desired.$version = properties.reported.v", true},
		{"properties.desired.$version != properties.reported.v", false},
		{"properties.desired.$version < properties.reported.w", true},
		{"properties.desired.s < properties.reported.s", true},
		{"properties.desired.s = properties.reported.v", false}, // types differ
		{"properties.desired.b = properties.reported.b", true},
		{"properties.desired.b < properties.reported.b", false}, // no order on bools
		{"properties.desired.n = properties.reported.n", true},
		{"properties.desired.o = properties.reported.o", false}, // objects never compare
		{"properties.desired.x = properties.reported.x", false}, // undefined
		{"configurations.[[a-b.c]].status = 'Applied'", true},
		{"IS_DEFINED(configurations.[[a-b.c]])", true},
		{"IS_DEFINED(configurations.[[a-b]])", false},
		{"properties.reported.[[odd.key]] = 1", true},
	} {
		c, err := CompileQuery(tc.cond, "properties", "configurations")
		if err != nil {
			t.Fatalf("%q: %v", tc.cond, err)
		}
		cel, err := c.EvalCEL(doc)
		if err != nil {
			t.Fatalf("%q: CEL: %v", tc.cond, err)
		}
		if got := c.EvalDocument(doc); got != tc.want || cel != tc.want {
			t.Errorf("%q = %v (CEL %v), want %v", tc.cond, got, cel, tc.want)
		}
	}
	for _, tc := range []struct {
		cond string
		col  int
		msg  string
	}{
		{"tags.a = tags.b", 10, "comparing two properties is not supported"},
		{"configurations.[[x]].status = 'Applied'", 1, "configurations cannot be used in a target condition"},
		{"tags.[[a", 6, "unterminated [["},
		{"tags.[[]] = 1", 6, "empty property name"},
	} {
		_, err := Compile(tc.cond)
		var se *SyntaxError
		if !errors.As(err, &se) || se.Column != tc.col || !strings.Contains(se.Msg, tc.msg) {
			t.Errorf("Compile(%q) = %v, want column %d and %q", tc.cond, err, tc.col, tc.msg)
		}
	}
}
