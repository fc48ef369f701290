package assign

import "appliance/fleet"

// Restore points. A rolled-back rollout returns every device it moved to
// what the device ran before: its previous deployment, with that
// deployment's content as it was (kept by the rollout, so a deployment
// deleted or changed since does not matter). The rolled-back deployment
// stays gated shut, so the evaluator already sends most devices back by
// precedence; a pin covers the others (their previous deployment no
// longer targets them, or was deleted): it stands at the rolled-back
// deployment's rank, so a deployment that precedes it (a fix rolled out
// later) still wins, and it lasts as long as that deployment exists.

// pins holds the restore points and what each pinned device's document
// says now.
type pins struct {
	// by is device → rolled-back deployment → the deployment the device
	// ran before it ("" for none).
	by map[string]map[string]string
	// current is, per pinned device, the deployment its document names.
	current map[string]string
}

func newPins() pins { return pins{by: map[string]map[string]string{}, current: map[string]string{}} }

// add pins each device a rollout admitted to what it ran before.
func (p pins) add(deployment string, admitted map[string]fleet.RolloutDevice) {
	for id, d := range admitted {
		m := p.by[id]
		if m == nil {
			m = map[string]string{}
			p.by[id] = m
		}
		m[deployment] = d.Previous
	}
}

// drop removes a deployment's restore points and returns, for each device
// that had one, what its document named.
func (p pins) drop(deployment string, admitted map[string]fleet.RolloutDevice) map[string]string {
	before := map[string]string{}
	for id := range admitted {
		m := p.by[id]
		if _, ok := m[deployment]; !ok {
			continue
		}
		before[id] = p.current[id]
		delete(m, deployment)
		if len(m) == 0 {
			delete(p.by, id)
		}
	}
	return before
}

// forget drops a deleted device's restore points; it returns what its
// document named, if it was pinned.
func (p pins) forget(deviceID string) (string, bool) {
	cur, ok := p.current[deviceID]
	delete(p.by, deviceID)
	delete(p.current, deviceID)
	return cur, ok
}

// effective is what a pinned device's document names.
func (p pins) effective(deviceID string) (string, bool) {
	cur, ok := p.current[deviceID]
	return cur, ok
}

func (p pins) setCurrent(deviceID, deployment string) {
	if len(p.by[deviceID]) > 0 {
		p.current[deviceID] = deployment
	} else {
		delete(p.current, deviceID)
	}
}

// target is what a device's document names: a deployment and where its
// content comes from (source: the rolled-back deployment that kept it, ""
// for the deployment's own).
type target struct{ deployment, source string }

// effectiveLocked is what a device runs: the deployment the evaluator
// applies, unless a restore point that precedes it says otherwise. The
// caller holds a.mu.
func (a *Assigner) effectiveLocked(deviceID string) target {
	applied := a.engine.Applied(deviceID)
	ps := a.pins.by[deviceID]
	if len(ps) == 0 {
		return target{deployment: applied}
	}
	best := ""
	for d := range ps {
		if (applied == "" || a.engine.Precedes(d, applied)) && (best == "" || a.engine.Precedes(d, best)) {
			best = d
		}
	}
	if best == "" || ps[best] == applied {
		return target{deployment: applied}
	}
	return target{deployment: ps[best], source: best}
}
