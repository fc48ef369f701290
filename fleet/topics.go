package fleet

import "strings"

// MQTT topics of the device protocol. Every topic of a device lives under
// DeviceTopicPrefix + deviceId + "/", so that one prefix check tells whose a
// topic is. Device ids cannot contain '/', '+' or '#' (see ValidateDeviceID),
// so an id is always exactly one topic level and never a wildcard.
const (
	// DeviceTopicPrefix starts every device topic.
	DeviceTopicPrefix = "appliance/devices/"

	// TopicKindDesired: controller → device, the device's desired document.
	TopicKindDesired = "desired"
	// TopicKindReported: device → controller, the device's reported document.
	TopicKindReported = "reported"
	// TopicKindMessages: device → controller telemetry, for later routing.
	TopicKindMessages = "messages"
)

// DesiredTopic is where the controller sends a device its desired document.
func DesiredTopic(deviceID string) string {
	return DeviceTopicPrefix + deviceID + "/" + TopicKindDesired
}

// ReportedTopic is where a device publishes its reported document.
func ReportedTopic(deviceID string) string {
	return DeviceTopicPrefix + deviceID + "/" + TopicKindReported
}

// MessagesTopicPrefix starts every telemetry topic of a device; the device
// chooses what follows it.
func MessagesTopicPrefix(deviceID string) string {
	return DeviceTopicPrefix + deviceID + "/" + TopicKindMessages + "/"
}

// DeviceIDFromTopic splits a device topic into the device id and its kind
// (TopicKindDesired, TopicKindReported or TopicKindMessages). ok is false for
// any other topic, for an id that ValidateDeviceID refuses (a wildcard level
// such as "+" or "#" included), and for desired or reported topics with
// anything after the kind.
func DeviceIDFromTopic(topic string) (id, kind string, ok bool) {
	rest, found := strings.CutPrefix(topic, DeviceTopicPrefix)
	if !found {
		return "", "", false
	}
	id, rest, found = strings.Cut(rest, "/")
	if !found || ValidateDeviceID(id) != nil {
		return "", "", false
	}
	switch {
	case rest == TopicKindDesired:
		kind = TopicKindDesired
	case rest == TopicKindReported:
		kind = TopicKindReported
	case strings.HasPrefix(rest, TopicKindMessages+"/"):
		kind = TopicKindMessages
	default:
		return "", "", false
	}
	return id, kind, true
}
