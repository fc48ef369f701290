package hub

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"appliance/routing"
)

// A queue holds one sink's messages of one route priority, in sequence
// order: one bucket of hub.db, and in memory a window of the messages not
// yet handed to the sink's consumer (a module's deliverer, or the upstream
// sender). Every committed message is on disk; memory holds a prefix of the
// undelivered ones (up to the hub's memory budget), so a sink that comes
// back after a long outage is fed from disk in batches while new messages
// wait on disk behind them, in order.
//
// Each queue has one consumer at a time. It takes entries (take), and for
// each one either acknowledges it (ack: delivered), drops it (expired), or
// gives it back when its sink went away before acknowledging (putBack).
type queue struct {
	name string // bucket name: q/<sink>/<priority>
	sink routing.Sink
	prio uint32
	h    *Hub

	// cmu is held by whoever takes entries (the consumer, the sweeper), so
	// that a take and the putBack that may follow it are not interleaved
	// with another's.
	cmu sync.Mutex

	mu sync.Mutex
	// mem[head:] are loaded entries not yet taken, in seq order.
	mem  []*entry
	head int
	// diskNext, when not 0, is the first seq that is on disk only: every
	// committed entry from it on must be read from disk, in order, before
	// any later one is delivered.
	diskNext uint64
	// last is the highest seq given to this queue (give).
	last uint64
	// visible is the highest seq of this queue applied to hub.db: a read
	// from disk finds every entry up to it that is still queued.
	visible uint64
	// kick wakes the consumer; set when one is attached.
	kick func()
}

// queueName is the bucket of a sink's queue at a priority.
func queueName(s routing.Sink, prio uint32) string {
	if s.Kind == routing.SinkUpstream {
		return fmt.Sprintf("%supstream/%d", queuePrefix, prio)
	}
	return fmt.Sprintf("%sinput/%s/%s/%d", queuePrefix, s.Module, s.Input, prio)
}

// parseQueueName is queueName's inverse, for the buckets found at open.
func parseQueueName(name string) (routing.Sink, uint32, bool) {
	rest, ok := strings.CutPrefix(name, queuePrefix)
	if !ok {
		return routing.Sink{}, 0, false
	}
	parts := strings.Split(rest, "/")
	var prio uint32
	if _, err := fmt.Sscanf(parts[len(parts)-1], "%d", &prio); err != nil {
		return routing.Sink{}, 0, false
	}
	switch {
	case len(parts) == 2 && parts[0] == "upstream":
		return routing.Sink{Kind: routing.SinkUpstream}, prio, true
	case len(parts) == 4 && parts[0] == "input" && parts[1] != "" && parts[2] != "":
		return routing.Sink{Kind: routing.SinkModuleInput, Module: parts[1], Input: parts[2]}, prio, true
	}
	return routing.Sink{}, 0, false
}

// memory is the hub's budget for queued messages held in memory.
type memory struct {
	used atomic.Int64
	max  int64
}

func (m *memory) tryAdd(n int) bool {
	if m.used.Add(int64(n)) <= m.max {
		return true
	}
	m.used.Add(-int64(n))
	return false
}

func (m *memory) add(n int) { m.used.Add(int64(n)) }
func (m *memory) sub(n int) { m.used.Add(-int64(n)) }

// give takes a new entry, in seq order: into memory if nothing of this
// queue waits on disk and the budget allows, else it is read from hub.db
// once applied there. Module inputs get their entries when they are
// appended, $upstream once they are in the log (entry.early).
func (q *queue) give(e *entry) {
	q.mu.Lock()
	q.last = e.seq
	switch {
	case q.diskNext == 0 && q.h.mem.tryAdd(len(e.val)):
		q.mem = append(q.mem, e)
	case q.diskNext == 0:
		q.diskNext = e.seq
	}
	kick := q.kick
	q.mu.Unlock()
	if kick != nil {
		kick()
	}
}

// applied learns that the applier wrote the queue's entries up to seq to
// hub.db: a consumer reading from disk may read them now.
func (q *queue) applied(seq uint64) {
	q.mu.Lock()
	q.visible = max(q.visible, seq)
	var kick func()
	if q.diskNext != 0 {
		kick = q.kick
	}
	q.mu.Unlock()
	if kick != nil {
		kick()
	}
}

// failed takes back an entry given early whose log write failed (its
// sender is told so, and sends it again): it is not delivered if it is
// still waiting in memory. (After a failed write the log takes nothing
// more until the agent restarts, so nothing behind it waits for it.)
func (q *queue) failed(e *entry) { q.forget(e.seq) }

// loadBatch bounds one read from disk.
const (
	loadBatch      = 512
	loadBatchBytes = 4 << 20
)

// take returns the next entry to deliver, reading from disk when the
// messages in memory have run out, or nil when the queue has nothing to
// deliver now (the next give, or the applier writing what is to be read
// from disk, kicks the consumer). Only the queue's consumer calls it.
func (q *queue) take() *entry {
	for {
		q.mu.Lock()
		if q.head < len(q.mem) {
			e := q.mem[q.head]
			q.mem[q.head] = nil
			q.head++
			if q.head == len(q.mem) {
				q.mem, q.head = q.mem[:0], 0
			}
			q.mu.Unlock()
			return e
		}
		from, visible := q.diskNext, q.visible
		q.mu.Unlock()
		if from == 0 || from > visible {
			return nil // nothing on disk, or not in hub.db yet
		}
		loaded, last, err := q.h.store.read(q, from, loadBatch, loadBatchBytes)
		if err != nil {
			q.h.log.Error("read hub queue from disk", "queue", q.name, "error", err)
			return nil
		}
		q.mu.Lock()
		if q.diskNext == from {
			for _, e := range loaded {
				q.h.mem.add(len(e.val))
				q.mem = append(q.mem, e)
			}
			switch {
			case last == 0 && visible >= q.last:
				q.diskNext = 0 // nothing left on disk: later entries go to memory again
			case last == 0:
				q.diskNext = visible + 1 // what was visible is gone (dropped, failed)
			case last >= q.last:
				q.diskNext = 0 // caught up
			default:
				q.diskNext = last + 1
			}
		}
		q.mu.Unlock()
	}
}

// pending tells whether the queue has something to deliver.
func (q *queue) pending() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.head < len(q.mem) || q.diskNext != 0
}

// putBack returns entries taken but not acknowledged (their sink went
// away) to the front of the queue, in seq order, to be delivered again.
func (q *queue) putBack(es []*entry) {
	if len(es) == 0 {
		return
	}
	q.mu.Lock()
	rest := q.mem[q.head:]
	mem := make([]*entry, 0, len(es)+len(rest))
	mem = append(mem, es...)
	q.mem, q.head = append(mem, rest...), 0
	q.mu.Unlock()
}

// ack removes a delivered entry.
func (q *queue) ack(e *entry) {
	q.h.mem.sub(len(e.val))
	q.h.store.remove(e)
}

// expire removes an entry that will not be delivered: its time to live
// has passed.
func (q *queue) expire(e *entry) {
	q.h.stats.expired.Add(1)
	q.ack(e)
}

// forget removes an entry the store dropped to stay under its size cap, if
// it is still waiting in memory.
func (q *queue) forget(seq uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := q.head; i < len(q.mem); i++ {
		if e := q.mem[i]; e.seq == seq {
			q.h.mem.sub(len(e.val))
			q.mem = append(q.mem[:i], q.mem[i+1:]...)
			return
		}
	}
}

// setConsumer attaches (kick non-nil) or detaches the queue's consumer.
func (q *queue) setConsumer(kick func()) {
	q.mu.Lock()
	q.kick = kick
	q.mu.Unlock()
}
