// Package ratelog rate-limits a log line that a client can cause at will
// (a refused connection, a malformed packet, a recovered panic): a few
// lines per interval go out, the others are counted, and the next line
// that goes out says how many were suppressed. A counter metric beside it
// carries the full count; the log only has to say that it happens.
package ratelog

import (
	"sync"
	"time"
)

// DefaultEvery and DefaultBurst are the zero Limiter's settings.
const (
	DefaultEvery = 10 * time.Second
	DefaultBurst = 1
)

// Limiter lets Burst lines through per Every and counts the rest. The zero
// value is ready to use with the defaults; it is safe for concurrent use.
type Limiter struct {
	// Every is the interval (default DefaultEvery); Burst how many lines
	// each interval may log (default DefaultBurst).
	Every time.Duration
	Burst int

	mu         sync.Mutex
	windowEnd  time.Time
	used       int
	suppressed uint64
}

// Allow reports whether a line may be logged now and, when it may, how
// many lines were suppressed since the last one that went out (log it as
// "suppressed").
func (l *Limiter) Allow() (suppressed uint64, ok bool) {
	return l.allowAt(time.Now())
}

func (l *Limiter) allowAt(now time.Time) (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.After(l.windowEnd) {
		every := l.Every
		if every <= 0 {
			every = DefaultEvery
		}
		l.windowEnd, l.used = now.Add(every), 0
	}
	burst := l.Burst
	if burst <= 0 {
		burst = DefaultBurst
	}
	if l.used >= burst {
		l.suppressed++
		return 0, false
	}
	l.used++
	n := l.suppressed
	l.suppressed = 0
	return n, true
}
