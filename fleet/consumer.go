package fleet

import (
	"strings"
	"time"
)

// Consumer is a credential for the factory's own applications (an MES, a
// historian, a dashboard) to read the devices' upstream messages from the
// nodes' northbound MQTT listener: the MQTT username is the consumer's
// name, the password its key. A consumer may only subscribe to
// EventsTopicPrefix topics; it can publish nothing and read no device
// topic.
type Consumer struct {
	Name           string    `json:"name"`
	CreatedTimeUTC time.Time `json:"createdTimeUtc"`
	Etag           string    `json:"etag"`
	// KeyHash is HashKey of the key: enough to check a password, never
	// returned by a read.
	KeyHash string `json:"keyHash,omitempty"`
	// Key is set only in the response that created the consumer.
	Key string `json:"key,omitempty"`
}

// Public drops the key's digest.
func (c Consumer) Public() Consumer {
	c.KeyHash = ""
	return c
}

// MaxConsumerNameLength caps a consumer's name.
const MaxConsumerNameLength = 64

// ValidateConsumerName: 1 to 64 characters of lowercase letters, digits,
// '-', '_' and '.', starting with a letter or digit. The name is an MQTT
// username and appears in logs and metrics, so it is kept plain.
func ValidateConsumerName(name string) error {
	if name == "" {
		return Invalid("name", "must not be empty")
	}
	if len(name) > MaxConsumerNameLength {
		return Invalid("name", "is %d characters long; at most %d are allowed", len(name), MaxConsumerNameLength)
	}
	for i, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		case r >= 'A' && r <= 'Z':
			return Invalid("name", "must be lowercase; character %q at position %d is uppercase", r, i+1)
		default:
			return Invalid("name", "character %q at position %d is not allowed (lowercase letters, digits, and - _ . after the first)", r, i+1)
		}
	}
	return nil
}

// EventsTopicPrefix starts every northbound topic: a device's upstream
// message is published on EventsTopic(deviceId, moduleId).
const EventsTopicPrefix = "appliance/events/"

// EventsTopic is the northbound topic of a module's upstream messages.
// Device ids cannot hold '/', '+' or '#'; a module name that holds one
// is escaped (ModuleTopicLevel) so that it stays one topic level and
// never a wildcard.
func EventsTopic(deviceID, moduleID string) string {
	return EventsTopicPrefix + deviceID + "/" + ModuleTopicLevel(moduleID)
}

// ModuleTopicLevel makes a module name one literal MQTT topic level: '/',
// '+', '#' and NUL become '_', and an empty name "$none" (a message with
// no module: sent by the device itself).
func ModuleTopicLevel(module string) string {
	if module == "" {
		return "$none"
	}
	if !strings.ContainsAny(module, "/+#\x00") {
		return module
	}
	return strings.Map(func(r rune) rune {
		switch r {
		case '/', '+', '#', 0:
			return '_'
		}
		return r
	}, module)
}
