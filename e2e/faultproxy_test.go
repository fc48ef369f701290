//go:build e2e

package e2e

import (
	"io"
	"net"
	"sort"
	"sync"
	"testing"
	"time"
)

// faultNet is the cluster's network as the fault-injection test sees it:
// one loopback TCP proxy in front of each node's cluster port. Every node
// advertises its proxy's address, so all raft traffic and every
// node-to-node RPC (forwarded writes, read indexes, joins of a restarted
// node) passes through the proxy of the node being called. A node's
// outgoing connections leave from the IP its --raft-addr is bound to, so a
// proxy knows the caller by the connection's source IP; cutting the link
// between two nodes refuses new connections on it and closes the live ones,
// in both directions.
type faultNet struct {
	// byIP names the node calling from a source IP; fixed before any proxy
	// accepts, so read without a lock.
	byIP    map[string]string
	proxies map[string]*faultProxy
}

// faultNetNode describes one node to newFaultNet: its id, the loopback IP
// its cluster port binds and its outgoing connections leave from, and
// that cluster port (the proxy's target).
type faultNetNode struct {
	id, ip, target string
}

// newFaultNet starts one proxy per node on 127.0.0.1 with a free port.
// The proxies close with the test.
func newFaultNet(t *testing.T, nodes []faultNetNode) *faultNet {
	t.Helper()
	f := &faultNet{byIP: map[string]string{}, proxies: map[string]*faultProxy{}}
	for _, n := range nodes {
		f.byIP[n.ip] = n.id
	}
	for _, n := range nodes {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := &faultProxy{node: n.id, target: n.target, ln: ln, net: f,
			cut: map[string]bool{}, conns: map[*proxiedConn]struct{}{}}
		f.proxies[n.id] = p
		p.wg.Add(1)
		go p.acceptLoop()
		t.Cleanup(p.close)
	}
	return f
}

// addr is the address that stands for node id: what it advertises.
func (f *faultNet) addr(id string) string { return f.proxies[id].ln.Addr().String() }

// cut severs the link between nodes a and b, both ways.
func (f *faultNet) cut(a, b string) {
	f.proxies[a].setCut(b, true)
	f.proxies[b].setCut(a, true)
}

// isolate cuts every link of node id; it returns the other nodes.
func (f *faultNet) isolate(id string) []string {
	var others []string
	for other := range f.proxies {
		if other != id {
			f.cut(id, other)
			others = append(others, other)
		}
	}
	sort.Strings(others)
	return others
}

// healAll restores every link.
func (f *faultNet) healAll() {
	for _, p := range f.proxies {
		p.mu.Lock()
		clear(p.cut)
		p.mu.Unlock()
	}
}

// proxyStats counts what one proxy did.
type proxyStats struct {
	accepted, refused, severed int
}

func (f *faultNet) stats() map[string]proxyStats {
	out := map[string]proxyStats{}
	for id, p := range f.proxies {
		p.mu.Lock()
		out[id] = p.stats
		p.mu.Unlock()
	}
	return out
}

// faultProxy forwards connections to one node's cluster port, except from
// the peers whose link to that node is cut.
type faultProxy struct {
	node, target string
	ln           net.Listener
	net          *faultNet
	wg           sync.WaitGroup

	mu     sync.Mutex
	cut    map[string]bool // peers cut from node
	conns  map[*proxiedConn]struct{}
	stats  proxyStats
	closed bool
}

// proxiedConn is one connection through the proxy: from the calling peer
// ("" when its source IP is no node's) to the node.
type proxiedConn struct {
	peer           string
	client, server net.Conn
	dead           bool // severed; the server side must close as it connects
}

func (p *faultProxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		peer := ""
		if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			peer = p.net.byIP[a.IP.String()]
		}
		p.mu.Lock()
		if p.closed || (peer != "" && p.cut[peer]) {
			p.stats.refused++
			p.mu.Unlock()
			abortConn(c)
			continue
		}
		pc := &proxiedConn{peer: peer, client: c}
		p.conns[pc] = struct{}{}
		p.stats.accepted++
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(pc)
	}
}

// serve dials the node and copies both ways until either side ends or the
// link is cut.
func (p *faultProxy) serve(pc *proxiedConn) {
	defer p.wg.Done()
	defer func() {
		p.mu.Lock()
		delete(p.conns, pc)
		p.mu.Unlock()
	}()
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		// The node is down: the caller sees what it would see without us.
		abortConn(pc.client)
		return
	}
	p.mu.Lock()
	pc.server = server
	dead := pc.dead
	p.mu.Unlock()
	if dead {
		abortConn(server)
		return
	}
	done := make(chan struct{}, 2)
	go func() { io.Copy(server, pc.client); done <- struct{}{} }()
	go func() { io.Copy(pc.client, server); done <- struct{}{} }()
	<-done
	// One direction ended: end the whole connection, as a peer that closes
	// its socket would.
	pc.client.Close()
	server.Close()
	<-done
}

// setCut cuts (or heals) the link from peer to this proxy's node. Cutting
// closes the peer's live connections at once.
func (p *faultProxy) setCut(peer string, cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !cut {
		delete(p.cut, peer)
		return
	}
	p.cut[peer] = true
	for pc := range p.conns {
		if pc.peer == peer && !pc.dead {
			p.severLocked(pc)
		}
	}
}

func (p *faultProxy) severLocked(pc *proxiedConn) {
	pc.dead = true
	p.stats.severed++
	abortConn(pc.client)
	if pc.server != nil {
		abortConn(pc.server)
	}
}

func (p *faultProxy) close() {
	p.mu.Lock()
	p.closed = true
	p.ln.Close()
	for pc := range p.conns {
		if !pc.dead {
			p.severLocked(pc)
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// abortConn closes a connection with a reset rather than an orderly FIN, as a
// broken network or a refused connection would look to the peer.
func abortConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
