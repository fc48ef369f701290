package assign

import (
	"encoding/json"
	"strings"
	"time"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// Classify puts a device to which deployment applies in one status
// category, from its last report:
//   - unknown: no report, or the report is about another deployment (the
//     device has not caught up yet);
//   - unhealthy: the agent could not apply it (code other than 200), or a
//     module that should run is failed, dead, in backoff or unhealthy, or is
//     missing from the report;
//   - soaking: applied, every module that should run runs, but one started
//     less than soak ago;
//   - healthy: applied, and every module that should run has run for soak.
func Classify(rep *fleet.ReportedDocument, deployment string, now time.Time, soak time.Duration) string {
	if rep == nil || rep.DeploymentID != deployment {
		return fleet.CategoryUnknown
	}
	if rep.LastDesiredStatus.Code != fleet.StatusCodeOK {
		return fleet.CategoryUnhealthy
	}
	category := fleet.CategoryHealthy
	for _, m := range rep.Modules {
		if m.Status == "stopped" {
			continue
		}
		switch m.RuntimeStatus {
		case fleet.RuntimeRunning:
			if m.LastStartTimeUTC == nil || now.Sub(*m.LastStartTimeUTC) < soak {
				category = fleet.CategorySoaking
			}
		case fleet.RuntimeFailed, fleet.RuntimeDead, fleet.RuntimeBackoff, fleet.RuntimeUnhealthy:
			return fleet.CategoryUnhealthy
		default:
			category = fleet.CategorySoaking
		}
	}
	return category
}

// HealthOf is a device's category under its applied deployment (Classify
// with the default soak), or fleet.HealthNone.
func HealthOf(rep *fleet.ReportedDocument, applied string, now time.Time) string {
	if applied == "" {
		return fleet.HealthNone
	}
	return Classify(rep, applied, now, fleet.DefaultSoak)
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
// category (each list sorted), the counts, Azure's system metrics and the
// custom metrics.
type Breakdown struct {
	ByCategory    map[string][]string
	Counts        fleet.StatusCounts
	SystemMetrics map[string]int
	Metrics       map[string]int
}

// Breakdown derives a deployment's status from the assignments and the
// replicated reports in r (the caller's read transaction), with soak as
// the time modules must have run to count as healthy.
func (a *Assigner) Breakdown(r *raftstore.Reader, dep fleet.Deployment, soak time.Duration, now time.Time) Breakdown {
	id := dep.ID
	metrics := compileMetrics(dep.Metrics.Queries)
	out := Breakdown{Metrics: map[string]int{}}
	for name := range metrics {
		out.Metrics[name] = 0
	}
	a.mu.RLock()
	targeted := a.engine.TargetedDevices(id)
	applied := a.engine.AppliedDevices(id)
	a.mu.RUnlock()
	byCat := map[string][]string{fleet.CategoryTargeted: targeted, fleet.CategoryApplied: applied}
	succeeded, failed := 0, 0
	for _, dev := range applied {
		var rep *fleet.ReportedDocument
		var raw map[string]any
		if stored, err := r.Report(dev); err == nil {
			var doc fleet.ReportedDocument
			if json.Unmarshal(stored.Document, &doc) == nil {
				rep = &doc
			}
			if len(metrics) > 0 {
				_ = json.Unmarshal(stored.Document, &raw)
			}
		}
		if len(metrics) > 0 {
			var tags map[string]any
			if d, err := r.Device(dev); err == nil {
				tags = d.Tags
			}
			for name, m := range metrics {
				if m.Matches(dev, tags, raw) {
					out.Metrics[name]++
				}
			}
		}
		if rep != nil && rep.DeploymentID == id {
			if rep.LastDesiredStatus.Code == fleet.StatusCodeOK {
				succeeded++
			} else {
				failed++
			}
		}
		c := Classify(rep, id, now, soak)
		byCat[c] = append(byCat[c], dev)
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
	}
	out.ByCategory = byCat
	return out
}
