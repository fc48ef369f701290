package raftstore

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// defaultMembershipTimeout bounds a membership change whose context has no
// deadline.
const defaultMembershipTimeout = 10 * time.Second

// Member is one server of the raft configuration.
type Member struct {
	ID, Address string
	// Voter is false for a non-voting member (none are added today).
	Voter bool
	// Leader marks the member this node believes leads.
	Leader bool
}

// Members lists the servers of the latest raft configuration this node
// knows, sorted by ID. On a follower it may lag a change in flight.
func (s *Store) Members(ctx context.Context) ([]Member, error) {
	servers, err := s.servers()
	if err != nil {
		return nil, err
	}
	_, leaderID := s.raft.LeaderWithID()
	out := make([]Member, 0, len(servers))
	for _, srv := range servers {
		out = append(out, Member{
			ID: string(srv.ID), Address: string(srv.Address),
			Voter: srv.Suffrage == raft.Voter, Leader: srv.ID == leaderID,
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (s *Store) servers() ([]raft.Server, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrRaftShutdown) {
			return nil, fmt.Errorf("read raft configuration: %w", ErrClosed)
		}
		return nil, fmt.Errorf("read raft configuration: %w", err)
	}
	return f.Configuration().Servers, nil
}

// AddVoter makes nodeID a voter reachable at addr. Only the leader can
// (ErrNotLeader). It is idempotent: a voter already at addr is left alone;
// a known ID at a new address is moved there (raft updates the address).
// An address already held by another ID is refused: remove that one first.
func (s *Store) AddVoter(ctx context.Context, nodeID, addr string) error {
	if !s.IsLeader() {
		return fmt.Errorf("add voter %s: %w", nodeID, ErrNotLeader)
	}
	servers, err := s.servers()
	if err != nil {
		return fmt.Errorf("add voter %s: %w", nodeID, err)
	}
	for _, srv := range servers {
		if string(srv.ID) == nodeID && string(srv.Address) == addr && srv.Suffrage == raft.Voter {
			return nil
		}
	}
	ctx, cancel := withDefaultTimeout(ctx, defaultMembershipTimeout)
	defer cancel()
	if err := s.raft.AddVoter(raft.ServerID(nodeID), raft.ServerAddress(addr), 0, time.Until(deadlineOf(ctx))).Error(); err != nil {
		return fmt.Errorf("add voter %s at %s: %w", nodeID, addr, membershipError(err))
	}
	s.logger.Info("voter added", "node", nodeID, "raft_addr", addr)
	return nil
}

// RemoveServer takes nodeID out of the cluster. Only the leader can
// (ErrNotLeader); an ID not in the configuration is an error wrapping
// fleet.ErrNotFound. The leader may remove itself: it steps down once the
// change commits and stays a follower outside the cluster.
func (s *Store) RemoveServer(ctx context.Context, nodeID string) error {
	if !s.IsLeader() {
		return fmt.Errorf("remove server %s: %w", nodeID, ErrNotLeader)
	}
	servers, err := s.servers()
	if err != nil {
		return fmt.Errorf("remove server %s: %w", nodeID, err)
	}
	known := false
	for _, srv := range servers {
		known = known || string(srv.ID) == nodeID
	}
	if !known {
		return fmt.Errorf("remove server %s: not in the raft configuration: %w", nodeID, fleet.ErrNotFound)
	}
	ctx, cancel := withDefaultTimeout(ctx, defaultMembershipTimeout)
	defer cancel()
	if err := s.raft.RemoveServer(raft.ServerID(nodeID), 0, time.Until(deadlineOf(ctx))).Error(); err != nil {
		return fmt.Errorf("remove server %s: %w", nodeID, membershipError(err))
	}
	s.logger.Info("server removed", "node", nodeID)
	return nil
}

// membershipError maps raft's answer to a configuration change. Losing
// leadership meanwhile is reported as ErrNotLeader although the change may
// have committed: both calls are idempotent in effect, so the caller
// retries on the new leader (a removal then answers fleet.ErrNotFound).
func membershipError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
		errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%v: %w", err, ErrNotLeader)
	case errors.Is(err, raft.ErrRaftShutdown):
		return ErrClosed
	}
	return err
}

// LeadershipTransfer hands leadership to the most up-to-date other voter
// and returns once it has taken over (or raft gave up, after about an
// election timeout, or ctx ended). Only the leader can (ErrNotLeader). Used before a
// planned shutdown, so writes pause for a round trip instead of an
// election timeout.
func (s *Store) LeadershipTransfer(ctx context.Context) error {
	if !s.IsLeader() {
		return fmt.Errorf("leadership transfer: %w", ErrNotLeader)
	}
	// Raft's future takes no context; it answers within about an election
	// timeout, so the goroutine ends soon even when ctx ends first.
	done := make(chan error, 1)
	go func() { done <- s.raft.LeadershipTransfer().Error() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		return fmt.Errorf("leadership transfer (may still complete): %w", ctx.Err())
	}
	if err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return fmt.Errorf("leadership transfer: %w", ErrNotLeader)
		}
		if errors.Is(err, raft.ErrRaftShutdown) {
			return fmt.Errorf("leadership transfer: %w", ErrClosed)
		}
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return nil
}

// Stats is raft's own status map (state, term, last_log_index,
// commit_index, applied_index, latest_configuration, last_contact,
// num_peers, ...), for the `cluster members` command and metrics. Keys and
// values are raft's and may change with its version.
func (s *Store) Stats() map[string]string { return s.raft.Stats() }

// LastContact is how long ago this node last heard from the leader: 0 on
// the leader itself, -1 when it never has.
func (s *Store) LastContact() time.Duration {
	if s.IsLeader() {
		return 0
	}
	t := s.raft.LastContact()
	if t.IsZero() {
		return -1
	}
	return time.Since(t)
}
