package northbound

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
)

// testAuth admits the consumers it holds, by key.
type testAuth struct {
	mu   sync.Mutex
	keys map[string]string
}

func (a *testAuth) AuthenticateConsumer(_ context.Context, name, key string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if k, ok := a.keys[name]; !ok || k != key {
		return errors.New("unknown consumer or wrong key")
	}
	return nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

// startServer opens a server in dir (a new one when ""), listening on a
// free port of 127.0.0.1, with the consumer "mes" (key "mes-key").
func startServer(t testing.TB, dir string, mutate ...func(*Config)) *Server {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := Config{Dir: dir, Addr: "127.0.0.1:0", Auth: &testAuth{keys: map[string]string{"mes": "mes-key", "historian": "h-key"}}, Logger: testLogger(t)}
	for _, m := range mutate {
		m(&cfg)
	}
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// ingest sends one batch of messages with the given sequence numbers from
// device/module, each with the application property "n" and the
// messageId "<device>-<seq>".
func ingest(t testing.TB, s *Server, device, module string, seqs ...uint64) {
	t.Helper()
	if err := s.Ingest(context.Background(), device, batchOf(device, module, seqs...)); err != nil {
		t.Fatal(err)
	}
}

func batchOf(device, module string, seqs ...uint64) []byte {
	var b fleet.UpstreamBatch
	for _, seq := range seqs {
		b.Messages = append(b.Messages, fleet.UpstreamMessage{
			Seq: seq, Module: module, Output: "out1", EnqueuedTime: time.UnixMilli(1_700_000_000_000 + int64(seq)).UTC(),
			Properties:       []fleet.Property{{Name: "n", Value: strconv.FormatUint(seq, 10)}},
			SystemProperties: []fleet.Property{{Name: "messageId", Value: fmt.Sprintf("%s-%d", device, seq)}, {Name: "contentType", Value: "application/json"}},
			Body:             []byte(fmt.Sprintf(`{"seq":%d}`, seq)),
		})
	}
	return fleet.EncodeUpstreamBatch(nil, b)
}

// consumer is a paho MQTT 5 client of the northbound listener.
type consumer struct {
	c    *paho.Client
	mu   sync.Mutex
	msgs []*paho.Publish
	got  chan struct{}
	// hold, when set, keeps messages unacknowledged (manual acks).
	manual bool
}

type dialOpts struct {
	user, key, clientID string
	clean               bool
	expiry              uint32
	receiveMax          uint16
	manualAcks          bool
}

func dialConsumer(t testing.TB, addr string, o dialOpts) (*consumer, *paho.Connack, error) {
	t.Helper()
	if o.user == "" {
		o.user, o.key = "mes", "mes-key"
	}
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cs := &consumer{got: make(chan struct{}, 1), manual: o.manualAcks}
	cs.c = paho.NewClient(paho.ClientConfig{
		Conn:                       nc,
		EnableManualAcknowledgment: o.manualAcks,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			cs.mu.Lock()
			cs.msgs = append(cs.msgs, pr.Packet)
			cs.mu.Unlock()
			select {
			case cs.got <- struct{}{}:
			default:
			}
			return true, nil
		}},
		PacketTimeout: 5 * time.Second,
	})
	rm := o.receiveMax
	if rm == 0 {
		rm = 100
	}
	props := &paho.ConnectProperties{ReceiveMaximum: &rm}
	if o.expiry > 0 {
		props.SessionExpiryInterval = &o.expiry
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ca, err := cs.c.Connect(ctx, &paho.Connect{
		ClientID: o.clientID, Username: o.user, UsernameFlag: true, Password: []byte(o.key), PasswordFlag: true,
		KeepAlive: 30, CleanStart: o.clean, Properties: props,
	})
	if err != nil {
		return nil, ca, err
	}
	t.Cleanup(func() { _ = cs.c.Disconnect(&paho.Disconnect{}) })
	return cs, ca, nil
}

func mustDial(t testing.TB, addr string, o dialOpts) *consumer {
	t.Helper()
	cs, _, err := dialConsumer(t, addr, o)
	if err != nil {
		t.Fatalf("connect consumer: %v", err)
	}
	return cs
}

func (cs *consumer) subscribe(t testing.TB, filters ...string) []byte {
	t.Helper()
	sub := &paho.Subscribe{}
	for _, f := range filters {
		sub.Subscriptions = append(sub.Subscriptions, paho.SubscribeOptions{Topic: f, QoS: 1})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ack, err := cs.c.Subscribe(ctx, sub)
	if err != nil && ack == nil {
		t.Fatalf("subscribe %v: %v", filters, err)
	}
	return ack.Reasons
}

// waitN waits until the consumer holds at least n messages and returns
// them.
func (cs *consumer) waitN(t testing.TB, n int) []*paho.Publish {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		cs.mu.Lock()
		if len(cs.msgs) >= n {
			out := append([]*paho.Publish(nil), cs.msgs...)
			cs.mu.Unlock()
			return out
		}
		have := len(cs.msgs)
		cs.mu.Unlock()
		select {
		case <-cs.got:
		case <-deadline:
			t.Fatalf("timed out waiting for %d messages; got %d", n, have)
		}
	}
}

func (cs *consumer) count() int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return len(cs.msgs)
}

// seqsOf returns the "n" user property of each message.
func seqsOf(msgs []*paho.Publish) []uint64 {
	var out []uint64
	for _, m := range msgs {
		if m.Properties == nil {
			continue
		}
		n, _ := strconv.ParseUint(m.Properties.User.Get("n"), 10, 64)
		out = append(out, n)
	}
	return out
}

func seqRange(from, to uint64) []uint64 {
	var out []uint64
	for i := from; i <= to; i++ {
		out = append(out, i)
	}
	return out
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitAcked waits until the server holds no unacknowledged message of the
// session's own stream (paho acknowledges after its handler returns: a
// test that disconnects at once may otherwise get the last one again).
func waitAcked(t testing.TB, s *Server, consumer, clientID string) {
	t.Helper()
	waitFor(t, "the consumer's acknowledgements", func() bool {
		s.mu.Lock()
		st := s.streams[privateStreamID(sessionKey{consumer, clientID})]
		s.mu.Unlock()
		if st == nil {
			return false
		}
		st.mu.Lock()
		defer st.mu.Unlock()
		return len(st.inflight) == 0
	})
}
