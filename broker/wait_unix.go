//go:build unix

package broker

import "syscall"

// waitReadable blocks until the device has sent something (or the
// connection has ended or hit its deadline), without reading it. It parks
// in Go's netpoller with a few hundred bytes of stack: this is where an
// idle connection spends its life.
func (c *trackedConn) waitReadable() error {
	if c.raw == nil {
		return nil // the burst's read waits instead
	}
	c.woken = false
	if c.peekFn == nil {
		c.peekFn = c.peek // made once per connection, not per wait
	}
	return c.raw.Read(c.peekFn)
}

// peek is called once before parking, and again each time the netpoller
// wakes the connection's goroutine.
func (c *trackedConn) peek(fd uintptr) bool {
	// A wake-up means bytes (or the end of the stream, or an error)
	// arrived after the first call, since Read cleared readiness before it;
	// only this connection's bursts read the socket, so they are still
	// there: no need to look.
	if c.woken {
		return true
	}
	c.woken = true
	var b [1]byte
	for {
		// MSG_PEEK leaves the byte for the burst. The socket is
		// non-blocking (Go's), so EAGAIN means nothing yet: returning false
		// parks until the netpoller sees it readable. End of stream and
		// errors count as readable: the burst reads them.
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK)
		if err != syscall.EINTR {
			return err != syscall.EAGAIN
		}
	}
}
