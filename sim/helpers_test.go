package sim_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testutil"
	"appliance/node"
	"appliance/sim"
)

// manifest has one module that runs and one that is stopped.
const manifest = `{"modulesContent":{
 "$edgeAgent":{"properties.desired":{"schemaVersion":"1.1",
   "runtime":{"type":"docker","settings":{}},
   "systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"agent:1"}},
     "edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"hub:1"}}},
   "modules":{
     "temp":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"temp:1"}},
     "spare":{"type":"docker","status":"stopped","restartPolicy":"never","settings":{"image":"spare:1"}}}}},
 "$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{},"storeAndForwardConfiguration":{"timeToLiveSecs":7200}}}}}`

// testWriter sends output to t.Log until the test ends (goroutines may
// write a little after it, and t.Log then panics).
type testWriter struct {
	t    testing.TB
	mu   *sync.Mutex
	done *bool
}

func newTestWriter(t testing.TB) testWriter {
	w := testWriter{t: t, mu: &sync.Mutex{}, done: new(bool)}
	t.Cleanup(func() { w.mu.Lock(); *w.done = true; w.mu.Unlock() })
	return w
}

func (w testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !*w.done {
		w.t.Log(string(bytes.TrimRight(p, "\n")))
	}
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// startNode runs a real single-node controller on loopback ports it picks
// itself and waits until it is ready.
func startNode(t testing.TB) (*node.Node, *api.Client) {
	t.Helper()
	n, err := node.New(node.Config{
		DataDir: t.TempDir(), NodeID: "n1", HTTPAddr: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0",
		Logger:               testLogger(t),
		RaftHeartbeatTimeout: 100 * time.Millisecond, RaftElectionTimeout: 100 * time.Millisecond,
		// The API and broker semantics are under test here, over plain
		// TCP; TestTLSByDefault covers the default TLS listeners.
		PlainHTTP: true, PlainMQTT: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop() })
	c := &api.Client{BaseURL: n.URL(), Token: n.Token()}
	// Ready: a leader known, the log replayed, devices admitted (a node
	// answers "server unavailable" to devices before that).
	waitFor(t, 10*time.Second, "the node ready", func() bool {
		resp, err := http.Get(n.URL() + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return n, c
}

// createEnrollment makes an enrollment whose devices get tags fleet=name.
func createEnrollment(t testing.TB, c *api.Client, name string) string {
	t.Helper()
	e, err := c.PutEnrollment(context.Background(), name, api.EnrollmentRequest{Tags: map[string]any{"fleet": name}}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	return e.Token
}

// runSim starts s in the background; the cleanup stops it and checks that
// Run ended cleanly.
func runSim(t testing.TB, s *sim.Sim) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30s of the cancel")
		}
	})
	return cancel
}

func waitFor(t testing.TB, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	timeout = testutil.Bound(timeout)
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// reported pages through the devices matching condition and decodes each
// one's last reported document (nil when it has none).
func reported(t testing.TB, c *api.Client, condition string) (map[string]*fleet.ReportedDocument, map[string]api.DeviceView) {
	t.Helper()
	docs := map[string]*fleet.ReportedDocument{}
	views := map[string]api.DeviceView{}
	after := ""
	for {
		p, err := c.Devices(context.Background(), api.DeviceQuery{Condition: condition, After: after, Limit: api.MaxPageSize})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range p.Items {
			views[v.ID] = v
			docs[v.ID] = nil
			if v.Reported != nil {
				var d fleet.ReportedDocument
				if err := json.Unmarshal(v.Reported.Document, &d); err != nil {
					t.Fatalf("%s reported %s: %v", v.ID, v.Reported.Document, err)
				}
				docs[v.ID] = &d
			}
		}
		if p.Next == "" {
			return docs, views
		}
		after = p.Next
	}
}

// converged counts the devices whose committed report is code 200 for
// the deployment's current desired version.
func converged(docs map[string]*fleet.ReportedDocument, views map[string]api.DeviceView, deploymentID string) (ok, failed int) {
	for id, d := range docs {
		if d == nil || d.DeploymentID != deploymentID || d.LastDesiredVersion != views[id].DesiredVersion {
			continue
		}
		if d.LastDesiredStatus.Code == fleet.StatusCodeOK {
			ok++
		} else {
			failed++
		}
	}
	return ok, failed
}

func condition(fleetName string) string { return fmt.Sprintf("tags.fleet='%s'", fleetName) }
