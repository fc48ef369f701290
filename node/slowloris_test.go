package node

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/broker"
	"appliance/fleet"
	"appliance/internal/testenv"
	"appliance/internal/testutil"
)

// The slowloris test: 2,000 idle or trickling sockets against each of the
// node's three listeners (the API, the cluster port, the broker), from 40
// loopback addresses so that no address reaches its cap: what frees the
// sockets is the listeners' timeouts, not the caps. Meanwhile real MQTT
// devices connect, get their desired documents and have their reports
// committed, the API answers reads and writes, and a second node joins the
// cluster through the attacked cluster port and forwards writes over it.
// Then every socket of the attack must have been closed by the node. A
// second case sends 2,000 sockets from one address to a node with the
// default caps: no listener holds more than its cap of them at once, each
// refuses the rest at once (counted in /metrics), and serves other
// addresses.
//
// On the code before the listeners were bounded, the API kept a socket
// forever once it had sent one request (no idle timeout) or while it
// trickled a request body (no read timeout), the cluster port kept its
// RPC connections forever after a request, and no listener had a cap:
// the test reports those sockets as never closed and the single address
// as served in full.

// slowlorisSockets is how many attack sockets each listener gets.
const slowlorisSockets = 2000

// attackSources are the loopback addresses the spread attack comes from:
// 50 sockets each per listener, under every default cap.
var attackSources = func() []string {
	var out []string
	for i := 20; i < 60; i++ {
		out = append(out, fmt.Sprintf("127.0.0.%d", i))
	}
	return out
}()

// stall is one way a socket holds a listener.
type stall struct {
	name   string
	count  int
	useTLS bool
	// after runs once the socket is connected (and TLS done): it sends
	// what the kind sends, returning when the server has closed the
	// connection (true) or abort was closed (false).
	after func(conn net.Conn, abort <-chan struct{}) bool
}

func TestSlowloris_DevicesAndOperatorsStillServed(t *testing.T) {
	if testing.Short() {
		t.Skip("12,000 sockets: not in -short")
	}
	testenv.SkipUnderRace(t, "12,000 sockets")
	needFiles(t, 2*3*slowlorisSockets+2000)
	logger := slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	// Timeouts shorter than the defaults, so that the attack's sockets
	// turn over within the test; the caps are the defaults.
	n1 := startTLSNode(t, Config{
		NodeID: "n1",
		Limits: ListenerLimits{
			HandshakeTimeout: 2 * time.Second, ReadTimeout: 3 * time.Second, WriteTimeout: 3 * time.Second,
			IdleTimeout: 2 * time.Second, ClusterIdleTimeout: 4 * time.Second,
		},
		DeviceLimits: broker.Limits{ConnectTimeout: 2 * time.Second},
		Logger:       logger,
	})
	ops := tlsClient(t, n1)
	ctx := context.Background()
	const devices = 20
	keys := map[string]string{}
	for i := range devices {
		id := fmt.Sprintf("press-%02d", i)
		d, err := ops.PutDevice(ctx, id, api.DeviceRequest{Tags: map[string]any{"line": "a"}}, api.WriteOptions{})
		if err != nil {
			t.Fatal(err)
		}
		keys[id] = d.Authentication.SymmetricKey.PrimaryKey
	}

	api1 := strings.TrimPrefix(n1.URL(), "https://")
	targets := []struct {
		listener, addr string
		stalls         []stall
	}{
		{"api", api1, []stall{
			{"idle", 1200, false, waitClosed},
			{"TLS then silent", 200, true, waitClosed},
			{"trickled request header", 200, true, trickle("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", "a")},
			{"kept alive after a request", 200, true, keptAlive("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")},
			{"trickled request body", 200, true, trickle("PUT /api/v1/devices/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", " ")},
		}},
		{"cluster", n1.RaftAddr(), []stall{
			{"idle", 1400, false, waitClosed},
			{"TLS then silent", 200, true, waitClosed},
			{"trickled request header", 200, true, trickle("GET /cluster/v1/x HTTP/1.1\r\nHost: x\r\nX-Slow: ", "a")},
			{"kept alive after a request", 200, true, keptAlive("GET /cluster/v1/x HTTP/1.1\r\nHost: x\r\n\r\n")},
		}},
		{"mqtt", n1.MQTTAddr(), []stall{
			{"idle", 1600, false, waitClosed},
			{"TLS then silent", 200, true, waitClosed},
			// A CONNECT whose remaining length promises 200 bytes, sent one
			// byte at a time.
			{"trickled CONNECT", 200, true, trickle("\x10\xc8\x01\x00\x04MQTT\x05", "\x00")},
		}},
	}

	// The attack: each socket, once closed by the node, is opened again
	// until stop; abort ends those the node never closes. The attacker
	// never gives up on a socket first (its own timeouts are
	// testutil.WaitTimeout), so on a slow machine too an address holds at
	// most its 50 sockets at the node at once, under every cap.
	stop, abort := make(chan struct{}), make(chan struct{})
	var firstOpen sync.WaitGroup
	var wg sync.WaitGroup
	type tally struct{ serverClosed, held, dialFailed atomic.Int64 }
	tallies := map[string]*tally{}
	i := 0
	for _, tg := range targets {
		total := 0
		for _, st := range tg.stalls {
			total += st.count
			tl := &tally{}
			tallies[tg.listener+": "+st.name] = tl
			for range st.count {
				src := attackSources[i%len(attackSources)]
				i++
				firstOpen.Add(1)
				// The sockets open over a second, as a slowloris ramps up,
				// not all in the same millisecond.
				delay := time.Duration(i) * time.Second / (3 * slowlorisSockets)
				wg.Go(func() {
					time.Sleep(delay)
					first := true
					for {
						conn, err := openStalled(src, tg.addr, st.useTLS, testutil.WaitTimeout)
						if first {
							first = false
							firstOpen.Done()
						}
						if err != nil {
							tl.dialFailed.Add(1)
						} else if st.after(conn, abort) {
							tl.serverClosed.Add(1)
						} else {
							tl.held.Add(1)
						}
						if conn != nil {
							conn.Close()
						}
						select {
						case <-stop:
							return
						default:
						}
					}
				})
			}
		}
		if total != slowlorisSockets {
			t.Fatalf("%s: %d attack sockets, want %d", tg.listener, total, slowlorisSockets)
		}
	}
	var stopOnce, abortOnce sync.Once
	endAttack := func() { stopOnce.Do(func() { close(stop) }) }
	abortAttack := func() { abortOnce.Do(func() { close(abort) }) }
	defer func() { endAttack(); abortAttack(); wg.Wait() }()
	firstOpen.Wait()
	t.Logf("attack under way: %d sockets on each listener from %d addresses", slowlorisSockets, len(attackSources))

	// Devices connect over TLS, get their desired documents, and have
	// their reports committed.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(n1.CACertPEM())
	var devs []*mqttDevice
	for id, key := range keys {
		d := connectTLSDevice(t, n1.MQTTAddr(), pool, id, key)
		if d == nil {
			t.Fatalf("%s could not connect during the attack", id)
		}
		d.subscribeDesired(t)
		if doc := d.nextDesired(t); doc.DeploymentID != "" {
			t.Fatalf("%s: desired %+v before any deployment", id, doc)
		}
		devs = append(devs, d)
	}
	// The API takes a write whose effect reaches every device.
	if _, err := ops.PutDeployment(ctx, "line-a", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.line='a'", Priority: 1}, api.WriteOptions{}); err != nil {
		t.Fatalf("create a deployment during the attack: %v", err)
	}
	for _, d := range devs {
		doc := d.nextDesired(t)
		if doc.DeploymentID != "line-a" {
			t.Fatalf("%s: desired %+v, want deployment line-a", d.id, doc)
		}
		rep := fmt.Sprintf(`{"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, doc.Version)
		if _, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic(d.id), QoS: 1, Payload: []byte(rep)}); err != nil {
			t.Fatalf("%s: report: %v", d.id, err)
		}
		waitReported(t, ops, d.id, rep)
	}
	t.Logf("%d devices connected, got their deployment and reported during the attack", len(devs))

	// A second node joins through the attacked cluster port, and a write
	// it takes is forwarded to n1 over it.
	n2 := startTLSNode(t, Config{NodeID: "n2", Join: "https://" + n1.RaftAddr(), JoinToken: n1.JoinToken(), Logger: logger})
	ops2 := tlsClient(t, n2)
	// The PUT is idempotent, so it is sent again when its outcome was
	// unknown: on a starved machine the two-node cluster may change leader
	// while it is in flight (n1 steps down when n2's heartbeats answer
	// late), which says nothing of the attack. What must hold is that a
	// forwarded write gets through the attacked port.
	var forwardErr error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if _, forwardErr = ops2.PutDevice(ctx, "via-n2", api.DeviceRequest{}, api.WriteOptions{}); forwardErr == nil || time.Now().After(deadline) {
			break
		}
		t.Logf("a write on n2, retried: %v", forwardErr)
	}
	if forwardErr != nil {
		t.Fatalf("a write on n2 forwarded to the leader during the attack: %v", forwardErr)
	}
	if _, err := ops.Device(ctx, "via-n2", true); err != nil {
		t.Fatalf("n1 does not hold the write forwarded by n2: %v", err)
	}
	t.Log("n2 joined through the attacked cluster port and forwarded a write over it")

	// The attack ends: every socket of it must have been closed by the
	// node, none is left held.
	endAttack()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(testutil.WaitTimeout):
		abortAttack()
		<-done
	}
	for name, tl := range tallies {
		t.Logf("%s: %d closed by the node, %d held to the end, %d dials failed", name, tl.serverClosed.Load(), tl.held.Load(), tl.dialFailed.Load())
	}
	for _, tg := range targets {
		for _, st := range tg.stalls {
			tl := tallies[tg.listener+": "+st.name]
			if tl.held.Load() > 0 || tl.serverClosed.Load() < int64(st.count) {
				t.Errorf("%s, %s: %d of its sockets never closed by the node (%d closed)", tg.listener, st.name, tl.held.Load(), tl.serverClosed.Load())
			}
		}
	}
	// The timeouts did it, not the caps: no address was over one.
	metrics := scrapeMetrics(t, n1)
	for _, l := range []string{"api", "cluster", "mqtt"} {
		if v := metricValue(t, metrics, fmt.Sprintf(`appliance_connections_refused_total{listener=%q}`, l)); v != 0 {
			t.Errorf("%s: %v connections refused for the cap per source; the spread attack should meet only timeouts", l, v)
		}
	}
}

// TestSlowloris_OneAddressMeetsTheCap: 2,000 sockets from one address
// against each listener of a node with the default caps. What must hold
// however slow the machine: the node never holds more than the cap of
// them open at once (its own count, the one appliance_connections_open
// exports); every socket the attacker sees closed at once is counted in
// appliance_connections_refused_total, and nothing else is; the cap's
// worth of sockets is served (all of them, unless the attacker gave up on
// some); another address is served meanwhile; and once the attacker's
// sockets are gone its address is served again.
//
// The node's timeouts are long here, so that it closes none of the
// sockets it serves during the test and only the cap acts: with the
// default 10 s, a loaded machine that took longer than that to open the
// 2,000 let the node close the first ones and serve later ones in their
// place (the spread test above is the timeouts' own).
func TestSlowloris_OneAddressMeetsTheCap(t *testing.T) {
	if testing.Short() {
		t.Skip("6,000 sockets: not in -short")
	}
	testenv.SkipUnderRace(t, "6,000 sockets")
	needFiles(t, 3*slowlorisSockets+2000)
	long := 10 * testutil.WaitTimeout
	n := startTLSNode(t, Config{
		NodeID: "n1",
		Limits: ListenerLimits{
			HandshakeTimeout: long, ReadTimeout: long, WriteTimeout: long,
			IdleTimeout: long, ClusterIdleTimeout: long,
		},
		DeviceLimits: broker.Limits{ConnectTimeout: long},
	})
	ops := tlsClient(t, n)
	const attacker = "127.0.0.99"
	for _, tc := range []struct {
		listener, addr string
		limit          int
		open           func() int64 // the node's count of the listener's open connections
	}{
		{"api", strings.TrimPrefix(n.URL(), "https://"), DefaultAPIMaxConnsPerSource, func() int64 { return n.apiLn.capped.Stats().Open }},
		{"cluster", n.RaftAddr(), DefaultClusterMaxConnsPerSource, func() int64 { return n.mux.ConnStats().Open }},
		{"mqtt", n.MQTTAddr(), broker.DefaultMaxPendingPerSource, func() int64 { return n.broker.Stats().OpenConns }},
	} {
		t.Run(tc.listener, func(t *testing.T) {
			// The listener's other connections (the test's own API
			// client) are open before the attack and only close.
			baseline := tc.open()
			var most atomic.Int64 // the most attacker sockets the node held at once
			sample := func() {
				if held := tc.open() - baseline; held > most.Load() {
					most.Store(held)
				}
			}
			sampling, sampled := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(sampled)
				for {
					sample()
					select {
					case <-sampling:
						return
					case <-time.After(time.Millisecond):
					}
				}
			}()

			var served, refused, gaveUp atomic.Int64
			var conns sync.Map
			var wg sync.WaitGroup
			var otherErr atomic.Value
			for range slowlorisSockets {
				wg.Go(func() {
					conn, err := openStalled(attacker, tc.addr, true, testutil.WaitTimeout)
					var ne net.Error
					switch {
					case err == nil:
						served.Add(1)
						conns.Store(conn, true)
					case errors.As(err, &ne) && ne.Timeout():
						gaveUp.Add(1)
					case errors.Is(err, errDial) && !errors.Is(err, syscall.ECONNRESET):
						otherErr.CompareAndSwap(nil, err)
					default: // reset or closed before TLS was done
						refused.Add(1)
					}
				})
			}
			wg.Wait()
			close(sampling)
			<-sampled
			sample()
			t.Logf("%d sockets from one address: %d served, %d refused, %d given up (timed out); the node held at most %d at once",
				slowlorisSockets, served.Load(), refused.Load(), gaveUp.Load(), most.Load())
			if err := otherErr.Load(); err != nil {
				t.Fatalf("a dial from %s failed: %v", attacker, err)
			}
			if most.Load() > int64(tc.limit) {
				t.Errorf("the node held %d sockets from one address at once, over the cap %d", most.Load(), tc.limit)
			}
			if refused.Load() == 0 {
				t.Errorf("none of %d sockets from one address was refused (%d served): no cap", slowlorisSockets, served.Load())
			}
			// Every socket the node served is still open (it closes none
			// here), so they count against the cap together; once one was
			// refused the cap was full, and every slot went to a socket
			// that was served or that the attacker gave up on.
			if served.Load() > int64(tc.limit) {
				t.Errorf("%d sockets from one address served at once, over the cap %d", served.Load(), tc.limit)
			}
			if served.Load()+gaveUp.Load() < int64(tc.limit) {
				t.Errorf("%d sockets from one address served (%d given up), want the cap %d", served.Load(), gaveUp.Load(), tc.limit)
			}
			if v := metricValue(t, scrapeMetrics(t, n), fmt.Sprintf(`appliance_connections_refused_total{listener=%q}`, tc.listener)); v != float64(refused.Load()) {
				t.Errorf("appliance_connections_refused_total{listener=%q} = %v, but the attacker saw %d of its sockets refused", tc.listener, v, refused.Load())
			}
			// Another address is served meanwhile.
			if _, err := ops.Health(context.Background()); err != nil {
				t.Errorf("the API from another address: %v", err)
			}
			if conn, err := openStalled("127.0.0.98", tc.addr, true, testutil.WaitTimeout); err != nil {
				t.Errorf("%s from another address: %v", tc.listener, err)
			} else {
				conn.Close()
			}
			// The attacker gone, its address is served again.
			conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
			deadline := time.Now().Add(testutil.WaitTimeout)
			for {
				conn, err := openStalled(attacker, tc.addr, true, testutil.WaitTimeout)
				if err == nil {
					conn.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: the attacker's address is still refused %s after its sockets closed: %v", tc.listener, testutil.WaitTimeout, err)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// errDial marks openStalled's errors of the TCP connect, before TLS.
var errDial = errors.New("dial")

// openStalled connects from src (and completes TLS, not verifying the
// server: an attacker does not care), giving up after within.
func openStalled(src, addr string, useTLS bool, within time.Duration) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: within}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errDial, err)
	}
	if !useTLS {
		return raw, nil
	}
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
	_ = raw.SetDeadline(time.Now().Add(within))
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

// waitClosed sends nothing and waits for the server to close.
func waitClosed(conn net.Conn, abort <-chan struct{}) bool {
	return untilClosed(conn, abort, nil)
}

// trickle sends head, then one more of unit every 200 ms, forever.
func trickle(head, unit string) func(net.Conn, <-chan struct{}) bool {
	return func(conn net.Conn, abort <-chan struct{}) bool {
		return untilClosed(conn, abort, func(closed <-chan struct{}) {
			if _, err := conn.Write([]byte(head)); err != nil {
				return
			}
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-closed:
					return
				case <-abort:
					return
				case <-tick.C:
					if _, err := conn.Write([]byte(unit)); err != nil {
						return
					}
				}
			}
		})
	}
}

// untilClosed reads (and drops) what the server sends while send runs,
// then waits: true when the server closed the connection, false when abort
// came first.
func untilClosed(conn net.Conn, abort <-chan struct{}, send func(closed <-chan struct{})) bool {
	closed := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, conn); close(closed) }()
	if send != nil {
		send(closed)
	}
	select {
	case <-closed:
		return true
	case <-abort:
		conn.Close()
		<-closed
		return false
	}
}

// keptAlive sends one whole request, reads the answer, and then sends
// nothing more on the kept-alive connection.
func keptAlive(req string) func(net.Conn, <-chan struct{}) bool {
	return func(conn net.Conn, abort <-chan struct{}) bool {
		if _, err := conn.Write([]byte(req)); err != nil {
			return true
		}
		_ = conn.SetReadDeadline(time.Now().Add(testutil.WaitTimeout))
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return true
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		_ = conn.SetReadDeadline(time.Time{})
		if resp.Close {
			return true
		}
		return waitClosed(readerConn{conn, br}, abort)
	}
}

// readerConn reads through the bufio.Reader that read the response.
type readerConn struct {
	net.Conn
	r *bufio.Reader
}

func (c readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// startTLSNode starts a node with its default TLS listeners on loopback
// ports of its own.
func startTLSNode(t *testing.T, cfg Config) *Node {
	t.Helper()
	cfg.DataDir = t.TempDir()
	cfg.HTTPAddr, cfg.RaftAddr, cfg.MQTTAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	cfg.RaftHeartbeatTimeout, cfg.RaftElectionTimeout = 500*time.Millisecond, 500*time.Millisecond
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatalf("start %s: %v", cfg.NodeID, err)
	}
	t.Cleanup(func() { n.Stop() })
	if err := n.store.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	return n
}

// tlsClient is an API client that trusts the node's CA.
func tlsClient(t *testing.T, n *Node) *api.Client {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(n.CACertPEM()) {
		t.Fatal("no CA certificate")
	}
	return &api.Client{BaseURL: n.URL(), Token: n.Token(),
		HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: testutil.WaitTimeout}}
}

// connectTLSDevice connects a real MQTT 5 client over TLS, verifying the
// node with its CA. Like an agent, it tries again after a failure (a
// second apart, for testutil.WaitTimeout); it returns nil if it never got
// in.
func connectTLSDevice(t *testing.T, addr string, pool *x509.CertPool, id, key string) *mqttDevice {
	t.Helper()
	deadline := time.Now().Add(testutil.WaitTimeout)
	for {
		d, err := dialTLSDevice(t, addr, pool, id, key)
		if err == nil {
			return d
		}
		t.Logf("%s: %v; trying again", id, err)
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(time.Second)
	}
}

func dialTLSDevice(t *testing.T, addr string, pool *x509.CertPool, id, key string) (*mqttDevice, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: testutil.WaitTimeout}, "tcp", addr, &tls.Config{RootCAs: pool})
	if err != nil {
		return nil, err
	}
	d := &mqttDevice{id: id, msgs: make(chan *paho.Publish, 16)}
	d.c = paho.NewClient(paho.ClientConfig{
		// paho writes one packet in several writes from several
		// goroutines; over TLS they must not interleave.
		Conn: packets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			select {
			case d.msgs <- pr.Packet:
			default:
			}
			return true, nil
		}},
		PacketTimeout: testutil.WaitTimeout,
	})
	ctx, cancel := context.WithTimeout(context.Background(), testutil.WaitTimeout)
	defer cancel()
	if _, err := d.c.Connect(ctx, &paho.Connect{ClientID: id, Username: id, UsernameFlag: true, Password: []byte(key), PasswordFlag: true, KeepAlive: 60, CleanStart: true}); err != nil {
		conn.Close()
		return nil, err
	}
	t.Cleanup(func() { d.c.Disconnect(&paho.Disconnect{}) })
	return d, nil
}

// waitReported waits until the node's state holds doc as the device's
// report.
func waitReported(t *testing.T, c *api.Client, id, doc string) {
	t.Helper()
	deadline := time.Now().Add(testutil.WaitTimeout)
	for {
		v, err := c.Device(context.Background(), id, false)
		if err == nil && v.Reported != nil && sameJSON(v.Reported.Document, doc) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: report never committed (%v)", id, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// metricValue reads one sample of a Prometheus text exposition.
func metricValue(t *testing.T, text, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err != nil {
				t.Fatalf("metric %s: %q", series, line)
			}
			return v
		}
	}
	t.Fatalf("no metric %s", series)
	return 0
}

// needFiles raises the soft limit on open files to the hard one and
// fails if that is still below n: the test holds both ends of its sockets.
func needFiles(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}
	if lim.Cur < n {
		t.Fatalf("this test holds about %d open files; the limit here is %d (ulimit -n)", n, lim.Cur)
	}
}
