package node

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"appliance/broker"
	"appliance/raftstore"
)

// ErrReportQueueFull: reports arrive faster than raft takes them; the
// device's next report will carry the same information.
var ErrReportQueueFull = errors.New("report queue full")

// reportBatcher takes reported documents from the broker without blocking
// and commits them to raft in batches: every FlushInterval, or sooner when
// MaxBatch reports are waiting. Only the latest report of a device in a
// batch is kept: it supersedes the earlier ones.
type reportBatcher struct {
	node          *Node
	flushInterval time.Duration
	maxBatch      int

	mu      sync.Mutex
	pending map[string]raftstore.Report
	order   []string
	kick    chan struct{}

	committed, batches, failed atomic.Uint64
}

var _ broker.ReportSink = (*reportBatcher)(nil)

// maxPendingReports bounds memory if raft stalls (no leader): beyond it new
// reports are refused and counted as dropped by the broker.
const maxPendingReports = 200_000

func newReportBatcher(n *Node, interval time.Duration, maxBatch int) *reportBatcher {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	if maxBatch <= 0 {
		maxBatch = 2000
	}
	return &reportBatcher{node: n, flushInterval: interval, maxBatch: maxBatch,
		pending: map[string]raftstore.Report{}, kick: make(chan struct{}, 1)}
}

// SubmitReport queues a report; it never blocks.
func (b *reportBatcher) SubmitReport(deviceID string, report []byte) error {
	rep := raftstore.Report{DeviceID: deviceID, Document: json.RawMessage(report), Time: time.Now().UTC(), Node: b.node.cfg.NodeID}
	// The report arrives on its session's connection, so the device's
	// current session here is the one that carried it.
	if b.node.broker != nil {
		if c, ok := b.node.broker.Connection(deviceID); ok {
			rep.Session = c.ConnectedSince.UTC()
		}
	}
	b.mu.Lock()
	if _, ok := b.pending[deviceID]; !ok {
		if len(b.order) >= maxPendingReports {
			b.mu.Unlock()
			return ErrReportQueueFull
		}
		b.order = append(b.order, deviceID)
	}
	b.pending[deviceID] = rep
	full := len(b.order) >= b.maxBatch
	b.mu.Unlock()
	if full {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
	return nil
}

// run flushes until ctx ends, then flushes what is left once.
func (b *reportBatcher) run(ctx context.Context) {
	t := time.NewTicker(b.flushInterval)
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

func (b *reportBatcher) take() []raftstore.Report {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := min(len(b.order), b.maxBatch)
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
func (b *reportBatcher) requeue(reports []raftstore.Report) {
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

func (b *reportBatcher) flush(ctx context.Context) {
	for {
		batch := b.take()
		if len(batch) == 0 {
			return
		}
		if _, err := b.node.store.Apply(ctx, raftstore.PutReports{Reports: batch}); err != nil {
			b.failed.Add(uint64(len(batch)))
			b.node.logger.Warn("reports not committed; will retry", "reports", len(batch), "err", err)
			b.requeue(batch)
			return
		}
		b.batches.Add(1)
		b.committed.Add(uint64(len(batch)))
	}
}
