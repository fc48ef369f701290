package fleet

import "time"

// The words of a deployment's status, a device's health and the fleet's
// overview: derived on the controller (package assign), shown by the API,
// the CLI and the dashboard.

// Status categories of a deployment's devices.
const (
	CategoryTargeted  = "targeted"  // the condition matches
	CategoryApplied   = "applied"   // targeted, and no higher-priority deployment wins
	CategoryHealthy   = "healthy"   // applied, code 200, every module that should run has run for the soak time
	CategoryUnhealthy = "unhealthy" // applied, and the agent failed or a module that should run does not
	CategorySoaking   = "soaking"   // applied, code 200, modules running but not yet for the soak time
	CategoryUnknown   = "unknown"   // applied, but no report for this deployment yet
	// Beside the health categories, counted separately: applied devices
	// out of contact for longer than the node's --offline-after (whatever
	// their last report said), and devices nothing targets that keep
	// running this deployment.
	CategoryOffline = "offline"
	CategoryKept    = "kept"
)

// Categories lists them in display order.
var Categories = []string{CategoryTargeted, CategoryApplied, CategoryHealthy, CategoryUnhealthy, CategorySoaking, CategoryUnknown, CategoryOffline, CategoryKept}

// DefaultOfflineAfter is how long a device may be out of contact (not
// connected to any node, nothing heard from it) before it counts as
// offline (serve --offline-after).
const DefaultOfflineAfter = 5 * time.Minute

// DefaultSoak is how long every module that should run must have been
// running before a device counts as healthy.
const DefaultSoak = 30 * time.Second

// Device health, in a device view and the overview: the category of the
// device under the deployment applied to it (the categories of a
// deployment's status), or HealthNone when no deployment applies.
const HealthNone = "none"

// HealthStates lists the device health values in display order.
var HealthStates = []string{CategoryHealthy, CategorySoaking, CategoryUnhealthy, CategoryUnknown, HealthNone}

// Deployment states in the overview. Each deployment is in exactly one.
const (
	StateHealthy    = "healthy"    // applies to devices, and all of them are healthy
	StateConverging = "converging" // some applied devices have not reported it, or are soaking; none unhealthy
	StateFailing    = "failing"    // at least one applied device is unhealthy
	StateSuperseded = "superseded" // targets devices, but deployments that precede it apply to all of them
	StateIdle       = "idle"       // targets no device
)

// DeploymentStates lists them in display order.
var DeploymentStates = []string{StateFailing, StateConverging, StateHealthy, StateSuperseded, StateIdle}

// Configuration statuses: a deployment's relation to one device, as in an
// Azure twin's "configurations" section.
const (
	StatusTargeted = "Targeted"
	StatusApplied  = "Applied"
)

// StatusCounts counts a deployment's devices per category.
type StatusCounts struct {
	Targeted  int `json:"targeted"`
	Applied   int `json:"applied"`
	Healthy   int `json:"healthy"`
	Unhealthy int `json:"unhealthy"`
	Soaking   int `json:"soaking"`
	Unknown   int `json:"unknown"`
	// Offline counts the applied devices out of contact (they are also in
	// one of the categories above); Kept the devices nothing targets that
	// keep running the deployment (not among the applied ones).
	Offline int `json:"offline"`
	Kept    int `json:"kept"`
}

// HistoryEvent is one entry of a deployment's or a device's history.
type HistoryEvent struct {
	Time  time.Time `json:"time"`
	Index uint64    `json:"index"` // the raft entry that caused it
	// Actor is who asked: "admin" for the operator API, "enrollment:<name>"
	// for a device that enrolled; empty for derived events.
	Actor string `json:"actor,omitempty"`
	// Kind: created, updated, deleted (deployments); assigned, "layer
	// added", "layer removed", "layer moved", reset, and module-restarted
	// (an operator's RestartModule) (devices).
	Kind string `json:"kind"`
	// What changed, in words an operator reads.
	What string `json:"what"`
	// Deployment is, for a device's assignment, the deployment it now
	// applies ("" for none) and From the one before.
	Deployment string `json:"deployment,omitempty"`
	From       string `json:"from,omitempty"`
	// Layer is, for a change of the device's layers, the layered
	// deployment merged, taken out or reordered.
	Layer string `json:"layer,omitempty"`
}

// HistoryModuleRestarted is the Kind of a device's event recorded when an
// operator restarted one of its modules (the RestartModule direct method,
// answered 200).
const HistoryModuleRestarted = "module-restarted"

// RecentEvent is a deployment's history event with the deployment it is
// about.
type RecentEvent struct {
	Subject string `json:"subject"`
	HistoryEvent
}

// Kept describes a device no deployment applies to: it keeps what it last
// ran, until a deployment targets it again or an operator resets it.
type Kept struct {
	// Deployment and Layers are what it last reported running ("" for
	// nothing), at Version.
	Deployment string   `json:"deployment,omitempty"`
	Layers     []string `json:"layers,omitempty"`
	Version    uint64   `json:"version,omitempty"`
	// ResetPending: an operator reset it and it has not taken the empty
	// document yet.
	ResetPending bool `json:"resetPending,omitempty"`
	// Note says it in words: "no deployment targets this device; keeping
	// presses-v1 v12".
	Note string `json:"note"`
}

// Dry runs: what a write of a deployment would do to a device.
const (
	// PreviewStart: it runs no deployment now and would run this one (a
	// layer: its base would get this layer merged).
	PreviewStart = "start"
	// PreviewSwitch: it would switch to this deployment from another.
	PreviewSwitch = "switch"
	// PreviewLeave: it runs this deployment now and would run another
	// one (a layer: this layer's modules and routes would leave its
	// document).
	PreviewLeave = "leave"
	// PreviewKeep: it runs this deployment now, nothing would target it
	// any more, and it would keep running it.
	PreviewKeep = "keep"
	// PreviewNoBase: a layer would target it, but no base deployment
	// does: nothing would change on it.
	PreviewNoBase = "noBase"
)

// PreviewCategories lists them in display order.
var PreviewCategories = []string{PreviewStart, PreviewSwitch, PreviewLeave, PreviewKeep, PreviewNoBase}

// PreviewDevice is one device a write would concern: its applied
// deployment now (From) and after (To), "" for none.
type PreviewDevice struct {
	ID       string `json:"deviceId"`
	Category string `json:"category"`
	From     string `json:"from,omitempty"`
	To       string `json:"to,omitempty"`
}
