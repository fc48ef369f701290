package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/hashicorp/raft"

	"appliance/internal/fsutil"
)

// DefaultSegmentSize: a segment takes no new batch once it is this long.
const DefaultSegmentSize = 16 << 20

const metaFile = "meta"

var (
	// ErrClosed: the log was closed.
	ErrClosed = errors.New("raft log closed")
	// errNotFound is the stable store's answer for a key never set; raft
	// compares the text with "not found".
	errNotFound = errors.New("not found")
)

// Options tunes Open. The zero value is the default.
type Options struct {
	// SegmentSize: see DefaultSegmentSize.
	SegmentSize int64
	// MachineWentDown says the machine went down while the log was open
	// (the caller knows it from a boot id marker): damage at the end of
	// the last segment is then a write the crash tore, never acknowledged,
	// and is cut off instead of refused.
	MachineWentDown bool
	// Logger; defaults to slog.Default().
	Logger *slog.Logger
}

// Log is raft's log store and stable store in one directory. It
// implements raft.LogStore, raft.StableStore and raft.MonotonicLogStore.
// Safe for concurrent use.
type Log struct {
	dir     string
	segSize int64
	logger  *slog.Logger

	// appendMu orders the changes (StoreLogs, DeleteRange, Close) and is
	// held across their write and sync; mu guards what readers see and is
	// held only to publish a change, so GetLog never waits on a sync.
	appendMu sync.Mutex
	buf      []byte // the batch being encoded (under appendMu)
	// cutTail: the last segment holds bytes after its last whole record
	// (a write cut short, or torn by the machine going down), to be cut
	// off before the first change (under appendMu).
	cutTail bool
	broken  error // a write or sync failed: what is on disk is unknown (under appendMu)

	mu          sync.RWMutex
	segs        []*segment
	first, last uint64 // 0, 0: empty
	closed      bool

	metaMu sync.Mutex // held while the meta file is written
	meta   meta       // as on disk (under metaMu; First also changes under appendMu)
}

// Open opens the log in dir, creating dir if needed. It reads every record
// of every segment and checks it (checksums, indexes in sequence, segments
// that follow each other). A file that ends inside its last record is a
// write cut short (a process stopped in the middle of it; no sync had
// returned, so raft never counted it) and is cut back to the last whole
// record. Anything else that does not check out is refused with an error
// wrapping ErrCorrupt naming the file and the offset, except damage at the
// end of the last segment when opts.MachineWentDown: that is cut off too.
func Open(dir string, opts Options) (*Log, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	l := &Log{dir: dir, segSize: opts.SegmentSize, logger: opts.Logger}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	m, err := readMeta(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, err
	}
	l.meta = m
	if err := l.openSegments(opts.MachineWentDown); err != nil {
		l.closeFiles()
		return nil, err
	}
	return l, nil
}

func (l *Log) openSegments(machineDown bool) error {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", l.dir, err)
	}
	var leftovers []string
	for _, e := range entries {
		name := e.Name()
		switch first, ok := parseSegmentName(name); {
		case ok:
			path := filepath.Join(l.dir, name)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				return fmt.Errorf("open %s: %w", path, err)
			}
			l.segs = append(l.segs, &segment{first: first, path: path, f: f})
		case strings.HasSuffix(name, tmpSuffix) || strings.HasPrefix(name, "."+metaFile+".tmp"):
			// A segment or meta file whose creation a crash interrupted:
			// never renamed into place, so it holds nothing raft counted.
			// Removed once everything else checked out.
			leftovers = append(leftovers, filepath.Join(l.dir, name))
		}
	}
	sort.Slice(l.segs, func(i, j int) bool { return l.segs[i].first < l.segs[j].first })
	for i, s := range l.segs {
		res, err := scanSegment(s.f, s.path, s.first)
		if err != nil {
			return err
		}
		s.offsets, s.end = res.offsets, res.end
		tail := i == len(l.segs)-1
		if res.stop != nil {
			switch {
			case !tail:
				return fmt.Errorf("%w (it is not the last segment, so this is not a write cut short)", res.stop)
			case errors.Is(res.stop, errShort):
				l.logger.Warn("raft log: the last write was cut short (the process stopped during it, before it was synced): cutting it off",
					"file", s.path, "offset", s.end, "reason", res.stop.Error())
			case machineDown:
				l.logger.Warn("raft log: the machine went down during the last write: cutting off the damaged end of the log",
					"file", s.path, "offset", s.end, "reason", res.stop.Error())
			default:
				return res.stop
			}
			// Cut at the first change, not here: the caller's own checks
			// may still refuse the directory, and a refusal changes no file.
			l.cutTail = true
		}
		if i > 0 {
			prev := l.segs[i-1]
			if len(prev.offsets) == 0 {
				return fmt.Errorf("%s: %w: the segment holds no entry and is not the last", prev.path, ErrCorrupt)
			}
			if s.first != prev.lastIndex()+1 {
				return fmt.Errorf("%s: %w: the segment starts at entry %d, but the one before (%s) ends at entry %d", s.path, ErrCorrupt, s.first, filepath.Base(prev.path), prev.lastIndex())
			}
		}
	}
	// Checks of the whole: the records from the first entry to the last
	// must all be there. A last segment left without records (made just
	// before a crash, or cut back to nothing) holds nothing that counts.
	live := l.segs
	if n := len(live); n > 0 && len(live[n-1].offsets) == 0 {
		live = live[:n-1]
	}
	first := l.meta.First
	var last uint64
	if len(live) > 0 {
		last = live[len(live)-1].lastIndex()
		metaPath := filepath.Join(l.dir, metaFile)
		if first < live[0].first {
			if first == 0 {
				return fmt.Errorf("%s: %w: the log has segments but the meta file names no first entry (was it lost?)", metaPath, ErrCorrupt)
			}
			return fmt.Errorf("%s: %w: the log starts at entry %d, but the first segment (%s) starts at entry %d: entries %d..%d are missing",
				metaPath, ErrCorrupt, first, filepath.Base(live[0].path), live[0].first, first, live[0].first-1)
		}
	}
	if n := len(l.segs); l.cutTail && n > 0 && l.segs[n-1].lastIndex()+1 < first {
		tail := l.segs[n-1]
		return fmt.Errorf("%s: %w: cut back to its last whole record the log ends at entry %d, but it starts at entry %d: entries it held are gone, more than a write cut short", tail.path, ErrCorrupt, tail.lastIndex(), first)
	}

	// Everything checked out: clear away what crashes left.
	for _, p := range leftovers {
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	if len(live) < len(l.segs) {
		if err := l.removeSegments(l.segs[len(live):]); err != nil {
			return err
		}
		l.segs = live
		l.cutTail = false
	}
	// Segments wholly before the first entry: a DeleteRange stopped after
	// it recorded the new first entry, before it removed them.
	var gone []*segment
	for len(l.segs) > 0 && l.segs[0].lastIndex() < first {
		gone = append(gone, l.segs[0])
		l.segs = l.segs[1:]
	}
	if err := l.removeSegments(gone); err != nil {
		return err
	}
	if len(l.segs) > 0 {
		l.first, l.last = first, last
	} else {
		l.cutTail = false
	}
	return nil
}

// removeSegments closes and removes segs, newest first (so that a crash
// in between leaves a log that is a prefix of the one before).
func (l *Log) removeSegments(segs []*segment) error {
	if len(segs) == 0 {
		return nil
	}
	for _, s := range slices.Backward(segs) {
		s.f.Close()
		if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", s.path, err)
		}
	}
	return fsutil.SyncDir(l.dir)
}

// Dir is the directory the log is in.
func (l *Log) Dir() string { return l.dir }

// Tail is the file that holds the end of the log (the directory when the
// log is empty), for errors about the log's end.
func (l *Log) Tail() string {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if len(l.segs) == 0 {
		return l.dir
	}
	return l.segs[len(l.segs)-1].path
}

// FirstIndex is the first entry's index, 0 when the log is empty.
func (l *Log) FirstIndex() (uint64, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return 0, ErrClosed
	}
	return l.first, nil
}

// LastIndex is the last entry's index, 0 when the log is empty.
func (l *Log) LastIndex() (uint64, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return 0, ErrClosed
	}
	return l.last, nil
}

// GetLog reads the entry at index into out. An index outside the log is
// raft.ErrLogNotFound; a record that fails its checks wraps ErrCorrupt.
func (l *Log) GetLog(index uint64, out *raft.Log) error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return ErrClosed
	}
	if l.last == 0 || index < l.first || index > l.last {
		return raft.ErrLogNotFound
	}
	k := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].first > index }) - 1
	s := l.segs[k]
	off, n := s.span(index)
	buf := make([]byte, n)
	if _, err := s.f.ReadAt(buf, off); err != nil {
		if errors.Is(err, io.EOF) {
			// The file is shorter than what was appended and synced.
			return fmt.Errorf("%s: offset %d: %w: entry %d is past the end of the file", s.path, off, ErrCorrupt, index)
		}
		return fmt.Errorf("read entry %d from %s at offset %d: %w", index, s.path, off, err)
	}
	size, err := decodeRecord(buf, out)
	if err == nil && (int64(size) != n || out.Index != index) {
		err = fmt.Errorf("%w: the record there is entry %d of %d bytes, not entry %d of %d bytes", ErrCorrupt, out.Index, size, index, n)
	}
	if errors.Is(err, errShort) {
		err = fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err != nil {
		*out = raft.Log{}
		return fmt.Errorf("%s: offset %d: %w", s.path, off, err)
	}
	return nil
}

// StoreLog stores one entry.
func (l *Log) StoreLog(entry *raft.Log) error { return l.StoreLogs([]*raft.Log{entry}) }

// StoreLogs appends entries, whose indexes must follow the log's last (or
// start anywhere in an empty log), with one write and one fdatasync.
func (l *Log) StoreLogs(entries []*raft.Log) error {
	if len(entries) == 0 {
		return nil
	}
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	if err := l.usable(); err != nil {
		return err
	}
	next := entries[0].Index
	if l.last != 0 && next != l.last+1 {
		return fmt.Errorf("raftlog: append entry %d after entry %d: entries must follow the last one", next, l.last)
	}
	if next == 0 {
		return errors.New("raftlog: append entry 0: indexes start at 1")
	}
	buf := l.buf[:0]
	for i, e := range entries {
		if e.Index != next+uint64(i) {
			return fmt.Errorf("raftlog: append entries %d..: entry %d where %d belongs", next, e.Index, next+uint64(i))
		}
		if len(e.Data) > MaxData || len(e.Extensions) > MaxExtensions {
			return fmt.Errorf("raftlog: entry %d is too large (%d bytes of data, %d of extensions; the caps are %d and %d)", e.Index, len(e.Data), len(e.Extensions), MaxData, MaxExtensions)
		}
		buf = appendRecord(buf, e)
	}
	defer func() {
		if cap(buf) <= 4<<20 {
			l.buf = buf[:0]
		}
	}()

	var s *segment
	if n := len(l.segs); n > 0 && l.segs[n-1].end < l.segSize {
		s = l.segs[n-1]
	} else {
		if l.last == 0 && l.recordedFirst() != next {
			// The log's first entry, durable before the segment that holds it.
			if err := l.setFirst(next); err != nil {
				return err
			}
		}
		ns, err := createSegment(l.dir, next)
		if err != nil {
			return err
		}
		s = ns
		l.mu.Lock()
		l.segs = append(l.segs, s)
		l.mu.Unlock()
	}
	if _, err := s.f.WriteAt(buf, s.end); err != nil {
		l.broken = fmt.Errorf("raftlog: write %s: %w (the log refuses every write until it is opened again)", s.path, err)
		return l.broken
	}
	if err := fdatasync(s.f); err != nil {
		l.broken = fmt.Errorf("raftlog: %w (the log refuses every write until it is opened again)", err)
		return l.broken
	}
	l.mu.Lock()
	off := s.end
	for _, e := range entries {
		s.offsets = append(s.offsets, off)
		off += int64(recordSize(e))
	}
	s.end = off
	if l.last == 0 {
		l.first = next
	}
	l.last = entries[len(entries)-1].Index
	l.mu.Unlock()
	return nil
}

// usable is nil when the log may be changed (under appendMu). It cuts
// off what Open found after the last whole record.
func (l *Log) usable() error {
	if l.broken != nil {
		return l.broken
	}
	l.mu.RLock()
	closed := l.closed
	l.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	if l.cutTail && len(l.segs) > 0 {
		s := l.segs[len(l.segs)-1]
		if err := s.f.Truncate(s.end); err != nil {
			return fmt.Errorf("raftlog: cut %s at %d: %w", s.path, s.end, err)
		}
		if err := fdatasync(s.f); err != nil {
			return fmt.Errorf("raftlog: %w", err)
		}
	}
	l.cutTail = false
	return nil
}

// DeleteRange deletes the entries min..max, inclusive: a prefix (raft
// compacting after a snapshot), a suffix (a follower dropping entries the
// leader does not have), or everything. A range inside the log is refused:
// raft never asks for one.
func (l *Log) DeleteRange(min, max uint64) error {
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	if err := l.usable(); err != nil {
		return err
	}
	if l.last == 0 || max < l.first || min > l.last || min > max {
		return nil
	}
	switch {
	case min <= l.first && max >= l.last:
		return l.deleteAll()
	case min <= l.first:
		return l.deletePrefix(max + 1)
	case max >= l.last:
		return l.deleteSuffix(min)
	}
	return fmt.Errorf("raftlog: delete entries %d..%d from the log %d..%d: only a prefix or a suffix can be deleted", min, max, l.first, l.last)
}

// deleteAll empties the log: the first entry moves past the last (so that
// segments a crash leaves behind count for nothing), then the segments go.
func (l *Log) deleteAll() error {
	if err := l.setFirst(l.last + 1); err != nil {
		return err
	}
	l.mu.Lock()
	segs := l.segs
	l.segs, l.first, l.last = nil, 0, 0
	l.mu.Unlock()
	return l.removeSegments(segs)
}

// deletePrefix makes first the first entry: recorded first, then the
// segments wholly before it removed.
func (l *Log) deletePrefix(first uint64) error {
	if err := l.setFirst(first); err != nil {
		return err
	}
	l.mu.Lock()
	var gone []*segment
	for len(l.segs) > 1 && l.segs[0].lastIndex() < first {
		gone = append(gone, l.segs[0])
		l.segs = l.segs[1:]
	}
	l.first = first
	l.mu.Unlock()
	return l.removeSegments(gone)
}

// deleteSuffix deletes the entries from min on: the segments that start
// at or after it are removed, newest first, and the one holding it is cut
// and synced. A crash in between leaves a prefix of the log as it was.
func (l *Log) deleteSuffix(min uint64) error {
	l.mu.Lock()
	var gone []*segment
	for n := len(l.segs); n > 1 && l.segs[n-1].first >= min; n-- {
		gone = append(gone, l.segs[n-1])
		l.segs = l.segs[:n-1]
	}
	s := l.segs[len(l.segs)-1]
	off := s.end // min starts the segment removed after s
	if min <= s.lastIndex() {
		off, _ = s.span(min)
	}
	s.offsets = s.offsets[:min-s.first]
	s.end = off
	l.last = min - 1
	l.mu.Unlock()
	slices.Reverse(gone)
	if err := l.removeSegments(gone); err != nil {
		l.broken = fmt.Errorf("raftlog: %w (the log refuses every write until it is opened again)", err)
		return l.broken
	}
	if err := s.f.Truncate(off); err != nil {
		l.broken = fmt.Errorf("raftlog: cut %s at %d: %w (the log refuses every write until it is opened again)", s.path, off, err)
		return l.broken
	}
	if err := fdatasync(s.f); err != nil {
		l.broken = fmt.Errorf("raftlog: %w (the log refuses every write until it is opened again)", err)
		return l.broken
	}
	return nil
}

// recordedFirst is the first index the meta file holds.
func (l *Log) recordedFirst() uint64 {
	l.metaMu.Lock()
	defer l.metaMu.Unlock()
	return l.meta.First
}

// setFirst records the log's first entry in the meta file.
func (l *Log) setFirst(first uint64) error {
	l.metaMu.Lock()
	defer l.metaMu.Unlock()
	m := l.meta
	m.First = first
	if err := writeMeta(filepath.Join(l.dir, metaFile), m); err != nil {
		return err
	}
	l.meta = m
	return nil
}

// Set stores a stable store key (raft's term and vote), durably.
func (l *Log) Set(key, val []byte) error {
	l.metaMu.Lock()
	defer l.metaMu.Unlock()
	l.mu.RLock()
	closed := l.closed
	l.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	m := l.meta
	m.Stable = maps.Clone(m.Stable)
	if m.Stable == nil {
		m.Stable = map[string][]byte{}
	}
	m.Stable[string(key)] = slices.Clone(val)
	if err := writeMeta(filepath.Join(l.dir, metaFile), m); err != nil {
		return err
	}
	l.meta = m
	return nil
}

// Get returns a stable store key's value; an error reading "not found"
// (as raft expects) for a key never set.
func (l *Log) Get(key []byte) ([]byte, error) {
	l.metaMu.Lock()
	defer l.metaMu.Unlock()
	v, ok := l.meta.Stable[string(key)]
	if !ok {
		return nil, errNotFound
	}
	return slices.Clone(v), nil
}

// SetUint64 stores a stable store key as a big-endian uint64 (as
// raft-boltdb does, so a migrated value reads the same).
func (l *Log) SetUint64(key []byte, val uint64) error {
	return l.Set(key, binary.BigEndian.AppendUint64(nil, val))
}

// GetUint64 reads a key SetUint64 stored.
func (l *Log) GetUint64(key []byte) (uint64, error) {
	v, err := l.Get(key)
	if err != nil {
		return 0, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("%s: %w: stable store key %q is %d bytes, not 8", filepath.Join(l.dir, metaFile), ErrCorrupt, key, len(v))
	}
	return binary.BigEndian.Uint64(v), nil
}

// Stable returns a copy of every stable store key, for checks.
func (l *Log) Stable() map[string][]byte {
	l.metaMu.Lock()
	defer l.metaMu.Unlock()
	out := make(map[string][]byte, len(l.meta.Stable))
	for k, v := range l.meta.Stable {
		out[k] = slices.Clone(v)
	}
	return out
}

// IsMonotonic tells raft that entries are only ever appended after the
// last one (raft.MonotonicLogStore): after installing a snapshot raft
// empties the log rather than keep entries that would leave a gap.
func (l *Log) IsMonotonic() bool { return true }

// Close closes the files. Every change was synced when it returned.
func (l *Log) Close() error {
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	return l.closeFiles()
}

func (l *Log) closeFiles() error {
	var errs []error
	for _, s := range l.segs {
		errs = append(errs, s.f.Close())
	}
	return errors.Join(errs...)
}
