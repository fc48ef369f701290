package hub

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/edgeclient"
)

const toB = `FROM /messages/modules/a/outputs/out1 WHERE alert = 'true' INTO BrokeredEndpoint("/modules/b/inputs/in1")`

// A route with a WHERE on an application property delivers the matching
// messages, and only those, to B's input, in order, with their properties
// and the sender's identity.
func TestHub_RouteDeliversMatchingMessagesInOrder(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{"toB": toB}, "a", "b")
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	a := th.connect("a")
	for i := range 20 {
		alert := []string{"true", "false"}[i%2]
		if err := a.SendOutput(ctxT(t), "out1", map[string]string{"alert": alert, "n": fmt.Sprint(i)}, []byte(fmt.Sprintf("m%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	// Another output and another module's messages do not match the source.
	if err := a.SendOutput(ctxT(t), "out2", map[string]string{"alert": "true"}, []byte("x")); err != nil {
		t.Fatal(err)
	}
	got := receive(t, b, 10, 10*time.Second)
	for i, in := range got {
		want := fmt.Sprintf("m%d", 2*i)
		if string(in.Body) != want || in.Name != "in1" || in.Properties["alert"] != "true" || in.Properties["n"] != fmt.Sprint(2*i) {
			t.Fatalf("message %d: %s %q %v; want %s", i, in.Name, in.Body, in.Properties, want)
		}
		if in.Properties["$.cdid"] != testDevice || in.Properties["$.cmid"] != "a" {
			t.Fatalf("message %d does not name its sender: %v", i, in.Properties)
		}
	}
	nothing(t, b, 300*time.Millisecond)
	st := th.h.Stats()
	if st.Received != 21 || st.Routed != 10 || st.Unrouted != 11 || st.Delivered != 10 {
		t.Errorf("stats %+v", st)
	}
	waitFor(t, 5*time.Second, "acknowledged messages to leave the store", func() bool { return th.h.Stats().Queued == 0 })
}

// Messages for a module that is not connected wait for it, in order, and
// survive a restart of the hub: on disk before the sender's PUBACK.
func TestHub_StoreAndForwardAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	th := startHub(t, dir)
	routes := map[string]string{"toB": `FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}
	th.configure(routes, "a", "b")
	a := th.connect("a")
	for i := range 50 {
		if err := a.SendOutput(ctxT(t), "o", nil, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	th.stop()

	th = startHub(t, dir)
	th.configure(routes, "a", "b")
	if q := th.h.Stats().Queued; q != 50 {
		t.Fatalf("%d messages queued after the restart; want 50", q)
	}
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for i, in := range receive(t, b, 50, 10*time.Second) {
		if string(in.Body) != fmt.Sprint(i) {
			t.Fatalf("message %d is %q", i, in.Body)
		}
	}
}

// A module whose session is persistent (azure-iot-device's clean session 0)
// is not asked to subscribe again after a reconnect; messages sent while
// it was away arrive.
func TestHub_PersistentSessionResumes(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{"toB": `FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
	b := th.connect("b", persist)
	if b.SessionPresent {
		t.Error("session present on the first connection")
	}
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	b.Close()
	a := th.connect("a")
	if err := a.SendOutput(ctxT(t), "o", nil, []byte("while away")); err != nil {
		t.Fatal(err)
	}
	b = th.connect("b", persist)
	if !b.SessionPresent {
		t.Error("session not present after reconnecting with clean session 0")
	}
	if in := receive(t, b, 1, 5*time.Second)[0]; string(in.Body) != "while away" {
		t.Fatalf("got %q", in.Body)
	}
	// A clean session forgets the subscription.
	b.Close()
	b = th.connect("b", clean)
	if b.SessionPresent {
		t.Error("session present on a clean connection")
	}
	if err := a.SendOutput(ctxT(t), "o", nil, []byte("2")); err != nil {
		t.Fatal(err)
	}
	nothing(t, b, 300*time.Millisecond)
}

// Messages past their route's time to live are dropped unsent and counted.
func TestHub_TimeToLiveExpires(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{
		"short": `{"route": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/b/inputs/in1\")", "priority": 1, "timeToLiveSecs": 1}`,
	}, "a", "b")
	// Routes given as objects go through routing.ParseRoutes: check the TTL arrived.
	a := th.connect("a")
	for i := range 5 {
		if err := a.SendOutput(ctxT(t), "o", nil, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "the messages to expire", func() bool { return th.h.Stats().Expired == 5 })
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	nothing(t, b, 300*time.Millisecond)
	if st := th.h.Stats(); st.Queued != 0 || st.Delivered != 0 {
		t.Errorf("stats %+v", st)
	}
}

// The store keeps at most MaxStoreBytes of messages: the oldest go first,
// counted.
func TestHub_StoreCapDropsOldest(t *testing.T) {
	th := startHub(t, t.TempDir(), withLimits(Limits{MaxStoreBytes: 20 << 10}))
	th.configure(map[string]string{"toB": `FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
	a := th.connect("a")
	body := bytes.Repeat([]byte("x"), 1000)
	for i := range 40 {
		if err := a.SendOutput(ctxT(t), "o", map[string]string{"n": fmt.Sprint(i)}, body); err != nil {
			t.Fatal(err)
		}
	}
	// The cap is kept as the store applies its log, just after the PUBACKs.
	waitFor(t, 5*time.Second, "every message to be stored or dropped", func() bool {
		st := th.h.Stats()
		return st.Queued+int64(st.Dropped) == 40
	})
	st := th.h.Stats()
	if st.Dropped == 0 || st.QueuedBytes > 20<<10 {
		t.Fatalf("stats %+v: nothing dropped, or over the cap", st)
	}
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	got := receive(t, b, int(st.Queued), 5*time.Second)
	if last := got[len(got)-1].Properties["n"]; last != "39" {
		t.Errorf("the newest message is not kept: last delivered n=%s", last)
	}
	if first := got[0].Properties["n"]; first != fmt.Sprint(st.Dropped) {
		t.Errorf("first kept n=%s; want %d (the oldest dropped first)", first, st.Dropped)
	}
}

// $upstream messages leave in batches once the controller takes them, in
// order, and wait while it does not.
func TestHub_UpstreamWaitsForTheController(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.up.setOffline(true)
	th.configure(map[string]string{"up": `FROM /messages/modules/a/* INTO $upstream`}, "a")
	a := th.connect("a")
	for i := range 30 {
		if err := a.Publish(ctxT(t), a.EventsTopic("o", map[string]string{"i": fmt.Sprint(i)}, [2]string{"$.mid", fmt.Sprintf("id-%d", i)}), []byte(fmt.Sprint(i)), 1); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if n := len(th.up.messages()); n != 0 {
		t.Fatalf("%d messages sent while the controller is offline", n)
	}
	th.up.setOffline(false)
	th.h.UpstreamAvailable()
	waitFor(t, 5*time.Second, "the upstream messages", func() bool { return len(th.up.messages()) == 30 })
	for i, m := range th.up.messages() {
		if string(m.Body) != fmt.Sprint(i) || m.Module != "a" || m.Output != "o" || m.Properties[0].Value != fmt.Sprint(i) {
			t.Fatalf("message %d: %+v", i, m)
		}
		if len(m.SystemProperties) != 1 || m.SystemProperties[0] != (fleet.Property{Name: "messageId", Value: fmt.Sprintf("id-%d", i)}) {
			t.Fatalf("message %d system properties %+v", i, m.SystemProperties)
		}
		if i > 0 && m.Seq <= th.up.messages()[i-1].Seq {
			t.Fatalf("sequence numbers do not rise: %d then %d", th.up.messages()[i-1].Seq, m.Seq)
		}
	}
	waitFor(t, 5*time.Second, "the sent messages to leave the store", func() bool { return th.h.Stats().Queued == 0 })
}

// Modules are admitted only with a valid, unexpired SAS token for exactly
// themselves.
func TestHub_RefusesBadCredentials(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(nil, "a", "b")
	otherTok, _ := th.ws.Token("b", time.Hour)
	expired, _ := th.ws.Token("a", -time.Second)
	tests := []struct {
		name string
		edit func(*edgeclient.Config)
		code byte // MQTT 3.1.1 CONNACK
	}{
		{"b's token", func(c *edgeclient.Config) { c.Password = otherTok }, 0x05},
		{"expired token", func(c *edgeclient.Config) { c.Password = expired }, 0x05},
		{"no password", func(c *edgeclient.Config) { c.Password = "" }, 0x05},
		{"other device", func(c *edgeclient.Config) { c.ClientID = "press-02/a" }, 0x02},
		{"username of b", func(c *edgeclient.Config) { c.Username = testHubID + "/" + testDevice + "/b/?api-version=1" }, 0x04},
		{"unknown module", func(c *edgeclient.Config) {
			c.ClientID, c.Username = testDevice+"/zzz", testHubID+"/"+testDevice+"/zzz/"
		}, 0x05},
	}
	for _, tt := range tests {
		cfg := th.moduleConfig("a")
		tt.edit(&cfg)
		_, err := edgeclient.Dial(ctxT(t), cfg)
		var ce *edgeclient.ConnackError
		if !errors.As(err, &ce) || ce.Code != tt.code {
			t.Errorf("%s: %v; want CONNACK %#x", tt.name, err, tt.code)
		}
	}
	// MQTT 5 gets the reason code.
	cfg := th.moduleConfig("a")
	cfg.Version, cfg.Password = 5, expired
	_, err := edgeclient.Dial(ctxT(t), cfg)
	var ce *edgeclient.ConnackError
	if !errors.As(err, &ce) || ce.Code != packets.ErrNotAuthorized.Code {
		t.Errorf("MQTT 5 expired token: %v", err)
	}
	if st := th.h.Stats(); st.RefusedAuth != uint64(len(tests)+1) {
		t.Errorf("RefusedAuth %d", st.RefusedAuth)
	}
}

// A module touches only its own topics: it cannot subscribe to another
// module's inputs nor to wildcards, nor publish as another module.
func TestHub_ModuleTouchesOnlyItsOwnTopics(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{"toB": `FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
	a := th.connect("a", mqtt5)
	codes, err := a.Subscribe(ctxT(t), "devices/"+testDevice+"/modules/b/inputs/#", "#", "devices/+/modules/+/inputs/#",
		"$iothub/twin/res/#", "devices/"+testDevice+"/modules/a/inputs/#")
	if err != nil {
		t.Fatal(err)
	}
	if want := []byte{0x87, 0x87, 0x87, 1, 1}; !bytes.Equal(codes, want) {
		t.Errorf("SUBACK %x; want %x", codes, want)
	}
	// Publishing as b, or anywhere else, is refused; a stays connected (MQTT 5).
	for _, topic := range []string{"devices/" + testDevice + "/modules/b/messages/events/", "devices/" + testDevice + "/messages/events/", "anything"} {
		err := a.Publish(ctxT(t), topic, []byte("x"), 1)
		var pe *edgeclient.PubackError
		if !errors.As(err, &pe) || pe.Code != 0x87 {
			t.Errorf("publish to %s: %v; want PUBACK 0x87", topic, err)
		}
	}
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	nothing(t, b, 200*time.Millisecond)
	// MQTT 3.1.1 cannot be told: the module is disconnected, as IoT Hub does.
	a3 := th.connect("a")
	_ = a3.Publish(ctxT(t), "devices/"+testDevice+"/modules/b/messages/events/", []byte("x"), 1)
	select {
	case <-a3.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("MQTT 3.1.1 module publishing as another still connected")
	}
}

// A malformed property bag is refused for that message; the sender (MQTT
// 5) and every other module go on.
func TestHub_MalformedPropertyBag(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{"toB": `FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	a := th.connect("a", mqtt5)
	base := "devices/" + testDevice + "/modules/a/messages/events/"
	for _, bag := range []string{"k=%zz", "k=%C3", "=v", "k=1&K=2", "%24.cdid=spoofed", "%24.cmid=b", "a=1/b=2"} {
		err := a.Publish(ctxT(t), base+bag, []byte("bad"), 1)
		var pe *edgeclient.PubackError
		if !errors.As(err, &pe) || pe.Code != packets.ErrTopicNameInvalid.Code {
			t.Errorf("bag %q: %v; want PUBACK 0x90", bag, err)
		}
	}
	if err := a.Publish(ctxT(t), base+"ok=yes&%24.mid=1", []byte("good"), 1); err != nil {
		t.Fatal(err)
	}
	in := receive(t, b, 1, 5*time.Second)[0]
	if string(in.Body) != "good" || in.Properties["ok"] != "yes" || in.Properties["$.mid"] != "1" {
		t.Fatalf("got %q %v", in.Body, in.Properties)
	}
	if th.h.Stats().Malformed != 7 {
		t.Errorf("Malformed = %d", th.h.Stats().Malformed)
	}
}

// A message over 256 KiB is refused with MQTT 5's "packet too large".
func TestHub_MessageOverTheLimit(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(nil, "a", "b")
	b := th.connect("b", mqtt5)
	a := th.connect("a", mqtt5)
	if err := a.Publish(ctxT(t), a.EventsTopic("o", nil), make([]byte, 256<<10-64), 1); err != nil {
		t.Fatalf("a message just under the limit: %v", err)
	}
	_ = a.Publish(ctxT(t), a.EventsTopic("o", nil), make([]byte, 256<<10+1), 1)
	select {
	case <-a.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("still connected after sending 256 KiB + 1")
	}
	if a.DisconnectReason() != packets.ErrPacketTooLarge.Code {
		t.Errorf("DISCONNECT reason %#x; want 0x95", a.DisconnectReason())
	}
	if b.Err() != nil {
		t.Errorf("another module was disconnected: %v", b.Err())
	}
}

// mochi-mqtt/server#501: a truncated MQTT 5 SUBSCRIBE panics mochi's
// decoder. Only that connection ends; the hub and other modules go on.
func TestHub_TruncatedSubscribeClosesOnlyThatConnection(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(map[string]string{"toB": `FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	a := th.connect("a", mqtt5)
	if err := a.WriteRaw([]byte{0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, 0x61}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the offending connection is still open")
	}
	if th.h.Stats().Panics != 1 {
		t.Errorf("panics recovered: %d; want 1 (0 would mean mochi fixed #501: keep the guard)", th.h.Stats().Panics)
	}
	a = th.connect("a")
	if err := a.SendOutput(ctxT(t), "o", nil, []byte("after")); err != nil {
		t.Fatal(err)
	}
	if in := receive(t, b, 1, 5*time.Second)[0]; string(in.Body) != "after" {
		t.Fatalf("got %q", in.Body)
	}
}

// A session lasts as long as the token that opened it, as in IoT Hub (the
// SDKs reconnect with a fresh token before it ends).
func TestHub_SessionEndsWithItsToken(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(nil, "a")
	tok, _ := th.ws.Token("a", 2*time.Second)
	a := th.connect("a", func(c *edgeclient.Config) { c.Password, c.Version = tok, 5 })
	select {
	case <-a.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("still connected after the token expired")
	}
	if a.DisconnectReason() != packets.ErrNotAuthorized.Code {
		t.Errorf("DISCONNECT reason %#x; want 0x87", a.DisconnectReason())
	}
	th.connect("a") // a fresh token opens a new session
}
