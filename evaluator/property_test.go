package evaluator

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// The generators draw from small pools so that random conditions and random
// devices meet often: a handful of tag keys (one nested), values of every
// JSON type, and literals that equal some of them.

var (
	genTagKeys   = []string{"env", "loc", "n", "flag", "obj"}
	genObjKeys   = []string{"a", "b"}
	genStrings   = []any{"a", "b", "x'y", "", "prod"}
	genNumbers   = []any{1.0, 2.0, 2.5, -1.0, 0.0, 2, json.Number("2.5"), int64(3)}
	genPaths     = []string{"tags.env", "tags.loc", "tags.n", "tags.flag", "tags.obj", "tags.obj.a", "tags.obj.b", "tags.none", "deviceId"}
	genStrLits   = []string{"'a'", "'b'", "'x''y'", "''", "'prod'", "'d1'", "'d3'"}
	genNumLits   = []string{"1", "2", "2.0", "2.5", "-1", "0", "0x2", "3", "25e-1"}
	genOtherLits = []string{"true", "FALSE", "True", "null", "NULL"}
	genAffixes   = []string{"''", "'a'", "'d'", "'d1'", "'pr'", "'od'", "'P'", "'x'''", "'y'", "'1'"}
	genDeviceIDs = []string{"d0", "d1", "d2", "d3", "d4", "d5"}
	genDepIDs    = []string{"p0", "p1", "p2", "p3"}
)

func genValue(t *rapid.T, depth int) any {
	switch rapid.IntRange(0, 6).Draw(t, "vkind") {
	case 0, 1:
		return rapid.SampledFrom(genStrings).Draw(t, "str")
	case 2, 3:
		return rapid.SampledFrom(genNumbers).Draw(t, "num")
	case 4:
		return rapid.Bool().Draw(t, "bool")
	case 5:
		if depth < 2 {
			m := map[string]any{}
			for _, k := range genObjKeys {
				if rapid.Bool().Draw(t, "has") {
					m[k] = genValue(t, depth+1)
				}
			}
			return m
		}
		return []any{1.0}
	}
	return nil
}

func genTags(t *rapid.T) map[string]any {
	if rapid.IntRange(0, 9).Draw(t, "niltags") == 0 {
		return nil
	}
	m := map[string]any{}
	for _, k := range genTagKeys {
		if rapid.IntRange(0, 2).Draw(t, "has") > 0 {
			m[k] = genValue(t, 0)
		}
	}
	return m
}

func word(t *rapid.T, w string) string {
	switch rapid.IntRange(0, 2).Draw(t, "case") {
	case 0:
		return strings.ToLower(w)
	case 1:
		return strings.ToUpper(w[:1]) + strings.ToLower(w[1:])
	}
	return w
}

func sp(t *rapid.T) string { return rapid.SampledFrom([]string{" ", "", "  "}).Draw(t, "sp") }

func genLiteral(t *rapid.T, ordered, deviceID bool) string {
	if deviceID {
		return rapid.SampledFrom(genStrLits).Draw(t, "lit")
	}
	if ordered || rapid.Bool().Draw(t, "scalar") {
		if rapid.Bool().Draw(t, "isnum") {
			return rapid.SampledFrom(genNumLits).Draw(t, "lit")
		}
		return rapid.SampledFrom(genStrLits).Draw(t, "lit")
	}
	return rapid.SampledFrom(genOtherLits).Draw(t, "lit")
}

// genCondition draws the text of a valid target condition.
func genCondition(t *rapid.T) string {
	switch rapid.IntRange(0, 19).Draw(t, "top") {
	case 0:
		return ""
	case 1:
		return "*"
	}
	return genExpr(t, 0)
}

func genExpr(t *rapid.T, depth int) string {
	top := 7
	if depth >= 3 {
		top = 2
	}
	switch rapid.IntRange(0, top).Draw(t, "expr") {
	case 0:
		p := rapid.SampledFrom(genPaths).Draw(t, "path")
		op := rapid.SampledFrom([]string{"=", "!=", "<>", "<", "<=", ">", ">="}).Draw(t, "op")
		ordered := op != "=" && op != "!=" && op != "<>"
		return p + sp(t) + op + sp(t) + genLiteral(t, ordered, p == "deviceId")
	case 1:
		p := rapid.SampledFrom(genPaths).Draw(t, "path")
		n := rapid.IntRange(0, 3).Draw(t, "n")
		var lits []string
		for range n {
			lits = append(lits, genLiteral(t, false, p == "deviceId"))
		}
		return p + " " + word(t, rapid.SampledFrom([]string{"IN", "NIN"}).Draw(t, "in")) + sp(t) + "[" + strings.Join(lits, ","+sp(t)) + "]"
	case 2:
		fn := rapid.SampledFrom([]string{"IS_DEFINED", "IS_STRING", "IS_NUMBER", "IS_BOOL", "IS_NULL", "IS_OBJECT", "STARTSWITH", "ENDSWITH"}).Draw(t, "fn")
		arg := rapid.SampledFrom(genPaths).Draw(t, "path")
		if fn == "STARTSWITH" || fn == "ENDSWITH" {
			arg += "," + sp(t) + rapid.SampledFrom(genAffixes).Draw(t, "affix")
		}
		return word(t, fn) + "(" + arg + ")"
	case 3:
		return word(t, "NOT") + " " + genExpr(t, depth+1)
	case 4:
		return genExpr(t, depth+1) + " " + word(t, "AND") + " " + genExpr(t, depth+1)
	case 5:
		return genExpr(t, depth+1) + " " + word(t, "OR") + " " + genExpr(t, depth+1)
	case 6:
		return "(" + sp(t) + genExpr(t, depth+1) + sp(t) + ")"
	}
	return genExpr(t, depth+1) + " " + word(t, "NOT") + " " + genExpr(t, depth+1)
}

// model is the brute-force reference: every device against every deployment
// through the CEL program.
type model struct {
	t       *rapid.T
	devices map[string]map[string]any
	deps    map[string]Deployment
	conds   map[string]*Condition
	// admitted holds, per gated deployment, the devices it admits.
	admitted map[string]map[string]bool
}

// admits: a deployment that is not gated admits every device.
func (m *model) admits(depID, devID string) bool {
	return !m.deps[depID].Gated || m.admitted[depID][devID]
}

func (m *model) matches(depID, devID string) bool {
	ok, err := m.conds[depID].EvalCEL(DeviceDocument(devID, m.devices[devID]))
	if err != nil {
		m.t.Fatalf("CEL: %v", err)
	}
	return ok
}

func (m *model) targeting(devID string) []string {
	var out []string
	for id := range m.deps {
		if m.matches(id, devID) {
			out = append(out, id)
		}
	}
	slices.SortFunc(out, func(a, b string) int {
		da, db := m.deps[a], m.deps[b]
		return precedes(&da, &db)
	})
	return out
}

func (m *model) applied(devID string) string {
	for _, dep := range m.targeting(devID) {
		if !m.deps[dep].Layered && m.admits(dep, devID) {
			return dep
		}
	}
	return ""
}

// layers are the layered deployments targeting a device, by precedence.
func (m *model) layers(devID string) []string {
	var out []string
	for _, id := range m.targeting(devID) {
		if m.deps[id].Layered {
			out = append(out, id)
		}
	}
	return out
}

// layersAll is, per device, its layers and each one's deployment.
func (m *model) layersAll() map[string]map[string]Deployment {
	out := map[string]map[string]Deployment{}
	for id := range m.devices {
		ls := map[string]Deployment{}
		for _, l := range m.layers(id) {
			ls[l] = m.deps[l]
		}
		out[id] = ls
	}
	return out
}

func (m *model) appliedAll() map[string]string {
	out := map[string]string{}
	for id := range m.devices {
		out[id] = m.applied(id)
	}
	return out
}

// expectLayerChanges is what an engine must report about layers for a
// step that moved the model from before to after: every layer that
// started or stopped targeting a device that still exists, and for the
// layer whose precedence changed, the devices it goes on targeting.
func expectLayerChanges(before, after map[string]map[string]Deployment, base map[string]string, put string) []Change {
	var out []Change
	for dev, now := range after {
		was := before[dev]
		for id, d := range now {
			w, ok := was[id]
			switch {
			case !ok:
				out = append(out, Change{DeviceID: dev, From: base[dev], To: base[dev], Layer: id, LayerOp: LayerAdded})
			case id == put && (w.Priority != d.Priority || w.CreatedUnixNano != d.CreatedUnixNano):
				out = append(out, Change{DeviceID: dev, From: base[dev], To: base[dev], Layer: id, LayerOp: LayerMoved})
			}
		}
		for id := range was {
			if _, ok := now[id]; !ok {
				out = append(out, Change{DeviceID: dev, From: base[dev], To: base[dev], Layer: id, LayerOp: LayerRemoved})
			}
		}
	}
	return out
}

// expectChanges is what an engine must report for a step that moved the
// model from before to after.
func expectChanges(before, after map[string]string) []Change {
	var out []Change
	for _, id := range slices.Sorted(maps.Keys(before)) {
		if a := after[id]; a != before[id] {
			out = append(out, Change{DeviceID: id, From: before[id], To: a})
		}
	}
	for _, id := range slices.Sorted(maps.Keys(after)) {
		if _, ok := before[id]; !ok && after[id] != "" {
			out = append(out, Change{DeviceID: id, To: after[id]})
		}
	}
	slices.SortFunc(out, func(a, b Change) int { return strings.Compare(a.DeviceID, b.DeviceID) })
	return out
}

// testEngines are the engine as shipped, one that never answers from the
// index (every condition through the per-device evaluator), and one whose
// size thresholds force the large-set algorithms on a few devices.
func testEngines() map[string]*Engine {
	scan := &Engine{state: state{scanOnly: true}}
	scan.init()
	large := &Engine{state: state{tune: tuning{smallResolve: -1, smallSort: -1, compactMin: -1}}}
	large.init()
	return map[string]*Engine{"index": NewEngine(), "scan": scan, "large": large}
}

func TestEngine_Property_MatchesBruteForceCEL(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		m := &model{t: t, devices: map[string]map[string]any{}, deps: map[string]Deployment{}, conds: map[string]*Condition{}, admitted: map[string]map[string]bool{}}
		engines := testEngines()
		names := slices.Sorted(maps.Keys(engines))
		steps := rapid.IntRange(1, 40).Draw(t, "steps")
		for range steps {
			before := m.appliedAll()
			beforeLayers := m.layersAll()
			put := ""
			var got map[string][]Change
			switch rapid.IntRange(0, 11).Draw(t, "action") {
			case 0, 1, 2, 3:
				id := rapid.SampledFrom(genDeviceIDs).Draw(t, "device")
				tags := genTags(t)
				m.devices[id] = tags
				got = each(engines, func(e *Engine) []Change { return e.PutDevice(id, tags) })
			case 4:
				id := rapid.SampledFrom(genDeviceIDs).Draw(t, "device")
				delete(m.devices, id)
				for _, set := range m.admitted {
					delete(set, id) // a device created again is not admitted
				}
				got = each(engines, func(e *Engine) []Change { return e.DeleteDevice(id) })
			case 5, 6, 7, 8:
				d := Deployment{
					ID:              rapid.SampledFrom(genDepIDs).Draw(t, "dep"),
					Condition:       genCondition(t),
					Priority:        int64(rapid.IntRange(0, 2).Draw(t, "prio")),
					CreatedUnixNano: int64(rapid.IntRange(0, 2).Draw(t, "created")),
					Gated:           rapid.IntRange(0, 2).Draw(t, "gated") == 0,
					Layered:         rapid.IntRange(0, 2).Draw(t, "layered") == 0,
				}
				if d.Layered {
					d.Gated = false // as the engine takes it: a layer is never gated
				}
				put = d.ID
				c, err := Compile(d.Condition)
				if err != nil {
					t.Fatalf("generated condition %q does not compile: %v", d.Condition, err)
				}
				if old, ok := m.deps[d.ID]; !ok || !old.Gated || !d.Gated {
					m.admitted[d.ID] = map[string]bool{}
				}
				m.deps[d.ID], m.conds[d.ID] = d, c
				got = each(engines, func(e *Engine) []Change {
					ch, err := e.PutDeployment(d)
					if err != nil {
						t.Fatalf("PutDeployment(%q): %v", d.Condition, err)
					}
					return ch
				})
			case 9:
				id := rapid.SampledFrom(genDepIDs).Draw(t, "dep")
				delete(m.deps, id)
				delete(m.conds, id)
				delete(m.admitted, id)
				got = each(engines, func(e *Engine) []Change { return e.DeleteDeployment(id) })
			case 10, 11:
				// Admit some devices to a deployment, or replace what it
				// admits; nothing happens unless it exists and is gated.
				id := rapid.SampledFrom(genDepIDs).Draw(t, "dep")
				devs := rapid.SliceOfDistinct(rapid.SampledFrom(genDeviceIDs), func(s string) string { return s }).Draw(t, "admit")
				replace := rapid.Bool().Draw(t, "replace")
				if d, ok := m.deps[id]; ok && d.Gated {
					if replace {
						m.admitted[id] = map[string]bool{}
					}
					for _, dev := range devs {
						if _, exists := m.devices[dev]; exists {
							m.admitted[id][dev] = true
						}
					}
				}
				got = each(engines, func(e *Engine) []Change {
					if replace {
						return e.SetAdmitted(id, devs)
					}
					return e.Admit(id, devs)
				})
			}
			if got != nil {
				after := m.appliedAll()
				afterLayers := m.layersAll()
				want := append(expectChanges(before, after), expectLayerChanges(beforeLayers, afterLayers, after, put)...)
				slices.SortStableFunc(want, compareChanges)
				for _, n := range names {
					if !slices.Equal(got[n], want) {
						t.Fatalf("%s: changes %v, want %v", n, got[n], want)
					}
				}
			}
			for _, n := range names {
				checkEngine(t, n, engines[n], m)
			}
			// A one-off query and a dry run over the same state.
			q := genCondition(t)
			qc, err := Compile(q)
			if err != nil {
				t.Fatalf("generated condition %q does not compile: %v", q, err)
			}
			dry := Deployment{ID: rapid.SampledFrom(genDepIDs).Draw(t, "dep"), Condition: q,
				Priority: int64(rapid.IntRange(0, 2).Draw(t, "prio")), CreatedUnixNano: int64(rapid.IntRange(0, 2).Draw(t, "created")),
				Layered: rapid.IntRange(0, 2).Draw(t, "layered") == 0}
			var wantMatch []string
			wantApply := 0
			for _, dev := range slices.Sorted(maps.Keys(m.devices)) {
				ok, err := qc.EvalCEL(DeviceDocument(dev, m.devices[dev]))
				if err != nil {
					t.Fatal(err)
				}
				if ok != qc.Eval(dev, m.devices[dev]) {
					t.Fatalf("Eval and CEL disagree on %q for %s %v", q, dev, m.devices[dev])
				}
				if !ok {
					continue
				}
				wantMatch = append(wantMatch, dev)
				beaten := false
				for _, other := range m.targeting(dev) {
					if od := m.deps[other]; other != dry.ID && !od.Layered && precedes(&od, &dry) < 0 && m.admits(other, dev) {
						beaten = true
					}
				}
				if dry.Layered {
					beaten = m.applied(dev) == "" // a layer applies on a base
				}
				if !beaten {
					wantApply++
				}
			}
			for _, n := range names {
				got, err := engines[n].Match(qc)
				if err != nil || !slices.Equal(got, wantMatch) {
					t.Fatalf("%s: Match(%q) = %v, %v; want %v", n, q, got, err, wantMatch)
				}
				tg, wa, err := engines[n].DryRun(dry)
				if err != nil || tg != len(wantMatch) || wa != wantApply {
					t.Fatalf("%s: DryRun(%q) = %d, %d, %v; want %d, %d", n, q, tg, wa, err, len(wantMatch), wantApply)
				}
			}
		}
	})
}

func each(engines map[string]*Engine, f func(*Engine) []Change) map[string][]Change {
	out := map[string][]Change{}
	for n, e := range engines {
		out[n] = f(e)
	}
	return out
}

func checkEngine(t *rapid.T, name string, e *Engine, m *model) {
	for _, dev := range genDeviceIDs {
		_, exists := m.devices[dev]
		var wantT []string
		want := ""
		if exists {
			wantT = m.targeting(dev)
			want = m.applied(dev)
		}
		if got := e.Applied(dev); got != want {
			t.Fatalf("%s: Applied(%s) = %q, want %q (tags %v)", name, dev, got, want, m.devices[dev])
		}
		if got := e.Targeting(dev); !slices.Equal(got, wantT) {
			t.Fatalf("%s: Targeting(%s) = %v, want %v (tags %v)", name, dev, got, wantT, m.devices[dev])
		}
		var wantL []string
		if exists {
			wantL = m.layers(dev)
		}
		if got := e.Layers(dev); !slices.Equal(got, wantL) {
			t.Fatalf("%s: Layers(%s) = %v, want %v", name, dev, got, wantL)
		}
	}
	for _, dep := range genDepIDs {
		var wantT, wantA []string
		if _, ok := m.deps[dep]; ok {
			for _, dev := range slices.Sorted(maps.Keys(m.devices)) {
				if m.matches(dep, dev) {
					wantT = append(wantT, dev)
					if a := m.applied(dev); a == dep || m.deps[dep].Layered && a != "" {
						wantA = append(wantA, dev)
					}
				}
			}
		}
		if got := e.TargetedDevices(dep); !slices.Equal(got, wantT) {
			t.Fatalf("%s: TargetedDevices(%s) = %v, want %v (condition %q)", name, dep, got, wantT, m.deps[dep].Condition)
		}
		if got := e.AppliedDevices(dep); !slices.Equal(got, wantA) {
			t.Fatalf("%s: AppliedDevices(%s) = %v, want %v", name, dep, got, wantA)
		}
		if tg, ap := e.Counts(dep); tg != len(wantT) || ap != len(wantA) {
			t.Fatalf("%s: Counts(%s) = %d, %d; want %d, %d", name, dep, tg, ap, len(wantT), len(wantA))
		}
		// WouldApply: targeted, and no admitting deployment precedes it.
		var wantW []string
		if d, ok := m.deps[dep]; ok {
			for _, dev := range wantT {
				beaten := false
				for _, other := range m.targeting(dev) {
					if od := m.deps[other]; other != dep && !od.Layered && precedes(&od, &d) < 0 && m.admits(other, dev) {
						beaten = true
					}
				}
				if d.Layered {
					beaten = m.applied(dev) == "" // a layer applies where a base does
				}
				if !beaten {
					wantW = append(wantW, dev)
				}
			}
		}
		if got := e.WouldApply(dep); !slices.Equal(got, wantW) {
			t.Fatalf("%s: WouldApply(%s) = %v, want %v", name, dep, got, wantW)
		}
	}
	if s := e.Stats(); s.Devices != len(m.devices) || s.Deployments != len(m.deps) {
		t.Fatalf("%s: Stats = %+v, want %d devices, %d deployments", name, s, len(m.devices), len(m.deps))
	}
}

// Every dictionary entry is released once nothing refers to it.
func TestEngine_Property_DictionaryDrainsToEmpty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		e := NewEngine()
		for range rapid.IntRange(1, 30).Draw(t, "steps") {
			if rapid.Bool().Draw(t, "dev") {
				e.PutDevice(rapid.SampledFrom(genDeviceIDs).Draw(t, "device"), genTags(t))
			} else {
				d := Deployment{ID: rapid.SampledFrom(genDepIDs).Draw(t, "dep"), Condition: genCondition(t)}
				if _, err := e.PutDeployment(d); err != nil {
					t.Fatal(err)
				}
			}
		}
		for _, id := range genDeviceIDs {
			e.DeleteDevice(id)
		}
		for _, id := range genDepIDs {
			e.DeleteDeployment(id)
		}
		if s := e.Stats(); s != (Stats{}) {
			t.Fatalf("after deleting everything: %+v", s)
		}
		if len(e.unanchored) != 0 || len(e.idDeps) != 0 || len(e.d.termDeps) != 0 {
			t.Fatalf("deployment anchors left: %v %v", e.unanchored, e.idDeps)
		}
	})
}
