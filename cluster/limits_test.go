package cluster_test

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/pki"
)

// listenLimited starts a mux with lim and its RPC server (no store: the
// tests call no route that needs one).
func listenLimited(t *testing.T, c testCluster, nodeID string, lim cluster.Limits) (*cluster.Mux, *logRecorder) {
	t.Helper()
	logs := newLogRecorder(t, nodeID)
	b := c.bundle(t, nodeID)
	m, err := cluster.ListenWith("127.0.0.1:0", "", b, lim, logs.logger())
	if err != nil {
		t.Fatal(err)
	}
	srv := cluster.NewServer(nil, func() cluster.Secrets { return cluster.Secrets{Bundle: b, JoinToken: c.token} }, logs.logger())
	go srv.Serve(m)
	t.Cleanup(func() { srv.Shutdown(t.Context()); m.Close() })
	return m, logs
}

// dialFrom opens a TCP connection to addr from a loopback address of the
// test's choosing (any 127.0.0.x is local on Linux).
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByPeer waits (at most ioGuard) for the mux to close conn: it
// fails the test if the mux keeps it.
func closedByPeer(t *testing.T, what string, conn net.Conn) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(ioGuard))
	_, err := io.Copy(io.Discard, conn)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("%s: the mux kept the connection open for %s", what, ioGuard)
	}
}

// TestMux_TimeoutsCloseStalledClients: every phase a client of the cluster
// port could stall in is bounded: before TLS, after TLS before the first
// byte, within a request header, and kept alive after a request.
func TestMux_TimeoutsCloseStalledClients(t *testing.T) {
	c := newTestCluster(t, "home")
	m, _ := listenLimited(t, c, "n1", cluster.Limits{
		HandshakeTimeout: 300 * time.Millisecond, ReadTimeout: time.Second, IdleTimeout: 500 * time.Millisecond,
	})
	joinerTLS := pki.PinnedClientTLS(c.ca.Fingerprint())

	t.Run("silent TCP", func(t *testing.T) {
		closedByPeer(t, "no TLS hello", dialFrom(t, "127.0.0.1", m.Addr().String()))
	})
	t.Run("TLS then silent", func(t *testing.T) {
		conn := tls.Client(dialFrom(t, "127.0.0.1", m.Addr().String()), joinerTLS)
		if err := conn.Handshake(); err != nil {
			t.Fatal(err)
		}
		closedByPeer(t, "no first byte", conn)
	})
	t.Run("trickled request header", func(t *testing.T) {
		conn := tls.Client(dialFrom(t, "127.0.0.1", m.Addr().String()), joinerTLS)
		if err := conn.Handshake(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		defer close(done)
		go func() {
			for _, b := range []byte("GET /cluster/v1/nothing HTTP/1.1\r\nHost: x\r\nX-Slow: ") {
				select {
				case <-done:
					return
				case <-time.After(100 * time.Millisecond):
				}
				if _, err := conn.Write([]byte{b}); err != nil {
					return
				}
			}
			<-done // never ends the header
		}()
		// net/http may answer 400 before it closes; either way the
		// connection ends.
		data, _ := readAll(t, conn)
		if len(data) > 0 && !strings.HasPrefix(string(data), "HTTP/1.1 4") {
			t.Fatalf("the mux answered %q", data)
		}
	})
	t.Run("kept alive after a request", func(t *testing.T) {
		conn := tls.Client(dialFrom(t, "127.0.0.1", m.Addr().String()), joinerTLS)
		if _, err := conn.Write([]byte("GET /cluster/v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || resp.Close {
			t.Fatalf("status %d, close %v: want a kept-alive 404", resp.StatusCode, resp.Close)
		}
		closedByPeer(t, "idle after a request", conn)
	})
}

// TestMux_RaftStreamsHaveNoIdleTimeout: a raft connection from a node may
// sit idle longer than every timeout of the port (raft pools them and
// uses one only when it has an RPC to send) and still carry the next RPC.
func TestMux_RaftStreamsHaveNoIdleTimeout(t *testing.T) {
	c := newTestCluster(t, "home")
	lim := cluster.Limits{HandshakeTimeout: 200 * time.Millisecond, ReadTimeout: 200 * time.Millisecond, IdleTimeout: 200 * time.Millisecond}
	m1, _ := listenLimited(t, c, "n1", lim)
	m2, _ := listenLimited(t, c, "n2", lim)
	out, err := m2.RaftLayer().Dial(m1.Advertise(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := out.Write([]byte{1}); err != nil { // a RequestVote's type byte
		t.Fatal(err)
	}
	in := acceptWithin(t, raftListener{m1.RaftLayer()})
	defer in.Close()
	// Idle for several times every limit of the port.
	time.Sleep(5 * lim.IdleTimeout)
	if _, err := out.Write([]byte{2, 3}); err != nil {
		t.Fatalf("write on the idle raft stream: %v", err)
	}
	in.SetReadDeadline(time.Now().Add(ioGuard))
	got := make([]byte, 3)
	if _, err := io.ReadFull(in, got); err != nil {
		t.Fatalf("the idle raft stream was closed: %v", err)
	}
	if string(got) != "\x01\x02\x03" {
		t.Fatalf("read %q", got)
	}
}

// TestMux_CapPerSourceCountsStrangersOnly: one address holds at most
// MaxConnsPerSource connections that have not shown a node certificate;
// more are closed at accept, counted and logged (rate-limited); another
// address is not affected; a node's connections stop counting once its
// certificate is checked, so however many raft and RPC connections a peer
// keeps, strangers from its address are still capped at the same number.
func TestMux_CapPerSourceCountsStrangersOnly(t *testing.T) {
	c := newTestCluster(t, "home")
	m1, logs := listenLimited(t, c, "n1", cluster.Limits{MaxConnsPerSource: 3})
	m2, _ := listenLimited(t, c, "n2", cluster.Limits{})
	addr := m1.Addr().String()

	// A node's raft connections, more than the cap, from 127.0.0.1.
	for i := range 5 {
		out, err := m2.RaftLayer().Dial(m1.Advertise(), 5*time.Second)
		if err != nil {
			t.Fatalf("node connection %d: %v", i, err)
		}
		defer out.Close()
		out.Write([]byte{0})
		acceptWithin(t, raftListener{m1.RaftLayer()}).Close()
	}
	// Strangers from 127.0.0.1 still get their three slots...
	for range 3 {
		dialFrom(t, "127.0.0.1", addr)
	}
	waitFor(t, "the strangers' connections accepted", func() bool { return m1.ConnStats().Open >= 3 })
	mark := logs.mark()
	// ...and not a fourth.
	for range 4 {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.1")}, Timeout: 5 * time.Second}
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			continue // the reset reached the dial
		}
		closedByPeer(t, "over the cap", conn)
		conn.Close()
	}
	waitFor(t, "four refusals counted", func() bool { return m1.ConnStats().Refused == 4 })
	if lines := logs.since(mark, "most connections allowed per source"); len(lines) != 1 {
		t.Fatalf("%d log lines for 4 refusals, want 1 (rate-limited)", len(lines))
	}
	// Another address is not affected.
	other := tls.Client(dialFrom(t, "127.0.0.2", addr), pki.PinnedClientTLS(c.ca.Fingerprint()))
	if err := other.Handshake(); err != nil {
		t.Fatalf("a connection from 127.0.0.2: %v", err)
	}
}

// TestMux_StrangerLogsAreRateLimited: anyone who reaches the cluster port
// can send raft bytes without a certificate or joins with a wrong secret,
// as often as they like: the node logs a few of each per interval.
func TestMux_StrangerLogsAreRateLimited(t *testing.T) {
	c := newTestCluster(t, "home")
	n1 := startFirst(t, c, "n1")
	mark := n1.logs.mark()
	wrong := pki.FormatJoinToken(c.ca.Fingerprint(), "not-the-secret")
	const tries = 12
	for range tries {
		if _, err := cluster.Join(testContext(t), "https://"+n1.addr(), wrong, "joiner", []string{"127.0.0.1"}); err == nil {
			t.Fatal("a wrong secret joined")
		}
		conn, err := tls.Dial("tcp", n1.addr(), pki.PinnedClientTLS(c.ca.Fingerprint()))
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte{1, 0, 0, 0})
		readAll(t, conn)
		conn.Close()
	}
	for _, line := range []string{"refused a join with a wrong secret", "refused a raft connection without a node certificate"} {
		if n := len(n1.logs.since(mark, line)); n == 0 || n >= tries {
			t.Errorf("%d lines %q for %d attempts; want a few", n, line, tries)
		}
	}
}
