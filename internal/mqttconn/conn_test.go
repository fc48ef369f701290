package mqttconn

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/internal/mqttwire"
)

// pair is a server Conn and its client over real loopback TCP.
func pair(t *testing.T, lim Limits) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c := New(nc, 4<<10, lim)
	t.Cleanup(func() { c.Close(nil); <-c.Done() })
	return c, client
}

var testLimits = Limits{ConnectTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second}

func publish(topic string) func(*bytes.Buffer) error {
	return func(b *bytes.Buffer) error {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: []byte("x"), ProtocolVersion: 5}
		return pk.PublishEncode(b)
	}
}

func readAll(t *testing.T, client net.Conn) ([]packets.Packet, error) {
	t.Helper()
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(client)
	var out []packets.Packet
	for {
		pk, err := mqttwire.ReadPacket(br, 5, 1<<20)
		if err != nil {
			return out, err
		}
		out = append(out, pk)
	}
}

// What is queued reaches the client in order; a close with a reason code
// ends with a DISCONNECT carrying it (MQTT 5), then the socket closes.
func TestConn_WritesInOrderThenDisconnectsWithReason(t *testing.T) {
	c, client := pair(t, testLimits)
	c.Connected(5, time.Minute, nil, nil)
	for i := range 100 {
		if _, err := c.Queue(publish(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	c.Close(packets.ErrNotAuthorized)
	if _, err := c.Queue(publish("late")); !errors.Is(err, ErrClosed) {
		t.Errorf("queue after close: %v", err)
	}
	got, err := readAll(t, client)
	if !errors.Is(err, io.EOF) {
		t.Fatalf("read ended with %v; want EOF", err)
	}
	if len(got) != 101 {
		t.Fatalf("%d packets; want 100 and a DISCONNECT", len(got))
	}
	for i, pk := range got[:100] {
		if pk.TopicName != fmt.Sprint(i) {
			t.Fatalf("packet %d is %q", i, pk.TopicName)
		}
	}
	if d := got[100]; d.FixedHeader.Type != packets.Disconnect || d.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Errorf("last packet %v %#x; want DISCONNECT 0x87", d.FixedHeader.Type, d.ReasonCode)
	}
	<-c.Done()
}

// MQTT 3.1.1 has no DISCONNECT from a server, and a reason below 0x80 is
// no failure: the socket just closes.
func TestConn_CloseWithoutDisconnect(t *testing.T) {
	for _, tc := range []struct {
		name      string
		version   byte
		connected bool
		reason    error
	}{
		{"3.1.1", 4, true, packets.ErrNotAuthorized},
		{"5, success code", 5, true, packets.CodeDisconnect},
		{"5, no reason", 5, true, nil},
		{"5, not accepted yet", 5, false, packets.ErrNotAuthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, client := pair(t, testLimits)
			if tc.connected {
				c.Connected(tc.version, time.Minute, nil, nil)
			}
			c.Close(tc.reason)
			got, err := readAll(t, client)
			if !errors.Is(err, io.EOF) || len(got) != 0 {
				t.Fatalf("got %d packets, then %v; want none, then EOF", len(got), err)
			}
			<-c.Done()
		})
	}
}

// A client that stops reading: past MaxOutbound Queue says so, and a write
// that cannot finish within WriteTimeout closes the connection, telling
// the owner why.
func TestConn_ClientThatStopsReading(t *testing.T) {
	lim := testLimits
	lim.WriteTimeout, lim.MaxOutbound = 200*time.Millisecond, 1<<20
	c, _ := pair(t, lim)
	writeErr := make(chan error, 1)
	c.Connected(5, time.Minute, func(err error) { writeErr <- err }, nil)
	big := func(b *bytes.Buffer) error {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "t", Payload: make([]byte, 64<<10), ProtocolVersion: 5}
		return pk.PublishEncode(b)
	}
	// Queue until the connection closes: past MaxOutbound the owner would
	// close it; here the writer's timeout does, once the kernel's buffers
	// are full too.
	sawNotReading := false
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		_, err := c.Queue(big)
		if errors.Is(err, ErrClosed) {
			break
		}
		if errors.Is(err, ErrNotReading) {
			sawNotReading = true
			time.Sleep(10 * time.Millisecond)
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if !sawNotReading {
		t.Error("Queue never said ErrNotReading")
	}
	select {
	case err := <-writeErr:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("write error %v; want a timeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the blocked write did not fail")
	}
	<-c.Done()
	if c.IsOpen() {
		t.Error("still open after a failed write")
	}
}

// An encode that fails leaves the queue as it was.
func TestConn_FailedEncodeLeavesQueue(t *testing.T) {
	c, client := pair(t, testLimits)
	c.Connected(5, time.Minute, nil, nil)
	bad := errors.New("too large")
	if _, err := c.Queue(func(b *bytes.Buffer) error {
		_ = publish("partial")(b)
		return bad
	}); !errors.Is(err, bad) {
		t.Fatalf("queue: %v", err)
	}
	if _, err := c.Queue(publish("whole")); err != nil {
		t.Fatal(err)
	}
	c.Close(nil)
	got, _ := readAll(t, client)
	if len(got) != 1 || got[0].TopicName != "whole" {
		t.Fatalf("client got %d packets, first %q", len(got), got[0].TopicName)
	}
}

// A client silent for one and a half keepalives ends its reads with a
// timeout.
func TestConn_KeepaliveDeadline(t *testing.T) {
	c, _ := pair(t, testLimits)
	c.Connected(4, 100*time.Millisecond, nil, nil)
	_, err := c.Next(1 << 10)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read from a silent client: %v; want a timeout", err)
	}
}

// A TLS client that never says hello fails the handshake at the connect
// deadline, and one that does gets through.
func TestConn_HandshakeDeadline(t *testing.T) {
	cfg := selfSigned(t)
	lim := testLimits
	lim.ConnectTimeout = 200 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accept := func() *Conn {
		nc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c := New(tls.Server(nc, cfg), 4<<10, lim)
		t.Cleanup(func() { c.Close(nil) })
		return c
	}
	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var ne net.Error
	if err := accept().Handshake(); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("handshake with a silent client: %v; want a timeout", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cfg.Certificates[0].Leaf)
	done := make(chan error, 1)
	go func() {
		cc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err == nil {
			cc.Close()
		}
		done <- err
	}()
	if err := accept().Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("client: %v", err)
	}
}

func selfSigned(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}}}
}

func TestV3ConnackCode(t *testing.T) {
	for _, tc := range []struct {
		in   packets.Code
		want byte
	}{
		{packets.ErrUnsupportedProtocolVersion, 0x01},
		{packets.ErrClientIdentifierNotValid, 0x02},
		{packets.ErrServerBusy, 0x03},
		{packets.ErrBadUsernameOrPassword, 0x04},
		{packets.ErrNotAuthorized, 0x05},
		{packets.ErrQuotaExceeded, 0x03},
	} {
		if got := V3ConnackCode(tc.in).Code; got != tc.want {
			t.Errorf("%#x (%s): %#x; want %#x", tc.in.Code, tc.in.Reason, got, tc.want)
		}
	}
}

// Packet ids skip those in use and wrap from 65535 to 1, never 0.
func TestNextPacketID(t *testing.T) {
	used := map[uint16]bool{2: true, 3: true}
	last := uint16(1)
	if id := NextPacketID(&last, func(id uint16) bool { return used[id] }); id != 4 || last != 4 {
		t.Errorf("after 1 with 2 and 3 in use: %d (last %d)", id, last)
	}
	last = 65535
	if id := NextPacketID(&last, func(uint16) bool { return false }); id != 1 {
		t.Errorf("after 65535: %d", id)
	}
}

// The first packet must be a CONNECT of MQTT 3.1.1 or 5 that decodes;
// the refusal is written in a version the client reads, with 3.1.1's
// return code.
func TestConn_ReadConnectAndRefuse(t *testing.T) {
	connect := func(version byte, clientID string) []byte {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: version,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID}}
		if version == 3 {
			pk.Connect.ProtocolName = []byte("MQIsdp")
		}
		var b bytes.Buffer
		if err := pk.ConnectEncode(&b); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	ping := []byte{0xc0, 0}
	for _, tc := range []struct {
		name     string
		send     []byte
		err      error
		refuse   byte // CONNACK return code the client reads; 0: accepted
		readAsV5 bool
	}{
		{"3.1.1", connect(4, "a"), nil, 0, false},
		{"5", connect(5, "a"), nil, 0, true},
		{"not a CONNECT", ping, packets.ErrProtocolViolationRequireFirstConnect, 0, false},
		{"MQTT 3.1", connect(3, "a"), nil, 0x01, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, client := pair(t, testLimits)
			if _, err := client.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			pk, code, why, err := c.ReadConnect(1<<10, "3.1.1 and 5")
			if !errors.Is(err, tc.err) {
				t.Fatalf("error %v; want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			if (code != packets.CodeSuccess) != (tc.refuse != 0) {
				t.Fatalf("refuse %#x %q; want return code %#x", code.Code, why, tc.refuse)
			}
			if tc.refuse == 0 {
				return
			}
			c.Refuse(pk.ProtocolVersion, code)
			_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
			ack, err := mqttwire.ReadPacket(bufio.NewReader(client), 4, 1<<10)
			if err != nil || ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != tc.refuse {
				t.Fatalf("client read %v %#x, %v; want CONNACK %#x", ack.FixedHeader.Type, ack.ReasonCode, err, tc.refuse)
			}
			<-c.Done()
		})
	}
}
