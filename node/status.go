package node

import (
	"context"
	"sort"
	"time"

	"appliance/api"
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
	st := api.DeploymentStatus{ID: id, SoakSeconds: soak.Seconds(), Devices: map[string][]string{}, Next: map[string]string{}}
	nowT := time.Now().UTC()
	err := b.view(ctx, q.Consistent, func(r *raftstore.Reader) error {
		dep, err := r.Deployment(id)
		if err != nil {
			return err
		}
		bd := b.assign.Breakdown(r, dep, soak, nowT)
		st.Metrics, st.SystemMetrics, st.Counts = bd.Metrics, bd.SystemMetrics, bd.Counts
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
