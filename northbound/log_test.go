package northbound

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

func appendN(t *testing.T, l *Log, from, n int) {
	t.Helper()
	var ps [][]byte
	for i := from; i < from+n; i++ {
		ps = append(ps, []byte("message-"+strconv.Itoa(i)))
	}
	if _, err := l.Append(context.Background(), ps); err != nil {
		t.Fatal(err)
	}
}

func readAll(t *testing.T, l *Log, from uint64) (offs []uint64, bodies []string, trimmed []*TrimmedError) {
	t.Helper()
	r := l.NewReader(from)
	defer r.Close()
	for {
		off, p, ok, err := r.Poll()
		var te *TrimmedError
		if errors.As(err, &te) {
			trimmed = append(trimmed, te)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return
		}
		offs = append(offs, off)
		bodies = append(bodies, string(p))
	}
}

// TestLog_TornTailIsCutAndOffsetsGoOn: bytes of a write that never
// finished (a crash) are cut off at open, what was whole is read back, and
// new appends take the next offsets.
func TestLog_TornTailIsCutAndOffsetsGoOn(t *testing.T) {
	dir := t.TempDir()
	l, err := OpenLog(dir, LogOptions{}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 0, 10)
	l.Close()
	seg := filepath.Join(dir, "00000000000000000000.seg")
	f, err := os.OpenFile(seg, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(appendFrame(nil, []byte("torn"))[:7])
	f.Close()
	l, err = OpenLog(dir, LogOptions{}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	appendN(t, l, 10, 2)
	offs, bodies, _ := readAll(t, l, 0)
	if len(offs) != 12 || offs[11] != 11 || bodies[10] != "message-10" || bodies[9] != "message-9" {
		t.Fatalf("read back %v %q", offs, bodies)
	}
}

// TestLog_TrimBySizeAndAge: segments over the size go oldest first, a
// reader behind them learns which offsets are gone, and an expired log is
// emptied without losing its place: the offsets go on across a reopen.
func TestLog_TrimBySizeAndAge(t *testing.T) {
	dir := t.TempDir()
	opts := LogOptions{MaxBytes: 4 << 10, SegmentBytes: 1 << 10, MaxAge: time.Hour}
	l, err := OpenLog(dir, opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	var told [][2]uint64
	l.onTrim = func(from, to uint64, _ string) { told = append(told, [2]uint64{from, to}) }
	for i := 0; i < 400; i++ {
		appendN(t, l, i, 1)
	}
	l.Trim(time.Now())
	st := l.Stats()
	if st.Bytes > 4<<10 || st.First == 0 || st.End != 400 || len(told) == 0 || told[0][0] != 0 || told[len(told)-1][1] != st.First {
		t.Fatalf("after trimming by size: %+v, told %v", st, told)
	}
	offs, _, trimmed := readAll(t, l, 0)
	if len(trimmed) != 1 || trimmed[0].From != 0 || trimmed[0].Next != st.First || offs[0] != st.First || offs[len(offs)-1] != 399 {
		t.Fatalf("reader from 0: trimmed %+v, first %d", trimmed, offs[0])
	}
	l.Trim(time.Now().Add(2 * time.Hour))
	if st := l.Stats(); st.First != 400 || st.End != 400 || st.Bytes != 0 {
		t.Fatalf("after expiry: %+v", st)
	}
	l.Close()
	l, err = OpenLog(dir, opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	appendN(t, l, 400, 1)
	if offs, _, _ := readAll(t, l, 0); len(offs) != 1 || offs[0] != 400 {
		t.Fatalf("after reopening an expired log: %v", offs)
	}
}

// TestLog_DamagedFrameIsSkippedAndCounted: a frame whose checksum fails is
// never returned; the reader skips the rest of its segment and the loss is
// counted.
func TestLog_DamagedFrameIsSkippedAndCounted(t *testing.T) {
	dir := t.TempDir()
	l, err := OpenLog(dir, LogOptions{SegmentBytes: 1 << 10}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := 0; i < 100; i++ {
		appendN(t, l, i, 1)
	}
	seg := filepath.Join(dir, "00000000000000000000.seg")
	data, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	data[frameHeader*3+40] ^= 0xff // inside the fourth frame or so
	if err := os.WriteFile(seg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	offs, bodies, trimmed := readAll(t, l, 0)
	if len(trimmed) != 1 || !trimmed[0].Corrupt || l.Stats().Corrupt != trimmed[0].Next-trimmed[0].From {
		t.Fatalf("trimmed %+v, corrupt %d", trimmed, l.Stats().Corrupt)
	}
	for i, off := range offs {
		if bodies[i] != "message-"+strconv.FormatUint(off, 10) {
			t.Fatalf("offset %d read as %q", off, bodies[i])
		}
	}
	if offs[len(offs)-1] != 99 || uint64(len(offs))+l.Stats().Corrupt != 100 {
		t.Fatalf("read %d, lost %d", len(offs), l.Stats().Corrupt)
	}
}
