package node

import (
	"context"
	"encoding/json"
	"sort"
	"time"

	"appliance/api"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// DefaultSoak is how long every module that should run must have been
// running before a device counts as Healthy.
const DefaultSoak = 30 * time.Second

// classify puts a device to which deployment applies in one status
// category, from its last report:
//   - unknown: no report, or the report is about another deployment (the
//     device has not caught up yet);
//   - unhealthy: the agent could not apply it (code other than 200), or a
//     module that should run is failed, dead, in backoff or unhealthy, or is
//     missing from the report;
//   - soaking: applied, every module that should run runs, but one started
//     less than soak ago;
//   - healthy: applied, and every module that should run has run for soak.
func classify(rep *fleet.ReportedDocument, deployment string, now time.Time, soak time.Duration) string {
	if rep == nil || rep.DeploymentID != deployment {
		return api.CategoryUnknown
	}
	if rep.LastDesiredStatus.Code != fleet.StatusCodeOK {
		return api.CategoryUnhealthy
	}
	category := api.CategoryHealthy
	for _, m := range rep.Modules {
		if m.Status == "stopped" {
			continue
		}
		switch m.RuntimeStatus {
		case fleet.RuntimeRunning:
			if m.LastStartTimeUTC == nil || now.Sub(*m.LastStartTimeUTC) < soak {
				category = api.CategorySoaking
			}
		case fleet.RuntimeFailed, fleet.RuntimeDead, fleet.RuntimeBackoff, fleet.RuntimeUnhealthy:
			return api.CategoryUnhealthy
		default:
			category = api.CategorySoaking
		}
	}
	return category
}

// compileMetrics compiles a deployment's custom metric queries; they were
// checked when written, so one that no longer compiles is left out.
func compileMetrics(queries map[string]string) map[string]*evaluator.Condition {
	out := map[string]*evaluator.Condition{}
	for name, q := range queries {
		if c, err := evaluator.CompileQuery(MetricCondition(q), "properties"); err == nil {
			out[name] = c
		}
	}
	return out
}

// DeploymentStatus derives a deployment's status on this node from the
// evaluator's assignments and the replicated reports.
func (b *backend) DeploymentStatus(ctx context.Context, id string, q api.StatusQuery) (api.DeploymentStatus, error) {
	soak := q.Soak
	if soak <= 0 {
		soak = DefaultSoak
	}
	limit := q.Limit
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	st := api.DeploymentStatus{ID: id, SoakSeconds: soak.Seconds(), Devices: map[string][]string{}, Next: map[string]string{}}
	nowT := time.Now().UTC()
	err := b.view(ctx, q.Consistent, func(r *raftstore.Reader) error {
		dep, err := r.Deployment(id)
		if err != nil {
			return err
		}
		metrics := compileMetrics(dep.Metrics.Queries)
		st.Metrics = map[string]int{}
		for name := range metrics {
			st.Metrics[name] = 0
		}
		b.engineMu.RLock()
		targeted := b.engine.TargetedDevices(id)
		applied := b.engine.AppliedDevices(id)
		b.engineMu.RUnlock()
		byCat := map[string][]string{api.CategoryTargeted: targeted, api.CategoryApplied: applied}
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
				doc := evaluator.DeviceDocument(dev, tags)
				doc["properties"] = map[string]any{"reported": raw}
				for name, cond := range metrics {
					if cond.EvalDocument(doc) {
						st.Metrics[name]++
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
			c := classify(rep, id, nowT, soak)
			byCat[c] = append(byCat[c], dev)
		}
		st.SystemMetrics = map[string]int{
			"targetedCount":           len(targeted),
			"appliedCount":            len(applied),
			"reportedSuccessfulCount": succeeded,
			"reportedFailedCount":     failed,
		}
		st.Counts = api.StatusCounts{
			Targeted: len(targeted), Applied: len(applied),
			Healthy: len(byCat[api.CategoryHealthy]), Unhealthy: len(byCat[api.CategoryUnhealthy]),
			Soaking: len(byCat[api.CategorySoaking]), Unknown: len(byCat[api.CategoryUnknown]),
		}
		for _, c := range api.Categories {
			if q.Category != "" && c != q.Category {
				continue
			}
			ids := byCat[c]
			i := sort.SearchStrings(ids, q.After)
			if q.After != "" && i < len(ids) && ids[i] == q.After {
				i++
			}
			page := ids[i:]
			if len(page) > limit {
				page = page[:limit]
				st.Next[c] = page[len(page)-1]
			}
			st.Devices[c] = append([]string{}, page...)
		}
		return nil
	})
	return st, err
}
