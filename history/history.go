// Package history keeps, on each controller node, the record of every
// deployment change and every device's assignment change: derived from the
// raft log as it is applied, stored in the node's own history.db as
// fleet.HistoryEvent, never an input to a decision.
package history

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/internal/boltcheck"
)

// Defaults of the history's retention.
const (
	DefaultRetention = 30 * 24 * time.Hour
	DefaultPerKey    = 1000
	// maxQueuedEvents bounds memory when a re-target of a huge fleet
	// produces more assignment events than the writer keeps up with.
	maxQueuedEvents = 1_000_000
	// historyDelay is how long the writer lets events gather after the
	// first of a batch: a change that moves a whole fleet queues an event
	// per device at once, and the node is then busy sending each of them
	// its new desired document; the history is written after that, in one
	// transaction, instead of competing with it for the CPU.
	historyDelay = time.Second
	// StopBudget bounds the writing of what is queued when the node stops:
	// after a million-device import up to maxQueuedEvents wait, and
	// writing them all took over 30 s, long past what a service manager
	// gives a stopping process. What does not fit is dropped, counted and
	// logged: the history is a record for people; the fleet state is not
	// in it.
	StopBudget = 5 * time.Second
	// stopChunk events are written per transaction when stopping: short
	// transactions, so that the budget is checked often.
	stopChunk = 10_000
)

var (
	bucketDeploymentHistory = []byte("deployments")
	bucketDeviceHistory     = []byte("devices")
)

// History keeps, on each node, the events of every deployment (created,
// updated, deleted: who, when, what) and every assignment change of every
// device. Both are derived from the raft log, which every node applies in
// the same order, so every node records the same events; the file is the
// node's own (history.db), not replicated, and written asynchronously
// without fsync: it is a record for people, never an input to a decision.
// A node that installs a snapshot has no events for what the snapshot
// covered.
type History struct {
	db        *bolt.DB
	logger    *slog.Logger
	retention time.Duration
	perKey    int

	mu      sync.Mutex
	queue   []Item
	queued  int // events in queue
	kick    chan struct{}
	dropped atomic.Uint64

	// writeMu serialises writers (the run loop and flush at shutdown).
	// counts holds, per bucket, the number of events stored for each
	// subject the writer has touched, so that keeping a subject within
	// perKey costs a look at its oldest events, not a walk over all of
	// them; a subject's count is taken from the file the first time.
	writeMu sync.Mutex
	counts  [2]map[string]int // [0] devices, [1] deployments

	// stopBy is when writing must end once the node stops (unix ns; 0
	// until then): one budget for the whole stop, however many writes
	// it takes (the run loop's, then the node's after raft stopped).
	stopBy atomic.Int64
}

// Item is what the apply path hands the writer: one deployment's event,
// or every assignment change one raft entry caused, kept as the evaluator
// returned them. A change that re-targets the whole fleet thus costs the
// apply path one item, not an event (and its text) per device; the writer
// expands it.
type Item struct {
	Deployment string             // a deployment's event: the deployment
	Device     string             // a device's own event (not an assignment): the device
	Event      fleet.HistoryEvent // that event; for assignments their Time and Index
	Cause      string             // assignments: why the devices moved, in words
	Moves      []evaluator.Change
}

func (q Item) events() int {
	if q.Deployment != "" || q.Device != "" {
		return 1
	}
	return len(q.Moves)
}

// deviceEventSeq orders a device's own events (not derived from the log:
// an operator's action relayed to the device, recorded at the index the
// node had applied then) after the assignments of the same index, and
// apart from each other, by their time: the same event recorded by
// several nodes has the same key on each.
func deviceEventSeq(t time.Time) uint32 { return 1<<31 | uint32(t.UnixMilli()&(1<<31-1)) }

// Open opens (or creates) the history file; retention and perKey bound
// what it keeps (zero: the defaults). Every page is read once under a
// guard first (a damaged page would make bbolt panic, or fault, while it
// rebuilds the free list, on a goroutine of its own). A damaged file is
// refused, naming it; but when the machine went down while the node ran
// (torn is then expected of a file written without fsync) it is set
// aside as history.db.damaged and a new history starts.
func Open(path string, machineDown bool, retention time.Duration, perKey int, logger *slog.Logger) (*History, error) {
	damaged := func(err error) error {
		return fmt.Errorf("%w; this node will not start on it. To recover: move it aside (mv %s %s.damaged): the history is a record of changes, the fleet state is not in it", err, path, path)
	}
	if err := checkHistoryFile(path); err != nil {
		if !errors.Is(err, boltcheck.ErrDamaged) {
			return nil, fmt.Errorf("open history %s: %w", path, err)
		}
		if !machineDown {
			return nil, damaged(err)
		}
		if err := os.Rename(path, path+".damaged"); err != nil {
			return nil, fmt.Errorf("set aside the damaged history %s: %w", path, err)
		}
		logger.Warn("the machine went down while the node ran and left the history torn: it was set aside and a new one started",
			"file", path, "set_aside_as", path+".damaged", "err", err)
	}
	// No fsync, and no freelist written at each commit (bbolt rebuilds it
	// when it opens the file): the history is a record, not state.
	db, err := boltcheck.Open(path, &bolt.Options{NoSync: true, NoFreelistSync: true, Timeout: 5 * time.Second})
	if err != nil {
		if errors.Is(err, boltcheck.ErrDamaged) {
			return nil, damaged(err)
		}
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
		retention = DefaultRetention
	}
	if perKey <= 0 {
		perKey = DefaultPerKey
	}
	return &History{db: db, logger: logger, retention: retention, perKey: perKey, kick: make(chan struct{}, 1)}, nil
}

// checkHistoryFile reads a history file that exists (boltcheck): damage
// wraps boltcheck.ErrDamaged. bbolt falls back without a word to the older
// meta page when the newer is damaged, which would serve the history as it
// was a write earlier: that is damage too.
func checkHistoryFile(path string) error {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Size() == 0 {
		return fmt.Errorf("%s: %w: the file is empty", path, boltcheck.ErrDamaged)
	}
	if lost, err := boltcheck.NewestMetaDamaged(path); err != nil {
		return err
	} else if lost {
		return fmt.Errorf("%s: %w: its newest meta page is damaged", path, boltcheck.ErrDamaged)
	}
	return boltcheck.Verify(path, nil)
}

// Add queues events; it never blocks the apply path.
func (h *History) Add(items ...Item) {
	if h == nil || len(items) == 0 {
		return
	}
	h.mu.Lock()
	for _, q := range items {
		room := max(maxQueuedEvents-h.queued, 0)
		if n := q.events(); n > room {
			h.dropped.Add(uint64(n - room))
			if q.Deployment != "" || q.Device != "" || room == 0 {
				continue
			}
			q.Moves = q.Moves[:room]
		}
		h.queue = append(h.queue, q)
		h.queued += q.events()
	}
	h.mu.Unlock()
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Run writes queued events, historyDelay after the first of each batch,
// until ctx ends, then writes what is left within StopBudget.
func (h *History) Run(ctx context.Context) {
	wait := time.NewTimer(historyDelay)
	wait.Stop()
	for {
		select {
		case <-ctx.Done():
			h.FlushWithin(StopBudget)
			return
		case <-h.kick:
		}
		wait.Reset(historyDelay)
		select {
		case <-ctx.Done():
			h.FlushWithin(StopBudget)
			return
		case <-wait.C:
		}
		h.write(ctx, true, time.Time{})
	}
}

// Flush writes every queued event now.
func (h *History) Flush() { h.write(context.Background(), false, time.Time{}) }

// FlushWithin writes queued events now, until budget after the first
// call has passed (one transaction more at most), then drops the rest:
// counted in Dropped and logged. Every later call shares the first one's
// deadline: it is for the node's stop.
func (h *History) FlushWithin(budget time.Duration) {
	h.write(context.Background(), false, h.stopDeadline(budget))
}

// stopDeadline is when the stop's writing must end, set by the first call.
func (h *History) stopDeadline(budget time.Duration) time.Time {
	h.stopBy.CompareAndSwap(0, time.Now().Add(budget).UnixNano())
	return time.Unix(0, h.stopBy.Load())
}

// Dropped is how many events were never written: over maxQueuedEvents
// while the writer fell behind, or left when a stop's budget ran out.
func (h *History) Dropped() uint64 { return h.dropped.Load() }

// historyChunk events are written per transaction when pacing.
const historyChunk = 1000

// write writes the queued events in key order (neighbouring keys share
// bbolt pages), historyChunk per transaction. Paced, it rests twice as
// long as each transaction took before the next one, so that writing a
// fleet's worth of events takes at most about a third of a CPU and leaves
// the rest to the node's foreground work (delivering desired documents,
// the API); the events are a record for people and can wait. When ctx
// ends (the node stops) it writes the rest unpaced within StopBudget. A
// non-zero deadline drops what is left once it has passed.
func (h *History) write(ctx context.Context, paced bool, deadline time.Time) {
	h.writeMu.Lock()
	defer h.writeMu.Unlock()
	h.mu.Lock()
	batch, total := h.queue, h.queued
	h.queue, h.queued = nil, 0
	h.mu.Unlock()
	if total == 0 {
		return
	}
	recs := make([]historyRecord, 0, total)
	for _, q := range batch {
		if q.Deployment != "" {
			recs = append(recs, historyRecord{deployment: true, key: q.Deployment, ev: q.Event, seq: uint32(len(recs))})
			continue
		}
		if q.Device != "" {
			recs = append(recs, historyRecord{key: q.Device, ev: q.Event, seq: deviceEventSeq(q.Event.Time)})
			continue
		}
		for _, m := range q.Moves {
			ev := q.Event
			ev.Kind, ev.Deployment, ev.From = "assigned", m.To, m.From
			ev.What = "applied deployment " + orNone(m.From) + " → " + orNone(m.To) + " (" + q.Cause + ")"
			switch {
			case m.Layer != "":
				ev.Kind, ev.Layer = "layer "+m.LayerOp, m.Layer
				ev.What = "layered deployment " + m.Layer + " " + layerWords[m.LayerOp] + " on " + orNone(m.To) + " (" + q.Cause + ")"
			case m.From == "" && m.To == "":
				ev.Kind, ev.What = "reset", q.Cause
			}
			recs = append(recs, historyRecord{key: m.DeviceID, ev: ev, seq: uint32(len(recs))})
		}
	}
	slices.SortFunc(recs, func(a, b historyRecord) int {
		if a.deployment != b.deployment {
			if a.deployment {
				return 1
			}
			return -1
		}
		if c := strings.Compare(a.key, b.key); c != 0 {
			return c
		}
		if c := cmp.Compare(a.ev.Index, b.ev.Index); c != 0 {
			return c
		}
		return cmp.Compare(a.seq, b.seq)
	})
	for len(recs) > 0 {
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			h.dropped.Add(uint64(len(recs)))
			h.logger.Warn("history: events not written, the node stopped before they were (the fleet state is not affected)",
				"events", len(recs))
			return
		}
		n := len(recs)
		switch {
		case paced:
			n = min(n, historyChunk)
		case !deadline.IsZero():
			n = min(n, stopChunk)
		}
		start := time.Now()
		if err := h.writeRecords(recs[:n]); err != nil {
			h.dropped.Add(uint64(n))
			h.logger.Warn("history not written", "events", n, "err", err)
		}
		recs = recs[n:]
		if len(recs) > 0 && paced {
			select {
			case <-ctx.Done():
				// The node stops: the rest unpaced, within the budget.
				paced, deadline = false, h.stopDeadline(StopBudget)
			case <-time.After(2 * time.Since(start)):
			}
		}
	}
}

type historyRecord struct {
	deployment bool // else a device's event
	key        string
	ev         fleet.HistoryEvent
	seq        uint32 // position in the batch: orders a subject's events of one raft index
}

// writeRecords writes sorted records in one transaction and applies the
// retention to each subject they touch.
func (h *History) writeRecords(recs []historyRecord) error {
	cutoff := time.Now().Add(-h.retention)
	counted := map[string]int{} // subjects' counts after this transaction, by bucket+key
	err := h.db.Update(func(tx *bolt.Tx) error {
		added := 0
		for i, r := range recs {
			b := tx.Bucket(bucketDeviceHistory)
			if r.deployment {
				b = tx.Bucket(bucketDeploymentHistory)
			}
			data, err := encodeEvent(r.ev)
			if err != nil {
				return err
			}
			if err := b.Put(historyKey(r.key, r.ev.Index, r.seq), data); err != nil {
				return err
			}
			added++
			// Once per subject: after its last record (they are sorted).
			if last := i == len(recs)-1 || recs[i+1].key != r.key || recs[i+1].deployment != r.deployment; last {
				n, err := h.prune(b, r.deployment, r.key, added, cutoff)
				if err != nil {
					return err
				}
				counted[countKey(r.deployment, r.key)] = n
				added = 0
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for k, n := range counted { // committed: the counts are true now
		m := h.countsOf(k[0] == 'p')
		if n == 0 {
			delete(m, k[1:])
		} else {
			m[k[1:]] = n
		}
	}
	return nil
}

func countKey(deployment bool, key string) string {
	if deployment {
		return "p" + key
	}
	return "d" + key
}

func (h *History) countsOf(deployment bool) map[string]int {
	i := 0
	if deployment {
		i = 1
	}
	if h.counts[i] == nil {
		h.counts[i] = map[string]int{}
	}
	return h.counts[i]
}

// prune keeps at most perKey events of a subject, none older than cutoff,
// after added new ones were put; it returns how many the subject keeps.
// Only the oldest events are looked at (events are in index order): the
// ones beyond perKey and the expired ones, then the first one kept.
func (h *History) prune(b *bolt.Bucket, deployment bool, key string, added int, cutoff time.Time) (int, error) {
	prefix := append([]byte(key), 0)
	c := b.Cursor()
	n, ok := h.countsOf(deployment)[key]
	if ok {
		n += added
	} else { // first time this subject is written since the node started
		n = 0
		for k, _ := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, _ = c.Next() {
			n++
		}
	}
	// The keys go first: a bbolt cursor skips an entry after a Delete.
	var drop [][]byte
	for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
		if n-len(drop) > h.perKey {
			drop = append(drop, bytes.Clone(k))
			continue
		}
		if t, ok := eventTime(v); ok && t.Before(cutoff) {
			drop = append(drop, bytes.Clone(k))
			continue
		}
		break
	}
	for _, k := range drop {
		if err := b.Delete(k); err != nil {
			return 0, err
		}
	}
	return n - len(drop), nil
}

// eventTime reads the time of a stored event. Events are written by
// json.Marshal of fleet.HistoryEvent, whose first field is the time: read it
// without decoding the rest (retention checks one event per subject per
// batch, and a batch can have a subject per device of the fleet).
func eventTime(v []byte) (time.Time, bool) {
	const prefix = `{"time":"`
	if rest, ok := bytes.CutPrefix(v, []byte(prefix)); ok {
		if end := bytes.IndexByte(rest, '"'); end > 0 {
			if t, err := time.Parse(time.RFC3339Nano, string(rest[:end])); err == nil {
				return t, true
			}
		}
	}
	ev, err := decodeEvent(v)
	if err != nil {
		return time.Time{}, false
	}
	return ev.Time, true
}

// Each stored event is its JSON followed by the CRC-32C of that JSON (4
// bytes, big-endian): bbolt does not checksum values, and a history that
// changed on disk must read as damaged, not as other events. An event
// written by an earlier release has no checksum (it ends with its JSON's
// closing brace) and reads as before. The checksum is tried first: one
// checksum in 256 itself ends with the byte of a closing brace, so the
// last byte alone cannot tell the two apart.
var historyCRC = crc32.MakeTable(crc32.Castagnoli)

func encodeEvent(ev fleet.HistoryEvent) ([]byte, error) {
	data, err := json.Marshal(ev)
	if err != nil {
		return nil, err
	}
	return binary.BigEndian.AppendUint32(data, crc32.Checksum(data, historyCRC)), nil
}

// errEventDamaged: a stored event does not match its checksum.
var errEventDamaged = errors.New("a stored history event does not match its checksum")

func decodeEvent(v []byte) (fleet.HistoryEvent, error) {
	var ev fleet.HistoryEvent
	data := v
	switch n := len(v); {
	case n > 4 && crc32.Checksum(v[:n-4], historyCRC) == binary.BigEndian.Uint32(v[n-4:]):
		data = v[:n-4]
	case n == 0 || v[n-1] != '}': // neither checksummed nor an earlier release's
		return ev, errEventDamaged
	}
	if err := json.Unmarshal(data, &ev); err != nil {
		return ev, fmt.Errorf("%w: %v", errEventDamaged, err)
	}
	return ev, nil
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

// Events returns a subject's events (a deployment's, else a device's),
// newest first, at most limit.
func (h *History) Events(deployment bool, subject string, limit int) ([]fleet.HistoryEvent, error) {
	out := []fleet.HistoryEvent{}
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
			ev, err := decodeEvent(v)
			if err != nil {
				return fmt.Errorf("%s: %w (key %q): the history file is damaged; stop the node and move it aside (the history is a record, the fleet state is not in it)", h.db.Path(), err, k)
			}
			out = append(out, ev)
		}
		return nil
	})
	return out, err
}

// Close closes the file; call Flush first to keep what is queued.
func (h *History) Close() error {
	if h == nil {
		return nil
	}
	return h.db.Close()
}

// RecentDeploymentEvents returns the latest events of all deployments,
// newest first (by raft index), at most limit. It reads at most limit
// events of each deployment, from its newest.
func (h *History) RecentDeploymentEvents(limit int) ([]fleet.RecentEvent, error) {
	out := []fleet.RecentEvent{}
	err := h.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketDeploymentHistory).Cursor()
		for k, _ := c.First(); k != nil; {
			subject, _, ok := bytes.Cut(k, []byte{0})
			if !ok {
				k, _ = c.Next()
				continue
			}
			subject = bytes.Clone(subject)
			prefix := append(bytes.Clone(subject), 0)
			// The subject's keys end before subject+1: walk back from there.
			next := append(bytes.Clone(subject), 1)
			kk, v := c.Seek(next)
			if kk == nil {
				kk, v = c.Last()
			} else {
				kk, v = c.Prev()
			}
			for n := 0; kk != nil && hasPrefix(kk, prefix) && n < limit; n++ {
				ev, err := decodeEvent(v)
				if err != nil {
					return fmt.Errorf("%s: history of %s: %w (key %q): the history file is damaged; stop the node and move it aside (the history is a record, the fleet state is not in it)", h.db.Path(), subject, err, kk)
				}
				out = append(out, fleet.RecentEvent{Subject: string(subject), HistoryEvent: ev})
				kk, v = c.Prev()
			}
			k, _ = c.Seek(next)
		}
		return nil
	})
	slices.SortStableFunc(out, func(a, b fleet.RecentEvent) int { return cmp.Compare(b.Index, a.Index) })
	if len(out) > limit {
		out = out[:limit]
	}
	return out, err
}

// layerWords say what a layer change did to a device's document.
var layerWords = map[string]string{
	evaluator.LayerAdded:   "merged",
	evaluator.LayerRemoved: "taken out",
	evaluator.LayerMoved:   "reordered",
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
