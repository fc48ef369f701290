// Package cluster joins controller nodes into one raft cluster over mutual
// TLS.
//
// Each node listens on one cluster port (the raft address). Every connection
// is TLS with the cluster CA (package pki); after the handshake the first
// byte tells raft's own RPCs (hashicorp/raft's type bytes, 0-4) from the
// cluster's HTTP RPCs (any printable method name):
//
//   - raft traffic is accepted only from a peer that presented a node
//     certificate of this cluster's CA;
//   - POST /cluster/v1/join admits a new node that knows the join secret; the
//     joiner pins the CA's fingerprint from its join token, so it refuses an
//     impostor before it sends the secret;
//   - the other RPCs (add or remove a member, apply a forwarded write, read
//     index) are for nodes only, identified by their certificates.
//
// One port keeps the deployment simple (one firewall rule between
// controllers) and lets a partition of the raft link cut the forwarding path
// as well, which is what a real network failure does.
package cluster
