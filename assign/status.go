package assign

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// classifyAs puts a device to which deployment applies in one status
// category, from its last report (classify with only the base known: the
// report's layers are taken as they are).
func classifyAs(rep *healthReport, deployment string, now time.Time, soak time.Duration) string {
	c, _ := classify(rep, Subject{Base: deployment, AnyLayers: true}, now, soak)
	return c
}

// Subject is what a device's report is judged against: the document the
// device should run (its base and layers, as this node assigned it at
// index Since, 0 when unknown) and the modules of the deployment judged.
type Subject struct {
	Base   string
	Layers []string
	// AnyLayers takes a report about Base with any layers as current.
	AnyLayers bool
	Since     uint64
	// Modules are the modules whose state counts (the ones the judged
	// deployment gave the document); nil: every module the report lists.
	Modules []string
}

// current tells whether the running document the report describes is the
// subject's (a report about an earlier document is stale: it is not
// counted, whatever it says): the same base and layers, at a version no
// older than the assignment (a deployment deleted and created again under
// its id is another document). A report without a version (0: no agent
// sends one about a document it ran) is judged by its ids alone.
func (s Subject) current(rep *healthReport) bool {
	return rep != nil && rep.deployment == s.Base && (s.AnyLayers || slices.Equal(rep.layers, s.Layers)) &&
		s.newEnough(rep.version)
}

func (s Subject) newEnough(version uint64) bool { return version == 0 || version >= s.Since }

// refused tells whether the agent refused the subject's document: the
// report's last desired document is it, with a code other than 200 (the
// agent then runs the one before, so the running document does not say).
func (s Subject) refused(rep *healthReport) bool {
	return rep != nil && rep.lastDesired == s.Base && (s.AnyLayers || slices.Equal(rep.lastLayers, s.Layers)) &&
		s.newEnough(rep.version) && rep.code != fleet.StatusCodeOK
}

// ClassifyDevice puts a device in one status category for the subject,
// from its last report, with the reason when the category needs one:
//   - unknown: no report, or the report is about another document (the
//     device has not caught up yet: a report about the document it ran
//     before is not counted);
//   - unhealthy: the agent refused the document or could not apply it
//     (code other than 200: the reason is the code and the agent's
//     description), or a module that should run is failed, dead, in
//     backoff or unhealthy;
//   - soaking: applied, every module that should run runs, but one
//     started less than soak ago (or has not reported its state yet);
//   - healthy: applied, and every module that should run has run for soak.
func ClassifyDevice(rep *fleet.ReportedDocument, s Subject, now time.Time, soak time.Duration) (category, reason string) {
	return classify(summarize(rep, nil), s, now, soak)
}

// classify is ClassifyDevice of a report's healthReport.
func classify(rep *healthReport, s Subject, now time.Time, soak time.Duration) (category, reason string) {
	if s.refused(rep) {
		return fleet.CategoryUnhealthy, refusal(rep)
	}
	if !s.current(rep) {
		if rep == nil {
			return fleet.CategoryUnknown, "no report yet"
		}
		return fleet.CategoryUnknown, "its last report is about an earlier document"
	}
	if rep.code != fleet.StatusCodeOK {
		return fleet.CategoryUnhealthy, refusal(rep)
	}
	category = fleet.CategoryHealthy
	judge := func(m moduleHealth) (unhealthy bool) {
		if m.status == "stopped" {
			return false
		}
		switch m.runtime {
		case fleet.RuntimeRunning:
			if !m.hasStarted || now.Sub(m.started) < soak {
				category = fleet.CategorySoaking
			}
		case fleet.RuntimeFailed, fleet.RuntimeDead, fleet.RuntimeBackoff, fleet.RuntimeUnhealthy:
			return true
		default:
			category = fleet.CategorySoaking
		}
		return false
	}
	if s.Modules == nil { // every module the report lists, by name
		for _, m := range rep.modules {
			if judge(m) {
				return fleet.CategoryUnhealthy, fmt.Sprintf("module %s is %s", m.name, m.runtime)
			}
		}
		return category, ""
	}
	for _, name := range s.Modules {
		m, ok := rep.module(name)
		if !ok {
			category = fleet.CategorySoaking // not reported yet
			continue
		}
		if judge(m) {
			return fleet.CategoryUnhealthy, fmt.Sprintf("module %s is %s", name, m.runtime)
		}
	}
	return category, ""
}

// refusal says why an agent did not apply a document.
func refusal(rep *healthReport) string {
	if rep.description == "" {
		return fmt.Sprintf("code %d", rep.code)
	}
	return fmt.Sprintf("code %d: %s", rep.code, rep.description)
}

// HealthOf is a device's category under its document (ClassifyDevice with
// the default soak, every module counting), or fleet.HealthNone when no
// deployment applies.
func HealthOf(rep *fleet.ReportedDocument, s Subject, now time.Time) string {
	if s.Base == "" {
		return fleet.HealthNone
	}
	c, _ := ClassifyDevice(rep, s, now, fleet.DefaultSoak)
	return c
}

// DeploymentState puts a deployment in one overview state from its counts.
func DeploymentState(c fleet.StatusCounts) string {
	switch {
	case c.Targeted == 0:
		return fleet.StateIdle
	case c.Applied == 0:
		return fleet.StateSuperseded
	case c.Unhealthy > 0:
		return fleet.StateFailing
	case c.Unknown > 0 || c.Soaking > 0:
		return fleet.StateConverging
	}
	return fleet.StateHealthy
}

// ReportOf reads and decodes a device's last report; nil when it has none
// or it does not decode.
func ReportOf(r *raftstore.Reader, deviceID string) *fleet.ReportedDocument {
	stored, err := r.Report(deviceID)
	if err != nil {
		return nil
	}
	return decodeReport(stored.Document)
}

func decodeReport(b []byte) *fleet.ReportedDocument {
	var doc fleet.ReportedDocument
	if json.Unmarshal(b, &doc) != nil {
		return nil
	}
	return &doc
}

// MetricCondition returns the condition of a custom metric query: the WHERE
// clause of Azure's `SELECT deviceId FROM devices WHERE ...`, or the query
// itself when it is a bare condition.
func MetricCondition(query string) string {
	q := strings.TrimSpace(query)
	upper := strings.ToUpper(q)
	if strings.HasPrefix(upper, "SELECT ") {
		if i := strings.Index(upper, " WHERE "); i >= 0 {
			return strings.TrimSpace(q[i+len(" WHERE "):])
		}
	}
	return q
}

// compileMetrics compiles a deployment's custom metric queries; they were
// checked when written, so one that no longer compiles is left out.
func compileMetrics(queries map[string]string) map[string]*evaluator.Metric {
	out := map[string]*evaluator.Metric{}
	for name, q := range queries {
		if m, err := evaluator.CompileMetric(q); err == nil {
			out[name] = m
		}
	}
	return out
}

// Breakdown is a deployment's status on this node: its devices by
// category (each list sorted), the counts, Azure's system metrics, the
// custom metrics, and why devices are in a category when it is not
// obvious.
type Breakdown struct {
	ByCategory    map[string][]string
	Counts        fleet.StatusCounts
	SystemMetrics map[string]int
	Metrics       map[string]int
	// Reasons counts, per category, the devices by reason: targeted
	// devices it does not apply to (another deployment applies, no base
	// for a layer), unhealthy ones (the agent's refusal, a failed module),
	// unknown ones, kept ones.
	Reasons map[string]map[string]int
}

// StatusOptions are how a breakdown judges the devices.
type StatusOptions struct {
	// Soak is how long modules must have run to count as healthy.
	Soak time.Duration
	Now  time.Time
	// Presence says whether a device is connected to some node, and when
	// it was last in contact (zero: unknown); nil counts none offline.
	Presence func(deviceID string) (connected bool, lastContact time.Time)
	// OfflineAfter is how long a device may be out of contact before it
	// counts as offline (0: never).
	OfflineAfter time.Duration
}

// Offline tells whether a device counts as offline: not connected, and
// out of contact for longer than OfflineAfter (or never in contact).
// reported is when its last report arrived (zero: none), a contact too.
func (o StatusOptions) Offline(deviceID string, reported time.Time) bool {
	if o.Presence == nil || o.OfflineAfter <= 0 {
		return false
	}
	connected, last := o.Presence(deviceID)
	if reported.After(last) {
		last = reported
	}
	return !connected && (last.IsZero() || o.Now.Sub(last) > o.OfflineAfter)
}

// judged is one applied device with what it is judged against.
type judged struct {
	id string
	as assignment
	s  Subject
}

// Breakdown derives a deployment's status from the assignments and the
// replicated reports in r (the caller's read transaction). A device
// counts for the deployment when it applies to it: as its base, or as a
// layer merged on its base (a layer's own modules decide its health).
// Only a report about the document the device is assigned now counts, for
// the categories, the system metrics and the custom metrics alike.
func (a *Assigner) Breakdown(r *raftstore.Reader, dep fleet.Deployment, opt StatusOptions) Breakdown {
	id := dep.ID
	metrics := compileMetrics(dep.Metrics.Queries)
	out := Breakdown{Metrics: map[string]int{}, Reasons: map[string]map[string]int{}}
	for name := range metrics {
		out.Metrics[name] = 0
	}
	note := func(cat, reason string) {
		if reason == "" {
			return
		}
		if out.Reasons[cat] == nil {
			out.Reasons[cat] = map[string]int{}
		}
		out.Reasons[cat][reason]++
	}
	a.mu.RLock()
	targeted := a.engine.TargetedDevices(id)
	applied := a.engine.AppliedDevices(id)
	layered := a.engine.IsLayered(id)
	devs := make([]judged, len(applied))
	for i, dev := range applied {
		as := a.assignmentLocked(dev)
		devs[i] = judged{id: dev, as: as, s: Subject{Base: as.base, Layers: as.layers, Since: a.versions.since(dev)}}
	}
	notApplied := map[string]string{} // targeted, not applied → why
	for _, dev := range targeted {
		if _, ok := slices.BinarySearch(applied, dev); ok {
			continue
		}
		if layered {
			notApplied[dev] = "no base deployment targets the device: a layer only merges on a base"
		} else if base := a.engine.Applied(dev); base != "" {
			notApplied[dev] = "deployment " + base + " applies: it precedes this one"
		}
	}
	var unassigned []string
	if !dep.Layered {
		unassigned = a.engine.UnassignedDevices()
	}
	devices := a.engine.Stats().Devices
	// What the custom metrics see of each device the deployment targets:
	// its configurations section and its desired version.
	var mdevs []metricSubject
	if len(metrics) > 0 {
		mdevs = make([]metricSubject, len(targeted))
		for i, dev := range targeted {
			as := a.assignmentLocked(dev)
			mdevs[i] = metricSubject{id: dev, s: Subject{Base: as.base, Layers: as.layers, Since: a.versions.since(dev)},
				configs: a.configurationsLocked(dev, as.base), version: a.versions.of(dev)}
		}
	}
	a.mu.RUnlock()
	for _, m := range mdevs {
		stored, err := r.Report(m.id)
		var rep *fleet.ReportedDocument
		var raw map[string]any
		if err == nil {
			rep = decodeReport(stored.Document)
			raw = evaluator.DecodeReport(stored.Document)
		}
		visible, version := visibleReport(rep, raw, m.s, m.version)
		var tags map[string]any
		if d, err := r.Device(m.id); err == nil {
			tags = d.Tags
		}
		md := evaluator.MetricDevice{ID: m.id, Tags: tags, Report: visible, Configurations: m.configs, DesiredVersion: version}
		for name, q := range metrics {
			if q.MatchesDevice(md) {
				out.Metrics[name]++
			}
		}
	}
	byCat := map[string][]string{fleet.CategoryTargeted: targeted, fleet.CategoryApplied: applied}
	for _, dev := range targeted {
		if why, ok := notApplied[dev]; ok {
			note(fleet.CategoryTargeted, why)
		}
	}
	succeeded, failed := 0, 0
	for _, j := range devs {
		stored := a.healthOf(r, j.id, devices)
		rep := stored.rep
		if m, err := a.content(r, j.as); err == nil {
			j.s.Modules = contributed(m.comp, id)
		}
		switch {
		case j.s.refused(rep):
			failed++
		case j.s.current(rep) && rep.code == fleet.StatusCodeOK:
			succeeded++
		case j.s.current(rep):
			failed++
		}
		c, why := classify(rep, j.s, opt.Now, opt.Soak)
		byCat[c] = append(byCat[c], j.id)
		note(c, why)
		if opt.Offline(j.id, stored.received) {
			byCat[fleet.CategoryOffline] = append(byCat[fleet.CategoryOffline], j.id)
		}
	}
	// Devices nothing targets that keep running this deployment.
	for _, dev := range unassigned {
		rep := a.healthOf(r, dev, devices).rep
		if rep == nil || rep.deployment != id {
			continue
		}
		if d, err := r.Device(dev); err == nil && resetPendingAt(d, rep.version) {
			continue
		}
		byCat[fleet.CategoryKept] = append(byCat[fleet.CategoryKept], dev)
		note(fleet.CategoryKept, fmt.Sprintf("no deployment targets the device; keeping %s v%d", id, rep.version))
	}
	out.SystemMetrics = map[string]int{
		"targetedCount":           len(targeted),
		"appliedCount":            len(applied),
		"reportedSuccessfulCount": succeeded,
		"reportedFailedCount":     failed,
	}
	out.Counts = fleet.StatusCounts{
		Targeted: len(targeted), Applied: len(applied),
		Healthy: len(byCat[fleet.CategoryHealthy]), Unhealthy: len(byCat[fleet.CategoryUnhealthy]),
		Soaking: len(byCat[fleet.CategorySoaking]), Unknown: len(byCat[fleet.CategoryUnknown]),
		Offline: len(byCat[fleet.CategoryOffline]), Kept: len(byCat[fleet.CategoryKept]),
	}
	out.ByCategory = byCat
	if len(out.Reasons) == 0 {
		out.Reasons = nil
	}
	return out
}

// SystemMetricQueries are the four system metrics of a deployment in
// Azure's own words (what IoT Hub lists as a configuration's
// systemMetrics.queries): module-level queries over the $edgeAgent twin,
// scoped to the deployment with configurations.[[id]].
func SystemMetricQueries(dep fleet.Deployment) map[string]string {
	id := dep.ID
	applied := "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND configurations.[[" + id + "]].status = 'Applied'"
	reported := applied + " AND properties.desired.$version = properties.reported.lastDesiredVersion"
	return map[string]string{
		"targetedCount":           "SELECT deviceId FROM devices WHERE IS_DEFINED(configurations.[[" + id + "]])",
		"appliedCount":            applied,
		"reportedSuccessfulCount": reported + " AND properties.reported.lastDesiredStatus.code = 200",
		"reportedFailedCount":     reported + " AND properties.reported.lastDesiredStatus.code != 200",
	}
}

// metricSubject is what custom metrics need of one device.
type metricSubject struct {
	id      string
	s       Subject
	configs map[string]string
	version uint64
}

// configurationsLocked is a device's configurations section: every
// deployment that targets it, Applied (its base, or a layer merged on
// it) or Targeted. The caller holds a.mu.
func (a *Assigner) configurationsLocked(dev, base string) map[string]string {
	out := map[string]string{}
	for _, id := range a.engine.Targeting(dev) {
		st := fleet.StatusTargeted
		if id == base || base != "" && a.engine.IsLayered(id) {
			st = fleet.StatusApplied
		}
		out[id] = st
	}
	return out
}

// visibleReport is what a device reported about the document it is
// assigned now, as custom metrics see it: its whole report when it runs
// that document; only the outcome (lastDesired*) when it refused it; none
// ({}) otherwise, since a report about the document before is stale.
// version is $edgeAgent's properties.desired.$version: the version the
// report is about when it is about this document (the same document may
// carry different versions from different nodes), else this node's.
func visibleReport(rep *fleet.ReportedDocument, raw map[string]any, s Subject, nodeVersion uint64) (map[string]any, uint64) {
	h := summarize(rep, nil)
	switch {
	case s.current(h) && raw != nil:
		return raw, max(rep.LastDesiredVersion, 1)
	case s.refused(h) && raw != nil:
		out := map[string]any{}
		for _, k := range []string{"schemaVersion", "lastDesiredVersion", "lastDesiredStatus", "lastDesiredDeploymentId", "lastDesiredLayers", "version", "runtime"} {
			if v, ok := raw[k]; ok {
				out[k] = v
			}
		}
		return out, max(rep.LastDesiredVersion, 1)
	}
	return map[string]any{}, nodeVersion
}
