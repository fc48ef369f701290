package raftlog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// entry is the test's entry of index i and term t, with data that says so.
func entry(i, t uint64) *raft.Log {
	return &raft.Log{Index: i, Term: t, Type: raft.LogCommand,
		Data:       fmt.Appendf(nil, "entry %d of term %d %s", i, t, strings.Repeat("x", int(i%50))),
		Extensions: []byte{1, byte(i)}, AppendedAt: time.Unix(1700000000, int64(i)).UTC()}
}

func entries(from, to, term uint64) []*raft.Log {
	var out []*raft.Log
	for i := from; i <= to; i++ {
		out = append(out, entry(i, term))
	}
	return out
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func open(t *testing.T, dir string, machineDown bool) *Log {
	t.Helper()
	l, err := Open(dir, Options{SegmentSize: 4 << 10, MachineWentDown: machineDown, Logger: quiet})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}

func store(t *testing.T, l *Log, batches ...[]*raft.Log) {
	t.Helper()
	for _, b := range batches {
		if err := l.StoreLogs(b); err != nil {
			t.Fatalf("StoreLogs(%d..): %v", b[0].Index, err)
		}
	}
}

// inBatches splits es into batches of n.
func inBatches(es []*raft.Log, n int) [][]*raft.Log { return slices.Collect(slices.Chunk(es, n)) }

// want checks that l holds exactly es (first to last, every field).
func want(t *testing.T, l *Log, es []*raft.Log) {
	t.Helper()
	first, _ := l.FirstIndex()
	last, _ := l.LastIndex()
	if len(es) == 0 {
		if first != 0 || last != 0 {
			t.Fatalf("log is %d..%d, want empty", first, last)
		}
		return
	}
	if first != es[0].Index || last != es[len(es)-1].Index {
		t.Fatalf("log is %d..%d, want %d..%d", first, last, es[0].Index, es[len(es)-1].Index)
	}
	for _, e := range es {
		var got raft.Log
		if err := l.GetLog(e.Index, &got); err != nil {
			t.Fatalf("GetLog(%d): %v", e.Index, err)
		}
		if !Equal(&got, e) {
			t.Fatalf("GetLog(%d) = %+v, want %+v", e.Index, got, *e)
		}
	}
	var got raft.Log
	if err := l.GetLog(first-1, &got); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("GetLog(%d) before the first: %v, want ErrLogNotFound", first-1, err)
	}
	if err := l.GetLog(last+1, &got); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("GetLog(%d) after the last: %v, want ErrLogNotFound", last+1, err)
	}
}

func segments(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestLog_Changes: what the log holds after each kind of change, and after
// it is opened again.
func TestLog_Changes(t *testing.T) {
	all := entries(1, 300, 1) // about 20 segments of 4 KiB
	tests := []struct {
		name   string
		change func(t *testing.T, l *Log)
		want   []*raft.Log
	}{
		{name: "appends", change: func(t *testing.T, l *Log) {}, want: all},
		{name: "prefix inside a segment", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(1, 150); err != nil {
				t.Fatal(err)
			}
		}, want: all[150:]},
		{name: "prefix then more appends", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(0, 299); err != nil {
				t.Fatal(err)
			}
			store(t, l, entries(301, 320, 2))
		}, want: append(all[299:], entries(301, 320, 2)...)},
		{name: "suffix then appends of a new term (raft-wal v0.4.0 lost these at restart)", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(120, 300); err != nil {
				t.Fatal(err)
			}
			store(t, l, inBatches(entries(120, 200, 3), 7)...)
		}, want: append(slices.Clone(all[:119]), entries(120, 200, 3)...)},
		{name: "suffix at a segment's start", change: func(t *testing.T, l *Log) {
			segs := segments(t, l.dir)
			first, _ := parseSegmentName(filepath.Base(segs[len(segs)-3]))
			if err := l.DeleteRange(first, 300); err != nil {
				t.Fatal(err)
			}
			store(t, l, entries(first, first+5, 2))
		}, want: nil}, // filled in below: depends on segment boundaries
		{name: "everything, then a log starting elsewhere (a snapshot installed)", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(1, 300); err != nil {
				t.Fatal(err)
			}
			store(t, l, entries(1001, 1010, 4))
		}, want: entries(1001, 1010, 4)},
		{name: "everything", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(1, 300); err != nil {
				t.Fatal(err)
			}
		}, want: nil},
		{name: "everything, then from index 1 again", change: func(t *testing.T, l *Log) {
			if err := l.DeleteRange(1, 300); err != nil {
				t.Fatal(err)
			}
			store(t, l, entries(1, 3, 5))
		}, want: entries(1, 3, 5)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			l := open(t, dir, false)
			store(t, l, inBatches(all, 10)...)
			if n := len(segments(t, dir)); n < 5 {
				t.Fatalf("%d segments: the test wants several", n)
			}
			tc.change(t, l)
			wantLog := tc.want
			if strings.HasPrefix(tc.name, "suffix at a segment's start") {
				last, _ := l.LastIndex()
				wantLog = append(slices.Clone(all[:last-6]), entries(last-5, last, 2)...)
			}
			want(t, l, wantLog)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			l = open(t, dir, false)
			defer l.Close()
			want(t, l, wantLog)
			// And it goes on from there.
			next := uint64(1)
			if len(wantLog) > 0 {
				next = wantLog[len(wantLog)-1].Index + 1
			}
			store(t, l, entries(next, next+2, 9))
			want(t, l, append(slices.Clone(wantLog), entries(next, next+2, 9)...))
		})
	}
}

// TestLog_RefusesBadAppends: raft's contract, and the caps.
func TestLog_RefusesBadAppends(t *testing.T) {
	l := open(t, t.TempDir(), false)
	defer l.Close()
	store(t, l, entries(1, 5, 1))
	big := entry(6, 1)
	big.Data = make([]byte, MaxData+1)
	for _, tc := range []struct {
		name string
		es   []*raft.Log
		want string
	}{
		{"a gap", entries(7, 8, 1), "must follow the last one"},
		{"an overlap", entries(5, 6, 1), "must follow the last one"},
		{"out of order", []*raft.Log{entry(6, 1), entry(8, 1)}, "entry 8 where 7 belongs"},
		{"too large", []*raft.Log{big}, "too large"},
	} {
		if err := l.StoreLogs(tc.es); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: StoreLogs = %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	if err := l.DeleteRange(2, 3); err == nil {
		t.Errorf("DeleteRange inside the log: no error")
	}
	want(t, l, entries(1, 5, 1))
}

// TestLog_Stable: raft's term and vote, kept across opens; a key never set
// reads "not found", the text raft looks for.
func TestLog_Stable(t *testing.T) {
	dir := t.TempDir()
	l := open(t, dir, false)
	if _, err := l.Get([]byte("LastVoteCand")); err == nil || err.Error() != "not found" {
		t.Fatalf("Get of a key never set: %v, want \"not found\"", err)
	}
	if _, err := l.GetUint64([]byte("CurrentTerm")); err == nil || err.Error() != "not found" {
		t.Fatalf("GetUint64 of a key never set: %v, want \"not found\"", err)
	}
	if err := l.SetUint64([]byte("CurrentTerm"), 7); err != nil {
		t.Fatal(err)
	}
	if err := l.Set([]byte("LastVoteCand"), []byte("node-2")); err != nil {
		t.Fatal(err)
	}
	store(t, l, entries(1, 40, 7))
	if err := l.DeleteRange(1, 20); err != nil { // rewrites the meta file
		t.Fatal(err)
	}
	l.Close()
	l = open(t, dir, false)
	defer l.Close()
	if term, err := l.GetUint64([]byte("CurrentTerm")); err != nil || term != 7 {
		t.Fatalf("CurrentTerm = %d, %v; want 7", term, err)
	}
	if v, err := l.Get([]byte("LastVoteCand")); err != nil || string(v) != "node-2" {
		t.Fatalf("LastVoteCand = %q, %v; want node-2", v, err)
	}
	want(t, l, entries(21, 40, 7))
}

// TestLog_Damage: the files changed as a crash or a failing disk would,
// opened after a process crash and after the machine went down.
func TestLog_Damage(t *testing.T) {
	all := entries(1, 400, 1) // about 10 segments
	lastSeg := func(t *testing.T, dir string) string { s := segments(t, dir); return s[len(s)-1] }
	// endOf is the size of the segment at path without its last n records.
	recordsFrom := func(t *testing.T, path string, n int) int64 {
		t.Helper()
		first, _ := parseSegmentName(filepath.Base(path))
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		res, err := scanSegment(f, path, first)
		if err != nil || res.stop != nil {
			t.Fatal(err, res.stop)
		}
		return res.offsets[len(res.offsets)-n]
	}
	flip := func(t *testing.T, path string, off int64) {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[off] ^= 0x40
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cut := func(t *testing.T, path string, size int64) {
		t.Helper()
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string) (lost int) // how many entries at the end a cut-off loses
		// wantErr: refused after a process crash, with this in the
		// error; "" means opened, losing `lost` entries.
		wantErr string
		// machineDownErr: the same after the machine went down.
		machineDownErr string
	}{
		{name: "last record cut short inside its data", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			cut(t, p, recordsFrom(t, p, 1)+headerSize+3)
			return 1
		}},
		{name: "last record cut short inside its header", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			cut(t, p, recordsFrom(t, p, 1)+10)
			return 1
		}},
		{name: "last batch cut short after its first record", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			cut(t, p, recordsFrom(t, p, 2)+headerSize+20)
			return 2
		}},
		{name: "a flipped byte in the last record's data", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			flip(t, p, recordsFrom(t, p, 1)+headerSize+2)
			return 1
		}, wantErr: "offset"},
		{name: "a flipped byte in the last record's length", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			flip(t, p, recordsFrom(t, p, 1)+24)
			return 1
		}, wantErr: "record header fails its checksum"},
		{name: "garbage after the last record", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			f.Write(bytes.Repeat([]byte{0}, headerSize+10))
			f.Close()
			return 0
		}, wantErr: "record header fails its checksum"},
		{name: "a flipped byte in a middle record of the last segment", damage: func(t *testing.T, dir string) int {
			p := lastSeg(t, dir)
			flip(t, p, recordsFrom(t, p, 3)+headerSize+2)
			return 3
		}, wantErr: "fails its checksum"},
		{name: "a flipped byte in an earlier segment", damage: func(t *testing.T, dir string) int {
			p := segments(t, dir)[2]
			flip(t, p, recordsFrom(t, p, 1)+headerSize+1)
			return 0
		}, wantErr: "not the last segment", machineDownErr: "not the last segment"},
		{name: "an earlier segment cut short", damage: func(t *testing.T, dir string) int {
			p := segments(t, dir)[2]
			cut(t, p, recordsFrom(t, p, 1)+5)
			return 0
		}, wantErr: "not the last segment", machineDownErr: "not the last segment"},
		{name: "a segment's header", damage: func(t *testing.T, dir string) int {
			flip(t, lastSeg(t, dir), 20)
			return 0
		}, wantErr: "header is not that of the segment", machineDownErr: "header is not that of the segment"},
		{name: "a segment missing", damage: func(t *testing.T, dir string) int {
			os.Remove(segments(t, dir)[3])
			return 0
		}, wantErr: "ends at entry", machineDownErr: "ends at entry"},
		{name: "the first segment missing", damage: func(t *testing.T, dir string) int {
			os.Remove(segments(t, dir)[0])
			return 0
		}, wantErr: "are missing", machineDownErr: "are missing"},
		{name: "a flipped byte in the meta file", damage: func(t *testing.T, dir string) int {
			flip(t, filepath.Join(dir, metaFile), 25)
			return 0
		}, wantErr: "meta: raft log is damaged", machineDownErr: "meta: raft log is damaged"},
		{name: "the meta file gone", damage: func(t *testing.T, dir string) int {
			os.Remove(filepath.Join(dir, metaFile))
			return 0
		}, wantErr: "names no first entry", machineDownErr: "names no first entry"},
	}
	for _, tc := range tests {
		for _, machineDown := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/machine_down=%v", tc.name, machineDown), func(t *testing.T) {
				dir := t.TempDir()
				l := open(t, dir, false)
				store(t, l, inBatches(all, 10)...)
				if err := l.SetUint64([]byte("CurrentTerm"), 1); err != nil {
					t.Fatal(err)
				}
				l.Close()
				lost := tc.damage(t, dir)
				before := snapshotDir(t, dir)
				wantErr := tc.wantErr
				if machineDown {
					wantErr = tc.machineDownErr
				}
				l, err := Open(dir, Options{SegmentSize: 4 << 10, MachineWentDown: machineDown, Logger: quiet})
				if wantErr != "" {
					if err == nil {
						l.Close()
						t.Fatalf("Open: no error, want one with %q", wantErr)
					}
					if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), wantErr) || !strings.Contains(err.Error(), dir) {
						t.Fatalf("Open: %v; want ErrCorrupt naming the file, with %q", err, wantErr)
					}
					if after := snapshotDir(t, dir); !maps2Equal(before, after) {
						t.Fatalf("Open refused the log but changed its files")
					}
					return
				}
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				defer l.Close()
				kept := all[:len(all)-lost]
				want(t, l, kept)
				// Appends go on after what was kept, and survive a reopen.
				next := kept[len(kept)-1].Index + 1
				store(t, l, entries(next, next+3, 2))
				l.Close()
				l = open(t, dir, false)
				want(t, l, append(slices.Clone(kept), entries(next, next+3, 2)...))
			})
		}
	}
}

func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func maps2Equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestLog_GetLogFindsLaterDamage: a record damaged or cut off after the
// log opened is an error wrapping ErrCorrupt naming the file, not a wrong
// entry nor an I/O error (raftstore stops the state machine on ErrCorrupt;
// raft panics on any other read error while applying).
func TestLog_GetLogFindsLaterDamage(t *testing.T) {
	dir := t.TempDir()
	l := open(t, dir, false)
	defer l.Close()
	store(t, l, entries(1, 10, 1))
	p := segments(t, dir)[0]
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{'!'}, int64(segHeaderSize+headerSize+1))
	f.Close()
	var got raft.Log
	if err := l.GetLog(1, &got); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), p) {
		t.Fatalf("GetLog of a damaged record: %v, want ErrCorrupt naming %s", err, p)
	}
	if err := l.GetLog(2, &got); err != nil {
		t.Fatalf("GetLog of the next record: %v", err)
	}
	// Cut short under the running log: the last entry is past the end.
	if err := os.Truncate(p, int64(segHeaderSize+headerSize)); err != nil {
		t.Fatal(err)
	}
	if err := l.GetLog(10, &got); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), p) {
		t.Fatalf("GetLog of an entry cut off the file: %v, want ErrCorrupt naming %s", err, p)
	}
}

// TestLog_CutShortBelowTheFirstEntry: a last segment that ends inside a
// record is a write cut short only if what remains still reaches the
// log's first entry; a cut that takes entries raft kept after compacting
// is damage, refused without changing a file.
func TestLog_CutShortBelowTheFirstEntry(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir, Options{Logger: quiet}) // one segment
	if err != nil {
		t.Fatal(err)
	}
	store(t, l, inBatches(entries(1, 60, 1), 10)...)
	if err := l.DeleteRange(1, 40); err != nil {
		t.Fatal(err)
	}
	l.Close()
	seg := segments(t, dir)[0]
	if err := os.Truncate(seg, int64(segHeaderSize)+30*headerSize); err != nil { // inside entry 20 or so
		t.Fatal(err)
	}
	before := snapshotDir(t, dir)
	if l, err := Open(dir, Options{Logger: quiet}); err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), seg) {
		if err == nil {
			l.Close()
		}
		t.Fatalf("Open: %v; want ErrCorrupt naming %s", err, seg)
	}
	if !maps2Equal(before, snapshotDir(t, dir)) {
		t.Fatal("the refusal changed the files")
	}
}
