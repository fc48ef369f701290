//go:build benchwal

package raftstore

// benchWAL puts every new node's log in hashicorp/raft-wal instead of
// raft.db (logstore.go), in binaries built for the loadtest's comparison
// of the two log stores (go build -tags benchwal; docs/benchmarks.md).
// Release builds never set it: raft-wal v0.4.0 is not safe to run on.
const benchWAL = true
