package raftstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
)

// raftLog is what raft keeps on disk besides snapshots: the log and the
// stable store (term, vote), in one store.
type raftLog interface {
	raft.LogStore
	raft.StableStore
	Close() error
}

// The raft-wal log store is measured, not used (docs/benchmarks.md, "The
// raft log store"): hashicorp/raft-wal v0.4.0, the only version the module
// proxy serves, loses every entry of a segment to "sealed segment has no
// index block" after raft truncates the log's tail (a follower dropping
// entries the new leader does not have) and the process restarts (upstream
// issue 31, fixed in v0.4.1), its recovery drops a damaged tail batch or
// a whole tail segment in silence, and none of the checks at open
// (preflight.go) read it. So it is only for benchmarks on a new directory:
// Config.walLog in tests, and node binaries built with -tags benchwal.

// openWALLog opens hashicorp/raft-wal in dir/wal. It refuses a directory
// that holds a log already, in raft.db or in wal/.
func openWALLog(dir string) (*raftFiles, error) {
	walDir := filepath.Join(dir, "wal")
	if entries, err := os.ReadDir(walDir); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("raftstore: %s is not empty: the raft-wal log store is for benchmarks on a new directory", walDir)
	}
	if _, err := os.Stat(filepath.Join(dir, "raft.db")); err == nil {
		return nil, fmt.Errorf("raftstore: %s holds raft.db: the raft-wal log store is for benchmarks on a new directory", dir)
	}
	if err := os.MkdirAll(walDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", walDir, err)
	}
	// Our own meta store, to close it: v0.4.0's Close leaves it open, and
	// its file lock with it, so the next open in the process would wait
	// forever.
	meta := &metadb.BoltMetaDB{}
	w, err := wal.Open(walDir, wal.WithMetaStore(meta))
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("open raft log %s: %w", walDir, err)
	}
	return &raftFiles{logStore: walLog{WAL: w, meta: meta}}, nil
}

// walLog closes the WAL and then its meta store.
type walLog struct {
	*wal.WAL
	meta *metadb.BoltMetaDB
}

func (l walLog) Close() error {
	return errors.Join(l.WAL.Close(), l.meta.Close())
}
