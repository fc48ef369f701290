//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
)

// The deployment semantics an Azure user relies on (issue 17), with real
// processes: layered deployments merged on a device's base, a device that
// no deployment targets keeping what it runs, and status that counts what
// devices do.

// processModule is a process module running the test module, writing its
// pid and starts into out; env is its environment.
func processModule(out string, env map[string]string) map[string]any {
	e := map[string]any{"MODULE_OUT": map[string]any{"value": out}}
	for k, v := range env {
		e[k] = map[string]any{"value": v}
	}
	return map[string]any{"type": "process", "status": "running", "restartPolicy": "always", "env": e,
		"settings": map[string]any{"command": []string{moduleBinary}}}
}

// writeJSONFile writes v as a file of a fresh directory.
func writeJSONFile(t *testing.T, name string, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// envOf reads a process's environment variable.
func envOf(pid int, name string) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return ""
	}
	for _, kv := range strings.Split(string(b), "\x00") {
		if v, ok := strings.CutPrefix(kv, name+"="); ok {
			return v
		}
	}
	return ""
}

func showDevice(t *testing.T, dir, id string) api.DeviceView {
	t.Helper()
	var v api.DeviceView
	r := cli(t, dir, "device", "show", id, "-o", "json").mustSucceed(t)
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func deploymentStatus(t *testing.T, dir, id string) api.DeploymentStatus {
	t.Helper()
	var st api.DeploymentStatus
	r := cli(t, dir, "deployment", "status", id, "-o", "json").mustSucceed(t)
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestLayered_EndToEnd (issue 17, acceptance 1): a base (the system
// modules and module a) at priority 10, a layer l1 adding module m and
// route mr at 20, a layer l2 changing m's environment at 30: the agent
// runs a and m with l2's environment; deleting l2 gives m l1's again;
// untargeting l1 removes m and mr and keeps a running; a device that only
// l1 targets runs nothing new, and status says why. The corpus's layered
// deployments are accepted and merged.
func TestLayered_EndToEnd(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	token := enrollmentToken(t, dir, "plant", "site=plant")
	lonelyToken := enrollmentToken(t, dir, "lab", "site=lab")
	out := t.TempDir()
	startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-01", "--enroll-token", token, "--data-dir", t.TempDir())
	startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "lab-01", "--enroll-token", lonelyToken, "--data-dir", t.TempDir())

	base := processManifest(t, out, map[string]map[string]any{"a": module("running", "always", nil)})
	cli(t, dir, "deployment", "create", "base", "--content", base, "--target-condition", "tags.site='plant'", "--priority", "10").mustSucceed(t)
	eventually(t, "a runs", 30*time.Second, func() bool { _, ok := alivePid(out, "a"); return ok })
	aPid, _ := alivePid(out, "a")

	l1 := writeJSONFile(t, "l1.json", map[string]any{"modulesContent": map[string]any{
		"$edgeAgent": map[string]any{"properties.desired.modules.m": processModule(out, map[string]string{"MODE": "l1"})},
		"$edgeHub":   map[string]any{"properties.desired.routes.mr": "FROM /messages/modules/m/* INTO $upstream"},
		"m":          map[string]any{"properties.desired": map[string]any{"rate": 5}},
	}})
	l2 := writeJSONFile(t, "l2.json", map[string]any{"modulesContent": map[string]any{
		"$edgeAgent": map[string]any{"properties.desired.modules.m.env.MODE": map[string]any{"value": "l2"}},
	}})
	cli(t, dir, "deployment", "create", "l1", "--content", l1, "--layered", "--target-condition", "*", "--priority", "20").mustSucceed(t)
	cli(t, dir, "deployment", "create", "l2", "--content", l2, "--layered", "--target-condition", "*", "--priority", "30").mustSucceed(t)
	eventually(t, "m runs with l2's MODE", 30*time.Second, func() bool {
		pid, ok := alivePid(out, "m")
		return ok && envOf(pid, "MODE") == "l2"
	})
	eventually(t, "the agent reports base with l1 and l2, code 200, a and m running, two routes", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		return doc.DeploymentID == "base" && slices.Equal(doc.Layers, []string{"l1", "l2"}) && doc.LastDesiredStatus.Code == 200 &&
			doc.Modules["a"].RuntimeStatus == fleet.RuntimeRunning && doc.Modules["m"].RuntimeStatus == fleet.RuntimeRunning &&
			doc.Hub != nil && doc.Hub.Routes == 1
	})
	if pid, _ := alivePid(out, "a"); pid != aPid {
		t.Fatalf("a was restarted (pid %d, was %d) when layers were merged", pid, aPid)
	}
	// device show: the base, the layers, and who gave what.
	show := cli(t, dir, "device", "show", "press-01").mustSucceed(t).stdout
	for _, want := range []string{"base:", "base\n", "l1, l2 (merged in this order)", "module a", "module m", "l1 < l2", "route mr", "l1"} {
		if !strings.Contains(show, want) {
			t.Fatalf("device show lacks %q:\n%s", want, show)
		}
	}
	eventually(t, "l1 and l2 healthy on press-01, their own modules counted", 30*time.Second, func() bool {
		for _, id := range []string{"l1", "l2"} {
			st := deploymentStatus(t, dir, id)
			if st.Counts.Applied != 1 {
				return false
			}
		}
		r := cli(t, dir, "deployment", "status", "l1", "--soak", "1s", "-o", "json")
		var st api.DeploymentStatus
		return json.Unmarshal([]byte(r.stdout), &st) == nil && st.Counts.Healthy == 1
	})

	// Deleting l2: m goes back to l1's MODE.
	cli(t, dir, "deployment", "delete", "l2").mustSucceed(t)
	eventually(t, "m runs with l1's MODE", 30*time.Second, func() bool {
		pid, ok := alivePid(out, "m")
		return ok && envOf(pid, "MODE") == "l1"
	})
	// l1 no longer targets the plant: m and its route leave; a stays.
	mPid, _ := alivePid(out, "m")
	cli(t, dir, "deployment", "update", "l1", "--target-condition", "tags.site='lab'").mustSucceed(t)
	eventually(t, "m removed, its route gone, a running", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		_, hasM := doc.Modules["m"]
		return !processAlive(mPid) && !hasM && len(doc.Layers) == 0 && doc.Hub != nil && doc.Hub.Routes == 0 &&
			doc.Modules["a"].RuntimeStatus == fleet.RuntimeRunning
	})
	if pid, ok := alivePid(out, "a"); !ok || pid != aPid {
		t.Fatalf("a did not keep running (pid %d alive %v, was %d)", pid, ok, aPid)
	}
	// lab-01: targeted by l1 only, no base: it runs nothing new; status
	// says why.
	st := deploymentStatus(t, dir, "l1")
	if st.Counts.Targeted != 1 || st.Counts.Applied != 0 || st.Reasons[api.CategoryTargeted]["no base deployment targets the device: a layer only merges on a base"] != 1 {
		t.Fatalf("l1's status %+v", st)
	}
	if doc, _ := reported(t, dir, "lab-01"); doc.DeploymentID != "" || len(doc.Modules) != 0 {
		t.Fatalf("lab-01 runs %+v", doc)
	}
	if v := showDevice(t, dir, "lab-01"); v.Kept == nil || !strings.Contains(v.Kept.Note, "no base deployment targets this device") {
		t.Fatalf("lab-01's view: %+v", v.Kept)
	}

	// The corpus's layered deployments: accepted, and merged on the base
	// (checked on a device without an agent: their docker modules are not
	// for this process-only agent).
	testenvCorpus(t)
	cli(t, dir, "device", "create", "plant-02", "--tag", "site=plant", "--tag", "corpus=yes").mustSucceed(t)
	envFile := filepath.Join(t.TempDir(), ".env")
	os.WriteFile(envFile, []byte("EDGEAGENT_SCHEMA_VERSION=1.1\nEDGEHUB_SCHEMA_VERSION=1.2\nEDGE_RUNTIME_VERSION=1.5\nMODULES.sample_module=registry.local/sample:1\n"), 0o600)
	cli(t, dir, "deployment", "create", "cli-layer", "--content", filepath.Join(corpusDir, "Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_layered.json"),
		"--layered", "--target-condition", "tags.corpus='yes'", "--priority", "40").mustSucceed(t)
	r := cli(t, dir, "deployment", "create", "tmpl-layer", "--content", filepath.Join(corpusDir, "Azure_iotedgedev__tests__assets__test_solution_shared_lib__layered_deployment.flattened_props.template.json"),
		"--env-file", envFile, "--layered", "--target-condition", "tags.corpus='yes'", "--priority", "41").mustSucceed(t)
	if !strings.Contains(r.stderr, "warning: $edgeAgent.properties.desired.systemModules") {
		t.Fatalf("no warning that the template's system modules are left out:\n%s", r.stderr)
	}
	v := showDevice(t, dir, "plant-02")
	if v.Document == nil || !slices.Equal(v.Document.Layers, []string{"cli-layer", "tmpl-layer"}) ||
		!slices.Equal(v.Document.Modules["mymodule0"], []string{"cli-layer"}) || !slices.Equal(v.Document.Modules["sample_module"], []string{"tmpl-layer"}) ||
		v.Document.Routes["route0"] != "cli-layer" || v.Document.Routes["route"] != "tmpl-layer" || !slices.Equal(v.Document.Modules["a"], []string{"base"}) {
		t.Fatalf("plant-02's document: %+v", v.Document)
	}
}

// testenvCorpus skips without the shared corpus (fails under CI).
func testenvCorpus(t *testing.T) {
	t.Helper()
	corpusFiles(t)
}

// TestUntargeted_EndToEnd (issue 17, acceptance 2): deleting the only
// deployment leaves the agent's modules running, the same processes;
// `device reset` removes them.
func TestUntargeted_EndToEnd(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	token := enrollmentToken(t, dir, "plant", "site=plant")
	out := t.TempDir()
	startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-01", "--enroll-token", token, "--data-dir", t.TempDir())
	m := processManifest(t, out, map[string]map[string]any{"a": module("running", "always", nil), "b": module("running", "always", nil)})
	cli(t, dir, "deployment", "create", "only", "--content", m, "--target-condition", "*", "--priority", "1").mustSucceed(t)
	eventually(t, "a and b run, reported", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		return doc.DeploymentID == "only" && doc.Modules["a"].RuntimeStatus == fleet.RuntimeRunning && doc.Modules["b"].RuntimeStatus == fleet.RuntimeRunning
	})
	aPid, _ := alivePid(out, "a")
	bPid, _ := alivePid(out, "b")
	cli(t, dir, "deployment", "delete", "only").mustSucceed(t)
	// The device keeps what it runs: device show says so, and the same
	// processes run on (checked past several of the agent's resyncs and a
	// report).
	eventually(t, "device show: keeping only", 30*time.Second, func() bool {
		v := showDevice(t, dir, "press-01")
		return v.Kept != nil && strings.HasPrefix(v.Kept.Note, "no deployment targets this device; keeping only v")
	})
	time.Sleep(3 * time.Second)
	for name, pid := range map[string]int{"a": aPid, "b": bPid} {
		if got, ok := alivePid(out, name); !ok || got != pid || !processAlive(pid) {
			t.Fatalf("%s: pid %d alive %v, was %d", name, got, ok, pid)
		}
	}
	if doc, _ := reported(t, dir, "press-01"); doc.DeploymentID != "only" || doc.Modules["a"].RuntimeStatus != fleet.RuntimeRunning {
		t.Fatalf("the agent reports %+v", doc)
	}
	if show := cli(t, dir, "device", "show", "press-01").mustSucceed(t).stdout; !strings.Contains(show, "no deployment targets this device; keeping only v") {
		t.Fatalf("device show:\n%s", show)
	}
	// Reset: the modules go.
	cli(t, dir, "device", "reset", "press-01").mustSucceed(t)
	eventually(t, "a and b removed, the device reports nothing running", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		return !processAlive(aPid) && !processAlive(bPid) && doc.DeploymentID == "" && len(doc.Modules) == 0
	})
	if v := showDevice(t, dir, "press-01"); v.Kept == nil || v.Kept.ResetPending || !strings.HasSuffix(v.Kept.Note, "it runs nothing") {
		t.Fatalf("after the reset: %+v", v.Kept)
	}
}

// TestStatus_SimFleet (issue 17, acceptance 4): on a simulated fleet where
// some devices fail, Azure's own system metric queries (module-level,
// run as custom metrics) give the same counts as the built-in metrics; a
// simulated device that is killed shows as offline once out of contact
// for --offline-after, beside its health.
func TestStatus_SimFleet(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir, "--offline-after", "2s")
	token := enrollmentToken(t, dir, "fleet", "site=plant")
	cli(t, dir, "deployment", "create", "fleet-v1", "--content", writeManifest(t), "--target-condition", "tags.site='plant'", "--priority", "1").mustSucceed(t)
	var dep api.DeploymentView
	json.Unmarshal([]byte(cli(t, dir, "deployment", "show", "fleet-v1", "-o", "json").mustSucceed(t).stdout), &dep)
	args := []string{"deployment", "update", "fleet-v1"}
	for name, q := range dep.SystemMetrics.Queries {
		args = append(args, "--metric", "azure-"+name+"="+q)
	}
	cli(t, dir, args...).mustSucceed(t)
	startSim(t, srv.mqttURL(), token, "ok", 12, "--ca-file", srv.caFile())
	startSim(t, srv.mqttURL(), token, "bad", 8, "--ca-file", srv.caFile(), "--fail-share", "0.5")
	kill := startSimProc(t, srv.mqttURL(), token, "gone", 1, "--ca-file", srv.caFile())
	var st api.DeploymentStatus
	eventually(t, "21 devices reported", 60*time.Second, func() bool {
		st = deploymentStatus(t, dir, "fleet-v1")
		return st.Counts.Applied == 21 && st.Counts.Unknown == 0
	})
	if st.SystemMetrics["reportedFailedCount"] == 0 || st.SystemMetrics["reportedSuccessfulCount"] == 0 {
		t.Fatalf("want both outcomes in the fleet: %v", st.SystemMetrics)
	}
	for name, v := range st.SystemMetrics {
		if st.Metrics["azure-"+name] != v {
			t.Fatalf("%s: built in %d, Azure's query %q counts %d", name, v, dep.SystemMetrics.Queries[name], st.Metrics["azure-"+name])
		}
	}
	kill()
	eventually(t, "the killed device offline", 30*time.Second, func() bool {
		st = deploymentStatus(t, dir, "fleet-v1")
		return slices.Equal(st.Devices[api.CategoryOffline], []string{"gone-0001"})
	})
	v := showDevice(t, dir, "gone-0001")
	// Beside its health: what its last report said (running, soaking or
	// healthy by the soak), never turned into something else.
	if v.Presence != api.PresenceOffline || v.LastContactTime == nil || (v.Health != api.CategoryHealthy && v.Health != api.CategorySoaking) {
		t.Fatalf("gone-0001: presence %q, last contact %v, health %q", v.Presence, v.LastContactTime, v.Health)
	}
}

// startSimProc starts `appliance sim` and returns what kills it (the
// test's end does too, and shows its log if the test failed).
func startSimProc(t *testing.T, mqttURL, token, prefix string, devices int, extra ...string) (kill func()) {
	t.Helper()
	args := append([]string{"sim", "--server", mqttURL, "--devices", fmt.Sprint(devices), "--enroll-token", token, "--prefix", prefix}, extra...)
	cmd := exec.Command(binary, args...)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	kill = func() {
		select {
		case <-done:
		default:
			cmd.Process.Signal(syscall.SIGKILL)
			<-done
		}
	}
	t.Cleanup(func() {
		kill()
		if t.Failed() {
			t.Logf("sim %s log:\n%s", prefix, logs.String())
		}
	})
	return kill
}

// TestImport_ConfigurationObjects (issue 17, acceptance 5): a whole IoT
// Hub configuration object given to `deployment create --content` keeps
// its targetCondition, priority, labels and metrics unless a flag gives
// them, and the CLI says which came from where; the corpus's own
// configuration objects are taken whole.
func TestImport_ConfigurationObjects(t *testing.T) {
	dir := t.TempDir()
	startServer(t, dir)
	cli(t, dir, "device", "create", "d1", "--tag", "environment=prod", "--tag", "building=9").mustSucceed(t)
	// As `az iot edge deployment show` prints it.
	var content map[string]any
	json.Unmarshal([]byte(edgeManifest(map[string]any{})), &content)
	obj := map[string]any{
		"id": "from-azure", "schemaVersion": "1.0", "content": content, "contentType": "assignment",
		"targetCondition": "tags.environment='prod'", "priority": 7, "labels": map[string]string{"team": "plant", "ring": "1"},
		"metrics":        map[string]any{"queries": map[string]string{"ok": "SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200"}, "results": map[string]int{}},
		"systemMetrics":  map[string]any{"queries": map[string]string{}, "results": map[string]int{"targetedCount": 3}},
		"createdTimeUtc": "2024-01-01T00:00:00Z", "lastUpdatedTimeUtc": "2024-01-01T00:00:00Z", "etag": "MQ==",
	}
	file := writeJSONFile(t, "config.json", obj)
	r := cli(t, dir, "deployment", "create", "imported", "--content", file, "-o", "json").mustSucceed(t)
	var d api.DeploymentView
	if err := json.Unmarshal([]byte(r.stdout), &d); err != nil {
		t.Fatal(err)
	}
	if d.TargetCondition != "tags.environment='prod'" || d.Priority != 7 || d.Labels["team"] != "plant" || d.Labels["ring"] != "1" || d.Metrics.Queries["ok"] == "" || d.SystemMetrics.Results["appliedCount"] != 1 {
		t.Fatalf("imported %+v", d.Deployment)
	}
	for _, want := range []string{`note: the file's id is "from-azure"; the deployment is created as "imported"`, "targetCondition: from the file", "priority: from the file", "labels: ring, team from the file", "metrics: ok from the file"} {
		if !strings.Contains(r.stderr, want) {
			t.Fatalf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	// Flags override the file, per field (and per label or metric).
	r = cli(t, dir, "deployment", "create", "overridden", "--content", file, "--priority", "9", "--target-condition", "tags.building=9", "--label", "ring=2", "-o", "json").mustSucceed(t)
	json.Unmarshal([]byte(r.stdout), &d)
	if d.Priority != 9 || d.TargetCondition != "tags.building=9" || d.Labels["ring"] != "2" || d.Labels["team"] != "plant" || d.Metrics.Queries["ok"] == "" {
		t.Fatalf("overridden %+v", d.Deployment)
	}
	for _, want := range []string{"targetCondition: from --target-condition", "priority: from --priority", "labels: team from the file; ring from --label"} {
		if !strings.Contains(r.stderr, want) {
			t.Fatalf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	// The corpus's whole configuration objects.
	testenvCorpus(t)
	for name, want := range map[string]string{
		"Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment.json":         "mymetric",
		"Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_layered.json": "mymetric",
	} {
		args := []string{"deployment", "create", "corpus-" + fmt.Sprint(len(name)), "--content", filepath.Join(corpusDir, name), "-o", "json"}
		if strings.Contains(name, "layered") {
			args = append(args, "--layered")
		}
		r := cli(t, dir, args...).mustSucceed(t)
		var d api.DeploymentView
		json.Unmarshal([]byte(r.stdout), &d)
		if d.Metrics.Queries[want] != "SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200" || !strings.Contains(r.stderr, "metrics: "+want+" from the file") {
			t.Fatalf("%s: metrics %v\n%s", name, d.Metrics.Queries, r.stderr)
		}
	}
}
