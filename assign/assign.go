package assign

import (
	"cmp"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/history"
	"appliance/raftstore"
)

// Publisher sends desired documents to the devices connected to this node.
type Publisher interface {
	// PublishDesired queues doc for the device if it is connected here and
	// never blocks on it; a device connected elsewhere (or not at all) is
	// not an error.
	PublishDesired(deviceID string, doc []byte) error
	// Connected lists the devices connected to this node.
	Connected() []string
}

// Config is what an Assigner needs from the node.
type Config struct {
	// View reads the local replica (raftstore.Store.View). It is called
	// only after the store opened, never while the apply path holds the
	// Assigner's lock.
	View func(fn func(r *raftstore.Reader) error) error
	// Publisher sends desired documents; nil sends none.
	Publisher Publisher
	// Stopped says why the node stopped serving (damaged state), nil while
	// it serves: a stopped node sends no document. Nil means never.
	Stopped func() error
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now is the clock rollouts are judged by (soaks, wave timeouts);
	// time.Now when nil.
	Now func() time.Time
}

// Assigner keeps the assignments (which deployment applies to each
// device) and the desired versions. Apply and Restore run on raft's apply
// goroutine; reads take the same lock shared, so that a reader that needs
// a device's record and its assignment to agree (holding a read
// transaction of the replica) sees both at one applied index.
//
// A deployment with an active rollout is gated in the evaluator: it
// applies only to the devices its rollout admitted. A rolled-back rollout
// pins each device it moved to what the device ran before (restore points,
// pins.go) for as long as its deployment exists.
type Assigner struct {
	cfg    Config
	logger *slog.Logger

	// mu orders updates from the apply path against readers: the engine,
	// the versions, the rollouts and the pins change together under it.
	mu       sync.RWMutex
	engine   *evaluator.Engine
	versions versions
	rollouts map[string]*rolloutInfo
	pins     pins
	// applied is the index of the last change applied (or the state
	// restored): what the answers under mu reflect, at least.
	applied uint64
	// held are the devices this node saw lose their last deployment
	// (since it restored its state) and that none applies to now: they
	// keep what they run even before their report says what that is
	// (keep.go).
	held map[string]bool
	// merges caches merged document contents (layers.go).
	merges mergeCache
	// failed is why Restore could not rebuild the assignments: they are
	// partial, and nothing computed from them may reach a device.
	failed error

	// kick wakes the rollout loop (RunRollouts) when something it judges
	// changed: a report, an admission, a rollout's state.
	kick chan struct{}
	// positions caches WavePosition per rollout and device.
	positions positionCache
	// reports keeps what judging health reads of each device's last
	// report (reportmemo.go).
	reports *reportMemo
}

// New returns an empty Assigner; Restore fills it from the state.
func New(cfg Config) *Assigner {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Assigner{cfg: cfg, logger: cfg.Logger, engine: evaluator.NewEngine(), rollouts: map[string]*rolloutInfo{},
		pins: newPins(), kick: make(chan struct{}, 1), held: map[string]bool{}, reports: newReportMemo()}
}

// Apply updates the assignments from one committed batch of changes, in
// log order. It returns the devices whose applied deployment changed (to
// be sent their new document with Push once the caller has done what must
// come first) and the history items of the batch.
func (a *Assigner) Apply(changes []raftstore.Change) (moved []evaluator.Change, items []history.Item) {
	a.mu.Lock()
	defer a.mu.Unlock()
	wake := false
	owned := -1 // the item whose moves this call appends to
	for _, c := range changes {
		a.applied = max(a.applied, c.Index)
		at := c.Time
		if at.IsZero() && c.Device != nil {
			at = c.Device.LastUpdatedTimeUTC
		}
		if at.IsZero() {
			at = time.Now().UTC()
		}
		if ev, ok := a.deploymentEvent(c, at); ok {
			items = append(items, history.Item{Deployment: c.ID, Event: ev})
		}
		if c.Kind == raftstore.ReportPut {
			wake = wake || a.anyRunning()
			continue
		}
		out, cause := a.applyChange(c)
		if len(out) == 0 {
			continue
		}
		for _, m := range out {
			a.versions.set(m.DeviceID, c.Index)
			switch {
			case m.Layer != "" || c.Kind == raftstore.DeviceDeleted:
			case m.To != "":
				delete(a.held, m.DeviceID)
			case m.From != "":
				a.held[m.DeviceID] = true
			}
		}
		if last := len(items) - 1; c.Imported && last >= 0 && items[last].Event.Index == c.Index && items[last].Cause == cause {
			// A bulk import's devices of one entry: one history item,
			// as for a change that moves many devices at once. Clipped
			// once first: the item's first moves may share moved's array.
			if owned != last {
				items[last].Moves, owned = slices.Clip(items[last].Moves), last
			}
			items[last].Moves = append(items[last].Moves, out...)
		} else {
			items = append(items, history.Item{Event: fleet.HistoryEvent{Time: at, Index: c.Index}, Cause: cause, Moves: out})
		}
		if moved == nil {
			moved = out // usually the only change that moves devices
		} else {
			moved = append(moved, out...)
		}
		wake = wake || len(a.rollouts) > 0
	}
	if wake {
		a.wake()
	}
	return moved, items
}

// applyChange applies one change to the engine, the rollouts and the
// pins, and returns the devices whose effective deployment changed (what
// their desired document says), with the cause in words.
func (a *Assigner) applyChange(c raftstore.Change) ([]evaluator.Change, string) {
	var out []evaluator.Change
	repin := false // every pinned device may see its restore point win or lose
	var pinned map[string]string
	switch c.Kind {
	case raftstore.DevicePut:
		out = a.engine.PutDevice(c.ID, c.Device.Tags)
	case raftstore.DeviceDeleted:
		out = a.engine.DeleteDevice(c.ID)
		delete(a.held, c.ID)
		for _, info := range a.rollouts {
			delete(info.admitted, c.ID)
		}
		if cur, ok := a.pins.forget(c.ID); ok {
			pinned = map[string]string{c.ID: cur}
		}
	case raftstore.DeviceReset:
		// A reset device no deployment applies to is sent the empty
		// document, at this version; one a deployment applies to is not
		// moved (the reset matters when it loses it).
		delete(a.held, c.ID)
		if a.effectiveLocked(c.ID).deployment == "" {
			return []evaluator.Change{{DeviceID: c.ID}}, a.changeCause(c)
		}
		return nil, ""
	case raftstore.DeploymentPut:
		a.merges.clear()
		a.noteRollout(c.ID, c.Deployment, c.Rollout)
		var err error
		out, err = a.engine.PutDeployment(engineDeployment(c.Deployment, c.Rollout))
		if err != nil {
			// Validated before raft; only a condition this binary no
			// longer accepts gets here. It then targets nothing.
			a.logger.Error("stored target condition does not compile; the deployment targets no device",
				"deployment", c.ID, "err", err)
			out = a.engine.DeleteDeployment(c.ID)
		}
		repin = true
	case raftstore.DeploymentDeleted:
		a.merges.clear()
		out = a.engine.DeleteDeployment(c.ID)
		if info := a.rollouts[c.ID]; info != nil && info.rollout.State == fleet.RolloutRolledBack {
			pinned = a.pins.drop(c.ID, info.admitted)
		}
		delete(a.rollouts, c.ID)
		a.positions.drop(c.ID)
		repin = true
	case raftstore.RolloutAdmitted:
		info := a.rolloutOf(c.ID)
		ids := make([]string, len(c.Admitted))
		for i, ad := range c.Admitted {
			info.admitted[ad.DeviceID] = ad.RolloutDevice
			ids[i] = ad.DeviceID
		}
		if c.Rollout != nil {
			info.rollout = *c.Rollout
		}
		out = a.engine.Admit(c.ID, ids)
	case raftstore.RolloutChanged:
		info := a.rolloutOf(c.ID)
		was := info.rollout.State
		info.rollout = *c.Rollout
		switch {
		case info.rollout.State == fleet.RolloutCompleted && was != fleet.RolloutCompleted:
			out = a.engine.SetGated(c.ID, false)
			// A completed rollout decides nothing more: its devices are
			// read from the replica when asked (a status, a rollback),
			// not kept in memory for as long as the deployment lives.
			info.admitted = nil
		case info.rollout.State == fleet.RolloutRolledBack && was != fleet.RolloutRolledBack:
			if c.Admitted != nil {
				info.admitted = admittedOf(c.Admitted)
			}
			// Each device it moved: what it runs now, before the gate
			// closes on it.
			pinned = make(map[string]string, len(info.admitted))
			for id := range info.admitted {
				pinned[id] = a.effectiveLocked(id).deployment
			}
			if was == fleet.RolloutCompleted {
				out = a.engine.SetGated(c.ID, true)
			} else {
				out = a.engine.SetAdmitted(c.ID, nil)
			}
			a.pins.add(c.ID, info.admitted)
			repin = true
		}
	}
	return a.effectiveChanges(out, pinned, repin), a.changeCause(c)
}

// effectiveChanges turns the engine's changes into changes of what each
// device's document says: a pinned device follows its restore point, not
// the engine. before holds the devices whose effective deployment before
// the change is known from elsewhere (they were just pinned or unpinned);
// repin re-judges every pinned device.
func (a *Assigner) effectiveChanges(out []evaluator.Change, before map[string]string, repin bool) []evaluator.Change {
	if len(before) == 0 && !repin && len(a.pins.by) == 0 {
		return out // no restore point anywhere: the engine's changes are the changes
	}
	from := map[string]string{}
	for id, dep := range before {
		from[id] = dep
	}
	var layers []evaluator.Change // a layer's changes pass through: the base decides nothing about them
	for _, m := range out {
		if m.Layer != "" {
			layers = append(layers, m)
			continue
		}
		if _, ok := from[m.DeviceID]; !ok {
			if eff, ok := a.pins.effective(m.DeviceID); ok {
				from[m.DeviceID] = eff
			} else {
				from[m.DeviceID] = m.From
			}
		}
	}
	if repin {
		for id := range a.pins.by {
			if _, ok := from[id]; !ok {
				from[id] = a.pins.current[id]
			}
		}
	}
	res := make([]evaluator.Change, 0, len(from))
	for id, f := range from {
		to := a.effectiveLocked(id)
		a.pins.setCurrent(id, to.deployment)
		if to.deployment != f {
			res = append(res, evaluator.Change{DeviceID: id, From: f, To: to.deployment})
		}
	}
	res = append(res, layers...)
	slices.SortStableFunc(res, func(x, y evaluator.Change) int {
		return cmp.Or(strings.Compare(x.DeviceID, y.DeviceID), strings.Compare(x.Layer, y.Layer))
	})
	return res
}

// Restore rebuilds the assignments from the whole state (at open, and
// after a snapshot was installed), then sends every device connected here
// its current document: the state was replaced under them, and an agent
// ignores a document it already runs. A read that fails leaves the
// assignments partial: the error is returned, and from then on (decided
// before the lock is released) no document is built or sent.
func (a *Assigner) Restore(r *raftstore.Reader) error {
	a.mu.Lock()
	a.engine.Reset()
	a.versions.reset(r.AppliedIndex())
	a.applied = r.AppliedIndex()
	a.rollouts = map[string]*rolloutInfo{}
	a.pins = newPins()
	a.positions.reset()
	a.held = map[string]bool{}
	a.merges.clear()
	a.reports.clear() // an index names the same report only within one history
	err := a.restoreLocked(r)
	if err != nil {
		a.failed = fmt.Errorf("rebuild assignments: %w", err)
		a.mu.Unlock()
		return a.failed
	}
	var resend []evaluator.Change
	if a.cfg.Publisher != nil {
		for _, id := range a.cfg.Publisher.Connected() {
			resend = append(resend, evaluator.Change{DeviceID: id, To: a.effectiveLocked(id).deployment})
		}
	}
	a.mu.Unlock()
	a.wake()
	a.Push(resend)
	return nil
}

func (a *Assigner) restoreLocked(r *raftstore.Reader) error {
	// Devices first, so that each deployment then finds its devices
	// through the engine's indexes rather than device by device.
	a.engine.Grow(r.DeviceCount())
	err := r.DeviceTags(func(id string, tags json.RawMessage) error {
		if _, err := a.engine.PutDeviceJSON(id, tags); err != nil {
			return fmt.Errorf("tags of device %q: %w", id, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	err = r.Rollouts(func(ro fleet.Rollout) bool {
		info := a.rolloutOf(ro.Deployment)
		info.rollout = ro
		if ro.State == fleet.RolloutCompleted {
			info.admitted = nil // as Apply drops them on completion
			return true
		}
		err = r.RolloutDevices(ro.Deployment, func(id string, d fleet.RolloutDevice) bool {
			info.admitted[id] = d
			return true
		})
		return err == nil
	})
	if err != nil {
		return err
	}
	err = r.Deployments("", func(d fleet.Deployment) bool {
		var ro *fleet.Rollout
		if info := a.rollouts[d.ID]; info != nil {
			ro = &info.rollout
		}
		a.noteRollout(d.ID, &d, ro)
		if err := a.engine.RestoreDeployment(engineDeployment(&d, ro)); err != nil {
			a.logger.Error("stored target condition does not compile; the deployment targets no device",
				"deployment", d.ID, "err", err)
		}
		return true
	})
	if err != nil {
		return err
	}
	for id, info := range a.rollouts {
		switch info.rollout.State {
		case fleet.RolloutCompleted:
		case fleet.RolloutRolledBack:
			a.pins.add(id, info.admitted)
		default:
			a.engine.SetAdmitted(id, slices.Collect(maps.Keys(info.admitted)))
		}
	}
	for id := range a.pins.by {
		a.pins.setCurrent(id, a.effectiveLocked(id).deployment)
	}
	return nil
}

// stoppedLocked is why no document may be sent, nil when they may; the
// caller holds a.mu.
func (a *Assigner) stoppedLocked() error {
	if a.failed != nil {
		return a.failed
	}
	if a.cfg.Stopped != nil {
		return a.cfg.Stopped()
	}
	return nil
}

// changeCause says in words which change moved a device.
func (a *Assigner) changeCause(c raftstore.Change) string {
	switch c.Kind {
	case raftstore.DevicePut:
		if c.Imported {
			return "the device was imported"
		}
		return "the device's tags changed"
	case raftstore.DeviceDeleted:
		if c.Imported {
			return "the device was deleted by an import"
		}
		return "the device was deleted"
	case raftstore.DeploymentPut:
		return "deployment " + c.ID + " was written"
	case raftstore.DeploymentDeleted:
		return "deployment " + c.ID + " was deleted"
	case raftstore.RolloutAdmitted:
		return "the rollout of " + c.ID + " reached it"
	case raftstore.RolloutChanged:
		switch c.Action {
		case fleet.RolloutComplete:
			return "the rollout of " + c.ID + " completed"
		case fleet.RolloutRollback:
			return "the rollout of " + c.ID + " was rolled back: back to what it ran before"
		}
		return "the rollout of " + c.ID + ": " + c.Action
	case raftstore.DeviceReset:
		who := ""
		if c.Actor != "" {
			who = " by " + c.Actor
		}
		return "the device was reset" + who + ": no deployment targets it, so it is sent an empty document"
	}
	return "a change"
}

// deploymentEvent describes a change of a deployment for its history.
func (a *Assigner) deploymentEvent(c raftstore.Change, at time.Time) (fleet.HistoryEvent, bool) {
	ev := fleet.HistoryEvent{Time: at, Index: c.Index, Actor: c.Actor}
	switch c.Kind {
	case raftstore.DeploymentPut:
		d := c.Deployment
		ev.Kind = "updated"
		if c.Created {
			ev.Kind = "created"
		}
		labels, _ := json.Marshal(d.Labels)
		ev.What = fmt.Sprintf("targetCondition %q, priority %d, labels %s", d.TargetCondition, d.Priority, labels)
		if d.Rollout != nil {
			ev.What += ", rollout " + describePolicy(*d.Rollout)
		}
	case raftstore.DeploymentDeleted:
		ev.Kind, ev.What = "deleted", "deleted"
	case raftstore.RolloutChanged:
		ev.Kind, ev.What = "rollout", a.describeAction(c)
	default:
		return ev, false
	}
	return ev, true
}

func admittedOf(list []raftstore.RolloutAdmission) map[string]fleet.RolloutDevice {
	m := make(map[string]fleet.RolloutDevice, len(list))
	for _, ad := range list {
		m[ad.DeviceID] = ad.RolloutDevice
	}
	return m
}

// EngineDeployment is what the evaluator needs of a deployment, gated
// while its rollout (ro, nil for none) is active.
func EngineDeployment(d *fleet.Deployment, ro *fleet.Rollout) evaluator.Deployment {
	return engineDeployment(d, ro)
}

func engineDeployment(d *fleet.Deployment, ro *fleet.Rollout) evaluator.Deployment {
	return evaluator.Deployment{
		ID:              d.ID,
		Condition:       d.TargetCondition,
		Priority:        d.Priority,
		CreatedUnixNano: d.CreatedTimeUTC.UnixNano(),
		Gated:           ro.Active(),
		Layered:         d.Layered,
	}
}
