// Package raftlog is the node's raft log store and stable store: a log of
// segment files that appends a batch of entries with one write and one
// fdatasync, and checks every record when it opens. DESIGN.md has the
// format and the rules for crashes and damage.
package raftlog
