package northbound

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
)

// TestServer_ConsumerGetsMessagesInOrderWithProperties: a consumer
// subscribed over MQTT 5 gets each message the devices send, in order, on
// appliance/events/{device}/{module}, the body as sent, the application
// properties as user properties in the order sent and the system ones
// after them with '$', the content type as MQTT's; a filter on one device
// gets that device's only.
func TestServer_ConsumerGetsMessagesInOrderWithProperties(t *testing.T) {
	s := startServer(t, "")
	all := mustDial(t, s.Addr(), dialOpts{clientID: "all", clean: true})
	all.subscribe(t, "appliance/events/#")
	one := mustDial(t, s.Addr(), dialOpts{clientID: "one", clean: true})
	one.subscribe(t, "appliance/events/press-02/+")

	ingest(t, s, "press-01", "plc", 1, 2, 3)
	ingest(t, s, "press-02", "plc", 1)
	ingest(t, s, "press-01", "plc", 4, 5)

	msgs := all.waitN(t, 6)
	var got []string
	for _, m := range msgs {
		got = append(got, m.Topic+" "+m.Properties.User.Get("$messageId"))
	}
	want := []string{
		"appliance/events/press-01/plc press-01-1", "appliance/events/press-01/plc press-01-2", "appliance/events/press-01/plc press-01-3",
		"appliance/events/press-02/plc press-02-1",
		"appliance/events/press-01/plc press-01-4", "appliance/events/press-01/plc press-01-5",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got\n%q\nwant\n%q", got, want)
	}
	m := msgs[0]
	if string(m.Payload) != `{"seq":1}` || m.QoS != 1 || m.Properties.ContentType != "application/json" {
		t.Errorf("first message: payload %q qos %d content type %q", m.Payload, m.QoS, m.Properties.ContentType)
	}
	var keys []string
	for _, u := range m.Properties.User {
		keys = append(keys, u.Key+"="+u.Value)
	}
	wantKeys := []string{"n=1", "$connectionDeviceId=press-01", "$connectionModuleId=plc", "$outputName=out1", "$sequenceNumber=1",
		"$enqueuedTime=2023-11-14T22:13:20.001Z", "$messageId=press-01-1", "$contentType=application/json"}
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("user properties\n%q\nwant\n%q", keys, wantKeys)
	}
	if got := one.waitN(t, 1); len(got) != 1 || got[0].Properties.User.Get("$messageId") != "press-02-1" {
		t.Errorf("the press-02 filter got %d messages", len(got))
	}
	time.Sleep(100 * time.Millisecond)
	if n := one.count(); n != 1 {
		t.Errorf("the press-02 filter got %d messages, want 1", n)
	}
	if st := s.Stats(); st.In != 6 || st.RetainedMessages != 6 || st.Out != 7 {
		t.Errorf("stats: %+v", st)
	}
}

// TestServer_PersistentSessionResumes: "resumes where it left off": a
// session with clean start 0 and an expiry that reconnects within it gets,
// in order, every message its subscriptions matched that it had not
// acknowledged, those that arrived while it was away included, even
// across a restart of the node; a new session starts at the end.
func TestServer_PersistentSessionResumes(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "historian-1", expiry: 3600})
	cs.subscribe(t, "appliance/events/+/plc")
	ingest(t, s, "press-01", "plc", 1, 2, 3)
	cs.waitN(t, 3)
	waitAcked(t, s, "mes", "historian-1")
	_ = cs.c.Disconnect(&paho.Disconnect{})

	ingest(t, s, "press-01", "plc", 4, 5)
	ingest(t, s, "press-01", "other", 6)
	cs2 := mustDial(t, s.Addr(), dialOpts{clientID: "historian-1", expiry: 3600})
	if got := seqsOf(cs2.waitN(t, 2)); !slices.Equal(got, []uint64{4, 5}) {
		t.Fatalf("after reconnecting: %v, want [4 5]", got)
	}
	waitAcked(t, s, "mes", "historian-1")
	_ = cs2.c.Disconnect(&paho.Disconnect{})

	ingest(t, s, "press-01", "plc", 7, 8)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, dir, func(c *Config) { c.Addr = "127.0.0.1:0" })
	ingest(t, s, "press-01", "plc", 9)
	cs3 := mustDial(t, s.Addr(), dialOpts{clientID: "historian-1", expiry: 3600})
	if got := seqsOf(cs3.waitN(t, 3)); !slices.Equal(got, []uint64{7, 8, 9}) {
		t.Fatalf("after the node restarted: %v, want [7 8 9]", got)
	}
	fresh := mustDial(t, s.Addr(), dialOpts{clientID: "new", clean: true})
	fresh.subscribe(t, "appliance/events/#")
	ingest(t, s, "press-01", "plc", 10)
	if got := seqsOf(fresh.waitN(t, 1)); !slices.Equal(got, []uint64{10}) {
		t.Fatalf("a new session: %v, want [10]", got)
	}
}

// TestServer_UnacknowledgedAreSentAgain: messages sent at QoS 1 and not
// acknowledged when the connection ends are sent again, with DUP, when
// the session comes back, before the newer ones and in order.
func TestServer_UnacknowledgedAreSentAgain(t *testing.T) {
	s := startServer(t, "")
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "slow", expiry: 600, manualAcks: true})
	cs.subscribe(t, "appliance/events/#")
	ingest(t, s, "d1", "m", 1, 2, 3, 4)
	got := cs.waitN(t, 4)
	if err := cs.c.Ack(got[0]); err != nil { // 1 acknowledged, 2-4 not
		t.Fatal(err)
	}
	waitFor(t, "the acknowledgement of 1", func() bool {
		s.mu.Lock()
		st := s.streams[privateStreamID(sessionKey{"mes", "slow"})]
		s.mu.Unlock()
		st.mu.Lock()
		defer st.mu.Unlock()
		return len(st.inflight) == 3
	})
	_ = cs.c.Disconnect(&paho.Disconnect{})
	ingest(t, s, "d1", "m", 5)
	cs2 := mustDial(t, s.Addr(), dialOpts{clientID: "slow", expiry: 600})
	msgs := cs2.waitN(t, 4)
	if got := seqsOf(msgs); !slices.Equal(got, []uint64{2, 3, 4, 5}) {
		t.Fatalf("after reconnecting: %v, want [2 3 4 5]", got)
	}
	// 2-4 were sent before; 5 may have been too (to the connection
	// going away), so its flag may be either.
	for _, m := range msgs[:3] {
		if !m.Duplicate() {
			t.Errorf("message %s sent again without DUP", m.Properties.User.Get("n"))
		}
	}
}

// TestServer_SlowConsumerIsNotDropped: a consumer that acknowledges
// nothing gets its window of messages and no more; the rest wait in the
// log (nothing dropped) and flow as it acknowledges.
func TestServer_SlowConsumerIsNotDropped(t *testing.T) {
	s := startServer(t, "")
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "slow", clean: true, receiveMax: 5, manualAcks: true})
	cs.subscribe(t, "appliance/events/#")
	ingest(t, s, "d1", "m", seqRange(1, 50)...)
	cs.waitN(t, 5)
	time.Sleep(200 * time.Millisecond)
	if n := cs.count(); n != 5 {
		t.Fatalf("%d messages sent past a receive maximum of 5", n)
	}
	for i := 0; i < 50; i++ {
		msgs := cs.waitN(t, i+1)
		if err := cs.c.Ack(msgs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if got := seqsOf(cs.waitN(t, 50)); !slices.Equal(got, seqRange(1, 50)) {
		t.Fatalf("got %v", got)
	}
	if st := s.Stats(); st.DroppedRetention+st.DroppedTooLarge+st.DroppedCorrupt != 0 {
		t.Fatalf("dropped: %+v", st)
	}
}

// TestServer_SharedSubscription: the members of $share/{group}/{filter}
// get each message once between them; a member that leaves with messages
// unacknowledged has them sent to the other; a plain subscriber beside the
// group gets every one.
func TestServer_SharedSubscription(t *testing.T) {
	s := startServer(t, "")
	a := mustDial(t, s.Addr(), dialOpts{clientID: "a", clean: true, manualAcks: true, receiveMax: 3})
	a.subscribe(t, "$share/mes/appliance/events/#")
	b := mustDial(t, s.Addr(), dialOpts{clientID: "b", clean: true})
	b.subscribe(t, "$share/mes/appliance/events/#")
	plain := mustDial(t, s.Addr(), dialOpts{clientID: "p", clean: true})
	plain.subscribe(t, "appliance/events/#")

	ingest(t, s, "d1", "m", seqRange(1, 20)...)
	plain.waitN(t, 20)
	a.waitN(t, 3) // a holds 3, acknowledges none
	waitFor(t, "the group to hand out 20 messages", func() bool { return a.count()+b.count() == 20 })
	if a.count() != 3 {
		t.Fatalf("a has %d messages, window 3", a.count())
	}
	_ = a.c.Disconnect(&paho.Disconnect{}) // its three go to b
	got := seqsOf(b.waitN(t, 20))
	slices.Sort(got)
	if !slices.Equal(got, seqRange(1, 20)) {
		t.Fatalf("b got %v", got)
	}
}

// TestServer_ConsumersAreReadOnly: a wrong key is refused; filters outside
// appliance/events (device topics, "#", $SYS) are refused; a publish is
// refused (MQTT 5: PUBACK "not authorized"), and reaches no subscriber.
func TestServer_ConsumersAreReadOnly(t *testing.T) {
	s := startServer(t, "")
	if _, ca, err := dialConsumer(t, s.Addr(), dialOpts{user: "mes", key: "wrong", clean: true}); err == nil || ca == nil || ca.ReasonCode != 0x86 {
		t.Fatalf("wrong key: %v %+v", err, ca)
	}
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "x", clean: true})
	codes := cs.subscribe(t, "appliance/devices/press-01/desired", "#", "appliance/+/press-01/reported", "$SYS/#", "$share/g/appliance/devices/#", "appliance/events/press-01/#")
	if want := []byte{0x87, 0x87, 0x87, 0x87, 0x87, 0x01}; !slices.Equal(codes, want) {
		t.Fatalf("suback %x, want %x", codes, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := cs.c.Publish(ctx, &paho.Publish{Topic: "appliance/events/press-01/plc", QoS: 1, Payload: []byte("forged")})
	if err == nil || res == nil || res.ReasonCode != 0x87 {
		t.Fatalf("publish: %v %+v", err, res)
	}
	time.Sleep(100 * time.Millisecond)
	if cs.count() != 0 || s.Stats().In != 0 {
		t.Fatalf("a consumer's publish went somewhere: %d messages, %+v", cs.count(), s.Stats())
	}
}

// TestServer_RetentionDropsAreCounted: a persistent session away while the
// log deletes messages for retention gets what is left, and the node
// counts exactly the messages its subscription matched that it lost.
func TestServer_RetentionDropsAreCounted(t *testing.T) {
	s := startServer(t, "", func(c *Config) { c.Retention = LogOptions{MaxBytes: 64 << 10, SegmentBytes: 8 << 10} })
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "h", expiry: 3600})
	cs.subscribe(t, "appliance/events/d1/#")
	_ = cs.c.Disconnect(&paho.Disconnect{})
	waitFor(t, "the session to be detached", func() bool { return s.Stats().Connections == 0 })
	// About 200 bytes a message: d1 and d2 alternate, 2000 of each.
	for i := uint64(1); i <= 2000; i++ {
		ingest(t, s, "d1", "m", i)
		ingest(t, s, "d2", "m", i)
	}
	s.rlog.Trim(time.Now())
	st := s.Stats()
	first := s.rlog.First()
	if first == 0 || st.RetainedBytes > 64<<10 {
		t.Fatalf("nothing trimmed: first %d, %+v", first, st)
	}
	cs2 := mustDial(t, s.Addr(), dialOpts{clientID: "h", expiry: 3600})
	kept := 2000 - int(s.Stats().DroppedRetention)
	got := seqsOf(cs2.waitN(t, kept))
	if len(got) != kept || got[len(got)-1] != 2000 || !slices.IsSorted(got) || got[0] != 2001-uint64(kept) {
		t.Fatalf("got %d messages (%d..%d); dropped %d", len(got), got[0], got[len(got)-1], s.Stats().DroppedRetention)
	}
	if d := s.Stats().DroppedRetention; d != uint64(got[0]-1) {
		t.Fatalf("dropped %d; the first message delivered is %d", d, got[0])
	}
}

// TestServer_Ingest: a batch sent again after a lost acknowledgement is
// not stored twice; a malformed batch is refused with ErrMalformed.
func TestServer_Ingest(t *testing.T) {
	s := startServer(t, "")
	ingest(t, s, "d1", "m", 1, 2, 3)
	ingest(t, s, "d1", "m", 1, 2, 3) // sent again
	ingest(t, s, "d1", "m", 2, 3)    // again, 1 expired meanwhile
	ingest(t, s, "d1", "m", 4)
	if st := s.Stats(); st.In != 4 || st.Duplicates != 5 || st.RetainedMessages != 4 {
		t.Fatalf("stats %+v", st)
	}
	if err := s.Ingest(context.Background(), "d1", []byte("APUB\x01\x05")); !errors.Is(err, ErrMalformed) {
		t.Fatalf("malformed batch: %v", err)
	}
	var got []uint64
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		time.Sleep(50 * time.Millisecond)
		ingest(t, s, "d1", "m", 5)
		ingest(t, s, "d2", "m", 6)
	}()
	_ = s.Tail(ctx, TailFilter{Device: "d2"}, func(m Message) error {
		got = append(got, m.Seq)
		cancel()
		return nil
	})
	if !slices.Equal(got, []uint64{6}) || fleet.EventsTopic("d2", "m") != "appliance/events/d2/m" {
		t.Fatalf("tail got %v", got)
	}
}

// TestServer_MQTT5SessionSemantics: in MQTT 5 the session expiry interval
// alone says whether a session outlives its connection: clean start 1
// with an expiry starts a session that is kept; clean start 0 without
// one resumes a session that then ends with the connection.
func TestServer_MQTT5SessionSemantics(t *testing.T) {
	s := startServer(t, "")
	cs := mustDial(t, s.Addr(), dialOpts{clientID: "h", clean: true, expiry: 600})
	cs.subscribe(t, "appliance/events/#")
	_ = cs.c.Disconnect(&paho.Disconnect{})
	waitFor(t, "the connection to end", func() bool { return s.Stats().Connections == 0 })
	ingest(t, s, "d1", "m", 1)
	cs2, ca, err := dialConsumer(t, s.Addr(), dialOpts{clientID: "h"}) // clean start 0, no expiry
	if err != nil || !ca.SessionPresent {
		t.Fatalf("a session started with clean start 1 and an expiry was not kept: %v %+v", err, ca)
	}
	if got := seqsOf(cs2.waitN(t, 1)); !slices.Equal(got, []uint64{1}) {
		t.Fatalf("resumed session got %v", got)
	}
	waitAcked(t, s, "mes", "h")
	_ = cs2.c.Disconnect(&paho.Disconnect{})
	waitFor(t, "the session to end with its connection", func() bool { return s.Stats().Sessions == 0 })
	_, ca, err = dialConsumer(t, s.Addr(), dialOpts{clientID: "h"})
	if err != nil || ca.SessionPresent {
		t.Fatalf("a session resumed without an expiry outlived its connection: %v %+v", err, ca)
	}
}

// TestDedupe_Runs: a device's last batch is remembered as runs of
// consecutive sequence numbers: a number inside a run is seen, one
// between runs or beyond them is not.
func TestDedupe_Runs(t *testing.T) {
	var ds deviceSeqs
	ds.remember([]uint64{7, 3, 4, 5, 10, 11})
	for seq, want := range map[uint64]bool{2: false, 3: true, 5: true, 6: false, 7: true, 8: false, 10: true, 11: true, 12: false} {
		if ds.seen(seq) != want {
			t.Errorf("seen(%d) = %v", seq, !want)
		}
	}
	var many []uint64
	for i := range uint64(2 * maxSeqRuns) {
		many = append(many, 2*i)
	}
	ds.remember(many)
	if ds.seen(0) || len(ds.last) != 0 {
		t.Errorf("a batch of more than %d runs is remembered", maxSeqRuns)
	}
}
