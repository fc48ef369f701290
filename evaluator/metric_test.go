package evaluator

import (
	"errors"
	"testing"
)

// TestMetric: Azure's device- and module-level metric queries, and a bare
// condition, counted against a device's report; a module-level query
// counts a device once any module twin matches, $edgeAgent and $edgeHub
// included; errors point into the query as written.
func TestMetric(t *testing.T) {
	report := DecodeReport([]byte(`{"lastDesiredStatus":{"code":200},"hub":{"status":"running","expired":3},
		"moduleTwins":{"filter":{"$version":4,"threshold":30,"state":"ok"},"plc":{"$version":2,"state":"degraded"}}}`))
	tags := map[string]any{"line": "1"}
	for _, tc := range []struct {
		query string
		want  bool
	}{
		{"SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200", true},
		{"select deviceId from devices where tags.line = '1'", true},
		{"properties.reported.lastDesiredStatus.code = 500", false},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = 'filter' AND properties.reported.state = 'ok'", true},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = 'plc' AND properties.reported.state = 'ok'", false},
		{"SELECT deviceId FROM devices.modules WHERE properties.reported.state = 'degraded'", true},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = 'filter' AND properties.reported.threshold > 20", true},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND properties.reported.lastDesiredStatus.code = 200", true},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeHub' AND properties.reported.expired > 0", true},
		{"SELECT deviceId FROM devices.modules WHERE moduleId = 'nope'", false},
		{"SELECT deviceId FROM devices.modules", true},
		{"SELECT deviceId FROM devices", true},
	} {
		m, err := CompileMetric(tc.query)
		if err != nil {
			t.Errorf("%s: %v", tc.query, err)
			continue
		}
		if got := m.Matches("press-01", tags, report); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.query, got, tc.want)
		}
	}
	if m, _ := CompileMetric("SELECT deviceId FROM devices.modules WHERE moduleId = 'filter'"); m.Matches("press-01", tags, nil) {
		t.Error("a device without a report matched a module-level query")
	}
	for _, tc := range []struct {
		query string
		col   int
	}{
		{"SELECT deviceId FROM devices WHERE moduleId = 'x'", 36},                  // moduleId is not a device root
		{"SELECT deviceId FROM devices.modules WHERE moduleId = 3", 53},            // a string, at the comparison
		{"SELECT deviceId FROM twins WHERE x = 1", 22},                             // the source
		{"SELECT deviceId FROM devices.modules WHERE moduleId.x = 'a'", 44},        // nothing below moduleId
		{"SELECT deviceId FROM devices.modules WHERE properties.reported.a ==", 0}, // some column
		{"SELECT deviceId FROM devices WHEN x = 1", 30},
	} {
		_, err := CompileMetric(tc.query)
		var se *SyntaxError
		if !errors.As(err, &se) || !errors.Is(err, ErrInvalidCondition) {
			t.Errorf("%s: %v, want a syntax error", tc.query, err)
			continue
		}
		if tc.col > 0 && se.Column != tc.col {
			t.Errorf("%s: column %d (%s), want %d", tc.query, se.Column, se.Msg, tc.col)
		}
	}
}
