// Package pki is the cluster's public-key infrastructure: the cluster CA,
// node certificates, join tokens, and the TLS configurations nodes and
// joiners use.
//
// Trust has one root: the cluster CA, created when the first node
// bootstraps. Every controller holds a node certificate issued by it whose
// identity (OU "appliance-node" plus the URI SAN "appliance://node/<id>") is
// what authorises raft and node-to-node traffic; host names are never
// checked, because peers are dialed by raft address. A node that wants to
// join holds only a token carrying the CA's SHA-256 fingerprint and a
// secret: it trusts a server only if the server's chain contains the pinned
// CA, and it sends the secret only over that connection.
package pki

import "errors"

var (
	// ErrNoCAKey: the CA was loaded without its private key, so it can
	// verify but not issue.
	ErrNoCAKey = errors.New("cluster CA has no private key")
	// ErrInvalidNodeID: a node id is empty, longer than 128 characters, or
	// has characters other than A-Z a-z 0-9 . _ -.
	ErrInvalidNodeID = errors.New("invalid node id: want 1-128 of A-Z a-z 0-9 . _ -")
	// ErrNotNode: a certificate verified against the cluster CA but does not
	// carry a node identity, so it must not be treated as a peer.
	ErrNotNode = errors.New("certificate has no appliance node identity")
	// ErrWrongCluster: the server a joiner reached is not signed by the CA
	// its join token pins.
	ErrWrongCluster = errors.New("wrong cluster or wrong token")
	// ErrJoinToken matches every error ParseJoinToken returns.
	ErrJoinToken = errors.New("join token")
)
