package raftstore

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"appliance/internal/testutil"
)

// testConfig is a node on loopback with fast timeouts.
func testConfig(t testing.TB, dir, id string) Config {
	return Config{
		Dir: dir, NodeID: id, BindAddr: "127.0.0.1:0", Logger: testLogger(t),
		HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond,
	}
}

func openConfig(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// clusterRaftTimeout is the heartbeat, election and lease timeout of the
// stores of a test cluster: longer than the product's, because these tests
// are not about failover (BenchmarkFailover measures it), and a leader must
// not lose its lease, nor a follower start an election, when two busy cores
// running the race detector leave raft's goroutines waiting (seen at 230
// ms with 100 ms timeouts).
const clusterRaftTimeout = 500 * time.Millisecond

// clusterConfig is testConfig for a store that is, or will be, one of
// several: with clusterRaftTimeout. (A store alone keeps testConfig's
// short timeouts: it cannot lose its leadership to a slow peer.)
func clusterConfig(t testing.TB, dir, id string) Config {
	cfg := testConfig(t, dir, id)
	cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = clusterRaftTimeout, clusterRaftTimeout, clusterRaftTimeout
	return cfg
}

// newTestCluster opens n stores in this process; n1 bootstraps, leads, and
// adds the others as voters. Each asks the others what they run straight
// from their Info (the cluster package's info RPC, without the network),
// so the upgrade gate lets through every command this build has. edit,
// when set, adjusts each node's Config.
func newTestCluster(t testing.TB, n int, edit func(cfg *Config)) []*Store {
	t.Helper()
	stores := make([]*Store, n)
	peers := newPeerSet()
	for i := range stores {
		cfg := clusterConfig(t, t.TempDir(), fmt.Sprintf("n%d", i+1))
		cfg.Bootstrap = i == 0
		cfg.PeerInfo = peers.info
		if edit != nil {
			edit(&cfg)
		}
		stores[i] = openConfig(t, cfg)
	}
	peers.add(stores...)
	ctx := testContext(t)
	if err := stores[0].WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	for _, s := range stores[1:] {
		if err := stores[0].AddVoter(ctx, s.NodeID(), s.RaftAddr()); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range stores[1:] {
		waitFor(t, s.NodeID()+" knows the leader", func() bool { _, id := s.Leader(); return id == "n1" })
	}
	// Every member holds the whole configuration before the test starts:
	// n1 commits a new member with the votes of any majority, and a
	// follower that has not heard of a later member yet refuses it its vote
	// (hashicorp/raft refuses candidates outside its configuration), so if
	// n1 stopped then, no leader could be elected. Seen under load in
	// TestStore_Failover_DefaultTimeouts: n2 still had {n1, n2}, n3 the
	// newest entries.
	for _, s := range stores {
		waitFor(t, s.NodeID()+" knows every member", func() bool {
			ms, err := s.Members(ctx)
			return err == nil && len(ms) == n
		})
	}
	return stores
}

func testContext(t testing.TB) context.Context { return testutil.Context(t) }

// waitFor polls cond until it holds (testutil.WaitFor).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, what, cond)
}

// leaderOf returns the store that leads, waiting for one.
func leaderOf(t testing.TB, stores []*Store) *Store {
	t.Helper()
	var leader *Store
	waitFor(t, "a leader is elected", func() bool {
		for _, s := range stores {
			if s.IsLeader() {
				leader = s
				return true
			}
		}
		return false
	})
	return leader
}

// peerSet fakes the network hop of the cluster package for
// Config.Forward: the entry goes straight to the named leader's
// ApplyEncoded in this process, and the answer crosses
// MarshalResult/UnmarshalResult or ErrorCode/ErrorFromCode as it would on
// the wire. fail, when set, can replace a call's outcome.
type peerSet struct {
	mu    sync.Mutex
	byID  map[string]*Store
	calls atomic.Int64
	// fail is called first with the call number (from 1); a non-nil
	// error, or apply=false, decides the call.
	fail func(call int64, leader *Store, entry []byte) (apply bool, err error)
}

func newPeerSet() *peerSet { return &peerSet{byID: map[string]*Store{}} }

func (p *peerSet) add(stores ...*Store) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range stores {
		p.byID[s.NodeID()] = s
	}
}

func (p *peerSet) forward(ctx context.Context, addr, id string, entry []byte) (*Result, error) {
	n := p.calls.Add(1)
	p.mu.Lock()
	s := p.byID[id]
	p.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("dial %s: unknown peer %s: %w", addr, id, ErrNotLeader)
	}
	if p.fail != nil {
		if apply, err := p.fail(n, s, entry); !apply || err != nil {
			return nil, err
		}
	}
	return wireRoundTrip(s.ApplyEncoded(ctx, entry))
}

// info answers Config.PeerInfo with the named store's Info.
func (p *peerSet) info(ctx context.Context, id, addr string) (NodeInfo, error) {
	p.mu.Lock()
	s := p.byID[id]
	p.mu.Unlock()
	if s == nil {
		return NodeInfo{}, fmt.Errorf("dial %s: unknown peer %s", addr, id)
	}
	return s.Info(), nil
}

// wireRoundTrip sends an ApplyEncoded answer through the wire encodings.
func wireRoundTrip(res *Result, err error) (*Result, error) {
	if res == nil {
		return nil, ErrorFromCode(ErrorCode(err), err.Error())
	}
	b, err := MarshalResult(res)
	if err != nil {
		return nil, err
	}
	out, err := UnmarshalResult(b)
	if err != nil {
		return nil, err
	}
	return out, out.Err
}

// tcpStream is the simplest StreamLayer: plain TCP, counting dials.
type tcpStream struct {
	net.Listener
	dials *atomic.Int64
}

func newTCPStream(t testing.TB, addr string) tcpStream {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return tcpStream{Listener: ln, dials: new(atomic.Int64)}
}

func (s tcpStream) Dial(address string, timeout time.Duration) (net.Conn, error) {
	s.dials.Add(1)
	return net.DialTimeout("tcp", address, timeout)
}

// flipInLog flips a bit delta bytes into every occurrence of pattern in
// the segments of the raft log in the raft directory dir, and returns the
// files it changed.
func flipInLog(t testing.TB, dir string, pattern []byte, delta int) []string {
	t.Helper()
	segs, err := filepath.Glob(filepath.Join(dir, logDirName, "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	var changed []string
	for _, path := range segs {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var offs []int
		for off := 0; ; {
			i := bytes.Index(raw[off:], pattern)
			if i < 0 {
				break
			}
			offs = append(offs, off+i+delta)
			off += i + len(pattern)
		}
		if len(offs) == 0 {
			continue
		}
		// In place: a running node has the file open.
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range offs {
			if _, err := f.WriteAt([]byte{raw[off] ^ 0x01}, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
		changed = append(changed, path)
	}
	if len(changed) == 0 {
		t.Fatalf("%q is in no segment of %s", pattern, filepath.Join(dir, logDirName))
	}
	return changed
}
