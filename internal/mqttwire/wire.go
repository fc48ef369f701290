// Package mqttwire reads MQTT packets off a stream with mochi-mqtt's
// codec, for the device hub (server side) and the repository's small
// client (internal/edgeclient). The body of each packet is read into a
// buffer of its own: mochi's decoded strings and payloads alias it.
package mqttwire

import (
	"bufio"
	"io"

	"github.com/mochi-mqtt/server/v2/packets"
)

// ReadPacket reads and decodes one packet of protocol version (4 or 5;
// a CONNECT sets its own). A packet whose remaining length exceeds max is
// refused from its fixed header with packets.ErrPacketTooLarge, before its
// body is read. QoS 2 packets give packets.ErrQosNotSupported, AUTH and
// unknown types packets.ErrProtocolViolation. mochi's decoders may panic
// on malformed input (mochi-mqtt/server#501): callers recover.
func ReadPacket(r *bufio.Reader, version byte, max int) (packets.Packet, error) {
	hb, err := r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	var fh packets.FixedHeader
	if err := fh.Decode(hb); err != nil {
		return packets.Packet{}, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return packets.Packet{}, err
	}
	if n > max {
		return packets.Packet{}, packets.ErrPacketTooLarge
	}
	fh.Remaining = n
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: version}
	switch fh.Type {
	case packets.Connect:
		err = pk.ConnectDecode(buf)
	case packets.Connack:
		err = pk.ConnackDecode(buf)
	case packets.Publish:
		err = pk.PublishDecode(buf)
	case packets.Puback:
		err = pk.PubackDecode(buf)
	case packets.Subscribe:
		err = pk.SubscribeDecode(buf)
	case packets.Suback:
		err = pk.SubackDecode(buf)
	case packets.Unsubscribe:
		err = pk.UnsubscribeDecode(buf)
	case packets.Unsuback:
		err = pk.UnsubackDecode(buf)
	case packets.Pingreq, packets.Pingresp:
	case packets.Disconnect:
		err = pk.DisconnectDecode(buf)
	case packets.Pubrec, packets.Pubrel, packets.Pubcomp:
		err = packets.ErrQosNotSupported
	default:
		err = packets.ErrProtocolViolation
	}
	return pk, err
}
