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
// the first (releases up to commit db9fcc5 wrote none).
const DocumentSchema = "1.1"

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
	SchemaVersion      string                  `json:"schemaVersion,omitempty"`
	LastDesiredVersion uint64                  `json:"lastDesiredVersion"`
	LastDesiredStatus  DesiredStatus           `json:"lastDesiredStatus"`
	DeviceHealth       string                  `json:"deviceHealth,omitempty"` // healthy or unhealthy
	Version            string                  `json:"version,omitempty"`      // the agent's build
	Runtime            ReportedRuntime         `json:"runtime"`
	SystemModules      map[string]ModuleStatus `json:"systemModules,omitempty"`
	Modules            map[string]ModuleStatus `json:"modules"`
	// DeploymentID is the deployment whose content the agent runs.
	DeploymentID string `json:"deploymentId,omitempty"`
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
