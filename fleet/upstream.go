package fleet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"
)

// UpstreamMessage is one message a device's hub routed INTO $upstream.
type UpstreamMessage struct {
	// Seq is the hub's sequence number of the message: unique on the
	// device and never reused (it survives agent restarts), so a message
	// sent again after a lost acknowledgement carries the same Seq.
	// Messages of one route arrive in Seq order; routes of different
	// priorities interleave.
	Seq uint64
	// Module is the module that sent it ($connectionModuleId); Output the
	// output it sent it to, "" for none.
	Module string
	Output string
	// EnqueuedTime is when the hub accepted it (millisecond precision).
	EnqueuedTime time.Time
	// Properties are the application properties, in the order sent.
	Properties []Property
	// SystemProperties are the message's system properties, named as
	// routing conditions name them without '$': messageId, correlationId,
	// userId, contentType, contentEncoding, creationTime, ... (not the
	// connection's: Module and the device id say those).
	SystemProperties []Property
	// Body is the message as sent.
	Body []byte
}

// Property is a name and a value; both are valid UTF-8.
type Property struct {
	Name, Value string
}

// UpstreamBatch is the payload of one PUBLISH on UpstreamTopic.
type UpstreamBatch struct {
	Messages []UpstreamMessage
}

// Limits of an upstream batch. A hub refuses a message larger than
// MaxMessageSize (body plus properties), so one message always fits in a
// batch; the broker's packet size limit leaves room for MaxUpstreamBatchSize.
const (
	MaxMessageSize       = 256 << 10 // Azure IoT Hub's message limit
	MaxUpstreamBatchSize = MaxMessageSize + 4<<10
)

// The binary form of an UpstreamBatch, version 1 (integers are
// encoding/binary varints; a string or byte field is a uvarint length and
// that many bytes):
//
//	"APUB" 0x01                  magic and version
//	uvarint count                messages that follow
//	per message:
//	  uvarint seq
//	  string  module
//	  string  output
//	  varint  enqueued time, Unix milliseconds
//	  uvarint n, then n × (string name, string value)   application properties
//	  uvarint n, then n × (string name, string value)   system properties
//	  bytes   body
//
// Nothing may follow the last message.
var upstreamMagic = []byte{'A', 'P', 'U', 'B', 1}

// ErrUpstreamBatch matches every error DecodeUpstreamBatch returns.
var ErrUpstreamBatch = errors.New("malformed upstream batch")

// EncodeUpstreamBatch appends the binary form of b to dst.
func EncodeUpstreamBatch(dst []byte, b UpstreamBatch) []byte {
	dst = append(dst, upstreamMagic...)
	dst = binary.AppendUvarint(dst, uint64(len(b.Messages)))
	for i := range b.Messages {
		dst = AppendUpstreamMessage(dst, &b.Messages[i])
	}
	return dst
}

// AppendUpstreamMessage appends one message's binary form, for a writer
// that builds a batch as it goes: UpstreamBatchHeader, then each message.
func AppendUpstreamMessage(dst []byte, m *UpstreamMessage) []byte {
	return AppendUpstreamFields(binary.AppendUvarint(dst, m.Seq), m)
}

// AppendUpstreamFields appends a message's binary form without its Seq
// (module to body): a hub stores messages this way, keyed by their Seq, and
// builds a batch's message as uvarint(Seq) followed by the stored fields.
func AppendUpstreamFields(dst []byte, m *UpstreamMessage) []byte {
	dst = appendLenString(dst, m.Module)
	dst = appendLenString(dst, m.Output)
	dst = binary.AppendVarint(dst, m.EnqueuedTime.UnixMilli())
	for _, props := range [][]Property{m.Properties, m.SystemProperties} {
		dst = binary.AppendUvarint(dst, uint64(len(props)))
		for _, p := range props {
			dst = appendLenString(dst, p.Name)
			dst = appendLenString(dst, p.Value)
		}
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.Body)))
	return append(dst, m.Body...)
}

// UpstreamBatchHeader appends the start of a batch of count messages.
func UpstreamBatchHeader(dst []byte, count int) []byte {
	dst = append(dst, upstreamMagic...)
	return binary.AppendUvarint(dst, uint64(count))
}

func appendLenString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// UpstreamBatchCount reads how many messages a batch announces, from its
// header only; ok is false if payload does not start like a batch.
func UpstreamBatchCount(payload []byte) (n int, ok bool) {
	if len(payload) <= len(upstreamMagic) || string(payload[:len(upstreamMagic)]) != string(upstreamMagic) {
		return 0, false
	}
	v, k := binary.Uvarint(payload[len(upstreamMagic):])
	if k <= 0 || v > uint64(len(payload)) {
		return 0, false
	}
	return int(v), true
}

// DecodeUpstreamBatch parses the binary form. It refuses, with an error
// matching ErrUpstreamBatch that says where, anything but exactly one
// well-formed batch: a wrong magic or version, a length running past the
// end, a string that is not UTF-8, bytes after the last message. Bodies
// alias data.
func DecodeUpstreamBatch(data []byte) (UpstreamBatch, error) {
	d := decoder{buf: data}
	if len(data) < len(upstreamMagic) || string(data[:4]) != string(upstreamMagic[:4]) {
		return UpstreamBatch{}, fmt.Errorf("%w: not an upstream batch (no APUB magic)", ErrUpstreamBatch)
	}
	if data[4] != upstreamMagic[4] {
		return UpstreamBatch{}, fmt.Errorf("%w: version %d; this build reads version %d", ErrUpstreamBatch, data[4], upstreamMagic[4])
	}
	d.off = len(upstreamMagic)
	count := d.uvarint("message count")
	// Every message takes at least 7 bytes: no count can promise more.
	if d.err == nil && count > uint64(len(data)-d.off)/7 {
		d.fail("message count %d larger than the batch can hold", count)
	}
	var b UpstreamBatch
	if d.err == nil && count > 0 {
		b.Messages = make([]UpstreamMessage, 0, count)
	}
	for i := uint64(0); i < count && d.err == nil; i++ {
		seq := d.uvarint("seq")
		m := d.fields()
		m.Seq = seq
		if d.err != nil {
			d.err = fmt.Errorf("message %d: %w", i, d.err)
			break
		}
		b.Messages = append(b.Messages, m)
	}
	if d.err == nil && d.off != len(data) {
		d.fail("%d bytes after the last message", len(data)-d.off)
	}
	if d.err != nil {
		return UpstreamBatch{}, fmt.Errorf("%w: %v", ErrUpstreamBatch, d.err)
	}
	return b, nil
}

// DecodeUpstreamFields parses what AppendUpstreamFields wrote, and nothing
// more; Seq is left 0. Errors match ErrUpstreamBatch.
func DecodeUpstreamFields(data []byte) (UpstreamMessage, error) {
	d := decoder{buf: data}
	m := d.fields()
	if d.err == nil && d.off != len(data) {
		d.fail("%d bytes after the message", len(data)-d.off)
	}
	if d.err != nil {
		return UpstreamMessage{}, fmt.Errorf("%w: %v", ErrUpstreamBatch, d.err)
	}
	return m, nil
}

type decoder struct {
	buf []byte
	off int
	err error
}

// fields reads a message after its Seq.
func (d *decoder) fields() UpstreamMessage {
	var m UpstreamMessage
	m.Module = d.str("module")
	m.Output = d.str("output")
	m.EnqueuedTime = time.UnixMilli(d.varint("enqueued time")).UTC()
	m.Properties = d.props("properties")
	m.SystemProperties = d.props("system properties")
	m.Body = d.bytes("body")
	return m
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("at byte %d: %s", d.off, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.buf[d.off:])
	if n <= 0 {
		d.fail("bad %s", what)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) varint(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.buf[d.off:])
	if n <= 0 {
		d.fail("bad %s", what)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) bytes(what string) []byte {
	n := d.uvarint(what + " length")
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.buf)-d.off) {
		d.fail("%s of %d bytes runs past the end", what, n)
		return nil
	}
	b := d.buf[d.off : d.off+int(n) : d.off+int(n)]
	d.off += int(n)
	return b
}

func (d *decoder) str(what string) string {
	b := d.bytes(what)
	if d.err == nil && !utf8.Valid(b) {
		d.fail("%s is not UTF-8", what)
	}
	return string(b)
}

func (d *decoder) props(what string) []Property {
	n := d.uvarint(what + " count")
	if d.err == nil && n > uint64(len(d.buf)-d.off)/2 {
		d.fail("%s count %d larger than the batch can hold", what, n)
	}
	if d.err != nil || n == 0 {
		return nil
	}
	out := make([]Property, 0, n)
	for i := uint64(0); i < n && d.err == nil; i++ {
		out = append(out, Property{Name: d.str(what + " name"), Value: d.str(what + " value")})
	}
	return out
}
