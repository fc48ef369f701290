package hub

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"appliance/internal/fsutil"
)

// The write-ahead log: <Dir>/hub-wal/<segment number, 20 digits>.wal.
//
// A message a module sends is acknowledged once its entries are in the
// log: one write and one fdatasync for every message waiting (group
// commit), into a segment whose blocks were allocated when it was
// created, so that the sync writes data only (bbolt's commit costs two
// syncs, and a growing file a journal commit each time). hub.db is
// brought up to date from the log in the background (store.applier), and
// records bbolt's progress as meta/walApplied: the highest sequence number
// applied. At open, the records past it are applied before anything else
// reads hub.db; segments wholly applied are deleted.
//
// A segment holds frames, one per message: u32 length, u32 CRC-32C of the
// payload, the payload: records of u64 seq, u16 queue name length, the
// name, u32 value length, the value (the entry as hub.db stores it). A
// frame of length 0 is the end of what was written (the rest of the
// segment is allocated, unwritten, and reads as zeros). A frame that is
// cut short or fails its checksum at the end of the last segment written
// is a write that was never acknowledged, and is dropped with a Warn
// line; elsewhere it is damage (an Error line, Stats.Corrupt counts its
// frames as lost; what follows it in its segment is lost with it).
const (
	walDirName     = "hub-wal"
	walSegmentSize = 16 << 20
	walFrameHeader = 8
	walMaxFrame    = 256 << 20 // a longer length is damage
)

var (
	walCRC       = crc32.MakeTable(crc32.Castagnoli)
	errWALBroken = errors.New("the hub's write-ahead log failed to write; the agent must restart")
)

// walRecord is one entry as the log holds it.
type walRecord struct {
	seq   uint64
	queue string
	val   []byte
}

// walSegment is one segment file.
type walSegment struct {
	num    uint64
	path   string
	maxSeq uint64 // highest seq written to it
}

// wal is the log's writer side. Only the store's log writer appends;
// trim runs on the applier.
type wal struct {
	dir string
	log *slog.Logger

	mu     sync.Mutex // segs and the files
	segs   []*walSegment
	f      *os.File // the current segment (last of segs)
	off    int64    // where the next frame goes in f
	broken error

	// spare is segment spareNum, made ready in the background (prep) for
	// the next roll.
	spare     *os.File
	spareNum  uint64
	preparing bool
	prep      sync.WaitGroup

	buf []byte
}

func walSegmentName(num uint64) string { return fmt.Sprintf("%020d.wal", num) }

// listWAL returns the segments in dir, in order.
func listWAL(dir string) ([]*walSegment, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var segs []*walSegment
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".wal")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(name, 10, 64)
		if err != nil {
			continue
		}
		segs = append(segs, &walSegment{num: n, path: filepath.Join(dir, e.Name())})
	}
	slices.SortFunc(segs, func(a, b *walSegment) int { return cmp.Compare(a.num, b.num) })
	return segs, nil
}

// walScan is what readWAL found.
type walScan struct {
	records []walRecord // with seq > after, in order
	maxSeq  uint64      // highest seq of any record
	torn    int         // frames cut off the end of the last segment
	corrupt int         // damaged frames elsewhere (and what followed them in their segment)
	lastNum uint64      // highest segment number
}

// readWAL reads every segment of dir, keeping the records past after.
func readWAL(dir string, after uint64) (walScan, error) {
	var sc walScan
	segs, err := listWAL(dir)
	if err != nil {
		return sc, err
	}
	for i, s := range segs {
		sc.lastNum = s.num
		data, err := os.ReadFile(s.path)
		if err != nil {
			return sc, fmt.Errorf("read %s: %w", s.path, err)
		}
		recs, bad := parseSegment(data)
		for _, r := range recs {
			sc.maxSeq = max(sc.maxSeq, r.seq)
			if r.seq > after {
				sc.records = append(sc.records, r)
			}
		}
		if bad {
			// The last segment with anything in it is where a crash cuts a
			// write short; a later one would have been started only after
			// this one's writes were synced.
			if laterWritten(segs[i+1:]) {
				sc.corrupt++
			} else {
				sc.torn++
			}
		}
	}
	return sc, nil
}

// laterWritten tells whether any of segs holds a frame.
func laterWritten(segs []*walSegment) bool {
	for _, s := range segs {
		f, err := os.Open(s.path)
		if err != nil {
			continue
		}
		var hdr [4]byte
		_, err = io.ReadFull(f, hdr[:])
		f.Close()
		if err == nil && binary.BigEndian.Uint32(hdr[:]) != 0 {
			return true
		}
	}
	return false
}

// parseSegment returns the records of a segment's frames up to the end
// of what was written, and whether it ended on a frame that is not whole
// or fails its checksum.
func parseSegment(data []byte) (recs []walRecord, bad bool) {
	for len(data) >= walFrameHeader {
		n := binary.BigEndian.Uint32(data)
		if n == 0 {
			return recs, false
		}
		if n > walMaxFrame || int(n) > len(data)-walFrameHeader {
			return recs, true
		}
		payload := data[walFrameHeader : walFrameHeader+int(n)]
		if crc32.Checksum(payload, walCRC) != binary.BigEndian.Uint32(data[4:]) {
			return recs, true
		}
		frame, ok := parseFrame(payload)
		if !ok {
			return recs, true
		}
		recs = append(recs, frame...)
		data = data[walFrameHeader+int(n):]
	}
	for _, b := range data {
		if b != 0 {
			return recs, true
		}
	}
	return recs, false
}

func parseFrame(p []byte) ([]walRecord, bool) {
	var out []walRecord
	for len(p) > 0 {
		if len(p) < 10 {
			return nil, false
		}
		seq := binary.BigEndian.Uint64(p)
		nl := int(binary.BigEndian.Uint16(p[8:]))
		p = p[10:]
		if len(p) < nl+4 {
			return nil, false
		}
		name := string(p[:nl])
		vl := int(binary.BigEndian.Uint32(p[nl:]))
		p = p[nl+4:]
		if len(p) < vl {
			return nil, false
		}
		out = append(out, walRecord{seq: seq, queue: name, val: slices.Clone(p[:vl])})
		p = p[vl:]
	}
	return out, true
}

// appendFrame appends one message's entries as a frame.
func appendFrame(dst []byte, es []*entry) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, walFrameHeader)...)
	for _, e := range es {
		dst = binary.BigEndian.AppendUint64(dst, e.seq)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(e.q.name)))
		dst = append(dst, e.q.name...)
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(e.val)))
		dst = append(dst, e.val...)
	}
	payload := dst[start+walFrameHeader:]
	binary.BigEndian.PutUint32(dst[start:], uint32(len(payload)))
	binary.BigEndian.PutUint32(dst[start+4:], crc32.Checksum(payload, walCRC))
	return dst
}

// openWAL starts a new segment after the existing ones (num after last),
// keeping the old ones until trim finds them applied.
func openWAL(dir string, last uint64, log *slog.Logger) (*wal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	old, err := listWAL(dir)
	if err != nil {
		return nil, err
	}
	w := &wal{dir: dir, log: log, segs: old}
	for _, s := range old {
		s.maxSeq = ^uint64(0) // until forgetOld: open applies them first
	}
	if err := w.roll(last + 1); err != nil {
		return nil, err
	}
	return w, nil
}

// createSegment makes segment num ready to be written: created, written
// with zeros to its full size and synced, the directory synced. Writing
// the zeros (rather than only allocating the blocks) is what makes a
// later write's fdatasync write data only, with no journal commit to wait
// for, which the file system shares with every other process.
func (w *wal) createSegment(num uint64) (*os.File, error) {
	path := filepath.Join(w.dir, walSegmentName(num))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	fail := func(err error) (*os.File, error) {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	zeros := make([]byte, 1<<20)
	for off := int64(0); off < walSegmentSize; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros, off); err != nil {
			return fail(fmt.Errorf("write %s: %w", path, err))
		}
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("sync %s: %w", path, err))
	}
	if err := fsutil.SyncDir(w.dir); err != nil {
		return fail(err)
	}
	return f, nil
}

// roll makes segment num the current one: the spare prepared in the
// background if there is one, else made now. w.mu held, or w not yet
// shared.
func (w *wal) roll(num uint64) error {
	f := w.spare
	w.spare = nil
	if f == nil || w.spareNum != num {
		if f != nil {
			f.Close()
			os.Remove(f.Name())
		}
		var err error
		if f, err = w.createSegment(num); err != nil {
			return err
		}
	}
	if w.f != nil {
		_ = w.f.Close()
	}
	w.f, w.off = f, 0
	w.segs = append(w.segs, &walSegment{num: num, path: f.Name()})
	w.prepareNext(num + 1)
	return nil
}

// prepareNext makes segment num in the background, for the next roll.
func (w *wal) prepareNext(num uint64) {
	if w.preparing {
		return
	}
	w.preparing = true
	w.prep.Go(func() {
		f, err := w.createSegment(num)
		w.mu.Lock()
		defer w.mu.Unlock()
		w.preparing = false
		if err != nil {
			w.log.Warn("prepare the next segment of the hub's write-ahead log", "error", err)
			return
		}
		if w.f == nil { // closed meanwhile
			f.Close()
			os.Remove(f.Name())
			return
		}
		w.spare, w.spareNum = f, num
	})
}

// write appends the frames of groups (each one message's entries) with
// one write and one fdatasync. After a failure the log refuses every
// write: what reached the disk of a failed write is unknown.
func (w *wal) write(groups [][]*entry) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken != nil {
		return w.broken
	}
	buf := w.buf[:0]
	var maxSeq uint64
	for _, g := range groups {
		buf = appendFrame(buf, g)
		maxSeq = max(maxSeq, g[len(g)-1].seq)
	}
	if w.cap(len(buf)) {
		if err := w.roll(w.segs[len(w.segs)-1].num + 1); err != nil {
			w.broken = fmt.Errorf("%w: %w", errWALBroken, err)
			return w.broken
		}
	}
	if _, err := w.f.WriteAt(buf, w.off); err != nil {
		w.broken = fmt.Errorf("%w: write %s: %w", errWALBroken, w.f.Name(), err)
		return w.broken
	}
	if err := syscall.Fdatasync(int(w.f.Fd())); err != nil {
		w.broken = fmt.Errorf("%w: sync %s: %w", errWALBroken, w.f.Name(), err)
		return w.broken
	}
	w.off += int64(len(buf))
	cur := w.segs[len(w.segs)-1]
	cur.maxSeq = max(cur.maxSeq, maxSeq)
	if cap(buf) <= 4<<20 {
		w.buf = buf
	}
	return nil
}

// cap tells whether n more bytes do not fit in the current segment (a
// segment's first frame always goes in it, however large).
func (w *wal) cap(n int) bool { return w.off > 0 && w.off+int64(n) > walSegmentSize }

// trim deletes the segments, other than the current one, whose records
// are all applied.
func (w *wal) trim(applied uint64) {
	w.mu.Lock()
	var gone []*walSegment
	keep := w.segs[:0]
	for i, s := range w.segs {
		if i < len(w.segs)-1 && s.maxSeq <= applied {
			gone = append(gone, s)
			continue
		}
		keep = append(keep, s)
	}
	w.segs = keep
	w.mu.Unlock()
	for _, s := range gone {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			w.log.Warn("remove an applied segment of the hub's write-ahead log", "path", s.path, "error", err)
		}
	}
}

// forgetOld marks the segments from before this run applied (open applies
// them before anything else).
func (w *wal) forgetOld() {
	w.mu.Lock()
	for _, s := range w.segs[:len(w.segs)-1] {
		s.maxSeq = 0
	}
	w.mu.Unlock()
}

func (w *wal) close() error {
	w.mu.Lock()
	if w.f == nil {
		w.mu.Unlock()
		return nil
	}
	err := w.f.Close()
	w.f = nil
	if w.broken == nil {
		w.broken = ErrStoreClosed
	}
	w.mu.Unlock()
	w.prep.Wait()
	if w.spare != nil {
		w.spare.Close()
		os.Remove(w.spare.Name()) // unused: the next open makes its own
		w.spare = nil
	}
	return err
}
