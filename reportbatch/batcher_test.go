package reportbatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/storetest"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// store is a real one-node raft store with devices d0..d9, and the
// PutReports entries proposed to it. down stands for a cluster without a
// leader (a real one takes an election to make): a proposal fails.
type store struct {
	*raftstore.Store
	mu      sync.Mutex
	down    bool
	entries [][]raftstore.Report
}

func (s *store) propose(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
	s.mu.Lock()
	down := s.down
	if c, ok := cmd.(raftstore.PutReports); ok && !down {
		s.entries = append(s.entries, c.Reports)
	}
	s.mu.Unlock()
	if down {
		return nil, errors.New("no raft leader (the test's)")
	}
	return s.Store.Apply(ctx, cmd)
}

func (s *store) setDown(down bool) { s.mu.Lock(); s.down = down; s.mu.Unlock() }

// report is the document stored for a device ("" none).
func (s *store) report(t *testing.T, id string) raftstore.StoredReport {
	t.Helper()
	var rep raftstore.StoredReport
	_ = s.View(func(r *raftstore.Reader) error {
		rep, _ = r.Report(id)
		return nil
	})
	return rep
}

func newBatcher(t *testing.T, cfg Config) (*Batcher, *store) {
	t.Helper()
	logger := testlog.New(t, slog.LevelError)
	rs := storetest.Open(t, nil, slog.LevelError)
	ctx := testutil.Context(t)
	for i := range 10 {
		if _, err := rs.Apply(ctx, raftstore.PutDevice{Device: fleet.Device{ID: fmt.Sprintf("d%d", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	s := &store{Store: rs}
	cfg.NodeID, cfg.Propose, cfg.Logger = "n1", s.propose, logger
	return New(cfg), s
}

// run runs b until the test ends.
func run(t *testing.T, b *Batcher) {
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	t.Cleanup(func() { stop(); <-done })
}

func doc(n int) []byte { return []byte(fmt.Sprintf(`{"lastDesiredVersion":%d}`, n)) }

// TestBatcher_LatestReportOneEntry: a device's later reports supersede
// the one waiting, and what waits goes to raft as one entry, each
// report with the node that took it and the session that carried it.
func TestBatcher_LatestReportOneEntry(t *testing.T) {
	session := time.Date(2026, 12, 6, 21, 0, 0, 0, time.UTC)
	b, s := newBatcher(t, Config{FlushInterval: time.Hour, SessionStart: func(id string) (time.Time, bool) { return session, id == "d1" }})
	run(t, b)
	for i := range 3 {
		if err := b.SubmitReport("d1", doc(i)); err != nil {
			t.Fatal(err)
		}
	}
	_ = b.SubmitReport("d2", doc(7))
	if st := b.Stats(); st.Pending != 2 || st.Committed != 0 {
		t.Fatalf("before the flush: %+v", st)
	}
	b.Flush()
	testutil.WaitFor(t, "the reports committed", func() bool { return b.Stats().Committed == 2 })
	if st := b.Stats(); st.Batches != 1 || st.Pending != 0 {
		t.Fatalf("after the flush: %+v", st)
	}
	if r := s.report(t, "d1"); string(r.Document) != string(doc(2)) || r.Node != "n1" || !r.Session.Equal(session) {
		t.Fatalf("d1's stored report: %+v", r)
	}
	if r := s.report(t, "d2"); string(r.Document) != string(doc(7)) || !r.Session.IsZero() {
		t.Fatalf("d2's stored report: %+v", r)
	}
}

// TestBatcher_FullBatchFlushesAtOnce: MaxBatch waiting reports are
// committed without waiting for the interval, no entry holding more.
func TestBatcher_FullBatchFlushesAtOnce(t *testing.T) {
	b, s := newBatcher(t, Config{FlushInterval: time.Hour, MaxBatch: 3})
	run(t, b)
	for i := range 7 {
		_ = b.SubmitReport(fmt.Sprintf("d%d", i), doc(i))
	}
	testutil.WaitFor(t, "two full batches committed", func() bool { return b.Stats().Committed >= 6 })
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.entries {
		if len(e) > 3 {
			t.Fatalf("an entry of %d reports", len(e))
		}
	}
}

// TestBatcher_FailedBatchWaitsAgain: a batch raft does not take waits
// for the next flush, but a device's report that came meanwhile
// supersedes its own; the other reports of the batch are committed as
// they were.
func TestBatcher_FailedBatchWaitsAgain(t *testing.T) {
	b, s := newBatcher(t, Config{FlushInterval: time.Hour})
	run(t, b)
	s.setDown(true)
	_ = b.SubmitReport("d1", doc(1))
	_ = b.SubmitReport("d2", doc(2))
	b.Flush()
	testutil.WaitFor(t, "the batch refused", func() bool { return b.Stats().Failed == 2 })
	_ = b.SubmitReport("d1", doc(11))
	testutil.WaitFor(t, "the batch waiting again", func() bool { return b.Stats().Pending == 2 })
	s.setDown(false)
	b.Flush()
	testutil.WaitFor(t, "the reports committed", func() bool { return b.Stats().Committed == 2 })
	if d1, d2 := s.report(t, "d1"), s.report(t, "d2"); string(d1.Document) != string(doc(11)) || string(d2.Document) != string(doc(2)) {
		t.Fatalf("stored: d1 %s, d2 %s", d1.Document, d2.Document)
	}
}

// TestBatcher_RunFlushesOnStop: what waits when Run is stopped is
// committed before it returns.
func TestBatcher_RunFlushesOnStop(t *testing.T) {
	b, s := newBatcher(t, Config{FlushInterval: time.Hour})
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	_ = b.SubmitReport("d3", doc(3))
	stop()
	<-done
	if st := b.Stats(); st.Committed != 1 || string(s.report(t, "d3").Document) != string(doc(3)) {
		t.Fatalf("after the stop: %+v", st)
	}
}
