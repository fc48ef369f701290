package evaluator

import (
	"encoding/json"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Metric is a compiled custom metric query of a deployment, in one of
// Azure's forms:
//
//	SELECT deviceId FROM devices WHERE <condition>
//	SELECT deviceId FROM devices.modules WHERE <condition>
//	<condition>                     (a bare condition: FROM devices)
//
// A device-level condition may name deviceId, tags and properties (the
// device's reported document under properties.reported); a module-level
// one is evaluated against each module twin of the device: deviceId,
// moduleId and properties.reported (the module's reported properties; for
// $edgeAgent the device's whole report, for $edgeHub its hub's state). A
// device counts once when any of its module twins matches. Without a
// WHERE clause every device counts (devices) or every device with a
// module twin (devices.modules).
type Metric struct {
	modules bool
	cond    *Condition // nil: no WHERE
}

// Roots a metric's condition may name.
var (
	deviceMetricRoots = []string{"properties", rootConfigurations}
	moduleMetricRoots = []string{"properties", rootModuleID, rootConfigurations}
)

// rootConfigurations is a twin's configurations section: deployment id →
// {"status": "Targeted" | "Applied"}, read as configurations.[[id]].status.
const rootConfigurations = "configurations"

// CompileMetric compiles a metric query. Errors are *SyntaxError whose
// column counts from the start of the query, and match
// ErrInvalidCondition.
func CompileMetric(query string) (*Metric, error) {
	cond, at, modules, err := splitMetric(query)
	if err != nil {
		return nil, err
	}
	m := &Metric{modules: modules}
	if cond == "" && at >= 0 {
		return m, nil
	}
	roots := deviceMetricRoots
	if modules {
		roots = moduleMetricRoots
	}
	c, err := CompileQuery(cond, roots...)
	if err != nil {
		if se, ok := err.(*SyntaxError); ok && at > 0 {
			return nil, &SyntaxError{Column: se.Column + at, Msg: se.Msg}
		}
		return nil, err
	}
	m.cond = c
	return m, nil
}

// Modules tells whether the query is over module twins.
func (m *Metric) Modules() bool { return m.modules }

// splitMetric finds the FROM source and the condition of a query, and the
// number of characters before the condition (-1 for a query without
// SELECT: the query is the condition).
func splitMetric(query string) (cond string, at int, modules bool, err error) {
	toks := metricWords(query)
	if len(toks) == 0 || !strings.EqualFold(toks[0].text, "SELECT") {
		return query, -1, false, nil
	}
	from := -1
	for i, t := range toks {
		if strings.EqualFold(t.text, "FROM") {
			from = i
			break
		}
	}
	if from < 2 {
		col := len([]rune(query)) + 1
		if from >= 0 {
			col = toks[from].col
		}
		return "", 0, false, syntaxErr(col, "a metric query is SELECT deviceId FROM devices[.modules] WHERE <condition>")
	}
	if from+1 >= len(toks) {
		return "", 0, false, syntaxErr(toks[from].col, "FROM needs devices or devices.modules")
	}
	src := toks[from+1]
	switch {
	case strings.EqualFold(src.text, "devices"):
	case strings.EqualFold(src.text, "devices.modules"):
		modules = true
	default:
		return "", 0, false, syntaxErr(src.col, "FROM %s: a metric counts devices: FROM devices or FROM devices.modules", src.text)
	}
	if from+2 >= len(toks) {
		return "", len([]rune(query)), modules, nil // no WHERE
	}
	where := toks[from+2]
	if !strings.EqualFold(where.text, "WHERE") {
		return "", 0, false, syntaxErr(where.col, "expected WHERE after FROM %s, found %s", src.text, where.text)
	}
	// The condition starts after WHERE and the spaces that follow it.
	byteAt := where.end
	for byteAt < len(query) {
		r, n := utf8.DecodeRuneInString(query[byteAt:])
		if !unicode.IsSpace(r) {
			break
		}
		byteAt += n
	}
	cond = query[byteAt:]
	if strings.TrimSpace(cond) == "" {
		return "", 0, false, syntaxErr(where.col, "WHERE needs a condition")
	}
	return cond, utf8.RuneCountInString(query[:byteAt]), modules, nil
}

type metricWord struct {
	text string
	col  int // 1-based, in characters
	end  int // byte offset after it
}

// metricWords splits the query's leading words on spaces (quoted text
// does not matter: only SELECT ... FROM source WHERE are read).
func metricWords(q string) []metricWord {
	var out []metricWord
	col, start, startCol := 0, -1, 0
	for i, r := range q {
		col++
		if unicode.IsSpace(r) {
			if start >= 0 {
				out = append(out, metricWord{text: q[start:i], col: startCol, end: i})
				start = -1
			}
			continue
		}
		if start < 0 {
			start, startCol = i, col
		}
	}
	if start >= 0 {
		out = append(out, metricWord{text: q[start:], col: startCol, end: len(q)})
	}
	return out
}

// Matches tells whether a device counts: deviceID and tags as the device
// has them, report the device's last reported document as decoded JSON
// (nil: none), which holds its modules' reported properties
// ("moduleTwins") and its hub's state ("hub").
func (m *Metric) Matches(deviceID string, tags map[string]any, report map[string]any) bool {
	return m.MatchesDevice(MetricDevice{ID: deviceID, Tags: tags, Report: report})
}

// MetricDevice is what a metric query sees of a device.
type MetricDevice struct {
	ID   string
	Tags map[string]any
	// Report is its reported document, decoded (DecodeReport); nil: none.
	Report map[string]any
	// Configurations is its twin's configurations section: deployment id
	// → status (Targeted or Applied), for configurations.[[id]].status.
	Configurations map[string]string
	// DesiredVersion is $edgeAgent's properties.desired.$version: the
	// version of the document it is assigned (0: none, left undefined).
	DesiredVersion uint64
}

// MatchesDevice tells whether a device counts (see Matches): a
// device-level query reads deviceId, tags, configurations and the
// device's reported properties; a module-level one each module twin's
// deviceId, moduleId, configurations, reported properties and, for
// $edgeAgent, properties.desired.$version.
func (m *Metric) MatchesDevice(d MetricDevice) bool {
	if m.cond == nil && !m.modules {
		return true
	}
	confs := map[string]any{}
	for id, st := range d.Configurations {
		confs[id] = map[string]any{"status": st}
	}
	if !m.modules {
		doc := DeviceDocument(d.ID, d.Tags)
		doc["properties"] = map[string]any{"reported": d.Report}
		doc[rootConfigurations] = confs
		return m.cond.EvalDocument(doc)
	}
	for name, reported := range moduleTwins(d.Report) {
		if m.cond == nil {
			return true
		}
		props := map[string]any{"reported": reported}
		if name == "$edgeAgent" && d.DesiredVersion > 0 {
			props["desired"] = map[string]any{"$version": float64(d.DesiredVersion)}
		}
		doc := map[string]any{rootDeviceID: d.ID, rootModuleID: name, rootTags: map[string]any{},
			"properties": props, rootConfigurations: confs}
		if m.cond.EvalDocument(doc) {
			return true
		}
	}
	return false
}

// moduleTwins are a device's module twins' reported properties: its
// modules' (the report's moduleTwins), $edgeAgent's (the report itself)
// and $edgeHub's (the report's hub).
func moduleTwins(report map[string]any) map[string]any {
	if report == nil {
		return nil
	}
	out := map[string]any{"$edgeAgent": report}
	if hub, ok := report["hub"]; ok {
		out["$edgeHub"] = hub
	}
	if twins, ok := report["moduleTwins"].(map[string]any); ok {
		for name, t := range twins {
			out[name] = t
		}
	}
	return out
}

// DecodeReport decodes a reported document for Matches (numbers as
// float64, as conditions compare them); nil if it is not a JSON object.
func DecodeReport(doc []byte) map[string]any {
	var m map[string]any
	if json.Unmarshal(doc, &m) != nil {
		return nil
	}
	return m
}
