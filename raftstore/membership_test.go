package raftstore

import (
	"appliance/internal/testenv"
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"

	"appliance/fleet"
)

func memberList(t *testing.T, s *Store) string {
	t.Helper()
	ms, err := s.Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := ""
	for _, m := range ms {
		out += fmt.Sprintf("%s(voter=%t,leader=%t) ", m.ID, m.Voter, m.Leader)
	}
	return out
}

func configIndex(t *testing.T, s *Store) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(s.Stats()["latest_configuration_index"], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestStore_Membership lists, re-adds, removes and adds back members, and
// checks what only the leader may do.
func TestStore_Membership(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	leader, n3 := stores[0], stores[2]
	ctx := testContext(t)

	const all = "n1(voter=true,leader=true) n2(voter=true,leader=false) n3(voter=true,leader=false) "
	if got := memberList(t, leader); got != all {
		t.Fatalf("members = %s", got)
	}
	waitFor(t, "n2 sees the whole configuration", func() bool { return memberList(t, stores[1]) == all })

	// Adding a voter again at the same address changes nothing.
	before := configIndex(t, leader)
	if err := leader.AddVoter(ctx, "n3", n3.RaftAddr()); err != nil {
		t.Fatalf("re-add n3: %v", err)
	}
	if after := configIndex(t, leader); after != before {
		t.Fatalf("re-adding an existing voter wrote a configuration (%d -> %d)", before, after)
	}

	for _, tc := range []struct {
		name    string
		do      func() error
		wantErr error
	}{
		{"follower adds", func() error { return stores[1].AddVoter(ctx, "n9", "127.0.0.1:1") }, ErrNotLeader},
		{"follower removes", func() error { return stores[1].RemoveServer(ctx, "n3") }, ErrNotLeader},
		{"follower transfers", func() error { return stores[1].LeadershipTransfer(ctx) }, ErrNotLeader},
		{"unknown id", func() error { return leader.RemoveServer(ctx, "n9") }, fleet.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.do(); !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
		})
	}

	if err := leader.RemoveServer(ctx, "n3"); err != nil {
		t.Fatal(err)
	}
	if got := memberList(t, leader); got != "n1(voter=true,leader=true) n2(voter=true,leader=false) " {
		t.Fatalf("after removing n3: %s", got)
	}
	// Writes go on with two voters, and n3 no longer gets them.
	putDevice(t, leader, "while-n3-out", nil)
	if err := leader.AddVoter(ctx, "n3", n3.RaftAddr()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "n3 catches up after being added back", func() bool { return n3.AppliedIndex() >= leader.AppliedIndex() })
	if got := memberList(t, leader); got != all {
		t.Fatalf("after adding n3 back: %s", got)
	}
	if ids := deviceIDs(t, n3); fmt.Sprint(ids) != "[while-n3-out]" {
		t.Fatalf("n3 has %v", ids)
	}

	if st := leader.Stats(); st["state"] != "Leader" || st["num_peers"] != "2" {
		t.Fatalf("stats: state %q num_peers %q", st["state"], st["num_peers"])
	}
	if d := leader.LastContact(); d != 0 {
		t.Fatalf("leader LastContact = %s", d)
	}
	if d := stores[1].LastContact(); d < 0 {
		t.Fatalf("follower LastContact = %s: it has never heard from the leader", d)
	}
}

// TestStore_RemoveServer_Self: the leader removes itself; it steps down
// but keeps running, and the others elect a leader among themselves.
func TestStore_RemoveServer_Self(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	if err := stores[0].RemoveServer(testContext(t), "n1"); err != nil {
		t.Fatalf("leader removes itself: %v", err)
	}
	leader := leaderOf(t, stores[1:])
	putDevice(t, leader, "after", nil)
	if got := memberList(t, leader); got != fmt.Sprintf("n2(voter=true,leader=%t) n3(voter=true,leader=%t) ", leader == stores[1], leader == stores[2]) {
		t.Fatalf("members = %s", got)
	}
	if stores[0].IsLeader() || stores[0].State() == "Shutdown" {
		t.Fatalf("removed node is %s, want a follower still running", stores[0].State())
	}
}

// TestStore_LeadershipTransfer hands leadership over and back.
func TestStore_LeadershipTransfer(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	if err := stores[0].LeadershipTransfer(testContext(t)); err != nil {
		t.Fatal(err)
	}
	leader := leaderOf(t, stores[1:])
	if stores[0].IsLeader() {
		t.Fatal("n1 still leads")
	}
	putDevice(t, leader, "after-transfer", nil)
}

// TestStore_AddVoter_NewAddress: a node that comes back on another address
// is moved there by AddVoter with its id.
func TestStore_AddVoter_NewAddress(t *testing.T) {
	// hashicorp/raft v1.7.3 logs a follower's s.peer without its lock when
	// a pipelined AppendEntries fails (replication.go:521) while
	// startStopReplication moves that peer to its new address: a race in
	// the library, which this test provokes on purpose (hashicorp/raft#681,
	// fixed by #682, not released).
	testenv.SkipUnderRace(t, "hashicorp/raft#681: a race in raft's own replication log line")
	stores := newTestCluster(t, 3, nil)
	leader, old := stores[0], stores[2]
	oldAddr := old.RaftAddr()
	old.Close()
	n3 := openConfig(t, clusterConfig(t, old.cfg.Dir, "n3"))
	if n3.RaftAddr() == oldAddr {
		t.Skip("the OS gave the same port back")
	}
	if err := leader.AddVoter(testContext(t), "n3", n3.RaftAddr()); err != nil {
		t.Fatal(err)
	}
	ms, err := leader.Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 || ms[2].ID != "n3" || ms[2].Address != n3.RaftAddr() || !ms[2].Voter {
		t.Fatalf("members = %+v, want n3 at %s", ms, n3.RaftAddr())
	}
	putDevice(t, leader, "after-move", nil)
	waitFor(t, "n3 catches up at its new address", func() bool { return n3.AppliedIndex() >= leader.AppliedIndex() })
}
