package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/deploylimits"
	"appliance/fleet"
	"appliance/raftstore"
)

// Layered content for the node tests: l1 adds module m and route mr, l2
// changes m's env.
const (
	layerM = `{"modulesContent":{
 "$edgeAgent":{"properties.desired.modules.m":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"m:1"},"env":{"MODE":{"value":"l1"}}}},
 "$edgeHub":{"properties.desired.routes.mr":"FROM /messages/modules/m/* INTO $upstream"},
 "m":{"properties.desired":{"rate":5}}}}`
	layerEnv = `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.env.MODE":{"value":"l2"}}}}`
)

func putLayer(t *testing.T, c *api.Client, id, content, cond string, prio int64) api.DeploymentView {
	t.Helper()
	d, err := c.PutDeployment(context.Background(), id, api.DeploymentRequest{Content: json.RawMessage(content), TargetCondition: cond, Priority: prio, Layered: true}, api.WriteOptions{})
	if err != nil {
		t.Fatalf("put layer %s: %v", id, err)
	}
	return d
}

// desiredOf decodes a document's modules, routes and module twins.
type desiredView struct {
	deployment string
	layers     []string
	modules    map[string]map[string]any
	routes     map[string]any
	twins      map[string]any
}

func viewDesired(t *testing.T, doc fleet.DesiredDocument) desiredView {
	t.Helper()
	v := desiredView{deployment: doc.DeploymentID, layers: doc.Layers}
	if len(doc.ModulesContent) == 0 {
		return v
	}
	var mc map[string]map[string]json.RawMessage
	if err := json.Unmarshal(doc.ModulesContent, &mc); err != nil {
		t.Fatal(err)
	}
	var agent struct {
		Modules map[string]map[string]any `json:"modules"`
	}
	_ = json.Unmarshal(mc["$edgeAgent"]["properties.desired"], &agent)
	var hub struct {
		Routes map[string]any `json:"routes"`
	}
	_ = json.Unmarshal(mc["$edgeHub"]["properties.desired"], &hub)
	v.modules, v.routes, v.twins = agent.Modules, hub.Routes, map[string]any{}
	for name, e := range mc {
		if !strings.HasPrefix(name, "$") {
			var p any
			_ = json.Unmarshal(e["properties.desired"], &p)
			v.twins[name] = p
		}
	}
	if err := fleet.ValidateContent(json.RawMessage(`{"modulesContent":`+string(doc.ModulesContent)+`}`), false); err != nil {
		t.Fatalf("the merged document is not a manifest an agent accepts: %v", err)
	}
	return v
}

func modEnv(v desiredView, module string) string {
	env, _ := v.modules[module]["env"].(map[string]any)
	mode, _ := env["MODE"].(map[string]any)
	s, _ := mode["value"].(string)
	return s
}

// TestLayers_MergedOnTheBase: a device gets its base with every layer that
// targets it merged in priority order, whatever the layers' priorities
// against the base; a layer that goes takes exactly its modules and
// routes; a device with layers but no base gets nothing from them; device
// show says what came from where, and status counts each layer.
func TestLayers_MergedOnTheBase(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "press", map[string]any{"line": "a"})
	lonely := createDevice(t, c, "lonely", map[string]any{"line": "b"})
	d, err := connectDevice(t, n.MQTTAddr(), "press", key)
	if err != nil {
		t.Fatal(err)
	}
	d.subscribeDesired(t)
	if doc := d.nextDesired(t); doc.DeploymentID != "" {
		t.Fatalf("first document %+v", doc)
	}
	putDeployment(t, c, "base", "tags.line = 'a'", 10)
	if v := viewDesired(t, d.nextDesired(t)); v.deployment != "base" || len(v.modules) != 1 {
		t.Fatalf("base document %+v", v)
	}
	// L1 at 20 (above the base) adds m and its route; L2 at 30 changes
	// m's env. Neither displaces the base.
	putLayer(t, c, "l1", layerM, "*", 20)
	v := viewDesired(t, d.nextDesired(t))
	if v.deployment != "base" || !slices.Equal(v.layers, []string{"l1"}) || v.modules["m"] == nil || v.modules["temp"] == nil || v.routes["mr"] == nil || v.routes["r"] == nil {
		t.Fatalf("with l1: %+v", v)
	}
	if modEnv(v, "m") != "l1" || v.twins["m"] == nil {
		t.Fatalf("m's env %q, twin %v", modEnv(v, "m"), v.twins)
	}
	putLayer(t, c, "l2", layerEnv, "*", 30)
	if v := viewDesired(t, d.nextDesired(t)); modEnv(v, "m") != "l2" || !slices.Equal(v.layers, []string{"l1", "l2"}) {
		t.Fatalf("with l2: env %q layers %v", modEnv(v, "m"), v.layers)
	}
	// A layer below the base's priority merges too.
	low := putLayer(t, c, "low", `{"modulesContent":{"$edgeHub":{"properties.desired.routes.low":"FROM /messages/* INTO $upstream"}}}`, "*", 1)
	if len(low.Warnings) != 0 {
		t.Fatalf("a clean layer got warnings %v", low.Warnings)
	}
	if v := viewDesired(t, d.nextDesired(t)); v.routes["low"] == nil || !slices.Equal(v.layers, []string{"low", "l1", "l2"}) {
		t.Fatalf("with the low layer: %+v", v)
	}

	// device show: the base, the layers, who gave each module and route.
	dv, err := c.Device(ctx, "press", false)
	if err != nil {
		t.Fatal(err)
	}
	if dv.Document == nil || dv.Document.Base != "base" || !slices.Equal(dv.Document.Layers, []string{"low", "l1", "l2"}) ||
		!slices.Equal(dv.Document.Modules["m"], []string{"l1", "l2"}) || !slices.Equal(dv.Document.Modules["temp"], []string{"base"}) ||
		dv.Document.Routes["mr"] != "l1" || dv.Document.Routes["r"] != "base" || dv.Document.Routes["low"] != "low" {
		t.Fatalf("document %+v", dv.Document)
	}
	if dv.Configurations["l1"].Status != api.StatusApplied || dv.Configurations["base"].Status != api.StatusApplied {
		t.Fatalf("configurations %v", dv.Configurations)
	}
	var layered int
	for _, e := range dv.Precedence {
		if e.Layered {
			layered++
		}
	}
	if layered != 3 || dv.Precedence[0].Deployment != "base" {
		t.Fatalf("precedence %+v", dv.Precedence)
	}

	// Deleting l2 reverts m to l1's env; untargeting l1 takes m, its route
	// and its twin away and keeps the base's module.
	if err := c.DeleteDeployment(ctx, "l2", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if v := viewDesired(t, d.nextDesired(t)); modEnv(v, "m") != "l1" {
		t.Fatalf("after deleting l2, m's env %q", modEnv(v, "m"))
	}
	cond := "tags.line = 'b'"
	if _, err := c.PatchDeployment(ctx, "l1", api.DeploymentPatch{TargetCondition: &cond}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	v = viewDesired(t, d.nextDesired(t))
	if v.modules["m"] != nil || v.routes["mr"] != nil || v.twins["m"] != nil || v.modules["temp"] == nil || v.routes["r"] == nil {
		t.Fatalf("after l1 left: %+v", v)
	}

	// lonely: targeted by l1 and low, no base: no layer reaches it, and
	// status says why.
	ld, err := connectDevice(t, n.MQTTAddr(), "lonely", lonely)
	if err != nil {
		t.Fatal(err)
	}
	ld.subscribeDesired(t)
	if doc := ld.nextDesired(t); doc.DeploymentID != "" || len(doc.ModulesContent) != 0 {
		t.Fatalf("a device with layers and no base got %+v", doc)
	}
	st, err := c.DeploymentStatus(ctx, "l1", api.StatusQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Counts.Targeted != 1 || st.Counts.Applied != 0 || st.Reasons[api.CategoryTargeted]["no base deployment targets the device: a layer only merges on a base"] != 1 || !st.Layered {
		t.Fatalf("l1 status %+v", st)
	}
	lv, err := c.Device(ctx, "lonely", false)
	if err != nil {
		t.Fatal(err)
	}
	if lv.Kept == nil || !strings.Contains(lv.Kept.Note, "no base deployment targets this device") || lv.Configurations["l1"].Status != api.StatusTargeted {
		t.Fatalf("lonely: kept %+v configurations %v", lv.Kept, lv.Configurations)
	}
	// The press device reports its document: its layer counts its own
	// modules.
	rep := fmt.Sprintf(`{"deploymentId":"base","layers":["low"],"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{"temp":{"runtimeStatus":"running","status":"running","lastStartTimeUtc":%q}}}`,
		dv.DesiredVersion+100, time.Now().Add(-time.Hour).UTC().Format(time.RFC3339Nano))
	if _, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic("press"), QoS: 1, Payload: []byte(rep)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the low layer healthy on press", func() bool {
		st, err := c.DeploymentStatus(ctx, "low", api.StatusQuery{})
		return err == nil && st.Counts.Healthy == 1
	})
}

// TestLayers_Refused: a layer's write needs what it merges into to fit the
// limits; a rollout of a layer is refused; content that sets the system
// modules is accepted with a warning (the merge leaves it out).
func TestLayers_WritesAndLimits(t *testing.T) {
	n := startNodeWith(t, t.TempDir(), func(c *Config) {
		c.DeploymentLimits = deploylimits.Limits{MaxModules: 2, MaxLayersPerDevice: 1, MaxDeploymentsPerDevice: 3, MaxManifestBytes: 4096}
	})
	c := clientFor(n)
	ctx := context.Background()
	createDevice(t, c, "d1", map[string]any{"x": 1})
	putDeployment(t, c, "base", "*", 1)
	putLayer(t, c, "l1", layerM, "*", 2)
	expectField := func(err error, field, msg string) {
		t.Helper()
		var ae *api.Error
		if !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest || ae.Field != field || !strings.Contains(ae.Message, msg) {
			t.Fatalf("err %v, want 400 on %s with %q", err, field, msg)
		}
	}
	_, err := c.PutDeployment(ctx, "l2", api.DeploymentRequest{Content: json.RawMessage(layerEnv), TargetCondition: "*", Priority: 3, Layered: true}, api.WriteOptions{})
	expectField(err, "targetCondition", "device d1 would have 2 layered deployments; at most 1 are allowed (serve --max-layers-per-device)")
	three := `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.a":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"a"}},
	 "properties.desired.modules.b":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"b"}},
	 "properties.desired.modules.c":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"c"}}}}}`
	_, err = c.PutDeployment(ctx, "l3", api.DeploymentRequest{Content: json.RawMessage(three), TargetCondition: "tags.x = 2", Priority: 3, Layered: true}, api.WriteOptions{})
	expectField(err, "content.modulesContent.$edgeAgent.properties.desired.modules", "has 3 modules; at most 2 are allowed (serve --max-modules)")
	big := strings.Replace(manifest, `"image":"temp:1"`, `"image":"`+strings.Repeat("x", 5000)+`"`, 1)
	_, err = c.PutDeployment(ctx, "big", api.DeploymentRequest{Content: json.RawMessage(big), TargetCondition: "*"}, api.WriteOptions{})
	expectField(err, "content", "at most 4096 are allowed (serve --max-manifest-bytes)")
	putDeployment(t, c, "b2", "*", 0)
	_, err = c.PutDeployment(ctx, "b3", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*"}, api.WriteOptions{})
	expectField(err, "targetCondition", "device d1 would be targeted by 4 deployments; at most 3 are allowed (serve --max-deployments-per-device)")
	// A device's tags that would bring it over a limit are refused too.
	putLayer(t, c, "l5", layerEnv, "tags.x = 3", 6) // no device has x=3: within the limit
	createDevice(t, c, "d2", map[string]any{"x": 2})
	if _, err := c.PatchDevice(ctx, "d2", api.DevicePatch{Tags: map[string]any{"x": 3}}, api.WriteOptions{}); err == nil ||
		!strings.Contains(err.Error(), "would have device d2 targeted by 4 deployments; at most 3 are allowed (serve --max-deployments-per-device)") {
		t.Fatalf("a tag change over the layers' limit: %v", err)
	}
	// Nothing of the refused writes was stored.
	page, err := c.Deployments(ctx, api.DeploymentQuery{})
	if err != nil || len(page.Items) != 4 {
		t.Fatalf("deployments %v %v", deploymentIDs(page.Items), err)
	}
	// A layer may not be rolled out in waves.
	policy := fleet.RolloutPolicy{Waves: []string{"50%"}}
	_, err = c.PutDeployment(ctx, "l4", api.DeploymentRequest{Content: json.RawMessage(layerEnv), TargetCondition: "tags.x = 2", Priority: 3, Layered: true, Rollout: &policy}, api.WriteOptions{})
	expectField(err, "rollout", "a layered deployment is merged on each device's base at once")
	// System modules in a layer: accepted, left out of the merge, said.
	sys := `{"modulesContent":{"$edgeAgent":{"properties.desired.systemModules.edgeHub.settings.image":"evil"}}}`
	if err := c.DeleteDeployment(ctx, "l1", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	v := putLayer(t, c, "sys", sys, "*", 5)
	if len(v.Warnings) != 1 || !strings.Contains(v.Warnings[0], "a layer does not configure the system modules") {
		t.Fatalf("warnings %v", v.Warnings)
	}
}

// TestLimits_LoweredLimitKeepsDevicesEditable: a device already targeted
// by more deployments than the limit allows (the operator lowered it, or an
// older release without limits wrote them) keeps its tags editable; only a
// change that adds deployments to it is refused.
func TestLimits_LoweredLimitKeepsDevicesEditable(t *testing.T) {
	dir := t.TempDir()
	n := startNodeWith(t, dir, func(c *Config) { c.DeploymentLimits = deploylimits.Limits{MaxDeploymentsPerDevice: 3} })
	c := clientFor(n)
	ctx := context.Background()
	createDevice(t, c, "d1", map[string]any{"line": 1})
	putDeployment(t, c, "all", "*", 1)
	putDeployment(t, c, "line1", "tags.line = 1", 2)
	putDeployment(t, c, "line1b", "tags.line = 1", 3)
	putDeployment(t, c, "blue", "tags.color = 'blue'", 4)
	n.Stop()

	n = startNodeWith(t, dir, func(c *Config) { c.DeploymentLimits = deploylimits.Limits{MaxDeploymentsPerDevice: 2} })
	c = clientFor(n)
	// 3 deployments target d1, one more than allowed now: an edit that
	// keeps it at 3 is accepted.
	if _, err := c.PatchDevice(ctx, "d1", api.DevicePatch{Tags: map[string]any{"shift": "night"}}, api.WriteOptions{}); err != nil {
		t.Fatalf("a tag edit on a device already over a lowered limit: %v", err)
	}
	// One that brings it to 4 is refused, naming the limit.
	_, err := c.PatchDevice(ctx, "d1", api.DevicePatch{Tags: map[string]any{"color": "blue"}}, api.WriteOptions{})
	if err == nil || !strings.Contains(err.Error(), "would have device d1 targeted by 4 deployments; at most 2 are allowed (serve --max-deployments-per-device)") {
		t.Fatalf("a tag edit adding a deployment over the limit: %v", err)
	}
	d, err := c.Device(ctx, "d1", true)
	if err != nil || d.Tags["shift"] != "night" || d.Tags["color"] != nil {
		t.Fatalf("d1's tags %v (%v), want the accepted edit only", d.Tags, err)
	}
}

// TestPatchDevice_ThroughAFollowerRightAfterCreate: a device created
// through the leader and edited at once through a follower is found: the
// edit's tag check does not answer 404 from a follower that has not
// applied the creation yet (TestCluster_FaultInjection found it).
func TestPatchDevice_ThroughAFollowerRightAfterCreate(t *testing.T) {
	n1 := startNode(t, t.TempDir())
	n2 := startNodeWith(t, t.TempDir(), func(c *Config) { c.NodeID, c.Join, c.JoinToken = "n2", "https://"+n1.RaftAddr(), n1.JoinToken() })
	c1, c2 := clientFor(n1), clientFor(n2)
	ctx := context.Background()
	for i := range 100 {
		id := fmt.Sprintf("press-%03d", i)
		createDevice(t, c1, id, map[string]any{"line": 1})
		// The edit is sent again when its outcome is unknown (the two
		// nodes changed leader on a starved machine; it is idempotent);
		// "not found" is the answer that must never come.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			_, err := c2.PatchDevice(ctx, id, api.DevicePatch{Tags: map[string]any{"line": 2}}, api.WriteOptions{})
			if err == nil {
				break
			}
			if errors.Is(err, fleet.ErrNotFound) || time.Now().After(deadline) {
				t.Fatalf("edit of %s through the follower right after its creation: %v", id, err)
			}
			t.Logf("edit of %s, sent again: %v", id, err)
		}
	}
	if _, err := c2.PatchDevice(ctx, "nobody", api.DevicePatch{Tags: map[string]any{"line": 2}}, api.WriteOptions{}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("edit of a device that does not exist: %v, want not found", err)
	}
}

// TestUntargeted_KeepsWhatItRuns: a device no deployment targets any more
// is sent nothing (it keeps its last document), device show and status say
// so; a reset sends it the empty document; a reset of a targeted device is
// a conflict; deleting a deployment still falls back to the next one.
func TestUntargeted_KeepsWhatItRuns(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "d1", map[string]any{"env": "prod"})
	putDeployment(t, c, "fallback", "tags.env = 'prod'", 1)
	putDeployment(t, c, "main", "tags.env = 'prod'", 5)
	d, err := connectDevice(t, n.MQTTAddr(), "d1", key)
	if err != nil {
		t.Fatal(err)
	}
	d.subscribeDesired(t)
	doc := d.nextDesired(t)
	if doc.DeploymentID != "main" {
		t.Fatalf("first document %+v", doc)
	}
	report := func(dep string, version uint64) {
		t.Helper()
		rep := fmt.Sprintf(`{"deploymentId":%q,"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, dep, version)
		if _, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic("d1"), QoS: 1, Payload: []byte(rep)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the report of "+dep, func() bool {
			v, err := c.Device(ctx, "d1", false)
			var r fleet.ReportedDocument
			return err == nil && v.Reported != nil && json.Unmarshal(v.Reported.Document, &r) == nil && r.LastDesiredVersion == version
		})
	}
	report("main", doc.Version)
	// Deleting main falls back to the next deployment, as before.
	if err := c.DeleteDeployment(ctx, "main", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	doc = d.nextDesired(t)
	if doc.DeploymentID != "fallback" {
		t.Fatalf("after deleting main: %+v", doc)
	}
	report("fallback", doc.Version)
	if _, err := c.ResetDevice(ctx, "d1", api.WriteOptions{}); err == nil || !strings.Contains(err.Error(), "deployment fallback applies to it") {
		t.Fatalf("reset of a targeted device: %v", err)
	}
	// The last deployment goes: no document is sent; the device keeps it.
	if err := c.DeleteDeployment(ctx, "fallback", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	v, err := c.Device(ctx, "d1", false)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("no deployment targets this device; keeping fallback v%d", doc.Version)
	if v.Kept == nil || v.Kept.Note != want || v.Kept.Deployment != "fallback" || v.Health != fleet.HealthNone {
		t.Fatalf("kept %+v, want %q", v.Kept, want)
	}
	// Reconnecting sends nothing either (the broker asks for the document).
	d.c.Disconnect(&paho.Disconnect{})
	d, err = connectDevice(t, n.MQTTAddr(), "d1", key)
	if err != nil {
		t.Fatal(err)
	}
	d.subscribeDesired(t)
	select {
	case m := <-d.msgs:
		t.Fatalf("an untargeted device was sent %s", m.Payload)
	case <-time.After(300 * time.Millisecond):
	}
	// A deployment that targets it again applies; status of a deployment
	// a device keeps running lists it as kept.
	putDeployment(t, c, "again", "tags.env = 'prod'", 1)
	doc = d.nextDesired(t)
	if doc.DeploymentID != "again" {
		t.Fatalf("targeted again: %+v", doc)
	}
	report("again", doc.Version)
	cond := "tags.env = 'lab'"
	if _, err := c.PatchDeployment(ctx, "again", api.DeploymentPatch{TargetCondition: &cond}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	st, err := c.DeploymentStatus(ctx, "again", api.StatusQuery{})
	if err != nil || st.Counts.Kept != 1 || fmt.Sprint(st.Devices[api.CategoryKept]) != "[d1]" {
		t.Fatalf("status of a kept deployment %+v %v", st, err)
	}
	// Reset: the empty document, at a higher version; it runs nothing then.
	dev, err := c.ResetDevice(ctx, "d1", api.WriteOptions{})
	if err != nil || dev.ResetIndex == 0 {
		t.Fatalf("reset: %+v %v", dev, err)
	}
	empty := d.nextDesired(t)
	if empty.DeploymentID != "" || len(empty.ModulesContent) != 0 || empty.Version <= doc.Version {
		t.Fatalf("after reset: %+v (before: v%d)", empty, doc.Version)
	}
	v, err = c.Device(ctx, "d1", false)
	if err != nil || v.Kept == nil || !v.Kept.ResetPending {
		t.Fatalf("a reset not yet taken: %+v %v", v.Kept, err)
	}
	report("", empty.Version)
	v, _ = c.Device(ctx, "d1", false)
	if v.Kept == nil || v.Kept.ResetPending || !strings.HasSuffix(v.Kept.Note, "it runs nothing") {
		t.Fatalf("after the reset was taken: %+v", v.Kept)
	}
	waitFor(t, "the reset in the device's history", func() bool {
		hist, err := c.DeviceHistory(ctx, "d1", 0)
		return err == nil && slices.ContainsFunc(hist.Items, func(e fleet.HistoryEvent) bool { return e.Kind == "reset" })
	})
}

// snapshotState is everything a dry run must leave as it is: the
// replicated state (etags), each device's desired version and document,
// and the history.
func snapshotState(t *testing.T, n *Node) string {
	t.Helper()
	var b strings.Builder
	err := n.store.View(func(r *raftstore.Reader) error {
		if err := r.Devices("", func(d fleet.Device) bool {
			fmt.Fprintf(&b, "device %s %s %v\n", d.ID, d.Etag, d.Tags)
			return true
		}); err != nil {
			return err
		}
		return r.Deployments("", func(d fleet.Deployment) bool {
			fmt.Fprintf(&b, "deployment %s %s %q %d\n", d.ID, d.Etag, d.TargetCondition, d.Priority)
			return true
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "applied %d\n", n.store.AppliedIndex())
	n.history.Flush() // what the applied entries queued is written
	c := clientFor(n)
	for _, id := range []string{"a1", "a2", "b1", "b2", "c1"} {
		doc, err := n.assign.Desired(id)
		if err != nil {
			t.Fatal(err)
		}
		v, err := c.Device(context.Background(), id, false)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "desired %s v%d %s\n", id, v.DesiredVersion, doc)
		h, err := c.DeviceHistory(context.Background(), id, 1000)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "history %s %d\n", id, len(h.Items))
	}
	for _, id := range []string{"wide", "narrow", "layer"} {
		h, err := c.DeploymentHistory(context.Background(), id, 1000)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "history %s %d\n", id, len(h.Items))
	}
	return b.String()
}

// TestDryRun_ChangesNothing: a dry-run PUT, PATCH and DELETE (of a base
// and of a layer) leave the state, versions, history and every device's
// document as they were, and say which devices would start, switch (from
// which), leave (for which) or keep what they run, paged.
func TestDryRun_ChangesNothing(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	for id, site := range map[string]string{"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c"} {
		createDevice(t, c, id, map[string]any{"site": site})
	}
	putDeployment(t, c, "wide", "tags.site IN ['a', 'b']", 1)
	putDeployment(t, c, "narrow", "tags.site = 'b'", 5)
	putLayer(t, c, "layer", layerM, "*", 3)
	before := snapshotState(t, n)
	check := func(what string) {
		t.Helper()
		if after := snapshotState(t, n); after != before {
			t.Fatalf("%s changed something:\nbefore:\n%s\nafter:\n%s", what, before, after)
		}
	}
	categories := func(r api.DryRunResult) string {
		var parts []string
		for _, d := range r.Devices {
			parts = append(parts, fmt.Sprintf("%s:%s:%s>%s", d.ID, d.Category, d.From, d.To))
		}
		return strings.Join(parts, " ")
	}
	// PUT: a new deployment for every site at priority 3: c1 starts, a*
	// switch from wide; b* stay on narrow.
	r, err := c.DryRunDeployment(ctx, "all", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Priority: 3}, api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if got := categories(r); got != "a1:switch:wide>all a2:switch:wide>all c1:start:>all" || r.Changes[fleet.PreviewSwitch] != 2 || r.Changes[fleet.PreviewStart] != 1 {
		t.Fatalf("dry-run PUT: %s %v", got, r.Changes)
	}
	check("a dry-run PUT")
	// PATCH (the bug: it used to apply): narrow loses b2; wide takes it.
	cond := "deviceId = 'b1'"
	r, err = c.DryRunPatchDeployment(ctx, "narrow", api.DeploymentPatch{TargetCondition: &cond}, api.DryRunQuery{})
	if err != nil || categories(r) != "b2:leave:narrow>wide" {
		t.Fatalf("dry-run PATCH: %s %v", categories(r), err)
	}
	prio := int64(0)
	r, err = c.DryRunPatchDeployment(ctx, "narrow", api.DeploymentPatch{Priority: &prio}, api.DryRunQuery{})
	if err != nil || categories(r) != "b1:leave:narrow>wide b2:leave:narrow>wide" {
		t.Fatalf("dry-run PATCH priority: %s %v", categories(r), err)
	}
	check("a dry-run PATCH")
	// DELETE: wide's devices keep running it (nothing else targets them);
	// narrow's fall back to wide.
	r, err = c.DryRunDeleteDeployment(ctx, "wide", api.DryRunQuery{})
	if err != nil || categories(r) != "a1:keep:wide> a2:keep:wide>" || r.Changes[fleet.PreviewKeep] != 2 {
		t.Fatalf("dry-run DELETE: %s %v", categories(r), err)
	}
	r, err = c.DryRunDeleteDeployment(ctx, "narrow", api.DryRunQuery{})
	if err != nil || categories(r) != "b1:leave:narrow>wide b2:leave:narrow>wide" {
		t.Fatalf("dry-run DELETE narrow: %s %v", categories(r), err)
	}
	// A layer: it leaves the documents it is merged in; c1 has no base.
	cond = "tags.site = 'a'"
	r, err = c.DryRunPatchDeployment(ctx, "layer", api.DeploymentPatch{TargetCondition: &cond}, api.DryRunQuery{})
	if err != nil || categories(r) != "b1:leave:narrow>narrow b2:leave:narrow>narrow" {
		t.Fatalf("dry-run PATCH of a layer: %s %v", categories(r), err)
	}
	// Paged by category.
	r, err = c.DryRunDeployment(ctx, "all", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Priority: 9}, api.DryRunQuery{Category: fleet.PreviewSwitch, Limit: 2})
	if err != nil || categories(r) != "a1:switch:wide>all a2:switch:wide>all" || r.Next != "a2" || r.Changes[fleet.PreviewSwitch] != 4 {
		t.Fatalf("page 1: %s next %q %v", categories(r), r.Next, err)
	}
	r, err = c.DryRunDeployment(ctx, "all", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Priority: 9}, api.DryRunQuery{Category: fleet.PreviewSwitch, Limit: 2, After: r.Next})
	if err != nil || categories(r) != "b1:switch:narrow>all b2:switch:narrow>all" || r.Next != "" {
		t.Fatalf("page 2: %s next %q %v", categories(r), r.Next, err)
	}
	code, body, _ := rawRequest(t, http.MethodDelete, n.URL()+"/api/v1/deployments/wide?dryRun=true&category=nope", n.Token(), "")
	if code != http.StatusBadRequest || !strings.Contains(body, "category") {
		t.Fatalf("unknown category: %d %s", code, body)
	}
	check("every dry run")
}

// TestRoundTrip: what a GET returns, a PUT takes back: the id must match
// the path, the etag acts as If-Match (a stale one is 412), read-only
// fields are ignored, a deployment's redacted content stands for the
// stored one; unknown fields are still refused.
func TestRoundTrip(t *testing.T) {
	n := startNode(t, t.TempDir())
	ctx := context.Background()
	c := clientFor(n)
	createDevice(t, c, "d1", map[string]any{"env": "prod"})
	putDeployment(t, c, "dep", "tags.env = 'prod'", 1)
	put := func(path string, obj map[string]any, headers ...string) (int, string) {
		b, _ := json.Marshal(obj)
		code, body, _ := rawRequest(t, http.MethodPut, n.URL()+path, n.Token(), string(b), headers...)
		return code, body
	}
	getJSON := func(path string) map[string]any {
		code, body, _ := rawRequest(t, http.MethodGet, n.URL()+path, n.Token(), "")
		if code != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, code, body)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(body), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	// A deployment: change the priority, PUT the object back.
	dep := getJSON("/api/v1/deployments/dep")
	if !strings.Contains(fmt.Sprint(dep["content"]), "<redacted>") {
		t.Fatalf("the GET shows the password: %v", dep["content"])
	}
	stale := dep["etag"]
	dep["priority"] = 7
	if code, body := put("/api/v1/deployments/dep", dep); code != http.StatusOK {
		t.Fatalf("PUT of a GET's deployment: %d %s", code, body)
	}
	got, err := c.Deployment(ctx, "dep", false)
	if err != nil || got.Priority != 7 {
		t.Fatalf("after the round trip: %+v %v", got.Deployment, err)
	}
	var stored fleet.Deployment
	_ = n.store.View(func(r *raftstore.Reader) (err error) { stored, err = r.Deployment("dep"); return err })
	if !strings.Contains(string(stored.Content), "hunter2-secret") {
		t.Fatalf("the round trip replaced the stored secret: %s", stored.Content)
	}
	dep["priority"] = 8
	if code, body := put("/api/v1/deployments/dep", dep); code != http.StatusPreconditionFailed {
		t.Fatalf("PUT with a stale etag (%v): %d %s", stale, code, body)
	}
	dep = getJSON("/api/v1/deployments/dep")
	dep["id"] = "other"
	if code, body := put("/api/v1/deployments/dep", dep); code != http.StatusBadRequest || !strings.Contains(body, `"field": "id"`) {
		t.Fatalf("PUT with another id: %d %s", code, body)
	}
	dep = getJSON("/api/v1/deployments/dep")
	dep["surprise"] = 1
	if code, body := put("/api/v1/deployments/dep", dep); code != http.StatusBadRequest || !strings.Contains(body, "surprise") {
		t.Fatalf("PUT with an unknown field: %d %s", code, body)
	}

	// A device: change a tag, PUT back; keys and read-only views ignored.
	devObj := getJSON("/api/v1/devices/d1")
	devObj["tags"] = map[string]any{"env": "lab"}
	devObj["authentication"] = map[string]any{"type": "sas", "symmetricKey": map[string]any{"primaryKey": "mine", "secondaryKey": "mine"}}
	if code, body := put("/api/v1/devices/d1", devObj); code != http.StatusOK {
		t.Fatalf("PUT of a GET's device: %d %s", code, body)
	}
	dv, err := c.Device(ctx, "d1", false)
	if err != nil || dv.Tags["env"] != "lab" || len(dv.Configurations) != 0 {
		t.Fatalf("after the device round trip: %+v %v", dv, err)
	}
	if code, _ := put("/api/v1/devices/d1", devObj); code != http.StatusPreconditionFailed {
		t.Fatalf("a stale device etag: %d", code)
	}
	var keys *fleet.KeyHashes
	_ = n.store.View(func(r *raftstore.Reader) error {
		d, err := r.Device("d1")
		keys = d.Authentication.KeyHashes
		return err
	})
	if keys == nil || keys.Primary == fleet.HashKey("mine") {
		t.Fatalf("a PUT set the keys: %+v", keys)
	}
}

// TestRoundTrip_FieldsInSync: every field a GET returns is one a PUT
// takes back (so a script can read, edit and write back).
func TestRoundTrip_FieldsInSync(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	createDevice(t, c, "d1", nil)
	putDeployment(t, c, "dep", "*", 1)
	putLayer(t, c, "sys", `{"modulesContent":{"$edgeAgent":{"properties.desired.schemaVersion":"1.1"}}}`, "*", 2)
	if _, err := c.ResetDevice(context.Background(), "d1", api.WriteOptions{}); err == nil {
		t.Fatal("reset of a targeted device")
	}
	for _, path := range []string{"/api/v1/devices/d1", "/api/v1/deployments/dep", "/api/v1/deployments/sys"} {
		_, body, _ := rawRequest(t, http.MethodGet, n.URL()+path, n.Token(), "")
		var obj map[string]any
		if err := json.Unmarshal([]byte(body), &obj); err != nil {
			t.Fatal(err)
		}
		var fields []string
		for k := range obj {
			fields = append(fields, k)
		}
		sort.Strings(fields)
		var target any = &api.DeploymentRequest{}
		if strings.Contains(path, "devices") {
			target = &api.DeviceRequest{}
		}
		if err := api.DecodeBody([]byte(body), target); err != nil {
			t.Fatalf("GET %s (fields %v) is not a PUT body: %v", path, fields, err)
		}
	}
}

// TestStatus_CountsWhatDevicesDo: a refused document counts as failed with
// the agent's reason; after a switch, a report about the previous
// deployment counts for nothing (categories, system and custom metrics);
// Azure's own system metric queries, run as custom metrics, give the
// built-in counts; a device out of contact longer than --offline-after is
// offline beside its health.
func TestStatus_CountsWhatDevicesDo(t *testing.T) {
	n := startNodeWith(t, t.TempDir(), func(c *Config) { c.OfflineAfter = 500 * time.Millisecond })
	c := clientFor(n)
	ctx := context.Background()
	devices := map[string]*mqttDevice{}
	for _, id := range []string{"ok", "refuses", "fails", "switches", "gone"} {
		key := createDevice(t, c, id, map[string]any{"env": "prod"})
		d, err := connectDevice(t, n.MQTTAddr(), id, key)
		if err != nil {
			t.Fatal(err)
		}
		d.subscribeDesired(t)
		d.nextDesired(t) // the empty document
		devices[id] = d
	}
	put := func(id, cond string, prio int64, metrics map[string]string) {
		t.Helper()
		if _, err := c.PutDeployment(ctx, id, api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: cond, Priority: prio,
			Metrics: fleet.Metrics{Queries: metrics}}, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Azure's system metrics as custom metrics, besides a plain one.
	put("prod", "tags.env = 'prod'", 1, nil)
	queries := map[string]string{}
	dv, err := c.Deployment(ctx, "prod", false)
	if err != nil {
		t.Fatal(err)
	}
	for name, q := range dv.SystemMetrics.Queries {
		queries["azure-"+name] = q
	}
	queries["running"] = "properties.reported.modules.temp.runtimeStatus = 'running'"
	if _, err := c.PatchDeployment(ctx, "prod", api.DeploymentPatch{Metrics: &fleet.Metrics{Queries: queries}}, api.WriteOptions{}); err != nil {
		t.Fatalf("Azure's system metric queries as custom metrics: %v", err)
	}
	docs := map[string]fleet.DesiredDocument{}
	for id, d := range devices {
		docs[id] = d.nextDesired(t)
	}
	send := func(id, body string) {
		t.Helper()
		if _, err := devices[id].c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic(id), QoS: 1, Payload: []byte(body)}); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339Nano)
	running := func(dep string, v uint64) string {
		return fmt.Sprintf(`{"deploymentId":%q,"lastDesiredDeploymentId":%q,"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{"temp":{"runtimeStatus":"running","status":"running","lastStartTimeUtc":%q}}}`, dep, dep, v, old)
	}
	send("ok", running("prod", docs["ok"].Version))
	send("gone", running("prod", docs["gone"].Version))
	send("switches", running("prod", docs["switches"].Version))
	// The agent refused prod (400) and goes on running nothing.
	send("refuses", fmt.Sprintf(`{"deploymentId":"","lastDesiredDeploymentId":"prod","lastDesiredVersion":%d,"lastDesiredStatus":{"code":400,"description":"modulesContent.$edgeAgent: bad"},"modules":{}}`, docs["refuses"].Version))
	send("fails", fmt.Sprintf(`{"deploymentId":"prod","lastDesiredDeploymentId":"prod","lastDesiredVersion":%d,"lastDesiredStatus":{"code":500,"description":"pull failed"},"modules":{"temp":{"runtimeStatus":"failed","status":"running"}}}`, docs["fails"].Version))
	statusOf := func(id string) api.DeploymentStatus {
		t.Helper()
		st, err := c.DeploymentStatus(ctx, id, api.StatusQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	waitFor(t, "five reports", func() bool { st := statusOf("prod"); return st.Counts.Unknown == 0 })
	st := statusOf("prod")
	if st.Counts.Healthy != 3 || st.Counts.Unhealthy != 2 || st.Reasons[api.CategoryUnhealthy]["code 400: modulesContent.$edgeAgent: bad"] != 1 ||
		st.Reasons[api.CategoryUnhealthy]["code 500: pull failed"] != 1 {
		t.Fatalf("refused and failed: %+v", st)
	}
	sameAsAzure := func(st api.DeploymentStatus) {
		t.Helper()
		for name, v := range st.SystemMetrics {
			if st.Metrics["azure-"+name] != v {
				t.Fatalf("%s: built in %d, Azure's query %d (metrics %v, system %v)", name, v, st.Metrics["azure-"+name], st.Metrics, st.SystemMetrics)
			}
		}
	}
	if st.SystemMetrics["reportedFailedCount"] != 2 || st.SystemMetrics["reportedSuccessfulCount"] != 3 || st.Metrics["running"] != 3 {
		t.Fatalf("metrics %v %v", st.SystemMetrics, st.Metrics)
	}
	sameAsAzure(st)

	// "switches" moves to canary; its report is still about prod: it
	// counts nowhere until it reports canary.
	put("canary", "deviceId = 'switches'", 5, map[string]string{"running": "properties.reported.modules.temp.runtimeStatus = 'running'"})
	devices["switches"].nextDesired(t)
	cst := statusOf("canary")
	if cst.Counts.Applied != 1 || cst.Counts.Unknown != 1 || cst.Metrics["running"] != 0 || cst.SystemMetrics["reportedSuccessfulCount"] != 0 {
		t.Fatalf("a stale report counted after the switch: %+v", cst)
	}
	st = statusOf("prod")
	if st.Counts.Applied != 4 || st.Metrics["running"] != 2 || st.SystemMetrics["targetedCount"] != 5 {
		t.Fatalf("prod after the switch: %+v", st)
	}
	sameAsAzure(st)

	// "gone" disconnects: offline once out of contact for --offline-after,
	// beside its health (still healthy by its last report).
	devices["gone"].c.Disconnect(&paho.Disconnect{})
	waitFor(t, "gone offline", func() bool { return statusOf("prod").Counts.Offline == 1 })
	st = statusOf("prod")
	if fmt.Sprint(st.Devices[api.CategoryOffline]) != "[gone]" || st.Counts.Healthy != 2 {
		t.Fatalf("offline: %+v", st)
	}
	v, err := c.Device(ctx, "gone", false)
	if err != nil || v.Presence != api.PresenceOffline || v.LastContactTime == nil || v.Health != api.CategoryHealthy {
		t.Fatalf("gone: presence %q last contact %v health %q %v", v.Presence, v.LastContactTime, v.Health, err)
	}
	if v, _ := c.Device(ctx, "ok", false); v.Presence != api.PresenceOnline {
		t.Fatalf("ok: presence %q", v.Presence)
	}
	o, err := c.Overview(ctx)
	if err != nil || o.Devices.Offline != 1 {
		t.Fatalf("overview offline %+v %v", o.Devices, err)
	}
	// The custom metrics are on /metrics too.
	_, body, _ := rawRequest(t, http.MethodGet, n.URL()+"/metrics", n.Token(), "")
	for _, want := range []string{
		`appliance_deployment_metric_devices{deployment="prod",metric="running"} 2`,
		`appliance_deployment_system_metric{deployment="prod",metric="reportedFailedCount"} 2`,
		`appliance_deployment_devices{category="offline",deployment="prod"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestPatchDevice_TagsOfAMissingDevice: a tag change of a device that does
// not exist is refused as not found and creates nothing, whether the tag
// limits are checked before proposing (more deployments than a device may
// be targeted by) or not (the state machine refuses it).
func TestPatchDevice_TagsOfAMissingDevice(t *testing.T) {
	for _, tc := range []struct {
		name        string
		deployments int // with the limit at 1: more than one means the tags are checked first
	}{{"limits not reachable", 1}, {"limits checked", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			n := startNodeWith(t, t.TempDir(), func(c *Config) { c.DeploymentLimits = deploylimits.Limits{MaxDeploymentsPerDevice: 1} })
			c := clientFor(n)
			ctx := context.Background()
			for i := range tc.deployments {
				putDeployment(t, c, fmt.Sprintf("dep-%d", i), fmt.Sprintf("tags.line = %d", i), int64(i))
			}
			_, err := c.PatchDevice(ctx, "ghost", api.DevicePatch{Tags: map[string]any{"line": 1}}, api.WriteOptions{})
			if !errors.Is(err, fleet.ErrNotFound) || !strings.Contains(err.Error(), `device "ghost"`) {
				t.Fatalf("tag change of a missing device: %v, want not found naming it", err)
			}
			if _, err := c.Device(ctx, "ghost", true); !errors.Is(err, fleet.ErrNotFound) {
				t.Fatalf("after the refused tag change, device ghost: %v, want not found", err)
			}
			// An existing device's change still goes through.
			createDevice(t, c, "d1", map[string]any{"line": 0})
			if d, err := c.PatchDevice(ctx, "d1", api.DevicePatch{Tags: map[string]any{"shift": "night"}}, api.WriteOptions{}); err != nil || d.Tags["shift"] != "night" || d.Tags["line"] != float64(0) {
				t.Fatalf("tag change of d1: %v %v", d.Tags, err)
			}
		})
	}
}
