package raftstore

import (
	"context"
	"io"
	"log"
	"log/slog"

	"github.com/hashicorp/go-hclog"
)

// hcLogger adapts slog to the hclog interface hashicorp/raft wants, so the
// whole process logs through one slog handler.
type hcLogger struct {
	l    *slog.Logger
	name string
	args []any
}

var _ hclog.Logger = (*hcLogger)(nil)

func newHCLogger(l *slog.Logger) *hcLogger { return &hcLogger{l: l} }

func (h *hcLogger) log(level slog.Level, msg string, args ...any) {
	if !h.l.Enabled(context.Background(), level) {
		return
	}
	all := append(append([]any{}, h.args...), args...)
	if h.name != "" {
		msg = h.name + ": " + msg
	}
	h.l.Log(context.Background(), level, msg, all...)
}

func (h *hcLogger) Log(level hclog.Level, msg string, args ...interface{}) {
	h.log(toSlog(level), msg, args...)
}
func (h *hcLogger) Trace(msg string, args ...interface{}) { h.log(slog.LevelDebug-4, msg, args...) }
func (h *hcLogger) Debug(msg string, args ...interface{}) { h.log(slog.LevelDebug, msg, args...) }
func (h *hcLogger) Info(msg string, args ...interface{})  { h.log(slog.LevelInfo, msg, args...) }
func (h *hcLogger) Warn(msg string, args ...interface{})  { h.log(slog.LevelWarn, msg, args...) }
func (h *hcLogger) Error(msg string, args ...interface{}) { h.log(slog.LevelError, msg, args...) }
func (h *hcLogger) IsTrace() bool                         { return false }
func (h *hcLogger) IsDebug() bool {
	return h.l.Enabled(context.Background(), slog.LevelDebug)
}
func (h *hcLogger) IsInfo() bool               { return h.l.Enabled(context.Background(), slog.LevelInfo) }
func (h *hcLogger) IsWarn() bool               { return h.l.Enabled(context.Background(), slog.LevelWarn) }
func (h *hcLogger) IsError() bool              { return h.l.Enabled(context.Background(), slog.LevelError) }
func (h *hcLogger) ImpliedArgs() []interface{} { return h.args }
func (h *hcLogger) With(args ...interface{}) hclog.Logger {
	return &hcLogger{l: h.l, name: h.name, args: append(append([]any{}, h.args...), args...)}
}
func (h *hcLogger) Name() string { return h.name }
func (h *hcLogger) Named(name string) hclog.Logger {
	n := name
	if h.name != "" {
		n = h.name + "." + name
	}
	return &hcLogger{l: h.l, name: n, args: h.args}
}
func (h *hcLogger) ResetNamed(name string) hclog.Logger {
	return &hcLogger{l: h.l, name: name, args: h.args}
}
func (h *hcLogger) SetLevel(hclog.Level) {}
func (h *hcLogger) GetLevel() hclog.Level {
	return hclog.Info
}
func (h *hcLogger) StandardLogger(*hclog.StandardLoggerOptions) *log.Logger {
	return slog.NewLogLogger(h.l.Handler(), slog.LevelInfo)
}
func (h *hcLogger) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return h.StandardLogger(nil).Writer()
}

func toSlog(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return slog.LevelDebug - 4
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	}
	return slog.LevelInfo
}
