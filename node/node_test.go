package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testutil"
)

// testWriter sends logs to t.Log until the test ends: the broker's
// goroutines may log a little after Stop returns, and t.Log after the end
// of a test panics.
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

// startNode runs a real node on loopback ports it picks itself, with a real
// raft and bbolt files in dir.
func startNode(t *testing.T, dir string) *Node {
	t.Helper()
	return startNodeWith(t, dir, nil)
}

// startNodeWith is startNode with changes to the configuration. It returns
// once the node is ready (/readyz: log replayed, a leader, devices admitted).
func startNodeWith(t *testing.T, dir string, configure func(*Config)) *Node {
	t.Helper()
	n := newTestNodeWith(t, dir, configure)
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop() })
	waitReady(t, n)
	return n
}

// newTestNode configures, but does not start, the node startNode starts.
func newTestNode(t *testing.T, dir string) *Node {
	t.Helper()
	return newTestNodeWith(t, dir, nil)
}

func newTestNodeWith(t *testing.T, dir string, configure func(*Config)) *Node {
	t.Helper()
	cfg := Config{
		DataDir: dir, NodeID: "n1", HTTPAddr: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0",
		Logger:               slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn})),
		RaftHeartbeatTimeout: 100 * time.Millisecond, RaftElectionTimeout: 100 * time.Millisecond,
		// The API and broker semantics are under test here, over plain
		// TCP; TestTLSByDefault covers the default TLS listeners.
		PlainHTTP: true, PlainMQTT: true,
	}
	if configure != nil {
		configure(&cfg)
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitReady waits until the node answers /readyz with 200: log replayed,
// a leader known, devices admitted.
func waitReady(t *testing.T, n *Node) {
	t.Helper()
	waitFor(t, "node "+n.ID()+" to be ready", func() bool { return n.readyErr() == nil })
}

// waitFor polls cond until it holds (testutil.WaitFor).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, what, cond)
}

func clientFor(n *Node) *api.Client { return &api.Client{BaseURL: n.URL(), Token: n.Token()} }

// rawRequest sends a request and returns status and body, for asserting
// exactly what an HTTP client sees.
func rawRequest(t *testing.T, method, url, token, body string, headers ...string) (int, string, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func TestAPI_DeviceLifecycle(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()

	code, body, hdr := rawRequest(t, "PUT", n.URL()+"/api/v1/devices/press-01", n.Token(),
		`{"tags":{"environment":"prod","site":{"line":3}}}`, "If-None-Match", "*")
	if code != http.StatusCreated {
		t.Fatalf("create: %d %s", code, body)
	}
	var created fleet.Device
	json.Unmarshal([]byte(body), &created)
	keys := created.Authentication.SymmetricKey
	if keys == nil || keys.PrimaryKey == "" || keys.PrimaryKey == keys.SecondaryKey {
		t.Fatalf("creation response lacks two keys: %s", body)
	}
	if hdr.Get("ETag") != `"`+created.Etag+`"` {
		t.Fatalf("ETag header %q, body etag %q", hdr.Get("ETag"), created.Etag)
	}

	// Reads never show keys or their hashes.
	code, body, _ = rawRequest(t, "GET", n.URL()+"/api/v1/devices/press-01", n.Token(), "")
	if code != 200 || strings.Contains(body, keys.PrimaryKey) || strings.Contains(body, "keyHashes") || strings.Contains(body, fleet.HashKey(keys.PrimaryKey)) {
		t.Fatalf("read shows secrets: %d %s", code, body)
	}

	// Creating it again is a conflict; the keys stay.
	if code, body, _ = rawRequest(t, "PUT", n.URL()+"/api/v1/devices/press-01", n.Token(), `{}`, "If-None-Match", "*"); code != http.StatusConflict {
		t.Fatalf("second create: %d %s", code, body)
	}

	// A stale etag gets 412 and changes nothing.
	if _, err := c.PatchDevice(ctx, "press-01", api.DevicePatch{Tags: map[string]any{"x": 1}}, api.WriteOptions{IfMatch: "999"}); !errors.Is(err, fleet.ErrPreconditionFailed) {
		t.Fatalf("stale patch: %v", err)
	}
	d, err := c.PatchDevice(ctx, "press-01", api.DevicePatch{Tags: map[string]any{"environment": nil, "site": map[string]any{"hall": "B"}}}, api.WriteOptions{IfMatch: created.Etag})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := json.Marshal(d.Tags); string(got) != `{"site":{"hall":"B","line":3}}` {
		t.Fatalf("merged tags %s", got)
	}
	if d.Etag == created.Etag || !d.LastUpdatedTimeUTC.After(created.LastUpdatedTimeUTC) && !d.LastUpdatedTimeUTC.Equal(created.LastUpdatedTimeUTC) {
		t.Fatalf("patch did not bump etag: %+v", d)
	}

	// Bad input names the field and stores nothing.
	for _, tc := range []struct{ id, body, field string }{
		{"bad%2Fid", `{}`, "deviceId"},
		{"ok", `{"status":"paused"}`, "status"},
		{"ok", `{"tags":"notanobject"}`, "tags"},
		{"ok", `{"tagz":{}}`, "tagz"},
	} {
		code, body, _ := rawRequest(t, "PUT", n.URL()+"/api/v1/devices/"+tc.id, n.Token(), tc.body)
		var eb api.ErrorBody
		json.Unmarshal([]byte(body), &eb)
		if code != 400 || eb.Error.Field != tc.field {
			t.Errorf("PUT %s %s: %d %s, want 400 naming %s", tc.id, tc.body, code, body, tc.field)
		}
	}
	page, err := c.Devices(ctx, api.DeviceQuery{})
	if err != nil || len(page.Items) != 1 {
		t.Fatalf("devices after bad requests: %+v %v", page, err)
	}

	if err := c.DeleteDevice(ctx, "press-01", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Device(ctx, "press-01", true); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("deleted device: %v", err)
	}
}

// TestAPI_Paging walks every paged list page by page with a small limit:
// each item comes exactly once, in order, and the walk ends. The pages
// with a condition, a label or a category are the ones a broken `after`
// turns into an endless loop (the CLI follows Next until it is empty).
func TestAPI_Paging(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	var prod, all []string
	for i := range 9 {
		id := fmt.Sprintf("d%d", i)
		env := "test"
		if i%3 != 1 {
			env = "prod"
			prod = append(prod, id)
		}
		createDevice(t, c, id, map[string]any{"environment": env})
		all = append(all, id)
	}
	var labelled, deps []string
	for i := range 7 {
		id := fmt.Sprintf("dep%d", i)
		team := "b"
		if i%2 == 0 {
			team = "a"
			labelled = append(labelled, id)
		}
		deps = append(deps, id)
		// Priority decides which one applies; every one targets the prod devices.
		req := api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: int64(i), Labels: map[string]string{"team": team}}
		if _, err := c.PutDeployment(ctx, id, req, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	type page struct {
		ids  []string
		next string
	}
	for _, tc := range []struct {
		name string
		want []string
		get  func(after string) (page, error)
	}{
		{"devices", all, func(after string) (page, error) {
			p, err := c.Devices(ctx, api.DeviceQuery{After: after, Limit: 2})
			return page{deviceIDs(p.Items), p.Next}, err
		}},
		{"devices with a condition", prod, func(after string) (page, error) {
			p, err := c.Devices(ctx, api.DeviceQuery{Condition: "tags.environment='prod'", After: after, Limit: 2})
			return page{deviceIDs(p.Items), p.Next}, err
		}},
		{"devices with a condition, consistent", prod, func(after string) (page, error) {
			p, err := c.Devices(ctx, api.DeviceQuery{Condition: "tags.environment='prod'", After: after, Limit: 4, Consistent: true})
			return page{deviceIDs(p.Items), p.Next}, err
		}},
		{"deployments", deps, func(after string) (page, error) {
			p, err := c.Deployments(ctx, api.DeploymentQuery{After: after, Limit: 3})
			return page{deploymentIDs(p.Items), p.Next}, err
		}},
		{"deployments with a label", labelled, func(after string) (page, error) {
			p, err := c.Deployments(ctx, api.DeploymentQuery{Labels: map[string]string{"team": "a"}, After: after, Limit: 1})
			return page{deploymentIDs(p.Items), p.Next}, err
		}},
		{"a status category", prod, func(after string) (page, error) {
			st, err := c.DeploymentStatus(ctx, "dep6", api.StatusQuery{Category: api.CategoryTargeted, After: after, Limit: 2})
			return page{st.Devices[api.CategoryTargeted], st.Next[api.CategoryTargeted]}, err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var seen []string
			after := ""
			for pages := 0; ; pages++ {
				if pages > len(tc.want) {
					t.Fatalf("still paging after %d pages (seen %v): after= is not honoured", pages, seen)
				}
				p, err := tc.get(after)
				if err != nil {
					t.Fatal(err)
				}
				seen = append(seen, p.ids...)
				if p.next == "" {
					break
				}
				after = p.next
			}
			if !slices.Equal(seen, tc.want) {
				t.Fatalf("paged through %v, want %v", seen, tc.want)
			}
		})
	}
}

func deviceIDs(items []api.DeviceView) []string {
	ids := make([]string, len(items))
	for i, d := range items {
		ids[i] = d.ID
	}
	return ids
}

func deploymentIDs(items []api.DeploymentView) []string {
	ids := make([]string, len(items))
	for i, d := range items {
		ids[i] = d.ID
	}
	return ids
}

const manifest = `{"modulesContent":{
 "$edgeAgent":{"properties.desired":{"schemaVersion":"1.1",
   "runtime":{"type":"docker","settings":{"registryCredentials":{"acr":{"username":"u","password":"hunter2-secret","address":"acr.local"}}}},
   "systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"agent:1"}},
     "edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"hub:1"}}},
   "modules":{"temp":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"temp:1"}}}}},
 "$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{"r":"FROM /messages/* INTO $upstream"},
   "storeAndForwardConfiguration":{"timeToLiveSecs":7200}}}}}`

func TestAPI_DeploymentLifecycle(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()

	req := api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 10, Labels: map[string]string{"team": "a"}}
	dep, err := c.PutDeployment(ctx, "temp-v1", req, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(dep.Content), "hunter2") {
		t.Fatalf("create response shows the registry password: %s", dep.Content)
	}
	code, body, _ := rawRequest(t, "GET", n.URL()+"/api/v1/deployments/temp-v1", n.Token(), "")
	if code != 200 || strings.Contains(body, "hunter2") || !strings.Contains(body, "acr.local") {
		t.Fatalf("read: %d %s", code, body)
	}
	code, body, _ = rawRequest(t, "GET", n.URL()+"/api/v1/deployments", n.Token(), "")
	if code != 200 || strings.Contains(body, "hunter2") {
		t.Fatalf("list: %d %s", code, body)
	}

	// Content is immutable.
	other := strings.Replace(manifest, "temp:1", "temp:2", 1)
	if _, err := c.PutDeployment(ctx, "temp-v1", api.DeploymentRequest{Content: json.RawMessage(other), TargetCondition: "*"}, api.WriteOptions{}); !errors.Is(err, fleet.ErrInvalid) || !strings.Contains(err.Error(), "content") {
		t.Fatalf("changing content: %v", err)
	}
	code, body, _ = rawRequest(t, "PATCH", n.URL()+"/api/v1/deployments/temp-v1", n.Token(), `{"content":`+other+`}`)
	if code != 400 || !strings.Contains(body, `"field": "content"`) {
		t.Fatalf("patching content: %d %s", code, body)
	}

	// Condition, priority and labels change, bumping etag and time.
	time.Sleep(2 * time.Millisecond)
	cond, prio := "tags.environment='prod' AND tags.line='3'", int64(20)
	upd, err := c.PatchDeployment(ctx, "temp-v1", api.DeploymentPatch{TargetCondition: &cond, Priority: &prio, Labels: map[string]string{"stage": "canary"}}, api.WriteOptions{IfMatch: dep.Etag})
	if err != nil {
		t.Fatal(err)
	}
	if upd.TargetCondition != cond || upd.Priority != 20 || upd.Labels["stage"] != "canary" || upd.Labels["team"] != "a" ||
		upd.Etag == dep.Etag || !upd.LastUpdatedTimeUTC.After(dep.LastUpdatedTimeUTC) || !upd.CreatedTimeUTC.Equal(dep.CreatedTimeUTC) {
		t.Fatalf("updated deployment %+v", upd)
	}
	// The old etag is stale now.
	if _, err := c.PatchDeployment(ctx, "temp-v1", api.DeploymentPatch{Priority: &prio}, api.WriteOptions{IfMatch: dep.Etag}); !errors.Is(err, fleet.ErrPreconditionFailed) {
		t.Fatalf("stale If-Match: %v", err)
	}

	// Bad requests name the field or the column.
	for _, tc := range []struct {
		name, id string
		req      api.DeploymentRequest
		field    string
	}{
		{"bad condition", "x1", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.a = "}, "targetCondition"},
		{"negative priority", "x2", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Priority: -1}, "priority"},
		{"uppercase id", "X3", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*"}, "id"},
		{"no content", "x4", api.DeploymentRequest{TargetCondition: "*"}, "content"},
		{"bad restart policy", "x5", api.DeploymentRequest{Content: json.RawMessage(strings.Replace(manifest, `"restartPolicy":"always","settings":{"image":"temp:1"}`, `"restartPolicy":"sometimes","settings":{"image":"temp:1"}`, 1)), TargetCondition: "*"}, "content.modulesContent.$edgeAgent.properties.desired.modules.temp.restartPolicy"},
		{"bad route", "x6", api.DeploymentRequest{Content: json.RawMessage(strings.Replace(manifest, `"FROM /messages/* INTO $upstream"`, `"FROM garbage INTO nowhere blah"`, 1)), TargetCondition: "*"}, "content.modulesContent.$edgeHub.properties.desired.routes.r"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.PutDeployment(ctx, tc.id, tc.req, api.WriteOptions{})
			var ae *api.Error
			if !errors.As(err, &ae) || ae.StatusCode != 400 || ae.Field != tc.field {
				t.Fatalf("err %v, want 400 naming %s", err, tc.field)
			}
		})
	}
	badRoute := strings.Replace(manifest, `"FROM /messages/* INTO $upstream"`, `"FROM /messages/* WHERE temperature > 30 INTO $upstream"`, 1)
	if _, err := c.PutDeployment(ctx, "x7", api.DeploymentRequest{Content: json.RawMessage(badRoute), TargetCondition: "*"}, api.WriteOptions{}); err == nil || !strings.Contains(err.Error(), "routes.r: column 36: invalid operands to operator '>'") {
		t.Fatalf("bad route condition error does not name the route and column: %v", err)
	}
	if tc := "tags.a = "; true {
		_, err := c.PutDeployment(ctx, "x1", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: tc}, api.WriteOptions{})
		if err == nil || !strings.Contains(err.Error(), "column") {
			t.Fatalf("bad condition error does not name the column: %v", err)
		}
	}
	page, err := c.Deployments(ctx, api.DeploymentQuery{})
	if err != nil || len(page.Items) != 1 {
		t.Fatalf("deployments after bad requests: %d %v", len(page.Items), err)
	}
	if p, _ := c.Deployments(ctx, api.DeploymentQuery{Labels: map[string]string{"stage": "canary"}}); len(p.Items) != 1 {
		t.Fatalf("label filter found %d", len(p.Items))
	}
	if p, _ := c.Deployments(ctx, api.DeploymentQuery{Labels: map[string]string{"stage": "prod"}}); len(p.Items) != 0 {
		t.Fatalf("label filter found %d", len(p.Items))
	}
	if err := c.DeleteDeployment(ctx, "temp-v1", api.WriteOptions{IfMatch: "1"}); !errors.Is(err, fleet.ErrPreconditionFailed) {
		t.Fatalf("delete with stale etag: %v", err)
	}
	if err := c.DeleteDeployment(ctx, "temp-v1", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestAPI_Assignments checks what a device's view shows: every deployment
// that targets it, and which one applies (priority, then newest).
func TestAPI_Assignments(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	for id, env := range map[string]string{"p1": "prod", "p2": "prod", "t1": "test"} {
		if _, err := c.PutDevice(ctx, id, api.DeviceRequest{Tags: map[string]any{"environment": env}}, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	put := func(id, cond string, prio int64) {
		t.Helper()
		if _, err := c.PutDeployment(ctx, id, api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: cond, Priority: prio}, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	put("base", "*", 1)
	put("prod-a", "tags.environment='prod'", 10)
	put("prod-b", "tags.environment='prod'", 10) // same priority, newer: applies
	want := map[string]map[string]string{
		"p1": {"base": "Targeted", "prod-a": "Targeted", "prod-b": "Applied"},
		"t1": {"base": "Applied"},
	}
	for dev, w := range want {
		v, err := c.Device(ctx, dev, false)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for k, s := range v.Configurations {
			got[k] = s.Status
		}
		if b1, b2 := mustJSON(got), mustJSON(w); b1 != b2 {
			t.Errorf("%s configurations %s, want %s", dev, b1, b2)
		}
	}
	page, err := c.Devices(ctx, api.DeviceQuery{Condition: "tags.environment='prod'"})
	if err != nil || len(page.Items) != 2 || page.Items[0].ID != "p1" || page.Items[1].ID != "p2" {
		t.Fatalf("condition filter: %+v %v", page.Items, err)
	}
	if _, err := c.Devices(ctx, api.DeviceQuery{Condition: "tags.environment = \"prod\""}); err == nil || !strings.Contains(err.Error(), "single quote") {
		t.Fatalf("double-quoted condition: %v", err)
	}
	dr, err := c.DryRunDeployment(ctx, "prod-c", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 11}, api.DryRunQuery{})
	if err != nil || dr.TargetedCount != 2 || dr.WouldApplyCount != 2 {
		t.Fatalf("dry run %+v %v", dr, err)
	}
	if _, err := c.Deployment(ctx, "prod-c", false); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("dry run stored the deployment: %v", err)
	}
	d, err := c.Deployment(ctx, "prod-b", false)
	if err != nil || d.SystemMetrics.Results["targetedCount"] != 2 || d.SystemMetrics.Results["appliedCount"] != 2 {
		t.Fatalf("prod-b metrics %+v %v", d.SystemMetrics, err)
	}
}

func mustJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

// TestNode_RestartKeepsEverything stops a node and starts another on the
// same data directory: state, token and assignments are back.
func TestNode_RestartKeepsEverything(t *testing.T) {
	dir := t.TempDir()
	n := startNode(t, dir)
	c := clientFor(n)
	ctx := context.Background()
	if _, err := c.PutDevice(ctx, "d1", api.DeviceRequest{Tags: map[string]any{"environment": "prod"}}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutDeployment(ctx, "dep", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'"}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	token := n.Token()
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	n2 := startNode(t, dir)
	if n2.Token() != token {
		t.Fatal("the admin token changed across a restart")
	}
	v, err := clientFor(n2).Device(ctx, "d1", true)
	if err != nil || v.Configurations["dep"].Status != api.StatusApplied {
		t.Fatalf("after restart: %+v %v", v, err)
	}
}

// TestAPI_ConsistentReadsDuringWrites reads with ?consistent=true while
// writes are applied: a consistent read waits for the apply path, which
// must never wait for the read in turn. Every read and every write must
// succeed, and the reads must see the writes land.
func TestAPI_ConsistentReadsDuringWrites(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.PutDevice(ctx, "d0", api.DeviceRequest{}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var writes atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.PutDevice(ctx, fmt.Sprintf("w%d-%d", w, i), api.DeviceRequest{Tags: map[string]any{"i": i}}, api.WriteOptions{}); err != nil {
					t.Errorf("write during consistent reads: %v", err)
					return
				}
				writes.Add(1)
			}
		}()
	}
	seen := 0
	for reads := 0; reads < 50 || seen == 0; reads++ {
		if _, err := c.Device(ctx, "d0", true); err != nil {
			t.Fatalf("consistent read %d: %v", reads, err)
		}
		p, err := c.Devices(ctx, api.DeviceQuery{Consistent: true, Limit: 10, Condition: "*"})
		if err != nil {
			t.Fatalf("consistent list %d: %v", reads, err)
		}
		seen = len(p.Items) - 1
	}
	close(stop)
	wg.Wait()
	t.Logf("%d writes during the reads", writes.Load())
}

func TestMetrics(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	createDevice(t, c, "p1", map[string]any{"environment": "prod"})
	if _, err := c.PutDeployment(ctx, "prod", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'"}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := rawRequest(t, "GET", n.URL()+"/metrics", "", ""); code != http.StatusUnauthorized {
		t.Fatalf("/metrics without the token: %d", code)
	}
	code, body, _ := rawRequest(t, "GET", n.URL()+"/metrics", n.Token(), "")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	for _, want := range []string{
		`appliance_raft_state{state="Leader"} 1`,
		`appliance_devices_connected 0`,
		`appliance_deployment_devices{category="targeted",deployment="prod"} 1`,
		`appliance_deployment_devices{category="applied",deployment="prod"} 1`,
		`appliance_deployment_devices{category="unknown",deployment="prod"} 1`,
		`appliance_deployment_devices{category="healthy",deployment="prod"} 0`,
		`appliance_raft_apply_seconds_count{command="put-deployment"} 1`,
		`appliance_reports_total{outcome="dropped"} 0`,
		`appliance_api_request_seconds_count{code="201",route="PUT /api/v1/deployments/{id}"} 1`,
		`appliance_api_request_seconds_count{code="401",route="GET /metrics"} 1`,
		`appliance_mqtt_refusing_devices 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// Rotating the admin token: the new one works at once, the old one is
// refused, the token file holds the new one, and it stays across a
// restart, even if the file is rolled back to the old token (the
// replicated state wins). The join token the same way.
func TestAPI_RotateAdminToken(t *testing.T) {
	dir := t.TempDir()
	n := startNode(t, dir)
	ctx := context.Background()
	old := n.Token()
	fresh, err := clientFor(n).RotateAdminToken(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fresh == old || len(fresh) < 32 {
		t.Fatalf("new token %q (old %q)", fresh, old)
	}
	check := func(n *Node) {
		t.Helper()
		if code, _, _ := rawRequest(t, "GET", n.URL()+"/api/v1/devices", old, ""); code != http.StatusUnauthorized {
			t.Errorf("old token: %d; want 401", code)
		}
		if code, body, _ := rawRequest(t, "GET", n.URL()+"/api/v1/devices", fresh, ""); code != http.StatusOK {
			t.Errorf("new token: %d %s", code, body)
		}
		if b, err := os.ReadFile(filepath.Join(dir, TokenFile)); err != nil || strings.TrimSpace(string(b)) != fresh {
			t.Errorf("token file holds %q, %v; want the new token", b, err)
		}
	}
	check(n)
	oldJoin := n.JoinToken()
	newJoin, err := (&api.Client{BaseURL: n.URL(), Token: fresh}).RotateJoinToken(ctx)
	if err != nil || newJoin == oldJoin || n.JoinToken() != newJoin {
		t.Fatalf("join token rotation: %q (node has %q), %v", newJoin, n.JoinToken(), err)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	// Files restored from an old copy do not bring the old tokens back.
	if err := os.WriteFile(filepath.Join(dir, TokenFile), []byte(old+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, JoinTokenFile), []byte(oldJoin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	n2 := startNode(t, dir)
	check(n2)
	if b, err := os.ReadFile(filepath.Join(dir, JoinTokenFile)); err != nil || strings.TrimSpace(string(b)) != newJoin || n2.JoinToken() != newJoin {
		t.Errorf("after a restart the join token file holds %q (node %q), %v; want the rotated one", b, n2.JoinToken(), err)
	}
}
