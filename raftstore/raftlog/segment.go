package raftlog

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/hashicorp/raft"

	"appliance/internal/fsutil"
)

// A segment file, <first index, 20 digits>.seg, starts with
//
//	"raftlog-seg\x00v1\n" (16 bytes), u64 first index, u32 CRC-32C of the 24 bytes before
//
// followed by records of consecutive indexes from the first. It is made
// whole (written to <name>.tmp, fsynced, renamed, the directory fsynced)
// before any record goes in, so a segment's header is never torn.
const (
	segMagic      = "raftlog-seg\x00v1\n"
	segHeaderSize = len(segMagic) + 8 + 4
	segSuffix     = ".seg"
	tmpSuffix     = ".tmp"
)

type segment struct {
	first   uint64
	path    string
	f       *os.File
	offsets []int64 // offsets[i]: where the record of index first+i starts
	end     int64   // where the next record goes
}

// lastIndex is the index of the segment's last record (first-1 when empty).
func (s *segment) lastIndex() uint64 { return s.first + uint64(len(s.offsets)) - 1 }

// span is where the record of index i is, and how long it is.
func (s *segment) span(i uint64) (off, n int64) {
	k := i - s.first
	off = s.offsets[k]
	if k+1 < uint64(len(s.offsets)) {
		return off, s.offsets[k+1] - off
	}
	return off, s.end - off
}

func segmentName(first uint64) string { return fmt.Sprintf("%020d%s", first, segSuffix) }

// parseSegmentName returns the first index a segment file's name gives.
func parseSegmentName(name string) (uint64, bool) {
	num, ok := strings.CutSuffix(name, segSuffix)
	if !ok || len(num) != 20 {
		return 0, false
	}
	first, err := strconv.ParseUint(num, 10, 64)
	return first, err == nil && first > 0
}

func segmentHeader(first uint64) []byte {
	b := make([]byte, 0, segHeaderSize)
	b = append(b, segMagic...)
	b = binary.LittleEndian.AppendUint64(b, first)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// createSegment makes an empty segment whose first record will be first.
func createSegment(dir string, first uint64) (*segment, error) {
	path := filepath.Join(dir, segmentName(first))
	tmp := path + tmpSuffix
	os.Remove(tmp) // left by a crash during an earlier creation
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	fail := func(err error) (*segment, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	if _, err := f.WriteAt(segmentHeader(first), 0); err != nil {
		return fail(fmt.Errorf("write %s: %w", tmp, err))
	}
	if err := fdatasync(f); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("rename %s: %w", tmp, err))
	}
	if err := fsutil.SyncDir(dir); err != nil {
		f.Close()
		return nil, err
	}
	return &segment{first: first, path: path, f: f, end: int64(segHeaderSize)}, nil
}

// scanResult is what reading a segment from end to end found: the records
// that are whole and check out, and what stopped the scan before the end
// of the file (nil when nothing did).
type scanResult struct {
	offsets []int64
	end     int64 // after the last good record
	stop    error // errShort or an error wrapping ErrCorrupt, naming file and offset
}

// scanSegment reads every record of the segment, checking each one's
// checksums and that the indexes run on from the first. An error is
// returned for a header that is not a segment's; damage in the records is
// reported in stop.
func scanSegment(f *os.File, path string, first uint64) (scanResult, error) {
	r := bufio.NewReaderSize(f, 1<<20)
	hdr := make([]byte, segHeaderSize)
	if _, err := io.ReadFull(r, hdr); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return scanResult{}, fmt.Errorf("%s: %w: the file is shorter than a segment header (%d bytes)", path, ErrCorrupt, segHeaderSize)
		}
		return scanResult{}, fmt.Errorf("read %s: %w", path, err)
	}
	if string(hdr) != string(segmentHeader(first)) {
		return scanResult{}, fmt.Errorf("%s: %w: its header is not that of the segment starting at entry %d", path, ErrCorrupt, first)
	}
	res := scanResult{end: int64(segHeaderSize)}
	var buf []byte
	var l raft.Log
	for {
		b, err := r.Peek(headerSize)
		if len(b) == 0 && errors.Is(err, io.EOF) {
			return res, nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return res, fmt.Errorf("read %s: %w", path, err)
		}
		at := func(err error) error {
			if errors.Is(err, errShort) {
				return fmt.Errorf("%s: offset %d: %w: %w", path, res.end, ErrCorrupt, err)
			}
			return fmt.Errorf("%s: offset %d: %w", path, res.end, err)
		}
		h, err := decodeHeader(b)
		if err != nil {
			res.stop = at(err)
			return res, nil
		}
		n := h.size()
		if int64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		if _, err := io.ReadFull(r, buf); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				res.stop = at(errShort)
				return res, nil
			}
			return res, fmt.Errorf("read %s: %w", path, err)
		}
		if _, err := decodeRecord(buf, &l); err != nil {
			res.stop = at(err)
			return res, nil
		}
		if want := first + uint64(len(res.offsets)); l.Index != want {
			res.stop = at(fmt.Errorf("%w: entry %d where entry %d belongs", ErrCorrupt, l.Index, want))
			return res, nil
		}
		res.offsets = append(res.offsets, res.end)
		res.end += n
	}
}

func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("sync %s: %w", f.Name(), err)
		}
		return nil
	}
}
