package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/url"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"appliance/fleet"
	"appliance/linelog"
)

// Agent is the device runtime. Build it with New and call Run once.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	baseLog *slog.Logger // without component=agent, for the hub's and workload's own
	urls    []*url.URL
	tlsCfg  *tls.Config

	running atomic.Bool

	// wake asks the Run loop for a pass (a desired document arrived, an
	// instance changed); kick asks the reporter to publish; hubKick asks
	// the Run loop for a new report (the hub's state changed).
	wake    chan struct{}
	kick    chan struct{}
	hubKick chan struct{}

	mu         sync.Mutex
	pending    *incoming          // the newest desired document not yet processed
	badPayload error              // a payload that was no desired document
	seen       uint64             // the highest version accepted for processing
	seenAny    bool               // whether any document has been
	passCancel context.CancelFunc // cancels the pass in progress

	report       atomic.Pointer[fleet.ReportedDocument]
	reportBytes  []byte      // the last report built (Run goroutine only)
	forceReport  atomic.Bool // publish even if unchanged (a connection came up)
	reportFailed atomic.Bool

	// Owned by the Run goroutine.
	st   *store
	drv  driver
	rec  *reconciler
	plan *plan
	last lastRecord
	// desiredRaw is the running plan's desired document as received.
	desiredRaw []byte

	// edge is the device hub and the identity service; nil when disabled.
	edge *edge
	// moduleTypes are the running plan's module types, for the workload
	// API's peer check (any goroutine).
	moduleTypes atomic.Pointer[map[string]string]

	// Remote troubleshooting (methods.go): the agent's log file; what the
	// direct methods read of the Run goroutine's state, published by it;
	// restarts asked for, carried out by the Run goroutine.
	agentLog   *agentLog
	troubled   atomic.Pointer[troubleView]
	restarts   chan restartRequest
	bundles    bundleCache
	secretsSet atomic.Pointer[[]string]
}

// incoming is a desired document waiting to be processed.
type incoming struct {
	payload []byte
	doc     fleet.DesiredDocument
}

// New checks cfg and builds an agent. Nothing is opened or contacted
// before Run.
func New(cfg Config) (*Agent, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	urls, err := parseServers(cfg.Servers, cfg.CAFile != "" || cfg.TLSConfig != nil)
	if err != nil {
		return nil, err
	}
	tlsCfg, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	// Everything the agent, its hub and its identity service log also goes
	// to the agent's log file, once Run opens it.
	al := &agentLog{}
	base := slog.New(logFileTee{base: cfg.Logger.Handler(), file: slog.NewTextHandler(al, &slog.HandlerOptions{Level: slog.LevelDebug})})
	cfg.Logger = base.With("component", "agent")
	return &Agent{
		cfg:      cfg,
		baseLog:  base,
		log:      cfg.Logger,
		urls:     urls,
		tlsCfg:   tlsCfg,
		wake:     make(chan struct{}, 1),
		kick:     make(chan struct{}, 1),
		hubKick:  make(chan struct{}, 1),
		agentLog: al,
		restarts: make(chan restartRequest),
	}, nil
}

// Run opens the local state, starts the runtime and runs the last stored
// desired document at once (with or without a controller), connects to
// the controller, and reconciles until ctx is done. It returns nil after a
// graceful shutdown: containers keep running; process modules are stopped
// (they are the agent's children, and the next Run starts them again).
// An Agent runs once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return ErrAlreadyRunning
	}
	st, err := openStore(a.cfg.DataDir, a.cfg.dbPath())
	if err != nil {
		return err
	}
	defer st.Close()
	a.st = st
	logFile, err := linelog.Open(a.cfg.agentLogPath(), a.cfg.Logs)
	if err != nil {
		return fmt.Errorf("the agent's log file: %w", err)
	}
	a.agentLog.w.Store(logFile)
	defer func() {
		a.agentLog.w.Store(nil)
		logFile.Close()
	}()
	if a.cfg.EnrollToken != "" {
		own, err := st.ownKey()
		if err != nil {
			return err
		}
		derived, err := fleet.DeriveDeviceKey(a.cfg.EnrollToken, a.cfg.DeviceID)
		if err != nil {
			return err
		}
		a.cfg.DeviceKey = fleet.EnrollmentKey(derived, own)
	}
	drv, err := newDriver(a.cfg, a.poke)
	if err != nil {
		return err
	}
	defer drv.Close()
	a.drv = drv
	a.rec = newReconciler(a.cfg, drv, st)
	a.rec.progress = a.buildReport
	a.rec.wake = a.poke
	// The hub and the identity service outlive ctx a little: process
	// modules still talk to them while they stop.
	edgeCtx, stopEdge := context.WithCancel(context.WithoutCancel(ctx))
	defer stopEdge()
	if !a.cfg.Hub.Disabled {
		e, err := a.openEdge(ctx)
		if err != nil {
			return err
		}
		defer e.close()
		a.edge = e
	}
	if err := a.restore(); err != nil {
		return err
	}
	if a.edge != nil {
		if err := a.edge.start(edgeCtx); err != nil {
			return err
		}
	}
	a.log.Info("agent starting", "device", a.cfg.DeviceID, "runtime", drv.Name(), "version", a.cfg.Version,
		"desiredVersion", a.last.Version, "modules", len(a.rec.modules))

	// The session outlives ctx a little: the final report goes out after
	// the modules stop.
	sessCtx, stopSession := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSession()
	sess := newSession(a.cfg, a.urls, a.tlsCfg, a.offerDesired, func() {
		a.forceReport.Store(true)
		poke(a.kick)
		if a.edge != nil {
			a.edge.h.UpstreamAvailable()
		}
	})
	if a.edge != nil {
		a.edge.setSession(sess)
	}
	// Direct methods: the agent's own ($edgeAgent), and, through the hub,
	// its modules'.
	methods := make(chan struct{}, maxConcurrentMethods)
	sess.onMethod = func(payload []byte) {
		select {
		case methods <- struct{}{}:
		default:
			a.log.Warn("direct method request dropped: too many in progress", "max", maxConcurrentMethods)
			return
		}
		go func() {
			defer func() { <-methods }()
			a.handleMethod(sessCtx, sess, payload)
		}()
	}
	if err := sess.run(sessCtx); err != nil {
		return err
	}
	var reporterDone sync.WaitGroup
	reporterCtx, stopReporter := context.WithCancel(sessCtx)
	reporterDone.Go(func() { a.reporter(reporterCtx, sess) })

	a.loop(ctx)

	// Shutdown: stop process modules (containers stay), send a last report,
	// disconnect, close the runtime and the state (deferred).
	a.mu.Lock()
	a.passCancel = nil
	a.mu.Unlock()
	if drv.Name() != RuntimeDocker {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.cfg.StopTimeout+5*time.Second)
		a.rec.stopAll(stopCtx, func(h string) bool { return childHandle(drv, h) })
		cancel()
		a.buildReport()
	}
	stopEdge()
	stopReporter()
	reporterDone.Wait()
	if sess.connected() {
		if doc := a.report.Load(); doc != nil && drv.Name() != RuntimeDocker {
			b, _ := json.Marshal(doc)
			pctx, cancel := context.WithTimeout(sessCtx, time.Second)
			if err := sess.publish(pctx, b); err != nil {
				a.log.Debug("final report not sent", "err", err)
			}
			cancel()
		}
	}
	dctx, cancel := context.WithTimeout(sessCtx, 2*time.Second)
	sess.close(dctx)
	cancel()
	a.log.Info("agent stopped")
	return nil
}

// restore loads the state file: the last desired document becomes the plan
// at once, and the recorded instances are matched against it.
func (a *Agent) restore() error {
	payload, last, records, err := a.st.load()
	if err != nil {
		return fmt.Errorf("load agent state: %w", err)
	}
	a.last = last
	a.mu.Lock()
	if last.Seen && (!a.seenAny || last.Version >= a.seen) {
		a.seen, a.seenAny = last.Version, true
		if a.pending != nil && a.pending.doc.Version <= last.Version {
			a.pending = nil
		}
	}
	a.mu.Unlock()
	for name, rec := range records {
		if rec.Runtime != a.drv.Name() {
			a.log.Warn("forgetting a module instance of another runtime", "module", name, "runtime", rec.Runtime)
			if err := a.st.deleteModule(name); err != nil {
				return fmt.Errorf("update agent state: %w", err)
			}
			continue
		}
		a.rec.adopt(name, rec)
	}
	if payload == nil {
		return nil
	}
	doc, err := parseDesired(payload)
	if err == nil {
		var p *plan
		if p, err = buildPlan(doc); err == nil {
			a.applyEdge(p)
			a.plan = p
			a.desiredRaw = payload
			a.rec.setPlan(p, false)
			return nil
		}
	}
	// Only valid documents are stored: this one was valid for the build
	// that stored it. Run nothing rather than guess.
	a.log.Error("the stored desired document is no longer valid; waiting for a new one", "err", err)
	return nil
}

// offerDesired takes a payload from the desired topic. It never blocks: a
// newer document replaces one still pending and cancels the pass in
// progress, so that a new version pre-empts a half-done plan.
func (a *Agent) offerDesired(payload []byte) {
	doc, err := parseDesired(payload)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		a.log.Warn("received a desired payload that is not a desired document", "err", err)
		a.badPayload = err
		poke(a.wake)
		return
	}
	if a.seenAny && doc.Version <= a.seen {
		a.log.Debug("ignoring a desired document that is not newer", "version", doc.Version, "current", a.seen)
		return
	}
	a.seen, a.seenAny = doc.Version, true
	a.pending = &incoming{payload: payload, doc: doc}
	a.badPayload = nil
	if a.passCancel != nil {
		a.passCancel()
	}
	poke(a.wake)
}

// poke wakes the Run loop; runtimes call it when an instance changes.
func (a *Agent) poke() { poke(a.wake) }

// poke signals c without blocking.
func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (a *Agent) loop(ctx context.Context) {
	resync := time.NewTicker(a.cfg.ResyncInterval)
	defer resync.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		a.step(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := time.Hour
		if next := a.rec.nextDeadline(); !next.IsZero() {
			wait = max(time.Until(next), time.Millisecond)
		}
		timer.Reset(wait)
	waiting:
		select {
		case <-ctx.Done():
			return
		case <-a.hubKick:
			a.buildReport()
			goto waiting
		case rq := <-a.restarts:
			// An operator's RestartModule, between passes.
			rq.done <- a.rec.restartNow(ctx, rq.module)
			a.buildReport()
			goto waiting
		case <-a.wake:
		case <-resync.C:
		case <-timer.C:
		}
	}
}

// step processes the pending desired document, if any, and runs a pass.
func (a *Agent) step(ctx context.Context) {
	a.mu.Lock()
	in, bad := a.pending, a.badPayload
	a.pending, a.badPayload = nil, nil
	passCtx, cancel := context.WithCancel(ctx)
	a.passCancel = cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.passCancel = nil
		a.mu.Unlock()
		cancel()
	}()
	if bad != nil {
		a.last.Code, a.last.Description = fleet.StatusCodeInvalid, bad.Error()
	}
	if in != nil {
		a.apply(in)
	}
	a.rec.pass(passCtx)
	a.buildReport()
}

// apply validates a new desired document. A valid one becomes the plan
// and is stored; an invalid one is reported (400 or 412) and leaves the
// running modules as they are.
func (a *Agent) apply(in *incoming) {
	p, err := buildPlan(in.doc)
	if err != nil {
		code, msg := fleet.StatusCodeInvalid, err.Error()
		var de *desiredError
		if errors.As(err, &de) {
			code = de.code
		}
		a.last = lastRecord{Version: in.doc.Version, Seen: true, Code: code, Description: msg, DeploymentID: in.doc.DeploymentID, Layers: in.doc.Layers}
		if err := a.st.saveLast(a.last); err != nil {
			a.log.Error("update agent state", "err", err)
		}
		a.log.Warn("desired document refused; modules left as they are", "version", in.doc.Version, "code", code, "err", msg)
		return
	}
	a.last = lastRecord{Version: in.doc.Version, Seen: true, DeploymentID: in.doc.DeploymentID, Layers: in.doc.Layers}
	if err := a.st.saveDesired(in.payload, a.last); err != nil {
		a.log.Error("update agent state: the new desired document will not survive a restart", "err", err)
	}
	a.applyEdge(p)
	a.plan = p
	a.desiredRaw = in.payload
	a.rec.setPlan(p, true)
	a.log.Info("desired document accepted", "version", p.version, "deployment", p.deploymentID, "modules", len(p.modules))
}

// maxConcurrentMethods bounds the direct method calls in progress.
const maxConcurrentMethods = 64

// applyEdge gives the hub and the identity service the plan, and each
// module its IoT Edge environment. Run goroutine only.
func (a *Agent) applyEdge(p *plan) {
	types := make(map[string]string, len(p.modules))
	for name, s := range p.modules {
		types[name] = s.Type
	}
	a.moduleTypes.Store(&types)
	a.setSecrets(p)
	if a.edge == nil {
		return
	}
	if err := a.edge.apply(p); err != nil {
		a.log.Error("device hub not configured for the new plan; modules may fail to authenticate", "err", err)
	}
}

// hubChanged asks the Run loop for a new report (the hub calls it).
func (a *Agent) hubChanged() { poke(a.hubKick) }

// peerCheck lets only a process module's own processes use its workload
// socket (a container's socket is mounted into that container alone).
func (a *Agent) peerCheck(module string, pid int) error {
	types := a.moduleTypes.Load()
	if types == nil || (*types)[module] != fleet.ModuleTypeProcess {
		return nil
	}
	pc, ok := a.drv.(interface{ checkPeer(string, int) error })
	if !ok {
		return nil
	}
	return pc.checkPeer(module, pid)
}

// buildReport renders the current state and hands it to the reporter if
// it changed. Run goroutine only.
func (a *Agent) buildReport() {
	if !a.last.Seen && a.plan == nil && a.last.Code == 0 {
		return // nothing to say before the first desired document
	}
	doc := &fleet.ReportedDocument{
		SchemaVersion:           fleet.DocumentSchema,
		LastDesiredVersion:      a.last.Version,
		LastDesiredDeploymentID: a.last.DeploymentID,
		LastDesiredLayers:       a.last.Layers,
		Version:                 a.cfg.Version,
		Runtime:                 fleet.ReportedRuntime{Platform: fleet.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}},
		Modules:                 a.rec.moduleStatuses(),
	}
	if a.last.Code != 0 {
		doc.LastDesiredStatus = fleet.DesiredStatus{Code: a.last.Code, Description: a.last.Description}
	} else {
		code, desc := a.rec.planStatus()
		doc.LastDesiredStatus = fleet.DesiredStatus{Code: code, Description: desc}
	}
	doc.LastDesiredStatus.Description = truncate(doc.LastDesiredStatus.Description, maxStatusDescription)
	var hubStatus *fleet.HubStatus
	if a.edge != nil {
		st := a.edge.h.Status()
		hubStatus = &st
		doc.Hub = hubStatus
		doc.ModuleTwins = a.edge.h.ReportedTwins()
	}
	if a.plan != nil {
		doc.DeploymentID = a.plan.deploymentID
		doc.Layers = a.plan.layers
		if len(a.plan.systemModules) > 0 {
			doc.SystemModules = map[string]fleet.ModuleStatus{}
			for name, sm := range a.plan.systemModules {
				ms := fleet.ModuleStatus{
					RuntimeStatus:     fleet.RuntimeRunning,
					Status:            sm.Status,
					StatusDescription: "built into the agent; not run as a module",
					Settings:          fleet.ModuleSettings{Image: sm.Image},
				}
				if name == "edgeHub" {
					ms.RuntimeStatus, ms.StatusDescription = hubRuntime(hubStatus)
				}
				doc.SystemModules[name] = ms
			}
		}
	}
	doc.DeviceHealth = "healthy"
	for _, m := range doc.Modules {
		if m.RuntimeStatus != fleet.RuntimeRunning && m.RuntimeStatus != fleet.RuntimeStopped {
			doc.DeviceHealth = "unhealthy"
		}
	}
	b, err := json.Marshal(doc)
	if err != nil {
		a.log.Error("render report", "err", err)
		return
	}
	if bytes.Equal(b, a.reportBytes) {
		a.publishTroubleView()
		return
	}
	a.reportBytes = b
	a.report.Store(doc)
	a.publishTroubleView()
	poke(a.kick)
}

// hubRuntime is edgeHub's runtime status and description in the report:
// the hub's own state, or "stopped" when the agent runs none.
func hubRuntime(st *fleet.HubStatus) (string, string) {
	if st == nil {
		return fleet.RuntimeStopped, "the device hub is disabled on this agent"
	}
	connected := 0
	for _, c := range st.Clients {
		if c.Status == "connected" {
			connected++
		}
	}
	desc := fmt.Sprintf("device hub built into the agent: %d routes, %d modules connected, %d messages queued", st.Routes, connected, st.Queued)
	if st.Description != "" {
		desc += "; " + st.Description
	}
	if st.Status != "running" {
		return fleet.RuntimeFailed, desc
	}
	return fleet.RuntimeRunning, desc
}

// reporter publishes reports: on every change, at most one per
// ReportInterval (changes in between are coalesced into the latest), and
// again whenever a connection comes up.
func (a *Agent) reporter(ctx context.Context, sess *session) {
	var lastSent []byte
	var lastAt time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		}
		if wait := a.cfg.ReportInterval - time.Since(lastAt); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		doc := a.report.Load()
		if doc == nil || !sess.connected() {
			continue // a connection coming up kicks again
		}
		b, err := json.Marshal(doc)
		if err != nil {
			continue
		}
		force := a.forceReport.Swap(false) || a.reportFailed.Load()
		if !force && bytes.Equal(b, lastSent) {
			continue
		}
		lastAt = time.Now()
		if err := sess.publish(ctx, b); err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("publish report", "err", err)
			a.reportFailed.Store(true)
			time.AfterFunc(a.cfg.ReportInterval, func() { poke(a.kick) })
			continue
		}
		a.reportFailed.Store(false)
		lastSent = b
		a.log.Debug("report published", "version", doc.LastDesiredVersion, "code", doc.LastDesiredStatus.Code)
	}
}

// Descriptions are capped so that a report with many failing modules stays
// far below the broker's report size limit (64 KiB by default).
const (
	maxStatusDescription = 4096
	maxModuleDescription = 1024
)

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// Status returns the last reported document the agent built, and false
// before it has processed any desired document.
func (a *Agent) Status() (fleet.ReportedDocument, bool) {
	doc := a.report.Load()
	if doc == nil {
		return fleet.ReportedDocument{}, false
	}
	out := *doc
	out.Modules = maps.Clone(doc.Modules)
	out.SystemModules = maps.Clone(doc.SystemModules)
	return out, true
}
