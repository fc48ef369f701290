package api

import (
	"encoding/json"
	"time"

	"appliance/fleet"
)

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail says what went wrong: a machine code (bad_request,
// unauthorized, not_found, conflict, state_conflict, precondition_failed, unavailable,
// internal), a readable message, and the offending field when known.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// DeviceRequest is the body of PUT /devices/{id}. It takes back the
// object GET returned: deviceId (must equal the path), etag (acts as
// If-Match) and the read-only fields, which are ignored (keys included:
// a PUT never sets them).
type DeviceRequest struct {
	Tags   map[string]any `json:"tags,omitempty"`
	Status string         `json:"status,omitempty"`

	ID   string `json:"deviceId,omitempty"`
	Etag string `json:"etag,omitempty"`
	deviceReadOnly
}

// deviceReadOnly are DeviceView's fields a PUT ignores
// (TestRoundTrip_FieldsInSync keeps the list whole).
type deviceReadOnly struct {
	CreatedTimeUTC     ReadOnly `json:"createdTimeUtc,omitempty"`
	LastUpdatedTimeUTC ReadOnly `json:"lastUpdatedTimeUtc,omitempty"`
	Authentication     ReadOnly `json:"authentication,omitempty"`
	Enrollment         ReadOnly `json:"enrollment,omitempty"`
	ResetIndex         ReadOnly `json:"resetIndex,omitempty"`
	ResetTimeUTC       ReadOnly `json:"resetTimeUtc,omitempty"`
	Configurations     ReadOnly `json:"configurations,omitempty"`
	ConnectionState    ReadOnly `json:"connectionState,omitempty"`
	ConnectedNode      ReadOnly `json:"connectedNode,omitempty"`
	LastActivityTime   ReadOnly `json:"lastActivityTime,omitempty"`
	DesiredVersion     ReadOnly `json:"desiredVersion,omitempty"`
	Reported           ReadOnly `json:"reported,omitempty"`
	Health             ReadOnly `json:"health,omitempty"`
	Precedence         ReadOnly `json:"precedence,omitempty"`
	Document           ReadOnly `json:"document,omitempty"`
	Kept               ReadOnly `json:"kept,omitempty"`
	Presence           ReadOnly `json:"presence,omitempty"`
	LastContactTime    ReadOnly `json:"lastContactTime,omitempty"`
}

// DevicePatch is the body of PATCH /devices/{id}: Tags is a JSON merge
// patch (a null removes a tag); Status replaces when set.
type DevicePatch struct {
	Tags   map[string]any `json:"tags,omitempty"`
	Status string         `json:"status,omitempty"`
}

// ConfigurationStatus is a deployment's relation to one device, as in an
// Azure twin's "configurations" section.
type ConfigurationStatus struct {
	Status string `json:"status"` // Targeted or Applied
}

// Configuration statuses (fleet's words).
const (
	StatusTargeted = fleet.StatusTargeted
	StatusApplied  = fleet.StatusApplied
)

// DeviceView is a device as an operator reads it.
type DeviceView struct {
	fleet.Device
	// Configurations lists every deployment whose condition matches the
	// device; exactly one of them (if any) is Applied.
	Configurations map[string]ConfigurationStatus `json:"configurations"`
	// ConnectionState is Connected when the device holds an MQTT session
	// with any node of the cluster, else Disconnected (Azure's words). The
	// answering node knows its own sessions at once and asks its peers at
	// most once a second; a peer it cannot reach counts as holding none.
	ConnectionState string `json:"connectionState"`
	// ConnectedNode is the node holding the session.
	ConnectedNode string `json:"connectedNode,omitempty"`
	// LastActivityTime is when the device last sent anything to that node.
	LastActivityTime *time.Time `json:"lastActivityTime,omitempty"`
	// DesiredVersion is the version of the desired document the device
	// should run now.
	DesiredVersion uint64 `json:"desiredVersion"`
	// Reported is the device's last reported document, when it sent one.
	Reported *ReportedState `json:"reported,omitempty"`
	// Health is the device's category under the deployment applied to it
	// (healthy, soaking, unhealthy or unknown, as in that deployment's
	// status with the default soak), or "none" when none applies.
	Health string `json:"health"`
	// Precedence lists, in a single device's read only, the deployments
	// that target the device in precedence order (the first applies), each
	// with why it wins or loses.
	Precedence []PrecedenceEntry `json:"precedence,omitempty"`
	// Document says what the device's document is made of, in a single
	// device's read: its base deployment, the layered deployments merged
	// on it, and which deployment gave each module and route (absent when
	// no deployment applies).
	Document *fleet.Composition `json:"document,omitempty"`
	// Kept is set when no deployment applies: what the device keeps
	// running, and why ("no deployment targets this device; keeping X v12").
	Kept *fleet.Kept `json:"kept,omitempty"`
	// Presence is PresenceOnline (a session with some node),
	// PresenceDisconnected, or PresenceOffline (nothing heard from it for
	// longer than the node's --offline-after): shown beside Health, which
	// is what its last report said. LastContactTime is when it was last
	// heard from (a session's last bytes, its last report).
	Presence        string     `json:"presence"`
	LastContactTime *time.Time `json:"lastContactTime,omitempty"`
}

// Device presence.
const (
	PresenceOnline       = "online"
	PresenceDisconnected = "disconnected"
	PresenceOffline      = "offline"
)

// PrecedenceEntry is one deployment targeting a device, and why it applies
// or not: the highest priority wins, a tie goes to the most recently
// created, then to the smaller id.
type PrecedenceEntry struct {
	Deployment     string    `json:"deployment"`
	Status         string    `json:"status"` // Applied or Targeted
	Priority       int64     `json:"priority"`
	CreatedTimeUTC time.Time `json:"createdTimeUtc"`
	// DecidedBy is what ranks it against the one before (for the applied
	// one: against the one after): "priority", "created" or "id"; "" when
	// it is the only one.
	DecidedBy string `json:"decidedBy,omitempty"`
	// Reason says it in words.
	Reason string `json:"reason"`
	// Layered marks a layered deployment: it is merged on the applied
	// (base) deployment rather than competing with it.
	Layered bool `json:"layered,omitempty"`
}

// ReportedState is a device's last reported document and when it arrived.
type ReportedState struct {
	Document        json.RawMessage `json:"document"`
	ReceivedTimeUTC time.Time       `json:"receivedTimeUtc"`
}

// Connection states.
const (
	Connected    = "Connected"
	Disconnected = "Disconnected"
)

// DevicePage is one page of GET /devices.
type DevicePage struct {
	Items []DeviceView `json:"items"`
	// Next, when set, is passed as ?after= to get the next page.
	Next string `json:"next,omitempty"`
	// Total is how many devices the query selects in all (not given for a
	// prefix search).
	Total *int `json:"total,omitempty"`
}

// DeviceQuery selects devices for GET /devices.
type DeviceQuery struct {
	Condition string
	// Prefix keeps the devices whose id starts with it.
	Prefix     string
	After      string
	Limit      int
	Consistent bool
}

// DeploymentRequest is the body of PUT /deployments/{id}. It takes back
// the object GET returned: id (must equal the path), etag (acts as
// If-Match) and the read-only fields, which are ignored; the content a GET
// shows (secrets redacted) stands for the stored content.
type DeploymentRequest struct {
	Labels          map[string]string `json:"labels,omitempty"`
	Content         json.RawMessage   `json:"content"`
	TargetCondition string            `json:"targetCondition"`
	Priority        int64             `json:"priority"`
	Metrics         fleet.Metrics     `json:"metrics"`
	Layered         bool              `json:"layered,omitempty"`
	// Rollout, when set, makes the deployment reach its devices in waves
	// gated on their health (fleet.RolloutPolicy; defaults filled in).
	Rollout *fleet.RolloutPolicy `json:"rollout,omitempty"`

	ID   string `json:"id,omitempty"`
	Etag string `json:"etag,omitempty"`
	deploymentReadOnly
}

// deploymentReadOnly are DeploymentView's fields a PUT ignores
// (TestRoundTrip_FieldsInSync keeps the list whole).
type deploymentReadOnly struct {
	CreatedTimeUTC     ReadOnly `json:"createdTimeUtc,omitempty"`
	LastUpdatedTimeUTC ReadOnly `json:"lastUpdatedTimeUtc,omitempty"`
	SystemMetrics      ReadOnly `json:"systemMetrics,omitempty"`
	Warnings           ReadOnly `json:"warnings,omitempty"`
}

// DeploymentPatch is the body of PATCH /deployments/{id}. Only these parts
// of a deployment can change; a label or metric set to "" is removed.
type DeploymentPatch struct {
	TargetCondition *string           `json:"targetCondition,omitempty"`
	Priority        *int64            `json:"priority,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
	Metrics         *fleet.Metrics    `json:"metrics,omitempty"`
	// Rollout changes the fields of the rollout policy it sets (the soak,
	// thresholds, timeout and action; never the waves or the canary).
	Rollout *fleet.RolloutPolicy `json:"rollout,omitempty"`
	// Content is accepted only to refuse it with a clear error.
	Content json.RawMessage `json:"content,omitempty"`
}

// DeploymentView is a deployment as an operator reads it: secrets redacted,
// with the counts the node can derive at once.
type DeploymentView struct {
	fleet.Deployment
	SystemMetrics SystemMetrics `json:"systemMetrics"`
	// Warnings says what a layered deployment sets that its merge leaves
	// out (system modules, schema versions: the base provides them).
	Warnings []string `json:"warnings,omitempty"`
}

// SystemMetrics are Azure's system metrics of a deployment: the counts
// the node derives at once, and Azure's queries for all four (run as
// custom metrics, they count what GET /status counts).
type SystemMetrics struct {
	Results map[string]int    `json:"results"`
	Queries map[string]string `json:"queries,omitempty"`
}

// DeploymentPage is one page of GET /deployments.
type DeploymentPage struct {
	Items []DeploymentView `json:"items"`
	Next  string           `json:"next,omitempty"`
}

// DeploymentQuery selects deployments for GET /deployments.
type DeploymentQuery struct {
	Labels     map[string]string
	After      string
	Limit      int
	Consistent bool
}

// DryRunResult answers a write with ?dryRun=true: PUT (create), PATCH
// (update) or DELETE of a deployment. Nothing is changed.
type DryRunResult struct {
	// TargetedCount is how many devices the deployment would target
	// (after a DELETE: how many it targets now).
	TargetedCount int `json:"targetedCount"`
	// WouldApplyCount is how many it would apply to (0 after a DELETE).
	WouldApplyCount int `json:"wouldApplyCount"`
	// TargetedDevices and WouldApplyDevices are the first DryRunSample of
	// each, by id.
	TargetedDevices   []string `json:"targetedDevices"`
	WouldApplyDevices []string `json:"wouldApplyDevices"`
	// Moves groups the devices whose applied deployment would change, by
	// where they come from and go to, largest group first.
	Moves []DryRunMove `json:"moves"`
	// Waves is, for a deployment with a rollout policy, how many of the
	// devices it would apply to each wave would reach (the first wave
	// alone moves at once).
	Waves []fleet.WaveStatus `json:"waves,omitempty"`
	// Changes counts the devices by what the write would do to them
	// (fleet.PreviewCategories: start, switch, leave, keep, noBase).
	Changes map[string]int `json:"changes"`
	// Devices is one page of them, by id (only those of Category when
	// the request named one); Next is the ?after= of the next page.
	Category string         `json:"category,omitempty"`
	Devices  []DryRunDevice `json:"devices"`
	Next     string         `json:"next,omitempty"`
}

// Health is the body of /healthz and /readyz.
type Health struct {
	Status  string `json:"status"`
	NodeID  string `json:"nodeId"`
	Raft    string `json:"raftState"`
	Leader  string `json:"leader,omitempty"`
	Version string `json:"version"`
}

// WriteOptions carries the HTTP preconditions of a write.
type WriteOptions struct {
	IfMatch     string
	IfNoneMatch string
}

// DefaultPageSize and MaxPageSize bound list responses.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

// EnrollmentRequest is the body of PUT /enrollments/{name}.
type EnrollmentRequest struct {
	// Tags are given to every device that enrolls.
	Tags map[string]any `json:"tags,omitempty"`
}

// MemberRemoval answers DELETE /cluster/members/{id}: the node is out of
// the cluster, and what it held no longer works: the admin token and the
// join token were rotated (the new ones are here, and in every remaining
// node's files), and its certificate was revoked on every node.
type MemberRemoval struct {
	Removed            string `json:"removed"`
	AdminToken         string `json:"adminToken"`
	JoinToken          string `json:"joinToken"`
	CertificateRevoked bool   `json:"certificateRevoked"`
	// Fingerprint is the revoked certificate's SHA-256.
	Fingerprint string `json:"fingerprint,omitempty"`
	// Warning says what could not be done yet, and what to do.
	Warning string `json:"warning,omitempty"`
}

// RotateEnrollmentRequest is the body of POST /enrollments/{name}/rotate.
type RotateEnrollmentRequest struct {
	// RevokeDevices also clears the keys of every device the enrollment
	// registered: they cannot connect until given keys again (device keys
	// regenerate) or deleted (then they enroll anew with the new token).
	RevokeDevices bool `json:"revokeDevices,omitempty"`
}

// EnrollmentRotation answers a rotation: the enrollment with its new token
// (shown this once) and the devices whose keys were revoked.
type EnrollmentRotation struct {
	fleet.Enrollment
	RevokedDevices []string `json:"revokedDevices"`
}

// EnrollmentDeletion answers DELETE /enrollments/{name}?revokeDevices=true.
type EnrollmentDeletion struct {
	Name           string   `json:"name"`
	RevokedDevices []string `json:"revokedDevices"`
}

// EnrollmentPage lists enrollments (never their tokens).
type EnrollmentPage struct {
	Items []fleet.Enrollment `json:"items"`
}

// RegenerateKeyRequest is the body of POST /devices/{id}/keys/regenerate.
type RegenerateKeyRequest struct {
	// Key is "primary" or "secondary": the one to replace.
	Key string `json:"key"`
}

// Status categories of a deployment's devices (fleet's words; see there).
const (
	CategoryTargeted  = fleet.CategoryTargeted
	CategoryApplied   = fleet.CategoryApplied
	CategoryHealthy   = fleet.CategoryHealthy
	CategoryUnhealthy = fleet.CategoryUnhealthy
	CategorySoaking   = fleet.CategorySoaking
	CategoryUnknown   = fleet.CategoryUnknown
	CategoryOffline   = fleet.CategoryOffline
	CategoryKept      = fleet.CategoryKept
)

// Categories lists them in display order.
var Categories = fleet.Categories

// StatusQuery selects what GET /deployments/{id}/status returns.
type StatusQuery struct {
	// Soak is how long modules must have run to count as healthy (default 30 s).
	Soak time.Duration
	// Category, After and Limit page through one category's device ids.
	Category   string
	After      string
	Limit      int
	Consistent bool
}

// DeploymentStatus is where a deployment stands, derived from assignments
// and the devices' reports on the node that answers.
type DeploymentStatus struct {
	ID          string  `json:"id"`
	SoakSeconds float64 `json:"soakSeconds"`
	// SystemMetrics are Azure's: targetedCount, appliedCount,
	// reportedSuccessfulCount (code 200: applied, not necessarily still
	// running) and reportedFailedCount.
	SystemMetrics map[string]int `json:"systemMetrics"`
	// Counts are the operator's categories.
	Counts StatusCounts `json:"counts"`
	// Metrics counts, per custom metric query of the deployment, the
	// applied devices whose document (deviceId, tags,
	// properties.reported) matches it.
	Metrics map[string]int `json:"metrics"`
	// Devices holds one page of device ids per category; Next the ?after=
	// value of the following page, for categories that have one.
	Devices map[string][]string `json:"devices"`
	Next    map[string]string   `json:"next,omitempty"`
	// Reasons counts, per category, the devices by why they are in it
	// when it is not obvious: targeted devices it does not apply to
	// (another deployment applies; a layer with no base), unhealthy ones
	// (the agent's refusal with its code and description, a failed
	// module), unknown ones, kept ones.
	Reasons map[string]map[string]int `json:"reasons,omitempty"`
	// Layered marks a layered deployment's status: its devices are those
	// it is merged on, and its own modules decide their health.
	Layered bool `json:"layered,omitempty"`
	// OfflineAfterSeconds is how long a device may be out of contact
	// before it counts as offline.
	OfflineAfterSeconds float64 `json:"offlineAfterSeconds"`
	// SystemMetricQueries are Azure's queries for the four system
	// metrics, in Azure's words; run as custom metrics they give the same
	// counts.
	SystemMetricQueries map[string]string `json:"systemMetricQueries,omitempty"`
}

// StatusCounts counts a deployment's devices per category.
type StatusCounts = fleet.StatusCounts

// HistoryEvent is one entry of a deployment's or a device's history.
type HistoryEvent = fleet.HistoryEvent

// HistoryPage is the body of GET /deployments/{id}/history and
// /devices/{id}/history: newest first.
type HistoryPage struct {
	Items []HistoryEvent `json:"items"`
}

// ClusterMember is one raft member.
type ClusterMember struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	Voter   bool   `json:"voter"`
	Leader  bool   `json:"leader"`
	// Status is MemberUp, or MemberDown: it did not answer the node that
	// lists the members, or the leader's heartbeats to it fail.
	Status string `json:"status,omitempty"`
	// State is its raft state (Leader, Follower, Candidate) as it
	// answered; empty when it did not.
	State string `json:"state,omitempty"`
	// LastContactSeconds is how long ago it and the leader last heard from
	// each other: what a follower that answered says, else the leader's
	// record of its heartbeats, else when it last answered this node;
	// absent for the leader itself and when nothing is known.
	LastContactSeconds *float64 `json:"lastContactSeconds,omitempty"`
	// Version, Commit and Commands say what it runs and can apply (for a
	// member that is down, Version is what it ran when it last answered).
	// Legacy marks a node of the release before nodes said so: Version is
	// then that release's commit and Commands its command types.
	Version  string `json:"version,omitempty"`
	Commit   string `json:"commit,omitempty"`
	Legacy   bool   `json:"legacy,omitempty"`
	Commands []int  `json:"commands,omitempty"`
	// DocumentSchema is the schema of the desired and reported documents
	// it writes.
	DocumentSchema string `json:"documentSchema,omitempty"`
	// ConnectedDevices is how many devices hold a session with it (its
	// appliance_devices_connected); absent when it is down or runs a
	// release that does not say. Devices that list every node spread over
	// them (see the agent's --server): a member far from its share has
	// lost devices to the others while it was away and is getting them
	// back.
	ConnectedDevices *int `json:"connectedDevices,omitempty"`
	// Error is why it is down.
	Error string `json:"error,omitempty"`
}

// ClusterMember statuses.
const (
	MemberUp   = "up"
	MemberDown = "down"
)

// ClusterView is the cluster as one node sees it.
type ClusterView struct {
	// Self is the id of the node that answered; State its raft state.
	Self  string `json:"self"`
	State string `json:"state"`
	// Leader is the leader's id, empty when none is known.
	Leader       string          `json:"leader"`
	Members      []ClusterMember `json:"members"`
	AppliedIndex uint64          `json:"appliedIndex"`
	CommitIndex  uint64          `json:"commitIndex"`
	// Term is the raft term this node is in: it grows by one (or more)
	// with every election, so a rise while nothing failed is a spurious
	// election.
	Term uint64 `json:"term"`
}
