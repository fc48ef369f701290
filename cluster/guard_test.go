package cluster_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/fleet"
	"appliance/pki"
	"appliance/raftstore"
)

// denyList is an Authorizer as the node's, reduced to a set of refused
// fingerprints and, for raft and node-only RPCs, of refused node ids.
type denyList struct {
	mu        sync.Mutex
	certs     map[string]bool // fingerprints refused for every use
	nonMember map[string]bool // node ids refused for raft and RPCs
}

func (d *denyList) AuthorizePeer(p pki.CertID, use cluster.Use) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.certs[p.Fingerprint] {
		return errors.New("certificate of " + p.NodeID + " revoked")
	}
	if (use == cluster.UseRaft || use == cluster.UseRPC) && d.nonMember[p.NodeID] {
		return errors.New(p.NodeID + " is not a member")
	}
	return nil
}

func (d *denyList) revoke(fp string) {
	d.mu.Lock()
	d.certs[fp] = true
	d.mu.Unlock()
}

// TestGuard_RevokedCertificateIsCutOff: a node's Authorizer is asked about
// every handshake, raft connection and node-only RPC: a revoked
// certificate fails the handshake, a non-member reaches neither raft nor
// the node-only RPCs, and Recheck closes a connection opened before the
// revocation.
func TestGuard_RevokedCertificateIsCutOff(t *testing.T) {
	c := newTestCluster(t, "guard")
	n1 := startFirst(t, c, "n1")
	deny := &denyList{certs: map[string]bool{}, nonMember: map[string]bool{}}
	n1.mux.SetAuthorizer(deny)
	peer := c.bundle(t, "n2")
	m2, err := cluster.Listen("127.0.0.1:0", "", peer, newLogRecorder(t, "n2").logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m2.Close() })

	// Accepted while nothing refuses it: a raft connection reaches raft
	// (here: the mux of n1 hands it over, and raft answers or waits).
	open, err := m2.RaftLayer().Dial(n1.addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	open.Write([]byte{1}) // a raft RPC's type byte: the mux routes it to raft, which waits for the rest
	waitFor(t, "n1 remembers the certificate n2 presented", func() bool {
		p, ok := n1.mux.SeenCert("n2")
		return ok && p == peer.NodeCertID()
	})

	// A non-member: its raft connection is closed unanswered, its
	// node-only RPC refused with the Authorizer's reason.
	deny.mu.Lock()
	deny.nonMember["n2"] = true
	deny.mu.Unlock()
	mark := n1.logs.mark()
	conn, err := m2.RaftLayer().Dial(n1.addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte{1, 0x80})
	if data, _ := readAll(t, conn); len(data) != 0 {
		t.Fatalf("a non-member's raft connection got %q", data)
	}
	if lines := n1.logs.since(mark, "refused a cluster peer"); len(lines) == 0 {
		t.Error("n1 did not log the refusal")
	}
	client := cluster.NewClient(m2)
	defer client.Close()
	_, err = client.ReadIndex(testContext(t), n1.addr())
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("not a member")) {
		t.Fatalf("a non-member's read index: %v, want refused as not a member", err)
	}

	// Revoked: the handshake itself fails (either side learns it), and
	// the connection opened before is closed by Recheck.
	deny.revoke(peer.NodeCertID().Fingerprint)
	if got := n1.mux.Recheck(); got < 1 {
		t.Fatalf("Recheck closed %d connections, want the one n2 opened", got)
	}
	if data, _ := readAll(t, open); len(data) != 0 {
		t.Fatalf("the connection opened before the revocation: read %q; want it closed", data)
	}
	if conn, err := m2.RaftLayer().Dial(n1.addr(), 5*time.Second); err == nil {
		conn.Write([]byte{1})
		if data, _ := readAll(t, conn); len(data) != 0 {
			t.Fatalf("a revoked certificate's connection: read %q", data)
		}
	}
	// n1 dialing a server that presents the revoked certificate refuses
	// it too.
	if conn, err := n1.mux.RaftLayer().Dial(m2.Addr().String(), 5*time.Second); err == nil {
		conn.Close()
		t.Fatal("n1 completed a handshake with a server presenting a revoked certificate")
	}
}

// TestGuard_AddSelfNeedsTheJoinSecret: a node that is not a member must
// give the current join secret to become a voter, whatever certificate of
// the CA it holds; with it, the cluster binds its certificate before it
// adds it.
func TestGuard_AddSelfNeedsTheJoinSecret(t *testing.T) {
	c := newTestCluster(t, "addself")
	n1 := startFirst(t, c, "n1")
	// Every server holds the CA's key: a certificate it issues itself.
	minted := c.bundle(t, "n2")
	n2 := startNode(t, minted, cluster.Secrets{Bundle: minted, JoinToken: c.token, AdminToken: c.admin}, false)
	fp, _, _ := pki.ParseJoinToken(c.token)
	err := n2.client.AddSelf(testContext(t), n1.addr(), n2.addr(), pki.FormatJoinToken(fp, "not-the-secret"))
	if !errors.Is(err, cluster.ErrRefused) {
		t.Fatalf("AddSelf with a wrong secret: %v, want refused", err)
	}
	if ok, _ := n1.store.IsMember(context.Background(), "n2"); ok {
		t.Fatal("n2 became a member with a wrong secret")
	}
	if err := n2.client.AddSelf(testContext(t), n1.addr(), n2.addr(), c.token); err != nil {
		t.Fatalf("AddSelf with the join token: %v", err)
	}
	err = n1.store.View(func(r *raftstore.Reader) error {
		nc, bound, err := r.NodeCert("n2")
		if err != nil || !bound || nc.Fingerprint != minted.NodeCertID().Fingerprint {
			t.Errorf("n2's binding: %+v bound=%v err=%v", nc, bound, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A member asking again (a restart) needs no secret and keeps its
	// binding.
	if err := n2.client.AddSelf(testContext(t), n1.addr(), n2.addr(), ""); err != nil {
		t.Fatalf("a member's AddSelf: %v", err)
	}
	// Binding refuses a revoked certificate.
	if _, err := n1.store.Apply(testContext(t), raftstore.RevokeNode{NodeID: "n2", Fingerprint: minted.NodeCertID().Fingerprint, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	err = n1.store.BindNode(testContext(t), "n2", minted.NodeCertID().Fingerprint, "", true)
	if !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("binding a revoked certificate: %v, want invalid", err)
	}
}
