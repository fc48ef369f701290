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
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// Sentinel errors of the store.
var (
	// ErrNotLeader: the write or consistent read must go to the leader.
	// A write that fails with it was certainly not applied, so it may be
	// retried (elsewhere).
	ErrNotLeader = errors.New("not the raft leader")
	// ErrClosed: the store is shut down.
	ErrClosed = errors.New("store closed")
	// ErrUnknownOutcome: the write reached raft (or the leader) but no
	// answer came back, for example leadership was lost before the entry
	// committed or the connection to the leader broke after the request
	// was sent. The entry may still commit: retrying blindly could apply it
	// twice, so it is reported and never retried here.
	ErrUnknownOutcome = errors.New("outcome unknown: the write may or may not have been applied")
)

// Raft timeouts tuned for a LAN cluster of three controllers. The issue
// asks that a dead leader be replaced within about a second: a follower
// notices the silence after one to two heartbeat timeouts (raft randomises
// them) and then wins an election in a round trip unless votes split, so
// 300 ms puts a typical repair at 0.3-0.7 s, where raft's own 1 s defaults
// give 1-2 s. LAN round trips are well under a millisecond, so 300 ms still
// leaves a wide margin against false elections from a GC pause or a slow
// fsync. The leader lease equals the heartbeat timeout (the most raft
// allows): a leader that misses its quorum for that long steps down. A
// shorter lease (150 ms was tried) made a leader on a CPU-starved machine
// step down for nothing (the election soak in docs/benchmarks.md: two
// step-downs after 160-342 ms without contact), and the lease plays no part
// in safety (consistent reads check the quorum, writes need it) nor in how
// fast a dead leader is replaced.
const (
	DefaultHeartbeatTimeout   = 300 * time.Millisecond
	DefaultElectionTimeout    = 300 * time.Millisecond
	DefaultLeaderLeaseTimeout = 300 * time.Millisecond
)

// defaultApplyTimeout bounds a write whose context has no deadline.
const defaultApplyTimeout = 10 * time.Second

// Config configures a Store. The zero value of every optional field means a
// sensible default.
type Config struct {
	// Dir holds log/ (the raft log and stable store), state.db (the state
	// machine) and snapshots/. Required.
	Dir string
	// NodeID names this node in the cluster. Required.
	NodeID string
	// BindAddr is the raft listener, host:port. Port 0 picks a free port.
	// Ignored when Stream is set.
	BindAddr string
	// AdvertiseAddr is what peers dial; defaults to the bound address, or
	// to Stream.Addr() when Stream is set.
	AdvertiseAddr string
	// Stream, when set, carries raft's connections instead of a plain TCP
	// listener (the cluster package's mutual-TLS mux). The store owns it:
	// Close, or a failed Open, closes it.
	Stream StreamLayer
	// Forward sends an encoded command to the leader when this node is not
	// the leader; nil means Apply on a follower fails with ErrNotLeader.
	// It must return what the leader's ApplyEncoded returned: a Result (its
	// Err set for a rule rejection), or an error wrapping ErrNotLeader when
	// nothing was applied (the remote said so, or the request certainly
	// never left this node), or ErrUnknownOutcome. Any other error, a
	// transport failure after sending included, is treated as an unknown
	// outcome. See Apply.
	Forward func(ctx context.Context, leaderAddr, leaderID string, entry []byte) (*Result, error)
	// Bootstrap makes a node with no existing state form a cluster of one.
	Bootstrap bool
	// Observer follows applied changes (optional).
	Observer Observer
	// Version is this build's version, as peers and operators see it
	// (NodeInfo); "dev" when empty.
	Version string
	// PeerInfo asks the member id at its raft address addr what it runs
	// (the cluster package's info RPC). It returns an error wrapping
	// ErrNoNodeInfo when the peer answered that it has no such call (it
	// runs LegacyRelease), any other error when it did not answer. Nil
	// means no peer can be asked: a command outside LegacyCommands is then
	// proposed only in a cluster of one. See checkCommand.
	PeerInfo func(ctx context.Context, id, addr string) (NodeInfo, error)
	// Logger; defaults to slog.Default().
	Logger *slog.Logger

	// HeartbeatTimeout and ElectionTimeout default to
	// DefaultHeartbeatTimeout and DefaultElectionTimeout.
	HeartbeatTimeout time.Duration
	ElectionTimeout  time.Duration
	// LeaderLeaseTimeout defaults to DefaultLeaderLeaseTimeout, or to the
	// heartbeat timeout when that is shorter (raft requires the lease not
	// to exceed it).
	LeaderLeaseTimeout time.Duration
	// SnapshotThreshold: log entries between snapshots (default 8192).
	SnapshotThreshold uint64
	// SnapshotInterval: how often raft checks whether to snapshot (default 30 s).
	SnapshotInterval time.Duration
	// TrailingLogs kept after a snapshot (default 10240).
	TrailingLogs uint64
	// The byte-based compaction (compact.go); zero means the default.
	compactBytes, compactMaxBytes, compactKeepBytes int64
	compactEvery                                    time.Duration

	// bootID replaces readBootID in tests, which simulate a machine
	// restart by changing it.
	bootID func() (string, error)
	// decode replaces Decode in tests that stand a newer release's node
	// (one that knows a command type this build does not) beside nodes of
	// this build, in one process.
	decode func(entry []byte) (Command, error)
	// The write path as it was, for BenchmarkPacedWrites' baselines:
	// syncState fsyncs state.db on every commit, proposeEach calls
	// raft.Apply per command instead of through the proposer.
	syncState, proposeEach bool
	// boltLog keeps the log and stable store in raft-boltdb's raft.db, as
	// the release before raftlog did (no migration), for the benchmarks
	// that compare the two log stores and the tests that write a previous
	// release's directory (logstore.go).
	boltLog bool
}

// HashicorpDefaults returns c with hashicorp/raft's own timeouts (1 s
// heartbeat, 1 s election, 500 ms leader lease) in place of ours, so that a
// benchmark can compare failover with both in one run.
func (c Config) HashicorpDefaults() Config {
	d := raft.DefaultConfig()
	c.HeartbeatTimeout = d.HeartbeatTimeout
	c.ElectionTimeout = d.ElectionTimeout
	c.LeaderLeaseTimeout = d.LeaderLeaseTimeout
	return c
}

// Store is a node's replica of the cluster state: hashicorp/raft with a
// raftlog log and a bbolt state machine. Raft types never leave it.
type Store struct {
	cfg       Config
	logger    *slog.Logger
	raft      *raft.Raft
	fsm       *fsm
	proposer  *proposer // this node's proposals, one group at a time
	logStore  raftLog
	transport *raft.NetworkTransport

	// readyTerm is the latest term in which this node, as leader, saw an
	// entry of its own term commit; until then its commit index may lag
	// what the previous leader acknowledged (see leaderReady).
	readyTerm atomic.Uint64
	// replayTarget is the last entry in the log at open that the state
	// machine receives: once applied, the node has replayed its log.
	// resumed: the node opened with a state or a log of its own (a new
	// node, or one that joins, has neither: see Replayed).
	replayTarget uint64
	resumed      bool

	// compact: when to compact the log by its bytes (compact.go);
	// compactDone is closed when compactLoop has returned.
	compact struct {
		bytes, maxBytes, keepBytes int64
		every                      time.Duration
	}
	compactDone chan struct{}

	// peers caches what the other members can apply and how the leader's
	// heartbeats to them fare (capabilities.go).
	peers *peerTracker
	// halted is closed when the state machine halts (fsm.go); haltErr says why.
	halted   chan struct{}
	haltErr  atomic.Pointer[error]
	observer *raft.Observer
	// opened is closed when Open has finished; closing when Close begins.
	opened, closing chan struct{}

	closeOnce sync.Once
	closeErr  error
}

// Open starts the store: it opens the files in cfg.Dir, resumes from disk
// when they exist, and bootstraps a single-node cluster when asked and there
// is nothing to resume.
func Open(ctx context.Context, cfg Config) (_ *Store, err error) {
	if cfg.Stream != nil {
		// The store owns the stream: a failed Open must not leave it
		// accepting connections nobody serves. (After the transport exists,
		// closeFiles has closed it already; a second Close is harmless.)
		defer func() {
			if err != nil {
				cfg.Stream.Close()
			}
		}()
	}
	if cfg.Dir == "" || cfg.NodeID == "" {
		return nil, fmt.Errorf("raftstore: Dir and NodeID are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.BindAddr == "" && cfg.Stream == nil {
		cfg.BindAddr = "127.0.0.1:0"
	}
	rc, err := raftConfig(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create raft dir %s: %w", cfg.Dir, err)
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	logger := cfg.Logger.With("component", "raftstore")
	s := &Store{cfg: cfg, logger: logger, halted: make(chan struct{}), opened: make(chan struct{}), closing: make(chan struct{})}
	s.peers = newPeerTracker(cfg.PeerInfo)

	bootID := cfg.bootID
	if cfg.syncState {
		bootID = func() (string, error) { return "", errors.New("syncState set") }
	}
	statePath := filepath.Join(cfg.Dir, "state.db")
	f, err := claimFSM(statePath, cfg.Observer, logger, bootID)
	if err != nil {
		return nil, err
	}
	// Everything raft will read, read first: damage found once raft runs
	// panics inside its goroutines (preflight.go). The raft directory's
	// checks read other files than the state file's, so they run beside
	// them (a restart with a million devices waited for both in turn);
	// nothing is used before both have passed. (A previous release's
	// raft.db is migrated on the way even when the state file is then
	// refused: the migration keeps it, as raft.db.migrated.)
	type raftCheck struct {
		files *raftFiles
		err   error
	}
	raftChecked := make(chan raftCheck, 1)
	go func() {
		var c raftCheck
		c.files, c.err = checkRaftDir(cfg.Dir, f.machineDown, cfg.boltLog || benchBoltLog, logger)
		raftChecked <- c
	}()
	stateErr := f.open()
	checked := <-raftChecked
	files := checked.files
	if stateErr != nil {
		if files != nil {
			files.logStore.Close()
		}
		if isDamage(stateErr) {
			return nil, corrupt(cfg.Dir, statePath, stateErr)
		}
		return nil, stateErr
	}
	s.fsm = f
	f.sizes = newLogSizes(rc.TrailingLogs)
	f.version = cfg.Version
	f.onHalt = s.halt
	if cfg.decode != nil {
		f.decode = cfg.decode
	}
	err = checked.err
	if err == nil {
		if err = files.agrees(cfg.Dir, f.AppliedIndex()); err != nil {
			files.logStore.Close()
		}
	}
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	s.logStore = files.logStore
	s.replayTarget = files.log.lastApplied
	s.resumed = f.AppliedIndex() > 0 || files.log.last > 0 || files.newest != nil
	// Derived state (the evaluator's assignments) starts from what is on
	// disk, before raft applies anything new. A read that fails leaves it
	// incomplete: the node must not start on it.
	if cfg.Observer != nil {
		if err := f.view(cfg.Observer.Restored); err != nil {
			s.closeFiles()
			if !isDamage(err) {
				err = fmt.Errorf("%s: %w: loading it failed: %w", statePath, ErrCorrupt, err)
			}
			return nil, corrupt(cfg.Dir, statePath, err)
		}
	}

	hlog := newHCLogger(cfg.Logger.With("component", "raft"))
	snaps, err := newPrivateSnapshots(cfg.Dir, 2, hlog)
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("open snapshot store in %s: %w", cfg.Dir, err)
	}

	var transport *raft.NetworkTransport
	if cfg.Stream != nil {
		transport = newStreamTransport(cfg.Stream, cfg.AdvertiseAddr, hlog)
	} else {
		transport, err = newTCPTransport(cfg.BindAddr, cfg.AdvertiseAddr, hlog)
		if err != nil {
			s.closeFiles()
			return nil, err
		}
	}
	s.transport = transport
	rc.Logger = hlog

	// The state file keeps the applied index with the state it describes
	// (and is trusted at open unless the machine went down while it was
	// open, statefile.go), so raft need not re-install the last snapshot on
	// start and replay from there, unless the state file is behind that
	// snapshot by an entry that changes state (for example it was lost or
	// set aside; logFacts.sameStateAt).
	if files.newest != nil {
		rc.NoSnapshotRestoreOnStart = files.log.sameStateAt(f.AppliedIndex(), files.newest.Index)
	}
	ls := s.logStore

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

	logPath := files.logPath
	f.logPath = logPath
	logs := checkedLogStore{LogStore: ls, damaged: func(err error) {
		f.stop(corrupt(cfg.Dir, logPath, fmt.Errorf("%s: %w", logPath, err)))
	}}
	r, err := raft.NewRaft(rc, f, logs, ls, snaps, transport)
	if stopped := f.stoppedErr(); stopped != nil {
		// Installing the snapshot at start failed after the swap.
		if err == nil {
			r.Shutdown().Error()
		}
		s.closeFiles()
		close(s.closing)
		return nil, corrupt(cfg.Dir, statePath, stopped)
	}
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	s.raft = r
	s.proposer = newProposer(r)
	go s.proposer.run()
	s.observePeers()
	s.compact.bytes = orInt64(cfg.compactBytes, defaultCompactBytes)
	s.compact.maxBytes = orInt64(cfg.compactMaxBytes, defaultCompactMaxBytes)
	s.compact.keepBytes = orInt64(cfg.compactKeepBytes, defaultCompactKeepBytes)
	s.compact.every = orDuration(cfg.compactEvery, defaultCompactEvery)
	s.compactDone = make(chan struct{})
	go s.compactLoop()
	close(s.opened)
	logStore := "raftlog"
	if cfg.boltLog || benchBoltLog {
		logStore = "raft-boltdb (benchmarks only)"
	}
	logger.Info("raft started", "node", cfg.NodeID, "raft_addr", transport.LocalAddr(),
		"applied_index", f.AppliedIndex(), "resumed", hasState, "log_store", logStore)
	return s, nil
}

// raftConfig turns our Config into raft's, defaults applied and checked.
func raftConfig(cfg Config) (*raft.Config, error) {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.HeartbeatTimeout = orDuration(cfg.HeartbeatTimeout, DefaultHeartbeatTimeout)
	rc.ElectionTimeout = orDuration(cfg.ElectionTimeout, DefaultElectionTimeout)
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	if rc.LeaderLeaseTimeout <= 0 {
		rc.LeaderLeaseTimeout = min(DefaultLeaderLeaseTimeout, rc.HeartbeatTimeout)
	}
	if rc.LeaderLeaseTimeout > rc.HeartbeatTimeout {
		return nil, fmt.Errorf("raftstore: LeaderLeaseTimeout %s exceeds HeartbeatTimeout %s", rc.LeaderLeaseTimeout, rc.HeartbeatTimeout)
	}
	rc.CommitTimeout = 5 * time.Millisecond
	rc.SnapshotThreshold = orUint(cfg.SnapshotThreshold, 8192)
	rc.SnapshotInterval = orDuration(cfg.SnapshotInterval, 30*time.Second)
	rc.TrailingLogs = orUint(cfg.TrailingLogs, 10240)
	rc.BatchApplyCh = true
	rc.MaxAppendEntries = maxGroup
	// A leader that removes itself becomes a follower instead of shutting
	// raft down, so the node keeps running (and can be added back) rather
	// than holding a dead store.
	rc.ShutdownOnRemove = false
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("raftstore: %w", err)
	}
	return rc, nil
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
	t, err := raft.NewTCPTransportWithLogger(bind, adv, transportMaxPool, transportTimeout, hlog)
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

func orInt64(v, def int64) int64 {
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
		if err := s.fsm.close(); err != nil {
			// The open marker stays: after a machine restart the file
			// is rebuilt rather than trusted.
			s.logger.Error("close state file", "err", err)
		}
	}
}

// RaftAddr is the address peers use to reach this node's raft.
func (s *Store) RaftAddr() string { return string(s.transport.LocalAddr()) }

// NodeID is this node's id.
func (s *Store) NodeID() string { return s.cfg.NodeID }

// IsLeader reports whether this node currently leads.
func (s *Store) IsLeader() bool { return s.raftState() == raft.Leader }

// Leader returns the leader's raft address and id, empty when unknown.
func (s *Store) Leader() (addr, id string) {
	a, i := s.raft.LeaderWithID()
	return string(a), string(i)
}

// State is the raft state as a word: Leader, Follower, Candidate, Shutdown.
func (s *Store) State() string { return s.raftState().String() }

// raftState is raft's state, and Shutdown once Close began. Raft's own can
// turn back to Follower after its Shutdown: an AppendEntries being handled
// at that moment sets Follower without looking (hashicorp/raft 1.7.3,
// appendEntries), and the state then stays so for good. A store that
// halted and closed itself went on saying Follower (seen in
// TestStore_UnknownCommandHaltsEveryFollower under load).
func (s *Store) raftState() raft.RaftState {
	select {
	case <-s.closing:
		return raft.Shutdown
	default:
		return s.raft.State()
	}
}

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

// View runs fn against the local replica. On a follower it may lag the
// leader. For a read that must be current, the leader calls VerifyLeader
// first; a follower gets ReadIndex from the leader and calls WaitApplied.
func (s *Store) View(fn func(r *Reader) error) error { return s.fsm.view(fn) }

// Snapshot forces a snapshot now (tests, backups).
func (s *Store) Snapshot() error {
	if err := s.raft.Snapshot().Error(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return nil
}

// Replayed reports whether the state machine has applied every entry of
// the log this node had when it opened (the replay after a restart, or the
// rebuild after a snapshot install at start). It is false for a node that
// opened with nothing (new, or joining a cluster): only its leader can say
// when it has caught up. Entries of the log that the cluster never
// committed may be replaced instead of applied; a node waits for its
// leader then too (node readiness confirms with a read index).
func (s *Store) Replayed() bool { return s.resumed && s.fsm.AppliedIndex() >= s.replayTarget }

// Close shuts raft down and closes every file. It is idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		if s.observer != nil {
			s.raft.DeregisterObserver(s.observer)
		}
		if err := s.raft.Shutdown().Error(); err != nil {
			s.closeErr = fmt.Errorf("shutdown raft: %w", err)
		}
		<-s.compactDone // its snapshot, if any, ended with raft
		// Nothing applies any more: wake WaitApplied callers with ErrClosed.
		s.proposer.stop()
		s.fsm.stopWaiters()
		s.closeFiles()
		s.logger.Info("raft stopped", "node", s.cfg.NodeID)
	})
	return s.closeErr
}

// halt is the state machine's call (on raft's apply goroutine) when it
// stops: it met a command this build cannot apply, or damaged state. The
// store shuts raft down at once, in the background (raft's shutdown waits
// for the apply goroutine): a replica that cannot apply its log must not
// vote, lead or serve reads.
func (s *Store) halt(err error) {
	if s.haltErr.CompareAndSwap(nil, &err) {
		close(s.halted)
		go func() {
			select {
			case <-s.opened: // a halt while raft replays inside Open
				s.Close()
			case <-s.closing: // Open failed and cleaned up
			}
		}()
	}
}

// Halted is closed when the store stopped because its state machine did:
// its log holds a command this build cannot apply (a newer release wrote
// it; HaltError is an *UnknownCommandError: upgrade the node), or it found
// damaged state (a *CorruptError naming the file and the recovery). The
// store closes itself: the node must stop. Until then the state file stays
// at the entry before.
func (s *Store) Halted() <-chan struct{} { return s.halted }

// HaltError is why the store halted, nil while it has not.
func (s *Store) HaltError() error {
	if e := s.haltErr.Load(); e != nil {
		return *e
	}
	return nil
}
