package assign

import (
	"encoding/json"
	"fmt"
	"log/slog"
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
}

// Assigner keeps the assignments (which deployment applies to each
// device) and the desired versions. Apply and Restore run on raft's apply
// goroutine; reads take the same lock shared, so that a reader that needs
// a device's record and its assignment to agree (holding a read
// transaction of the replica) sees both at one applied index.
type Assigner struct {
	cfg    Config
	logger *slog.Logger

	// mu orders updates from the apply path against readers: the engine
	// and the versions change together under it.
	mu       sync.RWMutex
	engine   *evaluator.Engine
	versions versions
	// failed is why Restore could not rebuild the assignments: they are
	// partial, and nothing computed from them may reach a device.
	failed error
}

// New returns an empty Assigner; Restore fills it from the state.
func New(cfg Config) *Assigner {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Assigner{cfg: cfg, logger: cfg.Logger, engine: evaluator.NewEngine()}
}

// Apply updates the assignments from one committed batch of changes, in
// log order. It returns the devices whose applied deployment changed (to
// be sent their new document with Push once the caller has done what must
// come first) and the history items of the batch.
func (a *Assigner) Apply(changes []raftstore.Change) (moved []evaluator.Change, items []history.Item) {
	a.mu.Lock()
	defer a.mu.Unlock()
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
			items = append(items, history.Item{Deployment: c.ID, Event: ev})
		}
		switch c.Kind {
		case raftstore.DevicePut:
			out = a.engine.PutDevice(c.ID, c.Device.Tags)
		case raftstore.DeviceDeleted:
			out = a.engine.DeleteDevice(c.ID)
		case raftstore.DeploymentPut:
			var err error
			out, err = a.engine.PutDeployment(engineDeployment(c.Deployment))
			if err != nil {
				// Validated before raft; only a condition this binary no
				// longer accepts gets here. It then targets nothing.
				a.logger.Error("stored target condition does not compile; the deployment targets no device",
					"deployment", c.ID, "err", err)
				out = a.engine.DeleteDeployment(c.ID)
			}
		case raftstore.DeploymentDeleted:
			out = a.engine.DeleteDeployment(c.ID)
		}
		if len(out) == 0 {
			continue
		}
		for _, m := range out {
			a.versions.set(m.DeviceID, c.Index)
		}
		items = append(items, history.Item{Event: fleet.HistoryEvent{Time: at, Index: c.Index}, Cause: changeCause(c), Moves: out})
		if moved == nil {
			moved = out // usually the only change that moves devices
		} else {
			moved = append(moved, out...)
		}
	}
	return moved, items
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
	// Devices first, so that each deployment then finds its devices
	// through the engine's indexes rather than device by device.
	err := r.Devices("", func(d fleet.Device) bool {
		a.engine.PutDevice(d.ID, d.Tags)
		return true
	})
	if err == nil {
		err = r.Deployments("", func(d fleet.Deployment) bool {
			if _, err := a.engine.PutDeployment(engineDeployment(&d)); err != nil {
				a.logger.Error("stored target condition does not compile; the deployment targets no device",
					"deployment", d.ID, "err", err)
			}
			return true
		})
	}
	if err != nil {
		a.failed = fmt.Errorf("rebuild assignments: %w", err)
		a.mu.Unlock()
		return a.failed
	}
	var resend []evaluator.Change
	if a.cfg.Publisher != nil {
		for _, id := range a.cfg.Publisher.Connected() {
			resend = append(resend, evaluator.Change{DeviceID: id, To: a.engine.Applied(id)})
		}
	}
	a.mu.Unlock()
	a.Push(resend)
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
func deploymentEvent(c raftstore.Change, at time.Time) (fleet.HistoryEvent, bool) {
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
	case raftstore.DeploymentDeleted:
		ev.Kind, ev.What = "deleted", "deleted"
	default:
		return ev, false
	}
	return ev, true
}

// EngineDeployment is what the evaluator needs of a deployment.
func EngineDeployment(d *fleet.Deployment) evaluator.Deployment { return engineDeployment(d) }

func engineDeployment(d *fleet.Deployment) evaluator.Deployment {
	return evaluator.Deployment{
		ID:              d.ID,
		Condition:       d.TargetCondition,
		Priority:        d.Priority,
		CreatedUnixNano: d.CreatedTimeUTC.UnixNano(),
	}
}
