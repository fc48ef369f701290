package node

import (
	"context"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/pki"
	"appliance/raftstore"
)

// TestPeerAuthorizer: the node judges a peer's certificate by the
// replicated state: its own (bound when it formed the cluster) passes; a
// certificate issued with the CA's key for the same id does not; a
// revoked one fails every use; a node that is not a member reaches
// neither raft nor the node-only RPCs, but may handshake and ask to
// become a voter (with the join secret).
func TestPeerAuthorizer(t *testing.T) {
	n := startNode(t, t.TempDir())
	self := n.bundle.NodeCertID()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		var bound bool
		n.store.View(func(r *raftstore.Reader) error { _, bound, _ = r.NodeCert(self.NodeID); return nil })
		if bound {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the node that formed the cluster did not bind its certificate")
		}
		time.Sleep(20 * time.Millisecond)
	}
	a := (*peerAuthorizer)(n)
	uses := []cluster.Use{cluster.UseHandshake, cluster.UseRaft, cluster.UseRPC, cluster.UseAddSelf}
	for _, use := range uses {
		if err := a.AuthorizePeer(self, use); err != nil {
			t.Fatalf("its own certificate, use %d: %v", use, err)
		}
	}
	issue := func(id string) pki.CertID {
		b, err := pki.NewBundle(n.bundle.CA, id, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return b.NodeCertID()
	}
	impostor := issue(self.NodeID)
	for _, use := range uses {
		if err := a.AuthorizePeer(impostor, use); err == nil {
			t.Fatalf("another certificate for %s was accepted (use %d)", self.NodeID, use)
		}
	}
	stranger := issue("n9")
	for use, want := range map[cluster.Use]bool{cluster.UseHandshake: true, cluster.UseAddSelf: true, cluster.UseRaft: false, cluster.UseRPC: false} {
		if err := a.AuthorizePeer(stranger, use); (err == nil) != want {
			t.Errorf("a non-member, use %d: %v, want accepted=%v", use, err, want)
		}
	}
	if _, err := n.store.Apply(ctx, raftstore.RevokeNode{NodeID: "n9", Fingerprint: stranger.Fingerprint, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, use := range uses {
		if err := a.AuthorizePeer(stranger, use); err == nil {
			t.Fatalf("a revoked certificate was accepted (use %d)", use)
		}
	}
}
