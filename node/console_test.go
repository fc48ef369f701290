package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/fleet"
)

// putDeployment creates a deployment of the shared test manifest.
func putDeployment(t *testing.T, c *api.Client, id, cond string, priority int64) {
	t.Helper()
	_, err := c.PutDeployment(context.Background(), id, api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: cond, Priority: priority}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
}

// report connects a device and publishes a reported document for it.
func report(t *testing.T, n *Node, id, key, doc string) {
	t.Helper()
	d, err := connectDevice(t, n.MQTTAddr(), id, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.Publish(context.Background(), &paho.Publish{Topic: fleet.ReportedTopic(id), QoS: 1, Payload: []byte(doc)}); err != nil {
		t.Fatal(err)
	}
}

// createFleet creates three prod devices (p3 in the canary ring), a test
// device and, with loose, one without tags; it returns their keys.
func createFleet(t *testing.T, c *api.Client, loose bool) map[string]string {
	t.Helper()
	tags := map[string]map[string]any{
		"p1": {"environment": "prod"},
		"p2": {"environment": "prod"},
		"p3": {"environment": "prod", "ring": "canary"},
		"t1": {"environment": "test"},
	}
	if loose {
		tags["loose"] = nil
	}
	keys := map[string]string{}
	for id, tt := range tags {
		keys[id] = createDevice(t, c, id, tt)
	}
	return keys
}

func runningReport(deployment string, started time.Time) string {
	return fmt.Sprintf(`{"deploymentId":%q,"lastDesiredStatus":{"code":200},"modules":{"temp":{"runtimeStatus":"running","status":"running","lastStartTimeUtc":%q,"exitCode":0,"restartCount":0,"settings":{}}}}`,
		deployment, started.Format(time.RFC3339Nano))
}

// TestConsole_Overview: two deployments target the same prod devices; the
// overview counts each device once by connection and once by health, and
// each deployment once by state, and the numbers agree with the devices'
// own views and the deployments' statuses.
func TestConsole_Overview(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	old := time.Now().UTC().Add(-time.Hour)
	keys := createFleet(t, c, true)
	putDeployment(t, c, "prod", "tags.environment='prod'", 1)
	putDeployment(t, c, "canary", "tags.ring='canary'", 5)
	putDeployment(t, c, "prod-too", "tags.environment='prod'", 0) // targets prod, applies nowhere
	putDeployment(t, c, "nothing", "tags.environment='lab'", 9)
	report(t, n, "p1", keys["p1"], runningReport("prod", old))
	report(t, n, "p2", keys["p2"], `{"deploymentId":"prod","lastDesiredStatus":{"code":500},"modules":{}}`)
	report(t, n, "p3", keys["p3"], runningReport("canary", old))

	// The two devices that never connected are offline (never heard from).
	want := api.OverviewDevices{Total: 5, Connected: 3, Disconnected: 2, Offline: 2, Health: map[string]int{
		api.CategoryHealthy: 2, api.CategorySoaking: 0, api.CategoryUnhealthy: 1, api.CategoryUnknown: 0, api.HealthNone: 2,
	}}
	var o api.Overview
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if o, err = c.Overview(ctx); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(o.Devices) == fmt.Sprint(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if fmt.Sprint(o.Devices) != fmt.Sprint(want) {
		t.Fatalf("devices %+v, want %+v", o.Devices, want)
	}
	states := map[string]int{api.StateFailing: 1, api.StateConverging: 0, api.StateHealthy: 1, api.StateSuperseded: 1, api.StateIdle: 1}
	if o.Deployments.Total != 4 || fmt.Sprint(o.Deployments.States) != fmt.Sprint(states) {
		t.Fatalf("deployments %+v, want 4 in states %v", o.Deployments, states)
	}
	// The same numbers from the other reads: every device's own health and
	// connection, every deployment's status.
	page, err := c.Devices(ctx, api.DeviceQuery{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	health, connected := map[string]int{}, 0
	for _, d := range page.Items {
		health[d.Health]++
		if d.ConnectionState == api.Connected {
			connected++
		}
	}
	for _, h := range api.HealthStates {
		if health[h] != o.Devices.Health[h] {
			t.Errorf("devices with health %s: %d in the list, %d in the overview", h, health[h], o.Devices.Health[h])
		}
	}
	if connected != o.Devices.Connected || page.Total == nil || *page.Total != o.Devices.Total {
		t.Errorf("list: %d connected, total %v; overview %+v", connected, page.Total, o.Devices)
	}
	for _, s := range o.Deployments.Items {
		st, err := c.DeploymentStatus(ctx, s.ID, api.StatusQuery{})
		if err != nil {
			t.Fatal(err)
		}
		if st.Counts != s.Counts {
			t.Errorf("%s: overview counts %+v, status %+v", s.ID, s.Counts, st.Counts)
		}
	}
	// Recent history: the four creations, newest first.
	var recent []string
	for _, e := range o.Recent {
		recent = append(recent, e.Subject+" "+e.Kind)
	}
	if strings.Join(recent, ",") != "nothing created,prod-too created,canary created,prod created" {
		// The history is written asynchronously: wait for it.
		eventually(t, "recent history", func() bool {
			o, _ = c.Overview(ctx)
			recent = recent[:0]
			for _, e := range o.Recent {
				recent = append(recent, e.Subject+" "+e.Kind)
			}
			return strings.Join(recent, ",") == "nothing created,prod-too created,canary created,prod created"
		})
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitFor(t, what, cond)
}

func TestConsole_CheckCondition(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	for _, id := range []string{"a1", "a2", "b1"} {
		createDevice(t, c, id, map[string]any{"line": id[:1]})
	}
	tests := []struct {
		req     api.ConditionRequest
		valid   bool
		matches int // -1: not given
		column  int
		message string
	}{
		{api.ConditionRequest{Condition: "tags.line='a'"}, true, 2, 0, ""},
		{api.ConditionRequest{Condition: "*", Kind: api.ConditionTarget}, true, 3, 0, ""},
		{api.ConditionRequest{Condition: ""}, true, 0, 0, "targets no device"},
		{api.ConditionRequest{Condition: "tags.line='a' AND"}, false, -1, 18, "end"},
		{api.ConditionRequest{Condition: "tags.line = 'a' AND properties.reported.x = 1"}, false, -1, 21, "properties"},
		{api.ConditionRequest{Condition: "properties.reported.lastDesiredStatus.code = 200", Kind: api.ConditionMetric}, true, -1, 0, ""},
		// Azure's SELECT form: the column points into the query as written.
		{api.ConditionRequest{Condition: "SELECT deviceId FROM devices WHERE properties.reported.x = = 1", Kind: api.ConditionMetric}, false, -1, 60, "after '='"},
		{api.ConditionRequest{Condition: "  ", Kind: api.ConditionMetric}, false, -1, 0, "empty"},
	}
	for _, tt := range tests {
		got, err := c.CheckCondition(ctx, tt.req)
		if err != nil {
			t.Fatalf("%+v: %v", tt.req, err)
		}
		matches := -1
		if got.Matches != nil {
			matches = *got.Matches
		}
		if got.Valid != tt.valid || matches != tt.matches || got.Column != tt.column || !strings.Contains(got.Message, tt.message) {
			t.Errorf("%+v: got %+v (matches %d), want valid %v, matches %d, column %d, message with %q",
				tt.req, got, matches, tt.valid, tt.matches, tt.column, tt.message)
		}
	}
	_, err := c.CheckCondition(ctx, api.ConditionRequest{Condition: "*", Kind: "sql"})
	var apiErr *api.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Field != "kind" {
		t.Fatalf("unknown kind: %v", err)
	}
}

// TestConsole_ExpandManifest: a template expands with the variables sent,
// never with the node's own environment, and the result is what the CLI
// would send.
func TestConsole_ExpandManifest(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	t.Setenv("NODE_SECRET", "from-the-node")
	template := `{
  "content": {"modulesContent": {
    "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1",
      "runtime": {"type": "docker", "settings": {"registryCredentials": {"acr": {"username": "u", "password": "$ACR_PASSWORD", "address": "acr.local"}}}},
      "systemModules": {"edgeAgent": {"type": "docker", "settings": {"image": "agent:1"}},
        "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "hub:1"}}},
      "modules": {"temp": {"type": "docker", "status": "running", "restartPolicy": "always",
        "settings": {"image": "${IMAGE}", "createOptions": {"HostConfig": {"Privileged": false}}}}}}},
    "$edgeHub": {"properties.desired": {"schemaVersion": "1.1", "routes": {}, "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}},
  "targetCondition": "tags.line='a'",
  "priority": 7
}`
	res, err := c.ExpandManifest(ctx, api.ManifestRequest{Manifest: template, Env: "ACR_PASSWORD=s3cret\nIMAGE=temp:2\n"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Placeholders, []string{"ACR_PASSWORD", "IMAGE"}) {
		t.Errorf("placeholders %v", res.Placeholders)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, res.Content); err != nil {
		t.Fatal(err)
	}
	body := compact.String()
	if !strings.HasPrefix(body, `{"modulesContent":`) || !strings.Contains(body, `"password":"s3cret"`) ||
		!strings.Contains(body, `temp:2`) || !strings.Contains(body, `"createOptions":"{\"HostConfig\":{\"Privileged\":false}}"`) {
		t.Errorf("content %s", body)
	}
	if res.Configuration == nil || res.Configuration.TargetCondition == nil || *res.Configuration.TargetCondition != "tags.line='a'" ||
		res.Configuration.Priority == nil || *res.Configuration.Priority != 7 {
		t.Errorf("configuration %+v", res.Configuration)
	}
	// What it returns is accepted as it is.
	if _, err := c.DryRunDeployment(ctx, "from-template", api.DeploymentRequest{Content: res.Content, TargetCondition: "*"}, api.DryRunQuery{}); err != nil {
		t.Errorf("expanded content refused: %v", err)
	}

	for _, tt := range []struct {
		req         api.ManifestRequest
		field, want string
	}{
		{api.ManifestRequest{Manifest: strings.Replace(template, "$ACR_PASSWORD", "$NODE_SECRET", 1), Env: "IMAGE=x"}, "manifest", "NODE_SECRET"},
		{api.ManifestRequest{Manifest: template, Env: "ACR_PASSWORD=x\nnot a line\n"}, "env", "line 2"},
		{api.ManifestRequest{Manifest: `{"modulesContent": {`}, "manifest", "line 1"},
		{api.ManifestRequest{Manifest: `{"modules": {}}`}, "manifest", "modulesContent"},
		{api.ManifestRequest{Manifest: "  "}, "manifest", "empty"},
	} {
		_, err := c.ExpandManifest(ctx, tt.req)
		var apiErr *api.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Field != tt.field || !strings.Contains(apiErr.Message, tt.want) {
			t.Errorf("%q: %v, want a 400 on %s mentioning %q", tt.req.Manifest[:min(len(tt.req.Manifest), 30)], err, tt.field, tt.want)
		}
		if err != nil && strings.Contains(err.Error(), "from-the-node") {
			t.Errorf("the node's environment leaked: %v", err)
		}
	}
}

// TestConsole_DryRuns: create, update and delete previews list the devices
// and where each group of them would move, and change nothing.
func TestConsole_DryRuns(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	createFleet(t, c, false)
	putDeployment(t, c, "prod", "tags.environment='prod'", 1)
	putDeployment(t, c, "canary", "tags.ring='canary'", 5)
	type move struct {
		from, to string
		devices  string
	}
	moves := func(r api.DryRunResult) []move {
		var out []move
		for _, m := range r.Moves {
			if m.Count != len(m.Devices) {
				t.Errorf("move %+v: count and devices disagree", m)
			}
			out = append(out, move{m.From, m.To, strings.Join(m.Devices, ",")})
		}
		return out
	}

	// A new deployment over everything at priority 3: it takes p1, p2 from
	// prod and t1 from none; p3 stays with canary.
	r, err := c.DryRunDeployment(ctx, "all", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Priority: 3}, api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if r.TargetedCount != 4 || r.WouldApplyCount != 3 || strings.Join(r.TargetedDevices, ",") != "p1,p2,p3,t1" || strings.Join(r.WouldApplyDevices, ",") != "p1,p2,t1" ||
		fmt.Sprint(moves(r)) != fmt.Sprint([]move{{"prod", "all", "p1,p2"}, {"", "all", "t1"}}) {
		t.Errorf("create: %+v, moves %v", r, moves(r))
	}
	// Updating canary to priority 0: p3 goes back to prod.
	zero := int64(0)
	r, err = c.DryRunPatchDeployment(ctx, "canary", api.DeploymentPatch{Priority: &zero}, api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if r.TargetedCount != 1 || r.WouldApplyCount != 0 || fmt.Sprint(moves(r)) != fmt.Sprint([]move{{"canary", "prod", "p3"}}) {
		t.Errorf("lower priority: %+v, moves %v", r, moves(r))
	}
	// Updating prod's condition to test devices only: p1, p2 lose it (to
	// none), t1 gains it.
	cond := "tags.environment='test'"
	r, err = c.DryRunPatchDeployment(ctx, "prod", api.DeploymentPatch{TargetCondition: &cond}, api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if r.TargetedCount != 1 || r.WouldApplyCount != 1 || fmt.Sprint(moves(r)) != fmt.Sprint([]move{{"prod", "", "p1,p2"}, {"", "prod", "t1"}}) {
		t.Errorf("new condition: %+v, moves %v", r, moves(r))
	}
	// Deleting canary: p3 goes to prod.
	r, err = c.DryRunDeleteDeployment(ctx, "canary", api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if r.TargetedCount != 1 || fmt.Sprint(moves(r)) != fmt.Sprint([]move{{"canary", "prod", "p3"}}) {
		t.Errorf("delete: %+v, moves %v", r, moves(r))
	}
	// Nothing changed.
	for id, want := range map[string]int{"prod": 2, "canary": 1} {
		d, err := c.Deployment(ctx, id, false)
		if err != nil || d.SystemMetrics.Results["appliedCount"] != want || d.Priority == 0 && id == "canary" {
			t.Errorf("%s after the dry runs: %+v %v", id, d, err)
		}
	}
	// Errors as the real writes give them.
	bad := "tags.x ="
	for name, err := range map[string]error{
		"bad condition": func() error {
			_, err := c.DryRunPatchDeployment(ctx, "prod", api.DeploymentPatch{TargetCondition: &bad}, api.DryRunQuery{})
			return err
		}(),
		"content": func() error {
			_, err := c.DryRunPatchDeployment(ctx, "prod", api.DeploymentPatch{Content: json.RawMessage(manifest)}, api.DryRunQuery{})
			return err
		}(),
		"missing patch": func() error {
			_, err := c.DryRunPatchDeployment(ctx, "nope", api.DeploymentPatch{}, api.DryRunQuery{})
			return err
		}(),
		"missing del": func() error { _, err := c.DryRunDeleteDeployment(ctx, "nope", api.DryRunQuery{}); return err }(),
	} {
		wantErr := fleet.ErrInvalid
		if strings.HasPrefix(name, "missing") {
			wantErr = fleet.ErrNotFound
		}
		if !errors.Is(err, wantErr) {
			t.Errorf("%s: %v, want %v", name, err, wantErr)
		}
	}
}

// TestConsole_DeviceView: a device read says why each deployment that
// targets it wins or loses, and the device's health; the list searches by
// id prefix and gives totals.
func TestConsole_DeviceView(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "press-1", map[string]any{"environment": "prod", "ring": "canary"})
	for _, id := range []string{"press-10", "press-2", "pump-1", "press"} {
		createDevice(t, c, id, map[string]any{"environment": "prod"})
	}
	putDeployment(t, c, "prod", "tags.environment='prod'", 1)
	putDeployment(t, c, "canary", "tags.ring='canary'", 5)
	putDeployment(t, c, "prod-newer", "tags.environment='prod'", 1)

	d, err := c.Device(ctx, "press-1", false)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range d.Precedence {
		got = append(got, fmt.Sprintf("%s %s %s", p.Deployment, p.Status, p.DecidedBy))
	}
	if strings.Join(got, "; ") != "canary Applied priority; prod-newer Targeted priority; prod Targeted priority" {
		t.Fatalf("precedence %v", got)
	}
	if !strings.Contains(d.Precedence[0].Reason, "highest priority (5") || !strings.Contains(d.Precedence[2].Reason, "loses to canary: lower priority (1 < 5)") {
		t.Errorf("reasons %+v", d.Precedence)
	}
	if d.Health != api.CategoryUnknown {
		t.Errorf("health before any report %q", d.Health)
	}
	// Without the canary tag, the two prod deployments tie on priority:
	// the newer one wins.
	if _, err := c.PatchDevice(ctx, "press-1", api.DevicePatch{Tags: map[string]any{"ring": nil}}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	d, err = c.Device(ctx, "press-1", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Precedence) != 2 || d.Precedence[0].Deployment != "prod-newer" || d.Precedence[0].DecidedBy != "created" ||
		!strings.Contains(d.Precedence[1].Reason, "loses to prod-newer: same priority (1), created earlier") {
		t.Fatalf("tie on priority: %+v", d.Precedence)
	}
	report(t, n, "press-1", key, runningReport("prod-newer", time.Now().UTC()))
	eventually(t, "press-1 soaking", func() bool {
		d, err = c.Device(ctx, "press-1", false)
		return err == nil && d.Health == api.CategorySoaking
	})
	// Lists carry no precedence (it costs a read per deployment).
	page, err := c.Devices(ctx, api.DeviceQuery{Prefix: "press"})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range page.Items {
		ids = append(ids, d.ID)
		if d.Precedence != nil {
			t.Errorf("%s in a list has its precedence", d.ID)
		}
	}
	if strings.Join(ids, ",") != "press,press-1,press-10,press-2" || page.Total != nil {
		t.Errorf("prefix press: %v, total %v", ids, page.Total)
	}
	// Prefix, paging and condition together.
	var seen []string
	q := api.DeviceQuery{Prefix: "press-", Limit: 1, Condition: "tags.environment='prod'"}
	for {
		p, err := c.Devices(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		if p.Total == nil || *p.Total != 3 {
			t.Fatalf("total with a condition: %v", p.Total)
		}
		for _, d := range p.Items {
			seen = append(seen, d.ID)
		}
		if p.Next == "" {
			break
		}
		q.After = p.Next
	}
	if strings.Join(seen, ",") != "press-1,press-10,press-2" {
		t.Errorf("paged with prefix and condition: %v", seen)
	}
	for _, q := range []api.DeviceQuery{{Prefix: "press-", Limit: 1}, {Prefix: "press", After: "press-1", Limit: 2}} {
		p, err := c.Devices(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		ids = ids[:0]
		for _, d := range p.Items {
			ids = append(ids, d.ID)
		}
		want := map[string]string{"press-": "press-1 next press-1", "press": "press-10,press-2 next "}[q.Prefix]
		if got := strings.Join(ids, ",") + " next " + p.Next; got != want {
			t.Errorf("%+v: %q, want %q", q, got, want)
		}
	}
	all, err := c.Devices(ctx, api.DeviceQuery{})
	if err != nil || all.Total == nil || *all.Total != 5 {
		t.Fatalf("total of all: %+v %v", all.Total, err)
	}
}
