package assign

import (
	"context"
	"errors"
	"slices"
	"time"

	"appliance/fleet"
	"appliance/raftstore"
)

// Proposer commits a command through raft (raftstore.Store.Apply).
type Proposer func(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error)

// rolloutTick is how often the rollout loop judges the running rollouts
// without being woken: for wave timeouts and soaks, which pass with the
// clock rather than with a change.
const rolloutTick = 250 * time.Millisecond

// maxAdmitBatch bounds the devices of one AdmitRollout: a wave of a large
// fleet is several entries, not one of megabytes.
const maxAdmitBatch = 5000

// RunRollouts drives every running rollout until ctx ends: it judges each
// from this node's replica and proposes what follows. The node runs it
// while it leads, and cancels it (and waits for it) when it stops leading:
// a new leader starts from what was committed, and every proposal says
// what it was decided on, so a decision taken on an older state is refused
// rather than applied twice.
func (a *Assigner) RunRollouts(ctx context.Context, propose Proposer) {
	tick := time.NewTicker(rolloutTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-a.kick:
		}
		a.stepRollouts(ctx, propose)
	}
}

// stepRollouts judges each running rollout once and proposes its next
// step.
func (a *Assigner) stepRollouts(ctx context.Context, propose Proposer) {
	a.mu.RLock()
	var running []string
	for id, info := range a.rollouts {
		if info.rollout.State == fleet.RolloutRunning {
			running = append(running, id)
		}
	}
	a.mu.RUnlock()
	slices.Sort(running)
	for _, id := range running {
		if ctx.Err() != nil {
			return
		}
		s, ok := a.snapshot(id)
		if !ok || s.rollout.State != fleet.RolloutRunning {
			continue
		}
		var j judgement
		err := a.cfg.View(func(r *raftstore.Reader) error {
			j = a.judge(s, a.reportSource(r), a.cfg.Now().UTC())
			return nil
		})
		if err != nil {
			a.logger.Warn("cannot judge the rollout", "deployment", id, "err", err)
			continue
		}
		a.carryOut(ctx, propose, s, j)
	}
}

// carryOut proposes a judgement's step.
func (a *Assigner) carryOut(ctx context.Context, propose Proposer, s rolloutSnapshot, j judgement) {
	for len(j.admit) > 0 {
		batch := j.admit[:min(len(j.admit), maxAdmitBatch)]
		j.admit = j.admit[len(batch):]
		res, err := propose(ctx, raftstore.AdmitRollout{Deployment: s.id, AsOf: s.asOf, Time: a.cfg.Now().UTC(), Devices: batch})
		if err != nil {
			a.proposalFailed(s.id, "admit", err)
			return
		}
		a.logger.Debug("rollout admitted devices", "deployment", s.id, "devices", res.Stored, "proposed", len(batch))
	}
	if j.action == nil {
		return
	}
	if _, err := propose(ctx, *j.action); err != nil {
		a.proposalFailed(s.id, j.action.Action, err)
		return
	}
	lvl := a.logger.Info
	if j.action.Action == fleet.RolloutHalt || j.action.Action == fleet.RolloutRollback {
		lvl = a.logger.Warn
	}
	lvl("rollout "+j.action.Action, "deployment", s.id, "wave", len(s.rollout.Waves)+1, "reason", j.action.Reason)
}

// proposalFailed logs a proposal that did not take: one decided on a
// state that moved meanwhile is expected (the next judgement sees the new
// one); anything else is worth a line.
func (a *Assigner) proposalFailed(id, what string, err error) {
	if errors.Is(err, fleet.ErrPreconditionFailed) || errors.Is(err, fleet.ErrConflict) || errors.Is(err, context.Canceled) {
		a.logger.Debug("rollout step not taken: the state moved", "deployment", id, "step", what, "err", err)
		return
	}
	a.logger.Warn("rollout step not taken; retrying", "deployment", id, "step", what, "err", err)
}

// reportSource reads reports through the memo (reportmemo.go), so that
// judging a large wave every tick decodes only what changed.
func (a *Assigner) reportSource(r *raftstore.Reader) reportSource {
	devices := a.deviceCount()
	return func(dev string) *healthReport { return a.healthOf(r, dev, devices).rep }
}
