package fleet

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// DocumentSchema is the schema version of the desired and reported
// documents this build writes, "major.minor". Readers ignore fields they
// do not know, so a document of a newer minor (fields added) is read as
// far as it is understood: agents and controllers of adjacent releases
// work together. A new major would mean a change an older reader cannot
// follow: an agent refuses a desired document of a major it does not know
// (StatusCodeInvalidSchema). A document without schemaVersion is "1.0",
// the first (releases up to commit db9fcc5 wrote none). 1.2 added the
// desired document's layers and the report's layers,
// lastDesiredDeploymentId and lastDesiredLayers.
const DocumentSchema = "1.2"

// DesiredDocument is what the controller sends a device on its desired
// topic: the modules content of the deployment that applies to it.
type DesiredDocument struct {
	// SchemaVersion is the document's schema (DocumentSchema when written).
	SchemaVersion string `json:"schemaVersion,omitempty"`
	// Version only grows for a device: it is the raft index of the change
	// that gave the device this document (or, after a controller restart,
	// the index the controller had then). An agent ignores a document whose
	// version is lower than the one it runs.
	Version uint64 `json:"version"`
	// DeploymentID is the deployment that applies; "" means none applies and
	// the device should run no modules (an explicit empty desired state).
	DeploymentID string `json:"deploymentId"`
	// Layers are the layered deployments merged on DeploymentID's content
	// (lowest priority first); ModulesContent is then the merge
	// (MergeLayers), a whole manifest like any other.
	Layers []string `json:"layers,omitempty"`
	// ModulesContent is the deployment's content.modulesContent, secrets
	// (registry credentials) included: it goes only to this device.
	ModulesContent json.RawMessage `json:"modulesContent,omitempty"`
}

// Codes of ReportedDocument.LastDesiredStatus, as edgeAgent reports them.
const (
	StatusCodeOK                 = 200 // applied
	StatusCodeInvalid            = 400 // the desired document is invalid
	StatusCodeConfigEmpty        = 406 // device offline or not reporting (set by the controller, never by an agent)
	StatusCodeInvalidSchema      = 412 // schema version not supported
	StatusCodeUnsupportedRuntime = 417 // the runtime cannot run this
	StatusCodeFailed             = 500 // applying failed
)

// Module runtime statuses, as edgeAgent reports them.
const (
	RuntimeUnknown   = "unknown"
	RuntimeBackoff   = "backoff"
	RuntimeRunning   = "running"
	RuntimeUnhealthy = "unhealthy"
	RuntimeStopped   = "stopped"
	RuntimeFailed    = "failed"
	RuntimeDead      = "dead"
)

// ReportedDocument is what a device's agent publishes on its reported
// topic, modelled on edgeAgent's reported properties.
type ReportedDocument struct {
	// SchemaVersion is the document's schema (DocumentSchema when written).
	SchemaVersion      string        `json:"schemaVersion,omitempty"`
	LastDesiredVersion uint64        `json:"lastDesiredVersion"`
	LastDesiredStatus  DesiredStatus `json:"lastDesiredStatus"`
	// LastDesiredDeploymentID and LastDesiredLayers name the document
	// LastDesiredVersion and LastDesiredStatus are about, refused or not
	// (DeploymentID and Layers name the one that runs, which after a
	// refusal is the one before). Agents before schema 1.2 leave them out.
	LastDesiredDeploymentID string                  `json:"lastDesiredDeploymentId,omitempty"`
	LastDesiredLayers       []string                `json:"lastDesiredLayers,omitempty"`
	DeviceHealth            string                  `json:"deviceHealth,omitempty"` // healthy or unhealthy
	Version                 string                  `json:"version,omitempty"`      // the agent's build
	Runtime                 ReportedRuntime         `json:"runtime"`
	SystemModules           map[string]ModuleStatus `json:"systemModules,omitempty"`
	Modules                 map[string]ModuleStatus `json:"modules"`
	// DeploymentID is the deployment whose content the agent runs, and
	// Layers the layered deployments merged on it (the desired document's,
	// echoed): together they say which document the report is about.
	DeploymentID string   `json:"deploymentId,omitempty"`
	Layers       []string `json:"layers,omitempty"`
	// Hub is the device hub's state ($edgeHub's reported properties);
	// absent from agents without a hub.
	Hub *HubStatus `json:"hub,omitempty"`
	// ModuleTwins holds each module's reported properties, by module name:
	// the JSON object the module built with its twin PATCHes, "$version"
	// included (it rises with every PATCH). Absent when no module has
	// reported anything. The whole map is capped at MaxModuleTwinsReport
	// bytes: a module whose properties do not fit is listed as
	// {"$version": N, "$omitted": "<why>"}.
	ModuleTwins map[string]json.RawMessage `json:"moduleTwins,omitempty"`
}

// Limits of the device hub's reports.
const (
	// MaxModuleTwinReported caps one module's reported properties (Azure's
	// twin limit): a PATCH that would make them larger is refused.
	MaxModuleTwinReported = 32 << 10
	// MaxModuleTwinDepth is how many levels a module's reported properties
	// may nest below their own object (Azure's twin limit, 10): a deeper
	// PATCH is refused.
	MaxModuleTwinDepth = 10
	// MaxModuleTwinsReport caps ReportedDocument.ModuleTwins as a whole, so
	// that a report stays under the broker's report size limit.
	MaxModuleTwinsReport = 32 << 10
	// MaxReportDepth caps how deeply a reported document nests objects and
	// arrays (the agent's reports nest about 10 deep: module twins within
	// Azure's own depth limit of 10). A report is carried further inside
	// other JSON (the raft entry, the stored wrapper, the API's answers),
	// and one nested near encoding/json's limit (10,000) is valid alone
	// but not there: stored, the device's page could not be read.
	MaxReportDepth = 64
)

// NestingDepth is how deeply the JSON value b nests objects and arrays (0:
// a scalar). b is taken to be valid JSON: brackets inside strings are not
// counted.
func NestingDepth(b []byte) int {
	depth, deepest, inString, escaped := 0, 0, false, false
	for _, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
			deepest = max(deepest, depth)
		case c == '}' || c == ']':
			depth--
		}
	}
	return deepest
}

// HubStatus is the device hub's reported state.
type HubStatus struct {
	// Status is "running", or "failed" when the hub cannot serve (its
	// listener cannot bind, its store cannot open): Description says why.
	Status      string `json:"status"`
	Description string `json:"description,omitempty"`
	// Routes is how many routes of the running deployment the hub applies.
	Routes int `json:"routes"`
	// Clients are the modules' connections, by module name.
	Clients map[string]HubClient `json:"clients,omitempty"`
	// Queued is how many messages wait in the store-and-forward queues, of
	// QueuedBytes bytes, as last counted (reports are not sent for every
	// change of these).
	Queued      uint64 `json:"queued"`
	QueuedBytes uint64 `json:"queuedBytes"`
	// Expired and Dropped count, since the agent started, the messages the
	// hub removed unsent: past their time to live, or the oldest ones when
	// the store was full.
	Expired uint64 `json:"expired"`
	Dropped uint64 `json:"dropped"`
}

// HubClient is one module's connection to the device hub.
type HubClient struct {
	Status                  string     `json:"status"` // connected or disconnected
	LastConnectedTimeUTC    *time.Time `json:"lastConnectedTimeUtc,omitempty"`
	LastDisconnectedTimeUTC *time.Time `json:"lastDisconnectedTimeUtc,omitempty"`
}

// MethodRequest is a direct method call for one of a device's modules,
// sent by the controller on MethodsTopic (JSON, QoS 1). The agent's hub
// delivers it to the module on $iothub/methods/POST/{method}/?$rid=...
// and answers with a MethodResponse carrying the same ID.
type MethodRequest struct {
	// ID identifies the request; the response echoes it. Unique per device
	// among the requests in flight.
	ID string `json:"id"`
	// Module and Method name the target: the module's name in the
	// deployment and the method the module registered.
	Module string `json:"module"`
	Method string `json:"method"`
	// Payload is any JSON value, passed to the module as it is (absent:
	// null).
	Payload json.RawMessage `json:"payload,omitempty"`
	// ResponseTimeoutSeconds is how long the hub waits for the module's
	// answer (Azure's responseTimeoutInSeconds: 5 to 300; 0 means 30).
	ResponseTimeoutSeconds int `json:"responseTimeoutInSeconds,omitempty"`
	// ConnectTimeoutSeconds is how long the hub waits for the module to be
	// connected and subscribed to methods (Azure's connectTimeoutInSeconds,
	// 0 to 300; 0: not at all).
	ConnectTimeoutSeconds int `json:"connectTimeoutInSeconds,omitempty"`
}

// Status codes of MethodResponse.Status the hub sets itself, as IoT Hub
// does; any other status is the module's own.
const (
	MethodStatusBadRequest   = 400 // the request is malformed (no id, module or method; payload not JSON)
	MethodStatusNotConnected = 404 // the module is not connected, or not subscribed to methods
	MethodStatusTimeout      = 504 // the module did not answer within the response timeout
)

// MethodResponse answers a MethodRequest, published by the agent on
// MethodResponseTopic (JSON, QoS 1).
type MethodResponse struct {
	ID string `json:"id"`
	// Status is the module's status code, or one of MethodStatus* when the
	// hub answers for it (Error then says why).
	Status int `json:"status"`
	// Payload is the module's answer: a JSON value (absent: none).
	Payload json.RawMessage `json:"payload,omitempty"`
	Error   string          `json:"error,omitempty"`
}

// DesiredStatus is the outcome of applying the last desired document.
type DesiredStatus struct {
	Code        int    `json:"code"`
	Description string `json:"description,omitempty"`
}

// ReportedRuntime describes the device's platform.
type ReportedRuntime struct {
	Platform Platform `json:"platform"`
}

// Platform is the device's OS and architecture (GOOS, GOARCH).
type Platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
}

// ModuleStatus is one module's state on a device.
type ModuleStatus struct {
	RuntimeStatus      string         `json:"runtimeStatus"`
	Status             string         `json:"status,omitempty"` // the desired status: running or stopped
	ExitCode           int            `json:"exitCode"`
	StatusDescription  string         `json:"statusDescription,omitempty"`
	LastStartTimeUTC   *time.Time     `json:"lastStartTimeUtc,omitempty"`
	LastExitTimeUTC    *time.Time     `json:"lastExitTimeUtc,omitempty"`
	LastRestartTimeUTC *time.Time     `json:"lastRestartTimeUtc,omitempty"`
	RestartCount       int            `json:"restartCount"`
	Settings           ModuleSettings `json:"settings"`
}

// ModuleSettings echoes what the module runs.
type ModuleSettings struct {
	Image string `json:"image,omitempty"`
}

// SchemaMajor is the major part of a schemaVersion: 1 for "", "1", "1.0",
// "1.7"; 0 for one that does not start with a number.
func SchemaMajor(v string) int {
	if v == "" {
		return 1
	}
	major, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(major)
	if err != nil || n < 0 {
		return 0
	}
	return n
}
