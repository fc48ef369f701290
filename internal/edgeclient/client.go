// Package edgeclient is a small IoT Edge module client: MQTT 3.1.1 over TLS
// with IoT Hub's topics, the way the Azure IoT SDKs talk to a device hub,
// and the workload API calls of create_from_edge_environment. The
// repository's tests, benchmarks and the test module container use it;
// modules in production use the Azure SDKs.
//
// QoS 1 publishes are pipelined: up to Window wait for their PUBACK at
// once. Messages received at QoS 1 are acknowledged after the receiver's
// channel took them.
package edgeclient

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/internal/mqttwire"
)

// Config configures a Client.
type Config struct {
	// Addr is host:port of the hub (or any MQTT broker).
	Addr string
	// TLS, when set, is used to dial; nil dials plain TCP.
	TLS *tls.Config
	// ClientID, Username and Password as sent in CONNECT. For a module of
	// IoT Hub: "{device}/{module}", "{hub}/{device}/{module}/?api-version=...",
	// a SAS token (see Module).
	ClientID, Username, Password string
	// CleanSession as in CONNECT (azure-iot-device sends false).
	CleanSession bool
	// KeepAlive; default 60 s.
	KeepAlive time.Duration
	// Window caps QoS 1 publishes awaiting a PUBACK; default 128.
	Window int
	// Version is the MQTT protocol level: 4 (3.1.1, default) or 5.
	Version byte
}

// Message is a PUBLISH the client received.
type Message struct {
	Topic   string
	Payload []byte
	QoS     byte
}

// ErrClosed: the connection is closed.
var ErrClosed = errors.New("mqtt connection closed")

// ConnackError is a refused CONNECT.
type ConnackError struct{ Code byte }

func (e *ConnackError) Error() string {
	return fmt.Sprintf("connection refused: CONNACK return code %#x", e.Code)
}

// Client is one MQTT connection.
type Client struct {
	cfg     Config
	nc      net.Conn
	br      *bufio.Reader
	version byte

	SessionPresent bool

	wmu sync.Mutex // serialises writes

	mu       sync.Mutex
	nextID   uint16
	pending  map[uint16]chan packets.Packet // PUBACK, SUBACK, UNSUBACK by packet id
	slots    chan struct{}                  // the publish window
	closed   chan struct{}
	closeErr error
	once     sync.Once

	incoming chan Message
	// Disconnect is the DISCONNECT reason an MQTT 5 server sent, if any.
	disconnect byte
}

// Dial connects and sends CONNECT; a refusal is a *ConnackError.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 60 * time.Second
	}
	if cfg.Window == 0 {
		cfg.Window = 128
	}
	if cfg.Version == 0 {
		cfg.Version = 4
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", cfg.Addr)
	if err != nil {
		return nil, err
	}
	if cfg.TLS != nil {
		tc := tls.Client(nc, cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("TLS handshake with %s: %w", cfg.Addr, err)
		}
		nc = tc
	}
	c := &Client{cfg: cfg, nc: nc, br: bufio.NewReaderSize(nc, 64<<10), version: cfg.Version,
		pending: map[uint16]chan packets.Packet{}, slots: make(chan struct{}, cfg.Window),
		closed: make(chan struct{}), incoming: make(chan Message, 1024)}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: cfg.Version}
	pk.Connect = packets.ConnectParams{
		ProtocolName: []byte("MQTT"), ClientIdentifier: cfg.ClientID, Clean: cfg.CleanSession,
		Keepalive: uint16(cfg.KeepAlive / time.Second),
		Username:  []byte(cfg.Username), UsernameFlag: cfg.Username != "",
		Password: []byte(cfg.Password), PasswordFlag: cfg.Password != "",
	}
	if cfg.Version == 5 && !cfg.CleanSession {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
	}
	if deadline, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(deadline)
	}
	if err := c.send(&pk); err != nil {
		nc.Close()
		return nil, err
	}
	ack, err := c.read()
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if ack.FixedHeader.Type != packets.Connack {
		nc.Close()
		return nil, fmt.Errorf("expected CONNACK, got packet type %d", ack.FixedHeader.Type)
	}
	if ack.ReasonCode != 0 {
		nc.Close()
		return nil, &ConnackError{Code: ack.ReasonCode}
	}
	c.SessionPresent = ack.SessionPresent
	_ = nc.SetDeadline(time.Time{})
	go c.readLoop()
	go c.pinger()
	return c, nil
}

// send encodes and writes a packet.
func (c *Client) send(pk *packets.Packet) error {
	var b bytes.Buffer
	var err error
	pk.ProtocolVersion = c.version
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&b)
	case packets.Publish:
		err = pk.PublishEncode(&b)
	case packets.Puback:
		err = pk.PubackEncode(&b)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&b)
	case packets.Unsubscribe:
		err = pk.UnsubscribeEncode(&b)
	case packets.Pingreq:
		err = pk.PingreqEncode(&b)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&b)
	default:
		return fmt.Errorf("cannot send packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		return err
	}
	return c.WriteRaw(b.Bytes())
}

// WriteRaw writes bytes as they are (tests send malformed packets with it).
func (c *Client) WriteRaw(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := c.nc.Write(b)
	return err
}

func (c *Client) read() (packets.Packet, error) {
	return mqttwire.ReadPacket(c.br, c.version, 1<<28)
}

func (c *Client) readLoop() {
	for {
		pk, err := c.read()
		if err != nil {
			c.fail(err)
			return
		}
		switch pk.FixedHeader.Type {
		case packets.Publish:
			m := Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos}
			select {
			case c.incoming <- m:
			case <-c.closed:
				return
			}
			if pk.FixedHeader.Qos == 1 {
				ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID}
				if err := c.send(&ack); err != nil {
					c.fail(err)
					return
				}
			}
		case packets.Puback, packets.Suback, packets.Unsuback:
			c.mu.Lock()
			ch := c.pending[pk.PacketID]
			delete(c.pending, pk.PacketID)
			c.mu.Unlock()
			if ch != nil {
				ch <- pk
			}
		case packets.Disconnect:
			c.disconnect = pk.ReasonCode
			c.fail(fmt.Errorf("%w: server sent DISCONNECT %#x", ErrClosed, pk.ReasonCode))
			return
		}
	}
}

func (c *Client) pinger() {
	t := time.NewTicker(c.cfg.KeepAlive / 2)
	defer t.Stop()
	for {
		select {
		case <-c.closed:
			return
		case <-t.C:
			_ = c.send(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
		}
	}
}

func (c *Client) fail(err error) {
	c.once.Do(func() {
		c.closeErr = err
		close(c.closed)
		c.nc.Close()
		c.mu.Lock()
		for id, ch := range c.pending {
			close(ch)
			delete(c.pending, id)
		}
		c.mu.Unlock()
	})
}

// Close disconnects.
func (c *Client) Close() error {
	_ = c.send(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	c.fail(ErrClosed)
	return nil
}

// Done is closed when the connection has ended; Err says why.
func (c *Client) Done() <-chan struct{} { return c.closed }

// Err is why the connection ended (nil while it is open).
func (c *Client) Err() error {
	select {
	case <-c.closed:
		return c.closeErr
	default:
		return nil
	}
}

// DisconnectReason is the reason code of the server's DISCONNECT (MQTT 5),
// 0 if none was received.
func (c *Client) DisconnectReason() byte { return c.disconnect }

// Messages delivers what the client receives.
func (c *Client) Messages() <-chan Message { return c.incoming }

// track registers a packet id awaiting its acknowledgement.
func (c *Client) track() (uint16, chan packets.Packet, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closed:
		return 0, nil, c.closeErr
	default:
	}
	for {
		c.nextID++
		if c.nextID == 0 {
			c.nextID = 1
		}
		if _, used := c.pending[c.nextID]; !used {
			break
		}
	}
	ch := make(chan packets.Packet, 1)
	c.pending[c.nextID] = ch
	return c.nextID, ch, nil
}

// PubackError is a PUBACK with a reason code of 0x80 or more (MQTT 5).
type PubackError struct {
	Code   byte
	Reason string
}

func (e *PubackError) Error() string { return fmt.Sprintf("publish refused: %#x %s", e.Code, e.Reason) }

// PublishAsync publishes at QoS 1 and returns once the PUBLISH is written
// (waiting while Window publishes await their PUBACK); done is called with
// the outcome.
func (c *Client) PublishAsync(topic string, payload []byte, done func(error)) error {
	select {
	case c.slots <- struct{}{}:
	case <-c.closed:
		return c.closeErr
	}
	id, ch, err := c.track()
	if err != nil {
		<-c.slots
		return err
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: topic, Payload: payload, PacketID: id}
	if err := c.send(&pk); err != nil {
		<-c.slots
		return err
	}
	go func() {
		ack, ok := <-ch
		<-c.slots
		switch {
		case !ok:
			done(c.Err())
		case ack.ReasonCode >= 0x80:
			done(&PubackError{Code: ack.ReasonCode, Reason: ack.Properties.ReasonString})
		default:
			done(nil)
		}
	}()
	return nil
}

// Publish publishes and, at QoS 1, waits for the PUBACK.
func (c *Client) Publish(ctx context.Context, topic string, payload []byte, qos byte) error {
	if qos == 0 {
		return c.send(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: payload})
	}
	res := make(chan error, 1)
	if err := c.PublishAsync(topic, payload, func(err error) { res <- err }); err != nil {
		return err
	}
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Subscribe subscribes to filters at QoS 1 and returns the SUBACK's codes.
func (c *Client) Subscribe(ctx context.Context, filters ...string) ([]byte, error) {
	id, ch, err := c.track()
	if err != nil {
		return nil, err
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id}
	for _, f := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: 1})
	}
	if err := c.send(&pk); err != nil {
		return nil, err
	}
	select {
	case ack, ok := <-ch:
		if !ok {
			return nil, c.Err()
		}
		return ack.ReasonCodes, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Escape percent-encodes as azure-iot-device's quote(s, safe="") does.
func Escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || strings.IndexByte("-_.~", ch) >= 0 {
			b.WriteByte(ch)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", ch)
	}
	return b.String()
}

// Bag renders properties as IoT Hub's property bag, system ones first (in
// the given order) then the application ones sorted by name, as the SDK
// does.
func Bag(system [][2]string, props map[string]string) string {
	var parts []string
	for _, kv := range system {
		parts = append(parts, Escape(kv[0])+"="+Escape(kv[1]))
	}
	keys := make([]string, 0, len(props))
	for k := range props {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		parts = append(parts, Escape(k)+"="+Escape(props[k]))
	}
	return strings.Join(parts, "&")
}

// ParseBag reads a property bag (the last segment of an input topic).
func ParseBag(bag string) map[string]string {
	out := map[string]string{}
	if bag == "" {
		return out
	}
	for _, kv := range strings.Split(bag, "&") {
		k, v, _ := strings.Cut(kv, "=")
		k, _ = url.PathUnescape(k)
		v, _ = url.PathUnescape(v)
		out[k] = v
	}
	return out
}
