// Package cluster joins controller nodes into one raft cluster over mutual
// TLS.
//
// Each node listens on one cluster port (the raft address). Every connection
// is TLS with the cluster CA (package pki); after the handshake the first
// byte tells raft's own RPCs (hashicorp/raft's type bytes, 0-4) from the
// cluster's HTTP RPCs (any printable method name):
//
//   - raft traffic is accepted only from a peer that presented a node
//     certificate of this cluster's CA that the node's Authorizer accepts
//     for raft: not revoked, the certificate bound to its node id, a
//     member's (guard.go);
//   - POST /cluster/v1/join admits a new node that knows the join secret; the
//     joiner pins the CA's fingerprint from its join token, so it refuses an
//     impostor before it sends the secret;
//   - POST /cluster/v1/members makes the caller a voter: a member as it is,
//     a node that is not one yet only with the current join secret (its
//     certificate is then bound to it);
//   - the other RPCs (remove a member, apply a forwarded write, read index,
//     node info) are for members only, identified by their certificates.
//
// Every handshake, either side, asks the Authorizer too, so a revoked
// certificate never completes one; Mux.Recheck closes the connections
// opened before a revocation.
//
// One port keeps the deployment simple (one firewall rule between
// controllers) and lets a partition of the raft link cut the forwarding path
// as well, which is what a real network failure does.
package cluster
