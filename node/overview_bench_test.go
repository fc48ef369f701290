package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"appliance/api"
	"appliance/raftstore"
)

// TestOverviewBenchmark times the reads the console polls, the overview
// and a deployment's status, on a node whose devices all report: it
// measures, never asserts (docs/benchmarks.md has the command and the
// results). It skips unless APPLIANCE_OVERVIEW_BENCH_DEVICES is set.
// The devices and their reports are proposed to raft directly (import
// batches and report batches, as the import and the broker do), so that
// the fleet takes seconds to build, not the minutes of real sessions.
func TestOverviewBenchmark(t *testing.T) {
	devices, _ := strconv.Atoi(os.Getenv("APPLIANCE_OVERVIEW_BENCH_DEVICES"))
	if devices <= 0 {
		t.Skip("set APPLIANCE_OVERVIEW_BENCH_DEVICES (e.g. 100000) to run the overview benchmark")
	}
	n := startNodeWith(t, t.TempDir(), func(c *Config) { c.RaftHeartbeatTimeout, c.RaftElectionTimeout = time.Second, time.Second })
	ctx := context.Background()
	c := clientFor(n)
	if _, err := c.PutDeployment(ctx, "line", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 1}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	const batch = 5000
	ids := make([]string, devices)
	for i := range ids {
		ids[i] = fmt.Sprintf("dev-%07d", i)
	}
	for start := 0; start < devices; start += batch {
		var devs []raftstore.ImportedDevice
		for _, id := range ids[start:min(start+batch, devices)] {
			devs = append(devs, raftstore.ImportedDevice{ID: id, Tags: map[string]any{"environment": "prod", "line": "line-" + id[len(id)-2:]}})
		}
		if _, err := n.store.Apply(ctx, raftstore.ImportDevices{Mode: raftstore.ImportCreate, Devices: devs, Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	// Reports as the agent writes them: the deployment applied, its module
	// running for an hour (healthy), a hub and module twins beside.
	started := time.Now().UTC().Add(-time.Hour).Format(time.RFC3339Nano)
	report := fmt.Sprintf(`{"schemaVersion":"1.2","lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"lastDesiredDeploymentId":"line","deviceHealth":"healthy","version":"bench","runtime":{"platform":{"os":"linux","architecture":"amd64"}},"modules":{"temp":{"status":"running","runtimeStatus":"running","lastStartTimeUtc":%q,"exitCode":0,"restartCount":0,"settings":{"image":"registry.local/temp:1.4.2"}}},"deploymentId":"line","hub":{"status":"running","routes":2,"queued":0,"queuedBytes":0,"expired":0,"dropped":0},"moduleTwins":{"temp":{"$version":7,"interval":5,"sensor":"pt100","calibration":{"offset":0.12,"gain":1.003}}}}`,
		uint64(1)<<40, started)
	for start := 0; start < devices; start += batch {
		var reps []raftstore.Report
		for _, id := range ids[start:min(start+batch, devices)] {
			reps = append(reps, raftstore.Report{DeviceID: id, Document: json.RawMessage(report), Time: time.Now().UTC(), Node: n.ID(), Session: time.Now().UTC()})
		}
		if _, err := n.store.Apply(ctx, raftstore.PutReports{Reports: reps}); err != nil {
			t.Fatal(err)
		}
	}
	b := (*backend)(n)
	o, err := b.Overview(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if o.Devices.Total != devices || o.Devices.Health[api.CategoryHealthy] != devices {
		t.Fatalf("overview: %d devices, %d healthy; want %d of each: %+v", o.Devices.Total, o.Devices.Health[api.CategoryHealthy], devices, o.Devices)
	}
	time1 := func(what string, f func() error) {
		const rounds = 20
		var took []time.Duration
		var cpu time.Duration
		for range rounds {
			start, cpu0 := time.Now(), processCPU()
			if err := f(); err != nil {
				t.Fatal(err)
			}
			took = append(took, time.Since(start))
			cpu += processCPU() - cpu0
		}
		slices.Sort(took)
		t.Logf("%s at %d reporting devices, %d rounds: median %v, p90 %v, max %v; process CPU %v a call",
			what, devices, rounds, took[rounds/2].Round(time.Millisecond), took[rounds*9/10].Round(time.Millisecond),
			took[rounds-1].Round(time.Millisecond), (cpu / rounds).Round(time.Millisecond))
	}
	time1("GET /overview", func() error { _, err := b.Overview(ctx); return err })
	time1("GET /deployments/line/status", func() error {
		st, err := b.DeploymentStatus(ctx, "line", api.StatusQuery{})
		if err == nil && st.Counts.Healthy != devices {
			err = fmt.Errorf("status: %d healthy, want %d", st.Counts.Healthy, devices)
		}
		return err
	})
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("live heap after the reads: %d MB", ms.HeapAlloc>>20)
}

// processCPU is the CPU time this process has used (user and system).
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
