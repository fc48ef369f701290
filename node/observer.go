package node

import (
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// observer feeds the evaluator from the store's applied changes. It runs on
// raft's apply goroutine, so every node updates its assignments in log
// order and agrees with its peers at each applied index.
type observer Node

var _ raftstore.Observer = (*observer)(nil)

func (o *observer) Applied(changes []raftstore.Change) {
	n := (*Node)(o)
	n.engineMu.Lock()
	defer n.engineMu.Unlock()
	for _, c := range changes {
		switch c.Kind {
		case raftstore.DevicePut:
			n.engine.PutDevice(c.ID, c.Device.Tags)
		case raftstore.DeviceDeleted:
			n.engine.DeleteDevice(c.ID)
		case raftstore.DeploymentPut:
			if _, err := n.engine.PutDeployment(engineDeployment(c.Deployment)); err != nil {
				// Validated before raft; only a condition this binary no
				// longer accepts gets here. It then targets nothing.
				n.logger.Error("stored target condition does not compile; the deployment targets no device",
					"deployment", c.ID, "err", err)
				n.engine.DeleteDeployment(c.ID)
			}
		case raftstore.DeploymentDeleted:
			n.engine.DeleteDeployment(c.ID)
		}
	}
}

func (o *observer) Restored(r *raftstore.Reader) {
	n := (*Node)(o)
	n.engineMu.Lock()
	defer n.engineMu.Unlock()
	n.engine.Reset()
	// Devices first, so that each deployment then finds its devices
	// through the engine's indexes rather than device by device.
	_ = r.Devices("", func(d fleet.Device) bool {
		n.engine.PutDevice(d.ID, d.Tags)
		return true
	})
	_ = r.Deployments("", func(d fleet.Deployment) bool {
		if _, err := n.engine.PutDeployment(engineDeployment(&d)); err != nil {
			n.logger.Error("stored target condition does not compile; the deployment targets no device",
				"deployment", d.ID, "err", err)
		}
		return true
	})
}

func engineDeployment(d *fleet.Deployment) evaluator.Deployment {
	return evaluator.Deployment{
		ID:              d.ID,
		Condition:       d.TargetCondition,
		Priority:        d.Priority,
		CreatedUnixNano: d.CreatedTimeUTC.UnixNano(),
	}
}
