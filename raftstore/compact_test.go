package raftstore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"appliance/fleet"
)

// TestStore_CompactsALogOfLargeEntries: entries far fewer than raft's
// snapshot threshold (8192) but many bytes, as a bulk import writes, are
// compacted once their bytes pass the bound and the stream pauses: a
// snapshot is taken, the log keeps only its newest entries within the
// trailing bytes, and the store restarts from it with the same state.
// Below the bound nothing is compacted.
func TestStore_CompactsALogOfLargeEntries(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir, "n1")
	cfg.Bootstrap = true
	cfg.compactBytes, cfg.compactKeepBytes, cfg.compactEvery = 512<<10, 100<<10, 20*time.Millisecond
	s := openConfig(t, cfg)
	ctx := testContext(t)
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", 32<<10) // an entry of about 32 KiB
	var index []uint64                 // of each write
	put := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			d := fleet.Device{ID: fmt.Sprintf("press-%02d", i), Tags: map[string]any{"blob": big}}
			res, err := s.Apply(ctx, PutDevice{Device: d, Time: time.Unix(1, 0).UTC()})
			if err != nil {
				t.Fatal(err)
			}
			index = append(index, res.Index)
		}
	}
	firstIndex := func() uint64 {
		t.Helper()
		first, err := s.logStore.FirstIndex()
		if err != nil {
			t.Fatal(err)
		}
		return first
	}
	put(0, 8) // 256 KiB: below the bound
	time.Sleep(10 * cfg.compactEvery)
	if first := firstIndex(); first != 1 {
		t.Fatalf("the log was compacted below the bound: it starts at %d", first)
	}
	put(8, 24) // 768 KiB in all
	// Compacted when the bytes passed the bound and the writes paused (at
	// the end, or in a pause of this loaded test): either way the first
	// 256 KiB are gone, and what is kept is the newest 100 KiB then.
	waitFor(t, "the log is compacted", func() bool { return firstIndex() > index[8] })
	snaps, err := os.ReadDir(filepath.Join(dir, "snapshots"))
	if err != nil || len(snaps) == 0 {
		t.Fatalf("no snapshot after the compaction: %v", err)
	}
	want := rawState(t, s.fsm)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	waitFor(t, "the log is replayed", s.Replayed)
	if got := rawState(t, s.fsm); got != want {
		t.Fatalf("restarted with a different state:\n%s\nwant\n%s", got, want)
	}
}

// TestLogSizes_Trailing: the trailing window is the newest entries within
// the bytes, at least one, or the usual count when everything fits.
func TestLogSizes_Trailing(t *testing.T) {
	l := newLogSizes(4)
	if got := l.trailing(100, 10240); got != 10240 {
		t.Fatalf("empty: %d, want 10240", got)
	}
	for _, n := range []int{50, 10, 30, 40, 20} { // the ring holds the last 4
		l.add(n)
	}
	for _, tc := range []struct {
		keep int64
		want uint64
	}{{5, 1}, {20, 1}, {60, 2}, {90, 3}, {99, 3}, {100, 10240}} {
		if got := l.trailing(tc.keep, 10240); got != tc.want {
			t.Errorf("trailing(%d) = %d, want %d", tc.keep, got, tc.want)
		}
	}
	if got := l.pending(); got != 150 {
		t.Fatalf("pending %d, want 150", got)
	}
	l.snapshotTaken()
	if got := l.pending(); got != 0 {
		t.Fatalf("pending after a snapshot %d, want 0", got)
	}
}

// restoreCounter is an Observer counting the rebuilds it is asked for.
type restoreCounter struct{ restored atomic.Int32 }

func (o *restoreCounter) Restored(*Reader) error { o.restored.Add(1); return nil }
func (o *restoreCounter) Applied([]Change)       {}
func (o *restoreCounter) Halted(error)           {}

// TestStore_SnapshotAheadByNoOpsIsNotReinstalled: a snapshot taken after a
// new leader's no-op is labelled with the no-op's index, one past the state
// file's; a restart must not install it again (reading the whole snapshot
// and rebuilding everything derived a second time), and starts with the
// same state.
func TestStore_SnapshotAheadByNoOpsIsNotReinstalled(t *testing.T) {
	dir := t.TempDir()
	obs := &restoreCounter{}
	cfg := testConfig(t, dir, "n1")
	cfg.Bootstrap = true
	cfg.Observer = obs
	s := openConfig(t, cfg)
	ctx := testContext(t)
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := s.Apply(ctx, PutDevice{Device: fleet.Device{ID: fmt.Sprintf("press-%d", i)}, Time: time.Unix(1, 0).UTC()}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s = openConfig(t, cfg) // a new term: its leader's no-op follows the writes
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReadIndex(ctx); err != nil { // the no-op has committed
		t.Fatal(err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	want := rawState(t, s.fsm)
	s.Close()

	obs.restored.Store(0)
	s = openConfig(t, cfg)
	waitFor(t, "the log is replayed", s.Replayed)
	time.Sleep(200 * time.Millisecond) // raft starts (and would install) in the background
	if n := obs.restored.Load(); n != 1 {
		t.Fatalf("the derived state was rebuilt %d times at open, want once (the snapshot was installed again)", n)
	}
	if got := rawState(t, s.fsm); got != want {
		t.Fatalf("restarted with a different state:\n%s\nwant\n%s", got, want)
	}
}
