package broker

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
)

// listenerID names our listener inside mochi.
const listenerID = "appliance-mqtt"

// guardedListener implements mochi's listeners.Listener. Unlike mochi's TCP
// listener it serves each connection on a goroutine that recovers a panic in
// mochi's code and closes only that client; it also bounds the time to a
// CONNECT, survives transient Accept errors (EMFILE) instead of stopping, and
// can close connections that have not sent CONNECT yet.
type guardedListener struct {
	b         *Broker
	address   string
	tlsConfig *tls.Config
	log       *slog.Logger

	ln net.Listener

	mu     sync.Mutex
	closed bool
	conns  map[*trackedConn]struct{}
	wg     sync.WaitGroup // one per connection goroutine
}

var _ listeners.Listener = (*guardedListener)(nil)

func newGuardedListener(b *Broker, address string, tlsConfig *tls.Config) *guardedListener {
	return &guardedListener{
		b:         b,
		address:   address,
		tlsConfig: tlsConfig,
		log:       b.log,
		conns:     make(map[*trackedConn]struct{}),
	}
}

func (l *guardedListener) ID() string { return listenerID }

func (l *guardedListener) Protocol() string {
	if l.tlsConfig != nil {
		return "tls"
	}
	return "tcp"
}

func (l *guardedListener) Address() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.address
}

// Init binds the address; mochi calls it from AddListener.
func (l *guardedListener) Init(*slog.Logger) error {
	ln, err := net.Listen("tcp", l.address)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.ln = ln
	l.mu.Unlock()
	return nil
}

// Serve accepts connections until Close. mochi runs it on its own goroutine.
func (l *guardedListener) Serve(establish listeners.EstablishFn) {
	var backoff time.Duration
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			if l.isClosed() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait and retry; returning
			// would silently stop the broker for good.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed; retrying", "error", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		var c net.Conn = raw
		if l.tlsConfig != nil {
			// The handshake runs on the connection's goroutine, at its first
			// Read, within ConnectTimeout.
			c = tls.Server(raw, l.tlsConfig)
		}
		tc := &trackedConn{Conn: c, b: l.b, tls: l.tlsConfig != nil, done: make(chan struct{})}
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			_ = raw.Close()
			return
		}
		l.conns[tc] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.serveConn(establish, tc)
	}
}

// serveConn runs one client from accept to close. A panic anywhere in mochi's
// handling of this connection (decoding, processing, our hooks) ends here:
// that client is closed and cleaned out of mochi's state, and every other
// client and the process carry on.
func (l *guardedListener) serveConn(establish listeners.EstablishFn, tc *trackedConn) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		delete(l.conns, tc)
		l.mu.Unlock()
		tc.endProcessing(false)
		l.b.forget(tc)
		_ = tc.Close()
		close(tc.done)
	}()
	defer func() {
		if r := recover(); r != nil {
			l.b.recovered(tc, r, debug.Stack())
		}
	}()
	_ = tc.SetDeadline(time.Now().Add(l.b.lim.ConnectTimeout))
	if err := establish(listenerID, tc); err != nil {
		l.log.Debug("client connection ended", "device", tc.deviceID, "remote", tc.RemoteAddr().String(), "error", err)
	}
}

// Close stops accepting and disconnects every connection, including those
// that have not sent CONNECT (MQTT 5 clients are told "server shutting
// down"). mochi calls it from Server.Close.
func (l *guardedListener) Close(listeners.CloseFn) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	if l.ln != nil {
		_ = l.ln.Close()
	}
	conns := make([]*trackedConn, 0, len(l.conns))
	for tc := range l.conns {
		conns = append(conns, tc)
	}
	l.mu.Unlock()

	// A client that stopped reading must not stall the DISCONNECT writes.
	deadline := time.Now().Add(disconnectGrace)
	for _, tc := range conns {
		tc.capDeadline(deadline)
	}
	// Not closeClients: it lists clients with mochi's Clients.GetByListener,
	// which takes the client map's read lock twice and deadlocks against a
	// client connecting or leaving at the same moment (mochi-mqtt/server#488).
	// Our own list has every connection, those before CONNECT included.
	for _, tc := range conns {
		l.b.dropConn(tc, packets.ErrServerShuttingDown)
		_ = tc.Close()
	}
	// Let every connection goroutine end before mochi waits on its
	// ClientsWg: a goroutine still starting would call ClientsWg.Add
	// concurrently with that Wait, which WaitGroup forbids.
	if !l.wait(closeTimeout) {
		l.log.Warn("connections still open after close timeout", "timeout", closeTimeout)
	}
}

func (l *guardedListener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// wait waits for every connection goroutine to end, for at most d.
func (l *guardedListener) wait(d time.Duration) bool {
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// recovered cleans up after a panic on tc's goroutine. mochi's deferred calls
// have already run (the client is stopped, its connection counted out); what
// remains is the client's entry in mochi's client map and topic index, which
// attachClient removes only on a normal return.
func (b *Broker) recovered(tc *trackedConn, r any, stack []byte) {
	b.log.Error("recovered panic in client connection; closed only that client",
		"device", tc.deviceID, "remote", tc.RemoteAddr().String(), "panic", fmt.Sprint(r), "stack", string(stack))
	defer b.stats.panicsSaved.Add(1) // counted once cleaned up
	defer func() {
		if r := recover(); r != nil {
			b.log.Error("panic while cleaning up after a panic", "device", tc.deviceID, "panic", fmt.Sprint(r))
		}
	}()
	_ = tc.Close()
	cl := tc.client.Load()
	if cl == nil {
		return
	}
	cl.Stop(errConnPanicked)
	if cur, ok := b.srv.Clients.Get(cl.ID); ok && cur == cl {
		b.srv.UnsubscribeClient(cl)
		cl.ClearInflights()
		b.srv.Clients.Delete(cl.ID)
	}
}

var errConnPanicked = errors.New("connection handler panicked")

// trackedConn is the net.Conn mochi sees for each client. It carries our
// per-connection state, so hooks find it from the client (cl.Net.Conn) with
// no lookup, and it lives exactly as long as the connection's goroutine.
type trackedConn struct {
	net.Conn
	b    *Broker
	tls  bool
	done chan struct{} // closed when the connection's goroutine has ended

	lastRead    atomic.Int64                // unix nanoseconds of the last Read that returned bytes
	client      atomic.Pointer[mqtt.Client] // set in OnConnect
	established atomic.Bool                 // CONNACK sent; listed by Connected
	revoked     atomic.Bool                 // Disconnect was called for it
	since       atomic.Int64                // unix nanoseconds of authentication

	// deviceID is set once, by the connection's own goroutine under Broker.mu
	// in register; other goroutines read it under Broker.mu.
	deviceID string

	// dropLogAt and dropsUnlogged rate-limit the "report dropped" log line.
	dropLogAt     atomic.Int64
	dropsUnlogged atomic.Int64

	deadlineMu  sync.Mutex
	deadlineCap time.Time // when set, no deadline may be later

	// procMu is held by the connection's goroutine while mochi processes one
	// of its packets: from OnPacketRead to the next SetDeadline, which mochi's
	// read loop calls before reading the next packet. PublishDesired takes it
	// to publish from another goroutine, or leaves its document in pending.
	procMu     sync.Mutex
	processing atomic.Bool // procMu held by the connection's goroutine; touched only by it
	pending    atomic.Pointer[[]byte]
}

// beginProcessing runs on the connection's goroutine when a packet was read.
func (c *trackedConn) beginProcessing() {
	if !c.processing.Load() {
		c.procMu.Lock()
		c.processing.Store(true)
	}
}

// endProcessing runs on the connection's goroutine when mochi is done with a
// packet; it sends a desired document left while it was busy, unless the
// connection is ending.
func (c *trackedConn) endProcessing(send bool) {
	if !c.processing.Load() {
		return
	}
	c.processing.Store(false)
	c.procMu.Unlock()
	if d := c.pending.Swap(nil); d != nil && send {
		if cl := c.client.Load(); cl != nil && !cl.Closed() {
			_ = c.b.sendDesired(cl, fleet.DesiredTopic(cl.ID), *d)
		}
	}
}

func (c *trackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

// SetDeadline is what mochi's read loop calls before every packet
// (keepalive), and only it: a cap set by capDeadline wins, so a client being
// dropped cannot be given more time. It also marks the end of processing the
// previous packet (see procMu).
func (c *trackedConn) SetDeadline(t time.Time) error {
	defer c.endProcessing(true)
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	if !c.deadlineCap.IsZero() && (t.IsZero() || t.After(c.deadlineCap)) {
		t = c.deadlineCap
	}
	return c.Conn.SetDeadline(t)
}

// capDeadline makes t the latest deadline this connection can have, and
// applies it now, to reads and writes already blocked included.
func (c *trackedConn) capDeadline(t time.Time) {
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	if c.deadlineCap.IsZero() || t.Before(c.deadlineCap) {
		c.deadlineCap = t
	}
	_ = c.Conn.SetDeadline(c.deadlineCap)
}

// info describes the connection if it is live, authenticated and not revoked.
// The caller holds Broker.mu (for deviceID).
func (c *trackedConn) info() (ConnInfo, bool) {
	cl := c.client.Load()
	if cl == nil || !c.established.Load() || c.revoked.Load() || cl.Closed() {
		return ConnInfo{}, false
	}
	return ConnInfo{
		DeviceID:        c.deviceID,
		ConnectedSince:  time.Unix(0, c.since.Load()),
		LastActivity:    time.Unix(0, c.lastRead.Load()),
		RemoteAddr:      c.RemoteAddr().String(),
		ProtocolVersion: cl.Properties.ProtocolVersion,
		TLS:             c.tls,
	}, true
}
