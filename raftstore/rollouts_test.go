package raftstore

import (
	"errors"
	"slices"
	"testing"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// TestFSM_Rollouts walks a rollout through its commands on one state
// machine: what is admitted and with which previous deployment, what is
// refused as stale, every action from the states it applies to and not
// from the others, and what deleting a device or a deployment leaves.
func TestFSM_Rollouts(t *testing.T) {
	f := newTestFSM(t)
	var index uint64
	apply := func(c Command) *Result {
		t.Helper()
		index++
		return f.ApplyBatch([]*raft.Log{logOf(t, index, c)})[0].(*Result)
	}
	mustApply := func(c Command) *Result {
		t.Helper()
		res := apply(c)
		if res.Err != nil {
			t.Fatalf("%T: %v", c, res.Err)
		}
		return res
	}
	refused := func(c Command, want error) {
		t.Helper()
		if res := apply(c); !errors.Is(res.Err, want) {
			t.Fatalf("%T %+v: err %v, want %v", c, c, res.Err, want)
		}
	}
	rollout := func() fleet.Rollout {
		t.Helper()
		var ro fleet.Rollout
		err := f.view(func(r *Reader) error {
			var ok bool
			var err error
			ro, ok, err = r.Rollout("new")
			if err == nil && !ok {
				t.Fatal("no rollout stored")
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return ro
	}
	admitted := func() map[string]string {
		t.Helper()
		out := map[string]string{}
		_ = f.view(func(r *Reader) error {
			return r.RolloutDevices("new", func(id string, d fleet.RolloutDevice) bool {
				out[id] = d.Previous
				return true
			})
		})
		return out
	}
	action := func(a string, ifState string, waves *int) RolloutAction {
		return RolloutAction{Deployment: "new", Action: a, Time: t0, Actor: "test", IfState: ifState, Waves: waves}
	}

	mustApply(PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "old", Content: content("v1"), TargetCondition: "*"}})
	for _, id := range []string{"d1", "d2", "d3"} {
		mustApply(PutDevice{Time: t0, Device: fleet.Device{ID: id}})
	}
	policy := &fleet.RolloutPolicy{Waves: []string{"50%", "100%"}, WaveSoak: "1s", WaveSuccess: "100%", WaveTimeout: "1m", MaxFailures: "10%", OnFailure: fleet.OnFailureRollback}
	put := PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "new", Content: content("v2"), TargetCondition: "*", Priority: 1, Rollout: policy}}
	if data, _ := Encode(put); CommandType(data[0]) != CmdPutDeploymentRollout {
		t.Fatalf("a deployment with a rollout is encoded as %s, want %s (so that no node unaware of rollouts applies it)", CommandType(data[0]), CmdPutDeploymentRollout)
	}
	created := mustApply(put).Index
	if ro := rollout(); ro.State != fleet.RolloutRunning || len(ro.Waves) != 0 || ro.Index != created {
		t.Fatalf("new rollout %+v", ro)
	}
	// Nothing is admitted before a wave starts.
	if res := mustApply(AdmitRollout{Deployment: "new", AsOf: index, Time: t0, Devices: []AdmitDevice{{ID: "d1", Wave: 0, Previous: "old"}}}); res.Stored != 0 {
		t.Fatalf("admitted %d devices before any wave started", res.Stored)
	}
	zero := 0
	mustApply(RolloutAction{Deployment: "new", Action: fleet.RolloutStartWave, Time: t0, IfState: fleet.RolloutRunning, Waves: &zero, Threshold: 42, Planned: 2})
	refused(RolloutAction{Deployment: "new", Action: fleet.RolloutStartWave, Time: t0, IfState: fleet.RolloutRunning, Waves: &zero}, fleet.ErrPreconditionFailed)
	if ro := rollout(); len(ro.Waves) != 1 || ro.Waves[0].Threshold != 42 || ro.Waves[0].Planned != 2 {
		t.Fatalf("after the first wave started: %+v", ro)
	}

	// An admission computed before the wave started is stale.
	refused(AdmitRollout{Deployment: "new", AsOf: created, Time: t0, Devices: []AdmitDevice{{ID: "d1", Previous: "old"}}}, fleet.ErrPreconditionFailed)
	asOf := index
	mustApply(PatchDevice{ID: "d3", Tags: map[string]any{"x": 1.0}, Time: t0})
	res := mustApply(AdmitRollout{Deployment: "new", AsOf: asOf, Time: t0, Devices: []AdmitDevice{
		{ID: "d1", Previous: "old"}, {ID: "d2", Previous: "old"},
		{ID: "d3", Previous: "old"},   // changed after AsOf: skipped
		{ID: "nobody", Previous: ""},  // no such device
		{ID: "d1", Previous: "other"}, // twice: the first counts
	}})
	if got := admitted(); res.Stored != 2 || len(got) != 2 || got["d1"] != "old" || got["d2"] != "old" {
		t.Fatalf("admitted %d: %v", res.Stored, got)
	}
	// A deployment written after AsOf makes the admission stale.
	asOf = index
	mustApply(PatchDeployment{ID: "old", Priority: ptr[int64](0), Time: t0})
	refused(AdmitRollout{Deployment: "new", AsOf: asOf, Time: t0, Devices: []AdmitDevice{{ID: "d3", Previous: "old"}}}, fleet.ErrPreconditionFailed)

	// The previous deployment's content outlives the deployment.
	mustApply(DeleteDeployment{ID: "old", Time: t0})
	_ = f.view(func(r *Reader) error {
		if c, ok := r.RolloutContent("new", "old"); !ok || string(c) != string(content("v1")) {
			t.Fatalf("kept content of old: %s, %v", c, ok)
		}
		return nil
	})
	// A device whose previous deployment is gone is not admitted.
	if res := mustApply(AdmitRollout{Deployment: "new", AsOf: index, Time: t0, Devices: []AdmitDevice{{ID: "d3", Previous: "old"}}}); res.Stored != 0 {
		t.Fatal("admitted a device whose previous deployment was deleted")
	}

	// The waves cannot change; the thresholds can; the policy cannot go.
	changed := *policy
	changed.Waves = []string{"10%", "100%"}
	refused(PatchDeployment{ID: "new", Rollout: &changed, Time: t0}, fleet.ErrConflict)
	looser := *policy
	looser.MaxFailures = "30%"
	mustApply(PatchDeployment{ID: "new", Rollout: &looser, Time: t0})
	refused(PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "new", Content: content("v2"), TargetCondition: "*", Priority: 1}}, fleet.ErrConflict)

	// Each action from where it applies, and not from elsewhere.
	for _, step := range []struct {
		cmd       RolloutAction
		wantErr   error
		wantState string
	}{
		{action(fleet.RolloutPause, "", nil), nil, fleet.RolloutPaused},
		{action(fleet.RolloutPause, "", nil), fleet.ErrConflict, fleet.RolloutPaused},
		{action(fleet.RolloutHalt, fleet.RolloutRunning, nil), fleet.ErrPreconditionFailed, fleet.RolloutPaused},
		{action(fleet.RolloutResume, "", nil), nil, fleet.RolloutRunning},
		{action(fleet.RolloutComplete, fleet.RolloutRunning, nil), fleet.ErrConflict, fleet.RolloutRunning}, // 1 of 2 waves started
		{action(fleet.RolloutHalt, fleet.RolloutRunning, ptr(1)), nil, fleet.RolloutHalted},
		{action(fleet.RolloutPromote, "", nil), nil, fleet.RolloutRunning},
		{action(fleet.RolloutAbort, "", nil), nil, fleet.RolloutHalted},
		{action(fleet.RolloutResume, "", nil), fleet.ErrConflict, fleet.RolloutHalted},
		{action(fleet.RolloutPromote, "", nil), fleet.ErrConflict, fleet.RolloutHalted},
		{action(fleet.RolloutRollback, "", nil), nil, fleet.RolloutRolledBack},
		{action(fleet.RolloutRollback, "", nil), fleet.ErrConflict, fleet.RolloutRolledBack},
		{action("dance", "", nil), fleet.ErrInvalid, fleet.RolloutRolledBack},
	} {
		res := apply(step.cmd)
		if !errors.Is(res.Err, step.wantErr) || (step.wantErr == nil && res.Err != nil) {
			t.Fatalf("%s from %s: err %v, want %v", step.cmd.Action, step.cmd.IfState, res.Err, step.wantErr)
		}
		if got := rollout().State; got != step.wantState {
			t.Fatalf("after %s: state %s, want %s", step.cmd.Action, got, step.wantState)
		}
	}
	if ro := rollout(); !ro.Aborted || ro.Promote || ro.Waves[0].PassedTimeUTC != nil {
		t.Fatalf("after abort and rollback: %+v", ro)
	}

	// A deleted device leaves the rollout; a deleted deployment takes its
	// rollout with it.
	mustApply(DeleteDevice{ID: "d1"})
	if got := admitted(); !slices.Equal([]string{"d2"}, keys(got)) {
		t.Fatalf("after d1 was deleted: %v", got)
	}
	mustApply(DeleteDeployment{ID: "new", Time: t0})
	_ = f.view(func(r *Reader) error {
		if _, ok, _ := r.Rollout("new"); ok {
			t.Fatal("the rollout outlived its deployment")
		}
		if _, ok := r.RolloutContent("new", "old"); ok {
			t.Fatal("the kept content outlived its rollout")
		}
		return nil
	})
	if got := admitted(); len(got) != 0 {
		t.Fatalf("admitted devices outlived their rollout: %v", got)
	}
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
