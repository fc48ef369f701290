package agent

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/linelog"
)

const waitLong = 15 * time.Second

func TestAgent_ProcessModules_Lifecycle(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	rec := &recordingHandler{}
	cfg.Logger = slogTee(cfg.Logger, rec)
	a := startAgent(t, cfg)

	alpha := processModule(out, map[string]string{"GREETING": "hello-alpha"}).with("startupOrder", 0)
	beta := processModule(out, nil).with("startupOrder", 1)
	a.send(t, desired(1, "dep-1", map[string]mod{"alpha": alpha, "beta": beta}))

	doc := waitReport(t, a.Agent, waitLong, "both modules running", running("alpha", "beta"))
	if doc.LastDesiredVersion != 1 || doc.LastDesiredStatus.Code != fleet.StatusCodeOK || doc.DeploymentID != "dep-1" {
		t.Errorf("report: version %d status %+v deployment %q; want 1, 200, dep-1", doc.LastDesiredVersion, doc.LastDesiredStatus, doc.DeploymentID)
	}
	if doc.DeviceHealth != "healthy" || doc.Version != "test" || doc.Runtime.Platform.OS == "" {
		t.Errorf("report: health %q version %q platform %+v", doc.DeviceHealth, doc.Version, doc.Runtime.Platform)
	}
	if m := doc.Modules["alpha"]; m.Settings.Image != moduleBin || m.LastStartTimeUTC == nil || m.Status != "running" {
		t.Errorf("alpha: %+v", m)
	}
	if doc.SystemModules["edgeHub"].Settings.Image != "mcr.microsoft.com/azureiotedge-hub:1.5" || doc.SystemModules["edgeAgent"].RuntimeStatus != fleet.RuntimeRunning {
		t.Errorf("systemModules not echoed: %+v", doc.SystemModules)
	}
	// Observable outside the agent: both write their pids and are alive.
	var alphaPid, betaPid int
	waitFor(t, waitLong, "pid files", func() bool {
		alphaPid, betaPid = readPid(out, "alpha"), readPid(out, "beta")
		return alive(alphaPid) && alive(betaPid)
	})
	if l := startLines(out, "alpha"); len(l) != 1 || !strings.HasSuffix(l[0], " hello-alpha") {
		t.Errorf("alpha did not get its env: starts %q", l)
	}
	// Its output is kept in its own log, not the agent's.
	waitFor(t, waitLong, "alpha's output in its log", func() bool {
		res, _ := linelog.Read(filepath.Join(cfg.DataDir, "logs", "modules", "alpha.log"), linelog.Filter{})
		return len(res.Entries) >= 2
	})
	if rec.contains("started, pid") || rec.contains("writes to stderr too") {
		t.Errorf("a module's output reached the agent's log")
	}

	// Desired status stopped: beta gets SIGTERM and stops; alpha untouched.
	a.send(t, desired(2, "dep-1", map[string]mod{"alpha": alpha, "beta": beta.with("status", "stopped")}))
	doc = waitReport(t, a.Agent, waitLong, "beta stopped", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 2 && d.Modules["beta"].RuntimeStatus == fleet.RuntimeStopped
	})
	waitFor(t, waitLong, "beta's process to exit", func() bool { return !alive(betaPid) })
	if _, err := os.Stat(filepath.Join(out, "beta.term")); err != nil {
		t.Errorf("beta was not stopped with SIGTERM: %v", err)
	}
	if doc.Modules["beta"].Status != "stopped" || doc.DeviceHealth != "healthy" {
		t.Errorf("beta: %+v, health %q", doc.Modules["beta"], doc.DeviceHealth)
	}

	// Running again.
	a.send(t, desired(3, "dep-1", map[string]mod{"alpha": alpha, "beta": beta}))
	waitReport(t, a.Agent, waitLong, "beta running again", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 3 && d.Modules["beta"].RuntimeStatus == fleet.RuntimeRunning
	})
	waitFor(t, waitLong, "a new beta process", func() bool {
		p := readPid(out, "beta")
		if p != betaPid && alive(p) {
			betaPid = p
			return true
		}
		return false
	})

	// A new deployment without beta: beta is killed; alpha, unchanged, is
	// not restarted.
	a.send(t, desired(4, "dep-2", map[string]mod{"alpha": alpha}))
	doc = waitReport(t, a.Agent, waitLong, "beta removed", func(d fleet.ReportedDocument) bool {
		_, has := d.Modules["beta"]
		return d.LastDesiredVersion == 4 && !has
	})
	waitFor(t, waitLong, "beta's process to die", func() bool { return !alive(betaPid) })
	if doc.DeploymentID != "dep-2" || readPid(out, "alpha") != alphaPid || !alive(alphaPid) {
		t.Errorf("alpha was disturbed: pid %d → %d alive %v", alphaPid, readPid(out, "alpha"), alive(alphaPid))
	}

	// An env change replaces alpha's process.
	a.send(t, desired(5, "dep-2", map[string]mod{"alpha": processModule(out, map[string]string{"GREETING": "changed"})}))
	waitFor(t, waitLong, "alpha replaced", func() bool {
		l := startLines(out, "alpha")
		return len(l) == 2 && strings.HasSuffix(l[1], " changed") && alive(readPid(out, "alpha"))
	})
	if alive(alphaPid) {
		t.Errorf("the old alpha process %d still runs", alphaPid)
	}
	alphaPid = readPid(out, "alpha")

	// The explicit empty desired state removes everything.
	a.send(t, fleet.DesiredDocument{Version: 6})
	doc = waitReport(t, a.Agent, waitLong, "no modules", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 6 && len(d.Modules) == 0
	})
	if doc.LastDesiredStatus.Code != fleet.StatusCodeOK || doc.DeploymentID != "" {
		t.Errorf("empty desired state: status %+v deployment %q", doc.LastDesiredStatus, doc.DeploymentID)
	}
	waitFor(t, waitLong, "alpha's process to die", func() bool { return !alive(alphaPid) })
}

func TestAgent_RestartPolicies(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	a := startAgent(t, cfg)
	exiting := func(code string) mod {
		return processModule(out, map[string]string{"MODULE_EXIT_AFTER": "30ms", "MODULE_EXIT_CODE": code})
	}
	a.send(t, desired(1, "dep", map[string]mod{
		"flaky":   exiting("3").with("restartPolicy", "on-failure"),
		"once":    exiting("4").with("restartPolicy", "never"),
		"clean":   exiting("0").with("restartPolicy", "on-failure"),
		"forever": exiting("0").with("restartPolicy", "always"),
	}))
	doc := waitReport(t, a.Agent, waitLong, "flaky restarted 4 times", func(d fleet.ReportedDocument) bool {
		return d.Modules["flaky"].RestartCount >= 4 && d.Modules["forever"].RestartCount >= 2 &&
			d.Modules["once"].RuntimeStatus == fleet.RuntimeFailed && d.Modules["clean"].RuntimeStatus == fleet.RuntimeStopped
	})
	if m := doc.Modules["once"]; m.ExitCode != 4 || m.RestartCount != 0 || m.LastExitTimeUTC == nil {
		t.Errorf("never: %+v; want failed, exit code 4, no restart", m)
	}
	if m := doc.Modules["clean"]; m.ExitCode != 0 || m.RestartCount != 0 {
		t.Errorf("on-failure after exit 0: %+v; want stopped, no restart", m)
	}
	if m := doc.Modules["flaky"]; m.ExitCode != 3 || m.LastRestartTimeUTC == nil {
		t.Errorf("flaky: %+v", m)
	}
	if doc.LastDesiredStatus.Code != fleet.StatusCodeOK || doc.DeviceHealth != "unhealthy" {
		t.Errorf("status %+v health %q; want 200 (the plan was applied) and unhealthy", doc.LastDesiredStatus, doc.DeviceHealth)
	}
	// The backoff doubles: each restart comes no sooner than its cool-off
	// after the previous start (the process ran and exited in between), and
	// the cool-offs grow from 50 ms to 400 ms. A slow machine only makes the
	// gaps longer; a backoff that did not grow restarts flaky the fourth
	// time well before 400 ms on any machine that runs it in less.
	waitFor(t, waitLong, "flaky's fifth start line", func() bool { return len(startLines(out, "flaky")) >= 5 })
	lines := startLines(out, "flaky")
	var at []int64
	for _, l := range lines {
		f := strings.Fields(l)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		at = append(at, n)
	}
	if len(at) < 5 {
		t.Fatalf("flaky started %d times", len(at))
	}
	for i := range 4 {
		// edgeAgent's rule (RestartConfig): CoolOff·2^n, at most MaxCoolOff.
		gap, coolOff := time.Duration(at[i+1]-at[i]), min(cfg.Restart.CoolOff<<i, cfg.Restart.MaxCoolOff)
		if gap < coolOff {
			t.Errorf("flaky's restart %d came %v after its previous start, before its cool-off of %v", i+1, gap, coolOff)
		}
	}
	// never stays failed.
	time.Sleep(300 * time.Millisecond)
	if l := startLines(out, "once"); len(l) != 1 {
		t.Errorf("a never module was started %d times", len(l))
	}
}

func TestAgent_GivesUpThenNewVersionRevives(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	cfg.Restart.MaxRestarts = 2
	a := startAgent(t, cfg)
	crash := processModule(out, map[string]string{"MODULE_EXIT_AFTER": "20ms", "MODULE_EXIT_CODE": "1"}).with("restartPolicy", "on-failure")
	a.send(t, desired(1, "dep", map[string]mod{"crash": crash}))
	doc := waitReport(t, a.Agent, waitLong, "crash dead", func(d fleet.ReportedDocument) bool {
		return d.Modules["crash"].RuntimeStatus == fleet.RuntimeDead
	})
	if m := doc.Modules["crash"]; m.RestartCount != 2 || !strings.Contains(m.StatusDescription, "gave up") {
		t.Errorf("dead module: %+v", m)
	}
	n := len(startLines(out, "crash"))
	time.Sleep(300 * time.Millisecond)
	if got := len(startLines(out, "crash")); got != n || n != 3 {
		t.Errorf("starts: %d then %d; want 3 (1 + 2 restarts) and no more", n, got)
	}
	// A new desired version is a fresh attempt.
	a.send(t, desired(2, "dep", map[string]mod{"crash": crash}))
	waitFor(t, waitLong, "crash started again", func() bool { return len(startLines(out, "crash")) > n })
}

func TestAgent_InvalidDesired_Refused_ModulesUntouched(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	a := startAgent(t, cfg)
	good := processModule(out, nil)
	a.send(t, desired(1, "dep", map[string]mod{"alpha": good}))
	waitReport(t, a.Agent, waitLong, "alpha running", running("alpha"))
	var pid int
	waitFor(t, waitLong, "alpha's pid", func() bool { pid = readPid(out, "alpha"); return alive(pid) })

	version := uint64(1)
	for _, tc := range []struct {
		name      string
		payload   func(v uint64) []byte
		code      int
		inDesc    string
		versioned bool // the refused document's version is reported
	}{
		{"bad JSON", func(v uint64) []byte {
			return []byte(`{"version": ` + strconv.FormatUint(v, 10) + `, "deploymentId": "dep", "modulesContent": {"$edgeAgent": `)
		}, 400, "invalid JSON", false},
		{"unknown restartPolicy", func(v uint64) []byte {
			return mustJSON(desired(v, "dep", map[string]mod{"alpha": good.with("restartPolicy", "sometimes")}))
		}, 400, "modulesContent.$edgeAgent.properties.desired.modules.alpha.restartPolicy", true},
		{"unknown module type", func(v uint64) []byte {
			return mustJSON(desired(v, "dep", map[string]mod{"alpha": good.with("type", "wasm")}))
		}, 400, "modules.alpha.type", true},
		{"unknown status", func(v uint64) []byte {
			return mustJSON(desired(v, "dep", map[string]mod{"alpha": good.with("status", "paused")}))
		}, 400, "modules.alpha.status", true},
		{"unsupported schemaVersion", func(v uint64) []byte {
			d := desired(v, "dep", map[string]mod{"alpha": good})
			d.ModulesContent = []byte(strings.Replace(string(d.ModulesContent), `"schemaVersion":"1.1","systemModules"`, `"schemaVersion":"9.9","systemModules"`, 1))
			return mustJSON(d)
		}, 412, "schemaVersion", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			version++
			a.offerDesired(tc.payload(version))
			doc := waitReport(t, a.Agent, waitLong, "refusal", func(d fleet.ReportedDocument) bool {
				return d.LastDesiredStatus.Code == tc.code
			})
			if !strings.Contains(doc.LastDesiredStatus.Description, tc.inDesc) {
				t.Errorf("description %q does not name %q", doc.LastDesiredStatus.Description, tc.inDesc)
			}
			if tc.versioned && doc.LastDesiredVersion != version {
				t.Errorf("lastDesiredVersion %d; want the refused version %d", doc.LastDesiredVersion, version)
			}
			if doc.Modules["alpha"].RuntimeStatus != fleet.RuntimeRunning || readPid(out, "alpha") != pid || !alive(pid) {
				t.Errorf("alpha disturbed: %+v, pid %d → %d", doc.Modules["alpha"], pid, readPid(out, "alpha"))
			}
			// A valid document afterwards is applied.
			version++
			a.send(t, desired(version, "dep", map[string]mod{"alpha": good}))
			waitReport(t, a.Agent, waitLong, "200 again", func(d fleet.ReportedDocument) bool {
				return d.LastDesiredVersion == version && d.LastDesiredStatus.Code == fleet.StatusCodeOK
			})
		})
	}
	if l := startLines(out, "alpha"); len(l) != 1 {
		t.Errorf("alpha started %d times; want once", len(l))
	}
}

func TestAgent_OlderVersionIgnored(t *testing.T) {
	out := t.TempDir()
	a := startAgent(t, testConfig(t))
	a.send(t, desired(5, "new", map[string]mod{"alpha": processModule(out, nil)}))
	waitReport(t, a.Agent, waitLong, "alpha running", running("alpha"))
	// Late: an older version, and the same version with other content.
	a.send(t, desired(3, "old", map[string]mod{"beta": processModule(out, nil)}))
	a.send(t, desired(5, "same", map[string]mod{"gamma": processModule(out, nil)}))
	// A newer one after them proves they were processed (in order) first.
	a.send(t, desired(6, "new", map[string]mod{"alpha": processModule(out, nil), "delta": processModule(out, nil)}))
	doc := waitReport(t, a.Agent, waitLong, "version 6", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 6 && d.Modules["delta"].RuntimeStatus == fleet.RuntimeRunning
	})
	if _, ok := doc.Modules["beta"]; ok || doc.DeploymentID != "new" {
		t.Errorf("an old document was applied: %+v", doc)
	}
	for _, m := range []string{"beta", "gamma"} {
		if _, err := os.Stat(filepath.Join(out, m+".starts")); err == nil {
			t.Errorf("module %s of an ignored document ran", m)
		}
	}
}

func TestAgent_RestartWhileOffline_RunsFromLocalState(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	a1 := startAgent(t, cfg)
	mods := map[string]mod{"alpha": processModule(out, nil), "beta": processModule(out, nil).with("status", "stopped")}
	a1.send(t, desired(7, "dep", mods))
	waitReport(t, a1.Agent, waitLong, "alpha running", running("alpha"))
	var pid1 int
	waitFor(t, waitLong, "alpha's pid", func() bool { pid1 = readPid(out, "alpha"); return alive(pid1) })

	// Process modules are the agent's children: they stop with it.
	a1.stop(t)
	if alive(pid1) {
		t.Fatalf("alpha (%d) outlived the agent", pid1)
	}

	// A new agent on the same data dir, no controller reachable, no
	// desired document sent: it runs what it last ran.
	cfg.Logger = testLogger(t)
	a2 := startAgent(t, cfg)
	doc := waitReport(t, a2.Agent, waitLong, "alpha running from local state", running("alpha"))
	if doc.LastDesiredVersion != 7 || doc.DeploymentID != "dep" || doc.Modules["beta"].RuntimeStatus != fleet.RuntimeStopped {
		t.Errorf("restored report: %+v", doc)
	}
	var pid2 int
	waitFor(t, waitLong, "alpha restarted", func() bool { pid2 = readPid(out, "alpha"); return pid2 != pid1 && alive(pid2) })
	if _, err := os.Stat(filepath.Join(out, "beta.starts")); err == nil {
		t.Error("beta, desired stopped, was started")
	}

	// Still offline: a module killed behind the agent's back is restarted.
	if err := syscall.Kill(pid2, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, waitLong, "alpha restarted after SIGKILL", func() bool {
		p := readPid(out, "alpha")
		return p != pid2 && alive(p)
	})
	doc = waitReport(t, a2.Agent, waitLong, "restart counted", func(d fleet.ReportedDocument) bool {
		return d.Modules["alpha"].RestartCount == 1 && d.Modules["alpha"].RuntimeStatus == fleet.RuntimeRunning
	})
	if doc.Modules["alpha"].ExitCode != 137 {
		t.Errorf("exit code after SIGKILL: %d; want 137", doc.Modules["alpha"].ExitCode)
	}
	// An older version arriving late is still ignored after the restart.
	a2.send(t, desired(6, "old", map[string]mod{}))
	time.Sleep(100 * time.Millisecond)
	if d, _ := a2.Status(); d.LastDesiredVersion != 7 || len(d.Modules) != 2 {
		t.Errorf("old document applied after restart: %+v", d)
	}
}

func TestAgent_DataDirLocked(t *testing.T) {
	cfg := testConfig(t)
	a1 := startAgent(t, cfg)
	a1.send(t, desired(1, "dep", map[string]mod{}))
	waitReport(t, a1.Agent, waitLong, "first agent up", func(fleet.ReportedDocument) bool { return true })
	a2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a2.Run(ctx); !errorsIs(err, ErrDataDirLocked) {
		t.Errorf("second agent on the same data dir: %v; want ErrDataDirLocked", err)
	}
}

func TestAgent_UnsupportedModuleType_417(t *testing.T) {
	out := t.TempDir()
	a := startAgent(t, testConfig(t))
	a.send(t, desired(1, "dep", map[string]mod{
		"native": processModule(out, nil),
		"web": {"type": "docker", "status": "running", "restartPolicy": "always",
			"settings": map[string]any{"image": "nginx:1.27"}},
	}))
	doc := waitReport(t, a.Agent, waitLong, "417", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredStatus.Code == fleet.StatusCodeUnsupportedRuntime && d.Modules["native"].RuntimeStatus == fleet.RuntimeRunning
	})
	web := doc.Modules["web"]
	if web.RuntimeStatus != fleet.RuntimeFailed || !strings.Contains(web.StatusDescription, "docker") || !strings.Contains(web.StatusDescription, "process runtime") {
		t.Errorf("web: %+v", web)
	}
	if !strings.Contains(doc.LastDesiredStatus.Description, "web") {
		t.Errorf("description %q does not name the module", doc.LastDesiredStatus.Description)
	}
}

func TestAgent_ProcessStartFailure_500_ThenRecovers(t *testing.T) {
	out := t.TempDir()
	prog := filepath.Join(t.TempDir(), "late")
	a := startAgent(t, testConfig(t))
	a.send(t, desired(1, "dep", map[string]mod{
		"late": processModule(out, nil).with("settings", map[string]any{"command": []string{prog}}),
	}))
	doc := waitReport(t, a.Agent, waitLong, "500", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredStatus.Code == fleet.StatusCodeFailed
	})
	if m := doc.Modules["late"]; m.RuntimeStatus != fleet.RuntimeFailed || !strings.Contains(m.StatusDescription, prog) {
		t.Errorf("late: %+v", m)
	}
	// The program appears: the next retry starts it.
	b, err := os.ReadFile(moduleBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(prog, b, 0o755); err != nil {
		t.Fatal(err)
	}
	waitReport(t, a.Agent, waitLong, "200 after the retry", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredStatus.Code == fleet.StatusCodeOK && d.Modules["late"].RuntimeStatus == fleet.RuntimeRunning
	})
}

func TestProcessDriver_RemoveKillsProcessGroup(t *testing.T) {
	out := t.TempDir()
	a := startAgent(t, testConfig(t))
	a.send(t, desired(1, "dep", map[string]mod{"parent": processModule(out, map[string]string{"MODULE_GRANDCHILD": "1"})}))
	var child int
	waitFor(t, waitLong, "grandchild", func() bool {
		b, _ := os.ReadFile(filepath.Join(out, "parent.child.pid"))
		child, _ = strconv.Atoi(string(b))
		return alive(child)
	})
	a.send(t, desired(2, "dep", map[string]mod{}))
	waitFor(t, waitLong, "grandchild killed with its module", func() bool { return !alive(child) })
}

func TestProcessDriver_CleansUpLeftoversOfAKilledAgent(t *testing.T) {
	out := t.TempDir()
	cfg := testConfig(t)
	// What a SIGKILLed agent leaves: a module's process group whose leader
	// the kernel killed (parent-death signal) and a grandchild that lives
	// on, plus the pid record.
	start := func() (leader, child int) {
		cmd := exec.Command(moduleBin)
		cmd.Env = []string{"MODULE_OUT=" + out, "MODULE_GRANDCHILD=1", "IOTEDGE_MODULEID=left"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
		waitFor(t, waitLong, "grandchild", func() bool {
			b, _ := os.ReadFile(filepath.Join(out, "left.child.pid"))
			child, _ = strconv.Atoi(string(b))
			return alive(child)
		})
		os.Remove(filepath.Join(out, "left.child.pid"))
		return cmd.Process.Pid, child
	}
	runDir := filepath.Join(cfg.DataDir, "process")
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeRec := func(name string, pid int, ticks uint64) {
		b := mustJSON(pidRecord{Module: "left", PID: pid, StartTicks: ticks, BootID: bootID()})
		if err := os.WriteFile(filepath.Join(runDir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ours, ourChild := start()
	ticks, err := procStartTicks(ours)
	if err != nil {
		t.Fatal(err)
	}
	writeRec("ours.json", ours, ticks)
	// A record whose start time is later than the group's processes: pid
	// reuse; those processes are not the agent's and must survive.
	other, otherChild := start()
	oticks, _ := procStartTicks(other)
	writeRec("reused.json", other, oticks+1_000_000)

	d, err := newProcessDriver(cfg, func() {})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	waitFor(t, waitLong, "leftovers killed", func() bool { return !alive(ours) && !alive(ourChild) })
	if !alive(other) || !alive(otherChild) {
		t.Error("processes that only share a reused pid were killed")
	}
	if entries, _ := os.ReadDir(runDir); len(entries) != 0 {
		t.Errorf("pid records left: %v", entries)
	}
}
