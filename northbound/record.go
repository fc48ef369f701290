package northbound

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"appliance/fleet"
)

// Message is one upstream message as the node keeps it: what the device's
// hub sent (fleet.UpstreamMessage), which device sent it, when this node
// received it, and its offset in the node's retention log.
type Message struct {
	Offset   uint64
	Received time.Time
	DeviceID string
	fleet.UpstreamMessage
}

// A record (one frame's payload) is
//
//	0x01                      version
//	varint  received time, Unix milliseconds
//	string  device id         (uvarint length, bytes)
//	bytes   a fleet upstream batch holding exactly this message
//
// so that the message itself is read by the fuzzed fleet decoder, and the
// device and module (all a topic match needs) sit at the front.
const recordVersion = 1

var errRecord = errors.New("malformed record")

func encodeRecord(dst []byte, received time.Time, deviceID string, m *fleet.UpstreamMessage) []byte {
	dst = append(dst, recordVersion)
	dst = binary.AppendVarint(dst, received.UnixMilli())
	dst = binary.AppendUvarint(dst, uint64(len(deviceID)))
	dst = append(dst, deviceID...)
	dst = fleet.UpstreamBatchHeader(dst, 1)
	return fleet.AppendUpstreamMessage(dst, m)
}

// decodeRecord parses a whole record; the message's fields alias p.
func decodeRecord(off uint64, p []byte) (Message, error) {
	h, err := recordHeader(p)
	if err != nil {
		return Message{}, err
	}
	b, err := fleet.DecodeUpstreamBatch(p[h.batch:])
	if err != nil {
		return Message{}, fmt.Errorf("%w at offset %d: %v", errRecord, off, err)
	}
	if len(b.Messages) != 1 {
		return Message{}, fmt.Errorf("%w at offset %d: %d messages", errRecord, off, len(b.Messages))
	}
	return Message{Offset: off, Received: h.received, DeviceID: h.device, UpstreamMessage: b.Messages[0]}, nil
}

type header struct {
	received time.Time
	device   string
	module   string
	batch    int // where the batch starts
}

// recordHeader reads the received time, the device and the module without
// decoding the rest.
func recordHeader(p []byte) (header, error) {
	var h header
	if len(p) < 1 || p[0] != recordVersion {
		return h, fmt.Errorf("%w: version", errRecord)
	}
	i := 1
	ms, n := binary.Varint(p[i:])
	if n <= 0 {
		return h, fmt.Errorf("%w: time", errRecord)
	}
	i += n
	dev, n := lenString(p[i:])
	if n <= 0 {
		return h, fmt.Errorf("%w: device", errRecord)
	}
	i += n
	h.received, h.device, h.batch = time.UnixMilli(ms).UTC(), dev, i
	// The batch: magic and version (5 bytes), count, seq, module.
	j := i + 5
	if j > len(p) {
		return h, fmt.Errorf("%w: batch", errRecord)
	}
	for k := 0; k < 2; k++ { // count, seq
		_, n := binary.Uvarint(p[j:])
		if n <= 0 {
			return h, fmt.Errorf("%w: batch", errRecord)
		}
		j += n
	}
	mod, n := lenString(p[j:])
	if n <= 0 {
		return h, fmt.Errorf("%w: module", errRecord)
	}
	h.module = mod
	return h, nil
}

func lenString(p []byte) (string, int) {
	l, n := binary.Uvarint(p)
	if n <= 0 || l > uint64(len(p)-n) || !utf8.Valid(p[n:n+int(l)]) {
		return "", 0
	}
	return string(p[n : n+int(l)]), n + int(l)
}
