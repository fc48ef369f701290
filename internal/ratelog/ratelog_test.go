package ratelog

import (
	"sync"
	"testing"
	"time"
)

func TestLimiter_BurstThenSuppressedCountedInNextLine(t *testing.T) {
	l := &Limiter{Every: time.Minute, Burst: 2}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	type step struct {
		at             time.Duration
		ok             bool
		wantSuppressed uint64
	}
	for i, s := range []step{
		{0, true, 0}, {time.Second, true, 0}, // the burst
		{2 * time.Second, false, 0}, {3 * time.Second, false, 0}, {59 * time.Second, false, 0},
		{61 * time.Second, true, 3}, // a new interval: the line says three were suppressed
		{62 * time.Second, true, 0},
		{63 * time.Second, false, 0},
	} {
		n, ok := l.allowAt(t0.Add(s.at))
		if ok != s.ok || n != s.wantSuppressed {
			t.Fatalf("step %d at %v: got (%d, %v), want (%d, %v)", i, s.at, n, ok, s.wantSuppressed, s.ok)
		}
	}
}

func TestLimiter_ZeroValueAllowsOnePerInterval(t *testing.T) {
	var l Limiter
	if _, ok := l.Allow(); !ok {
		t.Fatal("the first line was suppressed")
	}
	if _, ok := l.Allow(); ok {
		t.Fatal("a second line in the same interval went out")
	}
}

func TestLimiter_ConcurrentCallsCountEveryLine(t *testing.T) {
	l := &Limiter{Every: time.Hour, Burst: 5}
	var mu sync.Mutex
	allowed := 0
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			for range 20 {
				if _, ok := l.Allow(); ok {
					mu.Lock()
					allowed++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if allowed != 5 {
		t.Fatalf("%d lines allowed, want the burst of 5", allowed)
	}
	l.windowEnd = time.Time{} // the interval is over
	if n, ok := l.Allow(); !ok || n != 50*20-5 {
		t.Fatalf("next line: suppressed %d ok %v, want %d true", n, ok, 50*20-5)
	}
}
