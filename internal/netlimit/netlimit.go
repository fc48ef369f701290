// Package netlimit bounds how many connections one source address holds on
// a listener: a net.Listener wrapper that counts the open connections of
// each source and closes at once (with a reset, no TLS, nothing read) those
// that would go over the cap, counting them.
//
// A listener's timeouts bound how long one idle or trickling socket lives;
// the cap bounds how many of them one address holds at a time, so that a
// slowloris from one host cannot take every file descriptor of the process
// while its sockets wait for their deadlines. A connection that has proved
// who it is (a device authenticated, a cluster node with its certificate)
// can give its slot back early with Release: the cap then counts only
// connections that have not authenticated yet, and any number of
// authenticated clients may share one address (devices behind one NAT
// gateway).
//
// It imports only the standard library, so the device agent can use it too.
package netlimit

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
)

// Listener wraps a net.Listener with a per-source cap. Accept returns
// *Conn values.
type Listener struct {
	net.Listener
	maxPerSource int
	onRefuse     func(remote net.Addr)

	mu        sync.Mutex
	perSource map[netip.Prefix]int

	open    atomic.Int64
	refused atomic.Uint64
}

// Wrap caps ln at maxPerSource connections per source address (an IPv4
// address, or an IPv6 /64, the block one host typically holds); zero or
// less means no cap, only counting. onRefuse, if set, is called (on the
// accepting goroutine, after the connection is closed) for each refused
// connection: for a rate-limited log line.
func Wrap(ln net.Listener, maxPerSource int, onRefuse func(remote net.Addr)) *Listener {
	return &Listener{Listener: ln, maxPerSource: maxPerSource, onRefuse: onRefuse, perSource: map[netip.Prefix]int{}}
}

// Stats are a listener's counts.
type Stats struct {
	Open    int64  // connections accepted and not yet closed
	Refused uint64 // connections closed at accept because their source was at the cap
}

// Stats returns the current counts.
func (l *Listener) Stats() Stats {
	return Stats{Open: l.open.Load(), Refused: l.refused.Load()}
}

// Accept returns the next connection whose source is under the cap; those
// over it are closed and counted without being returned.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src, counted := sourceOf(c.RemoteAddr())
		if counted && !l.acquire(src) {
			l.refused.Add(1)
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // a reset: no TIME_WAIT left behind per refused socket
			}
			_ = c.Close()
			if l.onRefuse != nil {
				l.onRefuse(c.RemoteAddr())
			}
			continue
		}
		l.open.Add(1)
		return &Conn{Conn: c, l: l, src: src, holds: counted}, nil
	}
}

func (l *Listener) acquire(src netip.Prefix) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.perSource[src]
	if l.maxPerSource > 0 && n >= l.maxPerSource {
		return false
	}
	l.perSource[src] = n + 1
	return true
}

func (l *Listener) release(src netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.perSource[src]; n > 1 {
		l.perSource[src] = n - 1
	} else {
		delete(l.perSource, src)
	}
}

// sourceOf keys a remote address: IPv4 (or IPv4-mapped) by address, IPv6
// by its /64. Addresses that are not IP (a unix socket, a test pipe) are
// not counted.
func sourceOf(a net.Addr) (netip.Prefix, bool) {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(tcp.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	return p, err == nil
}

// Conn is an accepted connection holding a slot of its source until it is
// closed or released.
type Conn struct {
	net.Conn
	l      *Listener
	src    netip.Prefix
	holds  bool // counted against its source when accepted
	freed  atomic.Bool
	closed atomic.Bool
}

// Release gives the connection's slot back to its source before it
// closes: the client has authenticated, and the cap is for those that have
// not. It is idempotent.
func (c *Conn) Release() {
	if c.holds && c.freed.CompareAndSwap(false, true) {
		c.l.release(c.src)
	}
}

// Close closes the connection and frees its slot.
func (c *Conn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.Release()
		c.l.open.Add(-1)
	}
	return c.Conn.Close()
}

// SyscallConn exposes the socket (the broker waits for readability on it).
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	return sc.SyscallConn()
}

// NetConn is the wrapped connection.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// Release gives back the slot of c if c is, or wraps (through a TLS
// connection or any wrapper with a NetConn method), a *Conn. Others are
// left alone.
func Release(c net.Conn) {
	for c != nil {
		if lc, ok := c.(*Conn); ok {
			lc.Release()
			return
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return
		}
		c = u.NetConn()
	}
}
