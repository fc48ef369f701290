package sim

import (
	"bufio"
	"bytes"
	"errors"
	"testing"
)

func TestRemainingLength_RoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455} {
		b := appendRemainingLength(nil, n)
		got, err := readRemainingLength(bytes.NewReader(b))
		if err != nil || got != n {
			t.Errorf("%d encoded as % x decodes to %d, %v", n, b, got, err)
		}
	}
	if _, err := readRemainingLength(bytes.NewReader([]byte{0xff, 0xff, 0xff, 0xff, 0x01})); err == nil {
		t.Error("a five-byte remaining length was accepted")
	}
}

func read(t *testing.T, b []byte) packet {
	t.Helper()
	r := bufio.NewReader(bytes.NewReader(b))
	first, err := r.ReadByte()
	if err != nil {
		t.Fatal(err)
	}
	p, err := readPacket(r, first)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPackets_Encode(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want []byte
	}{
		{"connect", connectPacket("d1", "d1", "k", 60), []byte{
			0x10, 21, 0, 4, 'M', 'Q', 'T', 'T', 4, 0xc2, 0, 60, 0, 2, 'd', '1', 0, 2, 'd', '1', 0, 1, 'k'}},
		{"subscribe qos 1", subscribePacket(1, "a/b", 1), []byte{0x82, 8, 0, 1, 0, 3, 'a', '/', 'b', 1}},
		{"publish qos 1", publishPacket(0x0102, "t", []byte("{}")), []byte{0x32, 7, 0, 1, 't', 1, 2, '{', '}'}},
		{"puback", pubackPacket(0x0102), []byte{0x40, 2, 1, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !bytes.Equal(tt.got, tt.want) {
				t.Fatalf("got  % x\nwant % x", tt.got, tt.want)
			}
		})
	}
}

func TestParsePublish(t *testing.T) {
	topic, id, payload, err := parsePublish(read(t, publishPacket(7, "appliance/devices/x/desired", []byte(`{"version":3}`))))
	if err != nil || topic != "appliance/devices/x/desired" || id != 7 || string(payload) != `{"version":3}` {
		t.Fatalf("got %q %d %q %v", topic, id, payload, err)
	}
	// QoS 0: no packet id.
	topic, id, payload, err = parsePublish(read(t, []byte{0x30, 5, 0, 1, 't', 'h', 'i'}))
	if err != nil || topic != "t" || id != 0 || string(payload) != "hi" {
		t.Fatalf("qos 0: got %q %d %q %v", topic, id, payload, err)
	}
	for _, bad := range [][]byte{
		{0x32, 1, 0},               // truncated topic length
		{0x32, 3, 0, 5, 't'},       // topic longer than the packet
		{0x32, 4, 0, 1, 't', 1},    // truncated packet id
		{0x34, 5, 0, 1, 't', 0, 1}, // QoS 2
	} {
		if _, _, _, err := parsePublish(read(t, bad)); err == nil {
			t.Errorf("% x parsed", bad)
		}
	}
}

func TestParseConnack(t *testing.T) {
	if err := parseConnack(read(t, []byte{0x20, 2, 0, 0})); err != nil {
		t.Fatalf("accepted: %v", err)
	}
	for code, refused := range map[byte]bool{1: false, 2: false, 3: false, 4: true, 5: true} {
		err := parseConnack(read(t, []byte{0x20, 2, 0, code}))
		if err == nil || errors.Is(err, ErrRefused) != refused {
			t.Errorf("code %d: %v", code, err)
		}
	}
	if err := parseConnack(read(t, []byte{0x90, 3, 0, 1, 0})); err == nil {
		t.Error("a SUBACK was taken for a CONNACK")
	}
}

func TestReadPacket_TooLarge(t *testing.T) {
	b := append([]byte{0x30}, appendRemainingLength(nil, maxPacketSize+1)...)
	r := bufio.NewReader(bytes.NewReader(b))
	first, _ := r.ReadByte()
	if _, err := readPacket(r, first); err == nil {
		t.Fatal("an oversized packet was read")
	}
}
