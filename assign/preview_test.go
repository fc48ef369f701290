package assign

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"pgregory.net/rapid"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// previewModel is the brute force: every device against every deployment
// through the compiled conditions, the base being the first deployment by
// precedence that is not layered.
type previewModel struct {
	devices map[string]map[string]any
	deps    map[string]evaluator.Deployment
}

func (m *previewModel) targeting(dev string, deps map[string]evaluator.Deployment) []evaluator.Deployment {
	var out []evaluator.Deployment
	for _, d := range deps {
		if evaluator.MustCompile(d.Condition).Eval(dev, m.devices[dev]) {
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b evaluator.Deployment) int {
		switch {
		case a.Priority != b.Priority:
			return int(b.Priority - a.Priority)
		case a.CreatedUnixNano != b.CreatedUnixNano:
			if a.CreatedUnixNano > b.CreatedUnixNano {
				return -1
			}
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

func (m *previewModel) base(dev string, deps map[string]evaluator.Deployment) string {
	for _, d := range m.targeting(dev, deps) {
		if !d.Layered {
			return d.ID
		}
	}
	return ""
}

func (m *previewModel) hasLayer(dev, id string, deps map[string]evaluator.Deployment) bool {
	d, ok := deps[id]
	return ok && d.Layered && evaluator.MustCompile(d.Condition).Eval(dev, m.devices[dev])
}

// expect is what a write that replaces the deployments before with after
// must preview, for the deployment id it writes.
func (m *previewModel) expect(id string, before, after map[string]evaluator.Deployment) []PreviewDevice {
	var out []PreviewDevice
	layered := before[id].Layered || after[id].Layered
	for _, dev := range slices.Sorted(maps.Keys(m.devices)) {
		b0, b1 := m.base(dev, before), m.base(dev, after)
		if layered {
			in0, in1 := m.hasLayer(dev, id, before), m.hasLayer(dev, id, after)
			switch {
			case in1 && !in0 && b1 != "":
				out = append(out, PreviewDevice{ID: dev, Category: PreviewStart, From: b1, To: b1})
			case in1 && !in0:
				out = append(out, PreviewDevice{ID: dev, Category: PreviewNoBase})
			case in0 && !in1 && b0 != "":
				out = append(out, PreviewDevice{ID: dev, Category: PreviewLeave, From: b0, To: b0})
			}
			continue
		}
		switch {
		case b0 == b1:
		case b1 == id && b0 == "":
			out = append(out, PreviewDevice{ID: dev, Category: PreviewStart, To: id})
		case b1 == id:
			out = append(out, PreviewDevice{ID: dev, Category: PreviewSwitch, From: b0, To: id})
		case b0 == id && b1 == "":
			out = append(out, PreviewDevice{ID: dev, Category: PreviewKeep, From: id})
		case b0 == id:
			out = append(out, PreviewDevice{ID: dev, Category: PreviewLeave, From: id, To: b1})
		}
	}
	return out
}

// TestPreview_Property checks dry runs of creates, updates and deletes
// (bases and layers) against the brute force over a generated fleet.
func TestPreview_Property(t *testing.T) {
	sites := []any{"a", "b", "c", 1.0, nil}
	conds := []string{"*", "", "tags.site = 'a'", "tags.site IN ['a', 'b']", "NOT tags.site = 'c'", "tags.line > 1",
		"STARTSWITH(deviceId, 'd1')", "tags.site = 'b' OR tags.line = 2", "IS_STRING(tags.site)", "deviceId = 'd3'"}
	rapid.Check(t, func(t *rapid.T) {
		a := New(Config{View: func(func(*raftstore.Reader) error) error { return nil }})
		m := &previewModel{devices: map[string]map[string]any{}, deps: map[string]evaluator.Deployment{}}
		index := uint64(0)
		apply := func(c raftstore.Change) {
			index++
			c.Index = index
			a.Apply([]raftstore.Change{c})
		}
		for i := range rapid.IntRange(1, 25).Draw(t, "devices") {
			id := fmt.Sprintf("d%d", i)
			tags := map[string]any{}
			if s := rapid.SampledFrom(sites).Draw(t, "site"); s != nil {
				tags["site"] = s
			}
			tags["line"] = float64(rapid.IntRange(0, 3).Draw(t, "line"))
			m.devices[id] = tags
			apply(raftstore.Change{Kind: raftstore.DevicePut, ID: id, Device: &fleet.Device{ID: id, Tags: tags}})
		}
		depIDs := []string{"p0", "p1", "p2", "p3", "p4", "p5"}
		genDep := func(id string, layered bool) evaluator.Deployment {
			return evaluator.Deployment{ID: id, Condition: rapid.SampledFrom(conds).Draw(t, "cond"),
				Priority: int64(rapid.IntRange(0, 3).Draw(t, "prio")), CreatedUnixNano: int64(rapid.IntRange(1, 3).Draw(t, "created")), Layered: layered}
		}
		put := func(d evaluator.Deployment) {
			m.deps[d.ID] = d
			apply(raftstore.Change{Kind: raftstore.DeploymentPut, ID: d.ID, Deployment: &fleet.Deployment{ID: d.ID, TargetCondition: d.Condition,
				Priority: d.Priority, CreatedTimeUTC: time.Unix(0, d.CreatedUnixNano), Layered: d.Layered}})
		}
		for range rapid.IntRange(0, 5).Draw(t, "deployments") {
			id := rapid.SampledFrom(depIDs).Draw(t, "dep")
			layered := rapid.IntRange(0, 2).Draw(t, "layered") == 0
			if d, ok := m.deps[id]; ok {
				layered = d.Layered // content, so the layered flag, is immutable
			}
			put(genDep(id, layered))
		}
		before := maps.Clone(m.deps)
		id := rapid.SampledFrom(depIDs).Draw(t, "target")
		var got []PreviewDevice
		after := maps.Clone(m.deps)
		if _, exists := m.deps[id]; exists && rapid.Bool().Draw(t, "delete") {
			delete(after, id)
			got = a.PreviewDelete(id)
		} else {
			layered := rapid.IntRange(0, 2).Draw(t, "layered") == 0
			if d, ok := m.deps[id]; ok {
				layered = d.Layered
			}
			d := genDep(id, layered)
			after[id] = d
			var err error
			if got, err = a.PreviewPut(d); err != nil {
				t.Fatal(err)
			}
		}
		want := m.expect(id, before, after)
		if !slices.Equal(got, want) {
			t.Fatalf("preview of %s:\n got %v\nwant %v", id, got, want)
		}
	})
}
