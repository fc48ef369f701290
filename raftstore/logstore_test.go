package raftstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
	"appliance/internal/boltcheck/boltchecktest"
	"appliance/raftstore/raftlog"
)

// previousRelease builds the raft directory of a node of the release
// before raftlog: its log and stable store in raft.db (raft-boltdb, the
// same checks at open), with writes, a snapshot and writes after it. It
// returns the directory and the devices the state holds.
func previousRelease(t *testing.T) (dir string, devices []string) {
	t.Helper()
	dir = t.TempDir()
	s := openLeaderInBoot1(t, dir, true)
	for i := range 30 {
		putDevice(t, s, fmt.Sprintf("old-%02d", i), map[string]any{"line": float64(i)})
		if i == 19 {
			if err := s.Snapshot(); err != nil {
				t.Fatal(err)
			}
		}
	}
	devices = deviceIDs(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, logDirName)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the previous release's directory has %s: %v", logDirName, err)
	}
	return dir, devices
}

// openLeaderInBoot1 opens a bootstrapped node in dir, in boot "boot-1",
// with its log in raft.db when boltLog (the release before raftlog), and
// waits until it leads.
func openLeaderInBoot1(t testing.TB, dir string, boltLog bool) *Store {
	t.Helper()
	cfg := testConfig(t, dir, "n1")
	cfg.Bootstrap, cfg.boltLog = true, boltLog
	cfg.bootID = func() (string, error) { return "boot-1", nil }
	s := openConfig(t, cfg)
	if err := s.WaitLeader(testContext(t)); err != nil {
		t.Fatal(err)
	}
	return s
}

// boltContent is every entry and stable store key of the raft.db at path.
func boltContent(t *testing.T, path string) (entries []raft.Log, stable map[string][]byte) {
	t.Helper()
	ls, err := raftboltdb.New(raftboltdb.Options{Path: path, BoltOptions: &bolt.Options{ReadOnly: true, Timeout: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()
	return logContent(t, ls), stableContent(t, ls)
}

func logContent(t *testing.T, ls raft.LogStore) []raft.Log {
	t.Helper()
	first, _ := ls.FirstIndex()
	last, _ := ls.LastIndex()
	var out []raft.Log
	for i := first; i <= last && last > 0; i++ {
		var l raft.Log
		if err := ls.GetLog(i, &l); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		out = append(out, l)
	}
	return out
}

func stableContent(t *testing.T, ss raft.StableStore) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, k := range []string{"CurrentTerm", "LastVoteTerm", "LastVoteCand"} {
		v, err := ss.Get([]byte(k))
		if err != nil {
			if err.Error() == "not found" {
				continue
			}
			t.Fatal(err)
		}
		out[k] = v
	}
	return out
}

// sameLog fails unless the two logs hold the same entries, every field.
func sameLog(t *testing.T, got, want []raft.Log) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	for i := range want {
		if !raftlog.Equal(&got[i], &want[i]) {
			t.Fatalf("entry %d differs:\n%+v\nwant\n%+v", want[i].Index, got[i], want[i])
		}
	}
}

// raftlogContent is every entry and stable store key of the log in the
// raft directory dir.
func raftlogContent(t *testing.T, dir string) ([]raft.Log, map[string][]byte) {
	t.Helper()
	l, err := raftlog.Open(filepath.Join(dir, logDirName), raftlog.Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return logContent(t, l), l.Stable()
}

// TestMigrateBoltLog is issue 19's acceptance 3: a raft directory written
// by the release before (the log in raft.db) is upgraded at Open, keeping
// every entry, the term and the vote, and the state; raft.db is kept as
// raft.db.migrated. A crash before the migration's last rename leaves
// raft.db in charge: the next Open removes the copy and migrates again.
func TestMigrateBoltLog(t *testing.T) {
	tests := []struct {
		name string
		// crash leaves dir as a migration that stopped part-way would.
		crash func(t *testing.T, dir string)
	}{
		{name: "upgrade", crash: func(t *testing.T, dir string) {}},
		{name: "crash while copying (log.migrating half written)", crash: func(t *testing.T, dir string) {
			half, err := raftlog.Open(filepath.Join(dir, migratingDirName), raftlog.Options{Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			entries, _ := boltContent(t, filepath.Join(dir, boltLogName))
			var batch []*raft.Log
			for i := range entries[:len(entries)/2] {
				batch = append(batch, &entries[i])
			}
			if err := half.StoreLogs(batch); err != nil {
				t.Fatal(err)
			}
			half.Close()
		}},
		{name: "crash between the two renames (log/ whole, raft.db not renamed)", crash: func(t *testing.T, dir string) {
			other := copyDir(t, dir)
			if err := migrateBoltLog(other, func(path string) (*raftFiles, map[string][]byte, error) {
				return checkBoltLog(other, path, false)
			}, testLogger(t)); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(filepath.Join(other, logDirName), filepath.Join(dir, logDirName)); err != nil {
				t.Fatal(err)
			}
			// A copy that is not raft.db's, so that the test tells which
			// one the node runs on: its last entries are gone.
			cp, err := raftlog.Open(filepath.Join(dir, logDirName), raftlog.Options{Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			last, _ := cp.LastIndex()
			if err := cp.DeleteRange(last-8, last); err != nil {
				t.Fatal(err)
			}
			cp.Close()
			// The benchmark-only raft.db mode refuses a directory with log/.
			if logs, err := checkRaftDir(dir, false, true, testLogger(t)); err == nil {
				logs.logStore.Close()
				t.Fatal("the benchmark-only raft.db mode opened a directory with log/")
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, devices := previousRelease(t)
			tc.crash(t, dir)
			boltPath := filepath.Join(dir, boltLogName)
			wantEntries, wantStable := boltContent(t, boltPath)
			if len(wantEntries) < 10 || len(wantStable) == 0 {
				t.Fatalf("the previous release's raft.db holds %d entries, %d stable keys: too little to test", len(wantEntries), len(wantStable))
			}

			cfg := testConfig(t, dir, "n1")
			cfg.bootID = func() (string, error) { return "boot-1", nil }
			s := openConfig(t, cfg)
			waitFor(t, "the log is replayed", s.Replayed)
			if got := deviceIDs(t, s); !slices.Equal(got, devices) {
				t.Fatalf("devices after the upgrade %v, want %v", got, devices)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			for _, gone := range []string{boltPath, filepath.Join(dir, migratingDirName)} {
				if _, err := os.Stat(gone); !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("%s is still there after the upgrade (%v)", gone, err)
				}
			}
			// Every entry, the term and the vote: the migrated log, after
			// the node ran on it, starts with exactly raft.db's entries.
			kept, _ := boltContent(t, boltPath+migratedSuffix)
			sameLog(t, kept, wantEntries)
			gotEntries, gotStable := raftlogContent(t, dir)
			if len(gotEntries) < len(wantEntries) {
				t.Fatalf("the log holds %d entries, raft.db %d", len(gotEntries), len(wantEntries))
			}
			sameLog(t, gotEntries[:len(wantEntries)], wantEntries)
			for k, v := range wantStable {
				if k == "CurrentTerm" || k == "LastVoteTerm" {
					// The node elected itself again: its term moved on.
					if w := gotStable[k]; len(w) != 8 || bytes.Compare(w, v) < 0 {
						t.Fatalf("%s %x went back from %x", k, w, v)
					}
					continue
				}
				if !bytes.Equal(gotStable[k], v) {
					t.Fatalf("stable key %s = %q, want %q", k, gotStable[k], v)
				}
			}

			// It goes on: a write after the upgrade survives a restart.
			s = openConfig(t, cfg)
			if err := s.WaitLeader(testContext(t)); err != nil {
				t.Fatal(err)
			}
			putDevice(t, s, "new-release", nil)
			s.Close()
			s = openConfig(t, cfg)
			defer s.Close()
			waitFor(t, "the log is replayed", s.Replayed)
			if got := deviceIDs(t, s); !slices.Contains(got, "new-release") || len(got) != len(devices)+1 {
				t.Fatalf("devices after a restart on the new log: %v", got)
			}
		})
	}
}

// TestMigrateBoltLog_RefusesDamage: a damaged raft.db is refused by the
// checks it always had, before anything is copied: raft.db stays, nothing
// else is written.
func TestMigrateBoltLog_RefusesDamage(t *testing.T) {
	dir, _ := previousRelease(t)
	boltPath := filepath.Join(dir, boltLogName)
	boltchecktest.Flip(t, boltPath, boltchecktest.LiveOffset(t, boltPath, []byte(`"old-25"`))+3, 0x01)
	cfg := testConfig(t, dir, "n1")
	cfg.bootID = func() (string, error) { return "boot-1", nil }
	_, err := Open(testContext(t), cfg)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), boltPath) {
		t.Fatalf("Open of a damaged raft.db: %v; want ErrCorrupt naming it", err)
	}
	for _, gone := range []string{filepath.Join(dir, logDirName), filepath.Join(dir, migratingDirName), boltPath + migratedSuffix} {
		if _, err := os.Stat(gone); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s was written for a damaged raft.db (%v)", gone, err)
		}
	}
}

// TestCluster_FollowerDropsItsUncommittedSuffix is the case that lost
// raft-wal v0.4.0 its entries (raftstore/DESIGN.md, "The log store"),
// under a real raft: a leader cut off from its followers appends entries
// that never commit; the others elect a leader and write over those
// indexes; the old leader comes back as a follower, drops its suffix
// (DeleteRange) and takes the new entries; then it restarts, and must
// open with every entry and the same state as the others.
func TestCluster_FollowerDropsItsUncommittedSuffix(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	putDevice(t, stores[0], "before", nil)
	n1, n2, n3 := stores[0], stores[1], stores[2]
	reopen := func(s *Store) Config {
		cfg := s.cfg
		cfg.Bootstrap = false
		cfg.BindAddr = s.RaftAddr() // back at the address the others know
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	cfg2, cfg3 := reopen(n2), reopen(n3)

	// n1 alone: its writes are appended to its log and never commit.
	base, err := n1.logStore.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup // at once, so that they are one group of entries
	for i := range 5 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(testContext(t), 300*time.Millisecond)
			defer cancel()
			n1.Apply(ctx, PutDevice{Device: fleet.Device{ID: fmt.Sprintf("lost-%d", i)}})
		})
	}
	wg.Wait()
	last, _ := n1.logStore.LastIndex()
	if last <= base {
		t.Fatalf("the cut-off leader appended nothing (log %d..%d)", base, last)
	}
	var lost raft.Log
	if err := n1.logStore.GetLog(base+1, &lost); err != nil {
		t.Fatal(err)
	}
	cfg1 := reopen(n1)

	// n2 and n3 elect a leader and write over those indexes.
	n2, n3 = openConfig(t, cfg2), openConfig(t, cfg3)
	defer n2.Close()
	defer n3.Close()
	leader := leaderOf(t, []*Store{n2, n3})
	for i := range 3 {
		putDevice(t, leader, fmt.Sprintf("after-%d", i), nil)
	}

	// n1 comes back as a follower and catches up.
	n1 = openConfig(t, cfg1)
	waitFor(t, "n1 catches up", func() bool { return n1.AppliedIndex() >= leader.AppliedIndex() })
	var replaced raft.Log
	if err := n1.logStore.GetLog(base+1, &replaced); err != nil {
		t.Fatal(err)
	}
	if replaced.Term == lost.Term {
		t.Fatalf("entry %d is still the uncommitted one of term %d: no suffix was dropped", base+1, lost.Term)
	}
	want := rawState(t, leader.fsm)
	if got := rawState(t, n1.fsm); got != want {
		t.Fatalf("n1 differs from the leader:\n%s\nwant\n%s", got, want)
	}
	wantLog := logContent(t, n1.logStore)
	cfg1 = reopen(n1)

	// And after a restart, every entry is there.
	n1 = openConfig(t, cfg1)
	defer n1.Close()
	waitFor(t, "the log is replayed", n1.Replayed)
	sameLog(t, logContent(t, n1.logStore)[:len(wantLog)], wantLog)
	if got := rawState(t, n1.fsm); got != want {
		t.Fatalf("n1 after the restart differs:\n%s\nwant\n%s", got, want)
	}
	if ids := deviceIDs(t, n1); slices.ContainsFunc(ids, func(id string) bool { return strings.HasPrefix(id, "lost-") }) {
		t.Fatalf("an uncommitted write was applied: %v", ids)
	}
}
