package broker

import (
	"context"
	"errors"
	"sync"
	"testing"

	"appliance/fleet"
)

type upstreamFunc func(ctx context.Context, deviceID string, batch []byte) error

func (f upstreamFunc) SubmitUpstream(ctx context.Context, deviceID string, batch []byte) error {
	return f(ctx, deviceID, batch)
}

type methodRecorder struct {
	mu  sync.Mutex
	got map[string][]string
}

func (m *methodRecorder) MethodResponse(deviceID string, payload []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.got[deviceID] = append(m.got[deviceID], string(payload))
}

// TestBroker_UpstreamBatchAcknowledgedAsTheSinkSays: a device's upstream
// batch reaches the sink, and its PUBACK says what the sink said: success
// once it holds the batch, "payload format invalid" for a malformed one,
// "unspecified error" (send again) when it could not keep it.
func TestBroker_UpstreamBatchAcknowledgedAsTheSinkSays(t *testing.T) {
	f := newTestFleet("press-01")
	var mu sync.Mutex
	var got []string
	next := error(nil)
	b := startBroker(t, f, func(c *Config) {
		c.Upstream = upstreamFunc(func(_ context.Context, id string, batch []byte) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, id+":"+string(batch))
			return next
		})
	})
	d := mustConnect(t, b.Addr(), "press-01")
	for _, tc := range []struct {
		sinkErr error
		code    byte
	}{
		{nil, 0},
		{ErrPayloadFormatInvalid, 0x99},
		{errors.New("disk full"), 0x80},
	} {
		mu.Lock()
		next = tc.sinkErr
		mu.Unlock()
		res, err := d.publish(t, fleet.UpstreamTopic("press-01"), "batch")
		if tc.code == 0 && err != nil {
			t.Fatalf("sink %v: %v", tc.sinkErr, err)
		}
		if res == nil || res.ReasonCode != tc.code {
			t.Fatalf("sink %v: PUBACK %+v, want reason %#x", tc.sinkErr, res, tc.code)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 3 || got[0] != "press-01:batch" {
		t.Fatalf("sink got %q", got)
	}
	if st := b.Stats(); st.UpstreamBatches != 3 || st.UpstreamRefused != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// TestBroker_DirectMethods: a method request reaches a device subscribed
// to its methods topic, in order, and its responses reach the sink; a
// device connected without that subscription is told apart from one not
// connected.
func TestBroker_DirectMethods(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	rec := &methodRecorder{got: map[string][]string{}}
	b := startBroker(t, f, func(c *Config) { c.Methods = rec })
	d := mustConnect(t, b.Addr(), "press-01")
	mustConnect(t, b.Addr(), "press-02") // no hub: not subscribed to methods
	// The CONNACK reaches the client before the broker has registered the
	// session (mochi acknowledges, then calls the hook): wait for both.
	waitFor(t, "both devices' sessions", func() bool { return len(b.Connected()) == 2 })
	if err := b.PublishMethod("press-01", []byte(`{"id":"0"}`)); !errors.Is(err, ErrMethodsNotSubscribed) {
		t.Fatalf("before subscribing: %v", err)
	}
	if codes := d.subscribe(t, fleet.MethodsTopic("press-01")); codes[0] != 1 {
		t.Fatalf("suback %v", codes)
	}
	if !b.MethodsSubscribed("press-01") || b.MethodsSubscribed("press-02") {
		t.Fatal("MethodsSubscribed")
	}
	for _, id := range []string{"1", "2", "3"} {
		if err := b.PublishMethod("press-01", []byte(`{"id":"`+id+`"}`)); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"1", "2", "3"} {
		m := d.expectMessage(t)
		if m.Topic != fleet.MethodsTopic("press-01") || string(m.Payload) != `{"id":"`+id+`"}` || m.QoS != 1 {
			t.Fatalf("got %s %q qos %d", m.Topic, m.Payload, m.QoS)
		}
	}
	if err := b.PublishMethod("press-02", []byte(`{}`)); !errors.Is(err, ErrMethodsNotSubscribed) {
		t.Fatalf("press-02: %v", err)
	}
	if err := b.PublishMethod("press-03", []byte(`{}`)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("press-03: %v", err)
	}
	if _, err := d.publish(t, fleet.MethodResponseTopic("press-01"), `{"id":"1","status":200}`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the response at the sink", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.got["press-01"]) == 1 && rec.got["press-01"][0] == `{"id":"1","status":200}`
	})
	if st := b.Stats(); st.MethodsSent != 3 || st.MethodResponses != 1 {
		t.Fatalf("stats %+v", st)
	}
}
