package raftlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/hashicorp/raft"
)

// A record is one raft entry:
//
//	 0  u64 index
//	 8  u64 term
//	16  i64 appendedAt, Unix nanoseconds (0: the zero time)
//	24  u32 length of data
//	28  u32 length of extensions
//	32  u8  type (raft.LogType)
//	33  3 bytes, zero
//	36  u32 CRC-32C of data then extensions
//	40  u32 CRC-32C of bytes 0..40
//	44  data, then extensions
//
// Little-endian. The header has its own checksum so that a length is
// trusted before it is used: a file that ends inside a record whose header
// is whole is a write cut short, while a record of its full length that
// fails its checksum is damage.
const (
	headerSize = 44
	// MaxData and MaxExtensions cap one entry: a longer one is refused by
	// StoreLogs, and a header claiming more is damage. Our largest command
	// (a bulk import batch) is about 0.5 MB.
	MaxData       = 64 << 20
	MaxExtensions = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by every error about damaged files: the error
// names the file, and the offset where the damage is.
var ErrCorrupt = errors.New("raft log is damaged")

// errShort: the bytes end inside a record (a write cut short).
var errShort = errors.New("the record is cut short")

// recordSize is the encoded size of l.
func recordSize(l *raft.Log) int { return headerSize + len(l.Data) + len(l.Extensions) }

// appendRecord appends l's record to buf.
func appendRecord(buf []byte, l *raft.Log) []byte {
	start := len(buf)
	buf = append(buf, make([]byte, headerSize)...)
	h := buf[start:]
	binary.LittleEndian.PutUint64(h[0:], l.Index)
	binary.LittleEndian.PutUint64(h[8:], l.Term)
	var at int64
	if !l.AppendedAt.IsZero() {
		at = l.AppendedAt.UnixNano()
	}
	binary.LittleEndian.PutUint64(h[16:], uint64(at))
	binary.LittleEndian.PutUint32(h[24:], uint32(len(l.Data)))
	binary.LittleEndian.PutUint32(h[28:], uint32(len(l.Extensions)))
	h[32] = byte(l.Type)
	crc := crc32.Update(crc32.Checksum(l.Data, castagnoli), castagnoli, l.Extensions)
	binary.LittleEndian.PutUint32(h[36:], crc)
	binary.LittleEndian.PutUint32(h[40:], crc32.Checksum(h[:40], castagnoli))
	buf = append(buf, l.Data...)
	return append(buf, l.Extensions...)
}

// header is a record's header, checked.
type header struct {
	index, term   uint64
	appendedAt    int64
	dataLen, extL uint32
	typ           raft.LogType
	bodyCRC       uint32
}

func (h header) size() int64 { return headerSize + int64(h.dataLen) + int64(h.extL) }

// decodeHeader checks and decodes a record header. It returns errShort
// when b is shorter than a header, an error wrapping ErrCorrupt (without
// file or offset: the caller adds them) when the header is damaged.
func decodeHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, errShort
	}
	b = b[:headerSize]
	if want, got := binary.LittleEndian.Uint32(b[40:]), crc32.Checksum(b[:40], castagnoli); want != got {
		return header{}, fmt.Errorf("%w: record header fails its checksum (stored %08x, computed %08x)", ErrCorrupt, want, got)
	}
	h := header{
		index:      binary.LittleEndian.Uint64(b[0:]),
		term:       binary.LittleEndian.Uint64(b[8:]),
		appendedAt: int64(binary.LittleEndian.Uint64(b[16:])),
		dataLen:    binary.LittleEndian.Uint32(b[24:]),
		extL:       binary.LittleEndian.Uint32(b[28:]),
		typ:        raft.LogType(b[32]),
		bodyCRC:    binary.LittleEndian.Uint32(b[36:]),
	}
	switch {
	case b[33] != 0 || b[34] != 0 || b[35] != 0:
		return header{}, fmt.Errorf("%w: record header has non-zero padding", ErrCorrupt)
	case h.dataLen > MaxData:
		return header{}, fmt.Errorf("%w: record claims %d bytes of data, more than the cap of %d", ErrCorrupt, h.dataLen, MaxData)
	case h.extL > MaxExtensions:
		return header{}, fmt.Errorf("%w: record claims %d bytes of extensions, more than the cap of %d", ErrCorrupt, h.extL, MaxExtensions)
	case h.index == 0:
		return header{}, fmt.Errorf("%w: record of index 0", ErrCorrupt)
	}
	return h, nil
}

// decodeRecord decodes the record at the start of b into l, whose Data and
// Extensions then point into b. It returns the record's size; errShort when
// b ends inside the record; an error wrapping ErrCorrupt when it is damaged.
func decodeRecord(b []byte, l *raft.Log) (int, error) {
	h, err := decodeHeader(b)
	if err != nil {
		return 0, err
	}
	n := h.size()
	if int64(len(b)) < n {
		return 0, errShort
	}
	body := b[headerSize:n]
	if got := crc32.Checksum(body, castagnoli); got != h.bodyCRC {
		return 0, fmt.Errorf("%w: raft entry %d fails its checksum (stored %08x, computed %08x)", ErrCorrupt, h.index, h.bodyCRC, got)
	}
	*l = raft.Log{Index: h.index, Term: h.term, Type: h.typ}
	if h.dataLen > 0 {
		l.Data = body[:h.dataLen:h.dataLen]
	}
	if h.extL > 0 {
		l.Extensions = body[h.dataLen:]
	}
	if h.appendedAt != 0 {
		l.AppendedAt = time.Unix(0, h.appendedAt).UTC()
	}
	return int(n), nil
}

// Equal reports whether two entries are the same in every field a log
// store keeps (AppendedAt compared as an instant).
func Equal(a, b *raft.Log) bool {
	return a.Index == b.Index && a.Term == b.Term && a.Type == b.Type && bytes.Equal(a.Data, b.Data) &&
		bytes.Equal(a.Extensions, b.Extensions) && a.AppendedAt.Equal(b.AppendedAt)
}
