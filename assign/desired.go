package assign

import (
	"encoding/json"
	"fmt"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// Desired returns the device's current desired document.
func (a *Assigner) Desired(deviceID string) ([]byte, error) {
	a.mu.RLock()
	if err := a.stoppedLocked(); err != nil {
		// The assignments may be half rebuilt: send nothing.
		a.mu.RUnlock()
		return nil, fmt.Errorf("desired document of %s: this node stopped serving: %w", deviceID, err)
	}
	to := a.effectiveLocked(deviceID)
	version := a.versions.of(deviceID)
	a.mu.RUnlock()
	return a.desiredDocument(deviceID, to, version)
}

// desiredDocument reads the content of what the device runs (unredacted:
// it goes only to this device) and wraps it with its version: the
// deployment's own content, or for a device a rolled-back rollout returned
// to its previous deployment, the content that rollout kept of it.
func (a *Assigner) desiredDocument(deviceID string, to target, version uint64) ([]byte, error) {
	deploymentID := to.deployment
	doc := fleet.DesiredDocument{SchemaVersion: fleet.DocumentSchema, Version: version, DeploymentID: deploymentID}
	if deploymentID != "" {
		err := a.cfg.View(func(r *raftstore.Reader) error {
			var content json.RawMessage
			if to.source != "" {
				kept, ok := r.RolloutContent(to.source, deploymentID)
				if !ok {
					return fmt.Errorf("the rollout of %s kept no content of %s: %w", to.source, deploymentID, fleet.ErrNotFound)
				}
				content = kept
			} else {
				dep, err := r.Deployment(deploymentID)
				if err != nil {
					return err
				}
				content = dep.Content
			}
			var c struct {
				ModulesContent json.RawMessage `json:"modulesContent"`
			}
			if err := json.Unmarshal(content, &c); err != nil {
				return fmt.Errorf("content of deployment %s: %w", deploymentID, err)
			}
			doc.ModulesContent = c.ModulesContent
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("desired document of %s: %w", deviceID, err)
		}
	}
	return json.Marshal(doc)
}

// Push sends new desired documents to the devices connected to this node
// whose applied deployment changed. Call it after Apply returned, outside
// any lock: it never blocks on a device (the Publisher queues).
func (a *Assigner) Push(changes []evaluator.Change) {
	if a.cfg.Publisher == nil || len(changes) == 0 {
		return
	}
	// Every device moved by one entry gets the same document (same
	// deployment, same version): build each distinct one once, not once
	// per device.
	type docKey struct {
		to      target
		version uint64
	}
	keys := make([]docKey, len(changes))
	a.mu.RLock()
	if a.stoppedLocked() != nil {
		a.mu.RUnlock()
		return
	}
	for i, c := range changes {
		keys[i] = docKey{a.effectiveLocked(c.DeviceID), a.versions.of(c.DeviceID)}
	}
	a.mu.RUnlock()
	built := map[docKey][]byte{}
	for i, c := range changes {
		key := keys[i]
		doc, ok := built[key]
		if !ok {
			var err error
			doc, err = a.desiredDocument(c.DeviceID, key.to, key.version)
			if err != nil {
				a.logger.Warn("cannot build desired document", "device", c.DeviceID, "err", err)
			}
			built[key] = doc // nil after an error: the devices of this key are skipped
		}
		if doc == nil {
			continue
		}
		if err := a.cfg.Publisher.PublishDesired(c.DeviceID, doc); err != nil {
			a.logger.Warn("desired document not sent", "device", c.DeviceID, "err", err)
		}
	}
}

// versions remembers, per device, the raft index at which its applied
// deployment last changed. It is derived state like the assignments: after
// a restart every device starts at the index the state was loaded at, which
// is at least as high as any version sent before, so versions only grow.
// The Assigner's lock guards it.
type versions struct {
	base  uint64
	byDev map[string]uint64
}

func (v *versions) of(deviceID string) uint64 {
	if x, ok := v.byDev[deviceID]; ok {
		return x
	}
	return v.base
}

func (v *versions) set(deviceID string, index uint64) {
	if v.byDev == nil {
		v.byDev = map[string]uint64{}
	}
	v.byDev[deviceID] = index
}

func (v *versions) reset(base uint64) {
	v.base = base
	v.byDev = map[string]uint64{}
}
