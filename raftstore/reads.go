package raftstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// defaultReadTimeout bounds a consistent read whose context has no deadline.
const defaultReadTimeout = 5 * time.Second

// CommitIndex is the index of the newest entry this node knows committed.
// It can stay above what the state machine has applied: raft's no-op and
// barrier entries never reach the state machine. To wait for the state,
// use ReadIndex and WaitApplied, not this.
func (s *Store) CommitIndex() uint64 { return s.raft.CommitIndex() }

// ReadIndex is the read-index step of a linearizable read, run on the
// leader. It returns an index such that every write acknowledged before the
// call, by this leader or an earlier one, is at or below it, once a quorum
// has confirmed this node still leads; a replica that has applied up to it
// (WaitApplied) can answer the read. On a node that is not the leader:
// ErrNotLeader.
//
// The index is the leader's applied index rather than its commit index:
// after leaderReady the leader has applied every committed write, and raft
// commits no-op and barrier entries that never reach a state machine, so
// a follower could wait forever for a commit index that ends on one.
func (s *Store) ReadIndex(ctx context.Context) (uint64, error) {
	if !s.IsLeader() {
		return 0, fmt.Errorf("read index: %w", ErrNotLeader)
	}
	term, err := s.leaderReady(ctx)
	if err != nil {
		return 0, fmt.Errorf("read index: %w", err)
	}
	// The index is taken before the quorum check, so the check covers it.
	idx, err := s.fsm.visibleIndex()
	if err != nil {
		return 0, fmt.Errorf("read index: %w", err)
	}
	if err := s.raft.VerifyLeader().Error(); err != nil {
		return 0, fmt.Errorf("read index: %v: %w", err, ErrNotLeader)
	}
	// Same term means the same stint as leader: a leader that lost its
	// lease and won again would be in a later term.
	if s.raft.CurrentTerm() != term {
		return 0, fmt.Errorf("read index: leadership changed during the read: %w", ErrNotLeader)
	}
	return idx, nil
}

// leaderReady makes sure this leader has committed an entry of its own
// term, and applied everything before it, and returns that term. Until
// then a new leader may not even know that the last writes its predecessor
// acknowledged are committed, let alone have applied them; a read index
// taken then would miss them. The first read of a term pays for one
// barrier entry.
func (s *Store) leaderReady(ctx context.Context) (uint64, error) {
	term := s.raft.CurrentTerm()
	if s.readyTerm.Load() == term {
		return term, nil
	}
	ctx, cancel := withDefaultTimeout(ctx, defaultReadTimeout)
	defer cancel()
	if err := s.raft.Barrier(time.Until(deadlineOf(ctx))).Error(); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
			errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return 0, fmt.Errorf("commit an entry of this term: %v: %w", err, ErrNotLeader)
		case errors.Is(err, raft.ErrRaftShutdown):
			return 0, fmt.Errorf("commit an entry of this term: %w", ErrClosed)
		}
		return 0, fmt.Errorf("commit an entry of this term: %w", err)
	}
	if s.raft.CurrentTerm() == term {
		s.readyTerm.Store(term)
	}
	return term, nil
}

// WaitApplied blocks until the local state machine has applied index (or
// further), ctx ends, or the store closes (ErrClosed). index is a
// ReadIndex or a Result.Index (read your own write on a follower).
func (s *Store) WaitApplied(ctx context.Context, index uint64) error {
	return s.fsm.waitApplied(ctx, index)
}

// VerifyLeader returns nil when this node is the leader, a quorum agrees,
// and the local state machine has applied everything committed before the
// call (ReadIndex then WaitApplied, on the leader itself). Otherwise
// ErrNotLeader.
func (s *Store) VerifyLeader(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, defaultReadTimeout)
	defer cancel()
	idx, err := s.ReadIndex(ctx)
	if err != nil {
		return fmt.Errorf("verify leader: %w", err)
	}
	if err := s.WaitApplied(ctx, idx); err != nil {
		return fmt.Errorf("verify leader: %w", err)
	}
	return nil
}
