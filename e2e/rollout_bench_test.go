//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
)

// TestRolloutBenchmark measures issue 16's two numbers on one controller
// and a simulated fleet, each against a baseline from the same run:
//
//   - from the report that crosses a rollout's failure threshold to the
//     halt committed (visible in the API), against the same report
//     committed (visible as one more unhealthy device): what any decision
//     taken from reports must wait for;
//   - from a rollback committed to every one of the fleet's devices
//     reporting its previous version again, against a plain deployment of
//     the same fleet (created, to every device reporting it).
//
// Both are timed by polling the API every 10 ms on the machine the
// controller runs on, so that both sides of each pair pay the same
// polling delay. APPLIANCE_ROLLOUT_BENCH_TRIALS sets the trials of the
// first (default: skip the benchmark), APPLIANCE_ROLLOUT_BENCH_DEVICES the
// fleet (default 5,000).
func TestRolloutBenchmark(t *testing.T) {
	env := os.Getenv("APPLIANCE_ROLLOUT_BENCH_TRIALS")
	if env == "" {
		t.Skip("set APPLIANCE_ROLLOUT_BENCH_TRIALS (e.g. 20) to run the rollout benchmark")
	}
	trials, err := strconv.Atoi(env)
	if err != nil || trials < 1 {
		t.Fatalf("APPLIANCE_ROLLOUT_BENCH_TRIALS=%q: want a positive number", env)
	}
	devices := 5000
	if v := os.Getenv("APPLIANCE_ROLLOUT_BENCH_DEVICES"); v != "" {
		if devices, err = strconv.Atoi(v); err != nil || devices < 100 {
			t.Fatalf("APPLIANCE_ROLLOUT_BENCH_DEVICES=%q: want at least 100", v)
		}
	}
	t.Logf("machine at the start: %s", readMachineLoad())
	dir := t.TempDir()
	srv := startServer(t, dir)
	c := srv.client()
	ctx := context.Background()
	// 30 % of the devices fail every release whose image contains ":bad".
	startSim(t, srv.mqttURL(), enrollmentToken(t, dir, "line", "env=prod"), "d", devices, "--ca-file", srv.caFile(),
		"--fail-share", "0.3", "--fail-image", ":bad", "--connect-rate", "1000")
	cli(t, dir, "deployment", "create", "v1", "--content", releaseManifest(t, "example/app:v1"), "--target-condition", "tags.env='prod'", "--priority", "1").mustSucceed(t)
	onV1 := func() bool {
		st, err := c.DeploymentStatus(ctx, "v1", api.StatusQuery{Limit: 1})
		return err == nil && st.Counts.Applied == devices && st.Counts.Unknown == 0
	}
	eventually(t, "the fleet on v1", 5*time.Minute, onV1)

	// 1. Breaching report → committed halt. A first wave of 2 % (100
	// devices of 5,000), 10 % may fail: the halt follows the failed report
	// that makes it one more than 10 % of the wave.
	var committed, halted []time.Duration
	for i := range trials {
		id := fmt.Sprintf("bad-%d", i)
		cli(t, dir, "deployment", "create", id, "--content", releaseManifest(t, "example/app:bad-"+strconv.Itoa(i)), "--target-condition", "tags.env='prod'",
			"--priority", strconv.Itoa(i+10), "--waves", "2%,100%", "--wave-soak", "1s", "--wave-timeout", "5m", "--max-failures", "10%", "--on-failure", "pause").mustSucceed(t)
		// The wave's size, then two pollers: one for the halt, one for
		// the report that crosses the threshold, each noting when it first
		// saw it.
		var limit int
		eventually(t, id+": wave 1 started", time.Minute, func() bool {
			ro, err := c.RolloutStatus(ctx, id, false)
			if err == nil && ro.Wave >= 1 {
				limit = int(math.Floor(float64(ro.Waves[0].Size) * 10 / 100))
			}
			return limit > 0
		})
		var unhealthyAt, haltedAt time.Time
		var wg sync.WaitGroup
		wg.Go(func() {
			pollUntil(t, id+" halted", 2*time.Minute, func() bool {
				ro, err := c.RolloutStatus(ctx, id, false)
				haltedAt = time.Now()
				return err == nil && ro.State == fleet.RolloutHalted
			})
		})
		wg.Go(func() {
			pollUntil(t, id+": the threshold crossed", 2*time.Minute, func() bool {
				st, err := c.DeploymentStatus(ctx, id, api.StatusQuery{Limit: 1})
				unhealthyAt = time.Now()
				return err == nil && st.Counts.Unhealthy > limit
			})
		})
		wg.Wait()
		// The breaching report: the (limit+1)-th failed one, by when the
		// node received it.
		breach := breachingReport(t, c, id, limit)
		committed = append(committed, unhealthyAt.Sub(breach))
		halted = append(halted, haltedAt.Sub(breach))
		t.Logf("trial %d: limit %d; breaching report received %s; committed +%s, halt +%s",
			i, limit, breach.Format(time.RFC3339Nano), ms(unhealthyAt.Sub(breach)), ms(haltedAt.Sub(breach)))
		// Put the fleet back on v1.
		if _, err := c.RolloutAction(ctx, id, fleet.RolloutRollback, "benchmark"); err != nil {
			t.Fatal(err)
		}
		if err := c.DeleteDeployment(ctx, id, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the fleet back on v1", 2*time.Minute, onV1)
	}
	t.Logf("breaching report → committed halt (%d trials): %s", trials, statsOf(halted))
	t.Logf("baseline, breaching report → the report committed: %s", statsOf(committed))

	// 2. Rollback of the whole fleet: one wave of 100 %, rollback on a
	// breach; from the rollback committed to every device reporting v1.
	cli(t, dir, "deployment", "create", "bad-all", "--content", releaseManifest(t, "example/app:bad-all"), "--target-condition", "tags.env='prod'",
		"--priority", "1000", "--waves", "100%", "--wave-soak", "1s", "--max-failures", "10%", "--on-failure", "rollback").mustSucceed(t)
	// The rollback's own time: the leader's clock when it decided, just
	// before the entry committed (so the span measured is, if anything,
	// a little long).
	var rolledBack time.Time
	pollUntil(t, "bad-all rolled back", 5*time.Minute, func() bool {
		ro, err := c.RolloutStatus(ctx, "bad-all", false)
		if err == nil && ro.State == fleet.RolloutRolledBack {
			rolledBack = ro.UpdatedTimeUTC
			t.Logf("rolled back after %d of %d devices were reached: %s", ro.Reached, devices, ro.Reason)
			return true
		}
		return false
	})
	pollUntil(t, "every device reporting v1 again", 5*time.Minute, onV1)
	back := time.Since(rolledBack)

	// Baseline: the same fleet moves to a plain deployment (no rollout).
	content, err := os.ReadFile(releaseManifest(t, "example/app:v1b"))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := c.PutDeployment(ctx, "plain", api.DeploymentRequest{Content: content, TargetCondition: "tags.env='prod'", Priority: 2000}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	pollUntil(t, "every device reporting plain", 5*time.Minute, func() bool {
		st, err := c.DeploymentStatus(ctx, "plain", api.StatusQuery{Limit: 1})
		return err == nil && st.Counts.Applied == devices && st.Counts.Unknown == 0
	})
	plain := time.Since(start)
	t.Logf("rollback committed → %d devices reporting their previous version: %s", devices, ms(back))
	t.Logf("baseline, a plain deployment created → %d devices reporting it: %s", devices, ms(plain))
	t.Logf("machine at the end: %s", readMachineLoad())
}

// breachingReport returns when the node received the failed report of the
// deployment that made the failures one more than limit: the (limit+1)-th
// unhealthy report of its devices, by time received.
func breachingReport(t *testing.T, c *api.Client, id string, limit int) time.Time {
	t.Helper()
	ctx := context.Background()
	st, err := c.DeploymentStatus(ctx, id, api.StatusQuery{Category: fleet.CategoryUnhealthy, Limit: api.MaxPageSize})
	if err != nil {
		t.Fatal(err)
	}
	var times []time.Time
	for _, dev := range st.Devices[fleet.CategoryUnhealthy] {
		v, err := c.Device(ctx, dev, false)
		if err != nil || v.Reported == nil {
			continue
		}
		times = append(times, v.Reported.ReceivedTimeUTC)
	}
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	if len(times) <= limit {
		t.Fatalf("%s halted with %d unhealthy devices, limit %d", id, len(times), limit)
	}
	return times[limit]
}

// pollUntil is eventually at a 10 ms pace, for timings.
func pollUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	pollEvery(t, what, timeout, 10*time.Millisecond, cond)
}
