package evaluator

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
)

func mustPut(t *testing.T, e *Engine, d Deployment) []Change {
	t.Helper()
	ch, err := e.PutDeployment(d)
	if err != nil {
		t.Fatalf("PutDeployment(%+v): %v", d, err)
	}
	return ch
}

func TestEngine_Precedence(t *testing.T) {
	e := NewEngine()
	e.PutDevice("d1", map[string]any{"env": "prod"})
	tests := []struct {
		name string
		put  Deployment
		want string
	}{
		{"first", Deployment{ID: "b", Condition: "tags.env = 'prod'", Priority: 1, CreatedUnixNano: 10}, "b"},
		{"lower priority loses", Deployment{ID: "a", Condition: "tags.env = 'prod'", Priority: 0, CreatedUnixNano: 20}, "b"},
		{"higher priority wins", Deployment{ID: "c", Condition: "*", Priority: 2, CreatedUnixNano: 5}, "c"},
		{"same priority, more recent wins", Deployment{ID: "d", Condition: "deviceId = 'd1'", Priority: 2, CreatedUnixNano: 6}, "d"},
		{"same priority and time, smaller id wins", Deployment{ID: "0", Condition: "tags.env != 'x'", Priority: 2, CreatedUnixNano: 6}, "0"},
		{"same priority and time, larger id loses", Deployment{ID: "z", Condition: "*", Priority: 2, CreatedUnixNano: 6}, "0"},
	}
	for _, tt := range tests {
		mustPut(t, e, tt.put)
		if got := e.Applied("d1"); got != tt.want {
			t.Errorf("%s: Applied = %q, want %q", tt.name, got, tt.want)
		}
	}
	if got, want := e.Targeting("d1"), []string{"0", "d", "z", "c", "b", "a"}; !slices.Equal(got, want) {
		t.Errorf("Targeting = %v, want %v", got, want)
	}
}

func TestEngine_Changes(t *testing.T) {
	e := NewEngine()
	for i := range 5 {
		e.PutDevice(fmt.Sprintf("dev%d", 4-i), map[string]any{"n": float64(4 - i)})
	}
	ch := mustPut(t, e, Deployment{ID: "low", Condition: "tags.n >= 1", Priority: 1})
	want := []Change{{DeviceID: "dev1", From: "", To: "low"}, {DeviceID: "dev2", From: "", To: "low"}, {DeviceID: "dev3", From: "", To: "low"}, {DeviceID: "dev4", From: "", To: "low"}}
	if !slices.Equal(ch, want) {
		t.Fatalf("create low = %v, want %v", ch, want)
	}
	ch = mustPut(t, e, Deployment{ID: "high", Condition: "tags.n IN [0, 2]", Priority: 5})
	want = []Change{{DeviceID: "dev0", From: "", To: "high"}, {DeviceID: "dev2", From: "low", To: "high"}}
	if !slices.Equal(ch, want) {
		t.Fatalf("create high = %v, want %v", ch, want)
	}
	// Lowering its priority hands dev2 back; dev0 keeps it.
	ch = mustPut(t, e, Deployment{ID: "high", Condition: "tags.n IN [0, 2]", Priority: 0})
	if want := []Change{{DeviceID: "dev2", From: "high", To: "low"}}; !slices.Equal(ch, want) {
		t.Fatalf("lower priority = %v, want %v", ch, want)
	}
	// Putting it unchanged (e.g. a manifest update) changes nothing.
	if ch := mustPut(t, e, Deployment{ID: "high", Condition: "tags.n IN [0, 2]", Priority: 0}); ch != nil {
		t.Fatalf("unchanged put = %v", ch)
	}
	// Changing the condition only.
	ch = mustPut(t, e, Deployment{ID: "low", Condition: "tags.n >= 3", Priority: 1})
	if want := []Change{{DeviceID: "dev1", From: "low", To: ""}, {DeviceID: "dev2", From: "low", To: "high"}}; !slices.Equal(ch, want) {
		t.Fatalf("narrow low = %v, want %v", ch, want)
	}
	// A device change.
	if ch := e.PutDevice("dev3", map[string]any{"n": 0.0}); !slices.Equal(ch, []Change{{DeviceID: "dev3", From: "low", To: "high"}}) {
		t.Fatalf("PutDevice = %v", ch)
	}
	if ch := e.PutDevice("dev3", map[string]any{"n": 0.0}); ch != nil {
		t.Fatalf("unchanged PutDevice = %v", ch)
	}
	if ch := e.DeleteDevice("dev3"); !slices.Equal(ch, []Change{{DeviceID: "dev3", From: "high", To: ""}}) {
		t.Fatalf("DeleteDevice = %v", ch)
	}
	if ch := e.DeleteDevice("dev3"); ch != nil {
		t.Fatalf("second DeleteDevice = %v", ch)
	}
	// Deleting a deployment falls back to the next one.
	if ch := e.DeleteDeployment("high"); !slices.Equal(ch, []Change{{DeviceID: "dev0", From: "high", To: ""}, {DeviceID: "dev2", From: "high", To: ""}}) {
		t.Fatalf("DeleteDeployment = %v", ch)
	}
	if ch := e.DeleteDeployment("high"); ch != nil {
		t.Fatalf("second DeleteDeployment = %v", ch)
	}
	if got := e.AppliedDevices("low"); !slices.Equal(got, []string{"dev4"}) {
		t.Errorf("AppliedDevices = %v", got)
	}
	if got := e.TargetedDevices("nope"); got != nil {
		t.Errorf("TargetedDevices(unknown) = %v", got)
	}
}

func TestEngine_PutDeployment_BadConditionChangesNothing(t *testing.T) {
	e := NewEngine()
	e.PutDevice("d1", map[string]any{"env": "prod"})
	mustPut(t, e, Deployment{ID: "a", Condition: "tags.env = 'prod'"})
	_, err := e.PutDeployment(Deployment{ID: "a", Condition: "tags.env = "})
	var se *SyntaxError
	if !errors.As(err, &se) || se.Column != 12 {
		t.Fatalf("err = %v, want a SyntaxError at column 12", err)
	}
	if got := e.Applied("d1"); got != "a" {
		t.Errorf("Applied = %q after a refused update", got)
	}
	if _, err := e.PutDeployment(Deployment{Condition: "*"}); !errors.Is(err, ErrNoDeploymentID) {
		t.Errorf("empty id: %v", err)
	}
	if _, _, err := e.DryRun(Deployment{ID: "b", Condition: "properties.x = 1"}); !errors.Is(err, ErrInvalidCondition) {
		t.Errorf("DryRun bad condition: %v", err)
	}
	if ch := e.PutDevice("", map[string]any{"env": "prod"}); ch != nil || e.Stats().Devices != 1 {
		t.Errorf("empty device id was stored")
	}
}

func TestEngine_EmptyAndStar(t *testing.T) {
	e := NewEngine()
	e.PutDevice("d1", nil)
	mustPut(t, e, Deployment{ID: "none", Condition: "  ", Priority: 9})
	mustPut(t, e, Deployment{ID: "all", Condition: "*"})
	e.PutDevice("d2", map[string]any{"x": 1.0})
	if got := e.TargetedDevices("all"); !slices.Equal(got, []string{"d1", "d2"}) {
		t.Errorf("* targets %v", got)
	}
	if got := e.TargetedDevices("none"); len(got) != 0 {
		t.Errorf("empty condition targets %v", got)
	}
	if got := e.Applied("d2"); got != "all" {
		t.Errorf("Applied = %q", got)
	}
}

func TestEngine_DryRun(t *testing.T) {
	e := NewEngine()
	for i := range 10 {
		e.PutDevice(fmt.Sprintf("d%d", i), map[string]any{"n": float64(i)})
	}
	mustPut(t, e, Deployment{ID: "a", Condition: "tags.n < 5", Priority: 5})
	tests := []struct {
		d                 Deployment
		targeted, applies int
	}{
		{Deployment{ID: "b", Condition: "tags.n >= 3", Priority: 1}, 7, 5},
		{Deployment{ID: "b", Condition: "tags.n >= 3", Priority: 9}, 7, 7},
		{Deployment{ID: "b", Condition: "tags.n >= 3", Priority: 5, CreatedUnixNano: 1}, 7, 7},
		{Deployment{ID: "b", Condition: "tags.n >= 3", Priority: 5}, 7, 5}, // same time: "a" < "b"
		{Deployment{ID: "a", Condition: "tags.n >= 3", Priority: 0}, 7, 7}, // replacing itself
		{Deployment{ID: "b", Condition: "tags.zz = 1"}, 0, 0},
	}
	for _, tt := range tests {
		tg, ap, err := e.DryRun(tt.d)
		if err != nil || tg != tt.targeted || ap != tt.applies {
			t.Errorf("DryRun(%+v) = %d, %d, %v; want %d, %d", tt.d, tg, ap, err, tt.targeted, tt.applies)
		}
		// The devices: the targeted ones are exactly the condition's
		// matches, and the ones it would apply to are those of them that
		// no preceding deployment ("a", on n < 5) holds.
		tgIDs, apIDs, err := e.DryRunDevices(tt.d)
		if err != nil || len(tgIDs) != tt.targeted || len(apIDs) != tt.applies {
			t.Errorf("DryRunDevices(%+v) = %v, %v, %v; want %d and %d ids", tt.d, tgIDs, apIDs, err, tt.targeted, tt.applies)
		}
		matched, _ := e.Match(MustCompile(tt.d.Condition))
		if !slices.Equal(tgIDs, matched) {
			t.Errorf("DryRunDevices(%+v) targets %v, the condition matches %v", tt.d, tgIDs, matched)
		}
		for _, id := range apIDs {
			if !slices.Contains(tgIDs, id) {
				t.Errorf("DryRunDevices(%+v) would apply to %s, which it does not target", tt.d, id)
			}
		}
	}
	if tg, ap := e.Counts("a"); tg != 5 || ap != 5 {
		t.Errorf("DryRun changed the engine: Counts = %d, %d", tg, ap)
	}
}

func TestEngine_Reset(t *testing.T) {
	e := NewEngine()
	e.PutDevice("d1", map[string]any{"x": "y"})
	mustPut(t, e, Deployment{ID: "a", Condition: "*"})
	e.Reset()
	if s := e.Stats(); s != (Stats{}) || e.Applied("d1") != "" {
		t.Errorf("after Reset: %+v", s)
	}
	e.PutDevice("d1", map[string]any{"x": "y"})
	mustPut(t, e, Deployment{ID: "a", Condition: "tags.x = 'y'"})
	if e.Applied("d1") != "a" {
		t.Error("engine unusable after Reset")
	}
}

// randomOps drives an engine with a reproducible mix of device and
// deployment writes over a larger fleet than the property test.
type op struct {
	kind string
	id   string
	tags map[string]any
	dep  Deployment
}

func randomOps(seed uint64, devices, n int) []op {
	r := rand.New(rand.NewPCG(seed, seed))
	envs := []any{"prod", "test", "dev", 3.0, nil}
	conds := []string{
		"tags.env = 'prod'", "tags.env IN ['test', 'dev']", "tags.rack > 5", "tags.rack <= 3 AND tags.env != 'prod'",
		"NOT tags.env = 'prod'", "IS_DEFINED(tags.site.floor)", "tags.site.floor = 2 OR deviceId IN ['dev-1', 'dev-7']",
		"deviceId > 'dev-5'", "*", "", "tags.env NIN ['prod'] AND tags.rack >= 2",
	}
	var ops []op
	for i := range devices {
		ops = append(ops, op{kind: "dev", id: fmt.Sprintf("dev-%d", i), tags: randomTags(r, envs)})
	}
	for range n {
		switch r.IntN(5) {
		case 0, 1:
			ops = append(ops, op{kind: "dev", id: fmt.Sprintf("dev-%d", r.IntN(devices+devices/10)), tags: randomTags(r, envs)})
		case 2:
			ops = append(ops, op{kind: "deldev", id: fmt.Sprintf("dev-%d", r.IntN(devices))})
		case 3:
			ops = append(ops, op{kind: "dep", dep: Deployment{ID: fmt.Sprintf("dep-%d", r.IntN(12)), Condition: conds[r.IntN(len(conds))],
				Priority: int64(r.IntN(3)), CreatedUnixNano: int64(r.IntN(3))}})
		case 4:
			ops = append(ops, op{kind: "deldep", id: fmt.Sprintf("dep-%d", r.IntN(12))})
		}
	}
	return ops
}

func randomTags(r *rand.Rand, envs []any) map[string]any {
	tags := map[string]any{"rack": float64(r.IntN(10))}
	if r.IntN(4) > 0 {
		tags["env"] = envs[r.IntN(len(envs))]
	}
	if r.IntN(3) == 0 {
		tags["site"] = map[string]any{"floor": float64(r.IntN(3))}
	}
	return tags
}

func apply(t *testing.T, e *Engine, o op) []Change {
	switch o.kind {
	case "dev":
		return e.PutDevice(o.id, o.tags)
	case "deldev":
		return e.DeleteDevice(o.id)
	case "dep":
		return mustPut(t, e, o.dep)
	}
	return e.DeleteDeployment(o.id)
}

// Three engines fed the same sequence report identical changes and
// assignments; a fourth rebuilt from the final state (as after a snapshot
// restore: devices first, then deployments) reports the same assignments.
func TestEngine_DeterministicAcrossNodes(t *testing.T) {
	devices, n := 3000, 3000
	if testing.Short() {
		devices, n = 1500, 1000
	}
	ops := randomOps(42, devices, n)
	nodes := []*Engine{NewEngine(), NewEngine(), NewEngine()}
	devs := map[string]map[string]any{}
	deps := map[string]Deployment{}
	var depOrder []string
	for i, o := range ops {
		var first []Change
		for j, e := range nodes {
			ch := apply(t, e, o)
			if j == 0 {
				first = ch
			} else if !slices.Equal(ch, first) {
				t.Fatalf("op %d (%+v): node %d changes %v, node 0 %v", i, o, j, ch, first)
			}
		}
		switch o.kind {
		case "dev":
			devs[o.id] = o.tags
		case "deldev":
			delete(devs, o.id)
		case "dep":
			if _, ok := deps[o.dep.ID]; !ok {
				depOrder = append(depOrder, o.dep.ID)
			}
			deps[o.dep.ID] = o.dep
		case "deldep":
			delete(deps, o.id)
		}
	}
	restored := NewEngine()
	restored.PutDevice("junk", map[string]any{"env": "prod"})
	restored.Reset()
	for id, tags := range devs { // any order: the results must not depend on it
		restored.PutDevice(id, tags)
	}
	for _, id := range depOrder {
		if d, ok := deps[id]; ok {
			mustPut(t, restored, d)
		}
	}
	all := append(nodes, restored)
	for id := range devs {
		a, tg := all[0].Applied(id), all[0].Targeting(id)
		for j, e := range all[1:] {
			if got := e.Applied(id); got != a {
				t.Fatalf("node %d: Applied(%s) = %q, node 0 %q", j+1, id, got, a)
			}
			if got := e.Targeting(id); !slices.Equal(got, tg) {
				t.Fatalf("node %d: Targeting(%s) = %v, node 0 %v", j+1, id, got, tg)
			}
		}
	}
	for id := range deps {
		tg, ap := all[0].TargetedDevices(id), all[0].AppliedDevices(id)
		for j, e := range all[1:] {
			if !slices.Equal(e.TargetedDevices(id), tg) || !slices.Equal(e.AppliedDevices(id), ap) {
				t.Fatalf("node %d: devices of %s differ", j+1, id)
			}
		}
	}
	// And the answers are right.
	checkAgainstEval(t, all[0], devs, deps)
}

// Readers and writers at once (make unit runs it under -race): the reads
// race nothing, and the readers leave the writer's result as a serial
// replay of the same writes makes it.
func TestEngine_Concurrent(t *testing.T) {
	e := NewEngine()
	ops := randomOps(7, 300, 600)
	apply := func(e *Engine) error {
		for _, o := range ops {
			switch o.kind {
			case "dev":
				e.PutDevice(o.id, o.tags)
			case "deldev":
				e.DeleteDevice(o.id)
			case "dep":
				if _, err := e.PutDeployment(o.dep); err != nil {
					return fmt.Errorf("deployment %s: %w", o.dep.ID, err)
				}
			default:
				e.DeleteDeployment(o.id)
			}
		}
		return nil
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := apply(e); err != nil {
			t.Error(err)
		}
	}()
	go func() {
		defer wg.Done()
		c := MustCompile("tags.env = 'prod' OR tags.rack > 4")
		for i := range 300 {
			e.Applied(fmt.Sprintf("dev-%d", i))
			e.Targeting(fmt.Sprintf("dev-%d", i))
			e.TargetedDevices(fmt.Sprintf("dep-%d", i%12))
			e.AppliedDevices(fmt.Sprintf("dep-%d", i%12))
			e.Counts(fmt.Sprintf("dep-%d", i%12))
			e.DryRun(Deployment{ID: "x", Condition: "tags.rack > 2"})
			if _, err := e.Match(c); err != nil {
				t.Error(err)
			}
		}
	}()
	wg.Wait()
	serial := NewEngine()
	if err := apply(serial); err != nil {
		t.Fatal(err)
	}
	applied := 0
	for i := range 300 {
		id := fmt.Sprintf("dev-%d", i)
		if got, want := e.Applied(id), serial.Applied(id); got != want {
			t.Fatalf("Applied(%s) = %q after concurrent reads, %q after a serial replay", id, got, want)
		}
		if e.Applied(id) != "" {
			applied++
		}
	}
	if applied == 0 {
		t.Fatal("no device applies a deployment: the writes did nothing to compare")
	}
}

// checkAgainstEval compares every answer of e with a brute-force evaluation
// through the document evaluator (itself tested equal to CEL).
func checkAgainstEval(t *testing.T, e *Engine, devs map[string]map[string]any, deps map[string]Deployment) {
	t.Helper()
	conds := map[string]*Condition{}
	for id, d := range deps {
		conds[id] = MustCompile(d.Condition)
	}
	targeted := map[string][]string{}
	applied := map[string][]string{}
	for dev, tags := range devs {
		var tg []string
		for id, c := range conds {
			if c.Eval(dev, tags) {
				tg = append(tg, id)
				targeted[id] = append(targeted[id], dev)
			}
		}
		slices.SortFunc(tg, func(a, b string) int {
			da, db := deps[a], deps[b]
			return precedes(&da, &db)
		})
		want := ""
		if len(tg) > 0 {
			want = tg[0]
			applied[want] = append(applied[want], dev)
		}
		if got := e.Applied(dev); got != want {
			t.Fatalf("Applied(%s) = %q, want %q", dev, got, want)
		}
		if got := e.Targeting(dev); !slices.Equal(got, tg) {
			t.Fatalf("Targeting(%s) = %v, want %v", dev, got, tg)
		}
	}
	for id := range deps {
		slices.Sort(targeted[id])
		slices.Sort(applied[id])
		if got := e.TargetedDevices(id); !slices.Equal(got, targeted[id]) {
			t.Fatalf("TargetedDevices(%s): %d devices, want %d", id, len(got), len(targeted[id]))
		}
		if got := e.AppliedDevices(id); !slices.Equal(got, applied[id]) {
			t.Fatalf("AppliedDevices(%s): %d devices, want %d", id, len(got), len(applied[id]))
		}
	}
}

// Enough devices for dense (bitset) chunks, so that the large-set
// algorithms (the precedence sweep, the id order) meet every container
// form; each step is checked by brute force.
func TestEngine_LargeSets(t *testing.T) {
	e := NewEngine()
	devs := map[string]map[string]any{}
	deps := map[string]Deployment{}
	for i := range 10000 {
		id := fmt.Sprintf("dev-%05d", (i*7919)%10000) // not in id order
		devs[id] = map[string]any{"n": float64(i % 10)}
		e.PutDevice(id, devs[id])
	}
	put := func(d Deployment) {
		t.Helper()
		deps[d.ID] = d
		mustPut(t, e, d)
		checkAgainstEval(t, e, devs, deps)
	}
	del := func(id string) {
		t.Helper()
		delete(deps, id)
		e.DeleteDeployment(id)
		checkAgainstEval(t, e, devs, deps)
	}
	put(Deployment{ID: "all", Condition: "*"})
	put(Deployment{ID: "half", Condition: "tags.n < 5", Priority: 1})
	put(Deployment{ID: "tenth", Condition: "tags.n = 3", Priority: 2})
	var few []string
	for i := range 65 {
		few = append(few, fmt.Sprintf("'dev-%05d'", i*10+3))
	}
	put(Deployment{ID: "few", Condition: "deviceId IN [" + strings.Join(few, ", ") + "]", Priority: 9})
	del("few")  // 65 devices back to "tenth": an array chunk, searched
	del("half") // 4,000 devices: an array chunk, scanned, then a bitset
	put(Deployment{ID: "all", Condition: "*", Priority: 5})
	put(Deployment{ID: "all", Condition: "tags.n != 7", Priority: 5})
	// Devices added after the last compaction, sorting after every other.
	for i := range 100 {
		id := fmt.Sprintf("zz-%03d", i)
		devs[id] = map[string]any{"n": 1.0}
		e.PutDevice(id, devs[id])
	}
	for i := range 50 {
		id := fmt.Sprintf("dev-%05d", i)
		delete(devs, id)
		e.DeleteDevice(id)
	}
	checkAgainstEval(t, e, devs, deps)
	del("tenth")
	del("all")
}

// A layered deployment never displaces the base, whatever its priority; it
// applies (merges) only on devices that have a base, and its targeting is
// reported as layer changes.
func TestEngine_Layers(t *testing.T) {
	e := NewEngine()
	e.PutDevice("a", map[string]any{"site": "x"})
	e.PutDevice("b", map[string]any{"site": "y"})
	mustPut(t, e, Deployment{ID: "base", Condition: "tags.site = 'x'", Priority: 10})
	ch := mustPut(t, e, Deployment{ID: "l1", Condition: "*", Priority: 20, Layered: true})
	want := []Change{
		{DeviceID: "a", From: "base", To: "base", Layer: "l1", LayerOp: LayerAdded},
		{DeviceID: "b", Layer: "l1", LayerOp: LayerAdded},
	}
	if !slices.Equal(ch, want) {
		t.Fatalf("put l1 = %v, want %v", ch, want)
	}
	mustPut(t, e, Deployment{ID: "l0", Condition: "*", Priority: 1, Layered: true})
	if e.Applied("a") != "base" || e.Applied("b") != "" {
		t.Fatalf("applied a=%q b=%q: a layer displaced or became a base", e.Applied("a"), e.Applied("b"))
	}
	if got := e.Layers("a"); !slices.Equal(got, []string{"l1", "l0"}) {
		t.Fatalf("Layers(a) = %v", got)
	}
	if got := e.AppliedDevices("l1"); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("AppliedDevices(l1) = %v: only a device with a base", got)
	}
	if tg, ap := e.Counts("l1"); tg != 2 || ap != 1 {
		t.Fatalf("Counts(l1) = %d, %d", tg, ap)
	}
	if got := e.UnassignedDevices(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("UnassignedDevices = %v", got)
	}
	// b gets a base: its base changes (its layers come with the new document).
	if ch := e.PutDevice("b", map[string]any{"site": "x"}); !slices.Equal(ch, []Change{{DeviceID: "b", To: "base"}}) {
		t.Fatalf("PutDevice(b) = %v", ch)
	}
	// A layer's priority change reorders the layers of every device it targets.
	ch = mustPut(t, e, Deployment{ID: "l0", Condition: "*", Priority: 30, Layered: true})
	if len(ch) != 2 || ch[0].LayerOp != LayerMoved || ch[1].LayerOp != LayerMoved {
		t.Fatalf("reorder l0 = %v", ch)
	}
	if got := e.Layers("a"); !slices.Equal(got, []string{"l0", "l1"}) {
		t.Fatalf("Layers(a) after reorder = %v", got)
	}
	// Untargeting a device removes the layer from it alone.
	ch = mustPut(t, e, Deployment{ID: "l1", Condition: "deviceId = 'a'", Priority: 20, Layered: true})
	if !slices.Equal(ch, []Change{{DeviceID: "b", From: "base", To: "base", Layer: "l1", LayerOp: LayerRemoved}}) {
		t.Fatalf("narrow l1 = %v", ch)
	}
	if ch := e.DeleteDeployment("l1"); !slices.Equal(ch, []Change{{DeviceID: "a", From: "base", To: "base", Layer: "l1", LayerOp: LayerRemoved}}) {
		t.Fatalf("delete l1 = %v", ch)
	}
	// A dry run of a layer: it would apply where there is a base.
	e.PutDevice("c", nil)
	if tg, wa, err := e.DryRun(Deployment{ID: "l2", Condition: "*", Layered: true, Priority: 99}); err != nil || tg != 3 || wa != 2 {
		t.Fatalf("DryRun(layer) = %d, %d, %v; want 3, 2", tg, wa, err)
	}
}

// TestEngine_RestoreDeployment: a rebuild's deployments (no change lists)
// leave the engine exactly as PutDeployment does, layers and gates
// included, and a condition that does not compile is refused alike.
func TestEngine_RestoreDeployment(t *testing.T) {
	var es [2]*Engine
	for i := range es {
		e := NewEngine()
		for d := range 3000 {
			e.PutDevice(fmt.Sprintf("dev%04d", d), map[string]any{"n": float64(d % 7), "env": []string{"prod", "test"}[d%2]})
		}
		es[i] = e
	}
	deps := []Deployment{
		{ID: "all", Condition: "*", Priority: 0},
		{ID: "prod", Condition: "tags.env = 'prod'", Priority: 2},
		{ID: "n3", Condition: "tags.n >= 3 AND NOT tags.env = 'test'", Priority: 5, Gated: true},
		{ID: "layer", Condition: "tags.n IN [1, 2]", Priority: 1, Layered: true},
	}
	for _, d := range deps {
		mustPut(t, es[0], d)
		if err := es[1].RestoreDeployment(d); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := es[0].PutDeployment(Deployment{ID: "bad", Condition: "tags.x ="}); err == nil {
		t.Fatal("PutDeployment of a condition that does not compile succeeded")
	}
	if err := es[1].RestoreDeployment(Deployment{ID: "bad", Condition: "tags.x ="}); err == nil {
		t.Fatal("RestoreDeployment of a condition that does not compile succeeded")
	}
	if !reflect.DeepEqual(es[0].state, es[1].state) {
		t.Fatal("the engine after RestoreDeployment differs from the one after PutDeployment")
	}
	if got := es[1].Applied("dev0002"); got != "prod" {
		t.Fatalf("dev0002 applies %q, want prod", got)
	}
	// Later calls list their changes again.
	if ch := mustPut(t, es[1], Deployment{ID: "top", Condition: "deviceId = 'dev0001'", Priority: 9}); len(ch) != 1 {
		t.Fatalf("PutDeployment after a restore listed %v, want one change", ch)
	}
}
