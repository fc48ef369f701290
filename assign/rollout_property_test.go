package assign

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"pgregory.net/rapid"

	"appliance/fleet"
	"appliance/internal/testlog"
	"appliance/raftstore"
)

// rolloutRig is one real raft store (a cluster of one, its state machine,
// its log) followed by an Assigner as a node follows it, with a clock the
// test moves. Raft is real here because the rollout's decisions are
// commands the state machine checks; only time is simulated, so that
// soaks and wave timeouts pass at once.
type rolloutRig struct {
	t     testing.TB
	store *raftstore.Store
	a     *Assigner
	mu    sync.Mutex
	now   time.Time
	ctx   context.Context
	// given is each device's last document (deployment, modules): a
	// device no deployment targets is sent none and keeps running it.
	given map[string][2]string
}

func newRolloutRig(t testing.TB) *rolloutRig {
	rig := &rolloutRig{t: t, now: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	logger := testlog.New(t, slog.LevelWarn)
	var store *raftstore.Store
	rig.a = New(Config{Logger: logger, Now: rig.clock,
		View: func(fn func(r *raftstore.Reader) error) error { return store.View(fn) }})
	s, err := raftstore.Open(context.Background(), raftstore.Config{Dir: t.TempDir(), NodeID: "n1", BindAddr: "127.0.0.1:0",
		Bootstrap: true, Observer: replica{rig.a}, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	store = s
	rig.store = s
	t.Cleanup(func() { s.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	rig.ctx = ctx
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	return rig
}

func (rig *rolloutRig) clock() time.Time {
	rig.mu.Lock()
	defer rig.mu.Unlock()
	return rig.now
}

func (rig *rolloutRig) advance(d time.Duration) {
	rig.mu.Lock()
	rig.now = rig.now.Add(d)
	rig.mu.Unlock()
}

// fataler is a *testing.T or a *rapid.T.
type fataler interface {
	Fatalf(format string, args ...any)
}

// apply commits cmd; a rule rejection is returned, anything else fails.
func (rig *rolloutRig) apply(t fataler, cmd raftstore.Command) error {
	res, err := rig.store.Apply(rig.ctx, cmd)
	if err != nil && res == nil {
		t.Fatalf("%T: %v", cmd, err)
	}
	return err
}

// step runs the leader's judgement once, as RunRollouts does on a tick.
func (rig *rolloutRig) step() {
	rig.a.stepRollouts(rig.ctx, func(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
		return rig.store.Apply(ctx, cmd)
	})
}

// desired is the deployment and the modules a device runs: those its
// document names, or, when it is sent none (no deployment targets it any
// more), those of the last one it was given, which it keeps running.
func (rig *rolloutRig) desired(t fataler, dev string) (string, string) {
	dep, mods, _ := rig.desiredOrKept(t, dev)
	return dep, mods
}

// desiredOrKept is desired, and whether the device keeps what it was
// given because nothing targets it.
func (rig *rolloutRig) desiredOrKept(t fataler, dev string) (string, string, bool) {
	b, err := rig.a.Desired(dev)
	if err != nil {
		t.Fatalf("desired document of %s: %v", dev, err)
	}
	rig.mu.Lock()
	defer rig.mu.Unlock()
	if rig.given == nil {
		rig.given = map[string][2]string{}
	}
	if b == nil {
		last := rig.given[dev]
		return last[0], last[1], true
	}
	var doc fleet.DesiredDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("decode the desired document of %s: %v", dev, err)
	}
	rig.given[dev] = [2]string{doc.DeploymentID, string(doc.ModulesContent)}
	return doc.DeploymentID, string(doc.ModulesContent), false
}

func moduleContent(image string) (json.RawMessage, string) {
	mods := `{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"image":"` + image + `"}}}}}}`
	return json.RawMessage(`{"modulesContent":` + mods + `}`), mods
}

func report(dep string, healthy bool, since time.Time) json.RawMessage {
	doc := fleet.ReportedDocument{DeploymentID: dep, LastDesiredStatus: fleet.DesiredStatus{Code: fleet.StatusCodeOK},
		Modules: map[string]fleet.ModuleStatus{"m": {RuntimeStatus: fleet.RuntimeRunning, Status: "running", LastStartTimeUTC: &since}}}
	if !healthy {
		doc.LastDesiredStatus.Code = fleet.StatusCodeFailed
		doc.Modules["m"] = fleet.ModuleStatus{RuntimeStatus: fleet.RuntimeFailed, Status: "running"}
	}
	b, _ := json.Marshal(doc)
	return b
}

// TestRollout_Property drives rollouts over random fleets (devices on one
// of two earlier deployments, or none; some in a canary ring; some that
// fail the new version, some that never report), random plans (percentage
// or count waves, a canary, thresholds, pause or rollback on failure) and
// random operator actions, through real raft. After every step, no device
// outside the waves started has ever been sent the new deployment; after a
// rollback, every device it reached runs exactly what it ran before (that
// deployment, with its content, even when the deployment was deleted
// meanwhile), and every other device runs what it ran before the rollback.
func TestRollout_Property(t *testing.T) {
	if f := flag.Lookup("rapid.checks"); f != nil && f.Value.String() == "100" {
		// Each check commits a few dozen raft entries: 100 would cost
		// minutes under the race detector. -rapid.checks=N asks for more.
		_ = f.Value.Set("50")
		defer f.Value.Set("100")
	}
	rig := newRolloutRig(t)
	run := 0
	rapid.Check(t, func(t *rapid.T) {
		run++
		rig.checkRollout(t, run)
	})
}

func (rig *rolloutRig) checkRollout(t *rapid.T, run int) {
	tag := fmt.Sprint(run)
	scope := fmt.Sprintf("tags.run='%s'", tag)
	p1, p1mods := moduleContent(fmt.Sprintf("v1-%d", run))
	p2, p2mods := moduleContent(fmt.Sprintf("v1b-%d", run))
	d, _ := moduleContent(fmt.Sprintf("v2-%d", run))
	dep := func(name string) string { return fmt.Sprintf("%s-%d", name, run) }
	old1, old2, next := dep("old"), dep("oldb"), dep("new")
	content := map[string]string{old1: p1mods, old2: p2mods, "": ""}

	// The fleet: each device on old1, old2 (which precedes old1) or none.
	n := rapid.IntRange(1, 24).Draw(t, "devices")
	type device struct {
		id             string
		group          string
		canary         bool
		fails, offline bool
	}
	devs := make([]device, n)
	for i := range devs {
		devs[i] = device{
			id:      fmt.Sprintf("r%d-d%02d", run, i),
			group:   rapid.SampledFrom([]string{"a", "b", "none"}).Draw(t, "group"),
			canary:  rapid.IntRange(0, 3).Draw(t, "canary") == 0,
			fails:   rapid.IntRange(0, 3).Draw(t, "fails") == 0,
			offline: rapid.IntRange(0, 9).Draw(t, "offline") == 0,
		}
		tags := map[string]any{"run": tag, "group": devs[i].group}
		if devs[i].canary {
			tags["ring"] = "canary"
		}
		rig.apply(t, raftstore.PutDevice{Time: rig.clock(), Device: fleet.Device{ID: devs[i].id, Tags: tags}})
	}
	rig.apply(t, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: old1, Content: p1,
		TargetCondition: scope + " AND tags.group IN ['a','b']", Priority: 1}})
	rig.apply(t, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: old2, Content: p2,
		TargetCondition: scope + " AND tags.group='b'", Priority: 2}})
	before := map[string]string{}
	for _, dv := range devs {
		before[dv.id], _ = rig.desired(t, dv.id)
	}

	// The plan.
	var policy fleet.RolloutPolicy
	if rapid.Bool().Draw(t, "counts") {
		c := 0
		for range rapid.IntRange(1, 3).Draw(t, "nwaves") {
			c += rapid.IntRange(1, 5).Draw(t, "count")
			policy.Waves = append(policy.Waves, fmt.Sprint(c))
		}
	} else {
		p := 0
		for range rapid.IntRange(1, 3).Draw(t, "nwaves") {
			p += rapid.IntRange(1, 50).Draw(t, "percent")
			policy.Waves = append(policy.Waves, fmt.Sprintf("%d%%", min(p, 100)))
			if p >= 100 {
				break
			}
		}
	}
	if rapid.IntRange(0, 2).Draw(t, "withCanary") == 0 {
		policy.Canary = "tags.ring='canary'"
	}
	policy.WaveSoak = "10s"
	policy.WaveTimeout = "1m"
	policy.WaveSuccess = fmt.Sprintf("%d%%", rapid.IntRange(0, 100).Draw(t, "success"))
	policy.MaxFailures = fmt.Sprintf("%d%%", rapid.IntRange(0, 60).Draw(t, "maxFailures"))
	policy.OnFailure = rapid.SampledFrom([]string{fleet.OnFailurePause, fleet.OnFailureRollback}).Draw(t, "onFailure")
	norm, err := policy.Normalize()
	if err != nil {
		t.Fatalf("policy %+v: %v", policy, err)
	}
	if err := rig.apply(t, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: next, Content: d,
		TargetCondition: scope, Priority: 5, Rollout: &norm}}); err != nil {
		t.Fatal(err)
	}
	for _, dv := range devs {
		if got, _ := rig.desired(t, dv.id); got != before[dv.id] {
			t.Fatalf("%s moved to %s when the rollout was created, before any wave", dv.id, got)
		}
	}

	// inWave tells whether a device belongs to a wave started so far.
	inWave := func(dv device) bool {
		var ro fleet.Rollout
		_ = rig.store.View(func(r *raftstore.Reader) error {
			ro, _, _ = r.Rollout(next)
			return nil
		})
		plan, _ := norm.Plan()
		for w, wp := range ro.Waves {
			if plan.Waves[w].Canary != "" {
				if dv.canary {
					return true
				}
				continue
			}
			if !(dv.canary && plan.Waves[0].Canary != "") && fleet.WavePosition(next, dv.id) <= wp.Threshold {
				return true
			}
		}
		return false
	}
	// exposed maps each device the new deployment reached to what it ran
	// just before.
	exposed := map[string]string{}
	rolledBack := false
	var beforeRollback map[string]string
	deletedOld := false
	for range rapid.IntRange(1, 12).Draw(t, "steps") {
		// Devices report what they run; the new version fails on some.
		var reps []raftstore.Report
		for _, dv := range devs {
			if dv.offline {
				continue
			}
			got, _ := rig.desired(t, dv.id)
			if got == "" {
				continue
			}
			healthy := got != next || !dv.fails
			reps = append(reps, raftstore.Report{DeviceID: dv.id, Document: report(got, healthy, rig.clock()), Time: rig.clock()})
		}
		if len(reps) > 0 {
			rig.apply(t, raftstore.PutReports{Reports: reps})
		}
		rig.advance(time.Duration(rapid.IntRange(0, 70).Draw(t, "seconds")) * time.Second)
		if !rolledBack {
			switch rapid.IntRange(0, 19).Draw(t, "operator") {
			case 0, 1:
				beforeRollback = map[string]string{}
				for _, dv := range devs {
					beforeRollback[dv.id], _ = rig.desired(t, dv.id)
				}
				if rig.apply(t, raftstore.RolloutAction{Deployment: next, Action: fleet.RolloutRollback, Time: rig.clock(), Actor: "test"}) == nil {
					rolledBack = true
				}
			case 2, 3:
				_ = rig.apply(t, raftstore.RolloutAction{Deployment: next, Action: fleet.RolloutPromote, Time: rig.clock(), Actor: "test"})
			case 4:
				_ = rig.apply(t, raftstore.RolloutAction{Deployment: next, Action: fleet.RolloutPause, Time: rig.clock(), Actor: "test"})
			case 5:
				_ = rig.apply(t, raftstore.RolloutAction{Deployment: next, Action: fleet.RolloutResume, Time: rig.clock(), Actor: "test"})
			case 6, 7, 8, 9:
				if !deletedOld && len(exposed) > 0 {
					// The previous deployment goes: a rollback must still
					// return its devices to it, content and all.
					deletedOld = true
					rig.apply(t, raftstore.DeleteDeployment{ID: old1, Time: rig.clock()})
				}
			}
		}
		snapshotBefore := map[string]string{}
		// previous is what a rollout records a device ran: the deployment
		// that applies to it, "" for one that keeps a deployment deleted
		// since (its content is gone: a rollback returns it to nothing).
		previous := map[string]string{}
		for _, dv := range devs {
			var kept bool
			snapshotBefore[dv.id], _, kept = rig.desiredOrKept(t, dv.id)
			if !kept {
				previous[dv.id] = snapshotBefore[dv.id]
			}
		}
		if !rolledBack {
			rig.step()
			var ro fleet.Rollout
			_ = rig.store.View(func(r *raftstore.Reader) error {
				ro, _, _ = r.Rollout(next)
				return nil
			})
			if ro.State == fleet.RolloutRolledBack {
				rolledBack, beforeRollback = true, snapshotBefore
			}
		}
		for _, dv := range devs {
			got, _ := rig.desired(t, dv.id)
			if got == next {
				if _, ok := exposed[dv.id]; !ok {
					exposed[dv.id] = previous[dv.id]
				}
				if !inWave(dv) {
					t.Fatalf("%s runs %s outside the waves started", dv.id, next)
				}
			}
		}
	}
	if !rolledBack {
		var ro fleet.Rollout
		_ = rig.store.View(func(r *raftstore.Reader) error {
			ro, _, _ = r.Rollout(next)
			return nil
		})
		if ro.State == fleet.RolloutCompleted {
			for _, dv := range devs {
				if got, _ := rig.desired(t, dv.id); got != next {
					t.Fatalf("completed, but %s runs %q", dv.id, got)
				}
			}
			if !rapid.Bool().Draw(t, "rollbackAfterCompletion") {
				return
			}
			// Rolled back after it completed (its devices no longer kept
			// in memory): every one returns all the same.
		}
		beforeRollback = map[string]string{}
		for _, dv := range devs {
			beforeRollback[dv.id], _ = rig.desired(t, dv.id)
		}
		if err := rig.apply(t, raftstore.RolloutAction{Deployment: next, Action: fleet.RolloutRollback, Time: rig.clock(), Actor: "test"}); err != nil {
			t.Fatalf("rollback from %s: %v", ro.State, err)
		}
	}
	// Rolled back: each device reached runs what it ran before the
	// rollout, with that content; every other device is untouched.
	for _, dv := range devs {
		gotDep, gotMods := rig.desired(t, dv.id)
		if want, ok := exposed[dv.id]; ok {
			if gotDep != want || gotMods != content[want] {
				t.Fatalf("%s was reached, then rolled back to %q (%s); it ran %q (%s) before", dv.id, gotDep, gotMods, want, content[want])
			}
			continue
		}
		if want := beforeRollback[dv.id]; gotDep != want {
			t.Fatalf("%s was never reached, but the rollback moved it from %q to %q", dv.id, want, gotDep)
		}
	}
}

// TestRollout_RollbackAfterCompletion: a rollout that completed (its
// devices no longer kept in memory) and whose previous deployment was
// deleted since, rolled back: every device returns to that deployment,
// with its content, and survives a restore of the assignments.
func TestRollout_RollbackAfterCompletion(t *testing.T) {
	rig := newRolloutRig(t)
	rt := t
	{
		old, oldMods := moduleContent("v1")
		next, _ := moduleContent("v2")
		for _, id := range []string{"a", "b", "c"} {
			rig.apply(rt, raftstore.PutDevice{Time: rig.clock(), Device: fleet.Device{ID: id, Tags: map[string]any{"env": "prod"}}})
		}
		rig.apply(rt, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: "old", Content: old, TargetCondition: "tags.env='prod'", Priority: 1}})
		policy, _ := fleet.RolloutPolicy{Waves: []string{"100%"}, WaveSoak: "0s"}.Normalize()
		rig.apply(rt, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: "new", Content: next, TargetCondition: "tags.env='prod'", Priority: 2, Rollout: &policy}})
		for range 6 {
			var reps []raftstore.Report
			for _, id := range []string{"a", "b", "c"} {
				got, _ := rig.desired(rt, id)
				reps = append(reps, raftstore.Report{DeviceID: id, Document: report(got, true, rig.clock()), Time: rig.clock()})
			}
			rig.apply(rt, raftstore.PutReports{Reports: reps})
			rig.advance(time.Second)
			rig.step()
		}
		var ro fleet.Rollout
		_ = rig.store.View(func(r *raftstore.Reader) error { ro, _, _ = r.Rollout("new"); return nil })
		if ro.State != fleet.RolloutCompleted {
			rt.Fatalf("not completed: %+v", ro)
		}
		rig.apply(rt, raftstore.DeleteDeployment{ID: "old", Time: rig.clock()})
		if err := rig.apply(rt, raftstore.RolloutAction{Deployment: "new", Action: fleet.RolloutRollback, Time: rig.clock(), Actor: "test"}); err != nil {
			rt.Fatalf("%v", err)
		}
		check := func(when string) {
			for _, id := range []string{"a", "b", "c"} {
				if dep, mods := rig.desired(rt, id); dep != "old" || mods != oldMods {
					rt.Fatalf("%s: %s runs %q (%s), want old with its content", when, id, dep, mods)
				}
			}
		}
		check("after the rollback")
		if err := rig.store.View(func(r *raftstore.Reader) error { return rig.a.Restore(r) }); err != nil {
			rt.Fatalf("%v", err)
		}
		check("after a restore")
	}
}
