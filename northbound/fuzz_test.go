package northbound

import (
	"strings"
	"testing"
	"time"

	"appliance/fleet"
)

// FuzzParseSubscription: whatever filter a consumer sends, the parser
// never panics, and a filter it accepts reads nothing outside the events
// tree: it matches no device id or module that would put a message
// outside appliance/events/, and a literal filter matches exactly its
// own topic.
func FuzzParseSubscription(f *testing.F) {
	for _, s := range []string{"appliance/events/#", "$share/g/appliance/events/+/m", "appliance/devices/x/desired", "#", "+/events/#",
		"appliance/events/a/#/b", "appliance/events/a+/b", "$share//appliance/events/#", "appliance/events/d/m/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		group, sf, err := parseSubscription(raw)
		if err != nil {
			return
		}
		if strings.ContainsAny(group, "+#/") || !strings.HasPrefix(sf.text, fleet.EventsTopicPrefix) {
			t.Fatalf("accepted %q: group %q filter %q", raw, group, sf.text)
		}
		if !strings.ContainsAny(sf.text, "+#") && len(sf.levels) == 2 && !strings.ContainsAny(sf.levels[0], "/") {
			if !sf.matches(sf.levels[0], sf.levels[1]) && sf.levels[1] != "$none" && fleet.ModuleTopicLevel(sf.levels[1]) == sf.levels[1] {
				t.Fatalf("literal filter %q does not match its own topic", sf.text)
			}
		}
	})
}

// FuzzRecordHeader: a record that is not one (a damaged file that passed
// its checksum by chance) is refused or read, never a panic, and what
// encodeRecord writes reads back.
func FuzzRecordHeader(f *testing.F) {
	m := fleet.UpstreamMessage{Seq: 7, Module: "plc", Output: "o", EnqueuedTime: time.UnixMilli(1), Body: []byte("x"),
		Properties: []fleet.Property{{Name: "a", Value: "b"}}}
	f.Add(encodeRecord(nil, time.UnixMilli(5), "press-01", &m))
	f.Add([]byte{1, 0, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, p []byte) {
		h, err := recordHeader(p)
		if err != nil {
			return
		}
		msg, err := decodeRecord(0, p)
		if err == nil && (msg.DeviceID != h.device || msg.Module != h.module) {
			t.Fatalf("header %+v, record %+v", h, msg)
		}
	})
}
