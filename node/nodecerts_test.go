package node

import (
	"context"
	"strings"
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

// TestPeerAuthorizer_MembersVouch: a replica that does not know a node
// yet (it lags: the node joined while it was down) asks the members it
// knows which certificate their replicas bind to that node; a member that
// binds the certificate vouches for it, and nobody vouches for one the
// cluster never bound.
func TestPeerAuthorizer_MembersVouch(t *testing.T) {
	n1 := startNode(t, t.TempDir())
	n2 := startNodeWith(t, t.TempDir(), func(c *Config) {
		c.NodeID, c.Join, c.JoinToken = "n2", "https://"+n1.RaftAddr(), n1.JoinToken()
	})
	issue := func(id string) pki.CertID {
		b, err := pki.NewBundle(n1.bundle.CA, id, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return b.NodeCertID()
	}
	joined, stranger := issue("n9"), issue("n8")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n1.store.BindNode(ctx, joined.NodeID, joined.Fingerprint, joined.Serial, true); err != nil {
		t.Fatal(err)
	}
	known := map[string]string{"n1": n1.RaftAddr(), "n2": n2.RaftAddr()}
	if !n2.vouched(joined, known) {
		t.Fatal("n1 did not vouch for a certificate the cluster binds")
	}
	if n2.vouched(stranger, known) {
		t.Fatal("a member vouched for a certificate the cluster never bound")
	}
	n2.vouches.forget()
	if n2.vouched(issue("n9"), known) {
		t.Fatal("a member vouched for another certificate of a bound node")
	}
}

// TestJoin_TokenErrorsNameEveryWayToGiveIt: a joiner without a join token,
// or with a malformed one, is refused at start with one line that names
// the file flag operators are told to use, and the others.
func TestJoin_TokenErrorsNameEveryWayToGiveIt(t *testing.T) {
	for _, tc := range []struct{ token, want string }{
		{"", "flag --join-token-file is required with --join"},
		{"not-a-token", "the join token (flag --join-token-file or --join-token, env APPLIANCE_JOIN_TOKEN or APPLIANCE_JOIN_TOKEN_FILE)"},
	} {
		n := newTestNodeWith(t, t.TempDir(), func(c *Config) { c.NodeID, c.Join, c.JoinToken = "n2", "https://127.0.0.1:1", tc.token })
		err := n.Start(context.Background())
		if err == nil {
			n.Stop()
			t.Fatalf("token %q: the node started", tc.token)
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "--join-token") {
			t.Errorf("token %q: %v, want it to say %q", tc.token, err, tc.want)
		}
	}
}
