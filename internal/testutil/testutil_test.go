package testutil

import (
	"net"
	"strconv"
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

// TestFreeAddr: the addresses are distinct, nothing listens there, and no
// ":0" listener is put there meanwhile (the CI failure this prevents).
func TestFreeAddr(t *testing.T) {
	low := ephemeralLow()
	seen := map[string]bool{}
	for range 50 {
		addr := FreeAddr(t, "127.0.0.1")
		if seen[addr] {
			t.Fatalf("%s handed out twice", addr)
		}
		seen[addr] = true
		_, p, _ := net.SplitHostPort(addr)
		if port, _ := strconv.Atoi(p); port < lowestPick || port >= low {
			t.Fatalf("%s: port outside [%d, %d)", addr, lowestPick, low)
		}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			t.Fatalf("something listens on %s", addr)
		}
	}
	for range 200 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		got := ln.Addr().String()
		ln.Close()
		if seen[got] {
			t.Fatalf("a \":0\" listener got %s, a port FreeAddr handed out", got)
		}
	}
}

// TestLockPort: a port another test binary holds (its lock file locked
// through another open file, as another process's would be) is not taken;
// once released it is.
func TestLockPort(t *testing.T) {
	const port = 1 // never handed out by FreeAddr
	other, ok := lockPort(t, port)
	if !ok {
		t.Fatal("the lock of a free port was not taken")
	}
	if f, ok := lockPort(t, port); ok {
		f.Close()
		t.Fatal("a port locked elsewhere was locked again")
	}
	other.Close()
	f, ok := lockPort(t, port)
	if !ok {
		t.Fatal("a released port's lock was not taken")
	}
	f.Close()
}
