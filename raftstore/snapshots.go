package raftstore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"
)

// privateSnapshots is raft's FileSnapshotStore with its files kept private.
// raft creates snapshot directories 0755 and files 0644 (umask
// permitting); a snapshot is the whole state, device keys' hashes,
// enrollment secrets and manifests with their registry passwords included,
// so, like every file of the data directory, its directories are made 0700
// and its files 0600: when a snapshot is started (before anything is
// written into its state file) and when it is finished. Opening the store
// does the same to snapshots an earlier version left.
type privateSnapshots struct {
	*raft.FileSnapshotStore
	dir string // <raft dir>/snapshots
}

func newPrivateSnapshots(raftDir string, retain int, logger *hcLogger) (*privateSnapshots, error) {
	store, err := raft.NewFileSnapshotStoreWithLogger(raftDir, retain, logger)
	if err != nil {
		return nil, err
	}
	s := &privateSnapshots{FileSnapshotStore: store, dir: filepath.Join(raftDir, "snapshots")}
	if err := s.restrict(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *privateSnapshots) Create(version raft.SnapshotVersion, index, term uint64, configuration raft.Configuration,
	configurationIndex uint64, trans raft.Transport) (raft.SnapshotSink, error) {
	sink, err := s.FileSnapshotStore.Create(version, index, term, configuration, configurationIndex, trans)
	if err != nil {
		return nil, err
	}
	if err := s.restrict(); err != nil {
		_ = sink.Cancel()
		return nil, err
	}
	return &privateSink{SnapshotSink: sink, store: s}, nil
}

// privateSink restricts the finished snapshot (raft writes its metadata
// again and renames its directory as it closes).
type privateSink struct {
	raft.SnapshotSink
	store *privateSnapshots
}

func (s *privateSink) Close() error {
	if err := s.SnapshotSink.Close(); err != nil {
		return err
	}
	return s.store.restrict()
}

// restrict makes every directory below the snapshot directory (itself
// included) 0700 and every file 0600. Entries that vanish meanwhile (raft
// reaping old snapshots) are skipped.
func (s *privateSnapshots) restrict() error {
	err := filepath.WalkDir(s.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		mode := fs.FileMode(0o600)
		if d.IsDir() {
			mode = 0o700
		}
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if info.Mode().Perm() == mode {
			return nil
		}
		if err := os.Chmod(path, mode); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("make snapshots private in %s: %w", s.dir, err)
	}
	return nil
}
