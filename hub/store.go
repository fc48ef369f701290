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
	"appliance/routing"
)

// The hub's state: the write-ahead log (wal.go), which a message is in
// before the module that sent it is acknowledged, and <DataDir>/hub.db
// (bbolt), brought up to date from the log in the background:
//
//	meta/nextSeq            the next message sequence number (never reused)
//	meta/walApplied         the highest seq of the log applied to hub.db
//	q/<sink>/<priority>     one bucket per queue: seq (8 bytes, big endian) →
//	                        expiry (8 bytes, Unix nanoseconds, 0: none) +
//	                        the message (fleet.AppendUpstreamFields)
//	twins/<module>          a module's twin (twinState, JSON)
//	sessions/<module>       a module's persistent subscriptions (JSON)
//
// Two goroutines write. The log writer takes every message waiting and
// writes it to the log with one fdatasync (group commit): then its sender
// is acknowledged. The applier takes every message the log holds that
// hub.db does not, the deletes (acknowledged, expired messages) and the
// other writes (twins, sessions), and commits them in one bbolt
// transaction. A message acknowledged by its sink before the applier took
// it is never written to hub.db at all.
var (
	bucketMeta     = []byte("meta")
	bucketTwins    = []byte("twins")
	bucketSessions = []byte("sessions")
	keyNextSeq     = []byte("nextSeq")
	keyWALApplied  = []byte("walApplied")
	queuePrefix    = "q/"
)

// deleteDelay coalesces acknowledgements: a delete-only commit waits this
// long for more (a lost delete only means a message delivered again).
const deleteDelay = 20 * time.Millisecond

// applyInterval is the least time from the start of one hub.db
// transaction to the next, unless a twin or session write waits: what the
// log holds meanwhile is applied in one, and most messages a module or the
// controller acknowledges within it never reach hub.db at all.
const applyInterval = 50 * time.Millisecond

// maxUnapplied bounds the bytes in the log not yet applied to hub.db: the
// log writer waits past it, so that a slow disk slows the senders rather
// than filling memory.
const maxUnapplied = 64 << 20

// entry states, in order (store.mu).
const (
	entryLogging  = iota // waiting for, or in, a log write
	entryLogged          // in the log, waiting for the applier
	entryApplying        // in the applier's transaction
	entryApplied         // in hub.db
)

// entry is one queued message in one queue.
type entry struct {
	q       *queue
	seq     uint64
	expires int64  // Unix nanoseconds; 0: never
	val     []byte // as stored: expiry + fields
	msg     *fleet.UpstreamMessage

	// state and removed are the store's (store.mu): removed is set when
	// the entry is acknowledged before the applier took it, which then
	// does not write it.
	state   uint8
	removed bool
}

func (e *entry) expired(now int64) bool { return e.expires != 0 && now >= e.expires }

// early tells whether the entry is handed to its queue when it is
// appended, before it is in the log: a module input, whose module may get
// it while the log write runs (a crash before the write completes means
// the sender, not acknowledged, sends it again: the module may see it
// twice, which QoS 1 allows). $upstream entries wait for the log: the
// controller tells a device's messages apart by sequence number, and a
// number is given again after a crash unless it reached the log.
func (e *entry) early() bool { return e.q.sink.Kind != routing.SinkUpstream }

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
	return &entry{q: q, seq: seq, expires: int64(binary.BigEndian.Uint64(val)), val: val, msg: &m, state: entryApplied}, nil
}

func seqKey(seq uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return k[:]
}

// store is hub.db, the write-ahead log and their writers.
type store struct {
	db  *bolt.DB
	wal *wal
	log *slog.Logger
	max int64 // bytes of queued messages before the oldest are dropped

	// onDropped learns of entries the applier removed to stay under max,
	// after the commit; lookup finds the queue of a bucket. Both are set
	// by the hub before start.
	onDropped func(q *queue, seq uint64)
	lookup    func(bucket string) *queue

	mu        sync.Mutex
	nextSeq   uint64
	appends   [][]*entry    // messages waiting for the log writer
	waiters   []func(error) // of the appends, in order
	logged    []*entry      // in the log, waiting for the applier
	unapplied int           // bytes of logged
	deletes   []*entry
	ops       []storeOp
	closed    bool
	logDone   bool // the log writer has ended

	logWake   chan struct{}
	applyWake chan struct{}
	opWake    chan struct{} // a twin or session write waits: no applyInterval
	room      chan struct{} // the applier made room under maxUnapplied
	logEnded  chan struct{}
	done      chan struct{}

	storedBytes atomic.Int64
	storedCount atomic.Int64
	dropped     atomic.Uint64
	corrupt     atomic.Uint64
	commits     atomic.Uint64
	logWrites   atomic.Uint64
}

// storeOp is a write of anything but queues (twins, sessions).
type storeOp struct {
	fn   func(*bolt.Tx) error
	done func(error)
}

// ErrStoreClosed: the hub is shutting down.
var ErrStoreClosed = errors.New("hub store closed")

// openStore opens hub.db, applies what the write-ahead log holds past
// it, and returns the queues it holds (by bucket name, with their sizes
// and sequence ranges); the caller builds its queues from them before
// start.
func openStore(dir string, maxBytes int64, log *slog.Logger) (*store, map[string]queueInfo, error) {
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
	s := &store{db: db, log: log, max: maxBytes, logWake: make(chan struct{}, 1), applyWake: make(chan struct{}, 1), opWake: make(chan struct{}, 1),
		room: make(chan struct{}, 1), logEnded: make(chan struct{}), done: make(chan struct{})}
	walDir := filepath.Join(dir, walDirName)
	var lastSeg uint64
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketTwins, bucketSessions} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keyNextSeq); len(v) == 8 {
			s.nextSeq = binary.BigEndian.Uint64(v)
		}
		var applied uint64
		if v := meta.Get(keyWALApplied); len(v) == 8 {
			applied = binary.BigEndian.Uint64(v)
		}
		sc, err := readWAL(walDir, applied)
		if err != nil {
			return err
		}
		lastSeg = sc.lastNum
		if sc.torn > 0 {
			log.Warn("the hub's write-ahead log ends in a write cut short by a crash; it was never acknowledged and is dropped", "dir", walDir)
		}
		if sc.corrupt > 0 {
			s.corrupt.Add(uint64(sc.corrupt))
			log.Error("damaged frames in the hub's write-ahead log: the messages in them and after them in their segment are lost", "dir", walDir, "frames", sc.corrupt)
		}
		for _, r := range sc.records {
			b, err := tx.CreateBucketIfNotExists([]byte(r.queue))
			if err != nil {
				return err
			}
			if err := b.Put(seqKey(r.seq), r.val); err != nil {
				return err
			}
		}
		if len(sc.records) > 0 {
			log.Info("applied the hub's write-ahead log to its store", "messages", len(sc.records))
		}
		if sc.maxSeq > applied {
			if err := meta.Put(keyWALApplied, seqKey(sc.maxSeq)); err != nil {
				return err
			}
		}
		s.nextSeq = max(s.nextSeq, sc.maxSeq+1)
		return nil
	})
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("read hub store %s (it may be corrupt: move it and %s away to start with empty queues): %w", path, walDir, err)
	}
	queues := map[string]queueInfo{}
	err = db.View(func(tx *bolt.Tx) error {
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
	w, err := openWAL(walDir, lastSeg, log)
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("open the hub's write-ahead log %s: %w", walDir, err)
	}
	w.forgetOld()
	w.trim(0)
	s.wal = w
	return s, queues, nil
}

// queueInfo is what the store holds of a queue at open.
type queueInfo struct {
	first, last uint64
	count       int64
	bytes       int64
}

// start runs the log writer and the applier.
func (s *store) start() {
	go s.logWriter()
	go s.applier()
}

// close stops the writers after they have written what is waiting, and
// closes the files.
func (s *store) close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	signal(s.logWake)
	<-s.done
	werr := s.wal.close()
	if err := s.db.Close(); err != nil {
		return err
	}
	return werr
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// append queues one message's entries (their q, expires, val and msg
// set), assigning their sequence numbers in order, and hands module input
// entries to their queues at once (entry.early); done is called once they
// are in the log (nil) or not (an error).
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
		if e.early() {
			e.q.give(e) // under s.mu: each queue gets its entries in seq order
		}
	}
	s.appends = append(s.appends, entries)
	s.waiters = append(s.waiters, done)
	s.mu.Unlock()
	signal(s.logWake)
}

// remove deletes an entry (acknowledged, expired): committed with the next
// batch, or within deleteDelay. An entry the applier has not taken yet is
// never written to hub.db.
func (s *store) remove(e *entry) {
	s.mu.Lock()
	if e.state < entryApplying {
		e.removed = true
		s.mu.Unlock()
		return
	}
	s.deletes = append(s.deletes, e)
	first := len(s.deletes) == 1 && len(s.logged) == 0 && len(s.ops) == 0
	many := len(s.deletes) >= 4096
	s.mu.Unlock()
	switch {
	case many:
		signal(s.applyWake)
	case first:
		time.AfterFunc(deleteDelay, func() { signal(s.applyWake) })
	}
}

// do runs fn in the next hub.db transaction; done learns the outcome.
func (s *store) do(fn func(*bolt.Tx) error, done func(error)) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		done(ErrStoreClosed)
		return
	}
	s.ops = append(s.ops, storeOp{fn: fn, done: done})
	s.mu.Unlock()
	signal(s.applyWake)
	signal(s.opWake)
}

// logWriter writes every message waiting to the log in one write and one
// fdatasync, then acknowledges them and hands them to the applier.
func (s *store) logWriter() {
	defer func() {
		s.mu.Lock()
		s.logDone = true
		s.mu.Unlock()
		close(s.logEnded)
		signal(s.applyWake)
	}()
	for {
		<-s.logWake
		s.mu.Lock()
		for s.unapplied > maxUnapplied && !s.closed {
			s.mu.Unlock()
			<-s.room
			s.mu.Lock()
		}
		groups, waiters, closed := s.appends, s.waiters, s.closed
		s.appends, s.waiters = nil, nil
		s.mu.Unlock()
		if len(groups) > 0 {
			s.writeLog(groups, waiters)
		}
		if closed {
			s.mu.Lock()
			rest := len(s.appends)
			s.mu.Unlock()
			if rest == 0 {
				return
			}
			signal(s.logWake)
		}
	}
}

func (s *store) writeLog(groups [][]*entry, waiters []func(error)) {
	err := s.wal.write(groups)
	if err != nil {
		s.log.Error("hub write-ahead log failed; messages refused", "error", err, "messages", len(groups))
		for _, g := range groups {
			for _, e := range g {
				if e.early() {
					e.q.failed(e)
				}
			}
		}
	} else {
		s.logWrites.Add(1)
		n, size := 0, 0
		for _, g := range groups {
			n += len(g)
		}
		logged := make([]*entry, 0, n)
		for _, g := range groups {
			for _, e := range g {
				if !e.early() {
					e.q.give(e) // in seq order: one log writer
				}
				logged = append(logged, e)
				size += len(e.val)
			}
		}
		s.mu.Lock()
		for _, e := range logged {
			e.state = entryLogged
		}
		s.logged = append(s.logged, logged...)
		s.unapplied += size
		s.mu.Unlock()
		signal(s.applyWake)
	}
	for _, w := range waiters {
		w(err)
	}
}

// applier commits to hub.db what the log holds, the deletes and the other
// writes, one transaction at a time. It ends once the log writer has and
// nothing is left.
func (s *store) applier() {
	defer close(s.done)
	retry := 100 * time.Millisecond
	for {
		<-s.applyWake
		s.mu.Lock()
		apps, dels, ops, logDone := s.logged, s.deletes, s.ops, s.logDone
		s.logged, s.deletes, s.ops = nil, nil, nil
		for _, e := range apps {
			e.state = entryApplying
		}
		next := s.nextSeq
		s.mu.Unlock()
		if len(apps) > 0 || len(dels) > 0 || len(ops) > 0 {
			began := time.Now()
			if err := s.commit(apps, dels, ops, next); err != nil {
				if logDone {
					return // closing: the log keeps them, applied at the next open
				}
				// What the log holds stays there, to be applied again (or
				// at the next open); the deletes wait with it.
				s.mu.Lock()
				for _, e := range apps {
					e.state = entryLogged
				}
				s.logged = append(apps, s.logged...)
				s.deletes = append(dels, s.deletes...)
				s.mu.Unlock()
				time.AfterFunc(retry, func() { signal(s.applyWake) })
				retry = min(2*retry, 5*time.Second)
				continue
			}
			retry = 100 * time.Millisecond
			if !logDone {
				// Fewer, larger transactions: hub.db's syncs compete for the
				// disk with the log's, which senders wait for.
				t := time.NewTimer(applyInterval - time.Since(began))
				select {
				case <-t.C:
				case <-s.opWake:
					t.Stop()
				case <-s.logEnded:
					t.Stop()
				}
			}
		}
		s.mu.Lock()
		rest := len(s.logged) + len(s.deletes) + len(s.ops)
		s.mu.Unlock()
		if logDone && rest == 0 {
			return
		}
		if rest > 0 {
			signal(s.applyWake)
		}
	}
}

// commit applies one batch to hub.db. On failure the ops are told; the
// entries and deletes are the caller's to retry.
func (s *store) commit(apps, dels []*entry, ops []storeOp, next uint64) error {
	var added, removed, addedN, removedN int64
	var dropped []*entry
	var applied uint64
	opErrs := make([]error, len(ops))
	err := s.db.Update(func(tx *bolt.Tx) error {
		added, removed, addedN, removedN, dropped = 0, 0, 0, 0, nil
		// e.removed no longer changes: the entries are applying.
		for _, e := range apps {
			applied = max(applied, e.seq)
			if e.removed {
				continue // acknowledged already: never stored
			}
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
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keyNextSeq, seqKey(next)); err != nil {
			return err
		}
		if applied > 0 {
			if err := meta.Put(keyWALApplied, seqKey(applied)); err != nil {
				return err
			}
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
	if err != nil {
		s.log.Error("hub store commit failed", "error", err, "messages", len(apps))
		for _, op := range ops {
			if op.done != nil {
				op.done(err)
			}
		}
		return err
	}
	s.commits.Add(1)
	s.storedBytes.Add(added - removed)
	s.storedCount.Add(addedN - removedN)
	size := 0
	s.mu.Lock()
	for _, e := range apps {
		e.state = entryApplied
		size += len(e.val)
	}
	wasFull := s.unapplied > maxUnapplied
	s.unapplied -= size
	s.mu.Unlock()
	if wasFull {
		signal(s.room)
	}
	for _, e := range apps {
		e.q.applied(e.seq)
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
	for i, op := range ops {
		if op.done != nil {
			op.done(opErrs[i])
		}
	}
	if applied > 0 {
		s.wal.trim(applied)
	}
	return nil
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
				corrupt = append(corrupt, &entry{q: q, seq: seq, state: entryApplied})
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
