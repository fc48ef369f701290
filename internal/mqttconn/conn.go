// Package mqttconn is the transport of one server-side MQTT connection,
// shared by the device hub (package hub, in the agent) and the
// controller's events listener (package northbound): the TLS handshake
// and CONNECT within a deadline, packets read with mochi's codec
// (internal/mqttwire) under a keepalive deadline, an outbound queue that
// one writer goroutine writes in batches with a deadline per write, and a
// close that tells an MQTT 5 client why. What a connection means (who may
// connect, what it may publish, sessions) stays with its owner. It imports
// nothing of the controller: the agent links it.
package mqttconn

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/internal/mqttwire"
)

// closeFlush bounds the last write of a connection that closes: what was
// queued, and the DISCONNECT.
const closeFlush = 250 * time.Millisecond

// ErrNotReading is what Queue returns once more than Limits.MaxOutbound
// bytes wait to be written: the client does not read what it is sent.
var ErrNotReading = errors.New("the client does not read what it is sent")

// ErrClosed is what Queue returns once the connection is closing.
var ErrClosed = errors.New("connection closing")

// Limits bound a connection.
type Limits struct {
	// ConnectTimeout bounds the TLS handshake and the CONNECT.
	ConnectTimeout time.Duration
	// WriteTimeout bounds one write: a client that stops reading is
	// disconnected.
	WriteTimeout time.Duration
	// MaxOutbound, when above 0, is the most bytes that may wait to be
	// written before Queue says ErrNotReading.
	MaxOutbound int
}

// Conn is one connection's transport. Build it with New, call Handshake,
// read the CONNECT with ReadConnect, call Connected once it is accepted
// (the writer starts), then read with Next until it fails. Close may be
// called from any goroutine, any number of times.
type Conn struct {
	nc     net.Conn
	br     *bufio.Reader
	lim    Limits
	remote string

	// Set by Connected, read-only after.
	version      byte
	keepalive    time.Duration
	onWriteError func(error)
	afterWrite   func(written int)

	mu        sync.Mutex
	out       []byte // encoded packets waiting for the writer
	connected bool   // the writer runs
	closed    bool
	reason    error

	wake    chan struct{}
	closing chan struct{}
	done    chan struct{} // the socket is closed
	once    sync.Once
}

// New wraps nc (a *tls.Conn for TLS listeners) with a read buffer of
// readBuf bytes.
func New(nc net.Conn, readBuf int, lim Limits) *Conn {
	return &Conn{nc: nc, br: bufio.NewReaderSize(nc, readBuf), lim: lim, remote: nc.RemoteAddr().String(),
		wake: make(chan struct{}, 1), closing: make(chan struct{}), done: make(chan struct{})}
}

// Remote is the client's address.
func (c *Conn) Remote() string { return c.remote }

// NetConn is the connection underneath (netlimit.Release takes it).
func (c *Conn) NetConn() net.Conn { return c.nc }

// Handshake starts the connect deadline and, on a TLS connection,
// completes the handshake.
func (c *Conn) Handshake() error {
	_ = c.nc.SetDeadline(time.Now().Add(c.lim.ConnectTimeout))
	if tc, ok := c.nc.(*tls.Conn); ok {
		return tc.Handshake()
	}
	return nil
}

// ReadConnect reads the client's first packet: a CONNECT, of at most max
// bytes (a larger one is refused from its fixed header:
// packets.ErrPacketTooLarge). mochi's decoders may panic on malformed input
// (mochi-mqtt/server#501): the caller's goroutine recovers, as for Next.
// err is a read
// failure, or packets.ErrProtocolViolationRequireFirstConnect when the
// first packet is something else (close without an answer). A CONNECT
// the server must refuse whatever the client is, one of another protocol
// level than 3.1.1 (4) and 5 (speaks says what the server speaks) or one
// mochi finds malformed, gives the code and why to Refuse it with;
// pk.ProtocolVersion is then one the refusal can be written in.
func (c *Conn) ReadConnect(max int, speaks string) (pk packets.Packet, refuse packets.Code, why string, err error) {
	pk, err = mqttwire.ReadPacket(c.br, 0, max)
	if err != nil {
		return pk, packets.CodeSuccess, "", err
	}
	if pk.FixedHeader.Type != packets.Connect {
		return pk, packets.CodeSuccess, "", packets.ErrProtocolViolationRequireFirstConnect
	}
	if v := pk.ProtocolVersion; v != 4 && v != 5 {
		pk.ProtocolVersion = 4
		return pk, packets.ErrUnsupportedProtocolVersion, fmt.Sprintf("MQTT protocol level %d; %s", v, speaks), nil
	}
	if code := pk.ConnectValidate(); code != packets.CodeSuccess {
		return pk, code, code.Reason, nil
	}
	return pk, packets.CodeSuccess, "", nil
}

// Refuse answers a CONNECT with a refusing CONNACK in the client's
// protocol version (3.1.1's return code for the MQTT 5 reason, which MQTT 5
// clients get with its reason string) and closes the connection.
func (c *Conn) Refuse(version byte, code packets.Code) {
	rc := code
	if version < 5 {
		rc = V3ConnackCode(code)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: rc.Code, ProtocolVersion: version}
	if version == 5 {
		pk.Properties.ReasonString = code.Reason
	}
	c.WriteNow(pk.ConnackEncode)
	c.Close(nil)
}

// Next reads the next packet of an accepted connection, with a deadline
// of one and a half keepalives, as MQTT asks of a server.
func (c *Conn) Next(max int) (packets.Packet, error) {
	_ = c.nc.SetReadDeadline(time.Now().Add(c.keepalive + c.keepalive/2))
	return mqttwire.ReadPacket(c.br, c.version, max)
}

// WriteNow writes a packet at once, within the connect deadline: the
// CONNACK that refuses a client, before the writer runs.
func (c *Conn) WriteNow(encode func(*bytes.Buffer) error) {
	var b bytes.Buffer
	if err := encode(&b); err != nil {
		return
	}
	_, _ = c.nc.Write(b.Bytes())
}

// Connected starts the writer of an accepted connection: version and
// keepalive are what the CONNECT settled. onWriteError (may be nil) learns
// why a write failed (the connection then closes); afterWrite (may be
// nil) is called after each write with the bytes written, on the
// writer's goroutine.
func (c *Conn) Connected(version byte, keepalive time.Duration, onWriteError func(error), afterWrite func(written int)) {
	c.version, c.keepalive, c.onWriteError, c.afterWrite = version, keepalive, onWriteError, afterWrite
	_ = c.nc.SetDeadline(time.Time{})
	c.mu.Lock()
	c.connected = true
	closed := c.closed
	c.mu.Unlock()
	if closed {
		_ = c.nc.Close()
		close(c.done)
		return
	}
	go c.writer()
}

// Queue encodes packets at the end of the outbound queue, under the
// queue's lock (so that what one call encodes stays in order with what
// others do), and wakes the writer. An encode that fails leaves the queue
// as it was. It returns the bytes waiting, ErrClosed once the connection
// is closing, or ErrNotReading when more than MaxOutbound wait (the
// packets are queued; the caller closes the connection).
func (c *Conn) Queue(encode func(*bytes.Buffer) error) (int, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, ErrClosed
	}
	start := len(c.out)
	buf := bytes.NewBuffer(c.out)
	err := encode(buf)
	if err != nil {
		c.out = buf.Bytes()[:start]
	} else {
		c.out = buf.Bytes()
	}
	n := len(c.out)
	c.mu.Unlock()
	if err != nil {
		return n, err
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
	if c.lim.MaxOutbound > 0 && n > c.lim.MaxOutbound {
		return n, ErrNotReading
	}
	return n, nil
}

// Pending is the bytes waiting to be written.
func (c *Conn) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.out)
}

// writer writes what is queued, everything waiting in one write, each
// write bounded by WriteTimeout. Once the connection closes it writes what
// is left (a DISCONNECT among it) within closeFlush and closes the socket.
func (c *Conn) writer() {
	defer close(c.done)
	var spare []byte
	for {
		select {
		case <-c.wake:
		case <-c.closing:
			c.mu.Lock()
			rest := c.out
			c.out = nil
			c.mu.Unlock()
			if len(rest) > 0 {
				_ = c.nc.SetWriteDeadline(time.Now().Add(closeFlush))
				_, _ = c.nc.Write(rest)
			}
			_ = c.nc.Close()
			return
		}
		c.mu.Lock()
		out := c.out
		c.out = spare[:0]
		c.mu.Unlock()
		if len(out) == 0 {
			spare = out
			continue
		}
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.lim.WriteTimeout))
		if _, err := c.nc.Write(out); err != nil {
			if c.onWriteError != nil {
				c.onWriteError(err)
			}
			c.Close(nil)
			continue // to the closing case
		}
		if c.afterWrite != nil {
			c.afterWrite(len(out))
		}
		spare = out
		if cap(spare) > 1<<20 {
			spare = nil
		}
	}
}

// Close ends the connection once. An accepted MQTT 5 client is told why
// when reason is a packets.Code of 0x80 or more (a DISCONNECT after what
// was queued); then the writer closes the socket, or Close does when the
// connection was never accepted. It returns at once.
func (c *Conn) Close(reason error) {
	c.once.Do(func() {
		c.mu.Lock()
		var code packets.Code
		if c.connected && c.version == 5 && errors.As(reason, &code) && code.Code >= 0x80 {
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ReasonCode: code.Code, ProtocolVersion: 5}
			pk.Properties.ReasonString = code.Reason
			buf := bytes.NewBuffer(c.out)
			if pk.DisconnectEncode(buf) == nil {
				c.out = buf.Bytes()
			}
		}
		c.closed, c.reason = true, reason
		connected := c.connected
		c.mu.Unlock()
		close(c.closing)
		// A write blocked on a client that stopped reading gives up soon.
		_ = c.nc.SetWriteDeadline(time.Now().Add(closeFlush))
		if !connected {
			_ = c.nc.Close()
			close(c.done)
		}
	})
}

// Closing is closed once Close was called.
func (c *Conn) Closing() <-chan struct{} { return c.closing }

// Done is closed once the socket is closed.
func (c *Conn) Done() <-chan struct{} { return c.done }

// IsOpen tells whether Close was not called yet.
func (c *Conn) IsOpen() bool {
	select {
	case <-c.closing:
		return false
	default:
		return true
	}
}

// Reason is what Close was given.
func (c *Conn) Reason() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason
}

// V3ConnackCode is MQTT 3.1.1's CONNACK return code for an MQTT 5 reason
// a server refuses a CONNECT with (3.1.1 has five; anything else is
// "server unavailable").
func V3ConnackCode(code packets.Code) packets.Code {
	switch code.Code {
	case packets.ErrUnsupportedProtocolVersion.Code:
		return packets.Err3UnsupportedProtocolVersion
	case packets.ErrClientIdentifierNotValid.Code:
		return packets.Err3ClientIdentifierNotValid
	case packets.ErrBadUsernameOrPassword.Code:
		return packets.ErrMalformedUsernameOrPassword // 0x04: bad user name or password
	case packets.ErrNotAuthorized.Code:
		return packets.Err3NotAuthorized
	}
	return packets.Err3ServerUnavailable
}

// NextPacketID returns the packet id after *last that used does not
// report, and stores it in *last (ids run 1 to 65535, then wrap). The
// caller keeps fewer than 65535 in use.
func NextPacketID(last *uint16, used func(uint16) bool) uint16 {
	for {
		*last++
		if *last == 0 {
			*last = 1
		}
		if !used(*last) {
			return *last
		}
	}
}

// Truncate shortens s to n bytes for a log line, marking the cut.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
