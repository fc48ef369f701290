//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// agentProc is one `appliance agent` process.
type agentProc struct {
	cmd    *exec.Cmd
	logs   *syncBuffer
	exited chan struct{}
	// dataDir is the agent's --data-dir where the test chose it (the
	// modules' output is kept below it, in logs/modules/), else "".
	dataDir string
}

func startAgent(t *testing.T, args ...string) *agentProc {
	t.Helper()
	// The hub on a port of its own: tests run agents side by side (those
	// that test the hub with the Azure SDK give --hub-addr 127.0.0.x:8883).
	return startAgentOf(t, binary, append([]string{"--hub-addr", "127.0.0.1:0"}, args...)...)
}

// startAgentOf is startAgent with the binary bin, which may be another
// release: only the flags every release has are added to args.
func startAgentOf(t *testing.T, bin string, args ...string) *agentProc {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"agent", "--runtime", "process", "--restart-cool-off", "300ms"}, args...)...)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a := &agentProc{cmd: cmd, logs: logs, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		a.kill()
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	return a
}

func (a *agentProc) kill() {
	select {
	case <-a.exited:
	default:
		a.cmd.Process.Signal(syscall.SIGKILL)
		<-a.exited
	}
}

// processManifest is a deployment of process modules running the test
// module, each writing its pid and starts into out.
func processManifest(t *testing.T, out string, modules map[string]map[string]any) string {
	t.Helper()
	mods := map[string]any{}
	for name, m := range modules {
		env := map[string]any{"MODULE_OUT": map[string]any{"value": out}}
		for k, v := range m["env"].(map[string]string) {
			env[k] = map[string]any{"value": v}
		}
		mods[name] = map[string]any{
			"type": "process", "status": m["status"], "restartPolicy": m["restartPolicy"],
			"env": env, "settings": map[string]any{"command": []string{moduleBinary}},
		}
	}
	b := edgeManifest(mods)
	path := filepath.Join(t.TempDir(), "manifest.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// edgeManifest wraps modules in an Azure IoT Edge deployment manifest
// (modulesContent with the system modules and no routes).
func edgeManifest(modules map[string]any) []byte {
	content := map[string]any{"modulesContent": map[string]any{
		"$edgeAgent": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"runtime":       map[string]any{"type": "docker", "settings": map[string]any{}},
			"systemModules": map[string]any{
				"edgeAgent": map[string]any{"type": "docker", "settings": map[string]any{"image": "appliance/agent"}},
				"edgeHub":   map[string]any{"type": "docker", "status": "running", "restartPolicy": "always", "settings": map[string]any{"image": "appliance/hub"}},
			},
			"modules": modules,
		}},
		"$edgeHub": map[string]any{"properties.desired": map[string]any{"schemaVersion": "1.1", "routes": map[string]any{}}},
	}}
	b, err := json.Marshal(content)
	if err != nil {
		panic(err)
	}
	return b
}

func module(status, policy string, env map[string]string) map[string]any {
	if env == nil {
		env = map[string]string{}
	}
	return map[string]any{"status": status, "restartPolicy": policy, "env": env}
}

// alivePid returns the pid a module wrote and whether that process lives.
func alivePid(out, name string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(out, name+".pid"))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	// A zombie or a dead pid both count as not running.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil || bytes.Contains(stat, []byte(") Z ")) {
		return pid, false
	}
	return pid, true
}

// startedPids lists the pids of every start a module recorded.
func startedPids(out, name string) []int {
	b, _ := os.ReadFile(filepath.Join(out, name+".starts"))
	var pids []int
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			if pid, err := strconv.Atoi(f[0]); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// processAlive tells whether pid runs (a zombie does not count).
func processAlive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !bytes.Contains(stat, []byte(") Z "))
}

func starts(out, name string) int {
	b, _ := os.ReadFile(filepath.Join(out, name+".starts"))
	return strings.Count(string(b), "\n")
}

func eventually(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	timeout = testutil.Bound(timeout)
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// reported reads the device's last reported document as the CLI shows it.
func reported(t *testing.T, dataDir, id string) (fleet.ReportedDocument, time.Time) {
	t.Helper()
	r := cli(t, dataDir, "device", "show", id, "-o", "json")
	if r.code != 0 {
		return fleet.ReportedDocument{}, time.Time{}
	}
	var v struct {
		Reported *struct {
			Document fleet.ReportedDocument `json:"document"`
			Received time.Time              `json:"receivedTimeUtc"`
		} `json:"reported"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || v.Reported == nil {
		return fleet.ReportedDocument{}, time.Time{}
	}
	return v.Reported.Document, v.Reported.Received
}

// freePort is a loopback address for a process to bind later (see
// testutil.FreeAddr for why not ":0").
func freePort(t *testing.T) string {
	t.Helper()
	return testutil.FreeAddr(t, "127.0.0.1")
}

// TestAgent_EndToEnd runs the seed's loop with real processes: a controller,
// an agent that enrolls itself, deployments of process modules, restart
// policies, and the controller and the agent dying.
func TestAgent_EndToEnd(t *testing.T) {
	dir := t.TempDir()
	mqttAddr := freePort(t) // fixed across the controller's restart below
	srv := startServer(t, dir, "--mqtt-addr", mqttAddr)

	r := cli(t, dir, "enrollment", "create", "line-1", "--tag", "environment=prod", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	json.Unmarshal([]byte(r.stdout), &enr)
	out := t.TempDir()
	agentDir := t.TempDir()
	agentArgs := []string{"--server", "mqtts://" + mqttAddr, "--ca-file", srv.caFile(), "--device-id", "press-01", "--enroll-token", enr.Token, "--data-dir", agentDir}
	ag1 := startAgent(t, agentArgs...)

	// 1. Two process modules run; the device reports 200 and both running.
	v1 := processManifest(t, out, map[string]map[string]any{
		"alpha": module("running", "always", nil),
		"beta":  module("running", "always", nil),
	})
	cli(t, dir, "deployment", "create", "v1", "--content", v1, "--target-condition", "tags.environment='prod'", "--priority", "1").mustSucceed(t)
	eventually(t, "both modules running", 30*time.Second, func() bool {
		_, a := alivePid(out, "alpha")
		_, b := alivePid(out, "beta")
		return a && b
	})
	eventually(t, "report: code 200, alpha and beta running", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		return doc.LastDesiredStatus.Code == 200 && doc.DeploymentID == "v1" &&
			doc.Modules["alpha"].RuntimeStatus == fleet.RuntimeRunning && doc.Modules["beta"].RuntimeStatus == fleet.RuntimeRunning
	})
	betaPid, _ := alivePid(out, "beta")
	eventually(t, "deployment status: 1 applied, 1 healthy after a 1s soak", 30*time.Second, func() bool {
		r := cli(t, dir, "deployment", "status", "v1", "--soak", "1s", "-o", "json")
		var st struct {
			Counts struct{ Targeted, Applied, Healthy int }
		}
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &st) == nil &&
			st.Counts.Targeted == 1 && st.Counts.Applied == 1 && st.Counts.Healthy == 1
	})
	if r := cli(t, dir, "deployment", "status", "v1").mustSucceed(t); !strings.Contains(r.stdout, "healthy") || !strings.Contains(r.stdout, "reportedSuccessfulCount=1") {
		t.Fatalf("status table:\n%s", r.stdout)
	}

	// 2. A new deployment takes over: alpha stopped, beta removed, gamma
	// fails under on-failure, delta fails under never, keep runs.
	v2 := processManifest(t, out, map[string]map[string]any{
		"alpha": module("stopped", "always", nil),
		"gamma": module("running", "on-failure", map[string]string{"MODULE_EXIT_AFTER": "200ms", "MODULE_EXIT_CODE": "3"}),
		"delta": module("running", "never", map[string]string{"MODULE_EXIT_AFTER": "200ms", "MODULE_EXIT_CODE": "4"}),
		"keep":  module("running", "always", nil),
	})
	cli(t, dir, "deployment", "create", "v2", "--content", v2, "--target-condition", "tags.environment='prod'", "--priority", "2").mustSucceed(t)
	eventually(t, "alpha stopped and beta killed", 30*time.Second, func() bool {
		_, a := alivePid(out, "alpha")
		_, b := alivePid(out, "beta")
		return !a && !b
	})
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", betaPid)); err == nil {
		if _, alive := alivePid(out, "beta"); alive {
			t.Fatalf("beta (pid %d) still runs after leaving the manifest", betaPid)
		}
	}
	eventually(t, "gamma restarted with backoff, delta failed with exit code 4", 60*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		g, d := doc.Modules["gamma"], doc.Modules["delta"]
		_, hasBeta := doc.Modules["beta"]
		return doc.DeploymentID == "v2" && !hasBeta && g.RestartCount >= 2 && starts(out, "gamma") >= 3 &&
			d.RuntimeStatus == fleet.RuntimeFailed && d.ExitCode == 4 && starts(out, "delta") == 1 &&
			doc.Modules["alpha"].RuntimeStatus == fleet.RuntimeStopped
	})

	// device show tells an operator which deployment applies and why, and
	// which module failed with which exit code.
	show := cli(t, dir, "device", "show", "press-01").mustSucceed(t).stdout
	for _, want := range []string{"Connected", "v2 ", "Applied", "v1 ", "Targeted", "delta", "failed", " 4 "} {
		if !strings.Contains(show, want) {
			t.Fatalf("device show lacks %q:\n%s", want, show)
		}
	}
	t.Logf("device show:\n%s", show)

	// 3. The controller dies: modules keep running.
	keepPid, ok := alivePid(out, "keep")
	if !ok {
		t.Fatal("keep is not running")
	}
	srv.kill()
	time.Sleep(time.Second)
	if pid, ok := alivePid(out, "keep"); !ok || pid != keepPid {
		t.Fatalf("keep stopped when the controller died (pid %d alive %v)", pid, ok)
	}
	// The agent dies and restarts while the controller is still down: it
	// runs its modules again from its local state.
	keepStarts := starts(out, "keep")
	ag1.kill()
	startAgent(t, agentArgs...)
	eventually(t, "keep started again by the restarted agent, offline", 30*time.Second, func() bool {
		_, ok := alivePid(out, "keep")
		return ok && starts(out, "keep") > keepStarts
	})

	// The controller comes back on the same address: the agent reconnects
	// and reports.
	back := time.Now().UTC()
	startServer(t, dir, "--mqtt-addr", mqttAddr)
	eventually(t, "a report after the controller returned", 60*time.Second, func() bool {
		doc, at := reported(t, dir, "press-01")
		return at.After(back) && doc.DeploymentID == "v2" && doc.Modules["keep"].RuntimeStatus == fleet.RuntimeRunning
	})
}
