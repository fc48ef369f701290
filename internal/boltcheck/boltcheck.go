// Package boltcheck reads bbolt files that may be damaged without letting
// the damage crash the process.
//
// bbolt checksums only its two meta pages. A flipped byte in a branch or
// leaf page, or a file cut short, makes bbolt panic (a page that does not
// identify itself, an invalid page type) or fault (a page id beyond the
// mapped file): a Go panic trace, or a fatal signal no recover can catch.
// Guard turns both into an error naming the file, and Verify walks a
// whole file once under that guard, so that the code that opens it for
// real afterwards (raft-boltdb in raft's goroutines, bbolt's own check
// goroutines) only ever touches pages that were read safely.
package boltcheck

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// ErrDamaged is wrapped by every error that says the file itself is bad
// (as opposed to, say, a permission error opening it).
var ErrDamaged = errors.New("damaged bbolt file")

// Guard runs fn with memory faults turned into panics, and turns a panic
// in fn into an error wrapping ErrDamaged and naming path. fn must not
// start goroutines that read the file: the guard covers only this one.
func Guard(path string, fn func() error) (err error) {
	prev := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(prev)
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: %w: reading it failed inside bbolt: %v", path, ErrDamaged, firstLine(r))
		}
	}()
	return fn()
}

func firstLine(v any) string {
	s := fmt.Sprint(v)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// Open opens path with bbolt under Guard. A file bbolt refuses (both meta
// pages invalid, too small) is reported as ErrDamaged too; a missing file
// is created only when opts allow writing, as with bolt.Open.
//
// Opened for writing, bbolt reads its free list at once, and a file
// written without one (NoFreelistSync) is then rebuilt by walking every
// page on a goroutine of bbolt's own, outside any guard: Verify such a
// file first. Read-only, the free list is read here only when the file
// has one; otherwise Walk's check rebuilds it after its guarded walk.
func Open(path string, opts *bolt.Options) (*bolt.DB, error) {
	o := bolt.Options{}
	if opts != nil {
		o = *opts
	}
	if o.Timeout == 0 {
		// bbolt waits forever for the file lock by default.
		o.Timeout = 5 * time.Second
	}
	if o.ReadOnly {
		// Read a stored free list (a page, maybe with overflow pages) now,
		// under the guard, rather than in bbolt's check goroutine.
		metas, _ := Metas(path)
		o.PreLoadFreelist = newest(metas).Freelist != noFreelist
	}
	var db *bolt.DB
	err := Guard(path, func() error {
		var err error
		db, err = bolt.Open(path, 0o600, &o)
		return err
	})
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, ErrDamaged):
		return nil, err
	case isFormatError(err):
		return nil, fmt.Errorf("%s: %w: %v", path, ErrDamaged, err)
	}
	return nil, fmt.Errorf("open %s: %w", path, err)
}

// isFormatError tells bbolt's errors about the file's content from the
// others (permissions, locks).
func isFormatError(err error) bool {
	for _, e := range []error{bolt.ErrInvalid, bolt.ErrVersionMismatch, bolt.ErrChecksum, bolt.ErrInvalidMapping} {
		if errors.Is(err, e) {
			return true
		}
	}
	return strings.Contains(err.Error(), "file size too small")
}

// Visit receives every key of every top-level bucket, in order; value is
// nil for a nested bucket (whose keys are not visited).
type Visit func(bucket, key, value []byte) error

// Walk reads every page of db reachable from its root, within one read
// transaction and under Guard: every key of every bucket, nested ones
// included, checking that each bucket's keys ascend, and calling
// visit (when not nil) for each key of the top-level buckets. Then, the
// pages all having been read safely, it runs bbolt's own consistency check
// (free list against reachable pages, key order in branch pages too) when
// the file stores a free list. It also checks that the file holds every
// page its meta page counts: a file cut short would otherwise fault on the
// first access past its end.
//
// A file without a stored free list (written with NoFreelistSync) gets
// only the walk: bbolt's check would rebuild the list (DB.freepages) by
// walking the tree on a goroutine of its own, which goes on reading the
// file after the first problem it reports (freepages panics without
// waiting for it); once the caller closed the file, that read faults
// after Walk returned, out of reach of any guard, and the process dies
// (seen in node's TestDataDirFaults on a damaged history.db). Opening such
// a file for writing rebuilds the list too, inside Open's guard; bbolt
// then leaves the file mapped, so the goroutine reads valid memory.
func Walk(db *bolt.DB, visit Visit) error {
	path := db.Path()
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	metas, err := Metas(path)
	if err != nil {
		return err
	}
	storesFreeList := newest(metas).Freelist != noFreelist
	return Guard(path, func() error {
		return db.View(func(tx *bolt.Tx) error {
			if st.Size() < tx.Size() {
				return fmt.Errorf("%s: %w: the file is %d bytes, its meta page counts %d: it was cut short", path, ErrDamaged, st.Size(), tx.Size())
			}
			if err := walkBuckets(tx, visit); err != nil {
				return err
			}
			if !storesFreeList {
				return nil
			}
			var problems []string
			for e := range tx.Check() {
				problems = append(problems, e.Error())
			}
			if len(problems) > 0 {
				return fmt.Errorf("%s: %w: %s", path, ErrDamaged, strings.Join(problems[:min(len(problems), 3)], "; "))
			}
			return checkFreeList(tx)
		})
	})
}

// walkBuckets reads every key of every bucket of tx, nested buckets
// included, and checks that the keys of each bucket ascend: bbolt
// finds a key by binary search, so one out of order is a key it cannot
// find (its check reports the same). visit sees the keys of the top-level
// buckets, a nested bucket's with a nil value.
func walkBuckets(tx *bolt.Tx, visit Visit) error {
	w := bucketWalker{path: tx.DB().Path(), visit: visit}
	return w.walk(nil, tx.Cursor(), tx.Bucket)
}

type bucketWalker struct {
	path  string
	visit Visit
}

// walk reads the keys under c, those of the bucket names (nil:
// the root, whose keys are the top-level buckets); open opens a nested
// bucket by its key.
func (w *bucketWalker) walk(names [][]byte, c *bolt.Cursor, open func(key []byte) *bolt.Bucket) error {
	var prev []byte
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if prev != nil && bytes.Compare(prev, k) >= 0 {
			where := "the root bucket"
			if len(names) > 0 {
				where = "bucket " + string(bytes.Join(names, []byte("/")))
			}
			return fmt.Errorf("%s: %w: in %s, key %x follows key %x: its keys are out of order", w.path, ErrDamaged, where, k, prev)
		}
		prev = k
		if len(names) == 1 && w.visit != nil {
			if err := w.visit(names[0], k, v); err != nil {
				return err
			}
		}
		if v != nil {
			continue
		}
		if b := open(k); b != nil {
			if err := w.walk(append(slices.Clip(names), k), b.Cursor(), b.Bucket); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkFreeList catches what bbolt's check does not: a free list naming a
// meta page, or pages beyond the end of the file (bbolt would hand them
// out, and panic, at the next write).
func checkFreeList(tx *bolt.Tx) error {
	path := tx.DB().Path()
	pages := int(tx.Size() / int64(tx.DB().Info().PageSize))
	free := 0
	for id := 0; id < pages; id++ {
		info, err := tx.Page(id)
		if err != nil {
			return fmt.Errorf("%s: read page %d: %w", path, id, err)
		}
		if info == nil || info.Type != "free" {
			continue
		}
		if id < 2 {
			return fmt.Errorf("%s: %w: its free list names meta page %d", path, ErrDamaged, id)
		}
		free++
	}
	if listed := tx.DB().Stats().FreePageN; listed != free {
		return fmt.Errorf("%s: %w: its free list holds %d pages, %d of them in the file", path, ErrDamaged, listed, free)
	}
	return nil
}

// Verify opens the file at path read-only and walks it (Walk). A missing
// file is an error wrapping fs.ErrNotExist.
func Verify(path string, visit Visit) error {
	if _, err := os.Stat(path); err != nil {
		return err
	}
	db, err := Open(path, &bolt.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer db.Close()
	return Walk(db, visit)
}

// Meta is what one of a bbolt file's two meta pages says.
type Meta struct {
	// Valid: the page has bbolt's magic, version and a matching checksum.
	Valid bool
	// Txid is the transaction that wrote the page (as stored: meaningless
	// when Valid is false and the damage hit this field).
	Txid uint64
	// Freelist is the free list's page id (noFreelist: none stored).
	Freelist uint64
	// Missing: the file ends before this page.
	Missing bool
}

// NewestMetaDamaged reads the meta pages of the bbolt file at path and
// reports whether the one bbolt would have used, had it not been damaged,
// is the damaged one: bbolt then opens the file as it was one transaction
// earlier, without a word. (A damaged older page costs nothing: the next
// commit rewrites it.) The damaged page's txid may itself be what was hit,
// so only a page that still says it is the transaction just before the
// valid one counts as older.
func NewestMetaDamaged(path string) (bool, error) {
	m, err := Metas(path)
	if err != nil {
		return false, err
	}
	for i := range m {
		if other := m[1-i]; !m[i].Valid && !m[i].Missing && other.Valid && m[i].Txid+1 != other.Txid {
			return true, nil
		}
	}
	return false, nil
}

// newest is the meta page bbolt uses: the valid one with the higher txid.
func newest(m [2]Meta) Meta {
	switch {
	case m[0].Valid && (!m[1].Valid || m[0].Txid > m[1].Txid):
		return m[0]
	case m[1].Valid:
		return m[1]
	}
	return Meta{}
}

// Metas reads the two meta pages of the bbolt file at path. bbolt itself
// silently uses the other page when one is damaged, which loses the last
// committed transaction if the damaged page was the newer one; callers
// that cannot afford that (a log whose appends were acknowledged) check.
func Metas(path string) ([2]Meta, error) {
	var out [2]Meta
	f, err := os.Open(path)
	if err != nil {
		return out, err
	}
	defer f.Close()
	buf := make([]byte, pageHeaderSize+metaSize)
	pageSize := int64(os.Getpagesize())
	for i := range out {
		off := int64(0)
		if i == 1 {
			off = pageSize
		}
		if _, err := f.ReadAt(buf, off); err != nil {
			if errors.Is(err, io.EOF) {
				out[i].Missing = true // a file cut short: bbolt refuses it
				continue
			}
			return out, fmt.Errorf("read %s: %w", path, err)
		}
		m := buf[pageHeaderSize:]
		out[i] = Meta{Valid: metaValid(m), Txid: binary.LittleEndian.Uint64(m[metaTxidOffset:]),
			Freelist: binary.LittleEndian.Uint64(m[metaFreelistOffset:])}
		if i == 0 && out[0].Valid {
			pageSize = int64(binary.LittleEndian.Uint32(m[metaPageSizeOffset:]))
		}
	}
	return out, nil
}

// bbolt's on-disk meta page (format version 2), little-endian: a 16-byte
// page header, then magic, version, page size, flags (4 bytes each), the
// root bucket (root page id, sequence), the free list's page id, the high
// water mark, the transaction id and an FNV-64a checksum of everything
// before it.
const (
	pageHeaderSize     = 16
	metaSize           = 64
	metaPageSizeOffset = 8
	metaFreelistOffset = 32
	metaTxidOffset     = 48
	metaChecksumOffset = 56
	boltMagic          = 0xED0CDAED
	boltVersion        = 2
	noFreelist         = 0xFFFFFFFFFFFFFFFF
)

func metaValid(m []byte) bool {
	if binary.LittleEndian.Uint32(m[0:]) != boltMagic || binary.LittleEndian.Uint32(m[4:]) != boltVersion {
		return false
	}
	h := fnv.New64a()
	h.Write(m[:metaChecksumOffset])
	return h.Sum64() == binary.LittleEndian.Uint64(m[metaChecksumOffset:])
}
