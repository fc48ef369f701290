package cluster_test

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"appliance/cluster"
	"appliance/fleet"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// dropProxy is a node of the cluster standing between a follower and the
// leader that never answers: it reads the forwarded write, hands it on to
// the leader first when forward is set (so it really is applied), then
// closes the connection without a response. To the follower this is a
// leader that vanished after the request left.
func dropProxy(t *testing.T, c testCluster, leader string, forward bool) string {
	t.Helper()
	mux, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "proxy"), newLogRecorder(t, "proxy").logger())
	if err != nil {
		t.Fatal(err)
	}
	client := cluster.NewClient(mux)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entry, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("proxy: read request: %v", err)
		}
		if forward {
			if _, err := client.Apply(r.Context(), leader, entry); err != nil {
				t.Errorf("proxy: forward to the leader: %v", err)
			}
		}
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("proxy: hijack: %v", err)
			return
		}
		conn.Close()
	})}
	go srv.Serve(mux.HTTPListener())
	t.Cleanup(func() {
		srv.Close()
		client.Close()
		mux.Close()
	})
	return mux.Advertise()
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	return testutil.FreeAddr(t, "127.0.0.1")
}

// TestClient_Apply_OutcomeClasses checks how a forwarded write fails, which
// decides whether raftstore may retry it: certainly not applied
// (ErrNotLeader) when it never left the follower, unknown
// (ErrUnknownOutcome) once it did — whether or not the leader got to apply
// it.
func TestClient_Apply_OutcomeClasses(t *testing.T) {
	c := newTestCluster(t, "home")
	other := newTestCluster(t, "other")
	n1 := startFirst(t, c, "n1")
	caller, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "n2"), newLogRecorder(t, "n2").logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { caller.Close() })
	foreign, err := cluster.Listen("127.0.0.1:0", "", other.bundle(t, "n1"), newLogRecorder(t, "foreign").logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { foreign.Close() })

	for _, tc := range []struct {
		name string
		addr func(t *testing.T) string
		// want is the class of the error; "" means success.
		want error
		// applied is whether the leader holds the device afterwards.
		applied bool
	}{
		{"leader answers", func(*testing.T) string { return n1.addr() }, nil, true},
		{"leader's port closed", closedAddr, raftstore.ErrNotLeader, false},
		{"leader of another cluster (TLS refused)", func(*testing.T) string { return foreign.Advertise() }, raftstore.ErrNotLeader, false},
		{"connection dropped after the leader applied it", func(t *testing.T) string { return dropProxy(t, c, n1.addr(), true) }, raftstore.ErrUnknownOutcome, true},
		{"connection dropped before the leader saw it", func(t *testing.T) string { return dropProxy(t, c, n1.addr(), false) }, raftstore.ErrUnknownOutcome, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "dev-" + strings.ReplaceAll(tc.name, " ", "-")
			entry, err := raftstore.Encode(putDevice(id, nil))
			if err != nil {
				t.Fatal(err)
			}
			client := cluster.NewClient(caller)
			defer client.Close()
			ctx := testContext(t)
			res, err := client.Apply(ctx, tc.addr(t), entry)
			switch {
			case tc.want == nil && (err != nil || res == nil || !res.Created):
				t.Fatalf("Apply: %+v, %v; want the device created", res, err)
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("Apply: %v, want an error wrapping %q", err, tc.want)
			}
			// The two classes exclude each other: a retry after an
			// unknown outcome could apply the write twice.
			if errors.Is(err, raftstore.ErrNotLeader) && errors.Is(err, raftstore.ErrUnknownOutcome) {
				t.Fatalf("Apply: %v is both retryable and of unknown outcome", err)
			}
			// Whatever the class, the leader is the judge of what happened.
			if err := n1.store.VerifyLeader(ctx); err != nil {
				t.Fatal(err)
			}
			_, err = device(t, n1, id)
			if applied := err == nil; applied != tc.applied {
				t.Fatalf("device on the leader: %v, want applied=%v", err, tc.applied)
			}
			if err != nil && !errors.Is(err, fleet.ErrNotFound) {
				t.Fatal(err)
			}
		})
	}
}

// TestClient_Apply_FollowerSaysNotLeader checks that a follower that is
// sent a write answers "not the leader" (retryable, nothing applied)
// rather than applying or forwarding it, and that a write the leader
// refuses by rule comes back with its class.
func TestClient_Apply_FollowerSaysNotLeader(t *testing.T) {
	c := newTestCluster(t, "home")
	n1 := startFirst(t, c, "n1")
	n2 := joinNode(t, n1, c.token, "n2")
	leader, followers := leaderOf(t, n1, n2)
	ctx := testContext(t)

	entry, err := raftstore.Encode(putDevice("d", nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leader.client.Apply(ctx, followers[0].addr(), entry); !errors.Is(err, raftstore.ErrNotLeader) {
		t.Fatalf("Apply at the follower: %v, want ErrNotLeader", err)
	}
	if _, err := device(t, leader, "d"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the follower's refusal applied the write: %v", err)
	}

	if _, err := followers[0].client.Apply(ctx, leader.addr(), entry); err != nil {
		t.Fatal(err)
	}
	create := putDevice("d", nil)
	create.IfNoneMatch = "*"
	again, err := raftstore.Encode(create)
	if err != nil {
		t.Fatal(err)
	}
	res, err := followers[0].client.Apply(ctx, leader.addr(), again)
	if !errors.Is(err, fleet.ErrExists) || res == nil || !errors.Is(res.Err, fleet.ErrExists) {
		t.Fatalf("Apply of an existing device: %+v, %v; want ErrExists", res, err)
	}
	if _, err := followers[0].client.Apply(ctx, leader.addr(), []byte{0xff}); !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("Apply of an entry that is no command: %v, want ErrInvalid", err)
	}
}
