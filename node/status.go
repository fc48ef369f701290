package node

import (
	"context"
	"sort"
	"time"

	"appliance/api"
	"appliance/assign"
	"appliance/fleet"
	"appliance/raftstore"
)

// DeploymentStatus derives a deployment's status on this node (package
// assign's breakdown) and pages its device lists.
func (b *backend) DeploymentStatus(ctx context.Context, id string, q api.StatusQuery) (api.DeploymentStatus, error) {
	soak := q.Soak
	if soak <= 0 {
		soak = fleet.DefaultSoak
	}
	limit := q.Limit
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	st := api.DeploymentStatus{ID: id, SoakSeconds: soak.Seconds(), OfflineAfterSeconds: b.cfg.OfflineAfter.Seconds(),
		Devices: map[string][]string{}, Next: map[string]string{}}
	nowT := time.Now().UTC()
	pv := b.node().presence(ctx) // network: before any lock or transaction
	err := b.view(ctx, q.Consistent, func(r *raftstore.Reader) error {
		dep, err := r.Deployment(id)
		if err != nil {
			return err
		}
		bd := b.assign.Breakdown(r, dep, assign.StatusOptions{Soak: soak, Now: nowT, Presence: pv.contact, OfflineAfter: b.cfg.OfflineAfter})
		st.Metrics, st.SystemMetrics, st.Counts, st.Reasons = bd.Metrics, bd.SystemMetrics, bd.Counts, bd.Reasons
		st.Layered = dep.Layered
		st.SystemMetricQueries = assign.SystemMetricQueries(dep)
		for _, c := range api.Categories {
			if q.Category != "" && c != q.Category {
				continue
			}
			ids := bd.ByCategory[c]
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
