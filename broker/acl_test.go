package broker

import (
	"testing"

	"appliance/fleet"
)

func TestAllowed(t *testing.T) {
	const me = "press-01"
	tests := []struct {
		topic string
		write bool
		want  bool
	}{
		{fleet.DesiredTopic(me), false, true},
		{fleet.DesiredTopic(me), true, false}, // nobody but the controller writes desired state
		{fleet.ReportedTopic(me), true, true},
		{fleet.ReportedTopic(me), false, false},
		{fleet.MessagesTopicPrefix(me) + "temperature", true, true},
		{fleet.MessagesTopicPrefix(me) + "a/b/c", true, true},
		{fleet.MessagesTopicPrefix(me) + "#", false, false},
		{fleet.MethodsTopic(me), false, true},
		{fleet.MethodsTopic(me), true, false}, // only the controller sends method requests
		{fleet.MethodsTopic("press-02"), false, false},
		{fleet.MethodsTopic(me) + "/#", false, false},
		{fleet.UpstreamTopic(me), true, true},
		{fleet.MethodResponseTopic(me), true, true},
		{fleet.UpstreamTopic("press-02"), true, false},
		{fleet.DesiredTopic("press-02"), false, false},
		{fleet.ReportedTopic("press-02"), true, false},
		{fleet.MessagesTopicPrefix("press-02") + "x", true, false},
		{"appliance/#", false, false},
		{"#", false, false},
		{"+/#", false, false},
		{"appliance/devices/+/desired", false, false},
		{"appliance/devices/#", false, false},
		{"appliance/devices/press-01/#", false, false},
		{"appliance/devices/press-01/+", false, false},
		{"appliance/devices/press-01/desired/#", false, false},
		{"appliance/devices/press-01/desired/", false, false},
		{"appliance/devices/press-01", false, false},
		{"appliance/devices/press-01/messages", true, false},
		{"$share/g/appliance/devices/press-01/desired", false, false},
		{"$SYS/broker/clients/connected", false, false},
		{"Appliance/devices/press-01/desired", false, false},
		{"", false, false},
	}
	for _, tt := range tests {
		if got := allowed(me, tt.topic, tt.write); got != tt.want {
			t.Errorf("allowed(%q, %q, write=%v) = %v; want %v", me, tt.topic, tt.write, got, tt.want)
		}
	}
}

// fleet/topics.go is a leaf file owned with this package; its tests live here.
func TestDeviceIDFromTopic(t *testing.T) {
	tests := []struct {
		topic, id, kind string
		ok              bool
	}{
		{fleet.DesiredTopic("press-01"), "press-01", fleet.TopicKindDesired, true},
		{fleet.ReportedTopic("a.b_c:d=e@f$g'h"), "a.b_c:d=e@f$g'h", fleet.TopicKindReported, true},
		{fleet.MessagesTopicPrefix("x") + "t/1", "x", fleet.TopicKindMessages, true},
		{"appliance/devices/+/desired", "", "", false},
		{"appliance/devices/#", "", "", false},
		{"appliance/devices//desired", "", "", false},
		{"appliance/devices/x/desired/more", "", "", false},
		{"appliance/devices/x/other", "", "", false},
		{"appliance/devices/x", "", "", false},
		{"other/devices/x/desired", "", "", false},
	}
	for _, tt := range tests {
		id, kind, ok := fleet.DeviceIDFromTopic(tt.topic)
		if id != tt.id || kind != tt.kind || ok != tt.ok {
			t.Errorf("DeviceIDFromTopic(%q) = %q, %q, %v; want %q, %q, %v", tt.topic, id, kind, ok, tt.id, tt.kind, tt.ok)
		}
	}
}
