package testutil

import (
	"testing"
	"time"
)

func TestBound(t *testing.T) {
	if Bound(time.Second) != WaitTimeout || Bound(2*WaitTimeout) != 2*WaitTimeout {
		t.Fatalf("Bound(1s) = %v, Bound(2*WaitTimeout) = %v", Bound(time.Second), Bound(2*WaitTimeout))
	}
}

func TestWaitFor(t *testing.T) {
	n := 0
	WaitFor(t, "the third call", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Fatalf("cond called %d times, want 3", n)
	}
}

func TestContext(t *testing.T) {
	ctx := Context(t)
	if _, ok := ctx.Deadline(); !ok || ctx.Err() != nil {
		t.Fatalf("no deadline, or ended already: %v", ctx.Err())
	}
}
