package raftstore

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"appliance/internal/fsutil"
)

// Why state.db is committed without fsync.
//
// Every write is durable once raft has appended it to the raft log, which is
// fsynced before the entry counts towards a quorum. state.db is derived from
// that log: after any crash raft replays the entries after its appliedIndex
// (invariant 3), and without a usable state.db it installs the newest
// snapshot and replays the rest. So an fsync of state.db per applied batch
// buys nothing for durability, yet it cost as much as the log's own (two
// fdatasyncs per commit) on the apply path of every write, and the two
// files' flushes queued behind each other on the disk (docs/benchmarks.md).
//
// The one thing an unsynced bbolt file cannot survive is the machine going
// down: the page cache dies with it and the disk may hold a torn file. A
// process crash loses nothing (the kernel still has every page). The
// machine's boot id tells the two apart: while state.db is open, a marker
// beside it names the boot it was opened in. At the next open a marker of
// another boot means the machine went down with the file open, so the file
// is set aside and rebuilt from the snapshot and the log. A clean close
// fsyncs the file and removes the marker.
//
// Where no boot id can be read, or no file lock taken (lock_other.go),
// state.db is fsynced on every commit as before.

// The lock beside the state file: the open marker is only meaningful if one
// process at a time writes and removes it.
var (
	errLocked          = errors.New("locked by another process")
	errLockUnsupported = errors.New("file locks are not supported on this system")
)

const (
	lockSuffix       = ".lock"    // held (flock) while the state file is open
	openMarkerSuffix = ".open"    // beside state.db while it is open unsynced
	uncleanSuffix    = ".unclean" // where a state.db left by a machine crash is moved
	bootIDPath       = "/proc/sys/kernel/random/boot_id"
)

// readBootID returns the running kernel's boot id.
func readBootID() (string, error) {
	b, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("%s is empty", bootIDPath)
	}
	return id, nil
}

// claimStateFile decides how the state file at path is opened. It returns
// noSync true when commits may skip fsync: the boot id is known and the open
// marker now names it. A state file left open by an earlier boot is moved
// to path+".unclean" first, so that the store starts without one and raft
// rebuilds it; machineDown then says so (the raft log may hold a write
// torn the same way, which was never acknowledged).
func claimStateFile(path string, bootID func() (string, error), logger *slog.Logger) (noSync, machineDown bool, err error) {
	marker := path + openMarkerSuffix
	current, idErr := bootID()
	left, err := os.ReadFile(marker)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Closed cleanly, or never opened.
	case err != nil:
		return false, false, fmt.Errorf("read %s: %w", marker, err)
	case idErr == nil && string(bytes.TrimSpace(left)) == current:
		// The process stopped without closing the file, but the machine
		// kept running: the kernel wrote or still holds every page.
		logger.Info("state file was not closed by the last run, which stopped in this boot: keeping it",
			"file", path)
	default:
		machineDown = true
		if err := setAsideUnclean(path); err != nil {
			return false, false, err
		}
		logger.Warn("the machine went down while the state file was open unsynced: it was set aside and will be rebuilt from the latest snapshot and the raft log",
			"file", path, "set_aside_as", path+uncleanSuffix, "opened_in_boot", string(bytes.TrimSpace(left)), "boot", current)
	}
	if idErr != nil {
		// Without a boot id a machine crash cannot be told from a process
		// crash: sync every commit, and leave no marker to misread.
		if err := removeSynced(marker); err != nil {
			return false, false, err
		}
		logger.Info("no boot id: the state file is fsynced on every commit", "reason", idErr.Error())
		return false, machineDown, nil
	}
	if err := fsutil.WriteFileAtomic(marker, []byte(current+"\n"), 0o600); err != nil {
		return false, false, fmt.Errorf("write %s: %w", marker, err)
	}
	return true, machineDown, nil
}

// MachineWentDown reports whether the machine went down while a node had
// the raft directory dir open (its state file's open marker names another
// boot), without claiming anything: files the node writes without fsync
// (its history) may then be torn, which is no sign of damage.
func MachineWentDown(dir string) bool {
	left, err := os.ReadFile(filepath.Join(dir, "state.db"+openMarkerSuffix))
	if err != nil {
		return false
	}
	current, err := readBootID()
	return err != nil || string(bytes.TrimSpace(left)) != current
}

// setAsideUnclean moves path (if present) to path+".unclean", replacing an
// older one: the rebuilt file supersedes it, and it is kept only to look at.
func setAsideUnclean(path string) error {
	if err := os.Rename(path, path+uncleanSuffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("set aside state file %s: %w", path, err)
	}
	return fsutil.SyncDir(filepath.Dir(path))
}

// releaseStateFile removes the open marker after the file was fsynced and
// closed: the next open may trust it whatever happens to the machine.
func releaseStateFile(path string) error {
	return removeSynced(path + openMarkerSuffix)
}

func removeSynced(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return fsutil.SyncDir(filepath.Dir(path))
}
