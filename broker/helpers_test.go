package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// The three fakes below stand in for the node: in production the node's
// device store authenticates, its evaluator supplies desired documents, and
// its report batcher takes reports. They are structs with function fields so
// that each test says exactly what the node does.

type fakeAuth struct {
	fn func(ctx context.Context, deviceID, key string) error
}

func (f fakeAuth) AuthenticateDevice(ctx context.Context, deviceID, key string) error {
	return f.fn(ctx, deviceID, key)
}

type fakeDesired struct {
	fn func(deviceID string) ([]byte, error)
}

func (f fakeDesired) Desired(deviceID string) ([]byte, error) { return f.fn(deviceID) }

type fakeReports struct {
	fn func(deviceID string, report []byte) error
}

func (f fakeReports) SubmitReport(deviceID string, report []byte) error {
	return f.fn(deviceID, report)
}

var (
	_ Authenticator = fakeAuth{}
	_ DesiredSource = fakeDesired{}
	_ ReportSink    = fakeReports{}
)

type report struct {
	deviceID string
	doc      string
}

// testFleet is a node's worth of state for the fakes: device keys, desired
// documents, and the reports the sink received.
type testFleet struct {
	mu      sync.Mutex
	keys    map[string]string
	desired map[string]string
	reports chan report
}

func newTestFleet(devices ...string) *testFleet {
	f := &testFleet{keys: map[string]string{}, desired: map[string]string{}, reports: make(chan report, 1024)}
	for _, d := range devices {
		f.keys[d] = "key-" + d
		f.desired[d] = fmt.Sprintf(`{"deviceId":%q,"version":1}`, d)
	}
	return f
}

func (f *testFleet) setDesired(id, doc string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.desired[id] = doc
}

func (f *testFleet) config() Config {
	return Config{
		Addr: "127.0.0.1:0",
		Auth: fakeAuth{fn: func(_ context.Context, id, key string) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			if k, ok := f.keys[id]; !ok || k != key {
				return errors.New("unknown device or wrong key")
			}
			return nil
		}},
		Desired: fakeDesired{fn: func(id string) ([]byte, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			if d, ok := f.desired[id]; ok {
				return []byte(d), nil
			}
			return []byte(`{"version":0,"modulesContent":{}}`), nil // explicit empty desired state
		}},
		Reports: fakeReports{fn: func(id string, doc []byte) error {
			select {
			case f.reports <- report{id, string(doc)}:
				return nil
			default:
				return errors.New("batcher full")
			}
		}},
	}
}

// testLogger sends logs to t.Log until the test ends (mochi's goroutines may
// log a little after Close returns, and t.Log after the end panics).
func testLogger(t testing.TB) *slog.Logger {
	w := &tWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Helper()
		w.t.Log(string(bytes.TrimRight(p, "\n")))
	}
	return len(p), nil
}

// startBroker starts a broker on 127.0.0.1 with a free port, closed at the
// end of the test.
func startBroker(t testing.TB, f *testFleet, mutate ...func(*Config)) *Broker {
	t.Helper()
	cfg := f.config()
	cfg.Logger = testLogger(t)
	for _, m := range mutate {
		m(&cfg)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// testDevice is a real MQTT 5 client (Eclipse Paho) acting as a device.
type testDevice struct {
	id   string
	c    *paho.Client
	msgs chan *paho.Publish
	// serverDisconnect receives the DISCONNECT the broker sent, if any.
	serverDisconnect chan *paho.Disconnect
}

// dialDevice connects as id with key; the error is paho's when the broker
// refuses, with the CONNACK if one came.
func dialDevice(t testing.TB, addr, id, key string, tlsCfg *tls.Config) (*testDevice, *paho.Connack, error) {
	t.Helper()
	return dialDeviceWith(t, addr, id, key, tlsCfg, nil)
}

// dialDeviceWith is dialDevice with onMessage receiving every message instead
// of the msgs channel.
func dialDeviceWith(t testing.TB, addr, id, key string, tlsCfg *tls.Config, onMessage func(*paho.Publish)) (*testDevice, *paho.Connack, error) {
	t.Helper()
	var conn net.Conn
	var err error
	if tlsCfg != nil {
		conn, err = tls.Dial("tcp", addr, tlsCfg)
	} else {
		conn, err = net.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	if tlsCfg != nil {
		// paho writes a packet as several buffers, from several goroutines
		// (its pinger sends a PINGREQ at once). On a *net.TCPConn that is one
		// writev; on a tls.Conn the writes interleave unless it is locked.
		conn = packets.NewThreadSafeConn(conn)
	}
	d := &testDevice{id: id, msgs: make(chan *paho.Publish, 64), serverDisconnect: make(chan *paho.Disconnect, 1)}
	d.c = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			if onMessage != nil {
				onMessage(pr.Packet)
				return true, nil
			}
			select {
			case d.msgs <- pr.Packet:
			default:
				t.Errorf("device %s: message buffer full", id)
			}
			return true, nil
		}},
		OnServerDisconnect: func(dc *paho.Disconnect) { d.serverDisconnect <- dc },
		PacketTimeout:      5 * time.Second,
	})
	receiveMax := uint16(32) // paho's default (65535) allocates a 512 KiB channel
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ca, err := d.c.Connect(ctx, &paho.Connect{
		ClientID:     id,
		Username:     id,
		UsernameFlag: true,
		Password:     []byte(key),
		PasswordFlag: true,
		KeepAlive:    30,
		CleanStart:   true,
		Properties:   &paho.ConnectProperties{ReceiveMaximum: &receiveMax},
	})
	if err != nil {
		return nil, ca, err
	}
	t.Cleanup(func() { _ = d.c.Disconnect(&paho.Disconnect{}) })
	return d, ca, nil
}

// mustConnectSubscribed connects id with its key, subscribes it to its
// desired topic and checks the first document the test fleet gives it.
func mustConnectSubscribed(t testing.TB, addr, id string) *testDevice {
	t.Helper()
	d := mustConnect(t, addr, id)
	d.subscribe(t, fleet.DesiredTopic(id))
	d.expectDesired(t, `{"deviceId":"`+id+`","version":1}`)
	return d
}

func mustConnect(t testing.TB, addr, id string) *testDevice {
	t.Helper()
	d, _, err := dialDevice(t, addr, id, "key-"+id, nil)
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	return d
}

// subscribe returns the SUBACK reason codes.
func (d *testDevice) subscribe(t testing.TB, filters ...string) []byte {
	t.Helper()
	s := &paho.Subscribe{}
	for _, f := range filters {
		s.Subscriptions = append(s.Subscriptions, paho.SubscribeOptions{Topic: f, QoS: 1})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sa, err := d.c.Subscribe(ctx, s)
	if sa == nil {
		t.Fatalf("%s: subscribe %v: %v", d.id, filters, err)
	}
	return sa.Reasons
}

func (d *testDevice) publish(t testing.TB, topic, payload string) (*paho.PublishResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return d.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
}

func (d *testDevice) expectMessage(t testing.TB) *paho.Publish {
	t.Helper()
	select {
	case m := <-d.msgs:
		return m
	case <-time.After(testutil.WaitTimeout):
		t.Fatalf("%s: no message within 5s", d.id)
		return nil
	}
}

func (d *testDevice) expectDesired(t testing.TB, want string) {
	t.Helper()
	m := d.expectMessage(t)
	if m.Topic != fleet.DesiredTopic(d.id) || string(m.Payload) != want || m.QoS != 1 {
		t.Fatalf("%s: got %q QoS %d on %s; want %q QoS 1 on %s", d.id, m.Payload, m.QoS, m.Topic, want, fleet.DesiredTopic(d.id))
	}
}

func (d *testDevice) expectNoMessage(t testing.TB, wait time.Duration) {
	t.Helper()
	select {
	case m := <-d.msgs:
		t.Fatalf("%s: unexpected message on %s: %q", d.id, m.Topic, m.Payload)
	case <-time.After(wait):
	}
}

// waitFor polls cond until it holds (testutil.WaitFor).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, what, cond)
}

// A minimal raw MQTT 5 client, for sending bytes no real client would.

func appendString(b []byte, s string) []byte {
	return append(append(b, byte(len(s)>>8), byte(len(s))), s...)
}

func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

// connectPacket is an MQTT 5 CONNECT with clean start, username and password.
func connectPacket(id, key string) []byte {
	vh := appendString(nil, "MQTT")
	vh = append(vh, 5, 0xC2, 0, 30, 0) // version 5; flags: username, password, clean start; keepalive 30 s; no properties
	vh = appendString(vh, id)
	vh = appendString(vh, id)
	vh = appendString(vh, key)
	return append(appendVarint([]byte{0x10}, len(vh)), vh...)
}

// rawConnect opens a TCP connection and completes an MQTT 5 CONNECT; it
// returns an error unless the CONNACK says success.
func rawConnect(addr, id, key string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(connectPacket(id, key)); err != nil {
		c.Close()
		return nil, err
	}
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("read connack: %w", err)
	}
	rest := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, rest); err != nil {
		c.Close()
		return nil, fmt.Errorf("read connack: %w", err)
	}
	if hdr[0] != 0x20 || len(rest) < 2 || rest[1] != 0 {
		c.Close()
		return nil, fmt.Errorf("connack refused: % x % x", hdr, rest)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// drain reads until the broker closes the connection; it fails only if 5 s
// pass first. A reset counts as closed: the broker closing with our bytes
// still unread sends RST instead of FIN.
func drain(c net.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return err
	}
	return nil
}

// dialRaw opens a plain TCP connection to addr, closed at the end of the test.
func dialRaw(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
