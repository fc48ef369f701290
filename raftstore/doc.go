// Package raftstore owns the cluster's replicated state: hashicorp/raft with
// raft-boltdb as log and stable store, a file snapshot store, and a bbolt
// state machine holding devices and deployments.
//
// Commands are typed (a type byte plus JSON, append-only numbering) and
// applied deterministically: every timestamp travels in the command. A batch
// of entries applies in one bbolt transaction together with the applied
// index, so replaying the log after a crash is idempotent. Raft types never
// leave this package. See DESIGN.md for the invariants.
package raftstore
