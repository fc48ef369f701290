package node

import (
	"context"
	"fmt"
	"strings"
	"time"

	"appliance/api"
	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// leadershipPoll is how often the node looks whether it leads, to start or
// stop the leader-only rollout loop.
const leadershipPoll = 100 * time.Millisecond

// leadRollouts runs the rollout loop (assign.RunRollouts) while this node
// leads, until ctx ends: it starts once the node leads and has applied
// everything committed before (so it judges the committed state, not an
// older one), and is stopped, and waited for, as soon as it does not.
func (n *Node) leadRollouts(ctx context.Context) {
	tick := time.NewTicker(leadershipPoll)
	defer tick.Stop()
	var stop context.CancelFunc
	var done chan struct{}
	halt := func() {
		if stop != nil {
			stop()
			<-done
			stop, done = nil, nil
			n.logger.Info("rollout loop stopped: this node no longer leads")
		}
	}
	defer halt()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		leads := n.store.IsLeader() && n.stoppedErr() == nil
		switch {
		case leads && stop == nil:
			bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := n.store.VerifyLeader(bctx)
			cancel()
			if err != nil {
				continue
			}
			lctx, cancelLoop := context.WithCancel(ctx)
			stop, done = cancelLoop, make(chan struct{})
			go func(done chan struct{}) {
				defer close(done)
				n.assign.RunRollouts(lctx, func(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
					start := time.Now()
					res, err := n.store.Apply(ctx, cmd)
					if err == nil {
						n.metrics.observeApply(cmd.Type().String(), time.Since(start))
					}
					return res, err
				})
			}(done)
			n.logger.Info("rollout loop started: this node leads")
		case !leads:
			halt()
		}
	}
}

// validateRollout checks a rollout policy before raft and returns it
// normalized; errors name rollout.<field>.
func validateRollout(p *fleet.RolloutPolicy) (*fleet.RolloutPolicy, error) {
	if p == nil {
		return nil, nil
	}
	norm, err := p.Normalize()
	if err != nil {
		return nil, err
	}
	if norm.Canary != "" {
		if _, err := evaluator.Compile(norm.Canary); err != nil {
			return nil, conditionError("rollout.canary", err)
		}
	}
	return &norm, nil
}

// mergeRollout applies a PATCH's rollout fields to the stored policy: the
// waves and the canary cannot change (they placed the devices already
// reached), the rest can.
func mergeRollout(cur *fleet.RolloutPolicy, patch *fleet.RolloutPolicy) (*fleet.RolloutPolicy, error) {
	if cur == nil {
		return nil, &fleet.ValidationError{Field: "rollout",
			Msg: "this deployment was created without a rollout, and a rollout starts with its deployment: create a new deployment with the rollout (and a higher priority)"}
	}
	if len(patch.Waves) > 0 || patch.Canary != "" {
		wantWaves, err := fleet.RolloutPolicy{Waves: patch.Waves, Canary: patch.Canary}.Normalize()
		if err != nil {
			return nil, err
		}
		if strings.Join(wantWaves.Waves, ",") != strings.Join(cur.Waves, ",") || (patch.Canary != "" && wantWaves.Canary != cur.Canary) {
			return nil, &fleet.ValidationError{Field: "rollout.waves",
				Msg: fmt.Sprintf("the waves and the canary cannot change once the rollout exists (they are %s); update the soak, success, timeout, failure threshold or action, or create a new deployment", describeWaves(*cur))}
		}
	}
	merged := *cur
	for _, f := range []struct{ from, to *string }{
		{&patch.WaveSoak, &merged.WaveSoak}, {&patch.WaveSuccess, &merged.WaveSuccess},
		{&patch.WaveTimeout, &merged.WaveTimeout}, {&patch.MaxFailures, &merged.MaxFailures}, {&patch.OnFailure, &merged.OnFailure},
	} {
		if *f.from != "" {
			*f.to = *f.from
		}
	}
	return validateRollout(&merged)
}

func describeWaves(p fleet.RolloutPolicy) string {
	w := strings.Join(p.Waves, ",")
	if p.Canary != "" {
		w = "canary " + p.Canary + ", " + w
	}
	return w
}

// RolloutStatus judges a deployment's rollout on this node.
func (b *backend) RolloutStatus(ctx context.Context, id string, consistent bool) (fleet.RolloutStatus, error) {
	var st fleet.RolloutStatus
	err := b.view(ctx, consistent, func(r *raftstore.Reader) error {
		var err error
		st, err = b.assign.RolloutStatus(r, id, time.Now().UTC())
		return err
	})
	return st, err
}

// RolloutAction proposes an operator's action on a rollout; the state
// machine refuses one that does not apply to the rollout's state (409).
func (b *backend) RolloutAction(ctx context.Context, id string, req api.RolloutActionRequest) (fleet.RolloutStatus, error) {
	reason := strings.TrimSpace(req.Reason)
	if len(reason) > 1024 {
		return fleet.RolloutStatus{}, fleet.Invalid("reason", "is %d bytes long; at most 1024 are allowed", len(reason))
	}
	if reason == "" {
		reason = req.Action + " by " + operatorActor
		if req.Action == fleet.RolloutAbort {
			reason = "aborted by " + operatorActor
		}
	}
	res, err := b.apply(ctx, raftstore.RolloutAction{Deployment: id, Action: req.Action, Time: now(), Actor: operatorActor, Reason: reason})
	if err != nil {
		return fleet.RolloutStatus{}, err
	}
	if err := b.store.WaitApplied(ctx, res.Index); err != nil {
		return fleet.RolloutStatus{}, fmt.Errorf("%w: the action was applied, but this node has not caught up yet: %v", api.ErrUnavailable, err)
	}
	return b.RolloutStatus(ctx, id, false)
}

// plannedWaves is a dry run's wave sizes for a rollout policy: over the
// devices the deployment would apply to (would, sorted).
func (b *backend) plannedWaves(id string, p *fleet.RolloutPolicy, would []string) ([]fleet.WaveStatus, error) {
	norm, err := validateRollout(p)
	if err != nil || norm == nil {
		return nil, err
	}
	plan, err := norm.Plan()
	if err != nil {
		return nil, err
	}
	var canary map[string]bool
	if norm.Canary != "" {
		cond, err := evaluator.Compile(norm.Canary)
		if err != nil {
			return nil, conditionError("rollout.canary", err)
		}
		var matched []string
		b.assign.Read(func(v assign.View) { matched, err = v.Match(cond) })
		if err != nil {
			return nil, conditionError("rollout.canary", err)
		}
		canary = map[string]bool{}
		for _, dev := range matched {
			canary[dev] = true
		}
	}
	return assign.PlannedWaves(id, plan, would, canary), nil
}
