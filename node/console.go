package node

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"appliance/api"
	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// The reads and dry runs behind the operator's console (api.ConsoleBackend).

// recentEvents is how many deployment events the overview shows.
const recentEvents = 20

// Overview is the console's first page: assign counts the fleet and the
// deployments (assign.Overview); the node gives it the sessions of every
// node and the presence rule, and adds the recent deployment events.
func (b *backend) Overview(ctx context.Context) (api.Overview, error) {
	pv := b.node().presence(ctx) // network: before any lock or transaction
	connected := map[string]bool{}
	for _, c := range b.broker.Connections() {
		connected[c.DeviceID] = true
	}
	for id := range pv.peers {
		connected[id] = true
	}
	now := time.Now().UTC()
	var fo assign.Overview
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		var err error
		fo, err = b.assign.Overview(r, assign.OverviewOptions{Now: now, Soak: fleet.DefaultSoak, Connected: connected,
			Offline: func(id string, reported time.Time) bool {
				p, _ := pv.of(id, reported, now)
				return p == api.PresenceOffline
			}})
		return err
	})
	if err != nil {
		return api.Overview{}, err
	}
	o := api.Overview{
		Node: b.cfg.NodeID, SoakSeconds: fleet.DefaultSoak.Seconds(),
		Devices: api.OverviewDevices{Total: fo.Devices, Connected: fo.Connected, Disconnected: fo.Devices - fo.Connected,
			Offline: fo.Offline, Health: fo.Health},
		Deployments: api.OverviewDeployments{States: map[string]int{}, Items: []api.DeploymentSummary{}},
	}
	for _, s := range api.DeploymentStates {
		o.Deployments.States[s] = 0
	}
	for _, d := range fo.Deployments {
		o.Deployments.States[d.State]++
		o.Deployments.Total++
		if len(o.Deployments.Items) == api.MaxPageSize {
			o.Deployments.Truncated = true
			continue
		}
		o.Deployments.Items = append(o.Deployments.Items, api.DeploymentSummary{ID: d.Deployment.ID, Priority: d.Deployment.Priority,
			TargetCondition: d.Deployment.TargetCondition, State: d.State, Counts: d.Counts, Layered: d.Layered})
	}
	recent, err := b.history.RecentDeploymentEvents(recentEvents)
	if err != nil {
		return api.Overview{}, fmt.Errorf("read recent history: %w", err)
	}
	o.Recent = recent
	return o, nil
}

// CheckCondition compiles a condition and, for a target condition, counts
// the devices it matches. A bad condition is an answer, not an error.
func (b *backend) CheckCondition(ctx context.Context, req api.ConditionRequest) (api.ConditionCheck, error) {
	invalid := func(err error, offset int) api.ConditionCheck {
		res := api.ConditionCheck{Message: err.Error()}
		var se *evaluator.SyntaxError
		if errors.As(err, &se) {
			res.Message, res.Column = se.Msg, se.Column+offset
		}
		return res
	}
	if req.Kind == api.ConditionMetric {
		cond, _ := metricConditionAt(req.Condition)
		if strings.TrimSpace(cond) == "" {
			return api.ConditionCheck{Message: "a metric query must not be empty"}, nil
		}
		if _, err := evaluator.CompileMetric(req.Condition); err != nil {
			return invalid(err, 0), nil // its columns count from the start of the query
		}
		return api.ConditionCheck{Valid: true}, nil
	}
	cond, err := evaluator.Compile(req.Condition)
	if err != nil {
		return invalid(err, 0), nil
	}
	var ids []string
	b.assign.Read(func(v assign.View) { ids, err = v.Match(cond) })
	if err != nil {
		return invalid(err, 0), nil
	}
	n := len(ids)
	res := api.ConditionCheck{Valid: true, Matches: &n}
	if cond.MatchesNothing() && strings.TrimSpace(req.Condition) == "" {
		res.Message = "an empty condition targets no device ('*' targets every device)"
	}
	return res, nil
}

// metricConditionAt is MetricCondition with the column (in characters) at
// which the condition starts in the query, so that an error's column
// points into the query as written.
func metricConditionAt(query string) (string, int) {
	cond := assign.MetricCondition(query)
	at := strings.LastIndex(query, cond)
	if cond == "" || at < 0 {
		return cond, 0
	}
	return cond, utf8.RuneCountInString(query[:at])
}

// DryRunDeployment reports what creating (or re-putting) a deployment would
// do, changing nothing.
func (b *backend) DryRunDeployment(ctx context.Context, id string, req api.DeploymentRequest, q api.DryRunQuery) (api.DryRunResult, error) {
	if err := validateDeployment(id, req); err != nil {
		return api.DryRunResult{}, err
	}
	created := now()
	layered := req.Layered
	err := b.store.View(func(r *raftstore.Reader) error {
		if d, err := r.Deployment(id); err == nil {
			created = d.CreatedTimeUTC // a re-put keeps its place
			layered = d.Layered        // and its content (a changed one is refused)
		}
		return nil
	})
	if err != nil {
		return api.DryRunResult{}, err
	}
	return b.dryRun(evaluator.Deployment{ID: id, Condition: req.TargetCondition, Priority: req.Priority, CreatedUnixNano: created.UnixNano(), Layered: layered}, req.Rollout, q)
}

// DryRunPatchDeployment reports what a PATCH would do: the deployment with
// the patch's condition and priority, in its place by creation time.
func (b *backend) DryRunPatchDeployment(ctx context.Context, id string, p api.DeploymentPatch, q api.DryRunQuery) (api.DryRunResult, error) {
	if len(p.Content) > 0 {
		return api.DryRunResult{}, errContentImmutable
	}
	view, err := b.Deployment(ctx, id, false)
	if err != nil {
		return api.DryRunResult{}, err
	}
	d := view.Deployment
	if p.TargetCondition != nil {
		if _, err := evaluator.Compile(*p.TargetCondition); err != nil {
			return api.DryRunResult{}, conditionError("targetCondition", err)
		}
		d.TargetCondition = *p.TargetCondition
	}
	if p.Priority != nil {
		if err := fleet.ValidatePriority(*p.Priority); err != nil {
			return api.DryRunResult{}, err
		}
		d.Priority = *p.Priority
	}
	return b.dryRun(assign.EngineDeployment(&d, nil), d.Rollout, q)
}

// dryRun computes what putting d would change: the devices it would
// target and apply to, and every device whose document would change (to
// d, or, for devices d holds now and would lose, to the next deployment
// that targets them, or none: they keep running d), or, for a layer,
// the documents it would join or leave. It reads the assignments call by
// call (each is consistent on its own: assign.Assigner.PreviewPut)
// without assign's lock, which would hold up the apply path for as long as
// a large fleet takes to walk: a write landing meanwhile can make a
// preview a device off, never the write.
func (b *backend) dryRun(d evaluator.Deployment, rollout *fleet.RolloutPolicy, q api.DryRunQuery) (api.DryRunResult, error) {
	v := b.assign.Loose()
	targeted, would, err := v.DryRunDevices(d)
	if err != nil {
		return api.DryRunResult{}, conditionError("targetCondition", err)
	}
	preview, err := b.assign.PreviewPut(d)
	if err != nil {
		return api.DryRunResult{}, conditionError("targetCondition", err)
	}
	res := api.DryRunResult{
		TargetedCount: len(targeted), WouldApplyCount: len(would),
		TargetedDevices: sample(targeted), WouldApplyDevices: sample(would),
	}
	previewPage(&res, preview, q)
	if res.Waves, err = b.plannedWaves(d.ID, rollout, would); err != nil {
		return api.DryRunResult{}, err
	}
	return res, nil
}

// DryRunDeleteDeployment reports where the deployment's devices would go.
func (b *backend) DryRunDeleteDeployment(ctx context.Context, id string, q api.DryRunQuery) (api.DryRunResult, error) {
	if _, err := b.Deployment(ctx, id, false); err != nil {
		return api.DryRunResult{}, err
	}
	v := b.assign.Loose() // without the lock, as dryRun
	targeted := v.TargetedDevices(id)
	res := api.DryRunResult{TargetedCount: len(targeted), TargetedDevices: sample(targeted), WouldApplyDevices: []string{}}
	previewPage(&res, b.assign.PreviewDelete(id), q)
	return res, nil
}

// previewPage fills a dry run's answer from its preview: the moves (the
// console's groups), the counts by category, and one page of the devices.
func previewPage(res *api.DryRunResult, preview []fleet.PreviewDevice, q api.DryRunQuery) {
	moves := moveSet{}
	res.Changes = map[string]int{}
	for _, c := range fleet.PreviewCategories {
		res.Changes[c] = 0
	}
	for _, p := range preview {
		res.Changes[p.Category]++
		if p.From != p.To {
			moves.add(p.From, p.To, p.ID)
		}
	}
	res.Moves = moves.list()
	limit := q.Limit
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	res.Category = q.Category
	res.Devices = []api.DryRunDevice{}
	i := sort.Search(len(preview), func(i int) bool { return preview[i].ID > q.After })
	for ; i < len(preview); i++ {
		p := preview[i]
		if q.Category != "" && p.Category != q.Category {
			continue
		}
		if len(res.Devices) == limit {
			res.Next = res.Devices[limit-1].ID
			break
		}
		res.Devices = append(res.Devices, p)
	}
}

func sample(ids []string) []string {
	return slices.Clone(ids[:min(len(ids), api.DryRunSample)])
}

// moveSet groups devices by (from, to).
type moveSet map[[2]string]*api.DryRunMove

func (m moveSet) add(from, to, deviceID string) {
	mv := m[[2]string{from, to}]
	if mv == nil {
		mv = &api.DryRunMove{From: from, To: to, Devices: []string{}}
		m[[2]string{from, to}] = mv
	}
	mv.Count++
	if len(mv.Devices) < api.DryRunSample {
		mv.Devices = append(mv.Devices, deviceID)
	}
}

// list returns the groups, largest first, then by from and to.
func (m moveSet) list() []api.DryRunMove {
	out := make([]api.DryRunMove, 0, len(m))
	for _, mv := range m {
		slices.Sort(mv.Devices)
		out = append(out, *mv)
	}
	slices.SortFunc(out, func(a, b api.DryRunMove) int {
		return cmp.Or(cmp.Compare(b.Count, a.Count), strings.Compare(a.From, b.From), strings.Compare(a.To, b.To))
	})
	return out
}

// precedence explains, for one device, the order of the deployments that
// target it (targeting, as the engine ranks them): the first that is not
// layered applies; the layered ones are merged on it in priority order,
// or, without a base, not applied. The caller holds r's transaction and
// reads targeting from one View.
func precedence(r *raftstore.Reader, a assign.View, targeting []string) []api.PrecedenceEntry {
	var bases, layers []fleet.Deployment
	for _, id := range targeting {
		if d, err := r.Deployment(id); err == nil {
			if a.IsLayered(id) {
				layers = append(layers, d)
			} else {
				bases = append(bases, d)
			}
		}
	}
	out := make([]api.PrecedenceEntry, 0, len(bases)+len(layers))
	for i, d := range bases {
		e := api.PrecedenceEntry{Deployment: d.ID, Status: api.StatusTargeted, Priority: d.Priority, CreatedTimeUTC: d.CreatedTimeUTC}
		switch {
		case i == 0 && len(bases) == 1:
			e.Status = api.StatusApplied
			e.Reason = "applies: the only deployment whose condition matches this device"
			if len(layers) > 0 {
				e.Reason = "applies: the only base deployment whose condition matches this device"
			}
		case i == 0:
			e.Status = api.StatusApplied
			e.DecidedBy = decidedBy(d, bases[1])
			e.Reason = "applies: " + winsOver(d, bases[1], e.DecidedBy)
		default:
			e.DecidedBy = decidedBy(bases[0], d)
			e.Reason = fmt.Sprintf("loses to %s: %s", bases[0].ID, losesTo(d, bases[0], e.DecidedBy))
		}
		out = append(out, e)
	}
	for i, d := range layers {
		e := api.PrecedenceEntry{Deployment: d.ID, Status: api.StatusTargeted, Priority: d.Priority, CreatedTimeUTC: d.CreatedTimeUTC, Layered: true}
		switch {
		case len(bases) == 0:
			e.Reason = "layered, not applied: no base deployment targets this device, and a layer only merges on a base"
		case i == 0:
			e.Status = api.StatusApplied
			e.Reason = fmt.Sprintf("layered: merged on %s last, so it wins every name conflict", bases[0].ID)
		default:
			e.Status = api.StatusApplied
			e.DecidedBy = decidedBy(layers[i-1], d)
			e.Reason = fmt.Sprintf("layered: merged on %s before %s (%s), which wins a name conflict with it", bases[0].ID, layers[i-1].ID, losesTo(d, layers[i-1], e.DecidedBy))
		}
		out = append(out, e)
	}
	return out
}

// decidedBy names what orders winner before loser (the engine's
// precedence: priority, then creation time, then id).
func decidedBy(winner, loser fleet.Deployment) string {
	switch {
	case winner.Priority != loser.Priority:
		return "priority"
	case winner.CreatedTimeUTC.UnixNano() != loser.CreatedTimeUTC.UnixNano():
		return "created"
	}
	return "id"
}

func winsOver(d, next fleet.Deployment, by string) string {
	switch by {
	case "priority":
		return fmt.Sprintf("highest priority (%d; next is %s with %d)", d.Priority, next.ID, next.Priority)
	case "created":
		return fmt.Sprintf("same priority (%d) as %s, created later (%s vs %s)", d.Priority, next.ID, stamp(d.CreatedTimeUTC), stamp(next.CreatedTimeUTC))
	}
	return fmt.Sprintf("same priority (%d) and creation time as %s; its id sorts first", d.Priority, next.ID)
}

func losesTo(d, winner fleet.Deployment, by string) string {
	switch by {
	case "priority":
		return fmt.Sprintf("lower priority (%d < %d)", d.Priority, winner.Priority)
	case "created":
		return fmt.Sprintf("same priority (%d), created earlier (%s vs %s)", d.Priority, stamp(d.CreatedTimeUTC), stamp(winner.CreatedTimeUTC))
	}
	return fmt.Sprintf("same priority (%d) and creation time; its id sorts after", d.Priority)
}

func stamp(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05.000000Z") }
