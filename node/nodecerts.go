package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"time"

	"appliance/cluster"
	"appliance/fleet"
	"appliance/pki"
	"appliance/raftstore"
)

// peerAuthorizer judges the node certificates presented on this node's
// cluster port from the replicated state, so every node judges alike
// (cluster.Authorizer):
//  1. a revoked certificate (a removed node's) is refused everywhere;
//  2. a certificate for a node the cluster has bound another certificate
//     to is refused: every server holds the CA's key, so a removed node
//     could issue itself a certificate for any id, and only the binding
//     tells the real one apart;
//  3. raft connections and node-only RPCs come from members only (this
//     node's latest raft configuration; a node with none yet, one waiting
//     to be added, takes the leader's word). A node becoming a voter
//     (UseAddSelf) proves the join secret instead.
type peerAuthorizer Node

var _ cluster.Authorizer = (*peerAuthorizer)(nil)

func (a *peerAuthorizer) AuthorizePeer(p pki.CertID, use cluster.Use) error {
	n := (*Node)(a)
	var verdict error
	bound := false
	err := n.store.View(func(r *raftstore.Reader) error {
		rc, revoked, err := r.RevokedCert(p.Fingerprint)
		if err != nil {
			return err
		}
		if revoked {
			verdict = fmt.Errorf("the certificate %s of node %s was revoked when %s was removed from the cluster", shortFingerprint(p.Fingerprint), p.NodeID, rc.NodeID)
			return nil
		}
		nc, ok, err := r.NodeCert(p.NodeID)
		if err != nil {
			return err
		}
		if ok && nc.Fingerprint != p.Fingerprint {
			verdict = fmt.Errorf("node %s presented certificate %s, not the one the cluster knows for it (%s)", p.NodeID, shortFingerprint(p.Fingerprint), shortFingerprint(nc.Fingerprint))
		}
		bound = ok
		return nil
	})
	if err != nil {
		// Fail closed: a state that cannot be read cannot vouch for anyone.
		return fmt.Errorf("read the cluster's certificates: %w", err)
	}
	if verdict != nil || (use != cluster.UseRaft && use != cluster.UseRPC) || bound {
		return verdict
	}
	members, err := n.memberIDs.get(n.store, p.NodeID)
	if err != nil {
		return fmt.Errorf("read the cluster's members: %w", err)
	}
	// A node with no configuration yet (waiting to be added) takes the
	// leader's word.
	if len(members) == 0 || members[p.NodeID] != "" {
		return nil
	}
	// Neither a member nor bound here: this replica may lag (a node that
	// joined, and even became the leader, while this one was down must
	// still be able to bring it up to date), so a member this replica
	// knows may vouch for the certificate from its newer state.
	if n.vouched(p, members) {
		return nil
	}
	return fmt.Errorf("node %s is not a member of the cluster", p.NodeID)
}

// nodeCertPath is the node-only RPC that says which certificate this
// node's replica binds to a node id (nodeCertReply).
const nodeCertPath = "/cluster/v1/node-certs/"

type nodeCertReply struct {
	NodeID      string `json:"nodeId"`
	Bound       bool   `json:"bound"`
	Fingerprint string `json:"fingerprint,omitempty"`
}

func (n *Node) serveNodeCert(w http.ResponseWriter, r *http.Request) {
	reply := nodeCertReply{NodeID: r.PathValue("id")}
	err := n.store.View(func(rd *raftstore.Reader) error {
		nc, bound, err := rd.NodeCert(reply.NodeID)
		reply.Bound, reply.Fingerprint = bound, nc.Fingerprint
		return err
	})
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(reply)
}

// vouchTTL is how long a member's word for a certificate is kept: a
// lagging replica is sent several connections by the node it catches up
// from, and asks once.
const vouchTTL = 30 * time.Second

// vouchRefusedTTL is how long a certificate nobody vouched for is refused
// without asking again.
const vouchRefusedTTL = 5 * time.Second

// vouched asks the members this replica knows (other than the peer and
// itself) which certificate their replicas bind to the peer's id; one
// that names the peer's certificate vouches for it.
func (n *Node) vouched(p pki.CertID, members map[string]string) bool {
	now := time.Now()
	n.vouches.mu.Lock()
	until, ok := n.vouches.until[p.Fingerprint]
	refusedAt, refused := n.vouches.refused[p.Fingerprint]
	n.vouches.mu.Unlock()
	if ok && now.Before(until) {
		return true
	}
	if refused && now.Sub(refusedAt) < vouchRefusedTTL {
		// Asked a moment ago, and nobody vouched: a stranger retrying
		// does not make this node ask its peers every time.
		return false
	}
	for id, addr := range members {
		if id == p.NodeID || id == n.cfg.NodeID {
			continue
		}
		ctx, cancel := context.WithTimeout(n.stopCtx, time.Second)
		var reply nodeCertReply
		err := n.peers.GetJSON(ctx, addr, nodeCertPath+url.PathEscape(p.NodeID), &reply)
		cancel()
		if err != nil || !reply.Bound || reply.Fingerprint != p.Fingerprint {
			continue
		}
		n.vouches.mu.Lock()
		if n.vouches.until == nil {
			n.vouches.until = map[string]time.Time{}
		}
		n.vouches.until[p.Fingerprint] = time.Now().Add(vouchTTL)
		n.vouches.mu.Unlock()
		n.logger.Info("a member vouched for a node this replica does not know yet", "peer", p.NodeID, "by", id)
		return true
	}
	n.vouches.mu.Lock()
	if n.vouches.refused == nil {
		n.vouches.refused = map[string]time.Time{}
	}
	if len(n.vouches.refused) > 1024 { // bounded: strangers can present many certificates
		clear(n.vouches.refused)
	}
	n.vouches.refused[p.Fingerprint] = now
	n.vouches.mu.Unlock()
	return false
}

// vouchCache keeps the certificates members vouched for (vouched); a
// revocation empties it.
type vouchCache struct {
	mu      sync.Mutex
	until   map[string]time.Time // vouched for, until
	refused map[string]time.Time // nobody vouched, at
}

func (c *vouchCache) forget() {
	c.mu.Lock()
	c.until, c.refused = nil, nil
	c.mu.Unlock()
}

// memberCache keeps the latest raft configuration (id → address) for the
// checks of raft connections and node-only RPCs (every forwarded write
// is one): reading raft's configuration is a round trip through raft's
// main loop. A hit younger than memberCacheTTL is taken as it is; a miss
// reads the configuration again, so a node added a moment ago is never
// refused; applying a revocation empties it, so a node removed a moment
// ago is not taken for a member.
type memberCache struct {
	mu      sync.Mutex
	at      time.Time
	members map[string]string
}

const memberCacheTTL = time.Second

// forget drops what the cache holds: a node was just removed.
func (c *memberCache) forget() {
	c.mu.Lock()
	c.members = nil
	c.mu.Unlock()
}

// get returns the members (id → raft address), read again unless id is
// among those read less than memberCacheTTL ago.
func (c *memberCache) get(store *raftstore.Store, id string) (map[string]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.members[id] != "" && time.Since(c.at) < memberCacheTTL {
		return c.members, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	members, err := store.Members(ctx)
	if err != nil {
		return nil, err
	}
	c.members, c.at = make(map[string]string, len(members)), time.Now()
	for _, m := range members {
		c.members[m.ID] = m.Address
	}
	return c.members, nil
}

func shortFingerprint(fp string) string {
	if len(fp) > 16 {
		return fp[:16]
	}
	return fp
}

// bindSelf makes sure the cluster knows this node's certificate: a node
// that joined was bound by the leader when it became a voter; the node
// that formed the cluster, a member of a release before bindings, and a
// restored node (a new certificate from the restored CA) bind themselves
// here. It runs until the binding is this node's certificate, or the node
// stops. A node bound to another certificate can bind itself only as the
// leader (a restored cluster of one); otherwise its peers refuse it, and it
// says so.
func (n *Node) bindSelf(ctx context.Context) {
	self := n.bundle.NodeCertID()
	warned := false
	for {
		wait := time.Second
		var nc raftstore.NodeCert
		var bound bool
		err := n.store.View(func(r *raftstore.Reader) error {
			var err error
			nc, bound, err = r.NodeCert(self.NodeID)
			return err
		})
		switch {
		case err != nil:
			n.logger.Warn("cannot read this node's certificate binding", "err", err)
		case bound && nc.Fingerprint == self.Fingerprint:
			return
		case bound && !n.store.IsLeader():
			if !warned {
				n.logger.Error("the cluster knows another certificate for this node; its peers refuse this one (was the node removed? a removed node rejoins with a fresh data directory and the current join token)",
					"fingerprint", shortFingerprint(self.Fingerprint), "known", shortFingerprint(nc.Fingerprint))
				warned = true
			}
			wait = 10 * time.Second
		default:
			// Apply waits for a leader (the node that forms a cluster
			// binds itself as soon as it leads, before anyone joins).
			actx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := n.store.BindNode(actx, self.NodeID, self.Fingerprint, self.Serial, bound)
			cancel()
			switch {
			case err == nil:
				n.logger.Info("the cluster knows this node's certificate", "fingerprint", shortFingerprint(self.Fingerprint))
				return
			case errors.Is(err, raftstore.ErrClusterBehind):
				wait = 2 * time.Second // a member runs an older release, or has not said yet
			case ctx.Err() == nil:
				n.logger.Debug("binding this node's certificate", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// revokeRemoved puts a removed node's certificate on the cluster's deny
// list: the one bound to it, else the last one it presented here.
func (b *backend) revokeRemoved(ctx context.Context, id string) (pki.CertID, error) {
	cert := pki.CertID{NodeID: id}
	err := b.store.View(func(r *raftstore.Reader) error {
		nc, bound, err := r.NodeCert(id)
		if bound {
			cert.Fingerprint, cert.Serial = nc.Fingerprint, nc.Serial
		}
		return err
	})
	if err != nil {
		return cert, err
	}
	if cert.Fingerprint == "" {
		if seen, ok := b.mux.SeenCert(id); ok {
			cert = seen
		}
	}
	_, err = b.apply(ctx, raftstore.RevokeNode{NodeID: id, Fingerprint: cert.Fingerprint, Serial: cert.Serial, Time: now()})
	return cert, err
}

// wasRemoved tells whether id is a node whose removal did not finish (its
// certificate still bound): removing it again completes the revocation.
func (b *backend) wasRemoved(id string) bool {
	bound := false
	_ = b.store.View(func(r *raftstore.Reader) error {
		_, bound, _ = r.NodeCert(id)
		return nil
	})
	return bound
}

func selfRemoval(id string) error {
	return fleet.Invalid("id", "node %s cannot remove itself (it would be out of the cluster before it could revoke its own credentials): run the command against another node (--server)", id)
}
