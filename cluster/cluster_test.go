package cluster_test

import (
	"errors"
	"testing"

	"appliance/fleet"
	"appliance/raftstore"
)

// TestCluster_ThreeNodes forms a cluster the way nodes do: n1 starts it,
// n2 and n3 join with its token (credentials over the pinned join RPC,
// then AddSelf), raft runs over the mutual-TLS mux. It then checks what
// the cluster offers its nodes: the membership everyone agrees on, writes
// on a follower forwarded to the leader, rule errors that keep their class
// across the hop, read-index reads on a follower, and removal of a member
// through a follower.
func TestCluster_ThreeNodes(t *testing.T) {
	c := newTestCluster(t, "three")
	n1 := startFirst(t, c, "n1")
	n2 := joinNode(t, n1, c.token, "n2")
	// n3 joins through n2, a follower: any member admits a joiner, and
	// AddSelf follows the follower's answer to the leader.
	n3 := joinNode(t, n2, c.token, "n3")
	nodes := []*testNode{n1, n2, n3}
	ctx := testContext(t)

	for _, n := range []*testNode{n2, n3} {
		if n.bundle.CA.Fingerprint() != c.ca.Fingerprint() {
			t.Fatalf("%s got the CA %s, want the cluster's %s", n.id, n.bundle.CA.Fingerprint(), c.ca.Fingerprint())
		}
	}

	for _, n := range nodes {
		waitFor(t, n.id+" sees three voters", func() bool {
			ms, err := n.store.Members(ctx)
			if err != nil || len(ms) != 3 {
				return false
			}
			for i, m := range ms {
				if m.ID != nodes[i].id || m.Address != nodes[i].addr() || !m.Voter {
					return false
				}
			}
			return true
		})
	}

	leader, followers := leaderOf(t, nodes...)
	follower := followers[0]

	t.Run("a write on a follower is forwarded to the leader", func(t *testing.T) {
		before := follower.forwards.Load()
		res, err := follower.store.Apply(ctx, putDevice("via-follower", map[string]any{"site": "west"}))
		if err != nil {
			t.Fatalf("Apply on follower %s: %v", follower.id, err)
		}
		if !res.Created || res.Device == nil || res.Device.ID != "via-follower" {
			t.Fatalf("result %+v, want the created device", res)
		}
		if follower.forwards.Load() == before {
			t.Fatalf("%s applied the write without forwarding it", follower.id)
		}
		if err := leader.store.WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
		d, err := device(t, leader, "via-follower")
		if err != nil {
			t.Fatalf("leader %s: %v", leader.id, err)
		}
		if d.Tags["site"] != "west" {
			t.Fatalf("leader holds tags %v, want site=west", d.Tags)
		}
		// The writer can read its own write once its replica caught up.
		if err := follower.store.WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
		if _, err := device(t, follower, "via-follower"); err != nil {
			t.Fatalf("follower %s: %v", follower.id, err)
		}
	})

	t.Run("rule errors keep their class through forwarding", func(t *testing.T) {
		if _, err := leader.store.Apply(ctx, putDevice("existing", nil)); err != nil {
			t.Fatal(err)
		}
		create := putDevice("existing", nil)
		create.IfNoneMatch = "*"
		for _, tc := range []struct {
			name string
			cmd  raftstore.Command
			want error
		}{
			{"create an existing device", create, fleet.ErrExists},
			{"patch a missing device", raftstore.PatchDevice{ID: "missing", Status: fleet.DeviceDisabled}, fleet.ErrNotFound},
			{"patch with a stale etag", raftstore.PatchDevice{Precondition: raftstore.Precondition{IfMatch: "1"}, ID: "existing", Status: fleet.DeviceDisabled}, fleet.ErrPreconditionFailed},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := follower.forwards.Load()
				_, err := follower.store.Apply(ctx, tc.cmd)
				if !errors.Is(err, tc.want) {
					t.Fatalf("Apply on follower: %v, want an error wrapping %q", err, tc.want)
				}
				if errors.Is(err, raftstore.ErrUnknownOutcome) || errors.Is(err, raftstore.ErrNotLeader) {
					t.Fatalf("a rule rejection is certain, got %v", err)
				}
				if follower.forwards.Load() == before {
					t.Fatalf("%s answered without asking the leader", follower.id)
				}
			})
		}
		d, err := device(t, leader, "existing")
		if err != nil || d.Status != fleet.DeviceEnabled {
			t.Fatalf("rejected writes changed the device: %+v, %v", d, err)
		}
	})

	t.Run("read index on a follower sees the leader's acknowledged write", func(t *testing.T) {
		res, err := leader.store.Apply(ctx, putDevice("just-acked", nil))
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := follower.store.Leader()
		idx, err := follower.client.ReadIndex(ctx, addr)
		if err != nil {
			t.Fatalf("ReadIndex from %s via %s: %v", follower.id, addr, err)
		}
		if idx < res.Index {
			t.Fatalf("read index %d is before the acknowledged write at %d", idx, res.Index)
		}
		if err := follower.store.WaitApplied(ctx, idx); err != nil {
			t.Fatal(err)
		}
		if _, err := device(t, follower, "just-acked"); err != nil {
			t.Fatalf("follower %s after WaitApplied(%d): %v", follower.id, idx, err)
		}
	})

	t.Run("read index from a follower is refused as not the leader", func(t *testing.T) {
		other := followers[1]
		_, err := follower.client.ReadIndex(ctx, other.addr())
		if !errors.Is(err, raftstore.ErrNotLeader) {
			t.Fatalf("ReadIndex at follower %s: %v, want ErrNotLeader", other.id, err)
		}
	})

	t.Run("remove a member through a follower", func(t *testing.T) {
		// Ask a follower that is not n3 (unless n3 leads, any follower).
		via := followers[0]
		if via == n3 {
			via = followers[1]
		}
		if err := n1.client.RemoveMember(ctx, via.addr(), "n3"); err != nil {
			t.Fatalf("RemoveMember via %s: %v", via.id, err)
		}
		for _, n := range []*testNode{n1, n2} {
			waitFor(t, n.id+" sees n3 gone", func() bool {
				ms, err := n.store.Members(ctx)
				if err != nil || len(ms) != 2 {
					return false
				}
				return ms[0].ID == "n1" && ms[1].ID == "n2"
			})
		}
		// A second removal names a member that is no longer there. (When
		// n3 led, n1 and n2 elect a new leader first.)
		_, rest := leaderOf(t, n1, n2)
		err := n1.client.RemoveMember(ctx, rest[0].addr(), "n3")
		if !errors.Is(err, fleet.ErrNotFound) {
			t.Fatalf("removing n3 again: %v, want ErrNotFound", err)
		}
		// The two left still take writes.
		if _, err := n2.store.Apply(ctx, putDevice("after-removal", nil)); err != nil {
			t.Fatalf("write after removing n3: %v", err)
		}
	})
}
