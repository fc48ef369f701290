//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
)

type statusView struct {
	Counts struct {
		Targeted, Applied, Healthy, Unhealthy, Soaking, Unknown int
	}
	SystemMetrics map[string]int
	Devices       map[string][]string
}

// status reads a deployment's status through the CLI, with a 1 s soak.
func status(t *testing.T, dir, id string) statusView {
	t.Helper()
	r := cli(t, dir, "deployment", "status", id, "--soak", "1s", "-o", "json")
	var st statusView
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil {
		t.Fatalf("deployment status %s: exit %d %s %s", id, r.code, r.stdout, r.stderr)
	}
	return st
}

func waitStatus(t *testing.T, dir, id, what string, ok func(statusView) bool) statusView {
	t.Helper()
	var st statusView
	eventually(t, id+": "+what, 60*time.Second, func() bool {
		st = status(t, dir, id)
		return ok(st)
	})
	return st
}

// startSim runs `appliance sim` as a process until the test ends.
func startSim(t *testing.T, mqttURL, token, prefix string, devices int, extra ...string) {
	t.Helper()
	startSimProc(t, mqttURL, token, prefix, devices, extra...)
}

func enrollmentToken(t *testing.T, dir, name string, tags ...string) string {
	t.Helper()
	args := []string{"enrollment", "create", name, "-o", "json"}
	for _, tag := range tags {
		args = append(args, "--tag", tag)
	}
	var e struct{ Token string }
	json.Unmarshal([]byte(cli(t, dir, args...).mustSucceed(t).stdout), &e)
	return e.Token
}

// TestSeedScenarios walks the seed's own stories with real processes: a
// controller, simulated devices and real agents.
func TestSeedScenarios(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	mqtt := srv.mqttURL()
	out := t.TempDir()
	manifest := processManifest(t, out, map[string]map[string]any{"web": module("running", "always", nil)})

	// 1. The seed's example: 10 prod devices, a deployment for
	// tags.environment='prod': 10 targeted, applied, healthy.
	startSim(t, mqtt, enrollmentToken(t, dir, "prod", "environment=prod"), "prod", 10, "--ca-file", srv.caFile())
	cli(t, dir, "deployment", "create", "web-a", "--content", manifest, "--target-condition", "tags.environment='prod'", "--priority", "10").mustSucceed(t)
	waitStatus(t, dir, "web-a", "10 targeted, 10 applied, 10 healthy", func(s statusView) bool {
		return s.Counts.Targeted == 10 && s.Counts.Applied == 10 && s.Counts.Healthy == 10
	})
	// Five more prod devices: 15 targeted, 10 successful, 5 pending...
	keys := map[string]string{}
	for i := 1; i <= 5; i++ {
		id := fmt.Sprintf("new-%d", i)
		var d fleet.Device
		json.Unmarshal([]byte(cli(t, dir, "device", "create", id, "--tag", "environment=prod", "-o", "json").mustSucceed(t).stdout), &d)
		keys[id] = d.Authentication.SymmetricKey.PrimaryKey
	}
	st := status(t, dir, "web-a")
	if st.Counts.Targeted != 15 || st.SystemMetrics["reportedSuccessfulCount"] != 10 || st.Counts.Unknown != 5 {
		t.Fatalf("after adding 5 devices: %+v %v", st.Counts, st.SystemMetrics)
	}
	// ...then, as their agents come up, 15 healthy with no operator action.
	for id, key := range keys {
		startAgent(t, "--server", mqtt, "--ca-file", srv.caFile(), "--device-id", id, "--device-key", key, "--data-dir", t.TempDir())
	}
	waitStatus(t, dir, "web-a", "15 healthy", func(s statusView) bool {
		return s.Counts.Targeted == 15 && s.Counts.Healthy == 15 && s.SystemMetrics["reportedSuccessfulCount"] == 15
	})

	// 2. Priority: a higher-priority deployment takes the devices; at equal
	// priority the newer one wins; the others show them as targeted only.
	cli(t, dir, "deployment", "create", "web-b", "--content", manifest, "--target-condition", "tags.environment='prod'", "--priority", "20").mustSucceed(t)
	time.Sleep(5 * time.Millisecond)
	cli(t, dir, "deployment", "create", "web-c", "--content", manifest, "--target-condition", "tags.environment='prod'", "--priority", "20").mustSucceed(t)
	waitStatus(t, dir, "web-c", "the newer of two equal priorities applies", func(s statusView) bool {
		return s.Counts.Applied == 15 && s.Counts.Healthy == 15
	})
	for _, id := range []string{"web-a", "web-b"} {
		if st := status(t, dir, id); st.Counts.Targeted != 15 || st.Counts.Applied != 0 {
			t.Fatalf("%s: %+v, want targeted 15, applied 0", id, st.Counts)
		}
	}

	// 3. Phased rollout: test devices first, then a canary subset of
	// production (a tag added to the condition, higher priority), then all.
	startSim(t, mqtt, enrollmentToken(t, dir, "test", "environment=test"), "test", 3, "--ca-file", srv.caFile())
	cli(t, dir, "deployment", "create", "web-v2", "--content", manifest, "--target-condition", "tags.environment='test'", "--priority", "30").mustSucceed(t)
	waitStatus(t, dir, "web-v2", "phase 1: the 3 test devices", func(s statusView) bool {
		return s.Counts.Targeted == 3 && s.Counts.Healthy == 3
	})
	for _, id := range []string{"prod-0001", "prod-0002", "new-1"} {
		cli(t, dir, "device", "update", id, "--tag", "ring=canary").mustSucceed(t)
	}
	cli(t, dir, "deployment", "update", "web-v2", "--target-condition", "tags.environment='test' OR (tags.environment='prod' AND tags.ring='canary')").mustSucceed(t)
	waitStatus(t, dir, "web-v2", "phase 2: test and 3 canaries", func(s statusView) bool {
		return s.Counts.Targeted == 6 && s.Counts.Applied == 6 && s.Counts.Healthy == 6
	})
	if st := status(t, dir, "web-c"); st.Counts.Applied != 12 {
		t.Fatalf("web-c during the canary phase: %+v", st.Counts)
	}
	cli(t, dir, "deployment", "update", "web-v2", "--target-condition", "tags.environment IN ['test', 'prod']").mustSucceed(t)
	waitStatus(t, dir, "web-v2", "phase 3: everyone", func(s statusView) bool {
		return s.Counts.Targeted == 18 && s.Counts.Healthy == 18
	})

	// The history says who changed the rollout when, and how a canary moved.
	eventually(t, "web-v2's history: created, then two condition changes", 10*time.Second, func() bool {
		r := cli(t, dir, "deployment", "history", "web-v2")
		return r.code == 0 && strings.Count(r.stdout, "updated") == 2 && strings.Count(r.stdout, "created") == 1 && strings.Contains(r.stdout, "admin")
	})
	eventually(t, "prod-0001's history: web-a, web-c, then web-v2", 10*time.Second, func() bool {
		r := cli(t, dir, "device", "history", "prod-0001", "-o", "json")
		var evs []struct{ Deployment string }
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &evs) != nil || len(evs) < 3 {
			return false
		}
		return evs[0].Deployment == "web-v2" && evs[len(evs)-1].Deployment == "web-a"
	})

	// 4. Rollback: an empty fallback deployment at a lower priority; the bad
	// deployment's condition stops matching; the devices move to the
	// fallback and the agents remove the modules.
	empty := processManifest(t, t.TempDir(), map[string]map[string]any{})
	cli(t, dir, "deployment", "create", "fallback", "--content", empty, "--target-condition", "tags.environment='prod'", "--priority", "1").mustSucceed(t)
	for _, id := range []string{"web-a", "web-b", "web-c"} {
		cli(t, dir, "deployment", "delete", id).mustSucceed(t)
	}
	cli(t, dir, "deployment", "update", "web-v2", "--target-condition", "tags.environment='test'").mustSucceed(t)
	waitStatus(t, dir, "fallback", "all 15 prod devices on the fallback", func(s statusView) bool {
		return s.Counts.Applied == 15 && s.Counts.Healthy == 15
	})
	if st := status(t, dir, "web-v2"); st.Counts.Targeted != 3 || st.Counts.Applied != 3 {
		t.Fatalf("rolled-back deployment still shows prod devices: %+v", st.Counts)
	}
	eventually(t, "the 5 real agents removed their module", 30*time.Second, func() bool {
		pids := startedPids(out, "web")
		if len(pids) < 5 {
			return false
		}
		for _, pid := range pids {
			if processAlive(pid) {
				return false
			}
		}
		return true
	})

	// 5. A device whose module fails is Unhealthy with the exit code in
	// `device show`; a device that is disconnected stays Unknown.
	startSim(t, mqtt, enrollmentToken(t, dir, "flaky", "environment=flaky"), "flaky", 2, "--fail-share", "0.5", "--ca-file", srv.caFile())
	cli(t, dir, "device", "create", "offline-1", "--tag", "environment=flaky").mustSucceed(t)
	cli(t, dir, "deployment", "create", "flaky-web", "--content", manifest, "--target-condition", "tags.environment='flaky'").mustSucceed(t)
	st = waitStatus(t, dir, "flaky-web", "1 healthy, 1 unhealthy, 1 unknown", func(s statusView) bool {
		return s.Counts.Applied == 3 && s.Counts.Healthy == 1 && s.Counts.Unhealthy == 1 && s.Counts.Unknown == 1
	})
	if fmt.Sprint(st.Devices["unknown"]) != "[offline-1]" {
		t.Fatalf("unknown devices %v", st.Devices["unknown"])
	}
	bad := st.Devices["unhealthy"][0]
	show := cli(t, dir, "device", "show", bad).mustSucceed(t).stdout
	if !strings.Contains(show, "failed") || !strings.Contains(show, fmt.Sprintf(" %d ", 1)) || !strings.Contains(show, "code 500") {
		t.Fatalf("device show of the unhealthy device:\n%s", show)
	}
}
