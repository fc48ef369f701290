package northbound

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The retention log: the node's upstream messages in arrival order, each
// with an offset (0, 1, 2, ... for the life of the data directory), in
// segment files of about SegmentBytes. Appends are group-committed: every
// append waiting when the writer runs goes out in one write and one
// fdatasync, and is acknowledged (its device gets its PUBACK) only after
// that. Readers see only what is synced, so a consumer is never sent a
// message a crash could take back. The oldest segments are deleted when
// the log is over MaxBytes or older than MaxAge.
//
// A segment file is named after its first offset (20 digits, ".seg") and
// holds frames: u32 length, u32 CRC-32C of the payload, the payload (big
// endian). Offsets are implicit: a segment's n-th frame has offset base+n,
// and a sealed segment ends where the next begins. At open only the last
// segment is read: a torn frame at its end (a crash during a write that
// was never acknowledged) is cut off; a frame that fails its checksum
// elsewhere is found by the reader that meets it, which skips the rest of
// that segment and counts the messages as lost (Stats.Corrupt).

// Defaults of LogOptions.
const (
	DefaultRetentionBytes = 1 << 30        // 1 GiB
	DefaultRetentionAge   = 24 * time.Hour // a day
	maxFrame              = 1 << 20        // a frame larger than this is damage (messages are at most 256 KiB)
	frameHeader           = 8
	indexEvery            = 64 << 10 // bytes between sparse index entries
)

// LogOptions bound the retention log.
type LogOptions struct {
	// MaxBytes caps the log's size on disk; the oldest segments go first.
	MaxBytes int64
	// MaxAge drops segments whose newest message is older.
	MaxAge time.Duration
	// SegmentBytes is the size at which a segment is sealed and a new one
	// started (default MaxBytes/16, between 1 MiB and 64 MiB).
	SegmentBytes int64
}

func (o LogOptions) withDefaults() LogOptions {
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultRetentionBytes
	}
	if o.MaxAge <= 0 {
		o.MaxAge = DefaultRetentionAge
	}
	if o.SegmentBytes <= 0 {
		o.SegmentBytes = min(max(o.MaxBytes/16, 1<<20), 64<<20)
	}
	return o
}

var (
	// ErrLogClosed: the log is closed.
	ErrLogClosed = errors.New("retention log closed")
	crcTable     = crc32.MakeTable(crc32.Castagnoli)
)

// TrimmedError is what a reader gets when the messages it was to read next
// are no longer in the log (deleted for retention, or damaged): it
// resumes at Next.
type TrimmedError struct {
	From, Next uint64
	Corrupt    bool // a damaged frame, not retention
}

func (e *TrimmedError) Error() string {
	why := "deleted for retention"
	if e.Corrupt {
		why = "damaged on disk"
	}
	return fmt.Sprintf("messages %d to %d %s", e.From, e.Next-1, why)
}

type indexEntry struct {
	off uint64
	pos int64
}

type segment struct {
	base    uint64
	path    string
	size    int64 // bytes of whole frames
	count   uint64
	modTime time.Time
	// index is sparse (one entry per indexEvery bytes), built as frames
	// are written, or by a reader's first scan of a segment from an
	// earlier run (indexed false until then).
	index   []indexEntry
	indexed bool
}

type pendingAppend struct {
	first, n uint64
	done     chan error
}

// Log is the retention log. Its methods are safe for concurrent use.
type Log struct {
	dir  string
	opts LogOptions
	log  *slog.Logger

	mu     sync.Mutex
	segs   []*segment // ascending; the last one is written to
	active *os.File
	next   uint64 // the offset the next append gets
	buf    []byte // frames of the pending appends, in offset order
	waits  []pendingAppend
	closed bool
	// writing: the writer is writing a group outside l.mu (the active
	// file must not be sealed under it).
	writing bool
	broken  error // a write failed and could not be undone: appends are refused
	// gen changes when bytes past the committed end were cut (a failed
	// write undone): readers drop what they buffered.
	gen uint64

	committed atomic.Uint64 // offsets below it are synced and readable
	notifyMu  sync.Mutex
	notify    chan struct{} // closed when committed advances

	kick     chan struct{}
	stop     chan struct{}
	done     chan struct{}
	onTrim   func(from, to uint64, seg string) // before a segment is deleted
	corrupt  atomic.Uint64
	syncs    atomic.Uint64
	appended atomic.Uint64
}

// OpenLog opens (or creates) the log in dir.
func OpenLog(dir string, opts LogOptions, logger *slog.Logger) (*Log, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the retention log directory %s: %w", dir, err)
	}
	l := &Log{dir: dir, opts: opts.withDefaults(), log: logger, notify: make(chan struct{}),
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	if err := l.load(); err != nil {
		return nil, err
	}
	go l.writer()
	return l, nil
}

// load finds the segments, checks the last one and opens it for appends.
func (l *Log) load() error {
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return fmt.Errorf("read the retention log directory %s: %w", l.dir, err)
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".seg") {
			continue
		}
		base, err := strconv.ParseUint(strings.TrimSuffix(name, ".seg"), 10, 64)
		if err != nil {
			l.log.Warn("retention log: a file that is not a segment is ignored", "file", filepath.Join(l.dir, name))
			continue
		}
		info, err := e.Info()
		if err != nil {
			return fmt.Errorf("retention log: %w", err)
		}
		l.segs = append(l.segs, &segment{base: base, path: filepath.Join(l.dir, name), size: info.Size(), modTime: info.ModTime()})
	}
	slices.SortFunc(l.segs, func(a, b *segment) int { return cmpU64(a.base, b.base) })
	for i := 0; i+1 < len(l.segs); i++ {
		l.segs[i].count = l.segs[i+1].base - l.segs[i].base
	}
	if len(l.segs) == 0 {
		return l.roll(0)
	}
	last := l.segs[len(l.segs)-1]
	end, count, index, err := scanSegment(last.path, ^uint64(0), last.base)
	if err != nil && !errors.Is(err, errTorn) {
		return fmt.Errorf("retention log: %w", err)
	}
	if end < last.size {
		// Frames never acknowledged (the machine stopped during their
		// write), or damage: cut them off, so that appends continue after
		// the last whole frame. More than one write group's worth is not
		// a torn write: say so louder.
		level := slog.LevelWarn
		if last.size-end > maxFrame {
			level = slog.LevelError
		}
		l.log.Log(context.Background(), level, "retention log: cut the end of the last segment after its last whole frame (a write the machine did not finish, or damage); messages in it are lost to consumers that had not read them",
			"file", last.path, "bytes", last.size-end, "reason", err)
		if err := os.Truncate(last.path, end); err != nil {
			return fmt.Errorf("retention log: cut the torn end of %s: %w", last.path, err)
		}
	}
	last.size, last.count, last.index, last.indexed = end, count, index, true
	f, err := os.OpenFile(last.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("retention log: open %s: %w", last.path, err)
	}
	l.active = f
	l.next = last.base + count
	l.committed.Store(l.next)
	return nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

var errTorn = errors.New("torn or damaged frame")

// scanSegment reads a segment's frames, at most limit of them, checking
// each one's checksum. It returns where the last good frame ends, how many
// there are and a sparse index; err wraps errTorn if a frame was cut short
// or damaged.
func scanSegment(path string, limit, base uint64) (end int64, count uint64, index []indexEntry, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, nil, err
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 256<<10)
	var hdr [frameHeader]byte
	var payload []byte
	lastIndexed := int64(-indexEvery)
	for count < limit {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF {
				return end, count, index, nil
			}
			return end, count, index, fmt.Errorf("%w: frame header at byte %d of %s", errTorn, end, path)
		}
		n := binary.BigEndian.Uint32(hdr[:4])
		if n == 0 || n > maxFrame { // no record is empty: zeros are a torn write
			return end, count, index, fmt.Errorf("%w: frame length %d at byte %d of %s", errTorn, n, end, path)
		}
		payload = slices.Grow(payload[:0], int(n))[:n]
		if _, err := io.ReadFull(br, payload); err != nil {
			return end, count, index, fmt.Errorf("%w: frame at byte %d of %s cut short", errTorn, end, path)
		}
		if crc32.Checksum(payload, crcTable) != binary.BigEndian.Uint32(hdr[4:]) {
			return end, count, index, fmt.Errorf("%w: checksum of the frame at byte %d of %s", errTorn, end, path)
		}
		if end-lastIndexed >= indexEvery {
			index = append(index, indexEntry{off: base + count, pos: end})
			lastIndexed = end
		}
		end += frameHeader + int64(n)
		count++
	}
	return end, count, index, nil
}

// roll starts a new segment at offset base; l.mu held (or at load).
func (l *Log) roll(base uint64) error {
	path := filepath.Join(l.dir, fmt.Sprintf("%020d.seg", base))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("retention log: create %s: %w", path, err)
	}
	if err := syncDir(l.dir); err != nil {
		f.Close()
		return fmt.Errorf("retention log: %w", err)
	}
	if l.active != nil {
		_ = l.active.Close()
	}
	l.active = f
	l.segs = append(l.segs, &segment{base: base, path: path, modTime: time.Now(), indexed: true})
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// AppendFrame encodes one record's payload as a frame.
func appendFrame(dst, payload []byte) []byte {
	var hdr [frameHeader]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(hdr[4:], crc32.Checksum(payload, crcTable))
	return append(append(dst, hdr[:]...), payload...)
}

// Append adds records (payloads) to the log and returns once they are on
// disk (synced), with the offset of the first. ctx bounds the wait; a
// caller that gives up does not take the records back (they may still be
// written).
func (l *Log) Append(ctx context.Context, payloads [][]byte) (uint64, error) {
	if len(payloads) == 0 {
		return l.committed.Load(), nil
	}
	for _, p := range payloads {
		if len(p) > maxFrame {
			return 0, fmt.Errorf("retention log: a record of %d bytes is over the limit of %d", len(p), maxFrame)
		}
	}
	done := make(chan error, 1)
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return 0, ErrLogClosed
	case l.broken != nil:
		l.mu.Unlock()
		return 0, l.broken
	}
	first := l.next
	for _, p := range payloads {
		l.buf = appendFrame(l.buf, p)
	}
	l.next += uint64(len(payloads))
	l.waits = append(l.waits, pendingAppend{first: first, n: uint64(len(payloads)), done: done})
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default:
	}
	select {
	case err := <-done:
		return first, err
	case <-ctx.Done():
		return 0, fmt.Errorf("retention log: waiting for the write: %w", ctx.Err())
	}
}

// writer writes what is pending, one group at a time.
func (l *Log) writer() {
	defer close(l.done)
	for {
		select {
		case <-l.kick:
		case <-l.stop:
			l.flush() // appends that raced with Close
			return
		}
		l.flush()
	}
}

// flush writes and syncs the pending appends as one group.
func (l *Log) flush() {
	l.mu.Lock()
	if len(l.waits) == 0 {
		l.mu.Unlock()
		return
	}
	buf, waits := l.buf, l.waits
	l.buf, l.waits = nil, nil
	first := waits[0].first
	seg := l.segs[len(l.segs)-1]
	if seg.count > 0 && seg.size+int64(len(buf)) > l.opts.SegmentBytes {
		if err := l.roll(first); err != nil {
			l.failLocked(waits, err, seg, seg.size)
			l.mu.Unlock()
			return
		}
		seg = l.segs[len(l.segs)-1]
	}
	f := l.active
	start := seg.size
	l.writing = true
	l.mu.Unlock()

	_, err := f.Write(buf)
	if err == nil {
		err = f.Sync() // fdatasync would do; Sync is portable and the size changes anyway
	}
	l.syncs.Add(1)

	l.mu.Lock()
	l.writing = false
	if err != nil {
		l.failLocked(waits, fmt.Errorf("retention log: write %s: %w", seg.path, err), seg, start)
		l.mu.Unlock()
		return
	}
	// Index the new frames.
	pos := start
	lastIndexed := int64(-indexEvery)
	if n := len(seg.index); n > 0 {
		lastIndexed = seg.index[n-1].pos
	}
	off := first
	for p := 0; p < len(buf); {
		n := int(binary.BigEndian.Uint32(buf[p:]))
		if pos-lastIndexed >= indexEvery {
			seg.index = append(seg.index, indexEntry{off: off, pos: pos})
			lastIndexed = pos
		}
		pos += int64(frameHeader + n)
		p += frameHeader + n
		off++
	}
	seg.size = pos
	seg.count = off - seg.base
	seg.modTime = time.Now()
	l.mu.Unlock()
	l.appended.Add(off - first)
	l.advance(off)
	for _, w := range waits {
		w.done <- nil
	}
}

// failLocked undoes a failed group: the segment is cut back to where the
// group began, the group's appends and every one queued after it fail
// (their offsets are given out again). If the cut fails the log refuses
// appends from then on. l.mu held.
func (l *Log) failLocked(waits []pendingAppend, err error, seg *segment, size int64) {
	l.log.Error("retention log: a write failed; the devices keep their messages and send them again", "error", err)
	if terr := os.Truncate(seg.path, size); terr != nil {
		l.broken = fmt.Errorf("retention log: a failed write could not be undone (%v); restart the node: %w", terr, err)
		l.log.Error("retention log: refusing appends", "error", l.broken)
	}
	l.gen++
	waits = append(waits, l.waits...)
	l.buf, l.waits = nil, nil
	l.next = l.committed.Load()
	for _, w := range waits {
		w.done <- err
	}
}

// advance publishes a new committed end and wakes the readers.
func (l *Log) advance(to uint64) {
	l.committed.Store(to)
	l.notifyMu.Lock()
	close(l.notify)
	l.notify = make(chan struct{})
	l.notifyMu.Unlock()
}

// changed returns a channel closed when the committed end next advances.
func (l *Log) changed() <-chan struct{} {
	l.notifyMu.Lock()
	defer l.notifyMu.Unlock()
	return l.notify
}

// End is the offset the next message will get: every offset below it is
// in the log or was trimmed.
func (l *Log) End() uint64 { return l.committed.Load() }

// First is the oldest offset still in the log.
func (l *Log) First() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.segs[0].base
}

// LogStats describe the log now.
type LogStats struct {
	First, End uint64 // offsets: [First, End) are retained
	Bytes      int64
	Segments   int
	Corrupt    uint64 // messages lost to damaged frames (found by readers)
	Syncs      uint64 // group commits
}

// Stats returns the log's size and counters.
func (l *Log) Stats() LogStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := LogStats{First: l.segs[0].base, End: l.committed.Load(), Segments: len(l.segs), Corrupt: l.corrupt.Load(), Syncs: l.syncs.Load()}
	for _, s := range l.segs {
		st.Bytes += s.size
	}
	return st
}

// Trim deletes the segments over the size or past the age, oldest first
// (never the one being written: it is sealed and replaced first when it
// is past the age). onTrim, if set, is told of each segment before it
// leaves the log, so that readers behind can count what they lose and
// move past it.
func (l *Log) Trim(now time.Time) {
	for {
		l.mu.Lock()
		var total int64
		for _, s := range l.segs {
			total += s.size
		}
		oldest := l.segs[0]
		overSize := total > l.opts.MaxBytes && len(l.segs) > 1
		expired := oldest.count > 0 && now.Sub(oldest.modTime) > l.opts.MaxAge
		if !overSize && !expired {
			l.mu.Unlock()
			return
		}
		if len(l.segs) == 1 {
			// The segment being written is past the age: seal it, so
			// that it can go (the new file keeps the offsets counting
			// across a restart).
			if len(l.waits) > 0 || l.writing {
				l.mu.Unlock()
				return // being written to: it is not old
			}
			if err := l.roll(l.next); err != nil {
				l.log.Error("retention log: cannot seal an expired segment", "error", err)
				l.mu.Unlock()
				return
			}
		}
		onTrim := l.onTrim
		l.mu.Unlock()
		if onTrim != nil {
			onTrim(oldest.base, oldest.base+oldest.count, oldest.path)
		}
		l.mu.Lock()
		if len(l.segs) > 1 && l.segs[0] == oldest {
			l.segs = l.segs[1:]
		}
		l.mu.Unlock()
		if err := os.Remove(oldest.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			l.log.Error("retention log: cannot delete a segment", "file", oldest.path, "error", err)
		}
	}
}

// Close stops the writer (pending appends are written first) and closes
// the files. Readers get ErrLogClosed.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	l.advance(l.committed.Load()) // wake readers; they see closed
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.active.Close()
}

func (l *Log) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// segmentFor returns the segment holding off (nil if none: trimmed, or
// not written yet), and the next segment's base.
func (l *Log) segmentFor(off uint64) (*segment, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].base > off }) - 1
	if i < 0 {
		return nil, l.segs[0].base
	}
	s := l.segs[i]
	if off >= s.base+s.count {
		if i+1 < len(l.segs) {
			return nil, l.segs[i+1].base
		}
		return nil, l.next
	}
	return s, 0
}

// seekPos returns a position in s at or before off's frame, and its
// offset, building the segment's index first if no one has.
func (l *Log) seekPos(s *segment, off uint64) (uint64, int64) {
	l.mu.Lock()
	indexed := s.indexed
	l.mu.Unlock()
	if !indexed {
		_, _, index, _ := scanSegment(s.path, s.count, s.base)
		l.mu.Lock()
		if !s.indexed {
			s.index, s.indexed = index, true
		}
		l.mu.Unlock()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	i := sort.Search(len(s.index), func(i int) bool { return s.index[i].off > off }) - 1
	if i < 0 {
		return s.base, 0
	}
	return s.index[i].off, s.index[i].pos
}

// Reader reads the log from an offset on, waiting for new messages at its
// end. A Reader is used by one goroutine.
type Reader struct {
	l   *Log
	off uint64 // the next offset to return

	seg  *segment
	f    *os.File
	br   *bufio.Reader
	at   uint64 // the offset of the frame br is at
	gen  uint64
	hdr  [frameHeader]byte
	data []byte
}

// NewReader returns a reader whose first message is the one at offset
// from (or the first after it still retained).
func (l *Log) NewReader(from uint64) *Reader { return &Reader{l: l, off: from} }

// Offset is the offset of the next message Next returns.
func (r *Reader) Offset() uint64 { return r.off }

// Seek moves the reader to offset off.
func (r *Reader) Seek(off uint64) {
	if off != r.off {
		r.off = off
		r.closeFile()
	}
}

// Close releases the reader's file.
func (r *Reader) Close() { r.closeFile() }

func (r *Reader) closeFile() {
	if r.f != nil {
		r.f.Close()
	}
	r.f, r.br, r.seg = nil, nil, nil
}

// Next returns the payload of the next message and its offset, waiting
// for one if the reader is at the end, until ctx ends. The payload is
// valid until the next call. Messages that are gone are skipped with a
// *TrimmedError saying which (the next call goes on after them).
func (r *Reader) Next(ctx context.Context) (uint64, []byte, error) {
	for {
		if r.l.isClosed() {
			return 0, nil, ErrLogClosed
		}
		ch := r.l.changed()
		if r.off >= r.l.committed.Load() {
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return 0, nil, ctx.Err()
			}
		}
		p, err := r.read()
		if err != nil {
			return 0, nil, err
		}
		if p == nil {
			continue
		}
		off := r.off
		r.off++
		return off, p, nil
	}
}

// Poll is Next without waiting: ok is false at the end.
func (r *Reader) Poll() (off uint64, payload []byte, ok bool, err error) {
	for r.off < r.l.committed.Load() {
		p, err := r.read()
		if err != nil {
			return 0, nil, false, err
		}
		if p == nil {
			continue
		}
		off := r.off
		r.off++
		return off, p, true, nil
	}
	return 0, nil, false, nil
}

// read reads the frame at r.off (which is below the committed end): nil
// with no error when the reader moved (a new segment).
func (r *Reader) read() ([]byte, error) {
	l := r.l
	l.mu.Lock()
	gen := l.gen
	l.mu.Unlock()
	if r.seg == nil || r.off < r.seg.base || r.off >= r.seg.base+r.segCount() || gen != r.gen {
		r.closeFile()
		s, nextBase := l.segmentFor(r.off)
		if s == nil {
			from := r.off
			r.off = max(nextBase, r.off)
			if r.off == from {
				return nil, nil // at the end meanwhile
			}
			return nil, &TrimmedError{From: from, Next: r.off}
		}
		f, err := os.Open(s.path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) { // trimmed just now
				return nil, nil
			}
			return nil, fmt.Errorf("retention log: %w", err)
		}
		at, pos := l.seekPos(s, r.off)
		if _, err := f.Seek(pos, io.SeekStart); err != nil {
			f.Close()
			return nil, fmt.Errorf("retention log: %w", err)
		}
		r.seg, r.f, r.at, r.gen = s, f, at, gen
		r.br = bufio.NewReaderSize(f, 64<<10)
	}
	for {
		if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
			return nil, r.damaged(err)
		}
		n := binary.BigEndian.Uint32(r.hdr[:4])
		if n == 0 || n > maxFrame {
			return nil, r.damaged(fmt.Errorf("frame length %d", n))
		}
		r.data = slices.Grow(r.data[:0], int(n))[:n]
		if _, err := io.ReadFull(r.br, r.data); err != nil {
			return nil, r.damaged(err)
		}
		if crc32.Checksum(r.data, crcTable) != binary.BigEndian.Uint32(r.hdr[4:]) {
			return nil, r.damaged(errors.New("checksum mismatch"))
		}
		at := r.at
		r.at++
		if at == r.off {
			return r.data, nil
		}
	}
}

func (r *Reader) segCount() uint64 {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	return r.seg.count
}

// damaged skips the rest of the reader's segment after a frame that does
// not read back: the messages are counted lost.
func (r *Reader) damaged(cause error) error {
	s := r.seg
	end := s.base + r.segCount()
	from := r.off
	r.l.log.Error("retention log: a damaged frame; the rest of its segment is skipped", "file", s.path, "offset", from, "lost", end-from, "error", cause)
	r.l.corrupt.Add(end - from)
	r.closeFile()
	r.off = end
	return &TrimmedError{From: from, Next: end, Corrupt: true}
}
