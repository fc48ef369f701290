package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/client"

	"appliance/linelog"
)

// Where modules' output is kept, and how it is read back: a process
// module's stdout and stderr go to its own bounded, rotated log
// (<DataDir>/logs/modules/<name>.log, package linelog), never to the
// agent's log; a docker module's are the Docker Engine's, read through its
// logs endpoint. The agent's own log is kept beside them
// (<DataDir>/logs/edgeAgent.log).

// moduleLogReader is a driver that can read a module's output: by name
// (process modules: their log outlives each instance) or by handle
// (containers).
type moduleLogReader interface {
	moduleLogs(ctx context.Context, module, handle string, f linelog.Filter) (linelog.Result, error)
}

// moduleForgetter is a driver that keeps something per module beyond its
// instances (the process driver's output logs): forgetModule drops it once
// the module leaves the plan.
type moduleForgetter interface {
	forgetModule(module string)
}

func (b *bothDriver) moduleLogs(ctx context.Context, module, handle string, f linelog.Filter) (linelog.Result, error) {
	r, ok := b.of(handle).(moduleLogReader)
	if !ok {
		return linelog.Result{}, nil
	}
	return r.moduleLogs(ctx, module, handle, f)
}

func (b *bothDriver) forgetModule(module string) {
	if f, ok := b.process.(moduleForgetter); ok {
		f.forgetModule(module)
	}
}

// collector keeps the entries a filter selects as they are read, oldest
// first, with linelog.Read's rules: the newest that fit MaxBytes (and the
// last Tail), or, reading on from Since without Tail, the oldest.
type collector struct {
	f          linelog.Filter
	keepNewest bool
	res        linelog.Result
	bytes      int
}

func newCollector(f linelog.Filter) *collector {
	return &collector{f: f, keepNewest: f.Tail > 0 || f.Since.IsZero()}
}

// add takes one entry; false means nothing more is wanted.
func (c *collector) add(e linelog.Entry) bool {
	if !c.f.Since.IsZero() && e.Time.Before(c.f.Since) {
		return true
	}
	if !c.f.Until.IsZero() && !e.Time.Before(c.f.Until) {
		return true
	}
	if !c.keepNewest {
		if c.f.MaxBytes > 0 && c.bytes+len(e.Text) > c.f.MaxBytes {
			c.res.Truncated = true
			return false
		}
		c.bytes += len(e.Text)
		c.res.Entries = append(c.res.Entries, e)
		return true
	}
	c.res.Entries = append(c.res.Entries, e)
	c.bytes += len(e.Text)
	for len(c.res.Entries) > 0 && (c.f.Tail > 0 && len(c.res.Entries) > c.f.Tail || c.f.MaxBytes > 0 && c.bytes > c.f.MaxBytes) {
		if c.f.Tail == 0 || len(c.res.Entries) <= c.f.Tail {
			c.res.Truncated = true
		}
		c.bytes -= len(c.res.Entries[0].Text)
		c.res.Entries = c.res.Entries[1:]
	}
	return true
}

// moduleLogs reads a container's output through the Engine API's logs
// endpoint (timestamps on, both streams).
func (d *dockerDriver) moduleLogs(ctx context.Context, _, handle string, f linelog.Filter) (linelog.Result, error) {
	if handle == "" {
		return linelog.Result{}, nil
	}
	ins, err := d.cli.ContainerInspect(ctx, handle, client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return linelog.Result{}, nil
	}
	if err != nil {
		return linelog.Result{}, fmt.Errorf("inspect container: %w", err)
	}
	if !d.owns(ins.Container.Config) {
		return linelog.Result{}, nil
	}
	opts := client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Timestamps: true}
	if !f.Since.IsZero() {
		opts.Since = unixString(f.Since)
	}
	if !f.Until.IsZero() {
		opts.Until = unixString(f.Until)
	}
	if f.Tail > 0 {
		opts.Tail = strconv.Itoa(f.Tail)
	}
	rc, err := d.cli.ContainerLogs(ctx, handle, opts)
	if err != nil {
		return linelog.Result{}, fmt.Errorf("container logs: %w", err)
	}
	defer rc.Close()
	col := newCollector(f)
	var done atomic.Bool
	stdout := &lineSplitter{stream: "stdout", col: col, done: &done}
	stderr := &lineSplitter{stream: "stderr", col: col, done: &done}
	if ins.Container.Config.Tty {
		_, err = io.Copy(stdout, rc)
	} else {
		_, err = stdcopy.StdCopy(stdout, stderr, rc)
	}
	stdout.flush()
	stderr.flush()
	if err != nil && err != errCollected && ctx.Err() == nil {
		return col.res, fmt.Errorf("container logs: %w", err)
	}
	return col.res, nil
}

// unixString is a time as the Engine API takes since and until.
func unixString(t time.Time) string {
	return fmt.Sprintf("%d.%09d", t.Unix(), t.Nanosecond())
}

var errCollected = fmt.Errorf("enough lines collected")

// lineSplitter turns the Engine's timestamped log stream of one stream
// ("2026-12-06T17:11:00.123456789Z text\n") into entries.
type lineSplitter struct {
	stream string
	col    *collector
	done   *atomic.Bool
	buf    []byte
}

func (s *lineSplitter) Write(p []byte) (int, error) {
	if s.done.Load() {
		return 0, errCollected
	}
	s.buf = append(s.buf, p...)
	for {
		i := bytes.IndexByte(s.buf, '\n')
		if i < 0 {
			if len(s.buf) > linelog.MaxTextBytes*4 {
				s.emit(s.buf)
				s.buf = s.buf[:0]
			}
			return len(p), nil
		}
		s.emit(s.buf[:i])
		s.buf = s.buf[i+1:]
		if s.done.Load() {
			return len(p), errCollected
		}
	}
}

func (s *lineSplitter) flush() {
	if len(s.buf) > 0 && !s.done.Load() {
		s.emit(s.buf)
	}
	s.buf = nil
}

func (s *lineSplitter) emit(line []byte) {
	stamp, text, _ := bytes.Cut(line, []byte{' '})
	t, err := time.Parse(time.RFC3339Nano, string(stamp))
	if err != nil {
		t, text = time.Time{}, line
	}
	if !s.col.add(linelog.Entry{Time: t.UTC(), Stream: s.stream, Text: string(bytes.TrimRight(text, "\r"))}) {
		s.done.Store(true)
	}
}

// agentLog is the agent's own log file: every record of the agent's logger
// (those at info and above even when the logger given is quieter) also
// goes there, once Run has opened it.
type agentLog struct {
	w atomic.Pointer[linelog.Writer]
}

func (l *agentLog) Write(p []byte) (int, error) {
	if w := l.w.Load(); w != nil {
		return w.Stream("agent").Write(p)
	}
	return len(p), nil
}

// logFileTee hands each record to the logger the agent was given and to
// its log file.
type logFileTee struct {
	base, file slog.Handler
}

func (t logFileTee) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || t.base.Enabled(ctx, l)
}

func (t logFileTee) Handle(ctx context.Context, r slog.Record) error {
	var err error
	if t.base.Enabled(ctx, r.Level) {
		err = t.base.Handle(ctx, r.Clone())
	}
	_ = t.file.Handle(ctx, r)
	return err
}

func (t logFileTee) WithAttrs(as []slog.Attr) slog.Handler {
	return logFileTee{t.base.WithAttrs(as), t.file.WithAttrs(as)}
}

func (t logFileTee) WithGroup(g string) slog.Handler {
	return logFileTee{t.base.WithGroup(g), t.file.WithGroup(g)}
}
