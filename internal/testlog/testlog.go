// Package testlog sends a test's logs to t.Log, and drops what arrives
// after the test ended (a goroutine still shutting down must not make the
// testing package panic). Tests of any package use it instead of a copy of
// their own.
package testlog

import (
	"bytes"
	"log/slog"
	"sync"
	"testing"
)

// New returns a logger writing to t.Log at level and above.
func New(t testing.TB, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(NewWriter(t), &slog.HandlerOptions{Level: level}))
}

// Writer writes each line to t.Log until the test ends.
type Writer struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

// NewWriter returns a Writer for t.
func NewWriter(t testing.TB) *Writer {
	w := &Writer{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return w
}

func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(bytes.TrimRight(p, "\n")))
	}
	return len(p), nil
}
