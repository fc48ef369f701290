// Package raftstore owns the cluster's replicated state: hashicorp/raft with
// raft-boltdb as log and stable store, a file snapshot store, and a bbolt
// state machine holding devices and deployments.
//
// Commands are typed (a type byte plus JSON, append-only numbering) and
// applied deterministically: every timestamp travels in the command. A batch
// of entries applies in one bbolt transaction together with the applied
// index, so replaying the log after a crash is idempotent. Raft types never
// leave this package.
//
// For a cluster it also owns the raft side of high availability: a
// pluggable transport (StreamLayer), follower writes forwarded to the
// leader with retries only when nothing can have been applied
// (ErrUnknownOutcome otherwise), read indexes for linearizable reads on any
// node, membership changes, and online backup and restore. See DESIGN.md
// for the invariants and failure modes.
package raftstore
