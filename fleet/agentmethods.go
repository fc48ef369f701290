package fleet

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Remote troubleshooting: the direct methods the agent itself answers,
// called on module EdgeAgentModule through the device's session like any
// module's method (MethodRequest). GetModuleLogs, RestartModule and ping
// are edgeAgent's, with its request and response shapes; GetSupportBundle
// is ours (Azure's UploadSupportBundle uploads to blob storage, which an
// air-gapped site has none of): the bundle is fetched in chunks by
// offset. Method names match without regard to case, as edgeAgent's do.
const (
	// EdgeAgentModule is the module name that addresses the agent.
	EdgeAgentModule = "$edgeAgent"

	MethodPing             = "ping"
	MethodGetModuleLogs    = "GetModuleLogs"
	MethodRestartModule    = "RestartModule"
	MethodGetSupportBundle = "GetSupportBundle"

	// AgentLogModule is the name GetModuleLogs gives the agent's own log
	// (the device hub logs there too), as edgeAgent's container is named.
	AgentLogModule = "edgeAgent"

	// MaxMethodResponsePayload caps the payload of the agent's answers,
	// as IoT Hub caps a direct method's (128 KB, with a margin).
	MaxMethodResponsePayload = 127000
	// SupportBundleChunk is the most of a bundle one GetSupportBundle
	// answer carries (base64 in the payload).
	SupportBundleChunk = 64 << 10

	// LogsSchemaVersion is the schemaVersion of the requests.
	LogsSchemaVersion = "1.0"
)

// Encodings and content types of GetModuleLogs.
const (
	LogsEncodingNone = "none"
	LogsEncodingGzip = "gzip"
	LogsContentText  = "text"
	LogsContentJSON  = "json"
)

// ModuleLogsRequest is GetModuleLogs' payload.
type ModuleLogsRequest struct {
	SchemaVersion string           `json:"schemaVersion"`
	Items         []LogRequestItem `json:"items"`
	// Encoding is "none" (default) or "gzip" (the payload then in
	// PayloadBytes, base64 of the gzipped logs).
	Encoding string `json:"encoding,omitempty"`
	// ContentType is "text" (default: the lines as the module wrote them)
	// or "json" (an array of ModuleLogMessage).
	ContentType string `json:"contentType,omitempty"`
}

// LogRequestItem selects modules by a regular expression on their names
// (unanchored, as edgeAgent's: "edge" matches edgeAgent and edgeHub) and
// filters their lines.
type LogRequestItem struct {
	ID     string          `json:"id"`
	Filter ModuleLogFilter `json:"filter"`
}

// ModuleLogFilter filters a module's lines. Since and Until are a duration
// back from now ("10m", "1d", "2 days 3 hours"), an RFC 3339 time or a
// Unix time in seconds (ParseLogTime). With both Since and Tail, the lines
// since are taken, then the last Tail of those.
type ModuleLogFilter struct {
	Tail  *int   `json:"tail,omitempty"`
	Since string `json:"since,omitempty"`
	Until string `json:"until,omitempty"`
	// LogLevel keeps the lines whose syslog level (from a "<N>" prefix,
	// the format IoT Edge recommends) is at most it; lines without one
	// count as 6 (informational).
	LogLevel *int `json:"loglevel,omitempty"`
	// Regex keeps the lines it matches.
	Regex string `json:"regex,omitempty"`
}

// ModuleLogsResponseItem is one module's logs in GetModuleLogs' answer
// (an array, one item per module matched).
type ModuleLogsResponseItem struct {
	ID string `json:"id"`
	// Payload holds the logs (encoding none): text lines, or the JSON
	// text of an array of ModuleLogMessage.
	Payload string `json:"payload,omitempty"`
	// PayloadBytes holds them gzipped (encoding gzip).
	PayloadBytes []byte `json:"payloadBytes,omitempty"`
	// Truncated (ours): more lines matched than the answer holds
	// (MaxMethodResponsePayload for all the items). The newest are kept,
	// or, when reading on from Since without Tail, the oldest: call again
	// from the last one's timestamp.
	Truncated bool `json:"truncated,omitempty"`
}

// ModuleLogMessage is one line in a "json" answer.
type ModuleLogMessage struct {
	IoTHub    string    `json:"iothub"`
	Device    string    `json:"device"`
	ID        string    `json:"id"`
	Stream    string    `json:"stream"`
	LogLevel  int       `json:"loglevel"`
	Text      string    `json:"text"`
	Timestamp time.Time `json:"timestamp"`
}

// RestartModuleRequest is RestartModule's payload: the module to stop and
// start again (a new process or container start; not counted as a
// failure).
type RestartModuleRequest struct {
	SchemaVersion string `json:"schemaVersion"`
	ID            string `json:"id"`
}

// SupportBundleRequest is GetSupportBundle's payload. Without ID the agent
// makes a new bundle (a zip: the agent's log, each module's logs since
// Since, its last report and desired document, every secret of the
// running deployment and anything that looks secret replaced by
// "<redacted>") and answers with its first chunk; with the ID of the
// answer, the chunk at Offset.
type SupportBundleRequest struct {
	SchemaVersion string `json:"schemaVersion"`
	Since         string `json:"since,omitempty"`
	Until         string `json:"until,omitempty"`
	ID            string `json:"id,omitempty"`
	Offset        int64  `json:"offset,omitempty"`
}

// SupportBundleChunkResponse is GetSupportBundle's answer.
type SupportBundleChunkResponse struct {
	ID string `json:"id"`
	// Size and SHA256 (hex) are the whole bundle's.
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// Offset is where Data starts; Data is at most SupportBundleChunk
	// bytes (base64 in JSON).
	Offset int64  `json:"offset"`
	Data   []byte `json:"data"`
}

// MethodErrorPayload is the payload of the agent's error answers (status
// 400, 404 or 500), as edgeAgent's.
type MethodErrorPayload struct {
	Message string `json:"message"`
}

// MethodErrorMessage returns the message of an error answer's payload, or
// the payload itself.
func MethodErrorMessage(payload json.RawMessage) string {
	var e MethodErrorPayload
	if json.Unmarshal(payload, &e) == nil && e.Message != "" {
		return e.Message
	}
	return strings.TrimSpace(string(payload))
}

// ParseLogTime reads the since and until of a logs filter: a duration back
// from now (Go's "90m", "1h30m", edgeAgent's "1d", "2 days 3 hours 2
// minutes"), an RFC 3339 time, or a Unix time in seconds (fractions
// allowed).
func ParseLogTime(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil && f >= 0 && !strings.ContainsAny(s, "eE") {
		sec, frac := splitUnix(s)
		return time.Unix(sec, frac).UTC(), nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	if d, ok := parseLongDuration(s); ok {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("%q is not a time: give a duration back from now (10m, 1h30m, 1d, \"2 days 3 hours\"), an RFC 3339 time or a Unix time", s)
}

// splitUnix splits "1765012345.123" into seconds and nanoseconds.
func splitUnix(s string) (int64, int64) {
	whole, frac, _ := strings.Cut(s, ".")
	sec, _ := strconv.ParseInt(whole, 10, 64)
	if len(frac) > 9 {
		frac = frac[:9]
	}
	frac += strings.Repeat("0", 9-len(frac))
	ns, _ := strconv.ParseInt(frac, 10, 64)
	return sec, ns
}

var longUnits = map[string]time.Duration{
	"s": time.Second, "sec": time.Second, "secs": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "mins": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hrs": time.Hour, "hour": time.Hour, "hours": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
	"w": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
}

// parseLongDuration reads edgeAgent's durations: numbers each followed by
// a unit, spaces allowed ("1d", "2 days 3 hours", "90 minutes").
func parseLongDuration(s string) (time.Duration, bool) {
	var total time.Duration
	rs := []rune(strings.ToLower(s))
	i, parts := 0, 0
	for i < len(rs) {
		for i < len(rs) && unicode.IsSpace(rs[i]) {
			i++
		}
		if i == len(rs) {
			break
		}
		j := i
		for j < len(rs) && unicode.IsDigit(rs[j]) {
			j++
		}
		if j == i {
			return 0, false
		}
		n, err := strconv.Atoi(string(rs[i:j]))
		if err != nil {
			return 0, false
		}
		for j < len(rs) && unicode.IsSpace(rs[j]) {
			j++
		}
		k := j
		for k < len(rs) && unicode.IsLetter(rs[k]) {
			k++
		}
		unit, ok := longUnits[string(rs[j:k])]
		if !ok || time.Duration(n) > (math.MaxInt64-total)/unit {
			return 0, false // unknown, or beyond what a duration holds
		}
		total += time.Duration(n) * unit
		parts++
		i = k
		for i < len(rs) && (unicode.IsSpace(rs[i]) || rs[i] == ',') {
			i++
		}
	}
	return total, parts > 0
}

// LogLevelOf is the syslog level of a log line written as IoT Edge
// recommends ("<4> 2026-12-06 ... text"), or 6 (informational) without
// one.
func LogLevelOf(line string) int {
	if len(line) >= 3 && line[0] == '<' && line[2] == '>' && line[1] >= '0' && line[1] <= '7' {
		return int(line[1] - '0')
	}
	return 6
}
