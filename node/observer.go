package node

import (
	"encoding/json"
	"fmt"
	"time"

	"appliance/api"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// observer feeds the evaluator from the store's applied changes. It runs on
// raft's apply goroutine, so every node updates its assignments in log
// order and agrees with its peers at each applied index. Desired documents
// are pushed to connected devices after the engine lock is released.
type observer Node

var _ raftstore.Observer = (*observer)(nil)

func (o *observer) Applied(changes []raftstore.Change) {
	n := (*Node)(o)
	var moved []evaluator.Change
	var drop, recheck []string
	var events []queued
	var adminToken, joinToken string // rotations, adopted after the lock
	certsChanged := false
	n.engineMu.Lock()
	for _, c := range changes {
		var out []evaluator.Change
		at := c.Time
		if at.IsZero() && c.Device != nil {
			at = c.Device.LastUpdatedTimeUTC
		}
		if at.IsZero() {
			at = time.Now().UTC()
		}
		if ev, ok := deploymentEvent(c, at); ok {
			events = append(events, queued{deployment: c.ID, ev: ev})
		}
		switch c.Kind {
		case raftstore.DevicePut:
			out = n.engine.PutDevice(c.ID, c.Device.Tags)
			if c.CredentialsChanged {
				recheck = append(recheck, c.ID)
			}
		case raftstore.DeviceDeleted:
			out = n.engine.DeleteDevice(c.ID)
			drop = append(drop, c.ID)
		case raftstore.DeploymentPut:
			var err error
			out, err = n.engine.PutDeployment(engineDeployment(c.Deployment))
			if err != nil {
				// Validated before raft; only a condition this binary no
				// longer accepts gets here. It then targets nothing.
				n.logger.Error("stored target condition does not compile; the deployment targets no device",
					"deployment", c.ID, "err", err)
				out = n.engine.DeleteDeployment(c.ID)
			}
		case raftstore.DeploymentDeleted:
			out = n.engine.DeleteDeployment(c.ID)
		case raftstore.AdminTokenSet:
			adminToken = c.Secret
		case raftstore.JoinTokenSet:
			joinToken = c.Secret
		case raftstore.NodeCertsChanged:
			certsChanged = true
		}
		if len(out) == 0 {
			continue
		}
		for _, m := range out {
			n.versions.set(m.DeviceID, c.Index)
		}
		events = append(events, queued{ev: api.HistoryEvent{Time: at, Index: c.Index}, cause: changeCause(c), moves: out})
		if moved == nil {
			moved = out // usually the only change that moves devices
		} else {
			moved = append(moved, out...)
		}
	}
	n.engineMu.Unlock()
	if adminToken != "" {
		n.adoptAdminToken(adminToken)
	}
	if joinToken != "" {
		n.adoptJoinToken(joinToken)
	}
	if certsChanged && n.mux != nil {
		// A node's certificate was revoked (or bound): connections that
		// presented one the cluster no longer accepts close now.
		n.mux.Recheck()
	}
	if n.broker != nil {
		for _, id := range drop {
			n.broker.Disconnect(id)
		}
		n.recheckSessions(recheck)
	}
	n.push(moved)
	n.history.add(events...)
}

// Restored rebuilds the derived state from the whole state: at open, and
// after a snapshot install. Any read that fails leaves the evaluator
// incomplete, so the error is returned (the store then refuses to open,
// or stops) and, before the engine lock is released, the node is marked
// stopped: no device is sent a document computed from part of the state.
func (o *observer) Restored(r *raftstore.Reader) error {
	n := (*Node)(o)
	// Rotations this node learns from a snapshot or its own state.
	if t := r.AdminToken(); t != "" {
		n.adoptAdminToken(t)
	}
	if t := r.JoinToken(); t != "" {
		n.adoptJoinToken(t)
	}
	if n.mux != nil {
		// Revocations the snapshot holds. Not here: the check reads the
		// state, which this call holds open.
		go n.mux.Recheck()
	}
	n.engineMu.Lock()
	n.engine.Reset()
	n.versions.reset(r.AppliedIndex())
	// Devices first, so that each deployment then finds its devices
	// through the engine's indexes rather than device by device.
	err := r.Devices("", func(d fleet.Device) bool {
		n.engine.PutDevice(d.ID, d.Tags)
		return true
	})
	if err == nil {
		err = r.Deployments("", func(d fleet.Deployment) bool {
			if _, err := n.engine.PutDeployment(engineDeployment(&d)); err != nil {
				n.logger.Error("stored target condition does not compile; the deployment targets no device",
					"deployment", d.ID, "err", err)
			}
			return true
		})
	}
	if err != nil {
		err = fmt.Errorf("rebuild assignments: %w", err)
		n.markStopped(err)
		n.engineMu.Unlock()
		n.refuseDevices()
		return err
	}
	var resend []evaluator.Change
	if n.broker != nil {
		// A snapshot replaced the state under connected devices: send each
		// its current document; an agent ignores one it already runs.
		for _, c := range n.broker.Connected() {
			resend = append(resend, evaluator.Change{DeviceID: c.DeviceID, To: n.engine.Applied(c.DeviceID)})
		}
	}
	n.engineMu.Unlock()
	n.push(resend)
	return nil
}

// Halted: the state machine stopped (damaged state, a snapshot that could
// not be installed, or a command this build cannot apply). The store has
// logged why and closes itself; the node stops serving devices and reads
// at once.
func (o *observer) Halted(err error) {
	n := (*Node)(o)
	n.markStopped(err)
	n.refuseDevices()
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// changeCause says in words which change moved a device.
func changeCause(c raftstore.Change) string {
	switch c.Kind {
	case raftstore.DevicePut:
		return "the device's tags changed"
	case raftstore.DeviceDeleted:
		return "the device was deleted"
	case raftstore.DeploymentPut:
		return "deployment " + c.ID + " was written"
	case raftstore.DeploymentDeleted:
		return "deployment " + c.ID + " was deleted"
	}
	return "a change"
}

// deploymentEvent describes a change of a deployment for its history.
func deploymentEvent(c raftstore.Change, at time.Time) (api.HistoryEvent, bool) {
	ev := api.HistoryEvent{Time: at, Index: c.Index, Actor: c.Actor}
	switch c.Kind {
	case raftstore.DeploymentPut:
		d := c.Deployment
		ev.Kind = "updated"
		if c.Created {
			ev.Kind = "created"
		}
		labels, _ := json.Marshal(d.Labels)
		ev.What = fmt.Sprintf("targetCondition %q, priority %d, labels %s", d.TargetCondition, d.Priority, labels)
	case raftstore.DeploymentDeleted:
		ev.Kind, ev.What = "deleted", "deleted"
	default:
		return ev, false
	}
	return ev, true
}

func engineDeployment(d *fleet.Deployment) evaluator.Deployment {
	return evaluator.Deployment{
		ID:              d.ID,
		Condition:       d.TargetCondition,
		Priority:        d.Priority,
		CreatedUnixNano: d.CreatedTimeUTC.UnixNano(),
	}
}
