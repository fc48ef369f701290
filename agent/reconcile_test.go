package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
)

// fakeDriver is an in-memory runtime that records the operations it is
// asked for. Hooks are function fields, nil for the default behaviour.
type fakeDriver struct {
	createHook func(ctx context.Context, spec *moduleSpec) error
	types      []string

	mu        sync.Mutex
	seq       int
	instances map[string]*fakeInstance
	calls     []string
}

type fakeInstance struct {
	name    string
	running bool
	started time.Time
}

func newFakeDriver() *fakeDriver {
	return &fakeDriver{instances: map[string]*fakeInstance{}, types: []string{"docker", "process"}}
}

func (f *fakeDriver) record(op, name string) {
	f.mu.Lock()
	f.calls = append(f.calls, op+" "+name)
	f.mu.Unlock()
}

func (f *fakeDriver) callIndex(call string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Index(f.calls, call)
}

func (f *fakeDriver) Name() string                    { return "fake" }
func (f *fakeDriver) Supports(moduleType string) bool { return slices.Contains(f.types, moduleType) }

func (f *fakeDriver) Create(ctx context.Context, spec *moduleSpec, _ []registryCredential) (string, error) {
	f.record("create", spec.Name)
	if f.createHook != nil {
		if err := f.createHook(ctx, spec); err != nil {
			return "", err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seq++
	h := fmt.Sprintf("%s#%d", spec.Name, f.seq)
	f.instances[h] = &fakeInstance{name: spec.Name}
	return h, nil
}

func (f *fakeDriver) instance(h string) (*fakeInstance, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	in, ok := f.instances[h]
	if !ok {
		return nil, errGone
	}
	return in, nil
}

func (f *fakeDriver) Start(_ context.Context, h string) error {
	in, err := f.instance(h)
	if err != nil {
		return err
	}
	f.record("start", in.name)
	f.mu.Lock()
	in.running, in.started = true, time.Now()
	f.mu.Unlock()
	return nil
}

func (f *fakeDriver) Stop(_ context.Context, h string, _ time.Duration) error {
	in, err := f.instance(h)
	if err != nil {
		return err
	}
	f.record("stop", in.name)
	f.mu.Lock()
	in.running = false
	f.mu.Unlock()
	return nil
}

func (f *fakeDriver) Remove(_ context.Context, h string) error {
	in, err := f.instance(h)
	if err != nil {
		return nil
	}
	f.record("remove", in.name)
	f.mu.Lock()
	delete(f.instances, h)
	f.mu.Unlock()
	return nil
}

func (f *fakeDriver) Inspect(_ context.Context, h string) (instanceState, error) {
	in, err := f.instance(h)
	if err != nil {
		return instanceState{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return instanceState{Running: in.running, StartedAt: in.started}, nil
}

func (f *fakeDriver) Owned(context.Context) ([]ownedInstance, error) { return nil, nil }
func (f *fakeDriver) Close() error                                   { return nil }

func fakeConfig(t *testing.T, d *fakeDriver) Config {
	cfg := testConfig(t)
	cfg.runtime = d
	return cfg
}

func TestAgent_StartupOrder(t *testing.T) {
	d := newFakeDriver()
	a := startAgent(t, fakeConfig(t, d))
	m := processModule("/tmp", nil)
	a.send(t, desired(1, "dep", map[string]mod{
		"last":   m,                         // no startupOrder: after all others
		"third":  m.with("startupOrder", 2), //
		"first":  m.with("startupOrder", 0),
		"second": m.with("startupOrder", 1),
		"also2":  m.with("startupOrder", 1),
	}))
	waitReport(t, a.Agent, waitLong, "all running", running("first", "second", "also2", "third", "last"))
	order := []string{"first", "second", "third", "last"}
	for i := 1; i < len(order); i++ {
		if !(d.callIndex("start "+order[i-1]) < d.callIndex("create "+order[i])) {
			t.Errorf("%s was created before %s started: %v", order[i], order[i-1], d.calls)
		}
	}
	if !(d.callIndex("start first") < d.callIndex("create also2") && d.callIndex("start also2") < d.callIndex("create third")) {
		t.Errorf("equal startupOrder not grouped: %v", d.calls)
	}
}

func TestAgent_NewVersionPreemptsHalfDonePlan(t *testing.T) {
	d := newFakeDriver()
	blocked := make(chan struct{})
	cancelled := make(chan error, 1)
	d.createHook = func(ctx context.Context, spec *moduleSpec) error {
		if spec.Name != "slow" {
			return nil
		}
		close(blocked)
		<-ctx.Done() // a pull that never ends
		cancelled <- ctx.Err()
		return ctx.Err()
	}
	a := startAgent(t, fakeConfig(t, d))
	m := processModule("/tmp", nil)
	a.send(t, desired(1, "dep-1", map[string]mod{"slow": m.with("startupOrder", 0), "after": m.with("startupOrder", 1)}))
	select {
	case <-blocked:
	case <-time.After(waitLong):
		t.Fatal("the slow create never started")
	}
	a.send(t, desired(2, "dep-2", map[string]mod{"other": m}))
	doc := waitReport(t, a.Agent, waitLong, "version 2 applied", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 2 && running("other")(d)
	})
	if err := <-cancelled; err == nil {
		t.Error("the slow create was not cancelled")
	}
	if doc.LastDesiredStatus.Code != fleet.StatusCodeOK || len(doc.Modules) != 1 {
		t.Errorf("report after pre-emption: %+v", doc)
	}
	if d.callIndex("create after") >= 0 {
		t.Errorf("the pre-empted plan went on: %v", d.calls)
	}
}

func TestAgent_StatusBeforeAnyDesired(t *testing.T) {
	a := startAgent(t, fakeConfig(t, newFakeDriver()))
	time.Sleep(100 * time.Millisecond)
	if doc, ok := a.Status(); ok {
		t.Errorf("a report before any desired document: %+v", doc)
	}
	if err := a.Run(context.Background()); err != ErrAlreadyRunning {
		t.Errorf("second Run: %v", err)
	}
}

// The agent must stay a small binary: no raft, no broker, no controller
// code (ARCHITECTURE-NOTES: the agent never links raft or bbolt-based
// controller state). Its device hub speaks MQTT with mochi's packet codec
// only: mochi's server (hooks, listeners, client state) is the
// controller's broker's.
func TestAgent_ImportsNoControllerCode(t *testing.T) {
	out, err := goList(t, "-deps", "appliance/agent")
	if err != nil {
		t.Fatalf("go list -deps appliance/agent: %v", err)
	}
	allowed := map[string]bool{"github.com/mochi-mqtt/server/v2/packets": true, "github.com/mochi-mqtt/server/v2/mempool": true}
	deps := strings.Fields(out)
	for _, dep := range deps {
		if allowed[dep] {
			continue
		}
		for _, banned := range []string{"appliance/raftstore", "appliance/node", "appliance/broker", "appliance/evaluator",
			"appliance/api", "appliance/cli", "github.com/hashicorp/raft", "github.com/mochi-mqtt", "github.com/boltdb/bolt"} {
			if dep == banned || strings.HasPrefix(dep, banned+"/") {
				t.Errorf("agent depends on %s", dep)
			}
		}
	}
	if !slices.Contains(deps, "appliance/hub") {
		t.Error("agent does not link the device hub")
	}
}
