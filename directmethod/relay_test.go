package directmethod

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"appliance/api"
	"appliance/broker"
	"appliance/fleet"
	"appliance/history"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// hubDevice stands in for the broker and the device hubs behind it: a
// Relay's tests run without a node, so the devices connected "here" are
// a map and each answers as its function says (nil: it never answers).
// The node's tests (node/hub_test.go) run the same calls through the real
// broker and an MQTT device.
type hubDevice struct {
	relay      *Relay
	publishErr error
	answer     func(req fleet.MethodRequest) *fleet.MethodResponse
	sent       chan fleet.MethodRequest
}

type testBroker struct{ devices map[string]*hubDevice }

func (b *testBroker) Connected(id string) bool { _, ok := b.devices[id]; return ok }

func (b *testBroker) PublishMethod(id string, payload []byte) error {
	d, ok := b.devices[id]
	if !ok {
		return broker.ErrNotConnected
	}
	if d.publishErr != nil {
		return d.publishErr
	}
	var req fleet.MethodRequest
	if err := json.Unmarshal(payload, &req); err != nil {
		return err
	}
	if d.sent != nil {
		d.sent <- req
	}
	if resp := d.answer(req); resp != nil {
		resp.ID = req.ID
		b, _ := json.Marshal(resp)
		go d.relay.MethodResponse(id, b) // the answer comes on the broker's goroutine
	}
	return nil
}

// testCluster is the members of a cluster of Relays, each behind a real
// HTTP server for its cluster-port paths.
type testCluster struct {
	mu       sync.Mutex
	members  []raftstore.Member
	sessions map[string]string // device -> the member holding it
}

func (c *testCluster) SessionNode(_ context.Context, id string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.sessions[id]
	return n, ok
}

func (c *testCluster) Members(context.Context) ([]raftstore.Member, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members, nil
}

func (c *testCluster) PostJSON(ctx context.Context, addr, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// testHistory keeps what a Relay records.
type testHistory struct {
	mu    sync.Mutex
	items []history.Item
}

func (h *testHistory) Add(items ...history.Item) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.items = append(h.items, items...)
}

func (h *testHistory) restarts(device string) []fleet.HistoryEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []fleet.HistoryEvent
	for _, it := range h.items {
		if it.Device == device && it.Event.Kind == fleet.HistoryModuleRestarted {
			out = append(out, it.Event)
		}
	}
	return out
}

type member struct {
	relay   *Relay
	broker  *testBroker
	history *testHistory
}

// startCluster starts a Relay per node id, each serving its cluster-port
// paths over HTTP; known are the devices that exist.
func startCluster(t *testing.T, known []string, ids ...string) (*testCluster, map[string]*member) {
	t.Helper()
	c := &testCluster{sessions: map[string]string{}}
	out := map[string]*member{}
	for _, id := range ids {
		m := &member{broker: &testBroker{devices: map[string]*hubDevice{}}, history: &testHistory{}}
		m.relay = New(Config{
			NodeID: id, Broker: m.broker, Cluster: c, History: m.history, Actor: "admin",
			AppliedIndex: func() uint64 { return 42 },
			Lookup: func(_ context.Context, device string) error {
				for _, k := range known {
					if k == device {
						return nil
					}
				}
				return fmt.Errorf("device %s: %w", device, fleet.ErrNotFound)
			},
			Stopping: testutil.Context(t),
			Logger:   testlog.New(t, slog.LevelWarn),
		})
		mux := http.NewServeMux()
		mux.HandleFunc("POST "+CallPath, m.relay.ServeCall)
		mux.HandleFunc("POST "+EventPath, m.relay.ServeEvent)
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		c.members = append(c.members, raftstore.Member{ID: id, Address: strings.TrimPrefix(srv.URL, "http://")})
		out[id] = m
	}
	return c, out
}

// connect puts a device's session on a member.
func (c *testCluster) connect(m *member, node, device string, d *hubDevice) {
	d.relay = m.relay
	m.broker.devices[device] = d
	c.mu.Lock()
	c.sessions[device] = node
	c.mu.Unlock()
}

// TestRelay_Invoke_Outcomes: a call to a device whose session is here,
// and the same call through the member holding it, reach the device with
// the module, method, payload and timeouts asked, and end the same way:
// the module's status and payload, or what the hub answered for the
// module (404 not connected, 504 timeout, 400 refused, another status
// unavailable), a device without methods or gone not connected, an
// unknown device not found, a bad request invalid before anything is
// sent, a caller that gives up a timeout.
func TestRelay_Invoke_Outcomes(t *testing.T) {
	hub := func(req fleet.MethodRequest) *fleet.MethodResponse {
		switch req.Module {
		case "filter":
			return &fleet.MethodResponse{Status: 201, Payload: json.RawMessage(fmt.Sprintf(`{"method":%q,"got":%s,"timeout":%d}`, req.Method, req.Payload, req.ResponseTimeoutSeconds))}
		case "asleep":
			return &fleet.MethodResponse{Status: fleet.MethodStatusTimeout, Error: "the module did not answer within 5 s"}
		case "picky":
			return &fleet.MethodResponse{Status: fleet.MethodStatusBadRequest, Error: "payload is not an object"}
		case "broken":
			return &fleet.MethodResponse{Status: 500, Error: "the hub failed"}
		case "silent":
			return nil
		}
		return &fleet.MethodResponse{Status: fleet.MethodStatusNotConnected, Error: "module " + req.Module + " is not connected"}
	}
	tests := []struct {
		name, device, module string
		req                  api.MethodRequest
		giveUp               bool  // the caller gives up before any answer
		want                 error // and through a peer, unless wantPeer
		wantPeer             error
		wantPayload          string
	}{
		{name: "answered", device: "press-01", module: "filter", req: api.MethodRequest{Payload: json.RawMessage(`{"level":3}`), ResponseTimeoutSeconds: 7},
			wantPayload: `{"method":"reset","got":{"level":3},"timeout":7}`},
		{name: "module not connected", device: "press-01", module: "sleeper", want: api.ErrNotConnected},
		{name: "module timed out", device: "press-01", module: "asleep", want: api.ErrTimeout},
		{name: "hub refused the payload", device: "press-01", module: "picky", want: fleet.ErrInvalid},
		{name: "hub failed", device: "press-01", module: "broken", want: api.ErrUnavailable},
		{name: "caller gave up", device: "press-01", module: "silent", giveUp: true, want: api.ErrTimeout, wantPeer: api.ErrUnavailable},
		{name: "agent takes no methods", device: "press-02", module: "filter", want: api.ErrNotConnected},
		{name: "device offline", device: "press-03", module: "filter", want: api.ErrNotConnected},
		{name: "unknown device", device: "press-99", module: "filter", want: fleet.ErrNotFound},
		{name: "no module", device: "press-01", module: "", want: fleet.ErrInvalid},
		{name: "timeout out of range", device: "press-01", module: "filter", req: api.MethodRequest{ResponseTimeoutSeconds: 1}, want: fleet.ErrInvalid},
	}
	for _, where := range []string{"here", "through a peer"} {
		t.Run(where, func(t *testing.T) {
			c, ms := startCluster(t, []string{"press-01", "press-02", "press-03"}, "n1", "n2")
			holder := ms["n1"]
			if where != "here" {
				holder = ms["n2"]
			}
			sent := make(chan fleet.MethodRequest, 1)
			c.connect(holder, holder.relay.cfg.NodeID, "press-01", &hubDevice{answer: hub, sent: sent})
			c.connect(holder, holder.relay.cfg.NodeID, "press-02", &hubDevice{publishErr: broker.ErrMethodsNotSubscribed})
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					ctx := testutil.Context(t)
					if tc.giveUp {
						var cancel context.CancelFunc
						ctx, cancel = context.WithCancel(ctx)
						go func() { <-sent; cancel() }()
					}
					res, err := ms["n1"].relay.Invoke(ctx, tc.device, tc.module, "reset", tc.req)
					want := tc.want
					if where != "here" && tc.wantPeer != nil {
						want = tc.wantPeer
					}
					if want != nil {
						if !errors.Is(err, want) {
							t.Fatalf("%+v, %v; want %v", res, err, want)
						}
						t.Logf("%v", err)
						return
					}
					var payload bytes.Buffer
					_ = json.Compact(&payload, res.Payload)
					if err != nil || res.Status != 201 || payload.String() != tc.wantPayload {
						t.Fatalf("%+v %s, %v", res, payload.String(), err)
					}
				})
				select {
				case <-sent: // a call the device got and the test did not wait for
				default:
				}
			}
		})
	}
}

// TestRelay_MethodResponse_LateOrTwice: an answer for no call in flight
// (late, or never asked) and a second answer to a call are dropped, and
// a call still gets its first answer.
func TestRelay_MethodResponse_LateOrTwice(t *testing.T) {
	c, ms := startCluster(t, []string{"press-01"}, "n1")
	m := ms["n1"]
	m.relay.MethodResponse("press-01", []byte(`{"id":"nobody-asked","status":200}`))
	m.relay.MethodResponse("press-01", []byte(`not json`))
	c.connect(m, "n1", "press-01", &hubDevice{answer: func(req fleet.MethodRequest) *fleet.MethodResponse {
		first, _ := json.Marshal(fleet.MethodResponse{ID: req.ID, Status: 200, Payload: json.RawMessage(`"first"`)})
		m.relay.MethodResponse("press-01", first)
		return &fleet.MethodResponse{Status: 500, Payload: json.RawMessage(`"second"`)}
	}})
	res, err := m.relay.Invoke(testutil.Context(t), "press-01", "filter", "reset", api.MethodRequest{})
	if err != nil || res.Status != 200 || string(res.Payload) != `"first"` {
		t.Fatalf("%+v, %v", res, err)
	}
}

// TestRelay_ModuleRestartInEveryHistory: a RestartModule the agent answers
// 200, called through one member for a device on another, is in the
// device's history on every member, at the index the relaying member had
// applied; one the agent refuses is in none; a malformed event from a
// peer is refused.
func TestRelay_ModuleRestartInEveryHistory(t *testing.T) {
	c, ms := startCluster(t, []string{"press-01"}, "n1", "n2", "n3")
	c.connect(ms["n2"], "n2", "press-01", &hubDevice{answer: func(req fleet.MethodRequest) *fleet.MethodResponse {
		var r fleet.RestartModuleRequest
		_ = json.Unmarshal(req.Payload, &r)
		if r.ID == "filter" {
			return &fleet.MethodResponse{Status: 200}
		}
		return &fleet.MethodResponse{Status: 404, Payload: json.RawMessage(`{"message":"Module ` + r.ID + ` not found in the current environment"}`)}
	}})
	ctx := testutil.Context(t)
	for _, mod := range []string{"ghost", "filter"} {
		res, err := ms["n1"].relay.Invoke(ctx, "press-01", fleet.EdgeAgentModule, "restartModule", api.MethodRequest{Payload: json.RawMessage(`{"schemaVersion":"1.0","id":"` + mod + `"}`)})
		if err != nil {
			t.Fatalf("restart %s: %+v, %v", mod, res, err)
		}
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		testutil.WaitFor(t, "the restart in "+id+"'s history", func() bool { return len(ms[id].history.restarts("press-01")) > 0 })
		if got := ms[id].history.restarts("press-01"); len(got) != 1 || got[0].Actor != "admin" || got[0].Index != 42 || !strings.Contains(got[0].What, "module filter restarted") {
			t.Fatalf("%s: %+v", id, got)
		}
	}
	for _, body := range []string{`{`, `{"device":"has space","event":{"kind":"moduleRestarted"}}`, `{"device":"press-01","event":{}}`} {
		resp, err := http.Post("http://"+c.members[1].Address+EventPath, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("event %s: %s", body, resp.Status)
		}
	}
	if got := ms["n2"].history.restarts("press-01"); len(got) != 1 {
		t.Fatalf("n2 after malformed events: %+v", got)
	}
}
