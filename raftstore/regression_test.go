package raftstore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"appliance/fleet"
	"appliance/internal/boltcheck/boltchecktest"
)

// Regressions of issue 13's storage findings, each written against the
// store's public behaviour so that it ran on the code before the fix (and
// failed there; see the commit message). The whole table is
// TestStorageFaults.
func TestStorageRegressions(t *testing.T) {
	build := func(t *testing.T, boltLog bool) string {
		dir := t.TempDir()
		s := openLeaderInBoot1(t, dir, boltLog)
		for i := range 10 {
			putDevice(t, s, fmt.Sprintf("dev-%02d", i), nil)
		}
		// The last append holds several entries (written at once, they
		// are appended together).
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				putDevice(t, s, fmt.Sprintf("group-%d", i), nil)
			}()
		}
		wg.Wait()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	reopen := func(t *testing.T, dir string) (*Store, error) {
		cfg := testConfig(t, dir, "n1")
		cfg.Bootstrap = true
		cfg.bootID = func() (string, error) { return "boot-1", nil }
		return Open(context.Background(), cfg)
	}

	// raft.db's newest meta page damaged: bbolt opened the file as it was
	// before the last append, so the log ended before the state file's
	// applied index; raft then gave the next writes indexes the state
	// machine had already applied, and it skipped them: committed, answered
	// "outcome unknown", never applied. raft.db is now the previous
	// release's log, which Open migrates: the migration checks it first.
	t.Run("raft.db's newest meta page", func(t *testing.T) {
		dir := build(t, true)
		path := filepath.Join(dir, "raft.db")
		boltchecktest.Flip(t, path, int64(newestMeta(t, path)*4096+16+56), 0x01) // its checksum
		s, err := reopen(t, dir)
		if err == nil {
			defer s.Close()
			waitFor(t, "a leader", func() bool { return s.IsLeader() })
			for i := range 5 {
				id := fmt.Sprintf("later-%d", i)
				_, werr := s.Apply(context.Background(), PutDevice{Device: fleet.Device{ID: id}})
				if !slices.Contains(deviceIDs(t, s), id) {
					t.Fatalf("opened a log that ends before its state file: write %s (%v) was committed and never applied", id, werr)
				}
			}
			t.Fatal("opened a log whose newest meta page is damaged")
		}
		if !strings.Contains(err.Error(), path) {
			t.Fatalf("the refusal does not name %s: %v", path, err)
		}
	})

	// A damaged page header in state.db: bbolt panicked on raft's apply
	// goroutine or in Open, a Go panic trace instead of one line.
	t.Run("state.db page header", func(t *testing.T) {
		dir := build(t, false)
		path := filepath.Join(dir, "state.db")
		off := boltchecktest.LiveOffset(t, path, []byte(`"dev-05"`))
		boltchecktest.Flip(t, path, off-off%4096+8, 0x01) // the page's flags
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("Open panicked on a damaged page: %v", r)
				}
			}()
			s, err := reopen(t, dir)
			if err == nil {
				defer s.Close()
				ids := deviceIDs(t, s) // bbolt reads the page now
				t.Fatalf("opened a state file with a damaged page (devices %v)", ids)
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("the refusal does not name %s: %v", path, err)
			}
		}()
	})
}

// newestMeta is the page (0 or 1) of a bbolt file's newer meta page.
func newestMeta(t *testing.T, path string) int {
	t.Helper()
	var txid [2]uint64
	for i := range txid {
		b := readAt(t, path, int64(i*4096+16+48), 8)
		for j := 7; j >= 0; j-- {
			txid[i] = txid[i]<<8 | uint64(b[j])
		}
	}
	if txid[1] > txid[0] {
		return 1
	}
	return 0
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}
