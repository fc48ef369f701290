package sim

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The few MQTT 3.1.1 packets a simulated device needs, encoded by hand: a
// device costs one goroutine, one socket and a small read buffer, where a
// full client library keeps several goroutines and buffers per connection.

// Packet types: the high nibble of the fixed header.
const (
	pktConnect    = 1
	pktConnack    = 2
	pktPublish    = 3
	pktPuback     = 4
	pktSubscribe  = 8
	pktSuback     = 9
	pktPingreq    = 12
	pktPingresp   = 13
	pktDisconnect = 14
)

// maxPacketSize bounds what a device reads; the broker sends at most
// 256 KiB by default.
const maxPacketSize = 1 << 20

var (
	pingreqPacket    = []byte{pktPingreq << 4, 0}
	disconnectPacket = []byte{pktDisconnect << 4, 0}
)

// ErrRefused is a CONNACK that refuses the device's credentials (3.1.1
// return codes 4 "bad user name or password" and 5 "not authorized").
var ErrRefused = errors.New("the controller refused the device's credentials")

// connackError describes a CONNACK return code other than 0.
func connackError(code byte) error {
	switch code {
	case 1:
		return errors.New("connack: unacceptable protocol version")
	case 2:
		return errors.New("connack: client identifier rejected")
	case 3:
		return errors.New("connack: server unavailable")
	case 4, 5:
		return fmt.Errorf("connack code %d: %w", code, ErrRefused)
	}
	return fmt.Errorf("connack: return code %d", code)
}

// packet is one received control packet.
type packet struct {
	kind  byte // pktXxx
	flags byte // the fixed header's low nibble
	body  []byte
}

// readPacket reads the rest of a packet whose first byte was already read.
func readPacket(r *bufio.Reader, first byte) (packet, error) {
	n, err := readRemainingLength(r)
	if err != nil {
		return packet{}, err
	}
	if n > maxPacketSize {
		return packet{}, fmt.Errorf("packet of %d bytes exceeds %d", n, maxPacketSize)
	}
	p := packet{kind: first >> 4, flags: first & 0x0f}
	if n > 0 {
		p.body = make([]byte, n)
		if _, err := io.ReadFull(r, p.body); err != nil {
			return packet{}, fmt.Errorf("read packet body: %w", err)
		}
	}
	return p, nil
}

func readRemainingLength(r io.ByteReader) (int, error) {
	n, shift := 0, 0
	for i := 0; i < 4; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, fmt.Errorf("read remaining length: %w", err)
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			return n, nil
		}
		shift += 7
	}
	return 0, errors.New("malformed remaining length")
}

func appendRemainingLength(b []byte, n int) []byte {
	for {
		d := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// frame prefixes a body with its fixed header.
func frame(header byte, body []byte) []byte {
	out := make([]byte, 0, len(body)+5)
	out = append(out, header)
	out = appendRemainingLength(out, len(body))
	return append(out, body...)
}

// connectPacket is a clean-session CONNECT with a user name and password.
func connectPacket(clientID, username, password string, keepAliveSecs uint16) []byte {
	body := make([]byte, 0, 16+len(clientID)+len(username)+len(password))
	body = appendString(body, "MQTT")
	body = append(body, 4)              // protocol level 3.1.1
	body = append(body, 0x80|0x40|0x02) // user name, password, clean session
	body = binary.BigEndian.AppendUint16(body, keepAliveSecs)
	body = appendString(body, clientID)
	body = appendString(body, username)
	body = appendString(body, password)
	return frame(pktConnect<<4, body)
}

// subscribePacket subscribes to one topic filter.
func subscribePacket(id uint16, topic string, qos byte) []byte {
	body := binary.BigEndian.AppendUint16(make([]byte, 0, 5+len(topic)), id)
	body = appendString(body, topic)
	body = append(body, qos)
	return frame(pktSubscribe<<4|0x02, body)
}

// publishPacket is a QoS 1 PUBLISH.
func publishPacket(id uint16, topic string, payload []byte) []byte {
	body := make([]byte, 0, 4+len(topic)+len(payload))
	body = appendString(body, topic)
	body = binary.BigEndian.AppendUint16(body, id)
	body = append(body, payload...)
	return frame(pktPublish<<4|0x02, body)
}

func pubackPacket(id uint16) []byte {
	return []byte{pktPuback << 4, 2, byte(id >> 8), byte(id)}
}

// parseConnack returns nil for an accepted connection.
func parseConnack(p packet) error {
	if p.kind != pktConnack || len(p.body) != 2 {
		return fmt.Errorf("expected CONNACK, got packet type %d of %d bytes", p.kind, len(p.body))
	}
	if p.body[1] != 0 {
		return connackError(p.body[1])
	}
	return nil
}

// parsePublish splits a received PUBLISH; id is 0 at QoS 0.
func parsePublish(p packet) (topic string, id uint16, payload []byte, err error) {
	b := p.body
	if len(b) < 2 {
		return "", 0, nil, errors.New("publish: truncated topic")
	}
	n := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if len(b) < n {
		return "", 0, nil, errors.New("publish: truncated topic")
	}
	topic, b = string(b[:n]), b[n:]
	switch qos := (p.flags >> 1) & 0x03; qos {
	case 0:
	case 1, 2:
		if len(b) < 2 {
			return "", 0, nil, errors.New("publish: truncated packet id")
		}
		id, b = binary.BigEndian.Uint16(b), b[2:]
		if qos == 2 {
			return "", 0, nil, errors.New("publish: QoS 2 is not used by the controller")
		}
	default:
		return "", 0, nil, errors.New("publish: malformed QoS")
	}
	return topic, id, b, nil
}

// packetID reads the id of a PUBACK or SUBACK.
func packetID(p packet) (uint16, error) {
	if len(p.body) < 2 {
		return 0, fmt.Errorf("packet type %d: truncated packet id", p.kind)
	}
	return binary.BigEndian.Uint16(p.body), nil
}
