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
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/internal/netlimit"
	"appliance/internal/ratelog"
)

// listenerID names our listener inside mochi.
const listenerID = "appliance-mqtt"

// guardedListener implements mochi's listeners.Listener, but runs each
// connection itself instead of handing it to mochi's EstablishFn (see
// session.go): an idle connection waits on a goroutine with a small stack,
// and mochi's per-packet work runs on short-lived goroutines that recover a
// panic in mochi's code and close only that client. It also bounds the time
// to a CONNECT, survives transient Accept errors (EMFILE) instead of
// stopping, and can close connections that have not sent CONNECT yet.
type guardedListener struct {
	b         *Broker
	address   string
	tlsConfig *tls.Config
	log       *slog.Logger

	ln *netlimit.Listener // capped per source: connections not yet authenticated

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

// Init binds the address; mochi calls it from AddListener. Connections
// hold a slot of their source address (Limits.MaxPendingPerSource) until
// they authenticate.
func (l *guardedListener) Init(*slog.Logger) error {
	raw, err := net.Listen("tcp", l.address)
	if err != nil {
		return err
	}
	ln := netlimit.Wrap(raw, l.b.lim.MaxPendingPerSource, l.b.logSourceRefused)
	l.mu.Lock()
	l.ln = ln
	l.mu.Unlock()
	return nil
}

// connStats are the listener's counts (zero before Init).
func (l *guardedListener) connStats() netlimit.Stats {
	l.mu.Lock()
	ln := l.ln
	l.mu.Unlock()
	if ln == nil {
		return netlimit.Stats{}
	}
	return ln.Stats()
}

// Serve accepts connections until Close. mochi runs it on its own goroutine.
// mochi's EstablishFn is not used: serveConn drives mochi itself.
func (l *guardedListener) Serve(listeners.EstablishFn) {
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
		tc := newTrackedConn(l.b, raw, l.tlsConfig)
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			_ = raw.Close()
			return
		}
		l.conns[tc] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.serveConn(tc)
	}
}

// serveConn is the connection's only long-lived goroutine, from accept to
// close. It never runs mochi's code, so its stack stays small: it waits
// until the device sends something, then runs a burst (session.go) on a new
// goroutine and waits for it. A burst reads and processes packets until none
// is left, and ends with its goroutine, deep stack and all. A panic in a
// burst (decoding, processing, our hooks) closes only this client, cleaned
// out of mochi's state; every other client and the process carry on.
func (l *guardedListener) serveConn(tc *trackedConn) {
	defer l.wg.Done()
	defer func() {
		func() {
			defer func() {
				if r := recover(); r != nil {
					l.log.Error("panic while ending a client session", "device", tc.deviceID, "panic", fmt.Sprint(r))
				}
			}()
			l.b.endSession(tc)
		}()
		l.mu.Lock()
		delete(l.conns, tc)
		l.mu.Unlock()
		l.b.forget(tc)
		_ = tc.Close()
		tc.releaseBuffer()
		close(tc.done)
	}()
	_ = tc.SetDeadline(time.Now().Add(l.b.lim.ConnectTimeout))
	if !tc.burst(l.b.connectFn) {
		return
	}
	for {
		// A deadline (keepalive, Close, Disconnect) or a closed connection
		// ends the wait with an error; the burst then reads that error too
		// and ends the session the way mochi would.
		_ = tc.waitReadable()
		if !tc.burst(l.b.serveFn) {
			return
		}
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
	// Not mochi's closeClients: it lists clients with Clients.GetByListener,
	// which takes the client map's read lock twice and deadlocks against a
	// client connecting or leaving at the same moment (mochi-mqtt/server#488).
	// Our own list has every connection, those before CONNECT included.
	for _, tc := range conns {
		l.b.dropConn(tc, packets.ErrServerShuttingDown)
		_ = tc.Close()
	}
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

// recovered cleans up after a panic in one of tc's bursts: the connection is
// closed and the client stopped; endSession then removes what mochi holds
// for it (client map entry, subscriptions, inflight messages).
//
// The log line is rate-limited (one every ten seconds, saying how many were
// suppressed): a client that found a way to panic the decoder can repeat it
// at will. Stats.PanicsRecovered counts every one.
func (b *Broker) recovered(tc *trackedConn, r any, stack []byte) {
	if n, ok := b.panicLog.Allow(); ok {
		b.log.Error("recovered panic in client connection; closed only that client",
			"device", tc.deviceID, "remote", tc.RemoteAddr().String(), "panic", fmt.Sprint(r), "stack", string(stack), "suppressed", n)
	}
	defer b.stats.panicsSaved.Add(1)
	defer func() {
		if r := recover(); r != nil {
			b.log.Error("panic while cleaning up after a panic", "device", tc.deviceID, "panic", fmt.Sprint(r))
		}
	}()
	_ = tc.Close()
	if cl := tc.client.Load(); cl != nil {
		cl.Stop(errConnPanicked)
	}
}

var errConnPanicked = errors.New("connection handler panicked")

// trackedConn is the net.Conn mochi sees for each client. It carries our
// per-connection state, so hooks find it from the client (cl.Net.Conn) with
// no lookup, and it lives exactly as long as the connection's goroutine.
//
// Its reads are packet-aware (see Read): it hands mochi's reader the bytes
// of at most one MQTT packet at a time, from a buffer borrowed only while
// the connection has bytes to process, so that it knows when mochi has
// consumed everything the device sent and the burst can end.
type trackedConn struct {
	net.Conn
	b   *Broker
	tls bool
	raw syscall.RawConn // the TCP socket (under TLS, if any), to wait for readability
	// peekFn and woken: waitReadable's state, touched only by the
	// connection's goroutine.
	peekFn func(fd uintptr) bool
	woken  bool
	done   chan struct{} // closed when the connection's goroutine has ended
	ran    chan bool     // a burst's result, to the connection's goroutine

	lastRead    atomic.Int64                // unix nanoseconds of the last Read that returned bytes
	client      atomic.Pointer[mqtt.Client] // set when the CONNECT is read
	established atomic.Bool                 // CONNACK sent; listed by Connected
	revoked     atomic.Bool                 // Disconnect was called for it
	shed        atomic.Bool                 // turned away by Refuse (counted in Stats.Refused)
	since       atomic.Int64                // unix nanoseconds of authentication
	counted     bool                        // counted in mochi's ClientsConnected; bursts only

	// deviceID is set once, by a burst under Broker.mu in register; other
	// goroutines read it under Broker.mu. desiredTopic is the device's
	// desired topic, set with it and read only once the connection is
	// established (established orders it).
	deviceID     string
	desiredTopic string
	// keyID names the credential the connection authenticated with
	// (KeyIdentifier), set under Broker.mu once the Authenticator has
	// accepted it; "" while the check runs. recheck, set under Broker.mu
	// by DisconnectStale while the check runs, judges the key once it is
	// known.
	keyID   string
	recheck func(keyID string) bool
	// desiredQoS is the QoS granted on the desired topic, or
	// notSubscribed: the hook's copy of what mochi's subscription map
	// says, read for every document without mochi's lock and map lookup.
	desiredQoS atomic.Int32
	// methods holds the direct method requests waiting to be written
	// and the QoS granted on the methods topic (hub.go).
	methods methodQueue

	// dropLog rate-limits the "report dropped" log line (one every ten
	// seconds: the zero value); overQuota: cut off by its report quota.
	dropLog   ratelog.Limiter
	overQuota atomic.Bool

	deadlineMu  sync.Mutex
	deadline    time.Time // the last one SetDeadline asked for
	deadlineCap time.Time // when set, no deadline may be later

	// Read side, touched only by the running burst (bursts of a connection
	// run one after the other).
	buf  *[]byte // borrowed from Broker.readBufs while bytes are pending
	r, w int     // buf[r:w] read from the socket, not yet handed to mochi
	fr   framer

	// procMu is held by a burst while mochi processes one of the client's
	// packets, and by a sender while it writes a desired document (send.go).
	// pending is the one-slot mailbox of desired documents; queued: the
	// connection is in the senders' queue.
	procMu  sync.Mutex
	pending atomic.Pointer[[]byte]
	queued  atomic.Bool

	// The device's unacknowledged QoS 1 desired documents, by packet id,
	// and the last id given out: touched only under procMu (send.go).
	// inflight is len(unacked), for readers that do not hold procMu.
	unacked  []uint16
	lastID   uint16
	inflight atomic.Int32
}

// notSubscribed is trackedConn.desiredQoS while the device is not
// subscribed to its desired topic.
const notSubscribed = -1

func newTrackedConn(b *Broker, raw net.Conn, tlsConfig *tls.Config) *trackedConn {
	tc := &trackedConn{Conn: raw, b: b, done: make(chan struct{}), ran: make(chan bool, 1)}
	tc.desiredQoS.Store(notSubscribed)
	tc.methods.qos = notSubscribed
	if sc, ok := raw.(syscall.Conn); ok {
		tc.raw, _ = sc.SyscallConn()
	}
	if tlsConfig != nil {
		// The handshake runs in the first burst, at its first Read, within
		// ConnectTimeout.
		tc.Conn = tls.Server(raw, tlsConfig)
		tc.tls = true
	}
	return tc
}

// burst runs fn on another goroutine and waits for it, so that the deep
// stack fn needs (mochi's packet handling, the node's lookups) is not kept
// by an idle connection. fn reports whether the session goes on. The
// goroutine is a worker (see worker) if one is idle, else a new one.
func (c *trackedConn) burst(fn func(*trackedConn) bool) bool {
	j := burstJob{c, fn}
	select {
	case c.b.idleWorkers <- j:
	default:
		go c.b.worker(j)
	}
	return <-c.ran
}

type burstJob struct {
	tc *trackedConn
	fn func(*trackedConn) bool
}

// workerIdle is how long a worker waits for another burst before it ends.
const workerIdle = 2 * time.Second

// worker runs bursts, of any connection, until none has come for
// workerIdle. Its stack, grown by the first burst, serves the next ones:
// a burst on a new goroutine would grow a small stack to 16 KiB again, by
// copying it three times. While the broker is busy (a fan-out's
// acknowledgements) a few workers run every burst; when it is idle there
// are none, and idle connections hold no deep stack.
func (b *Broker) worker(j burstJob) {
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		j.tc.runBurst(j.fn)
		idle.Reset(workerIdle)
		select {
		case j = <-b.idleWorkers:
		case <-idle.C:
			return
		}
	}
}

// runBurst runs fn and hands its result to the connection's goroutine. A
// panic in it closes only this client.
func (c *trackedConn) runBurst(fn func(*trackedConn) bool) {
	ok := false
	defer func() {
		if r := recover(); r != nil {
			c.b.recovered(c, r, debug.Stack())
		}
		c.ran <- ok
	}()
	ok = fn(c)
}

// beginProcessing and endProcessing bracket mochi's processing of one packet
// (see procMu); endProcessing writes a desired document left meanwhile.
func (c *trackedConn) beginProcessing() { c.procMu.Lock() }

func (c *trackedConn) endProcessing() {
	c.b.flushLocked(c)
	c.b.unlockConn(c)
}

// Read gives mochi's reader the next bytes of the current packet, never
// bytes of the next one: after mochi has read a whole packet, nothing the
// device sent is left in mochi's reader, only (perhaps) in ours.
func (c *trackedConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.r == c.w {
		if c.fr.state == frameBody && len(p) >= directReadMin {
			// A large packet's body: straight into mochi's buffer.
			n, err := c.Conn.Read(p[:min(len(p), c.fr.left)])
			c.fr.advanceBody(n)
			c.noteRead(n)
			return n, err
		}
		if err := c.fill(); err != nil {
			return 0, err
		}
		if c.r == c.w {
			return 0, nil
		}
	}
	avail := (*c.buf)[c.r:min(c.w, c.r+len(p))]
	n := c.fr.advance(avail)
	copy(p, avail[:n])
	c.r += n
	return n, nil
}

// directReadMin: reads at least this large bypass our buffer when it is
// empty mid-packet.
const directReadMin = 512

// fill reads what the socket has into our buffer, which must be empty.
func (c *trackedConn) fill() error {
	if c.buf == nil {
		c.buf = c.b.readBufs.Get().(*[]byte)
	}
	n, err := c.Conn.Read(*c.buf)
	c.r, c.w = 0, n
	c.noteRead(n)
	if n > 0 {
		return nil // an error comes back with the next read
	}
	return err
}

func (c *trackedConn) noteRead(n int) {
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
	}
}

// drained tells whether mochi has processed everything read so far. Under
// TLS it also asks, without waiting, whether TLS holds more: bytes it has
// buffered would never make the socket readable again.
func (c *trackedConn) drained() bool {
	if c.fr.state != frameStart || c.r < c.w {
		return false
	}
	if c.tls && c.tlsPending() {
		return false
	}
	c.releaseBuffer()
	return true
}

// releaseBuffer returns our read buffer to the pool if it holds nothing.
func (c *trackedConn) releaseBuffer() {
	if c.buf != nil && c.r == c.w {
		c.b.readBufs.Put(c.buf)
		c.buf, c.r, c.w = nil, 0, 0
	}
}

// aLongTimeAgo is a read deadline that has passed: a read then returns what
// is buffered or a timeout, without waiting.
var aLongTimeAgo = time.Unix(1, 0)

// tlsPending reads, without waiting, what TLS has already buffered. It
// reports whether there is something for mochi: bytes, or an error other
// than the timeout (a closed or failed session, which a burst then reads).
func (c *trackedConn) tlsPending() bool {
	c.deadlineMu.Lock()
	_ = c.Conn.SetReadDeadline(aLongTimeAgo)
	c.deadlineMu.Unlock()
	err := c.fill()
	c.deadlineMu.Lock()
	_ = c.Conn.SetReadDeadline(c.effectiveDeadlineLocked())
	c.deadlineMu.Unlock()
	if c.r < c.w {
		return true
	}
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// SetDeadline sets the read and write deadline; a cap set by capDeadline
// wins, so a client being dropped cannot be given more time.
func (c *trackedConn) SetDeadline(t time.Time) error {
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	c.deadline = t
	return c.Conn.SetDeadline(c.effectiveDeadlineLocked())
}

// extendDeadline moves the deadline to t after a packet, unless it would
// move by less than deadlineSlack: mochi's keepalive deadline (1.5
// keepalives, at least a second) need not be reset, a timer update for the
// read and one for the write side, after each of a burst's packets.
func (c *trackedConn) extendDeadline(t time.Time) {
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	if t.Sub(c.deadline) < deadlineSlack {
		return
	}
	c.deadline = t
	_ = c.Conn.SetDeadline(c.effectiveDeadlineLocked())
}

const deadlineSlack = 500 * time.Millisecond

func (c *trackedConn) effectiveDeadlineLocked() time.Time {
	t := c.deadline
	if !c.deadlineCap.IsZero() && (t.IsZero() || t.After(c.deadlineCap)) {
		t = c.deadlineCap
	}
	return t
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

// live: the connection is authenticated, established, not revoked and
// not closed.
func (c *trackedConn) live() bool {
	cl := c.client.Load()
	return cl != nil && c.established.Load() && !c.revoked.Load() && !cl.Closed()
}

// info describes the connection if it is live. The caller holds Broker.mu
// (for deviceID).
func (c *trackedConn) info() (ConnInfo, bool) {
	if !c.live() {
		return ConnInfo{}, false
	}
	cl := c.client.Load()
	return ConnInfo{
		DeviceID:        c.deviceID,
		ConnectedSince:  time.Unix(0, c.since.Load()),
		LastActivity:    time.Unix(0, c.lastRead.Load()),
		RemoteAddr:      c.RemoteAddr().String(),
		ProtocolVersion: cl.Properties.ProtocolVersion,
		TLS:             c.tls,
	}, true
}

// framer follows MQTT's framing over the bytes handed to mochi: a fixed
// header byte, the remaining length (a variable byte integer, decoded
// exactly as mochi's packets.DecodeLength does), then that many bytes.
type framer struct {
	state  uint8
	shift  uint32
	length uint32
	left   int // body bytes not yet handed over
}

const (
	frameStart  = iota // at a packet boundary: the fixed header byte is next
	frameLength        // in the remaining length
	frameBody          // in the variable header and payload
	frameBroken        // a length mochi refuses: it closes the connection
)

// maxRemaining is the largest remaining length MQTT (and mochi) accepts.
const maxRemaining = 268435455

// advance returns how many of b's leading bytes belong to the current
// packet (at least one if b is not empty), and moves past them.
func (f *framer) advance(b []byte) int {
	i := 0
	for i < len(b) {
		switch f.state {
		case frameStart:
			f.state, f.shift, f.length = frameLength, 0, 0
			i++
		case frameLength:
			c := b[i]
			i++
			f.length |= uint32(c&127) << f.shift
			switch {
			case f.length > maxRemaining:
				f.state = frameBroken
			case c&128 != 0:
				f.shift += 7
			case f.length == 0:
				f.state = frameStart
				return i
			default:
				f.state, f.left = frameBody, int(f.length)
			}
		case frameBody:
			n := min(len(b)-i, f.left)
			i += n
			f.advanceBody(n)
			if f.state == frameStart {
				return i
			}
		default: // frameBroken
			return len(b)
		}
	}
	return i
}

// advanceBody moves n bytes through the body.
func (f *framer) advanceBody(n int) {
	f.left -= n
	if f.left == 0 {
		f.state = frameStart
	}
}
