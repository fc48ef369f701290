package cluster

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"appliance/internal/netlimit"
	"appliance/internal/ratelog"
	"appliance/pki"
)

// Limits bound what a client of the cluster port can hold. Zero fields
// take the Default* values.
//
// Raft's own streams get no deadline here once they are routed: they come
// only from holders of a node certificate of this cluster, and
// hashicorp/raft's NetworkTransport pools its outgoing connections (up to
// three per peer, plus the heartbeat and pipeline ones) and leaves them idle
// for as long as it has nothing to send (a vote connection waits for the
// next election). The accepting side of such a stream blocks on the next
// RPC's type byte with no deadline by design; an idle timeout would close
// pooled connections under raft, whose next RPC on them would then fail (a
// lost heartbeat or vote, a needless election). The sending side bounds
// every RPC with raft's own timeout (transportTimeout in raftstore).
type Limits struct {
	// MaxConnsPerSource caps the connections one source address holds
	// before it has proved to be a node of the cluster: a connection
	// that presents a node certificate gives its slot back after the
	// handshake, so peers never count. Negative: no cap.
	MaxConnsPerSource int
	// HandshakeTimeout bounds a new connection's TLS handshake plus its
	// first byte (which routes it), and an RPC request's header.
	HandshakeTimeout time.Duration
	// ReadTimeout bounds reading one RPC request, body included.
	ReadTimeout time.Duration
	// IdleTimeout closes an RPC connection kept alive with no request for
	// this long. This node's own client drops idle connections at half of
	// it, so that it never sends a request on a connection its peer (with
	// the same setting) is closing: a forwarded write lost that way would
	// have an unknown outcome.
	IdleTimeout time.Duration
}

// Defaults of Limits.
const (
	DefaultMaxConnsPerSource = 64
	DefaultHandshakeTimeout  = 10 * time.Second
	DefaultReadTimeout       = 60 * time.Second
	DefaultIdleTimeout       = 3 * time.Minute
)

func (l Limits) withDefaults() Limits {
	if l.MaxConnsPerSource == 0 {
		l.MaxConnsPerSource = DefaultMaxConnsPerSource
	}
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if l.ReadTimeout <= 0 {
		l.ReadTimeout = DefaultReadTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = DefaultIdleTimeout
	}
	return l
}

// raftTypeMax bounds the RPC type byte hashicorp/raft's network transport
// sends first on a connection (v1.7: AppendEntries 0, RequestVote 1,
// InstallSnapshot 2, TimeoutNow 3, RequestPreVote 4). Every control byte is
// taken as raft, so a type a later raft adds still goes there; an HTTP
// request starts with an upper-case method name.
const raftTypeMax = 0x1f

// Mux is a node's cluster listener: TLS with the cluster CA, split between
// raft and the cluster's HTTP RPCs by the first byte.
type Mux struct {
	ln        *netlimit.Listener
	limits    Limits
	server    *tls.Config
	peer      *tls.Config
	advertise string
	dialer    net.Dialer
	logger    *slog.Logger
	// refusedLog rate-limits the line about connections over the cap
	// (one every ten seconds: the zero value), strangerLog the one about
	// raft bytes from a client without a node certificate.
	refusedLog, strangerLog ratelog.Limiter

	raft *connQueue
	http *connQueue

	guard guard // authorization of peers, open connections (guard.go)

	closeOnce sync.Once
	closed    chan struct{}
	wg        sync.WaitGroup
}

// Listen opens the cluster port on addr. advertise is the address peers
// dial (default: the bound address). Outgoing connections leave from the
// bound IP when it is a specific one, so that a peer (or a test's partition
// proxy) sees which node is calling.
func Listen(addr, advertise string, b *pki.Bundle, logger *slog.Logger) (*Mux, error) {
	return ListenWith(addr, advertise, b, Limits{}, logger)
}

// ListenWith is Listen with limits other than the defaults.
func ListenWith(addr, advertise string, b *pki.Bundle, lim Limits, logger *slog.Logger) (*Mux, error) {
	if logger == nil {
		logger = slog.Default()
	}
	lim = lim.withDefaults()
	raw, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cluster listener on %s (flag --raft-addr): %w", addr, err)
	}
	if advertise == "" {
		advertise = raw.Addr().String()
	}
	if _, _, err := net.SplitHostPort(advertise); err != nil {
		raw.Close()
		return nil, fmt.Errorf("raft advertise address %q (flag --raft-advertise): %w", advertise, err)
	}
	m := &Mux{
		limits: lim, server: b.ServerTLS(), peer: b.PeerClientTLS(), advertise: advertise,
		logger: logger.With("component", "cluster"),
		raft:   newConnQueue(raw.Addr()), http: newConnQueue(raw.Addr()),
		closed: make(chan struct{}),
	}
	m.strangerLog.Burst = strangerLogBurst
	m.ln = netlimit.Wrap(raw, lim.MaxConnsPerSource, m.logRefused)
	// Every handshake, either side, asks the Authorizer about the peer's
	// certificate (a removed node's is refused before any byte of raft).
	m.server.VerifyConnection = m.guard.verifyPeer
	verifyServer := m.peer.VerifyConnection
	m.peer.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verifyServer(cs); err != nil {
			return err
		}
		return m.guard.verifyPeer(cs)
	}
	m.dialer.Timeout = 5 * time.Second
	if tcp, ok := raw.Addr().(*net.TCPAddr); ok && !tcp.IP.IsUnspecified() {
		m.dialer.LocalAddr = &net.TCPAddr{IP: tcp.IP}
	}
	m.wg.Add(1)
	go m.acceptLoop()
	return m, nil
}

// strangerLogBurst is how many lines about clients refused for want of
// a node certificate (raft bytes here, a wrong join secret in the RPC
// server) go out every ten seconds; the next says how many were suppressed.
const strangerLogBurst = 5

// Addr is the bound address.
func (m *Mux) Addr() net.Addr { return m.ln.Addr() }

// Limits are the mux's limits, defaults filled in.
func (m *Mux) Limits() Limits { return m.limits }

// ConnStats counts the cluster port's connections: open now, and refused
// because their source address was at Limits.MaxConnsPerSource.
func (m *Mux) ConnStats() netlimit.Stats { return m.ln.Stats() }

func (m *Mux) logRefused(remote net.Addr) {
	if n, ok := m.refusedLog.Allow(); ok {
		m.logger.Warn("refused a connection: its address holds the most connections allowed per source",
			"remote", remote.String(), "max_per_source", m.limits.MaxConnsPerSource, "suppressed", n)
	}
}

// Advertise is the address peers dial.
func (m *Mux) Advertise() string { return m.advertise }

// Close stops accepting and closes both sides. In-flight connections
// already handed out are their owners' to close.
func (m *Mux) Close() error {
	var err error
	m.closeOnce.Do(func() {
		close(m.closed)
		err = m.ln.Close()
		m.raft.close()
		m.http.close()
		m.wg.Wait()
	})
	return err
}

func (m *Mux) acceptLoop() {
	defer m.wg.Done()
	for {
		conn, err := m.ln.Accept()
		if err != nil {
			select {
			case <-m.closed:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			m.logger.Warn("cluster accept failed", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go m.route(conn)
	}
}

// route completes the TLS handshake, reads the first byte, and hands the
// connection to raft (node certificates only) or to the HTTP side.
func (m *Mux) route(raw net.Conn) {
	_ = raw.SetDeadline(time.Now().Add(m.limits.HandshakeTimeout))
	tc := tls.Server(raw, m.server)
	if err := tc.Handshake(); err != nil {
		var refused *refusedPeerError
		if errors.As(err, &refused) {
			m.refused(refused.peer, raw.RemoteAddr(), refused.err)
		}
		m.logger.Debug("cluster TLS handshake failed", "remote", raw.RemoteAddr().String(), "err", err)
		raw.Close()
		return
	}
	if _, ok := pki.PeerNodeID(tc.ConnectionState()); ok {
		// A node of the cluster: its connections do not count against
		// its address (peers may share one with strangers).
		netlimit.Release(raw)
	}
	br := bufio.NewReaderSize(tc, 512)
	first, err := br.Peek(1)
	if err != nil {
		tc.Close()
		return
	}
	_ = raw.SetDeadline(time.Time{})
	peer, hasCert := pki.PeerCertID(tc.ConnectionState())
	if first[0] <= raftTypeMax {
		if !hasCert {
			if n, ok := m.strangerLog.Allow(); ok {
				m.logger.Warn("refused a raft connection without a node certificate of this cluster", "remote", raw.RemoteAddr().String(), "suppressed", n)
			}
			tc.Close()
			return
		}
		if err := m.guard.authorize(peer, UseRaft); err != nil {
			m.refused(peer, raw.RemoteAddr(), err)
			tc.Close()
			return
		}
		conn := &peekedConn{Conn: tc, r: br}
		if !m.raft.put(m.guard.track(conn, peer, true, UseRaft)) {
			tc.Close()
		}
		m.logger.Debug("raft connection", "peer", peer.NodeID, "remote", raw.RemoteAddr().String())
		return
	}
	conn := &peekedConn{Conn: tc, r: br}
	if !m.http.put(m.guard.track(conn, peer, hasCert, UseHandshake)) {
		tc.Close()
	}
}

// dial opens a mutual-TLS connection to a peer's cluster port.
func (m *Mux) dial(address string, timeout time.Duration) (net.Conn, error) {
	d := m.dialer
	if timeout > 0 {
		d.Timeout = timeout
	}
	raw, err := d.Dial("tcp", address)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, m.peer)
	_ = raw.SetDeadline(time.Now().Add(d.Timeout))
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS with cluster peer %s: %w", address, err)
	}
	_ = raw.SetDeadline(time.Time{})
	peer, _ := pki.PeerCertID(tc.ConnectionState())
	return m.guard.track(tc, peer, true, UseHandshake), nil
}

// RaftLayer is the stream layer raft uses: connections that start with a
// raft RPC byte, and mutual-TLS dials. Closing it stops only raft's side.
func (m *Mux) RaftLayer() *RaftLayer { return &RaftLayer{m: m} }

// RaftLayer implements raftstore.StreamLayer.
type RaftLayer struct{ m *Mux }

func (l *RaftLayer) Accept() (net.Conn, error) { return l.m.raft.accept() }
func (l *RaftLayer) Close() error              { l.m.raft.close(); return nil }
func (l *RaftLayer) Addr() net.Addr            { return advertiseAddr(l.m.advertise) }
func (l *RaftLayer) Dial(address string, timeout time.Duration) (net.Conn, error) {
	return l.m.dial(address, timeout)
}

// HTTPListener yields the connections of the cluster's HTTP RPCs.
func (m *Mux) HTTPListener() net.Listener { return m.http }

type advertiseAddr string

func (a advertiseAddr) Network() string { return "tcp" }
func (a advertiseAddr) String() string  { return string(a) }

// peekedConn replays the byte read to route the connection.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// connQueue is a net.Listener fed by the mux.
type connQueue struct {
	addr   net.Addr
	ch     chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func newConnQueue(addr net.Addr) *connQueue {
	return &connQueue{addr: addr, ch: make(chan net.Conn), closed: make(chan struct{})}
}

func (q *connQueue) put(c net.Conn) bool {
	select {
	case q.ch <- c:
		return true
	case <-q.closed:
		return false
	}
}

func (q *connQueue) accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.closed:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) close() { q.once.Do(func() { close(q.closed) }) }

func (q *connQueue) Accept() (net.Conn, error) { return q.accept() }
func (q *connQueue) Close() error              { q.close(); return nil }
func (q *connQueue) Addr() net.Addr            { return q.addr }
