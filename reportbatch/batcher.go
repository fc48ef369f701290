// Package reportbatch owns the batching of the devices' reported
// documents before raft: the broker hands each report over without
// blocking (broker.ReportSink), and a Batcher commits what is waiting as
// one raftstore.PutReports entry every flush interval (100 ms by
// default), or sooner once MaxBatch reports (2,000) are waiting, so that
// 500 devices reporting at once cost one raft entry. Only a device's
// latest report waits: it supersedes the earlier ones. A batch raft does
// not take goes back in the queue, unless a newer report of its device
// came meanwhile; beyond maxPending waiting devices (raft stalled, no
// leader) a report is refused, and the broker counts it dropped: the
// device's next report carries the same information.
//
// It proposes through the function the node gives it, and asks the node
// when a device's session started (the report arrived on it).
package reportbatch

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"appliance/broker"
	"appliance/raftstore"
)

// ErrQueueFull: reports arrive faster than raft takes them; the device's
// next report will carry the same information.
var ErrQueueFull = errors.New("report queue full")

// maxPending bounds memory if raft stalls (no leader): beyond it new
// reports are refused and counted as dropped by the broker.
const maxPending = 200_000

// Defaults of Config.
const (
	DefaultFlushInterval = 100 * time.Millisecond
	DefaultMaxBatch      = 2000
)

// Config is what a Batcher works with.
type Config struct {
	// NodeID is the node the reports were received by.
	NodeID string
	// Propose proposes a command and waits until it is applied.
	Propose func(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error)
	// SessionStart says when a device's session with this node started
	// (false: it holds none); nil: never known.
	SessionStart func(deviceID string) (time.Time, bool)
	// FlushInterval is how often waiting reports are committed
	// (DefaultFlushInterval when zero); MaxBatch how many make a batch at
	// most, and flush at once (DefaultMaxBatch when zero).
	FlushInterval time.Duration
	MaxBatch      int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Batcher takes reported documents and commits them to raft in batches.
type Batcher struct {
	cfg Config

	mu      sync.Mutex
	pending map[string]raftstore.Report
	order   []string
	kick    chan struct{}

	committed, batches, failed atomic.Uint64
}

var _ broker.ReportSink = (*Batcher)(nil)

// New returns a Batcher; Run commits what it takes.
func New(cfg Config) *Batcher {
	if cfg.FlushInterval <= 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Batcher{cfg: cfg, pending: map[string]raftstore.Report{}, kick: make(chan struct{}, 1)}
}

// Stats are what a Batcher did since it started.
type Stats struct {
	// Committed reports, in Batches entries; Failed reports raft did not
	// take (each try counts: they wait for the next one).
	Committed, Batches, Failed uint64
	// Pending devices' reports wait for the next batch.
	Pending int
}

// Stats says what the Batcher did so far.
func (b *Batcher) Stats() Stats {
	b.mu.Lock()
	pending := len(b.order)
	b.mu.Unlock()
	return Stats{Committed: b.committed.Load(), Batches: b.batches.Load(), Failed: b.failed.Load(), Pending: pending}
}

// SubmitReport queues a report; it never blocks.
func (b *Batcher) SubmitReport(deviceID string, report []byte) error {
	rep := raftstore.Report{DeviceID: deviceID, Document: json.RawMessage(report), Time: time.Now().UTC(), Node: b.cfg.NodeID}
	// The report arrives on its session's connection, so the device's
	// current session here is the one that carried it.
	if b.cfg.SessionStart != nil {
		if since, ok := b.cfg.SessionStart(deviceID); ok {
			rep.Session = since.UTC()
		}
	}
	b.mu.Lock()
	if _, ok := b.pending[deviceID]; !ok {
		if len(b.order) >= maxPending {
			b.mu.Unlock()
			return ErrQueueFull
		}
		b.order = append(b.order, deviceID)
	}
	b.pending[deviceID] = rep
	full := len(b.order) >= b.cfg.MaxBatch
	b.mu.Unlock()
	if full {
		b.Flush()
	}
	return nil
}

// Flush asks Run to commit what waits now, without waiting for the
// interval.
func (b *Batcher) Flush() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// Run flushes until ctx ends, then flushes what is left once.
func (b *Batcher) Run(ctx context.Context) {
	t := time.NewTicker(b.cfg.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			b.flush(fctx)
			cancel()
			return
		case <-t.C:
		case <-b.kick:
		}
		b.flush(ctx)
	}
}

func (b *Batcher) take() []raftstore.Report {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := min(len(b.order), b.cfg.MaxBatch)
	if n == 0 {
		return nil
	}
	out := make([]raftstore.Report, 0, n)
	for _, id := range b.order[:n] {
		out = append(out, b.pending[id])
		delete(b.pending, id)
	}
	b.order = append(b.order[:0:0], b.order[n:]...)
	return out
}

// requeue puts reports back unless a newer one arrived meanwhile.
func (b *Batcher) requeue(reports []raftstore.Report) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range reports {
		if _, newer := b.pending[r.DeviceID]; newer {
			continue
		}
		b.pending[r.DeviceID] = r
		b.order = append(b.order, r.DeviceID)
	}
}

func (b *Batcher) flush(ctx context.Context) {
	for {
		batch := b.take()
		if len(batch) == 0 {
			return
		}
		if _, err := b.cfg.Propose(ctx, raftstore.PutReports{Reports: batch}); err != nil {
			b.failed.Add(uint64(len(batch)))
			b.cfg.Logger.Warn("reports not committed; will retry", "reports", len(batch), "err", err)
			b.requeue(batch)
			return
		}
		b.batches.Add(1)
		b.committed.Add(uint64(len(batch)))
	}
}
