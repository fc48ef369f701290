package sim

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReadPacket feeds arbitrary bytes, as a broker could send them, to the
// simulator's MQTT packet reader and PUBLISH parser: they must never panic,
// nor allocate beyond the packet size cap.
func FuzzReadPacket(f *testing.F) {
	f.Add([]byte{0x20, 0x02, 0x00, 0x00})                                 // CONNACK accepted
	f.Add([]byte{0x20, 0x02, 0x00, 0x05})                                 // CONNACK refused
	f.Add([]byte{0x32, 0x08, 0x00, 0x01, 'a', 0x00, 0x01, '{', '}', 'x'}) // PUBLISH QoS 1
	f.Add([]byte{0x90, 0x03, 0x00, 0x01, 0x01})                           // SUBACK
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0xff})                           // malformed length
	f.Add([]byte{0x32, 0x02, 0x00, 0x09})                                 // truncated topic
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReader(bytes.NewReader(data))
		for {
			first, err := r.ReadByte()
			if err != nil {
				return
			}
			p, err := readPacket(r, first)
			if err != nil {
				return
			}
			if len(p.body) > maxPacketSize {
				t.Fatalf("packet body of %d bytes passed the %d cap", len(p.body), maxPacketSize)
			}
			if p.kind == pktPublish {
				_, _, _, _ = parsePublish(p)
			}
			_ = parseConnack(p)
			_, _ = packetID(p)
		}
	})
}
