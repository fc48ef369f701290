package node

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
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

// Overview counts the fleet: every device once by connection and once by
// health (a device has at most one applied deployment, so summing the
// deployments' applied devices never counts a device twice), every
// deployment once by state.
func (b *backend) Overview(ctx context.Context) (api.Overview, error) {
	o := api.Overview{
		Node: b.cfg.NodeID, SoakSeconds: fleet.DefaultSoak.Seconds(),
		Devices:     api.OverviewDevices{Health: map[string]int{}},
		Deployments: api.OverviewDeployments{States: map[string]int{}, Items: []api.DeploymentSummary{}},
	}
	for _, h := range api.HealthStates {
		o.Devices.Health[h] = 0
	}
	for _, s := range api.DeploymentStates {
		o.Deployments.States[s] = 0
	}
	peers := b.node().peerSessions(ctx) // network: before any lock or transaction
	connected := map[string]bool{}
	for _, c := range b.broker.Connections() {
		connected[c.DeviceID] = true
	}
	for id := range peers {
		connected[id] = true
	}
	// The assignments are taken under assign's lock, all at one applied
	// index; the reports are read after it is released, so that reading a
	// large fleet's reports never holds up the apply path (the report of a
	// device that changed meanwhile is classified as DeploymentStatus
	// does: unknown until it reports the deployment).
	type assigned struct {
		id       string
		targeted int
		applied  []string
	}
	var deps []assigned
	b.assign.Read(func(v assign.View) {
		o.Devices.Total = v.Devices()
		for id := range connected {
			if v.HasDevice(id) { // a session outliving its device's deletion by a moment
				o.Devices.Connected++
			}
		}
		for _, id := range v.DeploymentIDs() {
			targeted, _ := v.Counts(id)
			deps = append(deps, assigned{id: id, targeted: targeted, applied: v.AppliedDevices(id)})
		}
	})
	o.Devices.Disconnected = o.Devices.Total - o.Devices.Connected

	now := time.Now().UTC()
	withDeployment := 0
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		for _, a := range deps {
			dep, err := r.Deployment(a.id)
			if errors.Is(err, fleet.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			counts := api.StatusCounts{Targeted: a.targeted, Applied: len(a.applied)}
			for _, dev := range a.applied {
				switch assign.Classify(assign.ReportOf(r, dev), a.id, now, fleet.DefaultSoak) {
				case api.CategoryHealthy:
					counts.Healthy++
				case api.CategorySoaking:
					counts.Soaking++
				case api.CategoryUnhealthy:
					counts.Unhealthy++
				default:
					counts.Unknown++
				}
			}
			withDeployment += counts.Applied
			o.Devices.Health[api.CategoryHealthy] += counts.Healthy
			o.Devices.Health[api.CategorySoaking] += counts.Soaking
			o.Devices.Health[api.CategoryUnhealthy] += counts.Unhealthy
			o.Devices.Health[api.CategoryUnknown] += counts.Unknown
			state := assign.DeploymentState(counts)
			o.Deployments.States[state]++
			o.Deployments.Total++
			if len(o.Deployments.Items) == api.MaxPageSize {
				o.Deployments.Truncated = true
				continue
			}
			o.Deployments.Items = append(o.Deployments.Items, api.DeploymentSummary{
				ID: a.id, Priority: dep.Priority, TargetCondition: dep.TargetCondition, State: state, Counts: counts,
			})
		}
		return nil
	})
	if err != nil {
		return api.Overview{}, err
	}
	o.Devices.Health[api.HealthNone] = o.Devices.Total - withDeployment
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
func (b *backend) DryRunDeployment(ctx context.Context, id string, req api.DeploymentRequest) (api.DryRunResult, error) {
	if err := validateDeployment(id, req); err != nil {
		return api.DryRunResult{}, err
	}
	created := now()
	err := b.store.View(func(r *raftstore.Reader) error {
		if d, err := r.Deployment(id); err == nil {
			created = d.CreatedTimeUTC // a re-put keeps its place
		}
		return nil
	})
	if err != nil {
		return api.DryRunResult{}, err
	}
	return b.dryRun(evaluator.Deployment{ID: id, Condition: req.TargetCondition, Priority: req.Priority, CreatedUnixNano: created.UnixNano()}, req.Rollout)
}

// DryRunPatchDeployment reports what a PATCH would do: the deployment with
// the patch's condition and priority, in its place by creation time.
func (b *backend) DryRunPatchDeployment(ctx context.Context, id string, p api.DeploymentPatch) (api.DryRunResult, error) {
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
	return b.dryRun(assign.EngineDeployment(&d, nil), d.Rollout)
}

// dryRun computes what putting d would change: the devices it would
// target and apply to, and every device whose applied deployment would
// change (to d, or, for devices d holds now and would lose, to the next
// deployment that targets them, or none). It reads the assignments call by
// call (each is consistent on its own: assign.Assigner.Loose) without
// assign's lock, which would hold up the apply path for as long as a large
// fleet takes to walk: a write landing meanwhile can make a preview a
// device off, never the write.
func (b *backend) dryRun(d evaluator.Deployment, rollout *fleet.RolloutPolicy) (api.DryRunResult, error) {
	v := b.assign.Loose()
	targeted, would, err := v.DryRunDevices(d)
	if err != nil {
		return api.DryRunResult{}, conditionError("targetCondition", err)
	}
	res := api.DryRunResult{
		TargetedCount: len(targeted), WouldApplyCount: len(would),
		TargetedDevices: sample(targeted), WouldApplyDevices: sample(would),
	}
	moves := moveSet{}
	for _, dev := range would {
		if from := v.Applied(dev); from != d.ID {
			moves.add(from, d.ID, dev)
		}
	}
	for _, dev := range v.AppliedDevices(d.ID) {
		if _, stays := slices.BinarySearch(would, dev); !stays {
			moves.add(d.ID, nextDeployment(v, dev, d.ID), dev)
		}
	}
	res.Moves = moves.list()
	if res.Waves, err = b.plannedWaves(d.ID, rollout, would); err != nil {
		return api.DryRunResult{}, err
	}
	return res, nil
}

// DryRunDeleteDeployment reports where the deployment's devices would go.
func (b *backend) DryRunDeleteDeployment(ctx context.Context, id string) (api.DryRunResult, error) {
	if _, err := b.Deployment(ctx, id, false); err != nil {
		return api.DryRunResult{}, err
	}
	v := b.assign.Loose() // without the lock, as dryRun
	targeted := v.TargetedDevices(id)
	res := api.DryRunResult{TargetedCount: len(targeted), TargetedDevices: sample(targeted), WouldApplyDevices: []string{}}
	moves := moveSet{}
	for _, dev := range v.AppliedDevices(id) {
		moves.add(id, nextDeployment(v, dev, id), dev)
	}
	res.Moves = moves.list()
	return res, nil
}

// nextDeployment is the deployment that would apply to a device without
// the one named: the first other that targets it, by precedence.
func nextDeployment(v assign.View, deviceID, without string) string {
	for _, dep := range v.Targeting(deviceID) {
		if dep != without {
			return dep
		}
	}
	return ""
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
// target it (targeting, as the engine ranks them): the first applies.
// The caller holds r's transaction and reads targeting from one View.
func precedence(r *raftstore.Reader, targeting []string) []api.PrecedenceEntry {
	deps := make([]fleet.Deployment, 0, len(targeting))
	for _, id := range targeting {
		if d, err := r.Deployment(id); err == nil {
			deps = append(deps, d)
		}
	}
	out := make([]api.PrecedenceEntry, len(deps))
	for i, d := range deps {
		e := api.PrecedenceEntry{Deployment: d.ID, Status: api.StatusTargeted, Priority: d.Priority, CreatedTimeUTC: d.CreatedTimeUTC}
		switch {
		case i == 0 && len(deps) == 1:
			e.Status = api.StatusApplied
			e.Reason = "applies: the only deployment whose condition matches this device"
		case i == 0:
			e.Status = api.StatusApplied
			e.DecidedBy = decidedBy(d, deps[1])
			e.Reason = "applies: " + winsOver(d, deps[1], e.DecidedBy)
		default:
			e.DecidedBy = decidedBy(deps[0], d)
			e.Reason = fmt.Sprintf("loses to %s: %s", deps[0].ID, losesTo(d, deps[0], e.DecidedBy))
		}
		out[i] = e
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
