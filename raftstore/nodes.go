package raftstore

import (
	"context"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
)

// The cluster's node certificates, replicated so that every node judges a
// peer alike (the cluster package's mux asks the node, which reads these):
//
//	nodeCerts     node id → NodeCert: the certificate the cluster knows for
//	              a member (bound when it joined, or by itself once)
//	revokedCerts  SHA-256 fingerprint → RevokedCert: certificates of removed
//	              nodes, refused on every handshake and RPC
//
// Both buckets are made by the first command that writes them, so a state
// file of an older release is not touched until it needs them.
var (
	bucketNodeCerts    = []byte("nodeCerts")
	bucketRevokedCerts = []byte("revokedCerts")
)

// NodeCert is the certificate the cluster knows for a node.
type NodeCert struct {
	Fingerprint string    `json:"fingerprint"` // SHA-256 of the DER, lowercase hex
	Serial      string    `json:"serial"`      // hex
	Time        time.Time `json:"time"`
}

// RevokedCert is a removed node's certificate.
type RevokedCert struct {
	NodeID string    `json:"nodeId"`
	Serial string    `json:"serial,omitempty"`
	Time   time.Time `json:"time"`
}

// BindNode records the certificate the cluster knows for a node: from then
// on a certificate for that node id is accepted only if it is this one
// (every node holds the CA's key, so a removed node could issue itself
// another certificate for any id; only the binding tells it apart). A
// revoked certificate cannot be bound.
type BindNode struct {
	NodeID      string    `json:"nodeId"`
	Fingerprint string    `json:"fingerprint"`
	Serial      string    `json:"serial,omitempty"`
	Time        time.Time `json:"time"`
	// IfUnbound refuses the binding (fleet.ErrExists) when the node has one
	// already: a node binding itself never replaces what the cluster knew.
	IfUnbound bool `json:"ifUnbound,omitempty"`
}

func (BindNode) Type() CommandType { return CmdBindNode }

// RevokeNode puts a removed node's certificate on the deny list and drops
// the node's binding: every node refuses the certificate from the moment it
// applies the entry, and closes the connections that presented it.
// Fingerprint may be empty when the cluster never saw the node's
// certificate; the binding is dropped all the same.
type RevokeNode struct {
	NodeID      string    `json:"nodeId"`
	Fingerprint string    `json:"fingerprint,omitempty"`
	Serial      string    `json:"serial,omitempty"`
	Time        time.Time `json:"time"`
}

func (RevokeNode) Type() CommandType { return CmdRevokeNode }

func (w *writer) bindNode(index uint64, c *BindNode) *Result {
	if c.NodeID == "" || c.Fingerprint == "" {
		return &Result{Index: index, Err: fmt.Errorf("bind node: a node id and a fingerprint are required: %w", fleet.ErrInvalid)}
	}
	if w.tx.Bucket(bucketRevokedCerts) != nil && w.tx.Bucket(bucketRevokedCerts).Get([]byte(c.Fingerprint)) != nil {
		return &Result{Index: index, Err: fmt.Errorf("bind node %s: its certificate was revoked: %w", c.NodeID, fleet.ErrInvalid)}
	}
	b := w.bucket(bucketNodeCerts)
	if old := mustGet[NodeCert](b, c.NodeID); old != nil {
		if old.Fingerprint == c.Fingerprint {
			return &Result{Index: index}
		}
		if c.IfUnbound {
			return &Result{Index: index, Err: fmt.Errorf("bind node %s: bound to another certificate: %w", c.NodeID, fleet.ErrExists)}
		}
	}
	w.putJSON(bucketNodeCerts, c.NodeID, NodeCert{Fingerprint: c.Fingerprint, Serial: c.Serial, Time: c.Time})
	w.changes = append(w.changes, Change{Index: index, Kind: NodeCertsChanged, ID: c.NodeID})
	return &Result{Index: index}
}

func (w *writer) revokeNode(index uint64, c *RevokeNode) *Result {
	if c.NodeID == "" {
		return &Result{Index: index, Err: fmt.Errorf("revoke node: a node id is required: %w", fleet.ErrInvalid)}
	}
	w.del(bucketNodeCerts, []byte(c.NodeID))
	if c.Fingerprint != "" {
		w.putJSON(bucketRevokedCerts, c.Fingerprint, RevokedCert{NodeID: c.NodeID, Serial: c.Serial, Time: c.Time})
	}
	w.changes = append(w.changes, Change{Index: index, Kind: NodeCertsChanged, ID: c.NodeID})
	return &Result{Index: index}
}

// bucket returns a bucket, making it the first time.
func (w *writer) bucket(name []byte) *bolt.Bucket {
	b, err := w.tx.CreateBucketIfNotExists(name)
	if err != nil {
		panic(fmt.Sprintf("create bucket %s: %v", name, err))
	}
	return b
}

// NodeCert is the certificate the cluster knows for a node; ok is false
// when it knows none.
func (r *Reader) NodeCert(nodeID string) (NodeCert, bool, error) {
	b := r.tx.Bucket(bucketNodeCerts)
	if b == nil {
		return NodeCert{}, false, nil
	}
	c, err := getJSON[NodeCert](b, nodeID)
	if err != nil || c == nil {
		return NodeCert{}, false, err
	}
	return *c, true, nil
}

// RevokedCert tells whether the certificate with this fingerprint was
// revoked, and whose it was.
func (r *Reader) RevokedCert(fingerprint string) (RevokedCert, bool, error) {
	b := r.tx.Bucket(bucketRevokedCerts)
	if b == nil || fingerprint == "" {
		return RevokedCert{}, false, nil
	}
	c, err := getJSON[RevokedCert](b, fingerprint)
	if err != nil || c == nil {
		return RevokedCert{}, false, err
	}
	return *c, true, nil
}

// RevokedCerts calls fn for every revoked certificate, by fingerprint.
func (r *Reader) RevokedCerts(fn func(fingerprint string, c RevokedCert) bool) error {
	b := r.tx.Bucket(bucketRevokedCerts)
	if b == nil {
		return nil
	}
	c := b.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		rc, err := getJSON[RevokedCert](b, string(k))
		if err != nil {
			return err
		}
		if rc != nil && !fn(string(k), *rc) {
			return nil
		}
	}
	return nil
}

// IsMember tells whether nodeID is in the latest raft configuration.
func (s *Store) IsMember(ctx context.Context, nodeID string) (bool, error) {
	members, err := s.Members(ctx)
	if err != nil {
		return false, err
	}
	for _, m := range members {
		if m.ID == nodeID {
			return true, nil
		}
	}
	return false, nil
}

// BindNode records, through the log, the certificate the cluster knows
// for nodeID; without replace, a node already bound to another
// certificate keeps it (fleet.ErrExists). Refused with ErrClusterBehind
// while a member runs a release that cannot apply it.
func (s *Store) BindNode(ctx context.Context, nodeID, fingerprint, serial string, replace bool) error {
	_, err := s.Apply(ctx, BindNode{NodeID: nodeID, Fingerprint: fingerprint, Serial: serial, Time: time.Now().UTC(), IfUnbound: !replace})
	return err
}
