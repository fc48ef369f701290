package evaluator

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"cel.dev/cel-go/interpreter"
)

// Benchmarks over a synthetic fleet of a million devices, each with a
// naive baseline in the same run: every device through the CEL program.
// The fleet, its engines and the CEL activations are built once per
// process (a few seconds) and shared. Run with
//
//	go test -run '^$' -bench . -benchtime 20x ./evaluator/

const benchDevices = 1_000_000

var regions = []string{"westus", "eastus", "centralus", "northeurope", "westeurope", "uksouth", "ukwest", "francecentral",
	"germanywestcentral", "swedencentral", "japaneast", "japanwest", "koreacentral", "australiaeast", "brazilsouth",
	"canadacentral", "southafricanorth", "uaenorth", "centralindia", "eastasia"}

type benchFleet struct {
	ids  []string
	tags []map[string]any
}

var (
	fleetOnce sync.Once
	fleet     *benchFleet
)

// getFleet builds the fleet: environment prod 50 %, test 30 %, dev 20 %;
// location one of 20 regions (5 % each); building 0-99 (a number); and for
// a third of the devices a nested site.floor. The shape of the reference
// measurements in performance-anchors.md §B2.
func getFleet(b *testing.B) *benchFleet {
	fleetOnce.Do(func() {
		start := time.Now()
		r := rand.New(rand.NewPCG(1, 2))
		f := &benchFleet{ids: make([]string, benchDevices), tags: make([]map[string]any, benchDevices)}
		for i := range benchDevices {
			f.ids[i] = fmt.Sprintf("device-%07d", i)
			f.tags[i] = benchTags(r)
		}
		fleet = f
		b.Logf("fleet of %d devices built in %v", benchDevices, time.Since(start))
	})
	return fleet
}

func benchTags(r *rand.Rand) map[string]any {
	env := "prod"
	switch x := r.IntN(10); {
	case x >= 8:
		env = "dev"
	case x >= 5:
		env = "test"
	}
	t := map[string]any{
		"environment": env,
		"location":    regions[r.IntN(len(regions))],
		"building":    float64(r.IntN(100)),
	}
	if r.IntN(3) == 0 {
		t["site"] = map[string]any{"floor": float64(r.IntN(10))}
	}
	return t
}

// background deployments present in every engine, so that a new one has
// applied deployments to compete with.
var background = []Deployment{
	{ID: "fallback", Condition: "*", Priority: 0},
	{ID: "dev", Condition: "tags.environment = 'dev'", Priority: 10},
	{ID: "eastus", Condition: "tags.location = 'eastus'", Priority: 20},
	{ID: "floor0", Condition: "tags.site.floor = 0", Priority: 5},
	{ID: "old-buildings", Condition: "tags.building < 10 AND tags.environment != 'prod'", Priority: 15},
}

// activations returns the fleet's CEL activations, built ahead so that the
// baselines measure evaluation alone (the most favourable baseline). They
// are dropped after each baseline: a million of them make every garbage
// collection in the engine benchmarks slower.
func activations(b *testing.B) []interpreter.Activation {
	f := getFleet(b)
	acts := make([]interpreter.Activation, len(f.ids))
	for i, id := range f.ids {
		act, err := interpreter.NewActivation(map[string]any{"doc": DeviceDocument(id, f.tags[i])})
		if err != nil {
			b.Fatal(err)
		}
		acts[i] = act
	}
	return acts
}

var (
	enginesMu sync.Mutex
	engines   = map[string]*Engine{}
)

// getEngine returns an engine holding the fleet and the background
// deployments, built once per name.
func getEngine(b *testing.B, name string, scanOnly bool) *Engine {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	if e, ok := engines[name]; ok {
		return e
	}
	f := getFleet(b)
	start := time.Now()
	e := &Engine{state: state{scanOnly: scanOnly}}
	e.init()
	for i, id := range f.ids {
		e.PutDevice(id, f.tags[i])
	}
	for _, d := range background {
		if _, err := e.PutDeployment(d); err != nil {
			panic(err)
		}
	}
	engines[name] = e
	b.Logf("engine %s built in %v", name, time.Since(start))
	return e
}

// dropEngines frees the engines a benchmark built, so that the next one's
// garbage collections do not scan them.
func dropEngines() {
	enginesMu.Lock()
	clear(engines)
	enginesMu.Unlock()
	runtime.GC()
}

// celBaseline evaluates a condition's CEL program on every device: the
// naive way to find a new deployment's target set.
func celBaseline(b *testing.B, acts []interpreter.Activation, cond string) int {
	c := MustCompile(cond)
	n := 0
	for _, act := range acts {
		out, _, err := c.prg.Eval(act)
		if err != nil {
			b.Fatal(err)
		}
		if out.Value().(bool) {
			n++
		}
	}
	return n
}

// BenchmarkNewDeployment: time from PutDeployment to the full target set
// and the sorted Change list, over a million devices.
func BenchmarkNewDeployment(b *testing.B) {
	cases := []struct {
		name, cond string
		scanOnly   bool
	}{
		{"eq_and", "tags.environment = 'prod' AND tags.location = 'westus'", false},
		{"in", "tags.location IN ['westus', 'centralus', 'uksouth']", false},
		{"eq_broad", "tags.environment = 'prod'", false},
		{"range_index", "tags.building > 40", false},
		{"range_scan", "tags.building > 40", true},
		{"deviceId_range_scan", "deviceId > 'device-0500000'", false},
	}
	for _, tc := range cases {
		b.Run(tc.name+"/engine", func(b *testing.B) {
			name := "index"
			if tc.scanOnly {
				name = "scan"
			}
			e := getEngine(b, name, tc.scanOnly)
			d := Deployment{ID: "new", Condition: tc.cond, Priority: 12, CreatedUnixNano: 1}
			b.ResetTimer()
			for range b.N {
				if _, err := e.PutDeployment(d); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				tg, _ := e.Counts("new")
				b.ReportMetric(float64(tg), "targeted")
				e.DeleteDeployment("new")
				b.StartTimer()
			}
		})
		// The target set and the would-apply count alone, without building
		// a Change list: what the index itself costs.
		b.Run(tc.name+"/dryrun", func(b *testing.B) {
			name := "index"
			if tc.scanOnly {
				name = "scan"
			}
			e := getEngine(b, name, tc.scanOnly)
			d := Deployment{ID: "new", Condition: tc.cond, Priority: 12, CreatedUnixNano: 1}
			b.ResetTimer()
			for range b.N {
				tg, _, err := e.DryRun(d)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(tg), "targeted")
			}
		})
	}
	var acts []interpreter.Activation
	for _, tc := range cases {
		if tc.scanOnly {
			continue
		}
		b.Run(tc.name+"/cel_baseline", func(b *testing.B) {
			if acts == nil {
				acts = activations(b)
			}
			b.ResetTimer()
			for range b.N {
				b.ReportMetric(float64(celBaseline(b, acts, tc.cond)), "targeted")
			}
		})
	}
	acts = nil
	dropEngines()
}

// deviceUpdateDeployments returns 1,000 deployments. "mixed" is a
// realistic spread (per building, per region and environment, per region
// with a range, per floor, per device list); "overlapping" all can match
// every prod device, the worst case for a device change.
func deviceUpdateDeployments(kind string) []Deployment {
	var out []Deployment
	for i := range 1000 {
		var cond string
		switch {
		case kind == "overlapping":
			cond = fmt.Sprintf("tags.environment = 'prod' AND tags.building >= %d", i%100)
		case i%10 < 6:
			cond = fmt.Sprintf("tags.location = '%s' AND tags.building = %d", regions[i%20], i%100)
		case i%10 < 8:
			cond = fmt.Sprintf("tags.environment = '%s' AND tags.location IN ['%s', '%s']", []string{"prod", "test", "dev"}[i%3], regions[i%20], regions[(i+7)%20])
		case i%10 == 8:
			cond = fmt.Sprintf("tags.building > %d AND tags.location = '%s'", i%100, regions[(i/10)%20])
		default:
			cond = fmt.Sprintf("NOT tags.environment = 'prod' AND tags.site.floor = %d OR deviceId IN ['device-%07d', 'device-%07d']", i%10, i*7, i*13)
		}
		out = append(out, Deployment{ID: fmt.Sprintf("dep-%04d", i), Condition: cond, Priority: int64(i % 7), CreatedUnixNano: int64(i)})
	}
	return out
}

// BenchmarkDeviceUpdate: one device's tags change with 1,000 deployments
// present over a million devices. Reports the median and p99 of single
// PutDevice calls. In "mixed" and "overlapping" every tag of the device is
// drawn again (the pessimistic case); in "mixed-one-tag" one tag changes.
func BenchmarkDeviceUpdate(b *testing.B) {
	for _, kind := range []string{"mixed", "mixed-one-tag", "overlapping"} {
		deps := deviceUpdateDeployments(kind)
		b.Run(kind+"/engine", func(b *testing.B) {
			e := getEngine(b, "update-"+kind, false)
			if e.Stats().Deployments < len(deps) {
				start := time.Now()
				for _, d := range deps {
					if _, err := e.PutDeployment(d); err != nil {
						b.Fatal(err)
					}
				}
				b.Logf("%d deployments put in %v", len(deps), time.Since(start))
			}
			f := getFleet(b)
			r := rand.New(rand.NewPCG(3, 4))
			durs := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				i := r.IntN(benchDevices)
				tags := benchTags(r)
				if kind == "mixed-one-tag" {
					k := []string{"environment", "location", "building"}[r.IntN(3)]
					one := maps.Clone(f.tags[i])
					one[k] = tags[k]
					tags = one
				}
				start := time.Now()
				e.PutDevice(f.ids[i], tags)
				durs = append(durs, time.Since(start))
			}
			b.StopTimer()
			reportQuantiles(b, durs)
		})
	}
	dropEngines()
	acts := activations(b)
	defer runtime.GC()
	for _, kind := range []string{"mixed", "overlapping"} {
		deps := deviceUpdateDeployments(kind)
		b.Run(kind+"/cel_baseline", func(b *testing.B) {
			var conds []*Condition
			for _, d := range deps {
				conds = append(conds, MustCompile(d.Condition))
			}
			r := rand.New(rand.NewPCG(3, 4))
			durs := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				act := acts[r.IntN(benchDevices)]
				start := time.Now()
				for _, c := range conds {
					if _, _, err := c.prg.Eval(act); err != nil {
						b.Fatal(err)
					}
				}
				durs = append(durs, time.Since(start))
			}
			b.StopTimer()
			reportQuantiles(b, durs)
		})
	}
}

func reportQuantiles(b *testing.B, durs []time.Duration) {
	if len(durs) == 0 {
		return
	}
	slices.Sort(durs)
	b.ReportMetric(float64(durs[len(durs)/2].Nanoseconds()), "median-ns")
	b.ReportMetric(float64(durs[len(durs)*99/100].Nanoseconds()), "p99-ns")
}

// BenchmarkMemoryPerDevice: live heap of an engine holding the fleet and
// the background deployments, per device, next to the live heap of the
// decoded tags themselves (which the engine does not keep). "typical" is the
// fleet above; "unique-serial" adds a tag whose value differs on every
// device (a serial number), the costliest kind of tag to index. ns/op is
// the time to load the whole fleet.
func BenchmarkMemoryPerDevice(b *testing.B) {
	f := getFleet(b)
	for _, serial := range []bool{false, true} {
		name := "typical"
		if serial {
			name = "unique-serial"
		}
		tagsOf := func(i int, t map[string]any) map[string]any {
			if !serial {
				return t
			}
			c := maps.Clone(t)
			c["serial"] = fmt.Sprintf("SN-%07d", i)
			return c
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				e := NewEngine()
				for i, id := range f.ids {
					e.PutDevice(id, tagsOf(i, f.tags[i]))
				}
				for _, d := range background {
					if _, err := e.PutDeployment(d); err != nil {
						b.Fatal(err)
					}
				}
				e.mu.Lock()
				e.compactOrder() // the steady state: nothing pending
				e.mu.Unlock()
				runtime.GC()
				runtime.ReadMemStats(&after)
				b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/benchDevices, "bytes/device")
				runtime.KeepAlive(e)

				// The same devices' tags as decoded JSON maps, for comparison.
				runtime.GC()
				runtime.ReadMemStats(&before)
				r := rand.New(rand.NewPCG(1, 2))
				tags := make([]map[string]any, benchDevices)
				for i := range tags {
					tags[i] = tagsOf(i, benchTags(r))
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/benchDevices, "tags-bytes/device")
				runtime.KeepAlive(tags)
			}
		})
	}
}
