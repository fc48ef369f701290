package raftstore

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"

	"appliance/internal/fsutil"
	"appliance/raftstore/raftlog"
)

// The raft log store.
//
// The node's log and stable store (term, vote) are raftlog's segment log
// in raft/log/: one write and one fdatasync per append, every record
// checked at open (raftlog/DESIGN.md). The release before kept them in
// raft-boltdb's raft.db, which costs two fdatasyncs per append; Open
// migrates a raft.db it finds (migrateBoltLog). raft-boltdb is otherwise
// only for benchmarks: Config.boltLog in tests, and node binaries built
// with -tags benchboltlog, keep the log in raft.db as before, with the
// same checks, so that one run can measure both stores.

// raftLog is what raft keeps on disk besides snapshots: the log and the
// stable store (term, vote), in one store.
type raftLog interface {
	raft.LogStore
	raft.StableStore
	Close() error
}

const (
	logDirName       = "log"           // raftlog's directory in the raft directory
	boltLogName      = "raft.db"       // the previous release's log store
	migratingDirName = "log.migrating" // the copy of raft.db being made
	migratedSuffix   = ".migrated"     // raft.db once copied
)

// HasLog reports whether the raft directory dir holds a raft log (in
// either store): a node that has run there before.
func HasLog(dir string) bool {
	for _, name := range []string{logDirName, boltLogName} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return true
		}
	}
	return false
}

// openRaftLog opens raftlog in dir/log, which the checks at open then
// read like any log.
func openRaftLog(dir string, machineDown bool, logger *slog.Logger) (*raftlog.Log, error) {
	return raftlog.Open(filepath.Join(dir, logDirName), raftlog.Options{MachineWentDown: machineDown, Logger: logger})
}

// migrateBoltLog moves the log from raft.db (the release before) to
// raftlog, when dir holds a raft.db: raft.db is checked as it always was
// (check), copied whole (every entry, the term and the vote) into
// log.migrating/, the copy is opened again and compared with raft.db entry
// by entry, renamed to log/, and only then is raft.db renamed to
// raft.db.migrated (kept: a way back to the release before, and something
// to look at). Until that rename raft.db is in charge: a crash at any point
// before it leaves raft.db, and the next start removes the copy (log/ or
// log.migrating/) and begins again.
func migrateBoltLog(dir string, check func(path string) (*raftFiles, map[string][]byte, error), logger *slog.Logger) error {
	boltPath := filepath.Join(dir, boltLogName)
	tmp := filepath.Join(dir, migratingDirName)
	if _, err := os.Stat(boltPath); errors.Is(err, fs.ErrNotExist) {
		return removeAll(tmp) // a copy whose raft.db was renamed: impossible, but nothing of it counts
	} else if err != nil {
		return fmt.Errorf("stat %s: %w", boltPath, err)
	}
	logDir := filepath.Join(dir, logDirName)
	for _, half := range []string{tmp, logDir} {
		if _, err := os.Stat(half); err == nil {
			logger.Warn("removing the copy of raft.db an earlier start left unfinished: raft.db is still the log", "dir", half)
		}
		if err := removeAll(half); err != nil {
			return err
		}
	}
	files, stable, err := check(boltPath)
	if err != nil {
		return err
	}
	src := files.logStore
	defer src.Close()
	logger.Info("migrating the raft log from raft.db to log/", "entries", files.log.count(), "first", files.log.first, "last", files.log.last)
	dst, err := raftlog.Open(tmp, raftlog.Options{Logger: logger})
	if err != nil {
		return fmt.Errorf("migrate %s: %w", boltPath, err)
	}
	err = copyLog(src, dst, files.log, stable)
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		removeAll(tmp)
		return fmt.Errorf("migrate %s to %s: %w", boltPath, tmp, err)
	}
	if err := verifyCopy(src, tmp, files.log, stable); err != nil {
		removeAll(tmp)
		return fmt.Errorf("migrate %s: the copy in %s differs: %w", boltPath, tmp, err)
	}
	if err := os.Rename(tmp, logDir); err != nil {
		return fmt.Errorf("migrate %s: %w", boltPath, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return err
	}
	if err := src.Close(); err != nil {
		return fmt.Errorf("close %s: %w", boltPath, err)
	}
	if err := os.Rename(boltPath, boltPath+migratedSuffix); err != nil {
		return fmt.Errorf("migrate %s: %w", boltPath, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return err
	}
	logger.Info("migrated the raft log from raft.db to log/; raft.db is kept as raft.db.migrated", "entries", files.log.count())
	return nil
}

// copyLog appends every entry of src to the empty dst, in batches of up
// to 4 MiB, then its stable store keys.
func copyLog(src raft.LogStore, dst *raftlog.Log, facts logFacts, stable map[string][]byte) error {
	var batch []*raft.Log
	var size int
	flush := func() error {
		err := dst.StoreLogs(batch)
		batch, size = batch[:0], 0
		return err
	}
	for i := facts.first; i <= facts.last && facts.last > 0; i++ {
		l := new(raft.Log)
		if err := src.GetLog(i, l); err != nil {
			return fmt.Errorf("read entry %d: %w", i, err)
		}
		batch = append(batch, l)
		size += len(l.Data) + len(l.Extensions)
		if size >= 4<<20 || len(batch) >= 1024 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if len(batch) > 0 {
		if err := flush(); err != nil {
			return err
		}
	}
	for k, v := range stable {
		if err := dst.Set([]byte(k), v); err != nil {
			return err
		}
	}
	return nil
}

// verifyCopy opens the copy afresh (what a restart would read) and
// compares it with the source: the same first and last index, every entry
// equal in every field, the same stable store.
func verifyCopy(src raft.LogStore, dir string, facts logFacts, stable map[string][]byte) error {
	dst, err := raftlog.Open(dir, raftlog.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer dst.Close()
	first, _ := dst.FirstIndex()
	last, _ := dst.LastIndex()
	if first != facts.first || last != facts.last {
		return fmt.Errorf("it holds entries %d..%d, raft.db %d..%d", first, last, facts.first, facts.last)
	}
	for i := facts.first; i <= facts.last && facts.last > 0; i++ {
		var a, b raft.Log
		if err := src.GetLog(i, &a); err != nil {
			return fmt.Errorf("read entry %d of raft.db: %w", i, err)
		}
		if err := dst.GetLog(i, &b); err != nil {
			return fmt.Errorf("read entry %d: %w", i, err)
		}
		if !raftlog.Equal(&a, &b) {
			return fmt.Errorf("entry %d differs", i)
		}
	}
	got := dst.Stable()
	if len(got) != len(stable) {
		return fmt.Errorf("it holds %d stable store keys, raft.db %d", len(got), len(stable))
	}
	for k, v := range stable {
		if !bytes.Equal(got[k], v) {
			return fmt.Errorf("stable store key %q differs", k)
		}
	}
	return nil
}

func removeAll(path string) error {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.RemoveAll(path); err != nil {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return fsutil.SyncDir(filepath.Dir(path))
}
