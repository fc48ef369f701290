package assign

import (
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"appliance/fleet"
	"appliance/raftstore"
)

// Judging a device's health reads its last report: the overview and a
// deployment's status for every device a deployment applies to, at every
// poll of the console, and the rollout loop for every device of a wave at
// every tick. Decoding each report every time cost most of their CPU
// (about 25 µs a report: a second per poll at 40,000 devices), and a report
// changes only when the device sends another. So the Assigner keeps, per
// device, the few fields judging reads (healthReport), with the index of
// the stored report they came from, and decodes a report again only when
// the stored one has another index.

// healthReport is what judging health reads of a reported document
// (fleet.ReportedDocument): a few hundred bytes a device where the whole
// document, with its maps, would be kilobytes.
type healthReport struct {
	version     uint64 // LastDesiredVersion
	code        int    // LastDesiredStatus.Code
	description string // LastDesiredStatus.Description when code is not 200, at most maxDescription bytes
	lastDesired string // LastDesiredDeploymentID
	lastLayers  []string
	deployment  string // DeploymentID: the document it runs
	layers      []string
	modules     []moduleHealth // by name
}

// moduleHealth is what judging reads of one reported module.
type moduleHealth struct {
	name, status, runtime string
	started               time.Time // LastStartTimeUTC
	hasStarted            bool      // LastStartTimeUTC was given
}

// module finds a module by name.
func (h *healthReport) module(name string) (moduleHealth, bool) {
	i, ok := slices.BinarySearchFunc(h.modules, name, func(m moduleHealth, name string) int { return strings.Compare(m.name, name) })
	if !ok {
		return moduleHealth{}, false
	}
	return h.modules[i], true
}

// summarize keeps what judging reads of rep (nil: nil), with the strings
// that repeat across a fleet (deployment, module and status names) taken
// from intern when it is given.
func summarize(rep *fleet.ReportedDocument, intern func(string) string) *healthReport {
	if rep == nil {
		return nil
	}
	if intern == nil {
		intern = func(s string) string { return s }
	}
	internAll := func(ss []string) []string {
		if len(ss) == 0 {
			return nil
		}
		out := make([]string, len(ss))
		for i, s := range ss {
			out[i] = intern(s)
		}
		return out
	}
	h := &healthReport{
		version: rep.LastDesiredVersion, code: rep.LastDesiredStatus.Code,
		lastDesired: intern(rep.LastDesiredDeploymentID), lastLayers: internAll(rep.LastDesiredLayers),
		deployment: intern(rep.DeploymentID), layers: internAll(rep.Layers),
		modules: make([]moduleHealth, 0, len(rep.Modules)),
	}
	if h.code != fleet.StatusCodeOK { // read only then (refusal)
		h.description = capDescription(rep.LastDesiredStatus.Description)
	}
	for name, m := range rep.Modules {
		mh := moduleHealth{name: intern(name), status: intern(m.Status), runtime: intern(m.RuntimeStatus)}
		if m.LastStartTimeUTC != nil {
			mh.started, mh.hasStarted = *m.LastStartTimeUTC, true
		}
		h.modules = append(h.modules, mh)
	}
	slices.SortFunc(h.modules, func(a, b moduleHealth) int { return strings.Compare(a.name, b.name) })
	return h
}

// maxDescription caps the agent's words kept for a refusal: the text is
// the device's own, and judging keeps it per device.
const maxDescription = 1024

// capDescription is d cut to maxDescription bytes (at a character's
// start), marked with "…" when cut.
func capDescription(d string) string {
	if len(d) <= maxDescription {
		return d
	}
	cut := maxDescription
	for cut > 0 && !utf8.RuneStart(d[cut]) {
		cut--
	}
	return d[:cut] + "…"
}

// maxInterned bounds the interned strings: names repeat across a fleet;
// past this many distinct ones they are kept as they come.
const maxInterned = 4096

// reportMemo is the healthReport of each device's stored report, by the
// raft index that stored it.
type reportMemo struct {
	mu       sync.Mutex
	byDevice map[string]memoEntry
	interned map[string]string
}

type memoEntry struct {
	index uint64
	rep   *healthReport // nil: the report does not decode
}

func newReportMemo() *reportMemo {
	return &reportMemo{byDevice: map[string]memoEntry{}, interned: map[string]string{}}
}

// clear forgets every report.
func (m *reportMemo) clear() {
	m.mu.Lock()
	clear(m.byDevice)
	m.mu.Unlock()
}

// intern returns the one copy of s (the caller holds m.mu).
func (m *reportMemo) intern(s string) string {
	if v, ok := m.interned[s]; ok {
		return v
	}
	if len(m.interned) < maxInterned && len(s) <= 256 {
		m.interned[s] = s
	}
	return s
}

// storedHealth is a device's last report as judging reads it, and when it
// arrived (zero and nil: no report; a nil healthReport with a time: a
// report that does not decode).
type storedHealth struct {
	rep      *healthReport
	received time.Time
}

// healthOf reads a device's last report for judging its health, from the
// memo when the stored report is the one it was made from. devices is how
// many devices there are: the memo is emptied when it holds far more (the
// devices deleted since).
func (a *Assigner) healthOf(r *raftstore.Reader, dev string, devices int) storedHealth {
	m := a.reports
	m.mu.Lock()
	e, known := m.byDevice[dev]
	m.mu.Unlock()
	if known { // is the stored report still the one it was made from?
		meta, err := r.ReportMeta(dev)
		if err != nil {
			return storedHealth{}
		}
		if e.index == meta.Index {
			return storedHealth{rep: e.rep, received: meta.ReceivedTimeUTC}
		}
	}
	stored, err := r.Report(dev)
	if err != nil {
		return storedHealth{}
	}
	rep := decodeReport(stored.Document)
	m.mu.Lock()
	defer m.mu.Unlock()
	h := summarize(rep, m.intern)
	if stored.Index != 0 { // 0: stored by a release before the index was kept
		if len(m.byDevice) > 2*devices+1024 {
			clear(m.byDevice)
		}
		m.byDevice[dev] = memoEntry{index: stored.Index, rep: h}
	}
	return storedHealth{rep: h, received: stored.ReceivedTimeUTC}
}

// deviceCount is how many devices the assignments know.
func (a *Assigner) deviceCount() int {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.engine.Stats().Devices
}
