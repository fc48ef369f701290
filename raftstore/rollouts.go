package raftstore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"appliance/fleet"
)

// Rollouts: a deployment created with a rollout policy reaches its devices
// only as the leader admits them, wave by wave (package assign decides;
// these commands record the decisions). Stored:
//
//	rollouts        deployment id → fleet.Rollout: state and started waves
//	rolloutDevices  deployment id, 0, device id → fleet.RolloutDevice: the
//	                devices admitted, each with what it ran before
//	rolloutContent  deployment id, 0, previous deployment id → that
//	                deployment's content when the first device left it, so
//	                that a rollback can return devices to it even if it was
//	                deleted since
//
// The buckets are made by the first command that writes them, so a state
// file of an older release is not touched until it needs them.
var (
	bucketRollouts       = []byte("rollouts")
	bucketRolloutDevices = []byte("rolloutDevices")
	bucketRolloutContent = []byte("rolloutContent")
)

// Rollout command types: 15-19 are reserved for rollouts.
const (
	// CmdPutDeploymentRollout is PutDeployment with a rollout policy: a
	// type of its own, so that a node that would ignore the policy (and
	// apply the deployment to every device at once) cannot apply it, and
	// the leader does not propose it before every member can.
	CmdPutDeploymentRollout CommandType = 15
	// CmdPatchDeploymentRollout is PatchDeployment changing a rollout
	// policy, for the same reason.
	CmdPatchDeploymentRollout CommandType = 16
	CmdAdmitRollout           CommandType = 17 // admit devices to a rollout's started waves
	CmdRolloutAction          CommandType = 18 // a wave starts, the rollout halts, pauses, resumes, completes, rolls back...
)

// AdmitRollout lets a rollout's deployment apply to devices of its started
// waves. Previous is, per device, the deployment the proposer saw applied
// to it at index AsOf: kept so that a rollback returns the device there.
// So that every recorded Previous is what the device ran when it was
// admitted, the command is refused (fleet.ErrPreconditionFailed) when what
// decides assignments changed after AsOf (a deployment written, a rollout
// that admitted devices or changed state: their etag and index say when),
// and a device is skipped when its own record changed after AsOf or its
// Previous no longer exists (a deployment deleted since). Only what every
// node stores alike is compared, whatever release applied it.
type AdmitRollout struct {
	Deployment string        `json:"deployment"`
	AsOf       uint64        `json:"asOf"`
	Time       time.Time     `json:"time"`
	Devices    []AdmitDevice `json:"devices"`
}

// AdmitDevice is one device of an AdmitRollout.
type AdmitDevice struct {
	ID       string `json:"id"`
	Wave     int    `json:"wave"`
	Previous string `json:"previous,omitempty"`
}

func (AdmitRollout) Type() CommandType { return CmdAdmitRollout }

// RolloutAdmission is a device an AdmitRollout admitted, as stored.
type RolloutAdmission struct {
	DeviceID string
	fleet.RolloutDevice
}

// RolloutAction changes a rollout's state (fleet.RolloutStartWave ...).
// The leader's decisions carry what they were decided on (IfState and
// Waves, the number of waves started): a decision taken on an older state
// is refused with fleet.ErrPreconditionFailed, so a leader that lags
// cannot start a wave twice or halt a rollout an operator resumed.
type RolloutAction struct {
	Deployment string    `json:"deployment"`
	Action     string    `json:"action"`
	Time       time.Time `json:"time"`
	Actor      string    `json:"actor,omitempty"`
	Reason     string    `json:"reason,omitempty"`
	IfState    string    `json:"ifState,omitempty"`
	Waves      *int      `json:"waves,omitempty"`
	// Threshold and Planned describe the wave a StartWave starts.
	Threshold uint64 `json:"threshold,string,omitempty"`
	Planned   int    `json:"planned,omitempty"`
}

func (RolloutAction) Type() CommandType { return CmdRolloutAction }

// Type is CmdPutDeployment, or CmdPutDeploymentRollout for a deployment
// with a rollout policy.
func (c PutDeployment) Type() CommandType {
	if c.Deployment.Rollout != nil {
		return CmdPutDeploymentRollout
	}
	return CmdPutDeployment
}

// Type is CmdPatchDeployment, or CmdPatchDeploymentRollout when the patch
// changes the rollout policy.
func (c PatchDeployment) Type() CommandType {
	if c.Rollout != nil {
		return CmdPatchDeploymentRollout
	}
	return CmdPatchDeployment
}

func rolloutKey(deployment, other string) []byte {
	k := make([]byte, 0, len(deployment)+1+len(other))
	k = append(k, deployment...)
	k = append(k, 0)
	return append(k, other...)
}

// assignmentsChangedAfter is the index of a change after asOf of what
// decides assignments beyond one device's record, 0 if there is none: a
// deployment written, or a rollout that admitted devices or changed state.
// (A deployment deleted leaves no trace; AdmitRollout checks each
// device's Previous still exists instead.)
func (w *writer) assignmentsChangedAfter(asOf uint64) uint64 {
	var found uint64
	_ = w.tx.Bucket(bucketDeployments).ForEach(func(k, v []byte) error {
		var d struct {
			Etag string `json:"etag"`
		}
		if json.Unmarshal(v, &d) == nil {
			if at, err := strconv.ParseUint(d.Etag, 10, 64); err == nil && at > asOf {
				found = max(found, at)
			}
		}
		return nil
	})
	if b := w.tx.Bucket(bucketRollouts); b != nil {
		_ = b.ForEach(func(k, v []byte) error {
			var r fleet.Rollout
			if json.Unmarshal(v, &r) == nil && max(r.Index, r.AdmittedIndex) > asOf {
				found = max(found, r.Index, r.AdmittedIndex)
			}
			return nil
		})
	}
	return found
}

// rollout reads a deployment's rollout, nil if it has none.
func (w *writer) rollout(id string) *fleet.Rollout {
	b := w.tx.Bucket(bucketRollouts)
	if b == nil {
		return nil
	}
	return mustGet[fleet.Rollout](b, id)
}

// startRollout records a new rollout for a deployment just created.
func (w *writer) startRollout(index uint64, id string, at time.Time) *fleet.Rollout {
	r := &fleet.Rollout{Deployment: id, State: fleet.RolloutRunning, Waves: []fleet.WaveProgress{}, CreatedTimeUTC: at, UpdatedTimeUTC: at, Index: index}
	w.putJSON(bucketRollouts, id, r)
	return r
}

// checkRolloutPolicy: a deployment's rollout cannot come or go after its
// creation, nor change its waves (devices already reached were placed by
// them); its thresholds and timings can.
func checkRolloutPolicy(id string, old, next *fleet.RolloutPolicy) error {
	switch {
	case old == nil && next != nil:
		return fmt.Errorf("deployment %q: rollout: %w: a rollout starts with its deployment; this one was created without (create a new deployment with the rollout)", id, fleet.ErrConflict)
	case old != nil && next == nil:
		return fmt.Errorf("deployment %q: rollout: %w: the deployment was created with a rollout, which cannot be removed (promote, abort or roll it back)", id, fleet.ErrConflict)
	case old != nil && (!slices.Equal(old.Waves, next.Waves) || old.Canary != next.Canary):
		return fmt.Errorf("deployment %q: rollout.waves: %w: the waves and the canary cannot change once the rollout exists (they placed the devices already reached)", id, fleet.ErrConflict)
	}
	return nil
}

// dropRollout forgets a deleted deployment's rollout.
func (w *writer) dropRollout(id string) {
	w.del(bucketRollouts, []byte(id))
	for _, name := range [][]byte{bucketRolloutDevices, bucketRolloutContent} {
		b := w.tx.Bucket(name)
		if b == nil {
			continue
		}
		prefix := rolloutKey(id, "")
		var keys [][]byte
		c := b.Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			keys = append(keys, bytes.Clone(k))
		}
		for _, k := range keys {
			w.del(name, k)
		}
	}
}

// forgetRolloutDevice drops a deleted device from every rollout: a device
// created again with its id is a new device, not yet reached.
func (w *writer) forgetRolloutDevice(deviceID string) {
	rb := w.tx.Bucket(bucketRollouts)
	if rb == nil {
		return
	}
	var ids []string
	_ = rb.ForEach(func(k, _ []byte) error {
		ids = append(ids, string(k))
		return nil
	})
	for _, id := range ids {
		w.del(bucketRolloutDevices, rolloutKey(id, deviceID))
	}
}

func (w *writer) admitRollout(index uint64, c *AdmitRollout) *Result {
	r := w.rollout(c.Deployment)
	if r == nil {
		return &Result{Index: index, Err: fmt.Errorf("rollout of %q: %w", c.Deployment, fleet.ErrNotFound)}
	}
	if r.State != fleet.RolloutRunning {
		return &Result{Index: index, Err: fmt.Errorf("rollout of %q is %s: no device is admitted: %w", c.Deployment, r.State, fleet.ErrConflict)}
	}
	if at := w.assignmentsChangedAfter(c.AsOf); at > 0 {
		return &Result{Index: index, Err: fmt.Errorf("admit to the rollout of %q: assignments changed at %d, after %d where the admission was computed: %w", c.Deployment, at, c.AsOf, fleet.ErrPreconditionFailed)}
	}
	devices := w.tx.Bucket(bucketDevices)
	deployments := w.tx.Bucket(bucketDeployments)
	var admitted []RolloutAdmission
	for _, d := range c.Devices {
		key := rolloutKey(c.Deployment, d.ID)
		if d.Wave < 0 || d.Wave >= len(r.Waves) || d.Previous == c.Deployment {
			continue
		}
		if b := w.tx.Bucket(bucketRolloutDevices); b != nil && b.Get(key) != nil {
			continue // admitted already
		}
		dev := mustGet[fleet.Device](devices, d.ID)
		if dev == nil {
			continue
		}
		if etag, err := strconv.ParseUint(dev.Etag, 10, 64); err != nil || etag > c.AsOf {
			continue // changed since: the proposer admits it again from what it sees then
		}
		if d.Previous != "" {
			prev := mustGet[fleet.Deployment](deployments, d.Previous)
			if prev == nil {
				continue // deleted since AsOf: the device runs something else now
			}
			ckey := rolloutKey(c.Deployment, d.Previous)
			if b := w.tx.Bucket(bucketRolloutContent); b == nil || b.Get(ckey) == nil {
				w.put(bucketRolloutContent, ckey, prev.Content)
			}
		}
		rd := fleet.RolloutDevice{Wave: d.Wave, Previous: d.Previous, Time: c.Time}
		w.putJSON(bucketRolloutDevices, string(key), rd)
		admitted = append(admitted, RolloutAdmission{DeviceID: d.ID, RolloutDevice: rd})
	}
	if len(admitted) > 0 {
		r.AdmittedIndex = index
		w.putJSON(bucketRollouts, c.Deployment, r)
		w.changes = append(w.changes, Change{Index: index, Kind: RolloutAdmitted, ID: c.Deployment, Time: c.Time, Rollout: r, Admitted: admitted})
	}
	return &Result{Index: index, Stored: len(admitted)}
}

func (w *writer) rolloutAction(index uint64, c *RolloutAction) *Result {
	fail := func(sentinel error, format string, args ...any) *Result {
		return &Result{Index: index, Err: fmt.Errorf("rollout of %q: %s: %w", c.Deployment, fmt.Sprintf(format, args...), sentinel)}
	}
	r := w.rollout(c.Deployment)
	dep := mustGet[fleet.Deployment](w.tx.Bucket(bucketDeployments), c.Deployment)
	if r == nil || dep == nil || dep.Rollout == nil {
		return &Result{Index: index, Err: fmt.Errorf("rollout of %q: %w", c.Deployment, fleet.ErrNotFound)}
	}
	if c.IfState != "" && c.IfState != r.State {
		return fail(fleet.ErrPreconditionFailed, "decided while %s, but it is %s", c.IfState, r.State)
	}
	if c.Waves != nil && *c.Waves != len(r.Waves) {
		return fail(fleet.ErrPreconditionFailed, "decided with %d waves started, but %d are", *c.Waves, len(r.Waves))
	}
	plan, err := dep.Rollout.Plan()
	if err != nil {
		return fail(fleet.ErrInvalid, "stored policy: %v", err)
	}
	wrong := func() *Result {
		why := r.State
		if r.Aborted {
			why = "aborted"
		}
		return fail(fleet.ErrConflict, "it is %s: cannot %s", why, c.Action)
	}
	passCurrent := func() {
		if n := len(r.Waves); n > 0 && r.Waves[n-1].PassedTimeUTC == nil {
			t := c.Time
			r.Waves[n-1].PassedTimeUTC = &t
		}
	}
	switch c.Action {
	case fleet.RolloutStartWave:
		if r.State != fleet.RolloutRunning {
			return wrong()
		}
		if len(r.Waves) >= len(plan.Waves) {
			return fail(fleet.ErrConflict, "all %d waves started", len(plan.Waves))
		}
		passCurrent()
		r.Waves = append(r.Waves, fleet.WaveProgress{StartedTimeUTC: c.Time, Threshold: c.Threshold, Planned: c.Planned})
		r.Promote, r.Reason = false, ""
	case fleet.RolloutComplete:
		if r.State != fleet.RolloutRunning {
			return wrong()
		}
		if len(r.Waves) < len(plan.Waves) {
			return fail(fleet.ErrConflict, "%d of %d waves started", len(r.Waves), len(plan.Waves))
		}
		passCurrent()
		r.State, r.Reason, r.Promote = fleet.RolloutCompleted, c.Reason, false
	case fleet.RolloutHalt:
		if r.State != fleet.RolloutRunning {
			return wrong()
		}
		r.State, r.Reason = fleet.RolloutHalted, c.Reason
	case fleet.RolloutPause:
		if r.State != fleet.RolloutRunning {
			return wrong()
		}
		r.State, r.Reason = fleet.RolloutPaused, c.Reason
	case fleet.RolloutResume:
		if r.State != fleet.RolloutPaused && (r.State != fleet.RolloutHalted || r.Aborted) {
			return wrong()
		}
		r.State, r.Reason = fleet.RolloutRunning, c.Reason
	case fleet.RolloutPromote:
		if r.State == fleet.RolloutCompleted || r.State == fleet.RolloutRolledBack || r.Aborted {
			return wrong()
		}
		r.State, r.Reason, r.Promote = fleet.RolloutRunning, c.Reason, true
	case fleet.RolloutAbort:
		if r.State == fleet.RolloutCompleted || r.State == fleet.RolloutRolledBack || r.Aborted {
			return wrong()
		}
		r.State, r.Reason, r.Aborted, r.Promote = fleet.RolloutHalted, c.Reason, true, false
	case fleet.RolloutRollback:
		if r.State == fleet.RolloutRolledBack {
			return wrong()
		}
		r.State, r.Reason, r.Promote = fleet.RolloutRolledBack, c.Reason, false
	default:
		return fail(fleet.ErrInvalid, "unknown action %q", c.Action)
	}
	r.UpdatedTimeUTC, r.Index = c.Time, index
	w.putJSON(bucketRollouts, c.Deployment, r)
	ch := Change{Index: index, Kind: RolloutChanged, ID: c.Deployment, Time: c.Time, Actor: c.Actor, Rollout: r, Action: c.Action}
	if c.Action == fleet.RolloutRollback {
		// Every device it admitted, with what it ran before: the node
		// pins them there (a completed rollout's are no longer in its
		// memory).
		ch.Admitted = w.rolloutAdmissions(c.Deployment)
	}
	w.changes = append(w.changes, ch)
	return &Result{Index: index}
}

// rolloutAdmissions lists the devices a rollout admitted (never nil).
func (w *writer) rolloutAdmissions(deployment string) []RolloutAdmission {
	out := []RolloutAdmission{}
	b := w.tx.Bucket(bucketRolloutDevices)
	if b == nil {
		return out
	}
	prefix := rolloutKey(deployment, "")
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		var d fleet.RolloutDevice
		if err := json.Unmarshal(v, &d); err != nil {
			panic(fmt.Sprintf("decode stored rollout device %q: %v", k, err)) // our own bytes: local corruption
		}
		out = append(out, RolloutAdmission{DeviceID: string(k[len(prefix):]), RolloutDevice: d})
	}
	return out
}

// Rollout returns a deployment's rollout; ok is false when it has none.
func (r *Reader) Rollout(deploymentID string) (fleet.Rollout, bool, error) {
	b := r.tx.Bucket(bucketRollouts)
	if b == nil {
		return fleet.Rollout{}, false, nil
	}
	ro, err := getJSON[fleet.Rollout](b, deploymentID)
	if err != nil || ro == nil {
		return fleet.Rollout{}, false, err
	}
	return *ro, true, nil
}

// Rollouts calls fn for each rollout in deployment id order.
func (r *Reader) Rollouts(fn func(fleet.Rollout) bool) error {
	b := r.tx.Bucket(bucketRollouts)
	if b == nil {
		return nil
	}
	return each(b, "", fn)
}

// RolloutDevices calls fn for each device a rollout admitted, in id order.
func (r *Reader) RolloutDevices(deploymentID string, fn func(deviceID string, d fleet.RolloutDevice) bool) error {
	b := r.tx.Bucket(bucketRolloutDevices)
	if b == nil {
		return nil
	}
	prefix := rolloutKey(deploymentID, "")
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		var d fleet.RolloutDevice
		if err := json.Unmarshal(v, &d); err != nil {
			return fmt.Errorf("decode stored rollout device %q: %w", k, err)
		}
		if !fn(string(k[len(prefix):]), d) {
			return nil
		}
	}
	return nil
}

// RolloutContent is the content a rollout kept of a deployment its devices
// left; ok is false when it kept none.
func (r *Reader) RolloutContent(deploymentID, previous string) (json.RawMessage, bool) {
	b := r.tx.Bucket(bucketRolloutContent)
	if b == nil {
		return nil, false
	}
	v := b.Get(rolloutKey(deploymentID, previous))
	if v == nil {
		return nil, false
	}
	return json.RawMessage(bytes.Clone(v)), true
}
