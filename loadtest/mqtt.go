package loadtest

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// MQTT 3.1.1 control packet types (first byte, high nibble).
const (
	pktConnect    = 0x10
	pktConnack    = 0x20
	pktPublish    = 0x30
	pktPuback     = 0x40
	pktSubscribe  = 0x82 // type 8 with the reserved flags 0010
	pktSuback     = 0x90
	pktPingreq    = 0xC0
	pktPingresp   = 0xD0
	pktDisconnect = 0xE0
)

// Errors of the client.
var (
	ErrRefused    = errors.New("connection refused by the broker")
	ErrSubRefused = errors.New("subscription refused by the broker")
	ErrProtocol   = errors.New("protocol error")
	ErrClosed     = errors.New("connection closed")
	ErrAckTimeout = errors.New("no acknowledgement in time")
)

// maxPacketLength caps a packet the client reads (the node's own cap is
// 256 KiB).
const maxPacketLength = 1 << 20

// ConnectOptions are a device's credentials and session settings.
type ConnectOptions struct {
	ClientID, Username, Password string
	// Keepalive is sent in CONNECT; the caller must send Ping within it
	// (RunShard does). Zero asks for no keepalive.
	Keepalive time.Duration
	// Timeout bounds the TCP handshake and CONNACK (default 10 s).
	Timeout time.Duration
	// AckBuffer is how many SUBACK/PUBACK packets can wait unread
	// (default 4); a publisher with many messages in flight needs as many.
	AckBuffer int
}

// Handler receives every PUBLISH, on the connection's read goroutine, at
// the time it was read; payload is valid only during the call. A QoS 1
// publish is acknowledged after the handler returns.
type Handler func(c *Conn, topic string, payload []byte, at time.Time)

// Conn is one MQTT 3.1.1 client connection with one read goroutine.
type Conn struct {
	nc net.Conn
	br *bufio.Reader

	wmu    sync.Mutex
	wbuf   []byte
	nextID uint16

	// acks is signalled with the packet id of each SUBACK or PUBACK; the
	// caller that sent the packet waits for it. Buffered so the read loop
	// never blocks on a caller that gave up.
	acks chan ack

	done chan struct{}
	err  error // why the read loop ended; set before done is closed
}

type ack struct {
	id     uint16
	failed bool
}

// Dial opens a TCP connection from d (which may pin a source address),
// sends CONNECT and waits for CONNACK. handler gets every PUBLISH; it may
// be nil.
func Dial(ctx context.Context, d *net.Dialer, addr string, o ConnectOptions, handler Handler) (*Conn, error) {
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.AckBuffer == 0 {
		o.AckBuffer = 4
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	// Our packet ids start at 0x8000: mochi v2.7.9 checks a SUBSCRIBE's id
	// against its own in-flight ids to this client (which count from 1)
	// and refuses the subscription if they collide.
	c := &Conn{nc: nc, br: bufio.NewReaderSize(nc, 1024), acks: make(chan ack, o.AckBuffer), done: make(chan struct{}), nextID: 0x7FFF}
	deadline, _ := ctx.Deadline()
	_ = nc.SetDeadline(deadline)
	if err := c.writePacket(connectPacket(o)); err != nil {
		nc.Close()
		return nil, fmt.Errorf("send CONNECT: %w", err)
	}
	typ, body, err := c.readPacket()
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if typ&0xF0 != pktConnack || len(body) != 2 {
		nc.Close()
		return nil, fmt.Errorf("%w: expected CONNACK, got packet type %#x", ErrProtocol, typ)
	}
	if body[1] != 0 {
		nc.Close()
		return nil, fmt.Errorf("%w: CONNACK return code %d", ErrRefused, body[1])
	}
	_ = nc.SetDeadline(time.Time{})
	go c.readLoop(handler)
	return c, nil
}

func connectPacket(o ConnectOptions) []byte {
	var flags byte = 0x02 // clean session
	n := 10 + 2 + len(o.ClientID)
	if o.Username != "" {
		flags |= 0x80
		n += 2 + len(o.Username)
	}
	if o.Password != "" {
		flags |= 0x40
		n += 2 + len(o.Password)
	}
	p := appendHeader(make([]byte, 0, n+5), pktConnect, n)
	p = appendString(p, "MQTT")
	p = append(p, 4, flags)
	p = binary.BigEndian.AppendUint16(p, uint16(o.Keepalive/time.Second))
	p = appendString(p, o.ClientID)
	if o.Username != "" {
		p = appendString(p, o.Username)
	}
	if o.Password != "" {
		p = appendString(p, o.Password)
	}
	return p
}

// Subscribe subscribes to topic at qos and waits for the SUBACK. Messages
// the broker sends meanwhile go to the handler.
func (c *Conn) Subscribe(topic string, qos byte, timeout time.Duration) error {
	c.wmu.Lock()
	c.nextID++
	if c.nextID == 0 {
		c.nextID = 1
	}
	id := c.nextID
	p := appendHeader(c.wbuf[:0], pktSubscribe, 2+2+len(topic)+1)
	p = binary.BigEndian.AppendUint16(p, id)
	p = appendString(p, topic)
	p = append(p, qos)
	err := c.writeLocked(p)
	c.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("send SUBSCRIBE: %w", err)
	}
	if err := c.waitAck(id, timeout); err != nil {
		if errors.Is(err, ErrSubRefused) {
			return fmt.Errorf("subscribe %s: %w", topic, err)
		}
		return fmt.Errorf("SUBACK for %s: %w", topic, err)
	}
	return nil
}

// Publish sends a PUBLISH. At QoS 1 it returns the packet id to wait for
// with WaitAck; at QoS 0 it returns 0.
func (c *Conn) Publish(topic string, qos byte, payload []byte) (uint16, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var id uint16
	n := 2 + len(topic) + len(payload)
	if qos > 0 {
		n += 2
		c.nextID++
		if c.nextID == 0 {
			c.nextID = 1
		}
		id = c.nextID
	}
	p := appendHeader(c.wbuf[:0], pktPublish|qos<<1, n)
	p = appendString(p, topic)
	if qos > 0 {
		p = binary.BigEndian.AppendUint16(p, id)
	}
	p = append(p, payload...)
	if cap(p) <= 4096 {
		c.wbuf = p // keep a small buffer; drop a large one
	}
	return id, c.writeLocked(p)
}

// NextAck waits for the next SUBACK or PUBACK and returns its packet id.
func (c *Conn) NextAck(timeout time.Duration) (uint16, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case a := <-c.acks:
		return a.id, nil
	case <-c.done:
		return 0, fmt.Errorf("%w: %v", ErrClosed, c.err)
	case <-t.C:
		return 0, ErrAckTimeout
	}
}

func (c *Conn) waitAck(id uint16, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case a := <-c.acks:
			if a.id != id {
				continue // a late ack of a packet whose caller gave up
			}
			if a.failed {
				return ErrSubRefused
			}
			return nil
		case <-c.done:
			return fmt.Errorf("%w: %v", ErrClosed, c.err)
		case <-t.C:
			return ErrAckTimeout
		}
	}
}

// Ping sends PINGREQ; the PINGRESP is read and dropped by the read loop.
func (c *Conn) Ping() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked([]byte{pktPingreq, 0})
}

// Close sends DISCONNECT (best effort) and closes the connection.
func (c *Conn) Close() error {
	c.wmu.Lock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.nc.Write([]byte{pktDisconnect, 0})
	c.wmu.Unlock()
	return c.nc.Close()
}

// Done is closed when the connection has ended; Err then says why.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while it is open).
func (c *Conn) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

func (c *Conn) writeLocked(p []byte) error {
	_ = c.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := c.nc.Write(p)
	return err
}

func (c *Conn) writePacket(p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(p)
}

func (c *Conn) readLoop(handler Handler) {
	var err error
	defer func() {
		c.err = err
		close(c.done)
		c.nc.Close()
	}()
	for {
		var typ byte
		var body []byte
		typ, body, err = c.readPacket()
		if err != nil {
			return
		}
		at := time.Now()
		switch typ & 0xF0 {
		case pktPublish:
			qos := (typ >> 1) & 3
			if len(body) < 2 {
				err = fmt.Errorf("%w: short PUBLISH", ErrProtocol)
				return
			}
			tl := int(binary.BigEndian.Uint16(body))
			rest := body[2:]
			if len(rest) < tl {
				err = fmt.Errorf("%w: PUBLISH topic overruns the packet", ErrProtocol)
				return
			}
			topic := string(rest[:tl])
			rest = rest[tl:]
			var id uint16
			if qos > 0 {
				if len(rest) < 2 {
					err = fmt.Errorf("%w: PUBLISH without a packet id", ErrProtocol)
					return
				}
				id = binary.BigEndian.Uint16(rest)
				rest = rest[2:]
			}
			if handler != nil {
				handler(c, topic, rest, at)
			}
			if qos == 1 {
				if err = c.writePacket([]byte{pktPuback, 2, byte(id >> 8), byte(id)}); err != nil {
					return
				}
			}
		case pktSuback & 0xF0:
			if len(body) < 3 {
				err = fmt.Errorf("%w: short SUBACK", ErrProtocol)
				return
			}
			c.signal(ack{id: binary.BigEndian.Uint16(body), failed: body[2] >= 0x80})
		case pktPuback:
			if len(body) < 2 {
				err = fmt.Errorf("%w: short PUBACK", ErrProtocol)
				return
			}
			c.signal(ack{id: binary.BigEndian.Uint16(body)})
		case pktPingresp:
		case pktDisconnect:
			err = fmt.Errorf("%w: the broker sent DISCONNECT", ErrClosed)
			return
		default:
			err = fmt.Errorf("%w: unexpected packet type %#x", ErrProtocol, typ)
			return
		}
	}
}

func (c *Conn) signal(a ack) {
	select {
	case c.acks <- a:
	default: // nobody is waiting any more
	}
}

// readPacket reads one control packet. The body is only valid until the
// next read.
func (c *Conn) readPacket() (byte, []byte, error) {
	typ, err := c.br.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mult := 0, 1
	for i := 0; ; i++ {
		b, err := c.br.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&0x7F) * mult
		if b&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, fmt.Errorf("%w: remaining length over 4 bytes", ErrProtocol)
		}
		mult *= 128
	}
	if n > maxPacketLength {
		return 0, nil, fmt.Errorf("%w: packet of %d bytes", ErrProtocol, n)
	}
	// Small packets are read in place from the buffered reader: no copy
	// and no allocation for a desired document that fits.
	if n <= c.br.Size() {
		body, err := c.br.Peek(n)
		if err != nil {
			return 0, nil, err
		}
		_, _ = c.br.Discard(n)
		return typ, body, nil
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.br, body); err != nil {
		return 0, nil, err
	}
	return typ, body, nil
}

func appendHeader(p []byte, typ byte, n int) []byte {
	p = append(p, typ)
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		p = append(p, b)
		if n == 0 {
			return p
		}
	}
}

func appendString(p []byte, s string) []byte {
	p = binary.BigEndian.AppendUint16(p, uint16(len(s)))
	return append(p, s...)
}
