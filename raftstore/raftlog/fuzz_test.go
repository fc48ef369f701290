package raftlog

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/raft"
)

// FuzzDecodeRecord: any bytes either decode to an entry whose record is
// exactly the bytes consumed, or are refused as cut short or damaged;
// never a panic or an allocation the header's length asked for unchecked.
// Seeds: testdata/fuzz/FuzzDecodeRecord.
func FuzzDecodeRecord(f *testing.F) {
	for _, e := range []*raft.Log{entry(1, 1), entry(77, 3), {Index: 5, Term: 2, Type: raft.LogNoop}} {
		f.Add(appendRecord(nil, e))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var l raft.Log
		n, err := decodeRecord(b, &l)
		if err != nil {
			if !errors.Is(err, errShort) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v is neither short nor damage", err)
			}
			return
		}
		if again := appendRecord(nil, &l); !bytes.Equal(again, b[:n]) {
			t.Fatalf("record re-encodes differently:\n%x\n%x", again, b[:n])
		}
	})
}

// FuzzScanSegment: a segment file of any content is read to its first bad
// record and no further, without panicking.
func FuzzScanSegment(f *testing.F) {
	seg := segmentHeader(10)
	for i := uint64(10); i < 13; i++ {
		seg = appendRecord(seg, entry(i, 1))
	}
	f.Add(seg)
	f.Add(seg[:len(seg)-3])
	f.Fuzz(func(t *testing.T, b []byte) {
		path := filepath.Join(t.TempDir(), segmentName(10))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		file, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		res, err := scanSegment(file, path, 10)
		if err != nil {
			return
		}
		if res.end > int64(len(b)) || (res.stop == nil && res.end != int64(len(b))) {
			t.Fatalf("scan ended at %d of %d bytes, stop %v", res.end, len(b), res.stop)
		}
		for k, off := range res.offsets {
			var l raft.Log
			if _, err := decodeRecord(b[off:], &l); err != nil || l.Index != 10+uint64(k) {
				t.Fatalf("record %d at %d: %v, index %d", k, off, err, l.Index)
			}
		}
	})
}
