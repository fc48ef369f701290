package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/testutil"
)

func TestBroker_Connect_RightKeyGetsDesiredOnSubscribe(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")

	if got := d.subscribe(t, fleet.DesiredTopic("press-01")); got[0] != 1 {
		t.Fatalf("suback = % x; want granted QoS 1", got)
	}
	d.expectDesired(t, `{"deviceId":"press-01","version":1}`)
	d.expectNoMessage(t, 100*time.Millisecond) // exactly one document, nothing retained besides

	info, ok := b.Connection("press-01")
	if !ok || info.DeviceID != "press-01" || info.ProtocolVersion != 5 || info.TLS ||
		info.ConnectedSince.IsZero() || info.LastActivity.Before(info.ConnectedSince) || !strings.HasPrefix(info.RemoteAddr, "127.0.0.1:") {
		t.Fatalf("Connection(press-01) = %+v, %v", info, ok)
	}
	if got := b.Connected(); len(got) != 1 || got[0].DeviceID != "press-01" {
		t.Fatalf("Connected() = %+v", got)
	}
}

func TestBroker_Connect_DeviceWithoutDeploymentGetsEmptyDesired(t *testing.T) {
	f := newTestFleet("press-01")
	delete(f.desired, "press-01") // the fake source answers with an explicit empty state
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")
	d.subscribe(t, fleet.DesiredTopic("press-01"))
	d.expectDesired(t, `{"version":0,"modulesContent":{}}`)
}

func TestBroker_Connect_Refused(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	tests := []struct {
		name, clientID, user, key string
		wantCode                  byte
	}{
		{"wrong key", "press-01", "press-01", "wrong", packets.ErrBadUsernameOrPassword.Code},
		{"other device's key", "press-01", "press-01", "key-press-02", packets.ErrBadUsernameOrPassword.Code},
		{"unknown device", "ghost", "ghost", "key-ghost", packets.ErrBadUsernameOrPassword.Code},
		{"no password", "press-01", "press-01", "", packets.ErrBadUsernameOrPassword.Code},
		{"client id is not the device id", "someone", "press-01", "key-press-01", packets.ErrClientIdentifierNotValid.Code},
		{"wildcard username", "+", "+", "x", packets.ErrBadUsernameOrPassword.Code},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := dialRaw(t, b.Addr())
			d := paho.NewClient(paho.ClientConfig{Conn: conn})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			ca, err := d.Connect(ctx, &paho.Connect{ClientID: tt.clientID, Username: tt.user, UsernameFlag: true,
				Password: []byte(tt.key), PasswordFlag: tt.key != "", KeepAlive: 30, CleanStart: true})
			if err == nil {
				t.Fatal("connected; want refused")
			}
			if ca == nil || ca.ReasonCode != tt.wantCode {
				t.Fatalf("connack = %+v, err %v; want reason %#x", ca, err, tt.wantCode)
			}
		})
	}
	if got := b.Stats().AuthFailures; got != uint64(len(tests)) {
		t.Errorf("AuthFailures = %d; want %d", got, len(tests))
	}
	if got := b.Connected(); len(got) != 0 {
		t.Errorf("Connected() = %+v; want none", got)
	}
}

func TestBroker_Connect_WillToOtherDeviceRefused(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	conn := dialRaw(t, b.Addr())
	c := paho.NewClient(paho.ClientConfig{Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// mochi publishes wills without an ACL check: a will on press-02's
	// desired topic would reach press-02.
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: "press-01", Username: "press-01", UsernameFlag: true,
		Password: []byte("key-press-01"), PasswordFlag: true, KeepAlive: 30, CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: fleet.DesiredTopic("press-02"), Payload: []byte(`{"evil":true}`)}})
	if err == nil || ca == nil || ca.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("connack = %+v, err %v; want not authorized", ca, err)
	}
}

func TestBroker_Subscribe_NothingOfOtherDevices(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	victim := mustConnectSubscribed(t, b.Addr(), "press-02")

	spy := mustConnect(t, b.Addr(), "press-01")
	filters := []string{
		fleet.DesiredTopic("press-02"),
		"appliance/#",
		"#",
		"+/#",
		"appliance/devices/+/desired",
		"appliance/devices/+/+",
		"appliance/devices/press-02/#",
		fleet.ReportedTopic("press-01"), // its own, but reported is write-only
		fleet.MessagesTopicPrefix("press-01") + "#",
		"appliance/devices/press-01/#", // would also match its own reported
		"$share/g/" + fleet.DesiredTopic("press-02"),
		"$SYS/#",
	}
	for i, code := range spy.subscribe(t, filters...) {
		if code != packets.ErrNotAuthorized.Code {
			t.Errorf("subscribe %q: reason %#x; want not authorized", filters[i], code)
		}
	}

	if err := b.PublishDesired("press-02", []byte(`{"deviceId":"press-02","version":2}`)); err != nil {
		t.Fatal(err)
	}
	victim.expectDesired(t, `{"deviceId":"press-02","version":2}`)
	victim.publish(t, fleet.ReportedTopic("press-02"), `{"lastDesiredVersion":2}`)
	spy.expectNoMessage(t, 300*time.Millisecond)
	if got := b.Stats().ACLDenials; got < uint64(len(filters)) {
		t.Errorf("ACLDenials = %d; want at least %d", got, len(filters))
	}
}

func TestBroker_Publish_OtherDevicesTopicsChangeNothing(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	victim := mustConnectSubscribed(t, b.Addr(), "press-02")

	attacker := mustConnect(t, b.Addr(), "press-01")
	for _, topic := range []string{
		fleet.ReportedTopic("press-02"),
		fleet.DesiredTopic("press-02"),
		fleet.DesiredTopic("press-01"), // a device cannot write its own desired state either
		fleet.MessagesTopicPrefix("press-02") + "temp",
		"appliance/other",
	} {
		pr, err := attacker.publish(t, topic, `{"lastDesiredVersion":99}`)
		if err == nil && pr.ReasonCode != packets.ErrNotAuthorized.Code {
			t.Errorf("publish %s: reason %#x; want not authorized", topic, pr.ReasonCode)
		}
	}
	victim.expectNoMessage(t, 200*time.Millisecond)
	select {
	case r := <-f.reports:
		t.Fatalf("sink got %+v; want nothing", r)
	default:
	}
	if s := b.Stats(); s.ReportsAccepted != 0 || s.ReportsDropped != 0 {
		t.Fatalf("stats = %+v; want no report counted", s)
	}
}

func TestBroker_Report_AcceptedAndMalformedDropped(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) { c.Limits.MaxReportSize = 1024 })
	d := mustConnect(t, b.Addr(), "press-01")
	topic := fleet.ReportedTopic("press-01")

	good := `{"lastDesiredVersion":3,"lastDesiredStatus":{"code":200}}`
	if pr, err := d.publish(t, topic, good); err != nil || pr.ReasonCode != 0 {
		t.Fatalf("publish report: %+v, %v", pr, err)
	}
	select {
	case r := <-f.reports:
		if r.deviceID != "press-01" || r.doc != good {
			t.Fatalf("sink got %+v", r)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("sink not called")
	}

	bad := []string{
		`not json`,
		`[1,2,3]`,
		`"a string"`,
		`{"unterminated":`,
		`{"a":1} {"b":2}`,
		``,
		`{"pad":"` + strings.Repeat("x", 1024) + `"}`,                                                       // over MaxReportSize
		strings.Repeat(`{"a":`, fleet.MaxReportDepth+1) + `1` + strings.Repeat(`}`, fleet.MaxReportDepth+1), // too deep
	}
	for _, p := range bad {
		if _, err := d.publish(t, topic, p); err != nil {
			t.Fatalf("publish %q: %v", p, err)
		}
	}
	// Telemetry is accepted and goes nowhere.
	if _, err := d.publish(t, fleet.MessagesTopicPrefix("press-01")+"temperature", `21.5`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "drops counted", func() bool { return b.Stats().ReportsDropped == uint64(len(bad)) })
	if s := b.Stats(); s.ReportsAccepted != 1 {
		t.Fatalf("stats = %+v; want 1 accepted", s)
	}
	select {
	case r := <-f.reports:
		t.Fatalf("sink got malformed report %+v", r)
	default:
	}
	// The device is still connected: a bad report is dropped, not punished.
	if _, ok := b.Connection("press-01"); !ok {
		t.Fatal("device disconnected after a malformed report")
	}
}

func TestBroker_Report_SinkRefusalCountsAsDropped(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) {
		c.Reports = fakeReports{fn: func(string, []byte) error { return errors.New("batcher full") }}
	})
	d := mustConnect(t, b.Addr(), "press-01")
	if _, err := d.publish(t, fleet.ReportedTopic("press-01"), `{}`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "drop counted", func() bool { return b.Stats().ReportsDropped == 1 })
}

func TestBroker_PublishDesired_ReachesConnectedDeviceWithoutReconnect(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	d := mustConnectSubscribed(t, b.Addr(), "press-01")

	for v := 2; v <= 4; v++ {
		doc := `{"deviceId":"press-01","version":` + string(rune('0'+v)) + `}`
		f.setDesired("press-01", doc)
		if err := b.PublishDesired("press-01", []byte(doc)); err != nil {
			t.Fatalf("PublishDesired v%d: %v", v, err)
		}
		d.expectDesired(t, doc)
	}
	if err := b.PublishDesired("press-02", []byte(`{}`)); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("PublishDesired to an absent device = %v; want ErrNotConnected", err)
	}
	// Counted after the send, which may run on the connection's goroutine.
	waitFor(t, "4 desired documents counted", func() bool { return b.Stats().DesiredSent == 4 })
}

func TestBroker_PublishDesired_BeforeSubscribeIsSentOnSubscribe(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")
	// Listed once its session is established, just after CONNACK.
	waitFor(t, "press-01 listed", func() bool { _, ok := b.Connection("press-01"); return ok })
	f.setDesired("press-01", `{"version":7}`)
	if err := b.PublishDesired("press-01", []byte(`{"version":7}`)); err != nil {
		t.Fatal(err)
	}
	d.expectNoMessage(t, 100*time.Millisecond)
	d.subscribe(t, fleet.DesiredTopic("press-01"))
	d.expectDesired(t, `{"version":7}`)
}

func TestBroker_Desired_SourceErrorDisconnects(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) {
		c.Desired = fakeDesired{fn: func(string) ([]byte, error) { return nil, errors.New("not ready") }}
	})
	d := mustConnect(t, b.Addr(), "press-01")
	// The SUBACK may never arrive: the connection can be dropped first.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: fleet.DesiredTopic("press-01"), QoS: 1}}})
	}()
	select {
	case <-d.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("device not disconnected after the desired source failed")
	}
	if got := b.Stats().DesiredFailed; got != 1 {
		t.Errorf("DesiredFailed = %d; want 1", got)
	}
}

func TestBroker_Disconnect_DropsClient(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")
	other := mustConnect(t, b.Addr(), "press-02")
	d.subscribe(t, fleet.DesiredTopic("press-01"))
	d.expectDesired(t, `{"deviceId":"press-01","version":1}`)

	b.Disconnect("press-01")
	select {
	case dc := <-d.serverDisconnect:
		if dc.ReasonCode != packets.ErrAdministrativeAction.Code {
			t.Errorf("disconnect reason %#x; want administrative action", dc.ReasonCode)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("client not dropped")
	}
	<-d.c.Done()
	if _, ok := b.Connection("press-01"); ok {
		t.Error("press-01 still listed as connected")
	}
	if err := b.PublishDesired("press-01", []byte(`{}`)); !errors.Is(err, ErrNotConnected) {
		t.Errorf("PublishDesired after Disconnect = %v; want ErrNotConnected", err)
	}
	// press-02 is listed once its session is established, just after CONNACK.
	other.subscribe(t, fleet.DesiredTopic("press-02"))
	if got := b.Connected(); len(got) != 1 || got[0].DeviceID != "press-02" {
		t.Errorf("Connected() = %+v; want only press-02", got)
	}

	// The node disables the device: it cannot come back.
	f.mu.Lock()
	delete(f.keys, "press-01")
	f.mu.Unlock()
	if _, _, err := dialDevice(t, b.Addr(), "press-01", "key-press-01", nil); err == nil {
		t.Fatal("disabled device reconnected")
	}
}

func TestBroker_Disconnect_DuringAuthenticationRefuses(t *testing.T) {
	f := newTestFleet("press-01")
	authenticating := make(chan struct{})
	release := make(chan struct{})
	var calls atomic.Int32
	b := startBroker(t, f, func(c *Config) {
		c.Auth = fakeAuth{fn: func(context.Context, string, string) error {
			if calls.Add(1) == 1 {
				close(authenticating)
				<-release // the node read the device as enabled, then it was disabled
			}
			return nil
		}}
	})
	errc := make(chan error, 1)
	go func() {
		c, err := rawConnect(b.Addr(), "press-01", "key-press-01")
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	<-authenticating
	b.Disconnect("press-01")
	close(release)
	if err := <-errc; err == nil {
		t.Fatal("connection accepted after Disconnect; want refused")
	}
}

func TestBroker_SessionTakeover_NewConnectionWins(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	first := mustConnectSubscribed(t, b.Addr(), "press-01")
	// A wrong key cannot take the session over.
	if _, _, err := dialDevice(t, b.Addr(), "press-01", "wrong", nil); err == nil {
		t.Fatal("connected with a wrong key")
	}
	if err := b.PublishDesired("press-01", []byte(`{"version":2}`)); err != nil {
		t.Fatal(err)
	}
	first.expectDesired(t, `{"version":2}`)

	second := mustConnect(t, b.Addr(), "press-01")
	select {
	case dc := <-first.serverDisconnect:
		if dc.ReasonCode != packets.ErrSessionTakenOver.Code {
			t.Errorf("disconnect reason %#x; want session taken over", dc.ReasonCode)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("first connection not taken over")
	}
	second.subscribe(t, fleet.DesiredTopic("press-01"))
	second.expectDesired(t, `{"deviceId":"press-01","version":1}`)
	// Reachable after the takeover (mochi's own takeover can lose the new
	// client from its client map).
	if err := b.PublishDesired("press-01", []byte(`{"version":3}`)); err != nil {
		t.Fatal(err)
	}
	second.expectDesired(t, `{"version":3}`)
	if got := b.Connected(); len(got) != 1 {
		t.Fatalf("Connected() = %+v; want one connection", got)
	}
}

func TestBroker_PreConnectIdleIsClosed(t *testing.T) {
	f := newTestFleet()
	b := startBroker(t, f, func(c *Config) { c.Limits.ConnectTimeout = 200 * time.Millisecond })
	c := dialRaw(t, b.Addr())
	// drain gives up after 5 s, 25 times the limit: a connection closed
	// before that was closed by the broker's limit.
	if err := drain(c); err != nil {
		t.Fatalf("connection not closed by the broker: %v", err)
	}
}

func TestBroker_Limits_PacketTooLargeDisconnects(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) { c.Limits.MaxPacketSize = 2048 })
	d := mustConnect(t, b.Addr(), "press-01")
	// QoS 0: the broker closes the connection instead of acknowledging.
	_, _ = d.c.Publish(context.Background(), &paho.Publish{Topic: fleet.ReportedTopic("press-01"), QoS: 0,
		Payload: []byte(`{"pad":"` + strings.Repeat("x", 4096) + `"}`)})
	select {
	case <-d.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("client sending an oversized packet not disconnected")
	}
	select {
	case r := <-f.reports:
		t.Fatalf("sink got %d bytes", len(r.doc))
	default:
	}
}

func TestBroker_Close_DisconnectsClientsAndIsIdempotent(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")
	idle := dialRaw(t, b.Addr()) // never sends CONNECT
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("client still connected after Close")
	}
	if err := drain(idle); err != nil {
		t.Fatalf("pre-CONNECT connection not closed: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.PublishDesired("press-01", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("PublishDesired after Close = %v; want ErrClosed", err)
	}
	if err := b.Start(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close = %v; want ErrClosed", err)
	}
}

func TestBroker_Start_ContextCancelCloses(t *testing.T) {
	f := newTestFleet("press-01")
	cfg := f.config()
	cfg.Logger = testLogger(t)
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	d := mustConnect(t, b.Addr(), "press-01")
	cancel()
	select {
	case <-d.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("client still connected after the context ended")
	}
}

func TestNew_RequiresInterfacesAndValidLimits(t *testing.T) {
	good := newTestFleet().config()
	tests := []struct {
		name   string
		mutate func(*Config)
	}{
		{"no auth", func(c *Config) { c.Auth = nil }},
		{"no desired", func(c *Config) { c.Desired = nil }},
		{"no reports", func(c *Config) { c.Reports = nil }},
		{"keepalive too long", func(c *Config) { c.Limits.MaxKeepalive = 100 * time.Hour }},
		{"negative report size", func(c *Config) { c.Limits.MaxReportSize = -1 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good
			tt.mutate(&cfg)
			if _, err := New(cfg); err == nil {
				t.Fatal("New succeeded; want an error")
			}
		})
	}
}

// mochi's own inline client is registered under the id "inline", which is a
// valid device id; the broker uses its own, so such a device is like any other.
func TestBroker_DeviceNamedInline(t *testing.T) {
	f := newTestFleet("inline", "press-01")
	b := startBroker(t, f)
	other := mustConnectSubscribed(t, b.Addr(), "press-01")
	mustConnectSubscribed(t, b.Addr(), "inline")
	if err := b.PublishDesired("press-01", []byte(`{"version":2}`)); err != nil {
		t.Fatal(err)
	}
	other.expectDesired(t, `{"version":2}`)
}

// Desired documents keep flowing while the device acknowledges them: the
// acknowledgements (its bursts) and the documents (senders) meet on the
// connection's procMu and unacknowledged ids. (With mochi v2.7.9's inflight
// store, which the broker no longer uses, they deadlocked: DESIGN.md.)
func TestBroker_PublishDesired_ConcurrentWithAcksDoesNotDeadlock(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	var latest atomic.Int64
	d, _, err := dialDeviceWith(t, b.Addr(), "press-01", "key-press-01", nil, func(p *paho.Publish) {
		var v int64
		// Documents can arrive out of order (a left-over one sent by the
		// connection's goroutine races a new one); like the agent, keep the
		// highest version.
		if _, err := fmt.Sscanf(string(p.Payload), `{"version":%d}`, &v); err == nil {
			for cur := latest.Load(); v > cur && !latest.CompareAndSwap(cur, v); cur = latest.Load() {
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	d.subscribe(t, fleet.DesiredTopic("press-01"))
	waitFor(t, "press-01 listed", func() bool { _, ok := b.Connection("press-01"); return ok })

	tc := b.connFor("press-01")
	if tc == nil {
		t.Fatal("press-01 not connected")
	}
	const n = 10000
	deadline := time.Now().Add(20 * time.Second)
	for v := int64(1); v <= n; v++ {
		// Stay below MaxInflight (acknowledgements lag deliveries).
		for tc.inflight.Load() >= DefaultMaxInflight/2 {
			if time.Now().After(deadline) {
				t.Fatalf("stuck at version %d, device has %d: deadlocked", v, latest.Load())
			}
			time.Sleep(50 * time.Microsecond)
		}
		if err := b.PublishDesired("press-01", []byte(fmt.Sprintf(`{"version":%d}`, v))); err != nil {
			t.Fatalf("PublishDesired v%d: %v", v, err)
		}
	}
	waitFor(t, "the last version delivered", func() bool { return latest.Load() == n })
}

// The broker follows the device's subscription to its desired topic: a
// document goes at the granted QoS (0 if the device asked for 0), nothing
// goes after it unsubscribes, and subscribing again brings the current
// document.
func TestBroker_Desired_FollowsSubscription(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	d := mustConnect(t, b.Addr(), "press-01")
	topic := fleet.DesiredTopic("press-01")
	subscribe := func(qos byte) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sa, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: qos}}})
		if err != nil || len(sa.Reasons) != 1 || sa.Reasons[0] != qos {
			t.Fatalf("subscribe at QoS %d: %v, %+v", qos, err, sa)
		}
	}
	expect := func(payload string, qos byte) {
		t.Helper()
		m := d.expectMessage(t)
		if m.Topic != topic || string(m.Payload) != payload || m.QoS != qos {
			t.Fatalf("got %q at QoS %d on %s; want %q at QoS %d", m.Payload, m.QoS, m.Topic, payload, qos)
		}
	}

	subscribe(0)
	expect(`{"deviceId":"press-01","version":1}`, 0)
	if err := b.PublishDesired("press-01", []byte(`{"version":2}`)); err != nil {
		t.Fatal(err)
	}
	expect(`{"version":2}`, 0)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := d.c.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{topic}}); err != nil {
		t.Fatalf("unsubscribe: %v", err)
	}
	if err := b.PublishDesired("press-01", []byte(`{"version":3}`)); err != nil {
		t.Fatal(err)
	}
	d.expectNoMessage(t, 300*time.Millisecond)

	f.setDesired("press-01", `{"version":4}`)
	subscribe(1)
	expect(`{"version":4}`, 1)
	if err := b.PublishDesired("press-01", []byte(`{"version":5}`)); err != nil {
		t.Fatal(err)
	}
	expect(`{"version":5}`, 1)
}

// Refuse turns devices away (a node without a cluster leader): connected
// ones are told "use another server", new ones "server unavailable", with
// the right key or not; Admit lets them back in.
func TestBroker_RefuseAndAdmit(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	d := mustConnectSubscribed(t, b.Addr(), "press-01")

	if n := b.Refuse(); n != 1 {
		t.Fatalf("Refuse ended %d connections; want 1", n)
	}
	select {
	case dc := <-d.serverDisconnect:
		if dc.ReasonCode != packets.ErrUseAnotherServer.Code {
			t.Fatalf("DISCONNECT reason %#x; want %#x (use another server)", dc.ReasonCode, packets.ErrUseAnotherServer.Code)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("press-01 was not disconnected")
	}
	for _, key := range []string{"key-press-02", "wrong"} {
		_, ca, err := dialDevice(t, b.Addr(), "press-02", key, nil)
		if err == nil || ca == nil || ca.ReasonCode != packets.ErrServerUnavailable.Code {
			t.Fatalf("connect with key %q while refusing: %v, CONNACK %+v; want server unavailable", key, err, ca)
		}
	}
	if st := b.Stats(); !st.Refusing || st.Refused != 3 || st.Connections != 0 {
		t.Fatalf("stats while refusing: %+v", st)
	}

	b.Admit()
	mustConnectSubscribed(t, b.Addr(), "press-02")
	if st := b.Stats(); st.Refusing || st.Connections != 1 {
		t.Fatalf("stats after Admit: %+v", st)
	}
}

// TestBroker_DisconnectStale_EndsOnlySessionsOfAReplacedKey: a device
// holds two sessions' worth of keys (primary, secondary); when the node
// says the primary no longer opens the device, the session that used it
// is dropped and what it sends is not taken, while a session of the
// secondary and another device's session stay.
func TestBroker_DisconnectStale_EndsOnlySessionsOfAReplacedKey(t *testing.T) {
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	d := mustConnectSubscribed(t, b.Addr(), "press-01")
	other := mustConnectSubscribed(t, b.Addr(), "press-02")
	replaced := b.keyID("press-01", "key-press-01")

	// A key that is still valid ends nothing.
	if n := b.DisconnectStale("press-01", func(string) bool { return true }); n != 0 {
		t.Fatalf("DisconnectStale with every key valid ended %d connections", n)
	}
	if n := b.DisconnectStale("press-01", func(id string) bool { return id != replaced }); n != 1 {
		t.Fatalf("DisconnectStale ended %d connections; want 1", n)
	}
	select {
	case dc := <-d.serverDisconnect:
		if dc.ReasonCode != packets.ErrNotAuthorized.Code {
			t.Errorf("disconnect reason %#x; want not authorized", dc.ReasonCode)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("session of the replaced key not dropped")
	}
	<-d.c.Done()
	if _, ok := b.Connection("press-01"); ok {
		t.Error("press-01 still listed as connected")
	}
	if _, err := other.publish(t, fleet.ReportedTopic("press-02"), `{"ok":true}`); err != nil {
		t.Fatalf("the other device's session: %v", err)
	}
	select {
	case r := <-f.reports:
		if r.deviceID != "press-02" {
			t.Fatalf("report from %s; want press-02", r.deviceID)
		}
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("the other device's report was not taken")
	}
}

// TestBroker_DisconnectStale_DuringAuthenticationRefuses: a key replaced
// while a connection's key check runs (the node read the old key) refuses
// that connection when the check returns; a change that keeps its key
// valid does not.
func TestBroker_DisconnectStale_DuringAuthenticationRefuses(t *testing.T) {
	f := newTestFleet("press-01")
	authenticating := make(chan struct{})
	release := make(chan struct{})
	var calls atomic.Int32
	b := startBroker(t, f, func(c *Config) {
		c.Auth = fakeAuth{fn: func(context.Context, string, string) error {
			if calls.Add(1) == 1 {
				close(authenticating)
				<-release
			}
			return nil
		}}
	})
	errc := make(chan error, 1)
	go func() {
		c, err := rawConnect(b.Addr(), "press-01", "key-press-01")
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	<-authenticating
	b.DisconnectStale("press-01", func(string) bool { return false })
	close(release)
	if err := <-errc; err == nil {
		t.Fatal("connection accepted although its key was replaced during the check; want refused")
	}
	// A change that leaves the key valid (the device's own enrollment,
	// adopting a key) refuses nothing.
	calls.Store(0)
	authenticating, release = make(chan struct{}), make(chan struct{})
	go func() {
		c, err := rawConnect(b.Addr(), "press-01", "key-press-01")
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	<-authenticating
	b.DisconnectStale("press-01", func(string) bool { return true })
	close(release)
	if err := <-errc; err != nil {
		t.Fatalf("connection refused although its key stayed valid: %v", err)
	}
}

// TestBroker_RevokedSessionReportsAreRefused: once a session is revoked,
// a report it still manages to send is not handed to the sink.
func TestBroker_RevokedSessionReportsAreRefused(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	mustConnectSubscribed(t, b.Addr(), "press-01")
	tc := b.connFor("press-01")
	if tc == nil {
		t.Fatal("press-01 not connected")
	}
	tc.revoked.Store(true) // as DisconnectStale does, before it drops the connection
	b.intakeReport(tc, "press-01", []byte(`{"late":true}`))
	select {
	case r := <-f.reports:
		t.Fatalf("a revoked session's report was taken: %+v", r)
	default:
	}
	if got := b.Stats().ReportsDropped; got != 1 {
		t.Errorf("ReportsDropped = %d; want 1", got)
	}
}
