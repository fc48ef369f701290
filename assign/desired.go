package assign

import (
	"encoding/json"
	"errors"
	"fmt"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// Desired returns the device's current desired document: its base
// deployment's content with its layers merged on it; for a device no
// deployment applies to, an empty document, or nil when it is to keep
// what it runs (keep.go: the caller sends nothing).
func (a *Assigner) Desired(deviceID string) ([]byte, error) {
	a.mu.RLock()
	if err := a.stoppedLocked(); err != nil {
		// The assignments may be half rebuilt: send nothing.
		a.mu.RUnlock()
		return nil, fmt.Errorf("desired document of %s: this node stopped serving: %w", deviceID, err)
	}
	as := a.assignmentLocked(deviceID)
	version := a.versions.of(deviceID)
	held := a.held[deviceID]
	a.mu.RUnlock()
	return a.desiredDocument(deviceID, as, version, held)
}

// desiredDocument builds a device's document: the assignment's content
// (unredacted: it goes only to this device) with its version; for a
// device without a base, what untargetedPolicy says (nil: nothing to
// send). A device that no longer exists gets nothing.
func (a *Assigner) desiredDocument(deviceID string, as assignment, version uint64, held bool) ([]byte, error) {
	doc := fleet.DesiredDocument{SchemaVersion: fleet.DocumentSchema, Version: version, DeploymentID: as.base, Layers: as.layers}
	send := true
	err := a.cfg.View(func(r *raftstore.Reader) error {
		if as.base == "" && as.source != "" {
			return nil // rolled back to nothing: the empty document
		}
		if as.base == "" {
			dev, err := r.Device(deviceID)
			if errors.Is(err, fleet.ErrNotFound) {
				send = false
				return nil
			}
			if err != nil {
				return err
			}
			send = untargetedPolicy(dev, ReportOf(r, deviceID), held) == sendEmpty
			return nil
		}
		m, err := a.content(r, as)
		if err != nil {
			return err
		}
		doc.ModulesContent = m.modulesContent
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("desired document of %s: %w", deviceID, err)
	}
	if !send {
		return nil, nil
	}
	return json.Marshal(doc)
}

// Push sends new desired documents to the devices connected to this node
// whose assignment changed (base or layers). Call it after Apply
// returned, outside any lock: it never blocks on a device (the Publisher
// queues).
func (a *Assigner) Push(changes []evaluator.Change) {
	if a.cfg.Publisher == nil || len(changes) == 0 {
		return
	}
	// Every device moved by one entry gets the same document (same
	// assignment, same version): build each distinct one once, not once
	// per device. A device with several changes (its base and a layer) is
	// sent its document once.
	type docKey struct {
		content string
		version uint64
	}
	type send struct {
		device string
		as     assignment
		key    docKey
		held   bool
	}
	// Many devices moved at once (a bulk import, a deployment over a
	// large fleet): most are not connected here, and looking up each one's
	// document, let alone reading the state for it, is wasted work on the
	// apply path. Keep only those connected to this node.
	var connected map[string]bool
	if len(changes) > pushFilterAbove {
		ids := a.cfg.Publisher.Connected()
		connected = make(map[string]bool, len(ids))
		for _, id := range ids {
			connected[id] = true
		}
	}
	sends := make([]send, 0, min(len(changes), 1024))
	a.mu.RLock()
	if a.stoppedLocked() != nil {
		a.mu.RUnlock()
		return
	}
	seen := make(map[string]bool, min(len(changes), 1024))
	for _, c := range changes {
		if seen[c.DeviceID] || connected != nil && !connected[c.DeviceID] {
			continue
		}
		seen[c.DeviceID] = true
		as := a.assignmentLocked(c.DeviceID)
		sends = append(sends, send{device: c.DeviceID, as: as, key: docKey{as.key(), a.versions.of(c.DeviceID)}, held: a.held[c.DeviceID]})
	}
	a.mu.RUnlock()
	built := map[docKey][]byte{}
	for _, s := range sends {
		doc, ok := built[s.key]
		if !ok || s.as.base == "" {
			var err error
			doc, err = a.desiredDocument(s.device, s.as, s.key.version, s.held)
			if err != nil {
				a.logger.Warn("cannot build desired document", "device", s.device, "err", err)
			}
			if s.as.base != "" {
				built[s.key] = doc // nil after an error: the devices of this key are skipped
			}
		}
		if doc == nil {
			continue // an error, or a device that keeps what it runs
		}
		if err := a.cfg.Publisher.PublishDesired(s.device, doc); err != nil {
			a.logger.Warn("desired document not sent", "device", s.device, "err", err)
		}
	}
}

// pushFilterAbove: a Push of more changes than this first asks which
// devices are connected here.
const pushFilterAbove = 256

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

// since is the index at which the device's assignment last changed, as
// this node applied it; 0 when that was before the node last restored
// its state (then only the base index is known). A report about a
// document older than that is not about its current assignment.
func (v *versions) since(deviceID string) uint64 { return v.byDev[deviceID] }

func (v *versions) reset(base uint64) {
	v.base = base
	v.byDev = map[string]uint64{}
}
