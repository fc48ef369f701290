package hub

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"appliance/fleet"
)

// The hub's state file, <DataDir>/hub.db (bbolt):
//
//	meta/nextSeq            the next message sequence number (never reused)
//	q/<sink>/<priority>     one bucket per queue: seq (8 bytes, big endian) →
//	                        expiry (8 bytes, Unix nanoseconds, 0: none) +
//	                        the message (fleet.AppendUpstreamFields)
//	twins/<module>          a module's twin (twinState, JSON)
//	sessions/<module>       a module's persistent subscriptions (JSON)
//
// Every write goes through one writer goroutine, which commits everything
// waiting in one transaction (group commit, fsynced): a message is on disk
// before the module that sent it is acknowledged, and a thousand messages
// arriving together cost one commit.
var (
	bucketMeta     = []byte("meta")
	bucketTwins    = []byte("twins")
	bucketSessions = []byte("sessions")
	keyNextSeq     = []byte("nextSeq")
	queuePrefix    = "q/"
)

// deleteDelay coalesces acknowledgements: a delete-only commit waits this
// long for more (a lost delete only means a message delivered again).
const deleteDelay = 20 * time.Millisecond

// entry is one queued message in one queue.
type entry struct {
	q       *queue
	seq     uint64
	expires int64  // Unix nanoseconds; 0: never
	val     []byte // as stored: expiry + fields
	msg     *fleet.UpstreamMessage
}

func (e *entry) expired(now int64) bool { return e.expires != 0 && now >= e.expires }

// encodeEntry is the stored value of a message.
func encodeEntry(expires int64, m *fleet.UpstreamMessage) []byte {
	val := make([]byte, 8, 8+64+len(m.Body))
	binary.BigEndian.PutUint64(val, uint64(expires))
	return fleet.AppendUpstreamFields(val, m)
}

func decodeEntry(q *queue, seq uint64, val []byte) (*entry, error) {
	if len(val) < 8 {
		return nil, errors.New("value shorter than its expiry")
	}
	m, err := fleet.DecodeUpstreamFields(val[8:])
	if err != nil {
		return nil, err
	}
	return &entry{q: q, seq: seq, expires: int64(binary.BigEndian.Uint64(val)), val: val, msg: &m}, nil
}

func seqKey(seq uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return k[:]
}

// store is hub.db and its writer.
type store struct {
	db  *bolt.DB
	log *slog.Logger
	max int64 // bytes of queued messages before the oldest are dropped

	// onDropped learns of entries the writer removed to stay under max,
	// after the commit; lookup finds the queue of a bucket. Both are set by
	// the hub before start.
	onDropped func(q *queue, seq uint64)
	lookup    func(bucket string) *queue

	mu      sync.Mutex
	nextSeq uint64
	appends []*entry
	waiters []func(error) // of the appends, in order
	deletes []*entry
	ops     []storeOp
	closed  bool

	wake chan struct{}
	done chan struct{}

	storedBytes atomic.Int64
	storedCount atomic.Int64
	dropped     atomic.Uint64
	corrupt     atomic.Uint64
	commits     atomic.Uint64
}

// storeOp is a write of anything but queues (twins, sessions).
type storeOp struct {
	fn   func(*bolt.Tx) error
	done func(error)
}

// ErrStoreClosed: the hub is shutting down.
var ErrStoreClosed = errors.New("hub store closed")

// openStore opens hub.db and returns the queues it holds (by bucket name,
// with their sizes and sequence ranges); the caller builds its queues from
// them before start.
func openStore(dir string, max int64, log *slog.Logger) (*store, map[string]queueInfo, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	path := filepath.Join(dir, "hub.db")
	// The freelist is not written at each commit (bbolt rebuilds it when it
	// opens the file) and the file is mapped 256 MiB at once: fewer pages
	// per commit, and no remap stalling commits while the queues grow.
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, FreelistType: bolt.FreelistMapType, NoFreelistSync: true, InitialMmapSize: 256 << 20})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, nil, fmt.Errorf("%s is in use by another agent", path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open hub store %s: %w", path, err)
	}
	s := &store{db: db, log: log, max: max, wake: make(chan struct{}, 1), done: make(chan struct{})}
	queues := map[string]queueInfo{}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketTwins, bucketSessions} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		if v := tx.Bucket(bucketMeta).Get(keyNextSeq); len(v) == 8 {
			s.nextSeq = binary.BigEndian.Uint64(v)
		}
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			n := string(name)
			if len(n) <= len(queuePrefix) || n[:len(queuePrefix)] != queuePrefix {
				return nil
			}
			var qi queueInfo
			err := b.ForEach(func(k, v []byte) error {
				if len(k) != 8 {
					return fmt.Errorf("queue %s: key of %d bytes", n, len(k))
				}
				seq := binary.BigEndian.Uint64(k)
				if qi.count == 0 {
					qi.first = seq
				}
				qi.last = seq
				qi.count++
				qi.bytes += int64(len(v))
				return nil
			})
			if err != nil {
				return err
			}
			queues[n] = qi
			if qi.last >= s.nextSeq {
				s.nextSeq = qi.last + 1
			}
			s.storedBytes.Add(qi.bytes)
			s.storedCount.Add(qi.count)
			return nil
		})
	})
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("read hub store %s (it may be corrupt: move it away to start with empty queues): %w", path, err)
	}
	if s.nextSeq == 0 {
		s.nextSeq = 1
	}
	return s, queues, nil
}

// queueInfo is what the store holds of a queue at open.
type queueInfo struct {
	first, last uint64
	count       int64
	bytes       int64
}

// start runs the writer.
func (s *store) start() { go s.writer() }

// close stops the writer after it has committed what is waiting, and
// closes the file.
func (s *store) close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.signal()
	<-s.done
	return s.db.Close()
}

func (s *store) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// append queues entries (their q, expires, val and msg set), assigning
// their sequence numbers in order; done is called once they are committed
// (nil) or not (an error), after each entry was handed to its queue.
func (s *store) append(entries []*entry, done func(error)) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		done(ErrStoreClosed)
		return
	}
	for _, e := range entries {
		e.seq = s.nextSeq
		s.nextSeq++
	}
	s.appends = append(s.appends, entries...)
	s.waiters = append(s.waiters, done)
	s.mu.Unlock()
	s.signal()
}

// remove deletes an entry (acknowledged, expired): committed with the next
// batch, or within deleteDelay.
func (s *store) remove(e *entry) {
	s.mu.Lock()
	s.deletes = append(s.deletes, e)
	first := len(s.deletes) == 1 && len(s.appends) == 0 && len(s.ops) == 0
	many := len(s.deletes) >= 4096
	s.mu.Unlock()
	switch {
	case many:
		s.signal()
	case first:
		time.AfterFunc(deleteDelay, s.signal)
	}
}

// do runs fn in the next write transaction; done learns the outcome.
func (s *store) do(fn func(*bolt.Tx) error, done func(error)) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		done(ErrStoreClosed)
		return
	}
	s.ops = append(s.ops, storeOp{fn: fn, done: done})
	s.mu.Unlock()
	s.signal()
}

// writer commits what is waiting, one transaction at a time.
func (s *store) writer() {
	defer close(s.done)
	for {
		<-s.wake
		s.mu.Lock()
		apps, waiters, dels, ops, closed := s.appends, s.waiters, s.deletes, s.ops, s.closed
		s.appends, s.waiters, s.deletes, s.ops = nil, nil, nil, nil
		next := s.nextSeq
		s.mu.Unlock()
		if len(apps) > 0 || len(dels) > 0 || len(ops) > 0 {
			s.commit(apps, waiters, dels, ops, next)
		}
		if closed {
			s.mu.Lock()
			rest := len(s.appends) + len(s.deletes) + len(s.ops)
			s.mu.Unlock()
			if rest == 0 {
				return
			}
			s.signal()
		}
	}
}

func (s *store) commit(apps []*entry, waiters []func(error), dels []*entry, ops []storeOp, next uint64) {
	var added, removed, addedN, removedN int64
	var dropped []*entry
	opErrs := make([]error, len(ops))
	err := s.db.Update(func(tx *bolt.Tx) error {
		added, removed, addedN, removedN, dropped = 0, 0, 0, 0, nil
		for _, e := range apps {
			b, err := tx.CreateBucketIfNotExists([]byte(e.q.name))
			if err != nil {
				return err
			}
			if err := b.Put(seqKey(e.seq), e.val); err != nil {
				return err
			}
			added += int64(len(e.val))
			addedN++
		}
		if err := tx.Bucket(bucketMeta).Put(keyNextSeq, seqKey(next)); err != nil {
			return err
		}
		for _, e := range dels {
			b := tx.Bucket([]byte(e.q.name))
			if b == nil {
				continue
			}
			k := seqKey(e.seq)
			if v := b.Get(k); v != nil {
				removed += int64(len(v))
				removedN++
				if err := b.Delete(k); err != nil {
					return err
				}
			}
		}
		for i, op := range ops {
			opErrs[i] = op.fn(tx)
		}
		// Over the cap: drop the oldest messages of any queue.
		for over := s.storedBytes.Load() + added - removed - s.max; over > 0; {
			e, size, err := s.dropOldest(tx)
			if err != nil {
				return err
			}
			if e == nil {
				break
			}
			dropped = append(dropped, e)
			removed += size
			removedN++
			over -= size
		}
		return nil
	})
	if err == nil {
		s.commits.Add(1)
		s.storedBytes.Add(added - removed)
		s.storedCount.Add(addedN - removedN)
	} else {
		s.log.Error("hub store commit failed; messages refused", "error", err, "messages", len(apps))
		for i := range opErrs {
			opErrs[i] = err
		}
	}
	if err == nil {
		for _, e := range apps {
			e.q.committed(e)
		}
		s.dropped.Add(uint64(len(dropped)))
		if len(dropped) > 0 {
			s.log.Warn("hub store full: oldest messages dropped", "dropped", len(dropped), "maxBytes", s.max)
		}
		for _, e := range dropped {
			if s.onDropped != nil {
				s.onDropped(e.q, e.seq)
			}
		}
	}
	for _, w := range waiters {
		w(err)
	}
	for i, op := range ops {
		if op.done != nil {
			op.done(opErrs[i])
		}
	}
}

var errNoQueue = errors.New("no queue for bucket")

// dropOldest deletes the message with the lowest sequence number of all
// queues, returning it (its queue and seq) and its size; nil if every queue
// is empty.
func (s *store) dropOldest(tx *bolt.Tx) (*entry, int64, error) {
	var (
		best     []byte
		bestSeq  uint64
		bestSize int
		found    bool
	)
	err := tx.ForEach(func(name []byte, b *bolt.Bucket) error {
		if len(name) <= len(queuePrefix) || string(name[:len(queuePrefix)]) != queuePrefix {
			return nil
		}
		k, v := b.Cursor().First()
		if k == nil {
			return nil
		}
		if seq := binary.BigEndian.Uint64(k); !found || seq < bestSeq {
			best, bestSeq, bestSize, found = append(best[:0], name...), seq, len(v), true
		}
		return nil
	})
	if err != nil || !found {
		return nil, 0, err
	}
	if err := tx.Bucket(best).Delete(seqKey(bestSeq)); err != nil {
		return nil, 0, err
	}
	q := s.queueByName(string(best))
	if q == nil {
		return nil, 0, fmt.Errorf("%w %s", errNoQueue, best)
	}
	return &entry{q: q, seq: bestSeq}, int64(bestSize), nil
}

func (s *store) queueByName(name string) *queue {
	if s.lookup == nil {
		return nil
	}
	return s.lookup(name)
}

// read returns up to max entries of q with seq ≥ from, at most maxBytes
// (at least one entry), in order. An entry that does not decode is never
// delivered: it is logged, deleted and counted in corrupt, and reading
// goes on past it. last is the last seq looked at (0 if none).
func (s *store) read(q *queue, from uint64, max int, maxBytes int) (out []*entry, last uint64, err error) {
	var corrupt []*entry
	err = s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(q.name))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		size := 0
		for k, v := c.Seek(seqKey(from)); k != nil && len(out) < max && (size < maxBytes || len(out) == 0); k, v = c.Next() {
			seq := binary.BigEndian.Uint64(k)
			last = seq
			e, err := decodeEntry(q, seq, append([]byte(nil), v...))
			if err != nil {
				s.log.Error("corrupt message in the hub store; deleted, never delivered", "queue", q.name, "seq", seq, "error", err)
				corrupt = append(corrupt, &entry{q: q, seq: seq})
				continue
			}
			out = append(out, e)
			size += len(v)
		}
		return nil
	})
	for _, e := range corrupt {
		s.corrupt.Add(1)
		s.remove(e)
	}
	return out, last, err
}
