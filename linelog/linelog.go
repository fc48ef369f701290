// Package linelog keeps lines of text in bounded, rotated files, each line
// stamped with the time it was written and the stream it came from, and
// reads them back by time and count. The agent keeps each process
// module's stdout and stderr in one (so that a module's output never
// reaches the agent's own log) and its own log in another; the edgeAgent
// direct method GetModuleLogs and the support bundle read them.
//
// A file holds one record per line:
//
//	2026-12-06T17:11:00.123456789Z stdout the text as the program wrote it
//
// (a UTC timestamp of fixed width, the stream, the text). When writing a
// record would take the file past MaxFileBytes it is rotated: name.log
// becomes name.log.1, name.log.1 becomes name.log.2, and so on, the oldest
// beyond MaxFiles deleted, so a log never holds more than about
// MaxFiles·MaxFileBytes. Records are written with one write(2) each, not
// buffered (a reader sees a line as soon as it is written) and not
// fsynced (a log, not state: a crash may lose its last lines, and a torn
// last line is skipped by readers).
package linelog

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of Config: a module keeps at most about 30 MiB of output, as
// Docker's json-file log driver with the max-size 10m, max-file 3 that
// IoT Edge recommends.
const (
	DefaultMaxFileBytes = 10 << 20
	DefaultMaxFiles     = 3
	// MaxTextBytes caps the text of one record; a longer line is written
	// as several records.
	MaxTextBytes = 16 << 10
)

// timeLayout is RFC 3339 in UTC with nine fractional digits: every stamp
// has the same width, so that records sort as text and a reader finds a
// time by bisecting a file.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

var stampWidth = len(timeLayout)

// Config bounds a log's files.
type Config struct {
	// MaxFileBytes is the size at which the current file is rotated.
	// Default DefaultMaxFileBytes.
	MaxFileBytes int64
	// MaxFiles is how many files are kept, the current one included (1:
	// the file is emptied when full). Default DefaultMaxFiles.
	MaxFiles int
}

func (c Config) withDefaults() Config {
	if c.MaxFileBytes <= 0 {
		c.MaxFileBytes = DefaultMaxFileBytes
	}
	if c.MaxFiles <= 0 {
		c.MaxFiles = DefaultMaxFiles
	}
	return c
}

// Writer appends records to a log. Its methods may be called from several
// goroutines.
type Writer struct {
	path string
	cfg  Config
	now  func() time.Time

	mu     sync.Mutex
	f      *os.File
	size   int64
	closed bool
	buf    []byte
}

// ErrClosed is returned by a Writer after Close.
var ErrClosed = errors.New("log closed")

// Open opens the log at path for appending (creating its directory 0700
// and the file 0600). A last line left torn by a crash is ended first, so
// that the next record starts on a line of its own.
func Open(path string, cfg Config) (*Writer, error) {
	w := &Writer{path: path, cfg: cfg.withDefaults(), now: time.Now}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("log directory: %w", err)
	}
	if err := w.open(); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *Writer) open() error {
	f, err := os.OpenFile(w.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open log: %w", err)
	}
	// A last line torn by a crash is ended, so that the next record
	// starts on a line of its own (the file is open for appending only:
	// its last byte is read through a second descriptor).
	if st.Size() > 0 {
		rf, err := os.Open(w.path)
		if err == nil {
			last := make([]byte, 1)
			if _, err := rf.ReadAt(last, st.Size()-1); err == nil && last[0] != '\n' {
				if _, err := f.Write([]byte{'\n'}); err == nil {
					rf.Close()
					w.f, w.size = f, st.Size()+1
					return nil
				}
			}
			rf.Close()
		}
	}
	w.f, w.size = f, st.Size()
	return nil
}

// Path is the current file's path.
func (w *Writer) Path() string { return w.path }

// WriteLine appends one line of text from stream (a word: stdout, stderr,
// agent). Line ends in text are replaced by spaces; a text longer than
// MaxTextBytes is written as several records.
func (w *Writer) WriteLine(stream string, text []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	for {
		piece := text
		if len(piece) > MaxTextBytes {
			piece = piece[:MaxTextBytes]
		}
		if err := w.writeRecord(stream, piece); err != nil {
			return err
		}
		text = text[len(piece):]
		if len(text) == 0 {
			return nil
		}
	}
}

func (w *Writer) writeRecord(stream string, text []byte) error {
	b := w.now().UTC().AppendFormat(w.buf[:0], timeLayout)
	b = append(b, ' ')
	b = append(b, stream...)
	b = append(b, ' ')
	start := len(b)
	b = append(b, text...)
	for i := start; i < len(b); i++ {
		if b[i] == '\n' || b[i] == '\r' {
			b[i] = ' '
		}
	}
	b = append(b, '\n')
	w.buf = b
	if w.size > 0 && w.size+int64(len(b)) > w.cfg.MaxFileBytes {
		if err := w.rotate(); err != nil {
			return err
		}
	}
	n, err := w.f.Write(b)
	w.size += int64(n)
	return err
}

// rotate moves the current file to .1 (and each older one a place
// further, the oldest out) and starts an empty one.
func (w *Writer) rotate() error {
	w.f.Close()
	if w.cfg.MaxFiles <= 1 {
		if err := os.Remove(w.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("rotate log: %w", err)
		}
		return w.open()
	}
	_ = os.Remove(rotated(w.path, w.cfg.MaxFiles-1))
	for i := w.cfg.MaxFiles - 2; i >= 1; i-- {
		if err := os.Rename(rotated(w.path, i), rotated(w.path, i+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("rotate log: %w", err)
		}
	}
	if err := os.Rename(w.path, rotated(w.path, 1)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate log: %w", err)
	}
	return w.open()
}

// Close closes the log; later writes fail with ErrClosed.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	return w.f.Close()
}

// Stream returns an io.Writer that writes each call as one line of
// stream (trailing newlines dropped): a slog handler's output, whose every
// record is one Write.
func (w *Writer) Stream(stream string) io.Writer { return streamWriter{w, stream} }

type streamWriter struct {
	w      *Writer
	stream string
}

func (s streamWriter) Write(p []byte) (int, error) {
	if err := s.w.WriteLine(s.stream, bytes.TrimRight(p, "\n")); err != nil {
		return 0, err
	}
	return len(p), nil
}

func rotated(path string, i int) string { return path + "." + strconv.Itoa(i) }

// Remove deletes a log: its current file and every rotated one.
func Remove(path string) error {
	var first error
	for _, p := range files(path) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) && first == nil {
			first = err
		}
	}
	return first
}

// files are a log's files that exist, oldest first.
func files(path string) []string {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	rotations := map[int]string{}
	current := false
	for _, e := range entries {
		name := e.Name()
		if name == base {
			current = true
			continue
		}
		if n, ok := strings.CutPrefix(name, base+"."); ok {
			if i, err := strconv.Atoi(n); err == nil && i >= 1 && strconv.Itoa(i) == n {
				rotations[i] = filepath.Join(dir, name)
			}
		}
	}
	var out []string
	for _, i := range slices.Backward(slices.Sorted(maps.Keys(rotations))) {
		out = append(out, rotations[i])
	}
	if current {
		out = append(out, path)
	}
	return out
}

// Entry is one record of a log.
type Entry struct {
	Time   time.Time
	Stream string
	Text   string
}

// Filter selects records. The zero Filter selects every record.
type Filter struct {
	// Since and Until bound the records' times (Since inclusive, Until
	// exclusive); zero: no bound.
	Since, Until time.Time
	// Tail keeps only the last Tail records of those selected; 0: all.
	Tail int
	// MaxBytes caps the text returned (0: no cap). When more is selected,
	// the newest records that fit are kept, or, with Since and no Tail
	// (reading on from a point), the oldest: the caller then reads on from
	// the last one returned.
	MaxBytes int
}

// Result is what Read found.
type Result struct {
	Entries []Entry
	// Truncated: MaxBytes left records out.
	Truncated bool
}

// Read returns the records of the log at path that f selects, oldest
// first. A log that does not exist has none. Records are in the order they
// were written; their times are assumed not to go back (a clock set back
// makes Since and Until approximate, never an error). Lines that are not
// records (torn by a crash) are skipped.
func Read(path string, f Filter) (Result, error) {
	paths := files(path)
	if f.Since.IsZero() {
		return readBackward(paths, f)
	}
	return readForward(paths, f)
}

// readForward reads from the first record at or after f.Since on.
func readForward(paths []string, f Filter) (Result, error) {
	var res Result
	var ring []Entry // with Tail: the last Tail records
	bytesKept := 0
	keepNewest := f.Tail > 0
	for _, p := range paths {
		file, err := os.Open(p)
		if errors.Is(err, os.ErrNotExist) {
			continue // rotated away meanwhile
		}
		if err != nil {
			return res, err
		}
		st, err := file.Stat()
		if err != nil {
			file.Close()
			return res, err
		}
		// Every record of a file is at or before its last write.
		if st.ModTime().Before(f.Since) {
			file.Close()
			continue
		}
		off, err := seek(file, st.Size(), f.Since)
		if err != nil {
			file.Close()
			return res, err
		}
		br := bufio.NewReaderSize(io.NewSectionReader(file, off, st.Size()-off), 64<<10)
		stop := false
		for !stop {
			line, err := br.ReadSlice('\n')
			if err == bufio.ErrBufferFull {
				// Longer than any record: not one. Skip it.
				for err == bufio.ErrBufferFull {
					_, err = br.ReadSlice('\n')
				}
				continue
			}
			if len(line) == 0 || line[len(line)-1] != '\n' {
				break // end, or a torn last line
			}
			e, ok := parse(line)
			switch {
			case !ok || e.Time.Before(f.Since):
				continue
			case !f.Until.IsZero() && !e.Time.Before(f.Until):
				stop = true
				continue
			}
			if keepNewest {
				ring = append(ring, e)
				bytesKept += len(e.Text)
				for len(ring) > f.Tail || f.MaxBytes > 0 && bytesKept > f.MaxBytes && len(ring) > 0 {
					if len(ring) <= f.Tail {
						res.Truncated = true
					}
					bytesKept -= len(ring[0].Text)
					ring = ring[1:]
				}
				continue
			}
			if f.MaxBytes > 0 && bytesKept+len(e.Text) > f.MaxBytes {
				res.Truncated = true
				stop = true
				continue
			}
			bytesKept += len(e.Text)
			res.Entries = append(res.Entries, e)
		}
		file.Close()
		if stop {
			break
		}
	}
	if keepNewest {
		res.Entries = append([]Entry(nil), ring...)
	}
	return res, nil
}

// seek returns the offset of the first record at or after since (about:
// it bisects to within a block, the caller skips what is older).
func seek(f *os.File, size int64, since time.Time) (int64, error) {
	const window = 64 << 10
	lo, hi := int64(0), size
	stamp := make([]byte, stampWidth)
	for hi-lo > window {
		mid := lo + (hi-lo)/2
		start, err := nextLineStart(f, mid, hi)
		if err != nil {
			return 0, err
		}
		if start >= hi {
			hi = mid
			continue
		}
		if _, err := f.ReadAt(stamp, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		t, err := time.Parse(timeLayout, string(stamp))
		if err != nil || !t.Before(since) {
			hi = start
			continue
		}
		lo = start
	}
	return lo, nil
}

// nextLineStart is the offset just after the first newline at or after
// off-1 (off itself when off is 0 or follows a newline), or limit when
// there is none before it.
func nextLineStart(f *os.File, off, limit int64) (int64, error) {
	if off == 0 {
		return 0, nil
	}
	buf := make([]byte, 4096)
	for pos := off - 1; pos < limit; pos += int64(len(buf)) {
		n, err := f.ReadAt(buf, pos)
		if i := bytes.IndexByte(buf[:n], '\n'); i >= 0 {
			return pos + int64(i) + 1, nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return limit, nil
			}
			return 0, err
		}
	}
	return limit, nil
}

// readBackward reads the newest records first, until Tail or MaxBytes is
// reached, and returns them oldest first.
func readBackward(paths []string, f Filter) (Result, error) {
	var res Result
	var rev []Entry
	bytesKept := 0
	full := false
	for i := len(paths) - 1; i >= 0 && !full; i-- {
		err := eachLineBackward(paths[i], func(line []byte) bool {
			e, ok := parse(line)
			if !ok || !f.Until.IsZero() && !e.Time.Before(f.Until) {
				return true
			}
			if f.MaxBytes > 0 && bytesKept+len(e.Text) > f.MaxBytes {
				res.Truncated = true
				full = true
				return false
			}
			bytesKept += len(e.Text)
			rev = append(rev, e)
			if f.Tail > 0 && len(rev) >= f.Tail {
				full = true
				return false
			}
			return true
		})
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return res, err
		}
	}
	res.Entries = make([]Entry, len(rev))
	for i, e := range rev {
		res.Entries[len(rev)-1-i] = e
	}
	return res, nil
}

// eachLineBackward calls fn with each complete line of a file (newline
// included), last first, until fn returns false.
func eachLineBackward(path string, fn func(line []byte) bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	const block = 64 << 10
	end := st.Size()
	var carry []byte // the start of a line whose beginning is in an earlier block
	for end > 0 {
		start := max(end-block, 0)
		buf := make([]byte, end-start, end-start+int64(len(carry)))
		if _, err := f.ReadAt(buf, start); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		buf = append(buf, carry...)
		// Lines end at newlines; the part before the block's first
		// newline may continue in the block before.
		for {
			j := bytes.LastIndexByte(buf[:max(len(buf)-1, 0)], '\n')
			if j < 0 {
				break
			}
			line := buf[j+1:]
			if len(line) > 0 && line[len(line)-1] == '\n' {
				if !fn(line) {
					return nil
				}
			}
			buf = buf[:j+1]
		}
		if len(buf) > MaxTextBytes*4 {
			buf = nil // longer than any record: not one
		}
		carry = buf
		end = start
	}
	if len(carry) > 0 && carry[len(carry)-1] == '\n' {
		fn(carry)
	}
	return nil
}

// parse reads one record (its line, newline included).
func parse(line []byte) (Entry, bool) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	if len(line) < stampWidth+2 || line[stampWidth] != ' ' {
		return Entry{}, false
	}
	t, err := time.Parse(timeLayout, string(line[:stampWidth]))
	if err != nil {
		return Entry{}, false
	}
	rest := line[stampWidth+1:]
	stream, text, ok := bytes.Cut(rest, []byte{' '})
	if !ok {
		return Entry{}, false
	}
	return Entry{Time: t, Stream: string(stream), Text: string(text)}, true
}
