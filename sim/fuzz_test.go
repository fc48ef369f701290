package sim

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReadPacket feeds arbitrary bytes, as a broker could send them, to the
// simulator's MQTT packet reader and PUBLISH parser: they must never panic,
// nor allocate beyond the packet size cap. The seed corpus is committed in
// testdata/fuzz/FuzzReadPacket.
func FuzzReadPacket(f *testing.F) {
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
