package raftstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
)

// TestProposer_ConcurrentWrites sends many writes at once, so that they
// are proposed in groups: each caller gets the answer to its own command,
// every write is stored at its own index, a caller whose deadline has
// passed proposes nothing, and after Close a write fails with ErrClosed.
func TestProposer_ConcurrentWrites(t *testing.T) {
	s := openTestStore(t, t.TempDir(), "n1", true, nil)
	const n = 300 // more than one group (maxGroup)
	results := make([]*Result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], errs[i] = s.Apply(context.Background(), PatchDevice{ID: "missing-" + fmt.Sprint(i%7), Tags: map[string]any{"i": float64(i)}})
			if i%7 == 0 { // some rule rejections among the writes
				return
			}
			results[i], errs[i] = s.Apply(context.Background(), PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: fmt.Sprintf("dev-%03d", i), Tags: map[string]any{"i": float64(i)}}})
		})
	}
	wg.Wait()
	seen := map[uint64]int{}
	for i := range n {
		if i%7 == 0 {
			if !errors.Is(errs[i], fleet.ErrNotFound) {
				t.Errorf("write %d: patch of a missing device: err = %v, want not found", i, errs[i])
			}
			continue
		}
		if errs[i] != nil {
			t.Fatalf("write %d: %v", i, errs[i])
		}
		if got := results[i].Device.ID; got != fmt.Sprintf("dev-%03d", i) {
			t.Errorf("write %d got the answer for %s", i, got)
		}
		if j, dup := seen[results[i].Index]; dup {
			t.Errorf("writes %d and %d both at index %d", j, i, results[i].Index)
		}
		seen[results[i].Index] = i
	}
	if got, want := len(deviceIDs(t, s)), n-(n+6)/7; got != want {
		t.Errorf("%d devices stored, want %d", got, want)
	}
	// 300+257 writes from 300 goroutines at once: if each went alone,
	// there would be one group per write.
	if groups, writes := s.proposer.groups.Load(), int64(n+n-(n+6)/7); groups == 0 || groups >= writes {
		t.Errorf("%d writes were proposed in %d groups: want some grouped, all through the proposer", writes, groups)
	}

	before := s.AppliedIndex()
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if _, err := s.Apply(ctx, PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: "late"}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("write with a past deadline: err = %v, want deadline exceeded", err)
	}
	if s.AppliedIndex() != before {
		t.Errorf("a write with a past deadline moved the applied index from %d to %d", before, s.AppliedIndex())
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply(context.Background(), PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: "after-close"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("write after Close: err = %v, want ErrClosed", err)
	}
	// The proposer itself, past Apply's own check of raft's state.
	if _, err := s.proposer.apply(context.Background(), []byte("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("proposal after Close: err = %v, want ErrClosed", err)
	}
}

// TestStore_SecondOpenRefused opens a data directory that a store already
// has open: it is refused at once with an error that says so, and the
// first store goes on.
func TestStore_SecondOpenRefused(t *testing.T) {
	dir := t.TempDir()
	s := openTestStore(t, dir, "n1", true, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Open(ctx, testConfig(t, dir, "n1"))
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second Open of %s: err = %v, want refused as in use", dir, err)
	}
	putDevice(t, s, "still-writable", nil)
}
