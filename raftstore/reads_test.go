package raftstore

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// TestStore_ReadIndex_FollowerSeesAcknowledgedWrite: right after the
// leader acknowledges a write, a follower that waits for the leader's read
// index sees it: the linearizable read path of the cluster package.
func TestStore_ReadIndex_FollowerSeesAcknowledgedWrite(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	leader := stores[0]
	ctx := testContext(t)
	for i := range 20 {
		id := fmt.Sprintf("rw-%02d", i)
		putDevice(t, leader, id, nil)
		follower := stores[1+i%2]
		idx, err := leader.ReadIndex(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := follower.WaitApplied(ctx, idx); err != nil {
			t.Fatal(err)
		}
		if err := follower.View(func(r *Reader) error { _, err := r.Device(id); return err }); err != nil {
			t.Fatalf("%s after WaitApplied(%d): %v", follower.NodeID(), idx, err)
		}
	}
	if _, err := stores[1].ReadIndex(ctx); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("ReadIndex on a follower: %v", err)
	}
	// The leader's consistent read still works, and the commit index is at
	// least what was applied.
	if err := leader.VerifyLeader(ctx); err != nil {
		t.Fatal(err)
	}
	if leader.CommitIndex() < leader.AppliedIndex() {
		t.Fatalf("commit %d < applied %d", leader.CommitIndex(), leader.AppliedIndex())
	}
}

// TestStore_ReadIndex_NewLeader: the first read on a newly elected leader
// must cover the writes its predecessor acknowledged.
func TestStore_ReadIndex_NewLeader(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	for i := range 10 {
		putDevice(t, stores[0], fmt.Sprintf("old-%d", i), nil)
	}
	last := stores[0].AppliedIndex()
	stores[0].Close()
	leader := leaderOf(t, stores[1:])
	idx, err := leader.ReadIndex(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	if idx < last {
		t.Fatalf("read index %d on the new leader is below the last acknowledged write %d", idx, last)
	}
	for _, s := range stores[1:] {
		if err := s.WaitApplied(testContext(t), idx); err != nil {
			t.Fatal(err)
		}
		if n := len(deviceIDs(t, s)); n != 10 {
			t.Fatalf("%s has %d devices", s.NodeID(), n)
		}
	}
}

// TestStore_WaitApplied returns at once for an applied index, honours its
// context, and ends with ErrClosed when the store closes.
func TestStore_WaitApplied(t *testing.T) {
	s := openTestStore(t, t.TempDir(), "n1", true, nil)
	defer s.Close()
	res := putDevice(t, s, "d", nil)
	if err := s.WaitApplied(context.Background(), res.Index); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	waited := make(chan error, 1)
	go func() { waited <- s.WaitApplied(ctx, res.Index+1000) }()
	select {
	case err := <-waited:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("WaitApplied did not return when its context's deadline passed")
	}

	// A waiter is woken by the write it waits for.
	done := make(chan error, 1)
	go func() { done <- s.WaitApplied(context.Background(), res.Index+1) }()
	putDevice(t, s, "e", nil)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("waiter not woken by the next write")
	}

	go func() { done <- s.WaitApplied(context.Background(), res.Index+1000) }()
	time.Sleep(20 * time.Millisecond)
	s.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("err = %v, want ErrClosed", err)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("waiter not released by Close")
	}
	if _, err := s.Apply(context.Background(), PutDevice{Device: fleet.Device{ID: "late"}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close: %v", err)
	}
}

// TestStore_ReadIndex_NoStaleFollowerReads: a read on the leader that saw a
// write, followed by a consistent read on a follower, never returns older
// data. The leader's read index must cover what a reader on the leader can
// already see, which the state file shows before the in-memory applied
// index catches up (found by the fault-injection test: a follower served
// v=9 right after the leader served v=13).
func TestStore_ReadIndex_NoStaleFollowerReads(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	leader := leaderOf(t, stores)
	var followers []*Store
	for _, s := range stores {
		if s != leader {
			followers = append(followers, s)
		}
	}
	ctx, cancel := context.WithTimeout(testContext(t), 30*time.Second)
	defer cancel()
	putDevice(t, leader, "reg", nil)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := leader.Apply(ctx, PatchDevice{ID: "reg", Tags: map[string]any{"v": float64(i)}}); err != nil {
				t.Errorf("write %d: %v", i, err)
				return
			}
		}
	}()
	defer func() { close(stop); <-done }()
	etag := func(s *Store) uint64 {
		var e uint64
		if err := s.View(func(r *Reader) error {
			d, err := r.Device("reg")
			if err != nil {
				return err
			}
			_, err = fmt.Sscan(d.Etag, &e)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return e
	}
	stale, reads := 0, 0
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); reads++ {
		if err := leader.VerifyLeader(ctx); err != nil {
			t.Fatal(err)
		}
		seen := etag(leader)
		f := followers[reads%len(followers)]
		idx, err := leader.ReadIndex(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.WaitApplied(ctx, idx); err != nil {
			t.Fatal(err)
		}
		if got := etag(f); got < seen {
			stale++
			t.Errorf("read %d: the leader served etag %d, then %s served older etag %d (read index %d)", reads, seen, f.NodeID(), got, idx)
		}
	}
	t.Logf("%d leader-then-follower reads during writes, %d stale", reads, stale)
}
