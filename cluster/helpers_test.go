package cluster_test

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/fleet"
	"appliance/internal/testutil"
	"appliance/pki"
	"appliance/raftstore"
)

// logRecorder is a slog destination that keeps every line (so a test can
// check what a node logged) and copies it to t.Log while the test runs.
// Lines written after the test ended (a connection goroutine finishing
// late) are dropped: t.Log would panic.
type logRecorder struct {
	t      testing.TB
	prefix string
	mu     sync.Mutex
	lines  []string
	done   bool
}

func newLogRecorder(t testing.TB, prefix string) *logRecorder {
	r := &logRecorder{t: t, prefix: prefix}
	t.Cleanup(func() {
		r.mu.Lock()
		r.done = true
		r.mu.Unlock()
	})
	return r
}

func (r *logRecorder) Write(p []byte) (int, error) {
	line := strings.TrimRight(string(p), "\n")
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, line)
	if !r.done {
		r.t.Log(r.prefix + ": " + line)
	}
	return len(p), nil
}

// logger is a logger writing to r, at info level (raft's debug chatter
// would drown the lines the tests look for).
func (r *logRecorder) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(r, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// mark is the number of lines so far, for since.
func (r *logRecorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.lines)
}

// since returns the lines logged after mark that contain substr.
func (r *logRecorder) since(mark int, substr string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range r.lines[mark:] {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// testCluster is the identity of one cluster: its CA and join token.
type testCluster struct {
	ca    *pki.CA
	token string
	admin string
}

func newTestCluster(t testing.TB, name string) testCluster {
	t.Helper()
	ca, err := pki.NewCA(name, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	secret, err := pki.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	return testCluster{ca: ca, token: pki.FormatJoinToken(ca.Fingerprint(), secret), admin: "admin-" + name}
}

// bundle issues a node certificate of this cluster.
func (c testCluster) bundle(t testing.TB, nodeID string) *pki.Bundle {
	t.Helper()
	b, err := pki.NewBundle(c.ca, nodeID, []string{"127.0.0.1", "localhost"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testRaftTimeout is the raft heartbeat, election and lease timeout of
// the test nodes.
const testRaftTimeout = 500 * time.Millisecond

// testNode is a controller's cluster half, wired as package node wires
// it: the mux on a free loopback port, raft over the mux's raft layer,
// writes on a follower forwarded through the node's Client, the RPC
// server on the mux's HTTP side.
type testNode struct {
	id     string
	bundle *pki.Bundle
	mux    *cluster.Mux
	client *cluster.Client
	store  *raftstore.Store
	server *cluster.Server
	logs   *logRecorder
	// forwards counts the writes this node's store sent to a leader.
	forwards atomic.Int64
}

func (n *testNode) addr() string { return n.mux.Advertise() }

// startNode starts a node with bundle b; bootstrap makes it a cluster of
// one. Everything stops at the end of the test.
func startNode(t testing.TB, b *pki.Bundle, secrets cluster.Secrets, bootstrap bool) *testNode {
	t.Helper()
	n := &testNode{id: b.NodeID, bundle: b, logs: newLogRecorder(t, b.NodeID)}
	logger := n.logs.logger()
	mux, err := cluster.Listen("127.0.0.1:0", "", b, logger)
	if err != nil {
		t.Fatal(err)
	}
	n.mux = mux
	n.client = cluster.NewClient(mux)
	store, err := raftstore.Open(context.Background(), raftstore.Config{
		Dir:           filepath.Join(t.TempDir(), "raft"),
		NodeID:        b.NodeID,
		Stream:        mux.RaftLayer(),
		AdvertiseAddr: mux.Advertise(),
		Bootstrap:     bootstrap,
		Logger:        logger,
		// Longer than the product's timeouts: these tests are not about
		// failover, and a leader must not lose its lease on two busy
		// cores under the race detector (seen at 150 ms).
		HeartbeatTimeout:   testRaftTimeout,
		ElectionTimeout:    testRaftTimeout,
		LeaderLeaseTimeout: testRaftTimeout,
		Forward: func(ctx context.Context, leaderAddr, _ string, entry []byte) (*raftstore.Result, error) {
			n.forwards.Add(1)
			return n.client.Apply(ctx, leaderAddr, entry)
		},
		Version: "test-" + b.NodeID,
		PeerInfo: func(ctx context.Context, _, addr string) (raftstore.NodeInfo, error) {
			return n.client.NodeInfo(ctx, addr)
		},
	})
	if err != nil {
		mux.Close()
		t.Fatal(err)
	}
	n.store = store
	n.server = cluster.NewServer(store, func() cluster.Secrets { return secrets }, logger)
	served := make(chan error, 1)
	go func() { served <- n.server.Serve(mux) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.server.Shutdown(ctx)
		if err := <-served; err != nil {
			t.Errorf("%s: Serve: %v", n.id, err)
		}
		n.client.Close()
		n.store.Close()
		n.mux.Close()
	})
	return n
}

// startFirst starts the node that forms cluster c; its bundle holds the
// CA key, so it can admit joiners.
func startFirst(t testing.TB, c testCluster, nodeID string) *testNode {
	t.Helper()
	b := c.bundle(t, nodeID)
	n := startNode(t, b, cluster.Secrets{Bundle: b, JoinToken: c.token, AdminToken: c.admin}, true)
	waitFor(t, nodeID+" leads its new cluster", n.store.IsLeader)
	return n
}

// joinNode gets credentials from the node at via with token, starts a
// node with them, and makes it a voter through via.
func joinNode(t testing.TB, via *testNode, token, nodeID string) *testNode {
	t.Helper()
	ctx := testContext(t)
	resp, err := cluster.Join(ctx, "https://"+via.addr(), token, nodeID, []string{"127.0.0.1"})
	if err != nil {
		t.Fatalf("join %s: %v", nodeID, err)
	}
	b, err := pki.BundleFromPEM([]byte(resp.CACert), []byte(resp.CAKey), []byte(resp.NodeCert), []byte(resp.NodeKey))
	if err != nil {
		t.Fatalf("credentials of %s: %v", nodeID, err)
	}
	n := startNode(t, b, cluster.Secrets{Bundle: b, JoinToken: resp.JoinToken, AdminToken: resp.AdminToken}, false)
	// Like a node, retry while the cluster has no leader (an election may
	// follow the previous join).
	for {
		err := n.client.AddSelf(ctx, via.addr(), n.addr(), token)
		if err == nil {
			return n
		}
		if !errors.Is(err, raftstore.ErrNotLeader) || ctx.Err() != nil {
			t.Fatalf("%s AddSelf via %s: %v", nodeID, via.id, err)
		}
		t.Logf("%s AddSelf via %s: %v; retrying", nodeID, via.id, err)
		time.Sleep(50 * time.Millisecond)
	}
}

func testContext(t testing.TB) context.Context { return testutil.Context(t) }

// waitFor polls cond until it holds (testutil.WaitFor).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, what, cond)
}

// leaderOf waits until one of nodes leads and the others know it.
func leaderOf(t testing.TB, nodes ...*testNode) (leader *testNode, followers []*testNode) {
	t.Helper()
	waitFor(t, "a leader known to every node", func() bool {
		leader, followers = nil, nil
		for _, n := range nodes {
			if n.store.IsLeader() {
				leader = n
			} else {
				followers = append(followers, n)
			}
		}
		if leader == nil {
			return false
		}
		for _, f := range followers {
			if _, id := f.store.Leader(); id != leader.id {
				return false
			}
		}
		return true
	})
	return leader, followers
}

func putDevice(id string, tags map[string]any) raftstore.PutDevice {
	return raftstore.PutDevice{
		Device: fleet.Device{ID: id, Tags: tags},
		Time:   time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC),
	}
}

// device reads a device from n's replica.
func device(t testing.TB, n *testNode, id string) (fleet.Device, error) {
	t.Helper()
	var d fleet.Device
	err := n.store.View(func(r *raftstore.Reader) error {
		var err error
		d, err = r.Device(id)
		return err
	})
	return d, err
}
