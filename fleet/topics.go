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
	// TopicKindMessages: device → controller messages: the device hub's
	// upstream batches (UpstreamTopic) and direct method responses
	// (MethodResponseTopic), and anything else a device sends under
	// MessagesTopicPrefix (acknowledged and dropped).
	TopicKindMessages = "messages"
	// TopicKindMethods: controller → device, direct method requests for
	// the device's modules (MethodsTopic).
	TopicKindMethods = "methods"
)

// Names after MessagesTopicPrefix of the device hub's topics.
const (
	upstreamSuffix       = "upstream"
	methodResponseSuffix = "methodresponse"
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

// UpstreamTopic is where a device's agent publishes the messages its hub
// routed INTO $upstream: device → controller, QoS 1, one binary
// UpstreamBatch per PUBLISH (EncodeUpstreamBatch). The agent removes the
// batch's messages from its store-and-forward queue only after the PUBACK,
// so a controller must acknowledge a batch only once it holds it (it may
// see a batch again after a lost acknowledgement: UpstreamMessage.Seq tells
// duplicates). A controller that refuses a batch (PUBACK reason ≥ 0x80)
// gets it again later. The topic lies under MessagesTopicPrefix, which
// a device may publish to.
func UpstreamTopic(deviceID string) string {
	return MessagesTopicPrefix(deviceID) + upstreamSuffix
}

// MethodsTopic is where the controller sends a device direct method
// requests for its modules: controller → device, QoS 1, one JSON
// MethodRequest per PUBLISH. The agent subscribes to it (exactly this
// topic, no wildcard) on every connection, as it does to its desired
// topic. The agent answers every request it decodes, once, on
// MethodResponseTopic.
func MethodsTopic(deviceID string) string {
	return DeviceTopicPrefix + deviceID + "/" + TopicKindMethods
}

// MethodResponseTopic is where a device's agent publishes the answer to a
// MethodRequest: device → controller, QoS 1, one JSON MethodResponse per
// PUBLISH, under MessagesTopicPrefix.
func MethodResponseTopic(deviceID string) string {
	return MessagesTopicPrefix(deviceID) + methodResponseSuffix
}

// DeviceIDFromTopic splits a device topic into the device id and its kind
// (TopicKindDesired, TopicKindReported, TopicKindMessages or
// TopicKindMethods). ok is false for any other topic, for an id that
// ValidateDeviceID refuses (a wildcard level such as "+" or "#" included),
// and for desired, reported or methods topics with anything after the kind.
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
	case rest == TopicKindMethods:
		kind = TopicKindMethods
	case strings.HasPrefix(rest, TopicKindMessages+"/"):
		kind = TopicKindMessages
	default:
		return "", "", false
	}
	return id, kind, true
}
