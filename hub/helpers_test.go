package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/edgeclient"
	"appliance/internal/testlog"
	"appliance/routing"
	"appliance/workload"
)

const (
	testDevice = "press-01"
	testHubID  = "appliance-hub"
)

// recordingUpstream stands in for the agent's controller session, which
// cannot exist in this package's tests (the agent's tests use the real
// broker): it keeps the batches it is given, or fails while offline.
type recordingUpstream struct {
	mu      sync.Mutex
	offline bool
	batches []fleet.UpstreamBatch
	raw     [][]byte
}

var errOffline = errors.New("controller unreachable")

func (u *recordingUpstream) PublishUpstream(_ context.Context, batch []byte) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.offline {
		return errOffline
	}
	b, err := fleet.DecodeUpstreamBatch(batch)
	if err != nil {
		return err
	}
	u.batches = append(u.batches, b)
	u.raw = append(u.raw, batch)
	return nil
}

func (u *recordingUpstream) setOffline(off bool) {
	u.mu.Lock()
	u.offline = off
	u.mu.Unlock()
}

func (u *recordingUpstream) messages() []fleet.UpstreamMessage {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []fleet.UpstreamMessage
	for _, b := range u.batches {
		out = append(out, b.Messages...)
	}
	return out
}

// testHub is a hub serving TLS on 127.0.0.1:0 with a real workload service.
type testHub struct {
	t    testing.TB
	dir  string
	ws   *workload.Service
	h    *Hub
	up   *recordingUpstream
	addr string
	cfg  Config
}

type hubOption func(*Config)

func withLimits(l Limits) hubOption { return func(c *Config) { c.Limits = l } }

func startHub(t testing.TB, dir string, opts ...hubOption) *testHub {
	t.Helper()
	ws, err := workload.Open(workload.Config{Dir: dir + "/workload", DeviceID: testDevice, HubName: testHubID, ServerNames: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	up := &recordingUpstream{}
	cfg := Config{
		DeviceID: testDevice, Listen: []string{"127.0.0.1:0"}, TLS: ws.TLSConfig(), Auth: ws, Dir: dir,
		Upstream: up, Logger: testlog.New(t, slog.LevelDebug), SweepInterval: 100 * time.Millisecond,
	}
	for _, o := range opts {
		o(&cfg)
	}
	h, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.Start(context.Background())
	th := &testHub{t: t, dir: dir, ws: ws, h: h, up: up, cfg: cfg}
	t.Cleanup(th.stop)
	waitFor(t, 5*time.Second, "the hub to listen", func() bool { return len(h.Addrs()) == 1 })
	th.addr = h.Addrs()[0]
	return th
}

func (th *testHub) stop() {
	if th.h != nil {
		th.h.Close()
		th.h = nil
	}
	th.ws.Close()
}

// configure applies routes (name → route text, or a route object's JSON
// when it starts with '{') and the modules.
func (th *testHub) configure(routes map[string]string, modules ...string) {
	th.t.Helper()
	obj := map[string]json.RawMessage{}
	for name, r := range routes {
		if strings.HasPrefix(r, "{") {
			obj[name] = json.RawMessage(r)
		} else {
			obj[name], _ = json.Marshal(r)
		}
	}
	raw, _ := json.Marshal(obj)
	rs, err := routing.ParseRoutes(raw)
	if err != nil {
		th.t.Fatal(err)
	}
	if _, err := th.ws.Sync(modules); err != nil {
		th.t.Fatal(err)
	}
	th.h.Configure(Configuration{Routes: rs, Modules: modules})
}

// moduleConfig is how a module connects (MQTT 3.1.1 unless changed).
func (th *testHub) moduleConfig(module string) edgeclient.Config {
	th.t.Helper()
	tok, err := th.ws.Token(module, time.Hour)
	if err != nil {
		th.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(th.ws.TrustBundle())
	return edgeclient.Config{
		Addr: th.addr, TLS: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"},
		ClientID: testDevice + "/" + module, Username: testHubID + "/" + testDevice + "/" + module + "/?api-version=2019-10-01",
		Password: tok,
	}
}

func (th *testHub) connect(module string, edit ...func(*edgeclient.Config)) *edgeclient.Module {
	th.t.Helper()
	cfg := th.moduleConfig(module)
	for _, e := range edit {
		e(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := edgeclient.ConnectModule(ctx, cfg, testDevice, module)
	if err != nil {
		th.t.Fatalf("connect %s: %v", module, err)
	}
	th.t.Cleanup(func() { m.Close() })
	return m
}

func mqtt5(c *edgeclient.Config)   { c.Version = 5 }
func persist(c *edgeclient.Config) { c.CleanSession = false }
func clean(c *edgeclient.Config)   { c.CleanSession = true }

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// receive reads n input messages (or fails after the timeout).
func receive(t testing.TB, m *edgeclient.Module, n int, timeout time.Duration) []edgeclient.Input {
	t.Helper()
	var out []edgeclient.Input
	deadline := time.After(timeout)
	for len(out) < n {
		select {
		case msg := <-m.Messages():
			if in, ok := m.ParseInput(msg); ok {
				out = append(out, in)
			}
		case <-deadline:
			t.Fatalf("%s received %d input messages of %d", m.Name, len(out), n)
		}
	}
	return out
}

// nothing asserts that m receives no input message for d.
func nothing(t testing.TB, m *edgeclient.Module, d time.Duration) {
	t.Helper()
	select {
	case msg := <-m.Messages():
		t.Fatalf("%s received %s %q", m.Name, msg.Topic, msg.Payload)
	case <-time.After(d):
	}
}

func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
