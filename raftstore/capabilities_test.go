package raftstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// unknownEntry is a log entry of a command type no build knows yet: what
// a newer release's leader would write.
var unknownEntry = []byte{200, '{', '}'}

// proposeRaw puts entry in the log through raft itself, past Apply and
// its gate (as a leader of a newer release would), and returns its index.
func proposeRaw(t *testing.T, leader *Store, entry []byte) uint64 {
	t.Helper()
	f := leader.raft.Apply(entry, 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatalf("propose the raw entry: %v", err)
	}
	return f.Index()
}

// storedAppliedIndex reads meta/appliedIndex from a closed store's state
// file: what a restart resumes from.
func storedAppliedIndex(t *testing.T, dir string) uint64 {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "state.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	idx, err := readAppliedIndex(db)
	if err != nil {
		t.Fatal(err)
	}
	return idx
}

func waitHalted(t *testing.T, s *Store) *UnknownCommandError {
	t.Helper()
	select {
	case <-s.Halted():
	case <-time.After(testutil.WaitTimeout):
		t.Fatalf("%s did not halt on the unknown command (applied index %d)", s.NodeID(), s.AppliedIndex())
	}
	var h *UnknownCommandError
	if !errors.As(s.HaltError(), &h) || !errors.Is(s.HaltError(), ErrUnknownCommand) {
		t.Fatalf("%s: HaltError() = %v, want an *UnknownCommandError", s.NodeID(), s.HaltError())
	}
	return h
}

// newerRelease decodes entries as a build of a newer release would: it
// knows command type 200 (unknownEntry). What such a build does with it is
// not this package's business; here it is a command with no handler, which
// the state machine answers as a rejection and goes on.
func newerRelease(entry []byte) (Command, error) {
	if len(entry) > 0 && entry[0] == unknownEntry[0] {
		return newerCommandEntry{}, nil
	}
	return Decode(entry)
}

type newerCommandEntry struct{}

func (newerCommandEntry) Type() CommandType { return CommandType(unknownEntry[0]) }

// TestStore_UnknownCommandHaltsEveryFollower is the follower's side of a
// rolling upgrade: the leader runs a newer release and proposes a command
// this build does not know (the gate keeps it from doing so while a member
// cannot apply it; a member downgraded after the gate asked meets it
// anyway). Every replica of this build stops at the entry before it (the
// state file too), rather than skipping it as the previous release did,
// which left the node's state different from its peers' for good. A write
// after it is not applied there either, the store shuts itself down (no
// vote, no leadership), and the error says what to do. The leader goes on,
// so every follower learns the entry is committed (a leader that halts
// too may leave a follower that never learns it: DESIGN.md, Upgrades).
func TestStore_UnknownCommandHaltsEveryFollower(t *testing.T) {
	stores := newTestCluster(t, 3, func(cfg *Config) {
		if cfg.NodeID == "n1" {
			cfg.decode = newerRelease
		}
	})
	leader, followers := stores[0], stores[1:]
	putDevice(t, leader, "before", nil)
	idx := proposeRaw(t, leader, unknownEntry)
	after, _ := Encode(PutDevice{Device: fleet.Device{ID: "after"}})
	leader.raft.Apply(after, time.Second)

	for _, s := range followers {
		h := waitHalted(t, s)
		if h.Index != idx || h.Type != 200 {
			t.Errorf("%s halted at entry %d type %d, want %d type 200", s.NodeID(), h.Index, h.Type, idx)
		}
		for _, want := range []string{fmt.Sprint(idx), "command type 200", "upgrade this node"} {
			if !strings.Contains(h.Error(), want) {
				t.Errorf("%s: halt message %q does not say %q", s.NodeID(), h.Error(), want)
			}
		}
		if got := s.AppliedIndex(); got != idx-1 {
			t.Errorf("%s applied up to %d, want %d: the entry before the unknown one", s.NodeID(), got, idx-1)
		}
		waitFor(t, s.NodeID()+" shut down", func() bool { return s.State() == raft.Shutdown.String() })
		if _, err := s.Apply(testContext(t), PutDevice{Device: fleet.Device{ID: "later"}}); !errors.Is(err, ErrClosed) {
			t.Errorf("%s: a write after the halt: %v, want ErrClosed", s.NodeID(), err)
		}
	}
	select {
	case <-leader.Halted():
		t.Errorf("the leader, which knows the command, halted: %v", leader.HaltError())
	default:
		if got := leader.AppliedIndex(); got < idx {
			t.Errorf("the leader applied up to %d, want at least %d", got, idx)
		}
	}
	for _, s := range followers {
		s.Close()
		if got := storedAppliedIndex(t, s.cfg.Dir); got != idx-1 {
			t.Errorf("%s: state.db holds applied index %d, want %d", s.NodeID(), got, idx-1)
		}
	}
}

// TestStore_UnknownCommandHaltsAgainAfterRestart: a node restarted on the
// same build meets the same entry and halts at the same place; nothing is
// skipped and nothing before it is lost, so a newer build started there
// applies the entry.
func TestStore_UnknownCommandHaltsAgainAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s := openTestStore(t, dir, "n1", true, nil)
	putDevice(t, s, "before", nil)
	idx := proposeRaw(t, s, unknownEntry)
	waitHalted(t, s)
	s.Close()

	s = openTestStore(t, dir, "n1", false, nil)
	defer s.Close()
	h := waitHalted(t, s)
	if h.Index != idx || s.AppliedIndex() != idx-1 {
		t.Fatalf("after a restart: halted at %d with applied index %d, want %d and %d", h.Index, s.AppliedIndex(), idx, idx-1)
	}
	s.Close()
	if got := storedAppliedIndex(t, dir); got != idx-1 {
		t.Fatalf("state.db holds applied index %d, want %d", got, idx-1)
	}
}

// TestFSM_HaltedTakesNoSnapshot: raft would label a snapshot of a halted
// state machine with an index past what its file holds, and a restart
// from it would skip the entries in between.
func TestFSM_HaltedTakesNoSnapshot(t *testing.T) {
	f := newTestFSM(t)
	res := f.ApplyBatch([]*raft.Log{{Index: 1, Type: raft.LogCommand, Data: unknownEntry}})
	if r, _ := res[0].(*Result); r == nil || !errors.Is(r.Err, ErrUnknownOutcome) || !errors.Is(r.Err, ErrUnknownCommand) {
		t.Fatalf("result %+v, want an error wrapping ErrUnknownCommand and ErrUnknownOutcome", res[0])
	}
	if _, err := f.Snapshot(); !errors.Is(err, ErrUnknownCommand) {
		t.Fatalf("Snapshot of a halted state machine: %v, want a refusal", err)
	}
	if f.AppliedIndex() != 0 {
		t.Fatalf("applied index %d, want 0", f.AppliedIndex())
	}
}

// fakePeers answers Config.PeerInfo from a table, counting the questions.
type fakePeers struct {
	mu      sync.Mutex
	answers map[string]func() (NodeInfo, error)
	asked   atomic.Int64
}

func (p *fakePeers) info(ctx context.Context, id, _ string) (NodeInfo, error) {
	p.asked.Add(1)
	p.mu.Lock()
	answer := p.answers[id]
	p.mu.Unlock()
	if answer == nil {
		return NodeInfo{}, fmt.Errorf("dial %s: connection refused", id)
	}
	return answer()
}

func (p *fakePeers) set(id string, answer func() (NodeInfo, error)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.answers[id] = answer
}

// A command type none of today's builds has: the gate is about types
// outside LegacyCommands.
const newerCommand CommandType = 250

func runs(cmds ...CommandType) func() (NodeInfo, error) {
	return func() (NodeInfo, error) {
		return NodeInfo{Version: "v-next", Commands: append(LegacyCommands(), cmds...)}, nil
	}
}

func legacyPeer() (NodeInfo, error) {
	return NodeInfo{}, fmt.Errorf("HTTP 404: %w", ErrNoNodeInfo)
}

func downPeer() (NodeInfo, error) { return NodeInfo{}, errors.New("i/o timeout") }

// TestStore_CheckCommand is the leader's gate: a command outside
// LegacyCommands is proposed only when every other member said it can
// apply it; a member of the previous release (no info RPC) or one that
// does not answer holds it back, with an error naming it; LegacyCommands
// never wait for anyone.
func TestStore_CheckCommand(t *testing.T) {
	peers := &fakePeers{answers: map[string]func() (NodeInfo, error){}}
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.PeerInfo = peers.info; cfg.Version = "v-this" })
	leader := stores[0]
	ctx := testContext(t)
	for _, tc := range []struct {
		name       string
		n2, n3     func() (NodeInfo, error)
		cmd        CommandType
		wantBehind []string // substrings of the refusal; nil: allowed
	}{
		{"every member can", runs(newerCommand), runs(newerCommand), newerCommand, nil},
		{"n2 of the previous release", legacyPeer, runs(newerCommand), newerCommand,
			[]string{"n2 runs " + LegacyRelease + " or older (commands 1-11)", "command 250"}},
		{"n3 an older build", runs(newerCommand), runs(), newerCommand, []string{"n3 runs v-next (commands 1-11)"}},
		{"n2 does not answer: fail closed", downPeer, runs(newerCommand), newerCommand, []string{"n2 did not say what it runs", "i/o timeout"}},
		{"legacy command with n2 down and n3 legacy", downPeer, legacyPeer, CmdPutDevice, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peers.set("n2", tc.n2)
			peers.set("n3", tc.n3)
			leader.peers.mu.Lock()
			clear(leader.peers.infos) // nothing cached from the last case
			leader.peers.mu.Unlock()
			asked := peers.asked.Load()
			err := leader.checkCommand(ctx, tc.cmd)
			if tc.wantBehind == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if isLegacyCommand(tc.cmd) && peers.asked.Load() != asked {
					t.Fatalf("a legacy command asked the peers")
				}
				return
			}
			var be *ClusterBehindError
			if !errors.As(err, &be) || !errors.Is(err, ErrClusterBehind) {
				t.Fatalf("err = %v, want a *ClusterBehindError", err)
			}
			for _, w := range tc.wantBehind {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("refusal %q does not say %q", err, w)
				}
			}
			// The refusal crosses the wire to a follower as its class.
			if back := ErrorFromCode(ErrorCode(err), err.Error()); !errors.Is(back, ErrClusterBehind) || back.Error() != err.Error() {
				t.Errorf("over the wire: %v", back)
			}
		})
	}
}

// TestPeerTracker_Cache: an answer is reused for peerInfoTTL, a fresh
// question (cluster members) asks again, and the leader seeing a peer's
// heartbeats fail or resume forgets its answer at once (it restarted,
// perhaps as another release).
func TestPeerTracker_Cache(t *testing.T) {
	peers := &fakePeers{answers: map[string]func() (NodeInfo, error){"n2": runs()}}
	p := newPeerTracker(peers.info)
	ctx := context.Background()
	ask := func(fresh bool) NodeInfo {
		t.Helper()
		info, err := p.info(ctx, "n2", "addr-2", fresh)
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	ask(false)
	ask(false)
	if n := peers.asked.Load(); n != 1 {
		t.Fatalf("asked %d times within the TTL, want 1", n)
	}
	ask(true)
	if n := peers.asked.Load(); n != 2 {
		t.Fatalf("a fresh question did not ask (%d)", n)
	}
	peers.set("n2", runs(newerCommand))
	p.observe(raft.Observation{Data: raft.FailedHeartbeatObservation{PeerID: "n2", LastContact: time.Now().Add(-3 * time.Second)}})
	if c := p.contacts([]string{"n2"})["n2"]; !c.Failing || c.SinceMs < 3000 {
		t.Fatalf("heartbeat view after a failure: %+v", c)
	}
	p.observe(raft.Observation{Data: raft.ResumedHeartbeatObservation{PeerID: "n2"}})
	if !ask(false).CanApply(newerCommand) {
		t.Fatal("after the peer's heartbeats resumed, its old answer was still used")
	}
	if c := p.contacts([]string{"n2"})["n2"]; c.Failing {
		t.Fatalf("heartbeat view after resuming: %+v", c)
	}
	// A legacy peer reads as LegacyRelease, not as an error.
	peers.set("n3", legacyPeer)
	info, err := p.info(ctx, "n3", "addr-3", false)
	if err != nil || !info.Legacy || info.Version != LegacyRelease || !slices.Equal(info.Commands, LegacyCommands()) {
		t.Fatalf("legacy peer: %+v, %v", info, err)
	}
}

// TestCommands: the registry, LegacyCommands and their ranges.
func TestCommands(t *testing.T) {
	cmds := Commands()
	for _, c := range LegacyCommands() {
		if !slices.Contains(cmds, c) {
			t.Errorf("this build cannot apply legacy command %s", c)
		}
	}
	if got := commandRanges(LegacyCommands()); got != "1-11" {
		t.Errorf("LegacyCommands = %s, want 1-11 (the command types of %s)", got, LegacyRelease)
	}
	if got := commandRanges([]CommandType{1, 2, 3, 5, 7, 8}); got != "1-3, 5, 7-8" {
		t.Errorf("commandRanges = %q", got)
	}
	if _, err := Decode(unknownEntry); !errors.Is(err, ErrUnknownCommand) {
		t.Errorf("Decode of type 200: %v, want ErrUnknownCommand", err)
	}
}

// TestStore_Apply_GatesNewCommands: Apply and ApplyEncoded refuse a command
// outside LegacyCommands (enrollment rotation, 13) while one member runs
// the previous release, before anything is proposed, on the leader and
// on a follower (which checks before forwarding), and also a write
// forwarded to the leader by a node that did not check; once that member
// says it can apply it, the same write goes through.
func TestStore_Apply_GatesNewCommands(t *testing.T) {
	peers := &fakePeers{answers: map[string]func() (NodeInfo, error){}}
	fwd := newPeerSet()
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.PeerInfo = peers.info; cfg.Forward = fwd.forward })
	fwd.add(stores...)
	current := func() (NodeInfo, error) { return NodeInfo{Version: "v-this", Commands: Commands()}, nil }
	for _, id := range []string{"n1", "n2", "n3"} {
		peers.set(id, current)
	}
	peers.set("n3", legacyPeer)
	leader, follower := stores[0], stores[1]
	ctx := testContext(t)
	if _, err := leader.Apply(ctx, PutEnrollment{Time: time.Now().UTC(), Enrollment: fleet.Enrollment{Name: "line-1", DerivationKey: "k1"}}); err != nil {
		t.Fatalf("a legacy command with a legacy member: %v", err)
	}
	rotate := RotateEnrollment{Name: "line-1", DerivationKey: "k2", Time: time.Now().UTC()}
	entry, err := Encode(rotate)
	if err != nil {
		t.Fatal(err)
	}
	before := leader.AppliedIndex()
	for name, try := range map[string]func() error{
		"on the leader":            func() error { _, err := leader.Apply(ctx, rotate); return err },
		"on a follower":            func() error { _, err := follower.Apply(ctx, rotate); return err },
		"forwarded, on the leader": func() error { _, err := leader.ApplyEncoded(ctx, entry); return err },
		"forwarded, over the wire": func() error { _, err := fwd.forward(ctx, leader.RaftAddr(), "n1", entry); return err },
	} {
		err := try()
		if !errors.Is(err, ErrClusterBehind) || !strings.Contains(err.Error(), "n3 runs "+LegacyRelease) {
			t.Errorf("%s: %v, want a refusal naming n3", name, err)
		}
	}
	if leader.AppliedIndex() != before {
		t.Fatalf("applied index moved %d -> %d: a refused command was proposed", before, leader.AppliedIndex())
	}

	peers.set("n3", current) // n3 upgraded
	for _, s := range stores {
		s.peers.mu.Lock()
		clear(s.peers.infos) // the restart the leader would have seen
		s.peers.mu.Unlock()
	}
	if _, err := follower.Apply(ctx, rotate); err != nil {
		t.Fatalf("every member current: %v", err)
	}
}

// TestStore_CheckCommand_SilentMemberOfACommittedType: once the cluster
// committed a command of a type (every member could apply it then), a
// member that does not answer no longer holds that type back: a dead node
// must not stop what the cluster already runs (a rollout whose leader
// died). A type never committed still waits for every member, and a
// member that answers without the type is still refused.
func TestStore_CheckCommand_SilentMemberOfACommittedType(t *testing.T) {
	peers := &fakePeers{answers: map[string]func() (NodeInfo, error){"n2": runs(CmdBindNode), "n3": runs(CmdBindNode)}}
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.PeerInfo = peers.info })
	leader := stores[0]
	ctx := testContext(t)
	forget := func() {
		leader.peers.mu.Lock()
		clear(leader.peers.infos)
		leader.peers.mu.Unlock()
	}
	peers.set("n2", downPeer)
	if err := leader.checkCommand(ctx, CmdBindNode); !errors.Is(err, ErrClusterBehind) {
		t.Fatalf("before any bind-node committed, a silent member: %v, want the gate to hold", err)
	}
	peers.set("n2", runs(CmdBindNode))
	forget()
	if _, err := leader.Apply(ctx, BindNode{NodeID: "n9", Fingerprint: "ab"}); err != nil {
		t.Fatal(err)
	}
	peers.set("n2", downPeer)
	forget()
	if err := leader.checkCommand(ctx, CmdBindNode); err != nil {
		t.Fatalf("a silent member held back a committed type: %v", err)
	}
	if err := leader.checkCommand(ctx, CmdRotateEnrollment); !errors.Is(err, ErrClusterBehind) || !strings.Contains(err.Error(), "n2 did not say what it runs") {
		t.Fatalf("a type never committed, a silent member: %v, want the gate to hold", err)
	}
	peers.set("n2", runs())
	forget()
	if err := leader.checkCommand(ctx, CmdBindNode); !errors.Is(err, ErrClusterBehind) || !strings.Contains(err.Error(), "n2 runs") {
		t.Fatalf("a member that answers without the type: %v, want the gate to hold", err)
	}
}
