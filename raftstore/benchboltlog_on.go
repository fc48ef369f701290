//go:build benchboltlog

package raftstore

// benchBoltLog keeps every node's log in raft-boltdb's raft.db, as the
// release before raftlog did (logstore.go), in binaries built for the
// loadtest's comparison of the two log stores (go build -tags
// benchboltlog; docs/benchmarks.md). Release builds never set it.
const benchBoltLog = true
