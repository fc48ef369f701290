package testutil

import (
	"net"
	"sync/atomic"
	"testing"
)

// Proxy relays TCP connections from Addr to a target: a network path a
// test can open late, or cut without closing anything. It is not a fake
// of anything: what it relays is the real protocol, byte for byte.
type Proxy struct {
	// Addr is where it listens (127.0.0.1, a free port).
	Addr   string
	target string
	silent atomic.Bool
}

// NewProxy reserves a free address for a proxy to target; it listens
// there once Listen is called (until then a dial finds nothing).
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	return &Proxy{Addr: FreeAddr(t, "127.0.0.1"), target: target}
}

// StartProxy is NewProxy, listening.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	p := NewProxy(t, target)
	p.Listen(t)
	return p
}

// Listen starts accepting on Addr, until the test ends.
func (p *Proxy) Listen(t testing.TB) {
	t.Helper()
	ln, err := net.Listen("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { c.Close(); u.Close() })
			go p.pipe(u, c)
			go p.pipe(c, u)
		}
	}()
}

// Silence makes it swallow everything in both directions from now on and
// keep the connections open: a network cut that sends no reset.
func (p *Proxy) Silence() { p.silent.Store(true) }

func (p *Proxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	buf := make([]byte, 4096)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if p.silent.Load() {
			continue
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}
