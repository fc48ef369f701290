package fleet

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sampleBatch() UpstreamBatch {
	at := time.UnixMilli(1_700_000_000_123).UTC()
	return UpstreamBatch{Messages: []UpstreamMessage{
		{Seq: 1, Module: "sensor", Output: "out1", EnqueuedTime: at,
			Properties:       []Property{{"alert", "true"}, {"site", "Plant 1 ü"}, {"empty", ""}},
			SystemProperties: []Property{{"messageId", "m-1"}, {"contentType", "application/json"}},
			Body:             []byte(`{"t": 21.5}`)},
		{Seq: 1 << 40, Module: "m", EnqueuedTime: at, Body: []byte{0, 1, 2, 0xff}},
		{Seq: 7, Module: "empty-body", EnqueuedTime: at},
	}}
}

func TestUpstreamBatch_RoundTrip(t *testing.T) {
	want := sampleBatch()
	data := EncodeUpstreamBatch(nil, want)
	got, err := DecodeUpstreamBatch(data)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want.Messages { // decoded empty bodies are empty, not nil
		if len(want.Messages[i].Body) == 0 {
			want.Messages[i].Body = got.Messages[i].Body
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded %+v\nwant %+v", got, want)
	}
	// Built message by message, the bytes are the same.
	built := UpstreamBatchHeader(nil, len(want.Messages))
	for i := range want.Messages {
		built = AppendUpstreamMessage(built, &want.Messages[i])
	}
	if !bytes.Equal(built, data) {
		t.Fatal("UpstreamBatchHeader + AppendUpstreamMessage differ from EncodeUpstreamBatch")
	}
	// A stored message (fields without the seq) decodes alone.
	m := want.Messages[0]
	fields, err := DecodeUpstreamFields(AppendUpstreamFields(nil, &m))
	m.Seq = 0
	if err != nil || !reflect.DeepEqual(fields, m) {
		t.Fatalf("DecodeUpstreamFields: %+v %v", fields, err)
	}
	if _, err := DecodeUpstreamFields(append(AppendUpstreamFields(nil, &m), 0)); !errors.Is(err, ErrUpstreamBatch) {
		t.Errorf("trailing byte after the fields: %v", err)
	}
	empty, err := DecodeUpstreamBatch(EncodeUpstreamBatch(nil, UpstreamBatch{}))
	if err != nil || len(empty.Messages) != 0 {
		t.Fatalf("empty batch: %+v %v", empty, err)
	}
}

func TestUpstreamBatch_Malformed(t *testing.T) {
	good := EncodeUpstreamBatch(nil, sampleBatch())
	tests := []struct {
		name string
		data []byte
		msg  string
	}{
		{"empty", nil, "magic"},
		{"json", []byte(`{"messages":[]}`), "magic"},
		{"version 2", append([]byte("APUB\x02"), good[5:]...), "version 2"},
		{"truncated", good[:len(good)-3], "message 2"},
		{"truncated body", func() []byte {
			one := EncodeUpstreamBatch(nil, UpstreamBatch{Messages: sampleBatch().Messages[:1]})
			return one[:len(one)-2]
		}(), "body of 11 bytes runs past the end"},
		{"trailing", append(append([]byte(nil), good...), 0), "after the last message"},
		{"huge count", []byte("APUB\x01\xff\xff\xff\xff\x0f"), "larger than the batch"},
		{"bad utf8 module", EncodeUpstreamBatch(nil, UpstreamBatch{Messages: []UpstreamMessage{{Module: "\xff"}}}), "module is not UTF-8"},
		{"bad utf8 property", EncodeUpstreamBatch(nil, UpstreamBatch{Messages: []UpstreamMessage{{Module: "m", Properties: []Property{{"k", "\xc3"}}}}}), "properties value is not UTF-8"},
	}
	for _, tt := range tests {
		_, err := DecodeUpstreamBatch(tt.data)
		if !errors.Is(err, ErrUpstreamBatch) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: %v; want an ErrUpstreamBatch saying %q", tt.name, err, tt.msg)
		}
	}
}

// FuzzDecodeUpstreamBatch: any bytes decode or fail cleanly, and what
// decodes encodes back to the same bytes. Seed corpus in
// testdata/fuzz/FuzzDecodeUpstreamBatch.
func FuzzDecodeUpstreamBatch(f *testing.F) {
	f.Add(EncodeUpstreamBatch(nil, sampleBatch()))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := DecodeUpstreamBatch(data)
		if err != nil {
			if !errors.Is(err, ErrUpstreamBatch) {
				t.Fatalf("error %v does not match ErrUpstreamBatch", err)
			}
			return
		}
		again := EncodeUpstreamBatch(nil, b)
		b2, err := DecodeUpstreamBatch(again)
		if err != nil || !reflect.DeepEqual(normalise(b), normalise(b2)) {
			t.Fatalf("re-encoded batch differs: %v", err)
		}
	})
}

// normalise makes empty slices nil, for comparison.
func normalise(b UpstreamBatch) UpstreamBatch {
	for i := range b.Messages {
		m := &b.Messages[i]
		if len(m.Body) == 0 {
			m.Body = nil
		}
		if len(m.Properties) == 0 {
			m.Properties = nil
		}
		if len(m.SystemProperties) == 0 {
			m.SystemProperties = nil
		}
	}
	if len(b.Messages) == 0 {
		b.Messages = nil
	}
	return b
}

func TestHubTopics(t *testing.T) {
	for _, tt := range []struct {
		topic, id, kind string
		ok              bool
	}{
		{UpstreamTopic("press-01"), "press-01", TopicKindMessages, true},
		{MethodResponseTopic("press-01"), "press-01", TopicKindMessages, true},
		{MethodsTopic("press-01"), "press-01", TopicKindMethods, true},
		{MethodsTopic("press-01") + "/x", "", "", false},
		{MethodsTopic("+"), "", "", false},
	} {
		id, kind, ok := DeviceIDFromTopic(tt.topic)
		if id != tt.id || kind != tt.kind || ok != tt.ok {
			t.Errorf("DeviceIDFromTopic(%q) = %q, %q, %v; want %q, %q, %v", tt.topic, id, kind, ok, tt.id, tt.kind, tt.ok)
		}
	}
	if got := UpstreamTopic("d"); got != "appliance/devices/d/messages/upstream" {
		t.Errorf("UpstreamTopic = %s", got)
	}
	if got := MethodsTopic("d"); got != "appliance/devices/d/methods" {
		t.Errorf("MethodsTopic = %s", got)
	}
}
