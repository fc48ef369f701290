package cluster

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"appliance/pki"
)

// Use says what a peer's node certificate is checked for.
type Use int

const (
	// UseHandshake: any TLS handshake on the cluster port, either side,
	// and any connection already open (Recheck).
	UseHandshake Use = iota
	// UseRaft: a connection carrying raft's RPCs.
	UseRaft
	// UseRPC: a node-only cluster RPC.
	UseRPC
	// UseAddSelf: the RPC with which a node becomes a voter; the caller
	// may not be a member yet (its handler asks for the join secret then).
	UseAddSelf
)

// Authorizer decides whether a peer's verified node certificate may be
// used (the node implements it from the replicated state: revoked
// certificates, the certificate bound to each member, the members). An
// error refuses: the handshake fails, the connection is closed, or the RPC
// answers 401 with the error's text.
type Authorizer interface {
	AuthorizePeer(peer pki.CertID, use Use) error
}

// guard is the mux's side of authorization: the Authorizer (none until
// SetAuthorizer: everything of this CA is accepted, as before the store
// can answer), the open connections with the certificates their peers
// presented, and the last certificate seen for each node id.
type guard struct {
	auth atomic.Pointer[Authorizer]

	mu    sync.Mutex
	conns map[*guardedConn]struct{}
	seen  map[string]pki.CertID

	// logAt rate-limits the refusal log line per node id.
	logMu sync.Mutex
	logAt map[string]time.Time
}

// guardedConn is an open cluster connection and the certificate its peer
// presented; closing it forgets it.
type guardedConn struct {
	net.Conn
	g    *guard
	peer pki.CertID
	has  bool // the peer presented a node certificate
	use  Use
	once sync.Once
}

func (c *guardedConn) Close() error {
	c.once.Do(func() {
		c.g.mu.Lock()
		delete(c.g.conns, c)
		c.g.mu.Unlock()
	})
	return c.Conn.Close()
}

func (g *guard) authorize(p pki.CertID, use Use) error {
	a := g.auth.Load()
	if a == nil {
		return nil
	}
	return (*a).AuthorizePeer(p, use)
}

func (g *guard) remember(p pki.CertID) {
	g.mu.Lock()
	if g.seen == nil {
		g.seen = map[string]pki.CertID{}
	}
	g.seen[p.NodeID] = p
	g.mu.Unlock()
}

// track registers an open connection.
func (g *guard) track(c net.Conn, peer pki.CertID, has bool, use Use) *guardedConn {
	gc := &guardedConn{Conn: c, g: g, peer: peer, has: has, use: use}
	g.mu.Lock()
	if g.conns == nil {
		g.conns = map[*guardedConn]struct{}{}
	}
	g.conns[gc] = struct{}{}
	g.mu.Unlock()
	return gc
}

// verifyPeer is the check of a handshake, either side: a peer without a
// node certificate (a joiner) passes here and meets the RPCs' checks.
func (g *guard) verifyPeer(cs tls.ConnectionState) error {
	p, ok := pki.PeerCertID(cs)
	if !ok {
		return nil
	}
	g.remember(p)
	if err := g.authorize(p, UseHandshake); err != nil {
		return &refusedPeerError{peer: p, err: err}
	}
	return nil
}

// refusedPeerError is a handshake the Authorizer refused, so that the
// listener can log it (other handshake failures are a stranger's noise).
type refusedPeerError struct {
	peer pki.CertID
	err  error
}

func (e *refusedPeerError) Error() string { return "peer refused: " + e.err.Error() }
func (e *refusedPeerError) Unwrap() error { return e.err }

// SetAuthorizer makes a the judge of every later handshake, raft
// connection and node-only RPC, and closes the open connections it
// refuses.
func (m *Mux) SetAuthorizer(a Authorizer) {
	m.guard.auth.Store(&a)
	m.Recheck()
}

// Recheck asks the Authorizer again about every open connection and closes
// those it now refuses: the node calls it when it applies a change of the
// cluster's certificates (a node removed and its certificate revoked), so
// that a connection opened before the change does not outlive it. It
// returns how many it closed.
func (m *Mux) Recheck() int {
	g := &m.guard
	g.mu.Lock()
	conns := make([]*guardedConn, 0, len(g.conns))
	for c := range g.conns {
		if c.has {
			conns = append(conns, c)
		}
	}
	g.mu.Unlock()
	closed := 0
	for _, c := range conns {
		if err := g.authorize(c.peer, c.use); err != nil {
			m.refused(c.peer, c.RemoteAddr(), err)
			c.Close()
			closed++
		}
	}
	return closed
}

// SeenCert is the last certificate a peer with this node id presented on
// this node's cluster port (or as a server this node dialed).
func (m *Mux) SeenCert(nodeID string) (pki.CertID, bool) {
	m.guard.mu.Lock()
	defer m.guard.mu.Unlock()
	p, ok := m.guard.seen[nodeID]
	return p, ok
}

// refusalLogInterval: a removed node that keeps running retries every
// election timeout; one line per node id and interval is enough.
const refusalLogInterval = 10 * time.Second

// refused logs a refused peer, at most once per node id and interval.
func (m *Mux) refused(p pki.CertID, remote net.Addr, err error) {
	g := &m.guard
	g.logMu.Lock()
	if g.logAt == nil {
		g.logAt = map[string]time.Time{}
	}
	last := g.logAt[p.NodeID]
	now := time.Now()
	quiet := now.Sub(last) < refusalLogInterval
	if !quiet {
		g.logAt[p.NodeID] = now
	}
	g.logMu.Unlock()
	if quiet {
		return
	}
	addr := ""
	if remote != nil {
		addr = remote.String()
	}
	m.logger.Warn("refused a cluster peer", "peer", p.NodeID, "fingerprint", shortFP(p.Fingerprint), "remote", addr, "err", err)
}

func shortFP(fp string) string {
	if len(fp) > 16 {
		return fp[:16]
	}
	return fp
}
