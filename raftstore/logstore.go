package raftstore

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
)

// raftLog is what raft keeps on disk besides snapshots: the log and the
// stable store (term, vote), in one store.
type raftLog interface {
	raft.LogStore
	raft.StableStore
	Close() error
}

// openWALLog opens hashicorp/raft-wal in dir/wal, for the benchmarks that
// compare it with raft-boltdb (Config.walLog). It refuses a directory with
// anything in it: none of the checks at open (preflight.go) read it.
func openWALLog(dir string) (*raftFiles, error) {
	walDir := filepath.Join(dir, "wal")
	if entries, err := os.ReadDir(walDir); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("raftstore: %s is not empty: the raft-wal log store is for benchmarks on a new directory", walDir)
	}
	if err := os.MkdirAll(walDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", walDir, err)
	}
	w, err := wal.Open(walDir)
	if err != nil {
		return nil, fmt.Errorf("open raft log %s: %w", walDir, err)
	}
	return &raftFiles{logStore: w}, nil
}
