package node

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"appliance/api"
)

// Defaults of the history's retention.
const (
	DefaultHistoryRetention = 30 * 24 * time.Hour
	DefaultHistoryPerKey    = 1000
	// maxQueuedEvents bounds memory when a re-target of a huge fleet
	// produces more assignment events than the writer keeps up with.
	maxQueuedEvents = 1_000_000
)

var (
	bucketDeploymentHistory = []byte("deployments")
	bucketDeviceHistory     = []byte("devices")
)

// history keeps, on each node, the events of every deployment (created,
// updated, deleted: who, when, what) and every assignment change of every
// device. Both are derived from the raft log, which every node applies in
// the same order, so every node records the same events; the file is the
// node's own (history.db), not replicated, and written asynchronously
// without fsync: it is a record for people, never an input to a decision.
// A node that installs a snapshot has no events for what the snapshot
// covered.
type history struct {
	db        *bolt.DB
	logger    *slog.Logger
	retention time.Duration
	perKey    int

	mu      sync.Mutex
	queue   []queuedEvent
	kick    chan struct{}
	dropped atomic.Uint64
}

type queuedEvent struct {
	deployment bool // else a device event
	key        string
	ev         api.HistoryEvent
}

func openHistory(path string, retention time.Duration, perKey int, logger *slog.Logger) (*history, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoSync: true, Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open history %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDeploymentHistory, bucketDeviceHistory} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init history %s: %w", path, err)
	}
	if retention <= 0 {
		retention = DefaultHistoryRetention
	}
	if perKey <= 0 {
		perKey = DefaultHistoryPerKey
	}
	return &history{db: db, logger: logger, retention: retention, perKey: perKey, kick: make(chan struct{}, 1)}, nil
}

// add queues events; it never blocks the apply path.
func (h *history) add(events ...queuedEvent) {
	if h == nil || len(events) == 0 {
		return
	}
	h.mu.Lock()
	room := maxQueuedEvents - len(h.queue)
	if room < len(events) {
		h.dropped.Add(uint64(len(events) - max(room, 0)))
		events = events[:max(room, 0)]
	}
	h.queue = append(h.queue, events...)
	h.mu.Unlock()
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// run writes queued events until ctx ends, then writes what is left.
func (h *history) run(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			h.flush()
			return
		case <-t.C:
		case <-h.kick:
		}
		h.flush()
	}
}

func (h *history) flush() {
	h.mu.Lock()
	batch := h.queue
	h.queue = nil
	h.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	cutoff := time.Now().Add(-h.retention)
	err := h.db.Update(func(tx *bolt.Tx) error {
		for i, q := range batch {
			b := tx.Bucket(bucketDeviceHistory)
			if q.deployment {
				b = tx.Bucket(bucketDeploymentHistory)
			}
			data, err := json.Marshal(q.ev)
			if err != nil {
				return err
			}
			if err := b.Put(historyKey(q.key, q.ev.Index, uint32(i)), data); err != nil {
				return err
			}
			if err := h.prune(b, q.key, cutoff); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		h.logger.Warn("history not written", "events", len(batch), "err", err)
	}
}

// prune keeps at most perKey events of a subject, none older than cutoff.
func (h *history) prune(b *bolt.Bucket, key string, cutoff time.Time) error {
	prefix := append([]byte(key), 0)
	c := b.Cursor()
	n := 0
	for k, _ := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, _ = c.Next() {
		n++
	}
	excess := n - h.perKey
	for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
		if excess > 0 {
			if err := c.Delete(); err != nil {
				return err
			}
			excess--
			continue
		}
		var ev api.HistoryEvent
		if json.Unmarshal(v, &ev) == nil && ev.Time.Before(cutoff) {
			if err := c.Delete(); err != nil {
				return err
			}
			continue
		}
		break
	}
	return nil
}

func hasPrefix(k, p []byte) bool { return len(k) >= len(p) && string(k[:len(p)]) == string(p) }

// historyKey orders a subject's events by raft index, then by position in
// the batch.
func historyKey(subject string, index uint64, seq uint32) []byte {
	k := make([]byte, 0, len(subject)+13)
	k = append(k, subject...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, index)
	return binary.BigEndian.AppendUint32(k, seq)
}

// events returns a subject's events, newest first, at most limit.
func (h *history) events(deployment bool, subject string, limit int) ([]api.HistoryEvent, error) {
	out := []api.HistoryEvent{}
	err := h.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDeviceHistory)
		if deployment {
			b = tx.Bucket(bucketDeploymentHistory)
		}
		prefix := append([]byte(subject), 0)
		c := b.Cursor()
		// Seek past the subject's last key, then walk back.
		end := append(append([]byte{}, prefix...), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
		k, v := c.Seek(end)
		if k == nil {
			k, v = c.Last()
		} else {
			k, v = c.Prev()
		}
		for ; k != nil && hasPrefix(k, prefix) && len(out) < limit; k, v = c.Prev() {
			var ev api.HistoryEvent
			if err := json.Unmarshal(v, &ev); err != nil {
				return err
			}
			out = append(out, ev)
		}
		return nil
	})
	return out, err
}

func (h *history) close() error {
	if h == nil {
		return nil
	}
	return h.db.Close()
}
