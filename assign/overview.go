package assign

import (
	"errors"
	"time"

	"appliance/fleet"
	"appliance/raftstore"
)

// Overview is the console's first page as this node judges it: every
// device once by connection and once by health, every deployment once by
// state, and the devices out of contact beside.
type Overview struct {
	Devices   int // every device
	Connected int // of them, holding a session with some node
	Offline   int // disconnected and out of contact (OverviewOptions.Offline)
	// Health counts every device once, by fleet.HealthStates (the sum is
	// Devices): a device's health is its base deployment's (a device has
	// at most one applied base, so no device counts twice; a layer's own
	// states are counted in Deployments only).
	Health map[string]int
	// Deployments are every deployment's state and counts, by id.
	Deployments []DeploymentOverview
}

// DeploymentOverview is one deployment in the overview.
type DeploymentOverview struct {
	Deployment fleet.Deployment
	Layered    bool
	Counts     fleet.StatusCounts
	State      string
}

// OverviewOptions are what the overview judges with.
type OverviewOptions struct {
	Now  time.Time
	Soak time.Duration
	// Connected are the devices holding a session with some node (a
	// session may outlive its device's deletion by a moment: not counted).
	Connected map[string]bool
	// Offline tells whether a disconnected device is out of contact,
	// given when its last report arrived (zero: none).
	Offline func(deviceID string, reported time.Time) bool
}

// Overview counts the fleet from the assignments and the reports in r (the
// caller's read transaction). The assignments are copied under the lock,
// at one applied index; the reports are read after it is released, through
// the memo, so that a large fleet's poll never holds up the apply path.
func (a *Assigner) Overview(r *raftstore.Reader, opt OverviewOptions) (Overview, error) {
	o := Overview{Health: map[string]int{}}
	for _, h := range fleet.HealthStates {
		o.Health[h] = 0
	}
	type assigned struct {
		id       string
		layered  bool
		targeted int
		applied  []string
		subjects []Subject
	}
	var deps []assigned
	a.Read(func(v View) {
		o.Devices = v.Devices()
		for id := range opt.Connected {
			if v.HasDevice(id) {
				o.Connected++
			}
		}
		for _, id := range v.DeploymentIDs() {
			targeted, _ := v.Counts(id)
			d := assigned{id: id, layered: v.IsLayered(id), targeted: targeted, applied: v.AppliedDevices(id)}
			d.subjects = make([]Subject, len(d.applied))
			for i, dev := range d.applied {
				d.subjects[i] = v.Subject(dev)
			}
			deps = append(deps, d)
		}
	})
	// When the disconnected devices judged here last reported, for the
	// offline count below: each stored report is read once.
	reported := map[string]time.Time{}
	withDeployment := 0
	for _, d := range deps {
		dep, err := r.Deployment(d.id)
		if errors.Is(err, fleet.ErrNotFound) {
			continue // deleted since the copy
		}
		if err != nil {
			return Overview{}, err
		}
		counts := fleet.StatusCounts{Targeted: d.targeted, Applied: len(d.applied)}
		for i, dev := range d.applied {
			s := d.subjects[i]
			s.Modules = a.ModulesOf(r, s, d.id)
			h := a.healthOf(r, dev, o.Devices)
			if !opt.Connected[dev] {
				reported[dev] = h.received
			}
			switch c, _ := classify(h.rep, s, opt.Now, opt.Soak); c {
			case fleet.CategoryHealthy:
				counts.Healthy++
			case fleet.CategorySoaking:
				counts.Soaking++
			case fleet.CategoryUnhealthy:
				counts.Unhealthy++
			default:
				counts.Unknown++
			}
		}
		if !d.layered {
			withDeployment += counts.Applied
			o.Health[fleet.CategoryHealthy] += counts.Healthy
			o.Health[fleet.CategorySoaking] += counts.Soaking
			o.Health[fleet.CategoryUnhealthy] += counts.Unhealthy
			o.Health[fleet.CategoryUnknown] += counts.Unknown
		}
		o.Deployments = append(o.Deployments, DeploymentOverview{Deployment: dep, Layered: d.layered, Counts: counts, State: DeploymentState(counts)})
	}
	o.Health[fleet.HealthNone] = o.Devices - withDeployment
	if opt.Offline != nil {
		r.DeviceIDs(func(id string) bool {
			if opt.Connected[id] {
				return true
			}
			at, judged := reported[id]
			if !judged {
				if rep, err := r.ReportMeta(id); err == nil {
					at = rep.ReceivedTimeUTC
				}
			}
			if opt.Offline(id, at) {
				o.Offline++
			}
			return true
		})
	}
	return o, nil
}
