package broker

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/testutil"
)

// Tests of how the broker runs connections (listener.go, session.go,
// send.go): packet-aware reads, bursts, the senders' mailbox.

// rawClient is an MQTT 5 device written by hand, for what Paho does not
// do: pipelining packets, withholding PUBACKs, counting goroutines without
// a client's own.
type rawClient struct {
	t testing.TB
	c net.Conn
	r *bufio.Reader
}

func dialRawClient(t testing.TB, addr string, tlsCfg *tls.Config) *rawClient {
	t.Helper()
	var c net.Conn
	var err error
	if tlsCfg != nil {
		c, err = tls.Dial("tcp", addr, tlsCfg)
	} else {
		c, err = net.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c, r: bufio.NewReader(c)}
}

func (rc *rawClient) write(pkts ...[]byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(bytes.Join(pkts, nil)); err != nil {
		rc.t.Fatal(err)
	}
}

// next reads one packet: its fixed header byte and the rest.
func (rc *rawClient) next() (byte, []byte, error) { return rc.nextWithin(5 * time.Second) }

func (rc *rawClient) nextWithin(d time.Duration) (byte, []byte, error) {
	_ = rc.c.SetReadDeadline(time.Now().Add(d))
	h, err := rc.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, _, err := packets.DecodeLength(rc.r)
	if err != nil {
		return 0, nil, err
	}
	body := make([]byte, n)
	_, err = io.ReadFull(rc.r, body)
	return h, body, err
}

// expect reads one packet and fails unless its type is typ (the high nibble).
func (rc *rawClient) expect(typ byte) []byte {
	rc.t.Helper()
	h, body, err := rc.next()
	if err != nil {
		rc.t.Fatalf("want packet type %d: %v", typ, err)
	}
	if h>>4 != typ {
		rc.t.Fatalf("got packet type %d (% x); want %d", h>>4, body, typ)
	}
	return body
}

// expectPublish reads a PUBLISH (MQTT 5, QoS 1) and returns its packet id
// and payload.
func (rc *rawClient) expectPublish() (uint16, string) {
	rc.t.Helper()
	body := rc.expect(3)
	tl := int(body[0])<<8 | int(body[1])
	rest := body[2+tl:]
	id := uint16(rest[0])<<8 | uint16(rest[1])
	rest = rest[2:]
	propLen := int(rest[0]) // short properties only
	return id, string(rest[1+propLen:])
}

// connectPacketWith is connectPacket with CONNECT properties (already
// encoded, without their length).
func connectPacketWith(id, key string, props []byte) []byte {
	vh := appendString(nil, "MQTT")
	vh = append(vh, 5, 0xC2, 0, 30)
	vh = appendVarint(vh, len(props))
	vh = append(vh, props...)
	vh = appendString(vh, id)
	vh = appendString(vh, id)
	vh = appendString(vh, key)
	return append(appendVarint([]byte{0x10}, len(vh)), vh...)
}

// subscribePacket subscribes to filter at QoS 1 (MQTT 5).
func subscribePacket(id uint16, filter string) []byte {
	vh := []byte{byte(id >> 8), byte(id), 0}
	vh = appendString(vh, filter)
	vh = append(vh, 1)
	return append(appendVarint([]byte{0x82}, len(vh)), vh...)
}

// publishPacket publishes payload to topic at QoS 1 (MQTT 5).
func publishPacket(id uint16, topic string, payload []byte) []byte {
	vh := appendString(nil, topic)
	vh = append(vh, byte(id>>8), byte(id), 0)
	vh = append(vh, payload...)
	return append(appendVarint([]byte{0x32}, len(vh)), vh...)
}

func pubackPacket(id uint16) []byte { return []byte{0x40, 2, byte(id >> 8), byte(id)} }

// overTCPAndTLS runs test twice, as subtests: over plain TCP (both configs
// nil) and over TLS with a self-signed server certificate.
func overTCPAndTLS(t *testing.T, test func(t *testing.T, serverTLS, clientTLS *tls.Config)) {
	t.Run("tcp", func(t *testing.T) { test(t, nil, nil) })
	serverTLS, clientTLS := selfSignedTLS(t)
	t.Run("tls", func(t *testing.T) { test(t, serverTLS, clientTLS) })
}

// A device that sends CONNECT, SUBSCRIBE and a report in one write (one
// TCP segment, or one TLS record) has all three processed: bytes read with
// the CONNECT are not left behind when the connect burst ends.
func TestBroker_PipelinedPacketsAreAllProcessed(t *testing.T) {
	overTCPAndTLS(t, func(t *testing.T, serverTLS, clientTLS *tls.Config) {
		f := newTestFleet("press-01")
		b := startBroker(t, f, func(c *Config) { c.TLSConfig = serverTLS })
		rc := dialRawClient(t, b.Addr(), clientTLS)
		report := `{"lastDesiredVersion":1}`
		rc.write(connectPacket("press-01", "key-press-01"),
			subscribePacket(1, fleet.DesiredTopic("press-01")),
			publishPacket(2, fleet.ReportedTopic("press-01"), []byte(report)))
		rc.expect(2) // CONNACK
		gotDoc, gotSuback, gotPuback := false, false, false
		for !(gotDoc && gotSuback && gotPuback) {
			h, body, err := rc.next()
			if err != nil {
				t.Fatalf("after CONNACK: %v (document %v, SUBACK %v, PUBACK %v)", err, gotDoc, gotSuback, gotPuback)
			}
			switch h >> 4 {
			case 3:
				gotDoc = strings.Contains(string(body), `"deviceId":"press-01"`)
			case 9:
				gotSuback = true
			case 4:
				gotPuback = true
			}
		}
		select {
		case r := <-f.reports:
			if r.doc != report {
				t.Fatalf("report %q", r.doc)
			}
		case <-time.After(testutil.WaitTimeout):
			t.Fatal("report not taken")
		}
	})
}

// Reports up to MaxReportSize (64 KiB) are taken whole, larger than the
// read buffer and over TLS too; one byte more is dropped.
func TestBroker_Report_LargestAccepted(t *testing.T) {
	overTCPAndTLS(t, func(t *testing.T, serverTLS, clientTLS *tls.Config) {
		f := newTestFleet("press-01")
		b := startBroker(t, f, func(c *Config) { c.TLSConfig = serverTLS })
		d, _, err := dialDevice(t, b.Addr(), "press-01", "key-press-01", clientTLS)
		if err != nil {
			t.Fatal(err)
		}
		pad := func(size int) string {
			const head, tail = `{"pad":"`, `"}`
			return head + strings.Repeat("x", size-len(head)-len(tail)) + tail
		}
		largest := pad(DefaultMaxReportSize)
		if pr, err := d.publish(t, fleet.ReportedTopic("press-01"), largest); err != nil || pr.ReasonCode != 0 {
			t.Fatalf("publish 64 KiB report: %+v, %v", pr, err)
		}
		select {
		case r := <-f.reports:
			if r.doc != largest {
				t.Fatalf("sink got %d bytes; want the %d sent", len(r.doc), len(largest))
			}
		case <-time.After(testutil.WaitTimeout):
			t.Fatal("64 KiB report not taken")
		}
		if _, err := d.publish(t, fleet.ReportedTopic("press-01"), pad(DefaultMaxReportSize+1)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "oversized report dropped", func() bool { return b.Stats().ReportsDropped == 1 })
		// And the connection still works.
		d.subscribe(t, fleet.DesiredTopic("press-01"))
		d.expectDesired(t, `{"deviceId":"press-01","version":1}`)
	})
}

// An idle connection costs one goroutine, parked with a small stack; the
// work of its packets runs on workers, which end when the broker has been
// idle for workerIdle.
func TestBroker_IdleConnectionKeepsOneGoroutine(t *testing.T) {
	const n = 50
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("dev-%02d", i)
	}
	f := newTestFleet(ids...)
	b := startBroker(t, f)
	settle := func() int {
		time.Sleep(100 * time.Millisecond)
		return runtime.NumGoroutine()
	}
	before := settle()
	for _, id := range ids {
		rc := dialRawClient(t, b.Addr(), nil)
		rc.write(connectPacket(id, "key-"+id), subscribePacket(1, fleet.DesiredTopic(id)))
		rc.expect(2)
		pid, _ := rc.expectPublish()
		rc.expect(9)
		rc.write(pubackPacket(pid))
	}
	waitFor(t, "all connected", func() bool { return b.Stats().Connections == n })
	deadline := time.Now().Add(workerIdle + 3*time.Second)
	for {
		got := settle() - before
		if got <= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections hold %d goroutines; want %d", n, got, n)
		}
	}
}

// A document for an MQTT 5 device at its receive maximum waits in the
// mailbox until the device acknowledges, as MQTT requires; the device is
// not disconnected.
func TestBroker_PublishDesired_WaitsForReceiveMaximum(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	rc := dialRawClient(t, b.Addr(), nil)
	rc.write(connectPacketWith("press-01", "key-press-01", []byte{0x21, 0, 1}), // Receive Maximum 1
		subscribePacket(1, fleet.DesiredTopic("press-01")))
	rc.expect(2)
	first, _ := rc.expectPublish()
	rc.expect(9)
	waitFor(t, "press-01 listed", func() bool { _, ok := b.Connection("press-01"); return ok })

	for v := 2; v <= 4; v++ { // the latest wins
		if err := b.PublishDesired("press-01", []byte(fmt.Sprintf(`{"version":%d}`, v))); err != nil {
			t.Fatal(err)
		}
	}
	if h, body, err := rc.nextWithin(300 * time.Millisecond); err == nil {
		t.Fatalf("device at its receive maximum was sent packet %#x % x", h, body)
	}
	rc.write(pubackPacket(first))
	id, doc := rc.expectPublish()
	if doc != `{"version":4}` {
		t.Fatalf("after the acknowledgement got %q; want the latest document", doc)
	}
	rc.write(pubackPacket(id))
	if _, ok := b.Connection("press-01"); !ok {
		t.Fatal("device disconnected")
	}
}

// Subscribing again at the receive maximum does not bring a document
// beyond it either: the current document waits for the acknowledgement.
func TestBroker_Resubscribe_WaitsForReceiveMaximum(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	topic := fleet.DesiredTopic("press-01")
	rc := dialRawClient(t, b.Addr(), nil)
	rc.write(connectPacketWith("press-01", "key-press-01", []byte{0x21, 0, 1}), // Receive Maximum 1
		subscribePacket(1, topic))
	rc.expect(2)
	first, _ := rc.expectPublish()
	rc.expect(9)

	f.setDesired("press-01", `{"version":2}`)
	rc.write(subscribePacket(2, topic))
	rc.expect(9) // SUBACK, and no PUBLISH before or after it
	if h, body, err := rc.nextWithin(300 * time.Millisecond); err == nil {
		t.Fatalf("device at its receive maximum was sent packet %#x % x", h, body)
	}
	rc.write(pubackPacket(first))
	if _, doc := rc.expectPublish(); doc != `{"version":2}` {
		t.Fatalf("after the acknowledgement got %q; want the current document", doc)
	}
}

// A device that acknowledges nothing (and sets no receive maximum) is
// disconnected at MaxInflight unacknowledged documents instead of being sent
// more.
func TestBroker_PublishDesired_BackloggedDeviceDisconnected(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) { c.Limits.MaxInflight = 3 })
	rc := dialRawClient(t, b.Addr(), nil)
	rc.write(connectPacket("press-01", "key-press-01"), subscribePacket(1, fleet.DesiredTopic("press-01")))
	rc.expect(2)
	rc.expectPublish()
	rc.expect(9)
	waitFor(t, "press-01 listed", func() bool { _, ok := b.Connection("press-01"); return ok })
	var err error
	for v := 2; v <= 10 && err == nil; v++ {
		err = b.PublishDesired("press-01", []byte(fmt.Sprintf(`{"version":%d}`, v)))
		if err == nil && v <= 3 {
			rc.expectPublish() // written before the next one replaces it
		}
	}
	if !errors.Is(err, ErrBacklogged) {
		t.Fatalf("PublishDesired = %v; want ErrBacklogged", err)
	}
	if err := drain(rc.c); err != nil {
		t.Fatalf("backlogged device not disconnected: %v", err)
	}
}

// The framer finds the packet boundaries mochi's decoder finds, including
// remaining lengths encoded in more bytes than needed (which mochi accepts),
// whatever the sizes of the reads.
func TestFramer_MatchesMochiDecoding(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		var stream []byte
		var ends []int
		for range 1 + rng.IntN(20) {
			n := rng.IntN(300)
			if rng.IntN(10) == 0 {
				n = rng.IntN(70000)
			}
			stream = append(stream, byte(rng.IntN(256)))
			l := appendVarint(nil, n)
			if rng.IntN(4) == 0 && len(l) < 4 { // overlong encoding
				l[len(l)-1] |= 0x80
				l = append(l, 0)
			}
			stream = append(stream, l...)
			stream = append(stream, make([]byte, n)...)
			ends = append(ends, len(stream))
		}
		// mochi's view of the same bytes.
		r := bytes.NewReader(stream)
		for i := range ends {
			_, _ = r.ReadByte()
			n, _, err := packets.DecodeLength(r)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = r.Seek(int64(n), io.SeekCurrent)
			if got := len(stream) - r.Len(); got != ends[i] {
				t.Fatalf("round %d: test stream disagrees with mochi at packet %d", round, i)
			}
		}
		var f framer
		pos, next := 0, 0
		for pos < len(stream) {
			chunk := stream[pos:min(len(stream), pos+1+rng.IntN(5000))]
			n := f.advance(chunk)
			if n < 1 || n > len(chunk) {
				t.Fatalf("round %d: advance(%d bytes) = %d", round, len(chunk), n)
			}
			pos += n
			if pos > ends[next] {
				t.Fatalf("round %d: handed over bytes past the end of packet %d (%d > %d)", round, next, pos, ends[next])
			}
			if pos == ends[next] {
				if f.state != frameStart {
					t.Fatalf("round %d: at the end of packet %d but state %d", round, next, f.state)
				}
				next++
			} else if f.state == frameStart {
				t.Fatalf("round %d: boundary at %d inside packet %d", round, pos, next)
			}
		}
	}
}

// A desired document larger than the device's own Maximum Packet Size
// (MQTT 5) cannot be sent: the device is disconnected and it is counted and
// logged, rather than left connected without its desired state.
func TestBroker_Desired_LargerThanDeviceMaximumPacketSize(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	rc := dialRawClient(t, b.Addr(), nil)
	rc.write(connectPacketWith("press-01", "key-press-01", []byte{0x27, 0, 0, 0, 40}), // Maximum Packet Size 40
		subscribePacket(1, fleet.DesiredTopic("press-01")))
	rc.expect(2)
	if err := drain(rc.c); err != nil {
		t.Fatalf("device not disconnected: %v", err)
	}
	waitFor(t, "failure counted", func() bool { return b.Stats().DesiredFailed == 1 })
}

// A device's packet ids are its own: an UNSUBSCRIBE whose id equals that of
// a desired document the device has not acknowledged yet is an ordinary
// UNSUBSCRIBE. (mochi v2.7.9 answers "packet identifier in use" and keeps
// the subscription when the two collide in its inflight store, which the
// broker no longer uses for desired documents.)
func TestBroker_DevicePacketIDsIndependentOfDesired(t *testing.T) {
	f := newTestFleet("press-01")
	b := startBroker(t, f)
	topic := fleet.DesiredTopic("press-01")
	rc := dialRawClient(t, b.Addr(), nil)
	rc.write(connectPacket("press-01", "key-press-01"), subscribePacket(1, topic))
	rc.expect(2)
	id, _ := rc.expectPublish() // left unacknowledged
	rc.expect(9)

	vh := []byte{byte(id >> 8), byte(id), 0}
	vh = appendString(vh, topic)
	rc.write(append(appendVarint([]byte{0xa2}, len(vh)), vh...))
	body := rc.expect(11) // UNSUBACK: id, properties, one reason code
	if len(body) != 4 || body[3] != packets.CodeSuccess.Code {
		t.Fatalf("UNSUBACK % x; want success for packet id %d", body, id)
	}
	if err := b.PublishDesired("press-01", []byte(`{"version":2}`)); err != nil {
		t.Fatal(err)
	}
	if h, body, err := rc.nextWithin(300 * time.Millisecond); err == nil {
		t.Fatalf("after unsubscribing, got packet %#x % x", h, body)
	}
}
