package raftstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"appliance/fleet"
)

// CommandType is the first byte of every raft log entry. The numbering is
// append-only: a type, once released, keeps its number and meaning forever,
// because old log entries and snapshots are replayed by newer binaries.
type CommandType byte

const (
	_                   CommandType = iota // 0 is never used, so a zeroed entry is caught
	CmdPutDevice                           // 1: create or replace a device
	CmdPatchDevice                         // 2: merge tags / set status of a device
	CmdDeleteDevice                        // 3
	CmdPutDeployment                       // 4: create a deployment (content is immutable afterwards)
	CmdPatchDeployment                     // 5: change condition, priority, labels, metrics
	CmdDeleteDeployment                    // 6
	CmdPutReports                          // 7: a batch of devices' reported documents
	CmdPutEnrollment                       // 8: create an enrollment group
	CmdDeleteEnrollment                    // 9
	CmdSetAdminToken                       // 10: replace the operator API's admin token on every node
	CmdSetJoinToken                        // 11: replace the token new nodes join with, on every node
)

// Later command types carry explicit numbers, so that no edit of the list
// above can move them.
const (
	CmdRevokeNode              CommandType = 12 // deny a removed node's certificate on every node
	CmdRotateEnrollment        CommandType = 13 // give an enrollment a new token (the old one stops enrolling)
	CmdRevokeEnrollmentDevices CommandType = 14 // clear the keys of the devices an enrollment registered
	CmdBindNode                CommandType = 25 // record the certificate the cluster knows for a node
	CmdResetDevice             CommandType = 26 // a device no deployment targets runs nothing from then on
)

func (t CommandType) String() string {
	switch t {
	case CmdPutDevice:
		return "put-device"
	case CmdPatchDevice:
		return "patch-device"
	case CmdDeleteDevice:
		return "delete-device"
	case CmdPutDeployment:
		return "put-deployment"
	case CmdPatchDeployment:
		return "patch-deployment"
	case CmdDeleteDeployment:
		return "delete-deployment"
	case CmdPutReports:
		return "put-reports"
	case CmdPutEnrollment:
		return "put-enrollment"
	case CmdDeleteEnrollment:
		return "delete-enrollment"
	case CmdSetAdminToken:
		return "set-admin-token"
	case CmdSetJoinToken:
		return "set-join-token"
	case CmdRevokeNode:
		return "revoke-node"
	case CmdBindNode:
		return "bind-node"
	case CmdRotateEnrollment:
		return "rotate-enrollment"
	case CmdRevokeEnrollmentDevices:
		return "revoke-enrollment-devices"
	case CmdPutDeploymentRollout:
		return "put-deployment-rollout"
	case CmdPatchDeploymentRollout:
		return "patch-deployment-rollout"
	case CmdAdmitRollout:
		return "admit-rollout"
	case CmdRolloutAction:
		return "rollout-action"
	case CmdPutConsumer:
		return "put-consumer"
	case CmdDeleteConsumer:
		return "delete-consumer"
	case CmdResetDevice:
		return "reset-device"
	case CmdImportDevices:
		return "import-devices"
	case CmdFinishImport:
		return "finish-import"
	}
	return fmt.Sprintf("command(%d)", byte(t))
}

// Command is one typed state change. Everything Apply needs travels inside
// it, the wall-clock time included, so that every node applies it to the
// same result.
type Command interface {
	Type() CommandType
}

// Precondition guards a write with optimistic concurrency.
type Precondition struct {
	// IfMatch, when set, must equal the stored etag ("*" means: must exist).
	IfMatch string `json:"ifMatch,omitempty"`
	// IfNoneMatch "*" means: must not exist yet.
	IfNoneMatch string `json:"ifNoneMatch,omitempty"`
}

// PutDevice creates a device, or replaces the tags and status of an existing
// one. Keys are only used when the device is created: an existing device
// keeps its keys.
type PutDevice struct {
	Precondition
	Device fleet.Device `json:"device"`
	Time   time.Time    `json:"time"`
}

// PatchDevice merges Tags into a device's tags as a JSON merge patch (a null
// value removes a tag) and sets Status when non-empty. ReplaceTags replaces
// the whole tag object instead.
type PatchDevice struct {
	Precondition
	ID          string         `json:"id"`
	Tags        map[string]any `json:"tags,omitempty"`
	ReplaceTags bool           `json:"replaceTags,omitempty"`
	Status      string         `json:"status,omitempty"`
	// KeyHashes, when set, replaces the device's key digests (key rotation).
	KeyHashes *fleet.KeyHashes `json:"keyHashes,omitempty"`
	// Enrollment, when set, names the enrollment the device registered
	// through, if it names none yet (a device enrolled before devices kept
	// it, adopting its own key).
	Enrollment string    `json:"enrollment,omitempty"`
	Time       time.Time `json:"time"`
}

// DeleteDevice removes a device.
type DeleteDevice struct {
	Precondition
	ID string `json:"id"`
}

// ResetDevice marks a device reset: while no deployment targets it, it is
// sent an empty desired document (its modules are removed) instead of
// keeping what it last ran. The mark is the entry's index
// (fleet.Device.ResetIndex); a deployment that targets the device later
// applies as usual.
type ResetDevice struct {
	Precondition
	ID    string    `json:"id"`
	Time  time.Time `json:"time"`
	Actor string    `json:"actor,omitempty"`
}

func (ResetDevice) Type() CommandType { return CmdResetDevice }

// PutDeployment creates a deployment. Replacing an existing one is refused
// unless its content is byte-for-byte the same (content is immutable).
type PutDeployment struct {
	Precondition
	Deployment fleet.Deployment `json:"deployment"`
	Time       time.Time        `json:"time"`
	// Actor is who asked, for the deployment's history.
	Actor string `json:"actor,omitempty"`
}

// PatchDeployment changes the mutable parts of a deployment. Nil fields are
// left alone.
type PatchDeployment struct {
	Precondition
	ID              string            `json:"id"`
	TargetCondition *string           `json:"targetCondition,omitempty"`
	Priority        *int64            `json:"priority,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
	ReplaceLabels   bool              `json:"replaceLabels,omitempty"`
	MetricQueries   map[string]string `json:"metricQueries,omitempty"`
	// Rollout, when set, replaces the rollout policy (normalized; its
	// waves and canary cannot change).
	Rollout *fleet.RolloutPolicy `json:"rollout,omitempty"`
	Time    time.Time            `json:"time"`
	Actor   string               `json:"actor,omitempty"`
}

// DeleteDeployment removes a deployment.
type DeleteDeployment struct {
	Precondition
	ID    string    `json:"id"`
	Time  time.Time `json:"time,omitempty"`
	Actor string    `json:"actor,omitempty"`
}

// PutReports stores the latest reported document of many devices at once:
// a fleet reporting together costs a few raft entries, not one each.
// Reports of devices that no longer exist are dropped.
type PutReports struct {
	Reports []Report `json:"reports"`
}

// Report is one device's reported document as received.
type Report struct {
	DeviceID string          `json:"deviceId"`
	Document json.RawMessage `json:"document"`
	// Time is when the node received it.
	Time time.Time `json:"time"`
	// Node is the node whose broker received it.
	Node string `json:"node,omitempty"`
	// Session is when the device's MQTT session that carried it began
	// (on that node's clock). A report from an older session than the
	// stored one is stale and changes nothing: a packet a cut-off node
	// receives late (TCP retransmission once the network heals) must not
	// overwrite what the device has since reported through another node.
	Session time.Time `json:"session,omitempty"`
}

// PutEnrollment creates an enrollment group (its derivation key inside).
type PutEnrollment struct {
	Precondition
	Enrollment fleet.Enrollment `json:"enrollment"`
	Time       time.Time        `json:"time"`
}

// DeleteEnrollment removes an enrollment group; devices it registered stay.
type DeleteEnrollment struct {
	Precondition
	Name string `json:"name"`
}

// SetAdminToken replaces the admin token of the operator API on every
// node (a rotation). The token travels in the log and is kept in the state
// machine, so that a node that catches up from a snapshot learns it too;
// the data directory holds it in a 0600 file anyway.
type SetAdminToken struct {
	Token string `json:"token"`
}

func (SetAdminToken) Type() CommandType { return CmdSetAdminToken }

// SetJoinToken replaces the join token (the cluster CA's pin and a new
// secret) on every node, like SetAdminToken.
type SetJoinToken struct {
	Token string `json:"token"`
}

func (SetJoinToken) Type() CommandType { return CmdSetJoinToken }

// EnrollmentDevices names the devices an enrollment registered, for a
// revocation: those the proposer found in its replica at index AsOf
// (Devices), and, applied with them, any device that names the enrollment
// and changed after AsOf (enrolled while the command was on its way). The
// explicit list keeps Apply deterministic even for replicas that differ in
// a field an older binary did not keep.
type EnrollmentDevices struct {
	Devices []string `json:"devices,omitempty"`
	AsOf    uint64   `json:"asOf,omitempty"`
}

// RotateEnrollment gives an enrollment a new derivation key (a new token):
// the old token enrolls no device from then on. With RevokeDevices the
// devices it registered lose their keys in the same entry (see
// RevokeEnrollmentDevices).
type RotateEnrollment struct {
	Precondition
	Name          string    `json:"name"`
	DerivationKey string    `json:"derivationKey"`
	RevokeDevices bool      `json:"revokeDevices,omitempty"`
	Time          time.Time `json:"time"`
	EnrollmentDevices
}

func (RotateEnrollment) Type() CommandType { return CmdRotateEnrollment }

// RevokeEnrollmentDevices clears the keys of every device the enrollment
// registered (they can no longer connect, on any node, until an operator
// gives them keys again or deletes them so they enroll anew), and with
// DeleteEnrollment deletes the enrollment in the same entry.
type RevokeEnrollmentDevices struct {
	Precondition
	Name             string    `json:"name"`
	DeleteEnrollment bool      `json:"deleteEnrollment,omitempty"`
	Time             time.Time `json:"time"`
	EnrollmentDevices
}

func (RevokeEnrollmentDevices) Type() CommandType { return CmdRevokeEnrollmentDevices }

func (PutDevice) Type() CommandType        { return CmdPutDevice }
func (PatchDevice) Type() CommandType      { return CmdPatchDevice }
func (DeleteDevice) Type() CommandType     { return CmdDeleteDevice }
func (DeleteDeployment) Type() CommandType { return CmdDeleteDeployment }
func (PutReports) Type() CommandType       { return CmdPutReports }
func (PutEnrollment) Type() CommandType    { return CmdPutEnrollment }
func (DeleteEnrollment) Type() CommandType { return CmdDeleteEnrollment }

// Encode turns a command into a log entry: its type byte then its JSON.
func Encode(c Command) ([]byte, error) {
	payload, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", c.Type(), err)
	}
	buf := make([]byte, 0, len(payload)+1)
	buf = append(buf, byte(c.Type()))
	return append(buf, payload...), nil
}

// ErrUnknownCommand: a log entry's type byte is none this build knows.
// Only a newer binary writes one; applying around it would let this node
// diverge from its peers (see the state machine's halt).
var ErrUnknownCommand = errors.New("unknown command type")

// Decode is the inverse of Encode. An entry of a type this build does not
// know gives an error wrapping ErrUnknownCommand.
func Decode(entry []byte) (Command, error) {
	if len(entry) == 0 {
		return nil, fmt.Errorf("decode command: empty entry")
	}
	c := newCommand(CommandType(entry[0]))
	if c == nil {
		return nil, fmt.Errorf("decode command: %w %d (written by a newer release?)", ErrUnknownCommand, entry[0])
	}
	if err := json.Unmarshal(entry[1:], c); err != nil {
		return nil, fmt.Errorf("decode %s: %w", CommandType(entry[0]), err)
	}
	return c, nil
}

// newCommand is the registry of what this build can apply: an empty
// command of type t, nil for a type it does not know.
func newCommand(t CommandType) Command {
	var c Command
	switch t {
	case CmdPutDevice:
		c = &PutDevice{}
	case CmdPatchDevice:
		c = &PatchDevice{}
	case CmdDeleteDevice:
		c = &DeleteDevice{}
	case CmdPutDeployment:
		c = &PutDeployment{}
	case CmdPatchDeployment:
		c = &PatchDeployment{}
	case CmdDeleteDeployment:
		c = &DeleteDeployment{}
	case CmdPutReports:
		c = &PutReports{}
	case CmdPutEnrollment:
		c = &PutEnrollment{}
	case CmdDeleteEnrollment:
		c = &DeleteEnrollment{}
	case CmdSetAdminToken:
		c = &SetAdminToken{}
	case CmdSetJoinToken:
		c = &SetJoinToken{}
	case CmdRevokeNode:
		c = &RevokeNode{}
	case CmdBindNode:
		c = &BindNode{}
	case CmdRotateEnrollment:
		c = &RotateEnrollment{}
	case CmdRevokeEnrollmentDevices:
		c = &RevokeEnrollmentDevices{}
	case CmdPutDeploymentRollout:
		c = &PutDeployment{}
	case CmdPatchDeploymentRollout:
		c = &PatchDeployment{}
	case CmdAdmitRollout:
		c = &AdmitRollout{}
	case CmdRolloutAction:
		c = &RolloutAction{}
	case CmdPutConsumer:
		c = &PutConsumer{}
	case CmdDeleteConsumer:
		c = &DeleteConsumer{}
	case CmdResetDevice:
		c = &ResetDevice{}
	case CmdImportDevices:
		c = &ImportDevices{}
	case CmdFinishImport:
		c = &FinishImport{}
	}
	return c
}

// Commands lists the command types this build can apply, in ascending
// order: what a node advertises to its peers (NodeInfo).
func Commands() []CommandType {
	var out []CommandType
	for t := 1; t <= 255; t++ {
		if newCommand(CommandType(t)) != nil {
			out = append(out, CommandType(t))
		}
	}
	return out
}

// LegacyCommands are the command types of the last release that did not
// advertise its capabilities (LegacyRelease): 1-11. A peer that does not
// serve its NodeInfo runs that release (or an older one) and can apply
// these and no others. Every release applies them, so the leader proposes
// them without asking anyone.
func LegacyCommands() []CommandType {
	out := make([]CommandType, 0, int(lastLegacyCommand))
	for t := CmdPutDevice; t <= lastLegacyCommand; t++ {
		out = append(out, t)
	}
	return out
}

// lastLegacyCommand is the highest command type of LegacyRelease.
const lastLegacyCommand = CmdSetJoinToken

// LegacyRelease is the commit of the last release without NodeInfo.
const LegacyRelease = "db9fcc5"

func isLegacyCommand(t CommandType) bool { return t >= CmdPutDevice && t <= lastLegacyCommand }
