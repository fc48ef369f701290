package cluster_test

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/pki"
)

// ioGuard bounds a read that must end by itself, so a broken mux fails the
// test instead of hanging it. It is no timing assertion: every read here
// ends as soon as the mux acts.
const ioGuard = 15 * time.Second

// readAll reads from conn until it ends, returning what came.
func readAll(t *testing.T, conn net.Conn) ([]byte, error) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(ioGuard))
	data, err := io.ReadAll(conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the mux neither answered nor closed the connection in %s", ioGuard)
	}
	return data, err
}

// TestMux_RoutesByFirstByte checks that a node of the cluster reaches the
// other node's raft layer with every raft RPC type (pre-vote included),
// first byte and all, and its HTTP side with a request.
func TestMux_RoutesByFirstByte(t *testing.T) {
	c := newTestCluster(t, "home")
	m1, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "n1"), newLogRecorder(t, "n1").logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m1.Close() })
	m2, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "n2"), newLogRecorder(t, "n2").logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m2.Close() })
	if got := m1.RaftLayer().Addr().String(); got != m1.Advertise() || got != m1.Addr().String() {
		t.Fatalf("raft layer address %s, advertise %s, bound %s", got, m1.Advertise(), m1.Addr())
	}

	for _, tc := range []struct {
		name string
		msg  []byte
		side net.Listener
	}{
		{"AppendEntries", []byte{0, 'a', 'e'}, raftListener{m1.RaftLayer()}},
		{"RequestVote", []byte{1, 'r', 'v'}, raftListener{m1.RaftLayer()}},
		{"InstallSnapshot", []byte{2, 'i', 's'}, raftListener{m1.RaftLayer()}},
		{"TimeoutNow", []byte{3, 't', 'n'}, raftListener{m1.RaftLayer()}},
		{"RequestPreVote", []byte{4, 'p', 'v'}, raftListener{m1.RaftLayer()}},
		{"HTTP POST", []byte("POST /cluster/v1/apply HTTP/1.1\r\n"), m1.HTTPListener()},
		{"HTTP GET", []byte("GET / HTTP/1.1\r\n"), m1.HTTPListener()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := m2.RaftLayer().Dial(m1.Advertise(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			if _, err := out.Write(tc.msg); err != nil {
				t.Fatal(err)
			}
			in := acceptWithin(t, tc.side)
			defer in.Close()
			got := make([]byte, len(tc.msg))
			in.SetReadDeadline(time.Now().Add(ioGuard))
			if _, err := io.ReadFull(in, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.msg) {
				t.Fatalf("read %q, want %q", got, tc.msg)
			}
		})
	}

	// Closing the raft layer stops raft's side only.
	m1.RaftLayer().Close()
	if _, err := m1.RaftLayer().Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
	out, err := m2.RaftLayer().Dial(m1.Advertise(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial after the raft layer closed: %v", err)
	}
	defer out.Close()
	out.Write([]byte("GET / HTTP/1.1\r\n"))
	acceptWithin(t, m1.HTTPListener()).Close()
}

// acceptWithin accepts one connection from ln, failing the test (instead
// of hanging it) when the mux never hands one over, for example because
// it routed the connection to its other side.
func acceptWithin(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	type accepted struct {
		conn net.Conn
		err  error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		ch <- accepted{c, err}
	}()
	select {
	case a := <-ch:
		if a.err != nil {
			t.Fatal(a.err)
		}
		return a.conn
	case <-time.After(ioGuard):
		t.Fatalf("no connection reached this side of the mux in %s", ioGuard)
		return nil
	}
}

// raftListener lets a table hold either side of the mux.
type raftListener struct{ l *cluster.RaftLayer }

func (r raftListener) Accept() (net.Conn, error) { return r.l.Accept() }
func (r raftListener) Close() error              { return r.l.Close() }
func (r raftListener) Addr() net.Addr            { return r.l.Addr() }

// TestMux_RefusesStrangers connects to a node's cluster port as everything
// that is not a node of the cluster, and checks that none gets further
// than it should, and that the mux keeps serving the others meanwhile.
func TestMux_RefusesStrangers(t *testing.T) {
	c := newTestCluster(t, "home")
	other := newTestCluster(t, "other")
	n1 := startFirst(t, c, "n1")
	joinerTLS := func() *tls.Config { return pki.PinnedClientTLS(c.ca.Fingerprint()) }

	t.Run("raft byte without a node certificate", func(t *testing.T) {
		mark := n1.logs.mark()
		conn, err := tls.Dial("tcp", n1.addr(), joinerTLS())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write([]byte{1, 0, 0, 0}); err != nil {
			t.Fatal(err)
		}
		if data, _ := readAll(t, conn); len(data) != 0 {
			t.Fatalf("the mux answered %q", data)
		}
		if lines := n1.logs.since(mark, "refused a raft connection without a node certificate"); len(lines) != 1 {
			t.Fatalf("the mux logged %d refusals, want 1", len(lines))
		}
	})

	t.Run("node certificate of another cluster", func(t *testing.T) {
		foreign := other.bundle(t, "n1")
		// A node of the other cluster refuses n1 already (n1's
		// certificate is not of its CA)...
		m, err := cluster.Listen("127.0.0.1:0", "", foreign, newLogRecorder(t, "foreign").logger())
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if conn, err := m.RaftLayer().Dial(n1.addr(), 5*time.Second); err == nil {
			conn.Close()
			t.Fatal("a node of another cluster completed a TLS handshake with n1")
		}
		// ...and one that trusts any server and presents its certificate
		// regardless of the CAs n1 asks for is refused by n1 during the
		// handshake (in TLS 1.3 the client learns it on its first read),
		// before the mux looks at a byte.
		mark := n1.logs.mark()
		conn, err := tls.Dial("tcp", n1.addr(), &tls.Config{
			InsecureSkipVerify: true,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return &foreign.Node, nil
			},
		})
		if err == nil {
			defer conn.Close()
			conn.Write([]byte{0, 0, 0, 0})
			data, err := readAll(t, conn)
			if len(data) != 0 || err == nil {
				t.Fatalf("n1 accepted a certificate of another CA: read %q, %v", data, err)
			}
			t.Logf("the client saw: %v", err)
			if !strings.Contains(err.Error(), "certificate") && !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("the client saw %v, want a TLS certificate alert", err)
			}
		}
		if lines := n1.logs.since(mark, "raft connection"); len(lines) != 0 {
			t.Fatalf("the mux routed the connection: %q", lines)
		}
	})

	t.Run("joiner without a certificate reaches the join RPC", func(t *testing.T) {
		resp, err := cluster.Join(testContext(t), n1.addr(), c.token, "joiner", []string{"127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pki.BundleFromPEM([]byte(resp.CACert), []byte(resp.CAKey), []byte(resp.NodeCert), []byte(resp.NodeKey)); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("node-only RPCs without a node certificate", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: joinerTLS()}}
		defer hc.CloseIdleConnections()
		for _, rpc := range []struct{ method, path, body string }{
			{http.MethodPost, "/cluster/v1/apply", "\x01{}"},
			{http.MethodPost, "/cluster/v1/members", `{"address":"127.0.0.1:1"}`},
			{http.MethodDelete, "/cluster/v1/members/n1", ""},
			{http.MethodPost, "/cluster/v1/read-index", ""},
		} {
			t.Run(rpc.method+" "+rpc.path, func(t *testing.T) {
				req, err := http.NewRequestWithContext(testContext(t), rpc.method, "https://"+n1.addr()+rpc.path, strings.NewReader(rpc.body))
				if err != nil {
					t.Fatal(err)
				}
				resp, err := hc.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				var body struct{ Code, Error string }
				if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
					t.Fatalf("HTTP %d, body not JSON: %v", resp.StatusCode, err)
				}
				if resp.StatusCode != http.StatusUnauthorized || body.Code != "unauthorized" {
					t.Fatalf("HTTP %d, code %q (%s), want 401 unauthorized", resp.StatusCode, body.Code, body.Error)
				}
			})
		}
		// n1 is still alone: nothing was added.
		if ms, err := n1.store.Members(testContext(t)); err != nil || len(ms) != 1 {
			t.Fatalf("members %+v, %v", ms, err)
		}
	})

	t.Run("plain TCP client gets no answer and holds nothing up", func(t *testing.T) {
		// One speaks HTTP without TLS...
		talker, err := net.Dial("tcp", n1.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer talker.Close()
		io.WriteString(talker, "POST /cluster/v1/join HTTP/1.1\r\nHost: n1\r\nContent-Length: 2\r\n\r\n{}")
		if data, _ := readAll(t, talker); len(data) != 0 {
			t.Fatalf("a plain-TCP client got %q", data)
		}
		// ...another connects and says nothing, holding its handshake
		// open while others are served.
		silent, err := net.Dial("tcp", n1.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer silent.Close()
		if _, err := cluster.Join(testContext(t), n1.addr(), c.token, "joiner2", nil); err != nil {
			t.Fatalf("join while a silent client is connected: %v", err)
		}
		if _, err := n1.client.ReadIndex(testContext(t), n1.addr()); err != nil {
			t.Fatalf("node RPC while a silent client is connected: %v", err)
		}
	})
}
