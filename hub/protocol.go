package hub

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"appliance/fleet"
	"appliance/routing"
)

// IoT Hub's MQTT topics for modules, as azure-iot-device writes and reads
// them (iothub/pipeline/mqtt_topic_iothub.py) and edgeHub serves them
// (appsettings_hub.json's mqttTopicNameConversion):
//
//	devices/{d}/modules/{m}/messages/events/{bag}       module → hub: a message (telemetry, or to an output with $.on)
//	devices/{d}/modules/{m}/inputs/{input}/{bag}         hub → module: a message on one of its inputs
//	$iothub/twin/GET/?$rid={rid}                         module → hub: get the twin
//	$iothub/twin/PATCH/properties/reported/?$rid={rid}   module → hub: patch reported properties
//	$iothub/twin/res/{status}/?$rid={rid}[&$version={v}] hub → module: the answer to either
//	$iothub/twin/PATCH/properties/desired/?$version={v}  hub → module: a desired properties patch
//	$iothub/methods/POST/{method}/?$rid={rid}            hub → module: a direct method call
//	$iothub/methods/res/{status}/?$rid={rid}             module → hub: its answer
//
// A property bag is "k=v&k2=v2", each name and value percent-encoded;
// system properties have reserved names ($.mid, $.ct, ...).
const (
	filterTwinResponses = "$iothub/twin/res/#"
	filterTwinPatches   = "$iothub/twin/PATCH/properties/desired/#"
	filterMethods       = "$iothub/methods/POST/#"

	topicTwinGet        = "$iothub/twin/GET/"
	topicTwinReported   = "$iothub/twin/PATCH/properties/reported/"
	topicMethodResponse = "$iothub/methods/res/"
)

// moduleBase is the start of a module's own topics.
func moduleBase(device, module string) string {
	return "devices/" + device + "/modules/" + module
}

// inputsFilter is the subscription a module makes to receive its inputs.
func inputsFilter(device, module string) string {
	return moduleBase(device, module) + "/inputs/#"
}

// Inbound system properties: wire name → the name routing conditions use
// ($messageId, ...) and upstream batches carry. $.on is the output, kept
// apart. Any other name starting with "$." is reserved: a message that
// uses one is refused, so that a module cannot pose as another
// ($.cdid, $.cmid are the hub's).
var inboundSystem = map[string]string{
	"$.mid":    "messageId",
	"$.cid":    "correlationId",
	"$.uid":    "userId",
	"$.ct":     "contentType",
	"$.ce":     "contentEncoding",
	"$.exp":    "expiryTimeUtc",
	"$.ctime":  "creationTime",
	"$.schema": "messageSchema",
	"$.sub":    "componentName",
	"$.ifid":   "interfaceId",
	"$.to":     "to",
}

// outboundSystem is the order and wire names of the system properties
// written on a module's input topic (edgeHub's OutgoingSystemPropertiesMap);
// the connection's device and module follow as $.cdid and $.cmid.
var outboundSystem = []struct{ name, wire string }{
	{"messageId", "$.mid"}, {"correlationId", "$.cid"}, {"userId", "$.uid"},
	{"contentType", "$.ct"}, {"contentEncoding", "$.ce"}, {"expiryTimeUtc", "$.exp"},
	{"creationTime", "$.ctime"}, {"messageSchema", "$.schema"}, {"componentName", "$.sub"},
	{"to", "$.to"},
}

// maxProperties caps a message's property bag (application and system).
const maxProperties = 128

// errMalformedBag: a property bag the hub refuses.
var errMalformedBag = errors.New("malformed property bag")

// parseTelemetryTopic reads devices/{d}/modules/{m}/messages/events[/bag[/]]
// of the connection's own device and module. ok is false for any other
// topic; err is set for a telemetry topic whose bag is malformed.
func parseTelemetryTopic(topic, device, module string) (msg *fleet.UpstreamMessage, ok bool, err error) {
	rest, found := strings.CutPrefix(topic, moduleBase(device, module)+"/messages/events")
	if !found {
		return nil, false, nil
	}
	switch {
	case rest == "" || rest == "/":
		rest = ""
	case rest[0] != '/':
		return nil, false, nil // e.g. .../messages/eventsX
	default:
		rest = strings.TrimSuffix(rest[1:], "/")
	}
	if strings.Contains(rest, "/") {
		return nil, true, fmt.Errorf("%w: '/' in the property bag (names and values are percent-encoded)", errMalformedBag)
	}
	m := &fleet.UpstreamMessage{Module: module}
	if err := parseBag(rest, m); err != nil {
		return nil, true, err
	}
	return m, true, nil
}

// parseBag fills m's properties from a property bag: application
// properties in order, the known system properties by name, the output
// from $.on. Names and values are percent-decoded ('+' is a plus, as
// IoT Hub reads them) and must be UTF-8; a name must not be empty, appear
// twice (ignoring case, as routing reads names), or be a reserved "$."
// name the hub does not take.
func parseBag(bag string, m *fleet.UpstreamMessage) error {
	if bag == "" {
		return nil
	}
	pairs := strings.Split(bag, "&")
	if len(pairs) > maxProperties {
		return fmt.Errorf("%w: %d properties; at most %d", errMalformedBag, len(pairs), maxProperties)
	}
	seen := make(map[string]bool, len(pairs))
	for _, kv := range pairs {
		rawK, rawV, _ := strings.Cut(kv, "=")
		k, err := unescape(rawK)
		if err != nil {
			return fmt.Errorf("%w: name %q: %v", errMalformedBag, rawK, err)
		}
		v, err := unescape(rawV)
		if err != nil {
			return fmt.Errorf("%w: value of %q: %v", errMalformedBag, k, err)
		}
		if k == "" {
			return fmt.Errorf("%w: a property without a name", errMalformedBag)
		}
		low := strings.ToLower(k)
		if seen[low] {
			return fmt.Errorf("%w: property %q given twice", errMalformedBag, k)
		}
		seen[low] = true
		switch name, known := inboundSystem[k]; {
		case k == "$.on":
			m.Output = v
		case known:
			m.SystemProperties = append(m.SystemProperties, fleet.Property{Name: name, Value: v})
		case strings.HasPrefix(k, "$."):
			return fmt.Errorf("%w: %q is a reserved system property name", errMalformedBag, k)
		default:
			m.Properties = append(m.Properties, fleet.Property{Name: k, Value: v})
		}
	}
	return nil
}

// unescape percent-decodes s strictly: a '%' must start two hex digits,
// and the result must be UTF-8.
func unescape(s string) (string, error) {
	if !strings.Contains(s, "%") {
		if !utf8.ValidString(s) {
			return "", errors.New("not UTF-8")
		}
		return s, nil
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b = append(b, s[i])
			continue
		}
		if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			return "", fmt.Errorf("bad percent-escape at byte %d", i)
		}
		b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
		i += 2
	}
	if !utf8.Valid(b) {
		return "", errors.New("not UTF-8 once decoded")
	}
	return string(b), nil
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// escape percent-encodes everything but letters, digits and "-_.~", as
// azure-iot-device's urllib.parse.quote(s, safe="") does.
func escape(b *strings.Builder, s string) {
	const hexDigits = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
}

// inputTopic is the topic a message is delivered on to module's input:
// devices/{d}/modules/{m}/inputs/{input}/{bag}, the bag holding the
// application properties, then the system properties and the sender's
// $.cdid and $.cmid, as edgeHub writes them.
func inputTopic(device, module, input string, m *fleet.UpstreamMessage) string {
	var b strings.Builder
	b.Grow(64 + len(input) + 24*(len(m.Properties)+len(m.SystemProperties)))
	b.WriteString(moduleBase(device, module))
	b.WriteString("/inputs/")
	escape(&b, input)
	b.WriteByte('/')
	first := true
	pair := func(k, v string) {
		if !first {
			b.WriteByte('&')
		}
		first = false
		escape(&b, k)
		b.WriteByte('=')
		escape(&b, v)
	}
	for _, p := range m.Properties {
		pair(p.Name, p.Value)
	}
	for _, s := range outboundSystem {
		for _, p := range m.SystemProperties {
			if p.Name == s.name {
				pair(s.wire, p.Value)
			}
		}
	}
	pair("$.cdid", device)
	pair("$.cmid", m.Module)
	return b.String()
}

// routingMessage is what routes read of a message: its source, its
// application properties, its system properties with the connection's
// (connectionDeviceId, connectionModuleId, outputName, enqueuedTime).
func routingMessage(device string, m *fleet.UpstreamMessage) *routing.Message {
	source := "/messages/modules/" + m.Module
	if m.Output != "" {
		source += "/outputs/" + m.Output
	}
	props := make(map[string]string, len(m.Properties))
	for _, p := range m.Properties {
		props[p.Name] = p.Value
	}
	sys := make(map[string]string, len(m.SystemProperties)+4)
	for _, p := range m.SystemProperties {
		sys[p.Name] = p.Value
	}
	sys["connectionDeviceId"] = device
	sys["connectionModuleId"] = m.Module
	sys["connectionAuthMethod"] = `{"scope":"module","type":"sas","issuer":"iothub"}`
	if m.Output != "" {
		sys["outputName"] = m.Output
	}
	sys["enqueuedTime"] = m.EnqueuedTime.UTC().Format(time.RFC3339Nano)
	return &routing.Message{Source: source, Properties: props, SystemProperties: sys, Body: m.Body}
}

// requestID reads the $rid of a twin or method topic's query
// ("...?$rid=42"); ok is false if there is none.
func requestID(query string) (string, bool) {
	for _, kv := range strings.Split(query, "&") {
		k, v, _ := strings.Cut(kv, "=")
		if k == "$rid" && v != "" {
			rid, err := unescape(v)
			return rid, err == nil && rid != ""
		}
	}
	return "", false
}

// parseMethodResponse reads $iothub/methods/res/{status}/?$rid={rid}.
func parseMethodResponse(topic string) (status int, rid string, ok bool) {
	rest, found := strings.CutPrefix(topic, topicMethodResponse)
	if !found {
		return 0, "", false
	}
	code, query, found := strings.Cut(rest, "/?")
	if !found {
		return 0, "", false
	}
	status, err := strconv.Atoi(code)
	if err != nil || status < 0 || status > 999 {
		return 0, "", false
	}
	rid, ok = requestID(query)
	return status, rid, ok
}

// twinResponseTopic answers a twin request.
func twinResponseTopic(status int, rid string, version int64) string {
	var b strings.Builder
	b.WriteString("$iothub/twin/res/")
	b.WriteString(strconv.Itoa(status))
	b.WriteString("/?$rid=")
	escape(&b, rid)
	if version > 0 {
		b.WriteString("&$version=")
		b.WriteString(strconv.FormatInt(version, 10))
	}
	return b.String()
}

// desiredPatchTopic notifies a desired properties patch.
func desiredPatchTopic(version int64) string {
	return "$iothub/twin/PATCH/properties/desired/?$version=" + strconv.FormatInt(version, 10)
}

// methodRequestTopic calls a module's method.
func methodRequestTopic(method, rid string) string {
	var b strings.Builder
	b.WriteString("$iothub/methods/POST/")
	escape(&b, method)
	b.WriteString("/?$rid=")
	escape(&b, rid)
	return b.String()
}
