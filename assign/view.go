package assign

import "appliance/evaluator"

// View reads the assignments. One given by Read answers under the
// Assigner's read lock: every answer is of the same applied index, and it
// is valid only inside the function given to Read. One given by Loose
// takes no lock: each answer is consistent on its own.
type View struct {
	a     *Assigner
	loose bool
}

// Read calls fn with a consistent view of the assignments. fn must not
// wait for raft (the apply path takes the lock for writing).
func (a *Assigner) Read(fn func(v View)) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	fn(View{a: a})
}

// Loose returns a View whose answers are each consistent on its own but
// may be of different applied indexes: for long walks (previews of a
// large fleet) that must not hold up the apply path.
func (a *Assigner) Loose() View { return View{a: a, loose: true} }

// Applied is the deployment a device runs, "" for none: the one the
// evaluator applies, or the restore point a rolled-back rollout left.
func (v View) Applied(deviceID string) string {
	if v.loose {
		v.a.mu.RLock()
		defer v.a.mu.RUnlock()
	}
	return v.a.effectiveLocked(deviceID).deployment
}

// Layers lists the layered deployments that target a device, by
// precedence (the first wins a conflict). They apply only on a device
// that has a base (Applied).
func (v View) Layers(deviceID string) []string { return v.a.engine.Layers(deviceID) }

// IsLayered tells whether a deployment is layered.
func (v View) IsLayered(deploymentID string) bool { return v.a.engine.IsLayered(deploymentID) }

// UnassignedDevices lists the devices no deployment applies to, sorted.
func (v View) UnassignedDevices() []string { return v.a.engine.UnassignedDevices() }

// Since is the index at which a device's assignment last changed on this
// node (0: before it last restored its state).
func (v View) Since(deviceID string) uint64 {
	if v.loose {
		v.a.mu.RLock()
		defer v.a.mu.RUnlock()
	}
	return v.a.versions.since(deviceID)
}

// Subject is what a device's report is judged against: its base, its
// layers in merge order and since when it has them (every module counts).
func (v View) Subject(deviceID string) Subject {
	if v.loose {
		v.a.mu.RLock()
		defer v.a.mu.RUnlock()
	}
	as := v.a.assignmentLocked(deviceID)
	return Subject{Base: as.base, Layers: as.layers, Since: v.a.versions.since(deviceID)}
}

// assignment is a device's base and layers in merge order.
func (v View) assignment(deviceID string) assignment {
	if v.loose {
		v.a.mu.RLock()
		defer v.a.mu.RUnlock()
	}
	return v.a.assignmentLocked(deviceID)
}

// Version is the version of the device's desired document.
func (v View) Version(deviceID string) uint64 {
	if v.loose {
		v.a.mu.RLock()
		defer v.a.mu.RUnlock()
	}
	return v.a.versions.of(deviceID)
}

// Targeting lists the deployments whose condition matches the device, by
// precedence (the first applies).
func (v View) Targeting(deviceID string) []string { return v.a.engine.Targeting(deviceID) }

// TargetedDevices are the devices a deployment's condition matches, sorted.
func (v View) TargetedDevices(deploymentID string) []string {
	return v.a.engine.TargetedDevices(deploymentID)
}

// AppliedDevices are the devices a deployment applies to, sorted.
func (v View) AppliedDevices(deploymentID string) []string {
	return v.a.engine.AppliedDevices(deploymentID)
}

// Counts are how many devices a deployment targets and applies to.
func (v View) Counts(deploymentID string) (targeted, applied int) {
	return v.a.engine.Counts(deploymentID)
}

// Match lists the devices a condition matches, sorted.
func (v View) Match(c *evaluator.Condition) ([]string, error) { return v.a.engine.Match(c) }

// DryRunDevices are the devices d would target and apply to if it were
// put now.
func (v View) DryRunDevices(d evaluator.Deployment) (targeted, wouldApply []string, err error) {
	return v.a.engine.DryRunDevices(d)
}

// HasDevice tells whether the device exists.
func (v View) HasDevice(deviceID string) bool { return v.a.engine.HasDevice(deviceID) }

// Devices counts the devices.
func (v View) Devices() int { return v.a.engine.Stats().Devices }

// DeploymentIDs lists the deployments, sorted.
func (v View) DeploymentIDs() []string { return v.a.engine.DeploymentIDs() }
