package raftstore

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestStore_SnapshotFilesArePrivate: snapshots hold the whole state
// (secrets included), so their directories are 0700 and their files 0600
// under the usual umask 022, whether the node took the snapshot, an earlier
// version left it, or the node received it from the leader. Before, raft
// wrote them 0755/0644.
func TestStore_SnapshotFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022) // the default most daemons run with
	t.Cleanup(func() { syscall.Umask(old) })

	leaderDir := t.TempDir()
	stores := newTestCluster(t, 1, func(cfg *Config) { cfg.Dir, cfg.TrailingLogs = leaderDir, 1 })
	leader := stores[0]
	for i := range 10 {
		putDevice(t, leader, fmt.Sprintf("dev-%02d", i), nil)
	}
	if err := leader.Snapshot(); err != nil {
		t.Fatal(err)
	}
	assertPrivate(t, leaderDir)

	// The snapshot as an earlier version left it, world-readable: opening
	// the store restricts it.
	err := filepath.WalkDir(filepath.Join(leaderDir, "snapshots"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := fs.FileMode(0o644)
		if d.IsDir() {
			mode = 0o755
		}
		return os.Chmod(path, mode)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := leader.Close(); err != nil {
		t.Fatal(err)
	}
	// Cluster timeouts: a follower joins it below.
	cfg := clusterConfig(t, leaderDir, "n1")
	cfg.TrailingLogs = 1
	leader = openConfig(t, cfg)
	assertPrivate(t, leaderDir)
	if err := leader.WaitLeader(testContext(t)); err != nil {
		t.Fatal(err)
	}
	putDevice(t, leader, "dev-10", nil)

	// A follower added after the log was compacted installs the snapshot.
	cfg = clusterConfig(t, t.TempDir(), "n2")
	follower := openConfig(t, cfg)
	ctx := testContext(t)
	if err := leader.AddVoter(ctx, follower.NodeID(), follower.RaftAddr()); err != nil {
		t.Fatal(err)
	}
	idx, err := leader.ReadIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := follower.WaitApplied(ctx, idx); err != nil {
		t.Fatal(err)
	}
	if n := len(deviceIDs(t, follower)); n != 11 {
		t.Fatalf("follower has %d devices; want 11", n)
	}
	assertPrivate(t, cfg.Dir)
}

// assertPrivate fails t unless the raft dir's snapshots directory holds at
// least one snapshot and every directory below it is 0700, every file 0600.
func assertPrivate(t *testing.T, raftDir string) {
	t.Helper()
	files := 0
	err := filepath.WalkDir(filepath.Join(raftDir, "snapshots"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		} else {
			files++
		}
		if got := info.Mode().Perm(); got != want {
			t.Errorf("%s: mode %#o; want %#o", path, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files == 0 {
		t.Fatalf("no snapshot files under %s", raftDir)
	}
}
