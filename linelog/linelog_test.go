package linelog

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// clock gives each record a time one millisecond after the last.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Millisecond)
	return c.t
}

var epoch = time.Date(2026, 12, 6, 8, 0, 0, 0, time.UTC)

// openLog opens a log in a temporary directory with a test clock.
func openLog(t *testing.T, cfg Config) (*Writer, *clock) {
	t.Helper()
	w, err := Open(filepath.Join(t.TempDir(), "logs", "m.log"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	c := &clock{t: epoch}
	w.now = c.now
	return w, c
}

func writeN(t *testing.T, w *Writer, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		stream := "stdout"
		if i%3 == 0 {
			stream = "stderr"
		}
		if err := w.WriteLine(stream, fmt.Appendf(nil, "line %05d", i)); err != nil {
			t.Fatal(err)
		}
	}
}

func texts(r Result) string {
	var b []string
	for _, e := range r.Entries {
		b = append(b, e.Text)
	}
	return strings.Join(b, ",")
}

func mustRead(t *testing.T, path string, f Filter) Result {
	t.Helper()
	r, err := Read(path, f)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// at is the time of the i-th line written (from 0) by writeN on a fresh clock.
func at(i int) time.Time { return epoch.Add(time.Duration(i+1) * time.Millisecond) }

func TestReadFilters(t *testing.T) {
	w, _ := openLog(t, Config{})
	writeN(t, w, 0, 10)
	for _, tc := range []struct {
		name      string
		f         Filter
		want      string
		truncated bool
	}{
		{"all", Filter{}, "line 00000,line 00001,line 00002,line 00003,line 00004,line 00005,line 00006,line 00007,line 00008,line 00009", false},
		{"tail", Filter{Tail: 3}, "line 00007,line 00008,line 00009", false},
		{"since is inclusive", Filter{Since: at(7)}, "line 00007,line 00008,line 00009", false},
		{"until is exclusive", Filter{Since: at(2), Until: at(4)}, "line 00002,line 00003", false},
		{"until alone", Filter{Until: at(2)}, "line 00000,line 00001", false},
		{"since then tail", Filter{Since: at(2), Tail: 2}, "line 00008,line 00009", false},
		{"tail beyond the log", Filter{Tail: 100}, "line 00000,line 00001,line 00002,line 00003,line 00004,line 00005,line 00006,line 00007,line 00008,line 00009", false},
		{"since after the last", Filter{Since: at(10)}, "", false},
		// Each text is 10 bytes: 25 bytes hold two.
		{"cap keeps the newest", Filter{MaxBytes: 25}, "line 00008,line 00009", true},
		{"cap with tail keeps the newest", Filter{Since: at(0), Tail: 5, MaxBytes: 25}, "line 00008,line 00009", true},
		{"cap reading on keeps the oldest", Filter{Since: at(3), MaxBytes: 25}, "line 00003,line 00004", true},
		{"cap not reached", Filter{Since: at(8), MaxBytes: 25}, "line 00008,line 00009", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := mustRead(t, w.Path(), tc.f)
			if got := texts(r); got != tc.want || r.Truncated != tc.truncated {
				t.Errorf("Read(%+v) = %q truncated=%v, want %q truncated=%v", tc.f, got, r.Truncated, tc.want, tc.truncated)
			}
		})
	}
	r := mustRead(t, w.Path(), Filter{Tail: 1})
	if e := r.Entries[0]; !e.Time.Equal(at(9)) || e.Stream != "stderr" {
		t.Errorf("last record %+v, want time %v on stderr", e, at(9))
	}
}

// The files stay within MaxFiles·MaxFileBytes; what is read is the newest
// lines, in order, across the rotated files.
func TestRotationBoundsTheLog(t *testing.T) {
	w, _ := openLog(t, Config{MaxFileBytes: 1000, MaxFiles: 3})
	writeN(t, w, 0, 500) // 500 records of 49 bytes: far more than 3000 bytes
	paths := files(w.Path())
	if len(paths) != 3 {
		t.Fatalf("files %v, want 3", paths)
	}
	total := int64(0)
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > 1000 {
			t.Errorf("%s is %d bytes, over MaxFileBytes", p, st.Size())
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", p, st.Mode().Perm())
		}
		total += st.Size()
	}
	all := mustRead(t, w.Path(), Filter{})
	if int64(len(all.Entries))*49 != total {
		t.Errorf("%d records read from %d bytes of files", len(all.Entries), total)
	}
	for i, e := range all.Entries {
		want := fmt.Sprintf("line %05d", 500-len(all.Entries)+i)
		if e.Text != want {
			t.Fatalf("record %d is %q, want %q (oldest first, none lost between the files)", i, e.Text, want)
		}
	}
	// Since and tail work across the files too.
	first := 500 - len(all.Entries)
	if got := texts(mustRead(t, w.Path(), Filter{Since: at(first + 1), Tail: 2})); got != "line 00498,line 00499" {
		t.Errorf("since+tail across files: %q", got)
	}
	if got := texts(mustRead(t, w.Path(), Filter{Since: at(first + 1), Until: at(first + 3)})); got != fmt.Sprintf("line %05d,line %05d", first+1, first+2) {
		t.Errorf("since+until in the oldest file: %q", got)
	}

	one, _ := openLog(t, Config{MaxFileBytes: 1000, MaxFiles: 1})
	writeN(t, one, 0, 100)
	if paths := files(one.Path()); len(paths) != 1 {
		t.Errorf("MaxFiles 1 keeps %v", paths)
	}
}

// Since bisects a large file: every start point finds exactly the lines at
// and after it.
func TestSinceInALargeFile(t *testing.T) {
	w, _ := openLog(t, Config{MaxFileBytes: 64 << 20})
	writeN(t, w, 0, 20000) // about 1 MB: many bisection steps
	for _, i := range []int{0, 1, 1234, 9999, 10000, 19998, 19999} {
		r := mustRead(t, w.Path(), Filter{Since: at(i), Tail: 1})
		if len(r.Entries) != 1 || r.Entries[0].Text != "line 19999" {
			t.Fatalf("since %d then tail 1: %q", i, texts(r))
		}
		r = mustRead(t, w.Path(), Filter{Since: at(i), Until: at(i + 1)})
		if got := texts(r); got != fmt.Sprintf("line %05d", i) {
			t.Fatalf("since %d until %d: %q", i, i+1, got)
		}
	}
}

// Text is one line: line ends become spaces; a long line is several
// records, none lost.
func TestLongAndMultilineText(t *testing.T) {
	w, _ := openLog(t, Config{})
	if err := w.WriteLine("stdout", []byte("a\nb\r\nc")); err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", MaxTextBytes*2+5)
	if err := w.WriteLine("stdout", []byte(long)); err != nil {
		t.Fatal(err)
	}
	r := mustRead(t, w.Path(), Filter{})
	if len(r.Entries) != 4 || r.Entries[0].Text != "a b  c" {
		t.Fatalf("records: %d, first %q", len(r.Entries), r.Entries[0].Text)
	}
	joined := r.Entries[1].Text + r.Entries[2].Text + r.Entries[3].Text
	if joined != long || len(r.Entries[1].Text) != MaxTextBytes {
		t.Errorf("a long line came back as pieces of %d, %d, %d bytes", len(r.Entries[1].Text), len(r.Entries[2].Text), len(r.Entries[3].Text))
	}
	// Backward reading sees the same records.
	if got := mustRead(t, w.Path(), Filter{Tail: 4}); len(got.Entries) != 4 || got.Entries[3].Text != r.Entries[3].Text {
		t.Errorf("tail 4: %d records", len(got.Entries))
	}
}

// A line torn by a crash is skipped, and the next record, written after a
// restart, is read.
func TestTornLastLine(t *testing.T) {
	w, c := openLog(t, Config{})
	writeN(t, w, 0, 3)
	w.Close()
	f, err := os.OpenFile(w.Path(), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("2026-12-06T08:00:00.0")
	f.Close()
	if got := texts(mustRead(t, w.Path(), Filter{})); got != "line 00000,line 00001,line 00002" {
		t.Errorf("with a torn last line: %q", got)
	}
	w2, err := Open(w.Path(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	w2.now = c.now
	w2.WriteLine("stdout", []byte("after the restart"))
	for _, f := range []Filter{{}, {Since: at(1)}, {Tail: 2}} {
		if got := texts(mustRead(t, w.Path(), f)); !strings.HasSuffix(got, "line 00002,after the restart") {
			t.Errorf("Read(%+v) after the restart: %q", f, got)
		}
	}
	if err := w.WriteLine("stdout", []byte("x")); err != ErrClosed {
		t.Errorf("write after Close: %v", err)
	}
}

func TestRemoveAndMissing(t *testing.T) {
	w, _ := openLog(t, Config{MaxFileBytes: 500, MaxFiles: 4})
	writeN(t, w, 0, 100)
	w.Close()
	if err := Remove(w.Path()); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(filepath.Dir(w.Path())); len(left) != 0 {
		t.Errorf("left after Remove: %v", left)
	}
	r := mustRead(t, w.Path(), Filter{Tail: 10})
	if len(r.Entries) != 0 {
		t.Errorf("a removed log reads %d records", len(r.Entries))
	}
}

// Two streams written at once (a module's stdout and stderr) interleave
// whole records.
func TestConcurrentStreams(t *testing.T) {
	w, _ := openLog(t, Config{MaxFileBytes: 4000, MaxFiles: 100})
	var wg sync.WaitGroup
	for _, s := range []string{"stdout", "stderr"} {
		wg.Go(func() {
			for i := range 500 {
				w.WriteLine(s, fmt.Appendf(nil, "%s %d", s, i))
			}
		})
	}
	wg.Wait()
	r := mustRead(t, w.Path(), Filter{})
	next := map[string]int{}
	for _, e := range r.Entries {
		want := fmt.Sprintf("%s %d", e.Stream, next[e.Stream])
		if e.Text != want {
			t.Fatalf("record %q on %s, want %q", e.Text, e.Stream, want)
		}
		next[e.Stream]++
	}
	if next["stdout"] != 500 || next["stderr"] != 500 {
		t.Errorf("records per stream: %v", next)
	}
}

// FuzzRead: whatever a log file holds (damaged, torn, not a log at all),
// Read returns records, never panics, and keeps to the filter's counts.
func FuzzRead(f *testing.F) {
	f.Add([]byte("2026-12-06T08:00:00.001000000Z stdout line one\n2026-12-06T08:00:00.002000000Z stderr two\n"), 1, 0, int64(0))
	f.Add([]byte("garbage\n\n2026-12-06T08:00:00.001000000Z x\n2026-12-06T08:00:00.00"), 0, 5, int64(1765008000))
	f.Add([]byte(""), 3, 3, int64(-1))
	f.Fuzz(func(t *testing.T, content []byte, tail, maxBytes int, sinceUnix int64) {
		path := filepath.Join(t.TempDir(), "m.log")
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		flt := Filter{Tail: max(tail%100, 0), MaxBytes: max(maxBytes%10000, 0)}
		if sinceUnix > 0 {
			flt.Since = time.Unix(sinceUnix%4e9, 0)
		}
		r, err := Read(path, flt)
		if err != nil {
			t.Fatal(err)
		}
		total := 0
		for _, e := range r.Entries {
			total += len(e.Text)
			if strings.ContainsRune(e.Text, '\n') || (!flt.Since.IsZero() && e.Time.Before(flt.Since)) {
				t.Fatalf("entry %+v with filter %+v", e, flt)
			}
		}
		if flt.Tail > 0 && len(r.Entries) > flt.Tail || flt.MaxBytes > 0 && total > flt.MaxBytes {
			t.Fatalf("%d entries, %d bytes, for %+v", len(r.Entries), total, flt)
		}
	})
}
