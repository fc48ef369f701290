package cluster_test

import (
	"errors"
	"net/http"
	"slices"
	"testing"

	"appliance/cluster"
	"appliance/raftstore"
)

// legacyNode is a node of the cluster as the previous release serves its
// cluster port: the RPCs of that release (here only their routing), and
// no info RPC, so its mux answers 404 there. (A real process of that
// release is in the e2e rolling-upgrade test.)
func legacyNode(t *testing.T, c testCluster) string {
	t.Helper()
	mux, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "old"), newLogRecorder(t, "old").logger())
	if err != nil {
		t.Fatal(err)
	}
	routes := http.NewServeMux()
	for _, p := range []string{"POST /cluster/v1/join", "POST /cluster/v1/apply", "POST /cluster/v1/read-index", "GET /cluster/v1/connections"} {
		routes.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	}
	srv := &http.Server{Handler: routes}
	go srv.Serve(mux.HTTPListener())
	t.Cleanup(func() {
		srv.Close()
		mux.Close()
	})
	return mux.Advertise()
}

// TestNodeInfo: a node says what it runs over the cluster port, and every
// member's answer reaches MemberStatuses; a node of the previous release
// (404) reads as raftstore.ErrNoNodeInfo, one that is down as an error of
// another kind, so the gate can tell "behind" from "unknown".
func TestNodeInfo(t *testing.T) {
	c := newTestCluster(t, "info")
	n1 := startFirst(t, c, "n1")
	n2 := joinNode(t, n1, c.token, "n2")
	leader, _ := leaderOf(t, n1, n2)
	ctx := testContext(t)
	// n2 knows the leader from its first heartbeat, before it has the log
	// that holds the configuration: wait until it caught up, as a node's
	// readiness does.
	idx, err := leader.store.ReadIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := n2.store.WaitApplied(ctx, idx); err != nil {
		t.Fatal(err)
	}

	info, err := n1.client.NodeInfo(ctx, n2.addr())
	if err != nil {
		t.Fatal(err)
	}
	if info.ID != "n2" || info.Version != "test-n2" || !slices.Equal(info.Commands, raftstore.Commands()) || info.Legacy {
		t.Fatalf("n2 says %+v", info)
	}
	statuses, err := n2.store.MemberStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(statuses) != 2 {
		t.Fatalf("statuses %+v", statuses)
	}
	for _, st := range statuses {
		if !st.Answered || st.Info.ID != st.ID || len(st.Info.Commands) == 0 {
			t.Errorf("%s: %+v", st.ID, st)
		}
		if st.ID == leader.id && st.Info.State != "Leader" {
			t.Errorf("the leader %s says it is %q", st.ID, st.Info.State)
		}
		if st.ID != leader.id && (st.Heartbeat == nil || st.Heartbeat.Failing) {
			t.Errorf("%s: the leader's heartbeat view %+v, want not failing", st.ID, st.Heartbeat)
		}
	}

	_, err = n1.client.NodeInfo(ctx, legacyNode(t, c))
	if !errors.Is(err, raftstore.ErrNoNodeInfo) {
		t.Fatalf("a node of the previous release: %v, want ErrNoNodeInfo", err)
	}
	_, err = n1.client.NodeInfo(ctx, closedAddr(t))
	if err == nil || errors.Is(err, raftstore.ErrNoNodeInfo) {
		t.Fatalf("nothing listening: %v, want an error that is not ErrNoNodeInfo", err)
	}
}
