package raftstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// Sentinel errors of the store.
var (
	// ErrNotLeader: the write or consistent read must go to the leader.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrClosed: the store is shut down.
	ErrClosed = errors.New("store closed")
)

// Config configures a Store. The zero value of every optional field means a
// sensible default.
type Config struct {
	// Dir holds raft.db (log and stable store), state.db (the state
	// machine) and snapshots/. Required.
	Dir string
	// NodeID names this node in the cluster. Required.
	NodeID string
	// BindAddr is the raft listener, host:port. Port 0 picks a free port.
	BindAddr string
	// AdvertiseAddr is what peers dial; defaults to the bound address.
	AdvertiseAddr string
	// Bootstrap makes a node with no existing state form a cluster of one.
	Bootstrap bool
	// Observer follows applied changes (optional).
	Observer Observer
	// Logger; defaults to slog.Default().
	Logger *slog.Logger

	// HeartbeatTimeout and ElectionTimeout; default 500 ms each.
	HeartbeatTimeout time.Duration
	ElectionTimeout  time.Duration
	// SnapshotThreshold: log entries between snapshots (default 8192).
	SnapshotThreshold uint64
	// SnapshotInterval: how often raft checks whether to snapshot (default 30 s).
	SnapshotInterval time.Duration
	// TrailingLogs kept after a snapshot (default 10240).
	TrailingLogs uint64
}

// Store is a node's replica of the cluster state: hashicorp/raft with a
// raft-boltdb log and a bbolt state machine. Raft types never leave it.
type Store struct {
	cfg       Config
	logger    *slog.Logger
	raft      *raft.Raft
	fsm       *fsm
	logStore  *raftboltdb.BoltStore
	transport *raft.NetworkTransport

	closeOnce sync.Once
	closeErr  error
}

// Open starts the store: it opens the files in cfg.Dir, resumes from disk
// when they exist, and bootstraps a single-node cluster when asked and there
// is nothing to resume.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Dir == "" || cfg.NodeID == "" {
		return nil, fmt.Errorf("raftstore: Dir and NodeID are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "127.0.0.1:0"
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create raft dir %s: %w", cfg.Dir, err)
	}
	logger := cfg.Logger.With("component", "raftstore")
	s := &Store{cfg: cfg, logger: logger}

	f, err := openFSM(filepath.Join(cfg.Dir, "state.db"), cfg.Observer, logger)
	if err != nil {
		return nil, err
	}
	s.fsm = f
	// Derived state (the evaluator's assignments) starts from what is on
	// disk, before raft applies anything new.
	if cfg.Observer != nil {
		if err := f.view(func(r *Reader) error { cfg.Observer.Restored(r); return nil }); err != nil {
			f.close()
			return nil, fmt.Errorf("load state for observer: %w", err)
		}
	}

	ls, err := raftboltdb.NewBoltStore(filepath.Join(cfg.Dir, "raft.db"))
	if err != nil {
		f.close()
		return nil, fmt.Errorf("open raft log %s: %w", filepath.Join(cfg.Dir, "raft.db"), err)
	}
	s.logStore = ls

	hlog := newHCLogger(cfg.Logger.With("component", "raft"))
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 2, hlog)
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("open snapshot store in %s: %w", cfg.Dir, err)
	}

	transport, err := newTCPTransport(cfg.BindAddr, cfg.AdvertiseAddr, hlog)
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	s.transport = transport

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = hlog
	rc.HeartbeatTimeout = orDuration(cfg.HeartbeatTimeout, 500*time.Millisecond)
	rc.ElectionTimeout = orDuration(cfg.ElectionTimeout, 500*time.Millisecond)
	rc.LeaderLeaseTimeout = rc.HeartbeatTimeout / 2
	rc.CommitTimeout = 5 * time.Millisecond
	rc.SnapshotThreshold = orUint(cfg.SnapshotThreshold, 8192)
	rc.SnapshotInterval = orDuration(cfg.SnapshotInterval, 30*time.Second)
	rc.TrailingLogs = orUint(cfg.TrailingLogs, 10240)
	rc.BatchApplyCh = true
	rc.MaxAppendEntries = 256

	// The state machine is durable on its own (bbolt, fsynced with the
	// applied index), so raft need not re-install the last snapshot on start
	// and replay from there, unless the state file is behind that snapshot
	// (for example it was lost).
	if metas, err := snaps.List(); err == nil && len(metas) > 0 {
		rc.NoSnapshotRestoreOnStart = f.AppliedIndex() >= metas[0].Index
	}

	hasState, err := raft.HasExistingState(ls, ls, snaps)
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("check existing raft state: %w", err)
	}
	if !hasState && cfg.Bootstrap {
		conf := raft.Configuration{Servers: []raft.Server{{
			ID: rc.LocalID, Address: transport.LocalAddr(),
		}}}
		if err := raft.BootstrapCluster(rc, ls, ls, snaps, transport, conf); err != nil {
			s.closeFiles()
			return nil, fmt.Errorf("bootstrap cluster: %w", err)
		}
		logger.Info("bootstrapped a new cluster", "node", cfg.NodeID, "raft_addr", transport.LocalAddr())
	}

	r, err := raft.NewRaft(rc, f, ls, ls, snaps, transport)
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	s.raft = r
	logger.Info("raft started", "node", cfg.NodeID, "raft_addr", transport.LocalAddr(),
		"applied_index", f.AppliedIndex(), "resumed", hasState)
	return s, nil
}

func newTCPTransport(bind, advertise string, hlog *hcLogger) (*raft.NetworkTransport, error) {
	var adv net.Addr
	if advertise != "" {
		a, err := net.ResolveTCPAddr("tcp", advertise)
		if err != nil {
			return nil, fmt.Errorf("raft advertise address %q: %w", advertise, err)
		}
		adv = a
	}
	t, err := raft.NewTCPTransportWithLogger(bind, adv, 3, 10*time.Second, hlog)
	if err != nil {
		return nil, fmt.Errorf("raft listener %s: %w", bind, err)
	}
	return t, nil
}

func orDuration(v, def time.Duration) time.Duration {
	if v > 0 {
		return v
	}
	return def
}

func orUint(v, def uint64) uint64 {
	if v > 0 {
		return v
	}
	return def
}

func (s *Store) closeFiles() {
	if s.transport != nil {
		s.transport.Close()
	}
	if s.logStore != nil {
		s.logStore.Close()
	}
	if s.fsm != nil {
		s.fsm.close()
	}
}

// RaftAddr is the address peers use to reach this node's raft.
func (s *Store) RaftAddr() string { return string(s.transport.LocalAddr()) }

// NodeID is this node's id.
func (s *Store) NodeID() string { return s.cfg.NodeID }

// IsLeader reports whether this node currently leads.
func (s *Store) IsLeader() bool { return s.raft.State() == raft.Leader }

// Leader returns the leader's raft address and id, empty when unknown.
func (s *Store) Leader() (addr, id string) {
	a, i := s.raft.LeaderWithID()
	return string(a), string(i)
}

// State is the raft state as a word: Leader, Follower, Candidate, Shutdown.
func (s *Store) State() string { return s.raft.State().String() }

// AppliedIndex is the index of the last entry in the local state machine.
func (s *Store) AppliedIndex() uint64 { return s.fsm.AppliedIndex() }

// WaitLeader blocks until the cluster has a leader or ctx ends.
func (s *Store) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if a, _ := s.raft.LeaderWithID(); a != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for a raft leader: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// Apply proposes one command and waits until it is committed by a quorum,
// fsynced and applied to the local state machine. Rule rejections come
// back as the error, wrapped around a fleet sentinel.
func (s *Store) Apply(ctx context.Context, cmd Command) (*Result, error) {
	data, err := Encode(cmd)
	if err != nil {
		return nil, err
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	f := s.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return nil, fmt.Errorf("apply %s: %w", cmd.Type(), ErrNotLeader)
		}
		if errors.Is(err, raft.ErrRaftShutdown) {
			return nil, fmt.Errorf("apply %s: %w", cmd.Type(), ErrClosed)
		}
		return nil, fmt.Errorf("apply %s: %w", cmd.Type(), err)
	}
	res, ok := f.Response().(*Result)
	if !ok || res == nil {
		return nil, fmt.Errorf("apply %s: no result from the state machine", cmd.Type())
	}
	if res.Err != nil {
		return res, res.Err
	}
	return res, nil
}

// View runs fn against the local replica. On a follower it may lag the
// leader; call VerifyLeader first when the read must be current.
func (s *Store) View(fn func(r *Reader) error) error { return s.fsm.view(fn) }

// VerifyLeader returns nil when this node is the leader, a quorum agrees,
// and the local state machine has applied everything committed before the
// call. Otherwise ErrNotLeader.
func (s *Store) VerifyLeader(ctx context.Context) error {
	if err := s.raft.VerifyLeader().Error(); err != nil {
		return fmt.Errorf("verify leader: %w", ErrNotLeader)
	}
	// A leader applies its own entries before answering Apply, but a new
	// leader may still be applying the previous term's; a barrier waits.
	if s.fsm.AppliedIndex() < s.raft.CommitIndex() {
		timeout := 5 * time.Second
		if dl, ok := ctx.Deadline(); ok {
			timeout = time.Until(dl)
		}
		if err := s.raft.Barrier(timeout).Error(); err != nil {
			return fmt.Errorf("barrier: %w", err)
		}
	}
	return nil
}

// Snapshot forces a snapshot now (tests, backups).
func (s *Store) Snapshot() error {
	if err := s.raft.Snapshot().Error(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return nil
}

// Close shuts raft down and closes every file. It is idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		if err := s.raft.Shutdown().Error(); err != nil {
			s.closeErr = fmt.Errorf("shutdown raft: %w", err)
		}
		s.closeFiles()
		s.logger.Info("raft stopped", "node", s.cfg.NodeID)
	})
	return s.closeErr
}

// AddVoter adds (or re-adds, idempotently) a node to the cluster. Only the
// leader can do it.
func (s *Store) AddVoter(ctx context.Context, nodeID, addr string) error {
	if err := s.raft.AddVoter(raft.ServerID(nodeID), raft.ServerAddress(addr), 0, 10*time.Second).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return fmt.Errorf("add voter %s: %w", nodeID, ErrNotLeader)
		}
		return fmt.Errorf("add voter %s at %s: %w", nodeID, addr, err)
	}
	return nil
}
