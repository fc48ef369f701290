package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// moduleBin is the test workload (testdata/module), built by TestMain as
// a static binary.
var moduleBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "agent-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	moduleBin = filepath.Join(dir, "module")
	if err := buildModule(moduleBin, runtime.GOARCH); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	cleanupDocker()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildModule compiles testdata/module into a static linux binary.
func buildModule(out, arch string) error {
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		gobin = "go"
	}
	cmd := exec.Command(gobin, "build", "-trimpath", "-o", out, "./testdata/module")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+runtime.GOOS, "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build test module: %v\n%s", err, b)
	}
	return nil
}

// testLogger sends logs to t.Log until the test ends (goroutines that log
// after that must not make t.Log panic).
func testLogger(t testing.TB) *slog.Logger {
	h := &tlogHandler{t: t, mu: &sync.Mutex{}, done: new(bool)}
	t.Cleanup(func() {
		h.mu.Lock()
		*h.done = true
		h.mu.Unlock()
	})
	return slog.New(h)
}

type tlogHandler struct {
	t     testing.TB
	mu    *sync.Mutex
	done  *bool
	attrs []slog.Attr
}

func (h *tlogHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *tlogHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s", r.Time.Format("15:04:05.000"), r.Level, r.Message)
	for _, a := range h.attrs {
		fmt.Fprintf(&b, " %s", a)
	}
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s", a)
		return true
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	if !*h.done {
		h.t.Log(b.String())
	}
	return nil
}

func (h *tlogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &c
}

func (h *tlogHandler) WithGroup(string) slog.Handler { return h }

// deadServer returns an mqtt:// address on 127.0.0.1 where nothing
// listens.
func deadServer(t testing.TB) string {
	t.Helper()
	return "mqtt://" + testutil.FreeAddr(t, "127.0.0.1")
}

// testConfig is a process-runtime config with millisecond timings and no
// reachable server.
func testConfig(t testing.TB) Config {
	return Config{
		Servers:        []string{deadServer(t)},
		DeviceID:       "dev-" + strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())),
		DeviceKey:      "test-key",
		DataDir:        t.TempDir(),
		Runtime:        RuntimeProcess,
		Logger:         testLogger(t),
		Version:        "test",
		ReportInterval: 20 * time.Millisecond,
		ResyncInterval: 200 * time.Millisecond,
		StopTimeout:    2 * time.Second,
		ReconnectMin:   20 * time.Millisecond,
		ReconnectMax:   200 * time.Millisecond,
		ConnectTimeout: 2 * time.Second,
		// A port of its own: tests run agents side by side (the hub's own
		// tests use 8883 on addresses of their own).
		Hub: HubConfig{Addr: "127.0.0.1:0", DockerAddr: HubOff},
		Restart: RestartConfig{
			CoolOff:      50 * time.Millisecond,
			MaxCoolOff:   400 * time.Millisecond,
			MaxRestarts:  20,
			HealthyReset: time.Minute,
		},
	}
}

// runningAgent is an agent whose Run goroutine the test controls.
type runningAgent struct {
	*Agent
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// startAgent runs an agent until stop or the end of the test.
func startAgent(t testing.TB, cfg Config) *runningAgent {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: a, cancel: cancel, done: make(chan error, 1)}
	go func() { ra.done <- a.Run(ctx) }()
	t.Cleanup(func() { ra.stop(t) })
	return ra
}

// stop cancels Run and waits for it; it may be called more than once.
func (ra *runningAgent) stop(t testing.TB) {
	t.Helper()
	ra.cancel()
	ra.once.Do(func() {
		select {
		case err := <-ra.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("Run did not return within 30s of cancel")
		}
	})
}

// send hands the agent a desired document as the MQTT session would.
func (ra *runningAgent) send(t testing.TB, doc fleet.DesiredDocument) {
	t.Helper()
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	ra.offerDesired(b)
}

// waitReport waits until the agent's report satisfies cond.
func waitReport(t testing.TB, a *Agent, timeout time.Duration, what string, cond func(fleet.ReportedDocument) bool) fleet.ReportedDocument {
	t.Helper()
	timeout = testutil.Bound(timeout)
	deadline := time.Now().Add(timeout)
	var last fleet.ReportedDocument
	for time.Now().Before(deadline) {
		if doc, ok := a.Status(); ok {
			last = doc
			if cond(doc) {
				return doc
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	b, _ := json.MarshalIndent(last, "", "  ")
	t.Fatalf("timed out after %s waiting for %s; last report:\n%s", timeout, what, b)
	return last
}

// waitFor polls cond until it holds.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	timeout = testutil.Bound(timeout)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", timeout, what)
}

func running(names ...string) func(fleet.ReportedDocument) bool {
	return func(d fleet.ReportedDocument) bool {
		for _, n := range names {
			if d.Modules[n].RuntimeStatus != fleet.RuntimeRunning {
				return false
			}
		}
		return true
	}
}

// mod is a module of a test manifest.
type mod map[string]any

// processModule is a process module running the test workload, writing
// its files into out, with extra environment variables.
func processModule(out string, env map[string]string) mod {
	e := map[string]any{"MODULE_OUT": map[string]any{"value": out}}
	for k, v := range env {
		e[k] = map[string]any{"value": v}
	}
	return mod{
		"type":          "process",
		"status":        "running",
		"restartPolicy": "always",
		"env":           e,
		"settings":      map[string]any{"command": []string{moduleBin}},
	}
}

func (m mod) with(kv ...any) mod {
	c := maps.Clone(m)
	for i := 0; i+1 < len(kv); i += 2 {
		c[kv[i].(string)] = kv[i+1]
	}
	return c
}

// manifest builds a modulesContent with the given modules.
func manifest(modules map[string]mod) json.RawMessage {
	mc := map[string]any{
		"$edgeAgent": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"runtime":       map[string]any{"type": "docker", "settings": map[string]any{}},
			"systemModules": map[string]any{
				"edgeAgent": map[string]any{"type": "docker", "settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-agent:1.5"}},
				"edgeHub": map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
					"settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-hub:1.5"}},
			},
			"modules": modules,
		}},
		"$edgeHub": map[string]any{"properties.desired": map[string]any{
			"schemaVersion":                "1.1",
			"routes":                       map[string]any{"up": "FROM /messages/* INTO $upstream"},
			"storeAndForwardConfiguration": map[string]any{"timeToLiveSecs": 7200},
		}},
	}
	b, err := json.Marshal(mc)
	if err != nil {
		panic(err)
	}
	return b
}

func desired(version uint64, deployment string, modules map[string]mod) fleet.DesiredDocument {
	return fleet.DesiredDocument{Version: version, DeploymentID: deployment, ModulesContent: manifest(modules)}
}

// readPid reads <dir>/<module>.pid.
func readPid(dir, module string) int {
	b, err := os.ReadFile(filepath.Join(dir, module+".pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// startLines returns the lines of <dir>/<module>.starts.
func startLines(dir, module string) []string {
	b, err := os.ReadFile(filepath.Join(dir, module+".starts"))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// alive tells whether pid is a live process (not a zombie).
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z'
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// recordingHandler keeps every record, for tests that look at logs.
type recordingHandler struct {
	mu      sync.Mutex
	records []map[string]string
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message}
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	h.mu.Lock()
	h.records = append(h.records, m)
	h.mu.Unlock()
	return nil
}

func (h *recordingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &attrHandler{h: h, attrs: as}
}

func (h *recordingHandler) WithGroup(string) slog.Handler { return h }

// has tells whether a record has the message and the key/value pairs.
func (h *recordingHandler) has(msg string, kv ...string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
next:
	for _, r := range h.records {
		if r["msg"] != msg {
			continue
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if r[kv[i]] != kv[i+1] {
				continue next
			}
		}
		return true
	}
	return false
}

// contains tells whether any record mentions s anywhere.
func (h *recordingHandler) contains(s string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.records {
		for _, v := range r {
			if strings.Contains(v, s) {
				return true
			}
		}
	}
	return false
}

type attrHandler struct {
	h     *recordingHandler
	attrs []slog.Attr
}

func (a *attrHandler) Enabled(context.Context, slog.Level) bool { return true }

func (a *attrHandler) Handle(ctx context.Context, r slog.Record) error {
	r = r.Clone()
	r.AddAttrs(a.attrs...)
	return a.h.Handle(ctx, r)
}

func (a *attrHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &attrHandler{h: a.h, attrs: append(append([]slog.Attr(nil), a.attrs...), as...)}
}

func (a *attrHandler) WithGroup(string) slog.Handler { return a }

// slogTee logs to l and records into rec.
func slogTee(l *slog.Logger, rec *recordingHandler) *slog.Logger {
	return slog.New(teeHandler{l.Handler(), rec})
}

type teeHandler struct{ a, b slog.Handler }

func (t teeHandler) Enabled(ctx context.Context, l slog.Level) bool { return true }

func (t teeHandler) Handle(ctx context.Context, r slog.Record) error {
	_ = t.a.Handle(ctx, r.Clone())
	return t.b.Handle(ctx, r)
}

func (t teeHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return teeHandler{t.a.WithAttrs(as), t.b.WithAttrs(as)}
}

func (t teeHandler) WithGroup(g string) slog.Handler {
	return teeHandler{t.a.WithGroup(g), t.b.WithGroup(g)}
}

// goList runs `go list` with args.
func goList(t testing.TB, args ...string) (string, error) {
	t.Helper()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		gobin = "go"
	}
	b, err := exec.Command(gobin, append([]string{"list"}, args...)...).Output()
	return string(b), err
}
