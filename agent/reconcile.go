package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/fleet"
)

// module is the agent's view of one module: what is desired of it, the
// instance it created for it, and what it last observed. Only the Run
// goroutine touches modules, except during a startup-order group, when each
// module of the group is touched by its own goroutine alone.
type module struct {
	name string
	spec *moduleSpec // nil: not desired any more, to be removed

	handle string // the runtime instance; "" when there is none
	hash   string // spec.hash() of what the instance was created from

	st             instanceState // last observed
	started        bool          // the instance has run at least once
	stoppedByAgent bool          // the agent stopped it (its exit is not the module's own)
	dead           bool          // gave up restarting until a new desired version

	runtimeStatus string
	exitCode      int
	description   string
	lastStart     time.Time
	lastExit      time.Time
	lastRestart   time.Time
	restartCount  int
	nextAction    time.Time // when a backoff ends; zero when none is pending
	opErr         string    // the last failed operation; "" after a success
	unsupported   bool      // the runtime cannot run its type
}

// reconciler makes the runtime match the plan.
type reconciler struct {
	drv     driver
	st      *store
	log     *slog.Logger
	restart RestartConfig
	stopTO  time.Duration
	opTO    time.Duration
	now     func() time.Time

	plan    *plan
	modules map[string]*module

	// progress is called after each startup-order group, from the Run
	// goroutine, so that a long plan reports as it goes.
	progress func()
	// wake asks for another pass soon; it never blocks.
	wake func()
}

func newReconciler(cfg Config, drv driver, st *store) *reconciler {
	return &reconciler{
		drv:      drv,
		st:       st,
		log:      cfg.Logger,
		restart:  cfg.Restart,
		stopTO:   cfg.StopTimeout,
		opTO:     cfg.OperationTimeout,
		now:      time.Now,
		modules:  map[string]*module{},
		progress: func() {},
		wake:     func() {},
	}
}

// adopt registers an instance recorded in the state file.
func (r *reconciler) adopt(name string, rec moduleRecord) {
	r.modules[name] = &module{name: name, handle: rec.Handle, hash: rec.Hash, runtimeStatus: fleet.RuntimeUnknown}
}

// setPlan makes p the desired state. With fresh set (a new desired version
// rather than the stored one at start), modules the agent gave up on get
// another chance: a new version never inherits an old failure.
func (r *reconciler) setPlan(p *plan, fresh bool) {
	r.plan = p
	for name, m := range r.modules {
		if _, ok := p.modules[name]; !ok {
			m.spec = nil
		}
	}
	for name, spec := range p.modules {
		m, ok := r.modules[name]
		if !ok {
			m = &module{name: name, runtimeStatus: fleet.RuntimeUnknown}
			r.modules[name] = m
		}
		if m.spec != nil && m.spec.Status == statusStopped && spec.Status == statusRunning {
			// Asked to run again: start it whatever its restart policy.
			m.stoppedByAgent = true
		}
		if fresh && m.dead {
			m.dead = false
			m.restartCount = 0
			m.nextAction = time.Time{}
		}
		m.spec = spec
	}
}

// pass runs one reconciliation: observe every instance, remove what is not
// desired, then create, start, stop or restart desired modules in startup
// order (lower first; equal orders together). It returns early when ctx is
// cancelled (a newer desired document pre-empts it); whatever it did is
// recorded, and the next pass continues from what it observes.
func (r *reconciler) pass(ctx context.Context) {
	if r.plan == nil {
		return
	}
	for _, m := range r.sorted() {
		if m.handle != "" {
			r.observe(ctx, m)
		}
	}
	r.sweepOrphans(ctx)
	for _, m := range r.sorted() {
		if m.spec != nil {
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if err := r.removeInstance(ctx, m); err != nil {
			r.log.Warn("remove module", "module", m.name, "err", err)
			m.opErr = "remove: " + err.Error()
			continue
		}
		r.log.Info("module removed", "module", m.name)
		delete(r.modules, m.name)
		if f, ok := r.drv.(moduleForgetter); ok {
			f.forgetModule(m.name)
		}
	}
	for _, group := range r.groups() {
		if ctx.Err() != nil {
			return
		}
		var wg sync.WaitGroup
		for _, m := range group {
			wg.Go(func() { r.ensure(ctx, m) })
		}
		wg.Wait()
		r.progress()
	}
}

func (r *reconciler) sorted() []*module {
	ms := make([]*module, 0, len(r.modules))
	for _, m := range r.modules {
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b *module) int { return strings.Compare(a.name, b.name) })
	return ms
}

// groups returns the desired modules grouped by startupOrder, ascending.
func (r *reconciler) groups() [][]*module {
	var ms []*module
	for _, m := range r.sorted() {
		if m.spec != nil {
			ms = append(ms, m)
		}
	}
	slices.SortStableFunc(ms, func(a, b *module) int { return cmp.Compare(a.spec.StartupOrder, b.spec.StartupOrder) })
	var out [][]*module
	for i, m := range ms {
		if i == 0 || m.spec.StartupOrder != ms[i-1].spec.StartupOrder {
			out = append(out, nil)
		}
		out[len(out)-1] = append(out[len(out)-1], m)
	}
	return out
}

// observe reads an instance's state into the module.
func (r *reconciler) observe(ctx context.Context, m *module) {
	st, err := r.drv.Inspect(ctx, m.handle)
	if errors.Is(err, errGone) {
		if m.spec != nil {
			r.log.Warn("module instance is gone; it will be recreated", "module", m.name)
		}
		r.forget(m)
		return
	}
	if err != nil {
		m.description = "inspect: " + err.Error()
		return
	}
	now := r.now()
	m.st = st
	if !st.StartedAt.IsZero() {
		m.started = true
		m.lastStart = st.StartedAt
	}
	if st.Running {
		m.runtimeStatus = fleet.RuntimeRunning
		m.description = ""
		if st.Health == "unhealthy" {
			m.runtimeStatus = fleet.RuntimeUnhealthy
			m.description = "the runtime's health check fails"
		}
		if m.restartCount > 0 && !m.lastStart.IsZero() && now.Sub(m.lastStart) >= r.restart.HealthyReset {
			// Long enough without trouble: the next failure starts the
			// backoff afresh.
			m.restartCount = 0
		}
		return
	}
	if !st.FinishedAt.IsZero() {
		m.lastExit = st.FinishedAt
		m.exitCode = st.ExitCode
	}
	switch {
	case m.dead:
		m.runtimeStatus = fleet.RuntimeDead
	case m.stoppedByAgent || !m.started:
		m.runtimeStatus = fleet.RuntimeStopped
		m.description = ""
	case m.exitCode == 0:
		m.runtimeStatus = fleet.RuntimeStopped
		m.description = "exited with code 0"
	default:
		m.runtimeStatus = fleet.RuntimeFailed
		m.description = fmt.Sprintf("exited with code %d", m.exitCode)
	}
	if st.Error != "" && !m.dead {
		m.description = st.Error
	}
}

// forget drops the module's instance from the agent's records.
func (r *reconciler) forget(m *module) {
	if err := r.st.deleteModule(m.name); err != nil {
		r.log.Error("update state: forget module instance", "module", m.name, "err", err)
	}
	m.handle, m.hash = "", ""
	m.st = instanceState{}
	m.started = false
}

// sweepOrphans deals with instances the runtime says this agent created
// but that it has no record of (its state file was lost, or a create was
// interrupted before the id was stored): one that matches a desired module
// without an instance, spec hash included, is adopted; the others are
// removed.
func (r *reconciler) sweepOrphans(ctx context.Context) {
	owned, err := r.drv.Owned(ctx)
	if err != nil {
		r.log.Warn("list owned instances", "err", err)
		return
	}
	known := map[string]bool{}
	for _, m := range r.modules {
		if m.handle != "" {
			known[m.handle] = true
		}
	}
	for _, o := range owned {
		if known[o.Handle] {
			continue
		}
		if m := r.modules[o.Module]; m != nil && m.spec != nil && m.handle == "" && o.Hash == m.spec.hash() {
			r.log.Info("adopting an instance this agent created earlier", "module", m.name, "handle", shortID(o.Handle))
			m.handle, m.hash = o.Handle, o.Hash
			known[o.Handle] = true
			if err := r.st.putModule(m.name, moduleRecord{Runtime: r.drv.Name(), Handle: o.Handle, Hash: o.Hash, Created: r.now().UTC()}); err != nil {
				r.log.Error("update state: record module instance", "module", m.name, "err", err)
			}
			r.observe(ctx, m)
			continue
		}
		r.log.Warn("removing an instance this agent created but no longer tracks", "module", o.Module, "handle", shortID(o.Handle))
		sctx, cancel := r.stopContext(ctx)
		if err := r.drv.Remove(sctx, o.Handle); err != nil {
			r.log.Warn("remove untracked instance", "handle", shortID(o.Handle), "err", err)
		}
		cancel()
	}
}

// stopContext bounds a stop or removal. It is not cancelled by a newer
// desired document: a module being stopped gets its grace period.
func (r *reconciler) stopContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), r.stopTO+time.Minute)
}

// removeInstance stops (gracefully) and deletes the module's instance.
func (r *reconciler) removeInstance(ctx context.Context, m *module) error {
	if m.handle == "" {
		return nil
	}
	sctx, cancel := r.stopContext(ctx)
	defer cancel()
	if err := r.drv.Stop(sctx, m.handle, r.stopTO); err != nil && !errors.Is(err, errGone) {
		r.log.Warn("stop module before removal", "module", m.name, "err", err)
	}
	if err := r.drv.Remove(sctx, m.handle); err != nil {
		return err
	}
	r.forget(m)
	return nil
}

// ensure drives one desired module one step towards its spec.
func (r *reconciler) ensure(ctx context.Context, m *module) {
	s := m.spec
	if !r.drv.Supports(s.Type) {
		m.unsupported = true
		m.runtimeStatus = fleet.RuntimeFailed
		m.description = fmt.Sprintf("module type %q cannot run on this device: the agent runs the %s runtime", s.Type, r.drv.Name())
		m.opErr = ""
		return
	}
	m.unsupported = false
	if m.handle != "" && m.hash != s.hash() {
		r.log.Info("module settings changed; replacing its instance", "module", m.name)
		if err := r.removeInstance(ctx, m); err != nil {
			r.fail(ctx, m, "remove old instance", err)
			return
		}
		// A new instance starts with a clean history.
		m.restartCount, m.dead, m.nextAction = 0, false, time.Time{}
		m.lastRestart, m.lastExit, m.exitCode = time.Time{}, time.Time{}, 0
		m.stoppedByAgent = false
	}
	if m.handle == "" {
		if err := r.create(ctx, m); err != nil {
			r.fail(ctx, m, "create", err)
			return
		}
	}
	if s.Status == statusStopped {
		if m.st.Running {
			sctx, cancel := r.stopContext(ctx)
			err := r.drv.Stop(sctx, m.handle, r.stopTO)
			cancel()
			if err != nil && !errors.Is(err, errGone) {
				r.fail(ctx, m, "stop", err)
				return
			}
			r.log.Info("module stopped", "module", m.name)
			m.st.Running = false
		}
		m.stoppedByAgent = true
		m.runtimeStatus = fleet.RuntimeStopped
		m.description, m.opErr = "", ""
		m.nextAction = time.Time{}
		return
	}
	m.opErr = ""
	if m.st.Running {
		if m.st.Health == "unhealthy" && restartsWhenUnhealthy(s.RestartPolicy) {
			r.restartUnhealthy(ctx, m)
		}
		return
	}
	if m.dead {
		m.runtimeStatus = fleet.RuntimeDead
		return
	}
	if !m.started || m.stoppedByAgent {
		r.start(ctx, m, false)
		return
	}
	if !restartsAfterExit(s.RestartPolicy, m.exitCode) {
		m.nextAction = time.Time{}
		return
	}
	if m.restartCount >= r.restart.MaxRestarts {
		r.giveUp(m)
		return
	}
	due := m.lastExit.Add(r.restart.coolOff(m.restartCount))
	if now := r.now(); now.Before(due) {
		m.runtimeStatus = fleet.RuntimeBackoff
		m.description = fmt.Sprintf("exited with code %d; restarting in %s", m.exitCode, due.Sub(now).Round(time.Millisecond))
		m.nextAction = due
		return
	}
	r.start(ctx, m, true)
}

func (r *reconciler) giveUp(m *module) {
	m.dead = true
	m.runtimeStatus = fleet.RuntimeDead
	m.nextAction = time.Time{}
	m.description = fmt.Sprintf("exited with code %d; gave up after %d restarts", m.exitCode, m.restartCount)
	r.log.Warn("module keeps failing; not restarting it until a new desired version", "module", m.name, "restarts", m.restartCount, "exitCode", m.exitCode)
}

// restartUnhealthy restarts a running module whose health check fails,
// with the same backoff as after an exit.
func (r *reconciler) restartUnhealthy(ctx context.Context, m *module) {
	if m.restartCount >= r.restart.MaxRestarts {
		m.description = fmt.Sprintf("the runtime's health check fails; gave up after %d restarts", m.restartCount)
		return
	}
	since := m.lastStart
	if !m.lastRestart.IsZero() && m.lastRestart.After(since) {
		since = m.lastRestart
	}
	due := since.Add(r.restart.coolOff(m.restartCount))
	if now := r.now(); now.Before(due) {
		m.nextAction = due
		return
	}
	sctx, cancel := r.stopContext(ctx)
	err := r.drv.Stop(sctx, m.handle, r.stopTO)
	cancel()
	if err != nil {
		r.fail(ctx, m, "stop unhealthy module", err)
		return
	}
	r.start(ctx, m, true)
}

// create makes a new instance and records it before anything else happens.
func (r *reconciler) create(ctx context.Context, m *module) error {
	cctx, cancel := context.WithTimeout(ctx, r.opTO)
	defer cancel()
	h, err := r.drv.Create(cctx, m.spec, r.plan.credentials)
	if err != nil {
		return err
	}
	m.handle, m.hash = h, m.spec.hash()
	m.st, m.started, m.stoppedByAgent = instanceState{}, false, false
	rec := moduleRecord{Runtime: r.drv.Name(), Handle: h, Hash: m.hash, Created: r.now().UTC()}
	if err := r.st.putModule(m.name, rec); err != nil {
		r.log.Error("update state: record module instance", "module", m.name, "err", err)
	}
	r.log.Info("module created", "module", m.name, "handle", shortID(h))
	return nil
}

// start starts the instance; restart counts it as a restart.
func (r *reconciler) start(ctx context.Context, m *module, restart bool) {
	now := r.now()
	if restart {
		m.restartCount++
		m.lastRestart = now
	}
	cctx, cancel := context.WithTimeout(ctx, r.opTO)
	err := r.drv.Start(cctx, m.handle)
	cancel()
	if errors.Is(err, errGone) {
		r.forget(m)
		m.runtimeStatus = fleet.RuntimeUnknown
		r.wake() // create it again without waiting for a resync
		return
	}
	if err != nil {
		// A failed restart backs off like an exit does.
		m.lastExit = now
		r.fail(ctx, m, "start", err)
		return
	}
	m.st.Running = true
	m.started, m.stoppedByAgent = true, false
	m.runtimeStatus = fleet.RuntimeRunning
	m.description, m.opErr = "", ""
	m.lastStart = now
	m.nextAction = time.Time{}
	if restart {
		r.log.Info("module restarted", "module", m.name, "restartCount", m.restartCount)
	} else {
		r.log.Info("module started", "module", m.name)
	}
}

// Errors of restartNow.
var (
	errModuleUnknown  = errors.New("not in the running deployment")
	errModuleStopped  = errors.New("desired stopped (status \"stopped\" in the deployment): nothing to restart")
	errModuleNotReady = errors.New("has no instance yet (it is being created, or its creation failed: see its status)")
)

// restartNow stops a module's instance (gracefully) and starts it again,
// at an operator's request (the RestartModule direct method): a new
// process or a new start of its container. It is not a failure: the
// restart count and backoff are left as they are (a module the agent gave
// up on, dead, gets another chance). Run goroutine only, between passes.
func (r *reconciler) restartNow(ctx context.Context, name string) error {
	m := r.modules[name]
	switch {
	case m == nil || m.spec == nil:
		return errModuleUnknown
	case m.spec.Status == statusStopped:
		return errModuleStopped
	case m.handle == "" || m.unsupported:
		return errModuleNotReady
	}
	if m.st.Running {
		// The exit this causes is the agent's doing, not the module's.
		m.stoppedByAgent = true
		sctx, cancel := r.stopContext(ctx)
		err := r.drv.Stop(sctx, m.handle, r.stopTO)
		cancel()
		if err != nil && !errors.Is(err, errGone) {
			return fmt.Errorf("stop: %w", err)
		}
		m.st.Running = false
	}
	m.dead, m.nextAction = false, time.Time{}
	now := r.now()
	cctx, cancel := context.WithTimeout(ctx, r.opTO)
	err := r.drv.Start(cctx, m.handle)
	cancel()
	if errors.Is(err, errGone) {
		r.forget(m)
		m.runtimeStatus = fleet.RuntimeUnknown
		r.wake()
		return errors.New("its instance was gone; the agent creates a new one")
	}
	if err != nil {
		m.lastExit = now
		r.fail(ctx, m, "start", err)
		return fmt.Errorf("start: %w", err)
	}
	m.st.Running = true
	m.started, m.stoppedByAgent = true, false
	m.runtimeStatus = fleet.RuntimeRunning
	m.description, m.opErr = "", ""
	m.lastStart, m.lastRestart = now, now
	r.log.Info("module restarted by a RestartModule direct method", "module", m.name)
	return nil
}

// fail records a failed operation. An operation cut short by a newer
// desired document is not a failure.
func (r *reconciler) fail(ctx context.Context, m *module, op string, err error) {
	if ctx.Err() != nil {
		return
	}
	m.opErr = op + ": " + err.Error()
	m.description = m.opErr
	if !m.st.Running {
		m.runtimeStatus = fleet.RuntimeFailed
	}
	r.log.Warn("module operation failed", "module", m.name, "op", op, "err", err)
}

func restartsAfterExit(policy string, exitCode int) bool {
	switch policy {
	case policyAlways:
		return true
	case policyOnFailure, policyOnUnhealthy:
		return exitCode != 0
	}
	return false
}

func restartsWhenUnhealthy(policy string) bool {
	return policy == policyOnUnhealthy || policy == policyAlways
}

// nextDeadline is when the reconciler next needs to act without being
// woken: a backoff ending, or a restart count to clear.
func (r *reconciler) nextDeadline() time.Time {
	var next time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, m := range r.modules {
		consider(m.nextAction)
		if m.st.Running && m.restartCount > 0 && !m.lastStart.IsZero() {
			consider(m.lastStart.Add(r.restart.HealthyReset))
		}
	}
	return next
}

// planStatus is the lastDesiredStatus of the applied plan: 417 when the
// runtime cannot run some module, 500 when an operation failed, else 200.
func (r *reconciler) planStatus() (int, string) {
	var unsupported, failed []string
	for _, m := range r.sorted() {
		switch {
		case m.unsupported && m.spec != nil:
			unsupported = append(unsupported, fmt.Sprintf("%s (type %s)", m.name, m.spec.Type))
		case m.opErr != "":
			failed = append(failed, fmt.Sprintf("module %s: %s", m.name, m.opErr))
		}
	}
	if len(unsupported) > 0 {
		return fleet.StatusCodeUnsupportedRuntime, fmt.Sprintf("the %s runtime cannot run modules %s", r.drv.Name(), strings.Join(unsupported, ", "))
	}
	if len(failed) > 0 {
		return fleet.StatusCodeFailed, strings.Join(failed, "; ")
	}
	return fleet.StatusCodeOK, ""
}

// stopAll stops every running instance, in reverse startup order (higher
// orders first, equal orders together). The process runtime's modules do
// not outlive the agent.
// stopAll stops, in reverse startup order, the modules whose instance
// stop(handle) says to stop.
func (r *reconciler) stopAll(ctx context.Context, stop func(handle string) bool) {
	groups := r.groups()
	slices.Reverse(groups)
	var undesired []*module
	for _, m := range r.modules {
		if m.spec == nil {
			undesired = append(undesired, m)
		}
	}
	groups = append([][]*module{undesired}, groups...)
	for _, g := range groups {
		var wg sync.WaitGroup
		for _, m := range g {
			if m.handle == "" || !stop(m.handle) {
				continue
			}
			wg.Go(func() {
				if err := r.drv.Stop(ctx, m.handle, r.stopTO); err != nil && !errors.Is(err, errGone) {
					r.log.Warn("stop module at shutdown", "module", m.name, "err", err)
					return
				}
				m.st.Running = false
				m.stoppedByAgent = true
				m.runtimeStatus = fleet.RuntimeStopped
				m.description = "the agent is shutting down"
			})
		}
		wg.Wait()
	}
}

// moduleStatuses renders the desired modules for the report.
func (r *reconciler) moduleStatuses() map[string]fleet.ModuleStatus {
	out := map[string]fleet.ModuleStatus{}
	for name, m := range r.modules {
		if m.spec == nil {
			continue
		}
		rs := m.runtimeStatus
		if rs == "" {
			rs = fleet.RuntimeUnknown
		}
		out[name] = fleet.ModuleStatus{
			RuntimeStatus:      rs,
			Status:             m.spec.Status,
			ExitCode:           m.exitCode,
			StatusDescription:  truncate(m.description, maxModuleDescription),
			LastStartTimeUTC:   utcPtr(m.lastStart),
			LastExitTimeUTC:    utcPtr(m.lastExit),
			LastRestartTimeUTC: utcPtr(m.lastRestart),
			RestartCount:       m.restartCount,
			Settings:           fleet.ModuleSettings{Image: m.spec.image()},
		}
	}
	return out
}

func utcPtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC().Round(time.Millisecond)
	return &u
}
