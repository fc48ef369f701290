package raftstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// Apply proposes one command and waits until it is committed by a quorum,
// fsynced and applied to the leader's state machine. Rule rejections come
// back as the error (and in Result.Err), wrapped around a fleet sentinel.
//
// On a follower with Config.Forward set, the encoded command goes to the
// leader, waiting (within ctx, 10 s without a deadline) for one to be known.
// A failed attempt is retried, on whichever node leads then, only when it
// certainly applied nothing: raft refused it as not the leader, the leader
// answered ErrNotLeader, or no leader was known. Anything else that leaves
// the outcome open (leadership lost after the entry was appended, the
// connection to the leader broken after sending) returns an error wrapping
// ErrUnknownOutcome and is not retried, since a retry could apply the
// command twice. Without Forward, a follower returns ErrNotLeader.
//
// A forwarded write is acknowledged once the leader applied it; this
// node's replica may lag a little: call WaitApplied(ctx, res.Index) to
// read one's own write here.
//
// A command outside LegacyCommands is first checked against what every
// member of the cluster can apply (checkCommand): when one runs an older
// release, or does not answer, it is refused with an error wrapping
// ErrClusterBehind and nothing is proposed. The leader checks again a
// write forwarded to it.
func (s *Store) Apply(ctx context.Context, cmd Command) (*Result, error) {
	data, err := Encode(cmd)
	if err != nil {
		return nil, err
	}
	ctx, cancel := withDefaultTimeout(ctx, defaultApplyTimeout)
	defer cancel()
	if err := s.checkCommand(ctx, cmd.Type()); err != nil {
		return nil, err // names the command
	}
	return s.apply(ctx, cmd.Type(), data)
}

// ApplyEncoded applies an entry forwarded by a follower's Apply (its
// Config.Forward, through the cluster package). The entry must decode as a
// command (otherwise an error wrapping fleet.ErrInvalid); the result and
// errors are those of Apply (the upgrade gate included), except that it
// never forwards: on a node that is not the leader it returns ErrNotLeader,
// which tells the follower that nothing was applied and it may retry
// elsewhere.
func (s *Store) ApplyEncoded(ctx context.Context, entry []byte) (*Result, error) {
	cmd, err := Decode(entry)
	if err != nil {
		return nil, fmt.Errorf("apply forwarded entry: %w: %w", fleet.ErrInvalid, err)
	}
	if !s.IsLeader() {
		return nil, fmt.Errorf("apply forwarded %s: %w", cmd.Type(), ErrNotLeader)
	}
	ctx, cancel := withDefaultTimeout(ctx, defaultApplyTimeout)
	defer cancel()
	if err := s.checkCommand(ctx, cmd.Type()); err != nil {
		return nil, err
	}
	res, err := s.applyLocal(ctx, entry)
	if res == nil && err != nil {
		return nil, fmt.Errorf("apply forwarded %s: %w", cmd.Type(), err)
	}
	return res, err
}

func (s *Store) apply(ctx context.Context, typ CommandType, data []byte) (*Result, error) {
	ctx, cancel := withDefaultTimeout(ctx, defaultApplyTimeout)
	defer cancel()
	if s.cfg.Forward == nil {
		res, err := s.applyLocal(ctx, data)
		if res == nil && err != nil {
			return nil, fmt.Errorf("apply %s: %w", typ, err)
		}
		return res, err
	}
	var last error
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			if err := sleepCtx(ctx, retryBackoff(attempt)); err != nil {
				// Every attempt so far certainly failed, so this does too.
				return nil, fmt.Errorf("apply %s: gave up after %d attempts (%v): %w", typ, attempt, err, last)
			}
		}
		addr, id, err := s.waitLeaderKnown(ctx)
		if err != nil {
			return nil, fmt.Errorf("apply %s: %w", typ, err)
		}
		var res *Result
		var retry bool
		if id == s.cfg.NodeID || s.IsLeader() {
			res, err = s.applyLocal(ctx, data)
			retry = res == nil && errors.Is(err, ErrNotLeader)
		} else {
			res, retry, err = classifyForwarded(s.cfg.Forward(ctx, addr, id, data))
			if res == nil && err != nil {
				err = fmt.Errorf("forward to the leader %s at %s: %w", id, addr, err)
			}
		}
		if retry {
			last = err
			s.logger.Debug("write not applied, retrying on the current leader", "command", typ.String(), "attempt", attempt+1, "err", err)
			continue
		}
		if res == nil && err != nil {
			return nil, fmt.Errorf("apply %s: %w", typ, err)
		}
		return res, err
	}
}

// applyLocal hands an entry to this node's raft and classifies failure as
// certain (ErrNotLeader, a deadline before raft took the entry) or
// uncertain (ErrUnknownOutcome). A rule rejection returns the Result and
// its Err.
func (s *Store) applyLocal(ctx context.Context, data []byte) (*Result, error) {
	if s.raftState() == raft.Shutdown {
		return nil, ErrClosed
	}
	var f raft.ApplyFuture
	if s.cfg.proposeEach {
		timeout := time.Until(deadlineOf(ctx))
		if timeout <= 0 {
			return nil, deadlineErr(ctx)
		}
		f = s.raft.ApplyLog(commandLog(data), timeout)
	} else {
		var err error
		if f, err = s.proposer.apply(ctx, data); err != nil {
			return nil, err // never proposed
		}
	}
	if err := f.Error(); err != nil {
		return nil, classifyRaftError(err)
	}
	res, ok := f.Response().(*Result)
	if !ok || res == nil {
		// The entry committed, so the write happened; we just cannot say
		// what it did.
		return nil, fmt.Errorf("no result from the state machine: %w", ErrUnknownOutcome)
	}
	if res.Err != nil {
		return res, res.Err
	}
	return res, nil
}

// classifyRaftError sorts raft's answer to Apply by what it says about the
// entry. Only ErrNotLeader (the follower and candidate loops refuse the
// entry before it is appended) and ErrLeadershipTransferInProgress (the
// leader refuses it for the same reason) prove it is not in any log;
// ErrEnqueueTimeout proves raft never took it. Everything else, including
// ErrLeadershipLost and a shutdown while waiting, may follow an append.
func classifyRaftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%v: %w", err, ErrNotLeader)
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%v: %w", err, context.DeadlineExceeded)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: %w", ErrClosed, ErrUnknownOutcome)
	}
	return fmt.Errorf("%v: %w", err, ErrUnknownOutcome)
}

// classifyForwarded sorts what Config.Forward returned. A Result means the
// leader applied the entry (a rule rejection is its Err). ErrNotLeader is
// the one retryable answer. ErrUnknownOutcome stays as it is; an answer
// the leader gave (an ErrorFromCode error, or a fleet rule sentinel) is
// certain and kept; anything else is a transport failure of unknown
// outcome.
func classifyForwarded(res *Result, err error) (_ *Result, retry bool, _ error) {
	if res != nil {
		return res, false, res.Err
	}
	if err == nil {
		return nil, false, fmt.Errorf("forward returned neither a result nor an error: %w", ErrUnknownOutcome)
	}
	switch {
	case errors.Is(err, ErrUnknownOutcome):
		return nil, false, err
	case errors.Is(err, ErrNotLeader):
		return nil, true, err
	case isLeaderAnswer(err):
		return nil, false, err
	}
	return nil, false, fmt.Errorf("%w: %w", ErrUnknownOutcome, err)
}

// isLeaderAnswer reports an error the leader itself gave, which is certain
// about the outcome: one rebuilt by ErrorFromCode, or a rule rejection.
func isLeaderAnswer(err error) bool {
	var we *wireError
	if errors.As(err, &we) {
		return true
	}
	for _, sentinel := range []error{fleet.ErrNotFound, fleet.ErrExists, fleet.ErrPreconditionFailed, fleet.ErrInvalid, fleet.ErrImmutable, fleet.ErrConflict} {
		if errors.Is(err, sentinel) {
			return true
		}
	}
	return false
}

// waitLeaderKnown returns the current leader, polling until raft knows one
// or ctx ends (then ErrNotLeader: nothing was sent anywhere).
func (s *Store) waitLeaderKnown(ctx context.Context) (addr, id string, err error) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		a, i := s.raft.LeaderWithID()
		if a != "" {
			return string(a), string(i), nil
		}
		if s.raftState() == raft.Shutdown {
			return "", "", ErrClosed
		}
		select {
		case <-ctx.Done():
			return "", "", fmt.Errorf("no leader known (%v): %w", ctx.Err(), ErrNotLeader)
		case <-t.C:
		}
	}
}

// retryBackoff spaces retries while leadership settles: short at first
// (the new leader is often known within a heartbeat), capped well under an
// election timeout.
func retryBackoff(attempt int) time.Duration {
	return min(10*time.Millisecond<<min(attempt-1, 5), 200*time.Millisecond)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// withDefaultTimeout gives ctx a deadline when it has none, since raft
// needs a timeout.
func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// deadlineErr is the error for a ctx whose deadline has passed: ctx.Err(),
// or DeadlineExceeded when ctx's own timer has not fired yet.
func deadlineErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return context.DeadlineExceeded
}

func deadlineOf(ctx context.Context) time.Time {
	dl, _ := ctx.Deadline()
	return dl
}
