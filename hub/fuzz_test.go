package hub

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"appliance/fleet"
)

// FuzzParseTelemetryTopic feeds arbitrary topics to the parser of module
// messages and their property bags: it must never panic, refuse only with
// errMalformedBag, and what it accepts must be UTF-8 and survive being
// written back as a bag and read again. Seed corpus in
// testdata/fuzz/FuzzParseTelemetryTopic; longer runs:
// go test -run '^$' -fuzz FuzzParseTelemetryTopic -fuzztime 60s ./hub/
func FuzzParseTelemetryTopic(f *testing.F) {
	f.Add("devices/d/modules/m/messages/events/%24.on=out1&%24.mid=1&alert=true")
	f.Fuzz(func(t *testing.T, topic string) {
		m, ok, err := parseTelemetryTopic(topic, "d", "m")
		if !ok {
			if err != nil || m != nil {
				t.Fatalf("not a telemetry topic but %v %v", m, err)
			}
			return
		}
		if err != nil {
			if !errors.Is(err, errMalformedBag) {
				t.Fatalf("error %v is not errMalformedBag", err)
			}
			return
		}
		var parts []string
		var b strings.Builder
		for _, p := range m.Properties {
			if !utf8.ValidString(p.Name) || !utf8.ValidString(p.Value) || p.Name == "" {
				t.Fatalf("accepted property %q=%q", p.Name, p.Value)
			}
			b.Reset()
			escape(&b, p.Name)
			b.WriteByte('=')
			escape(&b, p.Value)
			parts = append(parts, b.String())
		}
		for _, p := range m.SystemProperties {
			for wire, name := range inboundSystem {
				if name == p.Name {
					b.Reset()
					escape(&b, wire)
					b.WriteByte('=')
					escape(&b, p.Value)
					parts = append(parts, b.String())
				}
			}
		}
		if m.Output != "" {
			b.Reset()
			b.WriteString("%24.on=")
			escape(&b, m.Output)
			parts = append(parts, b.String())
		}
		again, ok, err := parseTelemetryTopic("devices/d/modules/m/messages/events/"+strings.Join(parts, "&"), "d", "m")
		if !ok || err != nil {
			t.Fatalf("written back, the bag is refused: %v", err)
		}
		if !reflect.DeepEqual(norm(again.Properties), norm(m.Properties)) || again.Output != m.Output || len(again.SystemProperties) != len(m.SystemProperties) {
			t.Fatalf("round trip changed the message: %+v -> %+v", m, again)
		}
	})
}

func norm(p []fleet.Property) []fleet.Property {
	if len(p) == 0 {
		return nil
	}
	return p
}

// FuzzParseWALSegment feeds arbitrary segment contents to the reader of
// the write-ahead log: it must never panic, and whatever it returns must
// be what frames written by appendFrame hold, written back byte for byte.
// Seed corpus in testdata/fuzz/FuzzParseWALSegment; longer runs:
// go test -run '^$' -fuzz FuzzParseWALSegment -fuzztime 60s ./hub/
func FuzzParseWALSegment(f *testing.F) {
	q := &queue{name: "q/input/b/in1/0"}
	f.Add(appendFrame(nil, []*entry{{q: q, seq: 7, val: []byte("value")}, {q: &queue{name: "q/upstream/0"}, seq: 8, val: []byte("v")}}))
	f.Fuzz(func(t *testing.T, data []byte) {
		recs, _ := parseSegment(data)
		var again []byte
		for _, r := range recs {
			again = appendFrame(again, []*entry{{q: &queue{name: r.queue}, seq: r.seq, val: r.val}})
		}
		recs2, bad := parseSegment(again)
		if bad || !reflect.DeepEqual(recs, recs2) && len(recs) > 0 {
			t.Fatalf("records %+v written back read as %+v (bad %v)", recs, recs2, bad)
		}
	})
}
