package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"appliance/api"
	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// backend implements api.Backend: it validates each request, turns it into
// a raft command, and answers reads from the local replica and the
// evaluator.
type backend Node

var _ api.Backend = (*backend)(nil)

func (b *backend) node() *Node { return (*Node)(b) }

// apply proposes a command; leadership problems become api.ErrUnavailable.
func (b *backend) apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
	if err := b.node().stoppedErr(); err != nil {
		return nil, fmt.Errorf("%w: this node stopped serving: %v", api.ErrUnavailable, err)
	}
	start := time.Now()
	res, err := b.store.Apply(ctx, cmd)
	if err == nil {
		b.metrics.observeApply(cmd.Type().String(), time.Since(start))
	}
	if err != nil && (errors.Is(err, raftstore.ErrNotLeader) || errors.Is(err, raftstore.ErrClosed)) {
		return nil, b.unavailable(err)
	}
	if err != nil && errors.Is(err, raftstore.ErrClusterBehind) {
		return nil, fmt.Errorf("%w: %w", api.ErrUpgradeRequired, err)
	}
	if err != nil && errors.Is(err, raftstore.ErrUnknownOutcome) {
		return nil, fmt.Errorf("%w: the write may or may not have been applied (leadership changed or the leader could not be reached while it was in flight); read it back before retrying: %v",
			api.ErrUnavailable, err)
	}
	return res, err
}

func (b *backend) unavailable(err error) error {
	addr, id := b.store.Leader()
	if addr == "" {
		return fmt.Errorf("%w: no raft leader yet, retry shortly (%v)", api.ErrUnavailable, err)
	}
	return fmt.Errorf("%w: this node is not the leader; the leader is %s at %s (%v)", api.ErrUnavailable, id, addr, err)
}

// view reads the local replica; a consistent read first confirms this node
// leads and has applied everything committed. No lock may be held while
// waiting for that: the apply path itself takes the assignments' lock.
//
// A plain read is refused (503) while the node replays its log or after it
// stopped (readiness.go); a consistent read that passes its barrier is
// current, and marks the node replayed.
func (b *backend) view(ctx context.Context, consistent bool, fn func(r *raftstore.Reader) error) error {
	if err := b.node().stoppedErr(); err != nil {
		return b.node().servingReads()
	}
	if consistent {
		if err := b.node().readBarrier(ctx); err != nil {
			if errors.Is(err, raftstore.ErrNotLeader) {
				return b.unavailable(err)
			}
			return err
		}
		b.replayed.Store(true)
	} else if err := b.node().servingReads(); err != nil {
		return err
	}
	return b.store.View(fn)
}

// viewBeforeWrite reads what a write checks before it is proposed. It
// reads this node's copy, and asks again with a read barrier before
// answering "not found": on a follower that has not applied a write the
// leader just acknowledged (the device created a moment ago through
// another node), a local read alone would refuse an edit of something
// that exists.
func (b *backend) viewBeforeWrite(ctx context.Context, fn func(r *raftstore.Reader) error) error {
	err := b.view(ctx, false, fn)
	if errors.Is(err, fleet.ErrNotFound) {
		err = b.view(ctx, true, fn)
	}
	return err
}

func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

func precondition(o api.WriteOptions) raftstore.Precondition {
	return raftstore.Precondition{IfMatch: o.IfMatch, IfNoneMatch: o.IfNoneMatch}
}

// PutDevice creates a device with two fresh keys, or replaces the tags and
// status of an existing one. Only a creation returns the keys, once.
func (b *backend) PutDevice(ctx context.Context, id string, req api.DeviceRequest, opts api.WriteOptions) (fleet.Device, bool, error) {
	if err := fleet.ValidateDeviceID(id); err != nil {
		return fleet.Device{}, false, err
	}
	if err := fleet.ValidateTags(req.Tags); err != nil {
		return fleet.Device{}, false, err
	}
	if err := fleet.ValidateDeviceStatus(req.Status); err != nil {
		return fleet.Device{}, false, err
	}
	if err := b.limits.Tags(id, req.Tags); err != nil {
		return fleet.Device{}, false, err
	}
	primary, err := fleet.NewKey()
	if err != nil {
		return fleet.Device{}, false, err
	}
	secondary, err := fleet.NewKey()
	if err != nil {
		return fleet.Device{}, false, err
	}
	res, err := b.apply(ctx, raftstore.PutDevice{
		Precondition: precondition(opts),
		Time:         now(),
		Device: fleet.Device{
			ID: id, Tags: req.Tags, Status: req.Status,
			Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{
				Primary: fleet.HashKey(primary), Secondary: fleet.HashKey(secondary),
			}},
		},
	})
	if err != nil {
		return fleet.Device{}, false, err
	}
	dev := res.Device.Public()
	if res.Created {
		dev.Authentication.SymmetricKey = &fleet.SymmetricKey{PrimaryKey: primary, SecondaryKey: secondary}
	}
	return dev, res.Created, nil
}

func (b *backend) PatchDevice(ctx context.Context, id string, p api.DevicePatch, opts api.WriteOptions) (fleet.Device, error) {
	if err := fleet.ValidateTags(p.Tags); err != nil {
		return fleet.Device{}, err
	}
	if err := fleet.ValidateDeviceStatus(p.Status); err != nil {
		return fleet.Device{}, err
	}
	// The device's merged tags are read only when the limits can refuse
	// them: with no more deployments than a device may be targeted by
	// (the usual case), reading and decoding the stored device before
	// proposing was half the node's decoding per tag change. A device that
	// does not exist is then refused by the state machine (ErrNotFound),
	// as a status-only patch always was.
	if check := b.limits.TagCheck(); len(p.Tags) > 0 && check != nil {
		var tags map[string]any
		read := func(r *raftstore.Reader) error {
			d, err := r.Device(id)
			tags = d.Tags
			return err
		}
		if err := b.viewBeforeWrite(ctx, read); err != nil {
			return fleet.Device{}, err
		}
		if tags == nil {
			tags = map[string]any{}
		}
		raftstore.MergePatch(tags, p.Tags)
		if err := check(id, tags); err != nil {
			return fleet.Device{}, err
		}
	}
	res, err := b.apply(ctx, raftstore.PatchDevice{Precondition: precondition(opts), ID: id, Tags: p.Tags, Status: p.Status, Time: now()})
	if err != nil {
		return fleet.Device{}, err
	}
	return res.Device.Public(), nil
}

func (b *backend) DeleteDevice(ctx context.Context, id string, opts api.WriteOptions) error {
	_, err := b.apply(ctx, raftstore.DeleteDevice{Precondition: precondition(opts), ID: id})
	return err
}

// deviceView joins a device's record with its assignments, its connection
// to this node, and its last report. The caller reads the assignments
// through a (inside the read transaction), so the record and its
// assignment agree.
func (b *backend) deviceView(r *raftstore.Reader, a assign.View, d fleet.Device, pv presenceView) api.DeviceView {
	v := api.DeviceView{Device: d.Public(), Configurations: map[string]api.ConfigurationStatus{}, ConnectionState: api.Disconnected}
	if c, ok := b.broker.Connection(d.ID); ok {
		v.ConnectionState, v.ConnectedNode = api.Connected, b.cfg.NodeID
		last := c.LastActivity.UTC()
		v.LastActivityTime = &last
	} else if s, ok := pv.peers[d.ID]; ok {
		v.ConnectionState, v.ConnectedNode = api.Connected, s.Node
		last := s.LastActivity
		v.LastActivityTime = &last
	}
	v.DesiredVersion = a.Version(d.ID)
	var doc *fleet.ReportedDocument
	var reported time.Time
	if rep, err := r.Report(d.ID); err == nil {
		v.Reported = &api.ReportedState{Document: rep.Document, ReceivedTimeUTC: rep.ReceivedTimeUTC}
		reported = rep.ReceivedTimeUTC
		var parsed fleet.ReportedDocument
		if json.Unmarshal(rep.Document, &parsed) == nil {
			doc = &parsed
		}
	}
	nowT := time.Now().UTC()
	v.Presence, v.LastContactTime = pv.of(d.ID, reported, nowT)
	subject := a.Subject(d.ID)
	applied := subject.Base
	v.Health = assign.HealthOf(doc, subject, nowT)
	for _, dep := range a.Targeting(d.ID) {
		st := api.StatusTargeted
		if dep == applied || applied != "" && a.IsLayered(dep) {
			st = api.StatusApplied
		}
		v.Configurations[dep] = api.ConfigurationStatus{Status: st}
	}
	if applied == "" {
		k := assign.KeptOf(d, doc, a.Layers(d.ID))
		v.Kept = &k
	}
	return v
}

func (b *backend) Device(ctx context.Context, id string, consistent bool) (api.DeviceView, error) {
	var v api.DeviceView
	pv := b.node().presence(ctx) // network: before any lock or transaction
	err := b.view(ctx, consistent, func(r *raftstore.Reader) error {
		d, err := r.Device(id)
		if err != nil {
			return err
		}
		var err2 error
		b.assign.Read(func(a assign.View) {
			v = b.deviceView(r, a, d, pv)
			v.Precedence = precedence(r, a, a.Targeting(id))
			comp, ok, err := b.assign.Composition(r, a, id)
			if err != nil {
				err2 = err
				return
			}
			if ok {
				v.Document = &comp
			}
		})
		return err2
	})
	return v, err
}

func (b *backend) Devices(ctx context.Context, q api.DeviceQuery) (api.DevicePage, error) {
	page := api.DevicePage{Items: []api.DeviceView{}}
	limit := q.Limit
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	var ids []string
	if q.Condition != "" {
		cond, err := evaluator.Compile(q.Condition)
		if err != nil {
			return page, conditionError("condition", err)
		}
		b.assign.Read(func(a assign.View) { ids, err = a.Match(cond) })
		if err != nil {
			return page, conditionError("condition", err)
		}
		if q.Prefix != "" {
			lo, _ := slices.BinarySearch(ids, q.Prefix)
			hi := lo
			for hi < len(ids) && strings.HasPrefix(ids[hi], q.Prefix) {
				hi++
			}
			ids = ids[lo:hi]
		}
		total := len(ids)
		page.Total = &total
		i := sort.SearchStrings(ids, q.After)
		if i < len(ids) && ids[i] == q.After {
			i++
		}
		ids = ids[i:]
	}
	pv := b.node().presence(ctx) // network: before any lock or transaction
	err := b.view(ctx, q.Consistent, func(r *raftstore.Reader) (err error) {
		b.assign.Read(func(a assign.View) { err = b.devicePage(r, a, q, ids, pv, limit, &page) })
		return err
	})
	return page, err
}

// devicePage fills one page of GET /devices: the devices of ids (a
// condition's), else those of the replica after q.After with q.Prefix.
func (b *backend) devicePage(r *raftstore.Reader, a assign.View, q api.DeviceQuery, ids []string, peers presenceView, limit int, page *api.DevicePage) error {
	if q.Condition != "" {
		for _, id := range ids {
			if len(page.Items) == limit {
				page.Next = page.Items[len(page.Items)-1].ID
				return nil
			}
			d, err := r.Device(id)
			if errors.Is(err, fleet.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			page.Items = append(page.Items, b.deviceView(r, a, d, peers))
		}
		return nil
	}
	add := func(d fleet.Device) bool {
		if !strings.HasPrefix(d.ID, q.Prefix) {
			return false // ids are in order: no later one has the prefix
		}
		if len(page.Items) == limit {
			page.Next = page.Items[len(page.Items)-1].ID
			return false
		}
		page.Items = append(page.Items, b.deviceView(r, a, d, peers))
		return true
	}
	after := q.After
	if q.Prefix > after {
		// Start at the prefix; the walk starts after its argument, so
		// a device whose id is the prefix itself is taken first.
		after = q.Prefix
		if d, err := r.Device(q.Prefix); err == nil {
			add(d)
		} else if !errors.Is(err, fleet.ErrNotFound) {
			return err
		}
	}
	if q.Prefix == "" {
		total := a.Devices()
		page.Total = &total
	}
	return r.Devices(after, add)
}

// conditionError names the field a bad condition came in.
func conditionError(field string, err error) error {
	return &fleet.ValidationError{Field: field, Msg: err.Error()}
}

// validateDeployment checks everything about a deployment request that can
// be checked before raft, so a bad request changes nothing.
func validateDeployment(id string, req api.DeploymentRequest) error {
	if err := fleet.ValidateDeploymentID(id); err != nil {
		return err
	}
	if err := fleet.ValidatePriority(req.Priority); err != nil {
		return err
	}
	if err := fleet.ValidateLabels(req.Labels); err != nil {
		return err
	}
	if _, err := evaluator.Compile(req.TargetCondition); err != nil {
		return conditionError("targetCondition", err)
	}
	if err := validateMetrics(req.Metrics.Queries); err != nil {
		return err
	}
	if _, err := validateRollout(req.Rollout); err != nil {
		return err
	}
	if len(req.Content) == 0 || string(req.Content) == "null" {
		return fleet.Invalid("content", "is required: give the deployment manifest as {\"modulesContent\": {...}}")
	}
	return fleet.ValidateContent(req.Content, req.Layered)
}

// validateMetrics compiles each custom metric query: Azure's
// `SELECT deviceId FROM devices WHERE <condition>` (over deviceId, tags,
// properties.reported...), its module-level form `... FROM devices.modules
// WHERE ...` (over deviceId, moduleId and a module twin's
// properties.reported), or a bare condition over a device
// (evaluator.CompileMetric).
func validateMetrics(q map[string]string) error {
	for name, query := range q {
		if name == "" {
			return fleet.Invalid("metrics.queries", "a metric name must not be empty")
		}
		if strings.TrimSpace(query) == "" {
			return fleet.Invalid("metrics.queries."+name, "must not be empty")
		}
		if _, err := evaluator.CompileMetric(query); err != nil {
			return conditionError("metrics.queries."+name, err)
		}
	}
	return nil
}

func (b *backend) PutDeployment(ctx context.Context, id string, req api.DeploymentRequest, opts api.WriteOptions) (api.DeploymentView, bool, error) {
	req.Content = b.storedContent(id, req.Content)
	if err := validateDeployment(id, req); err != nil {
		return api.DeploymentView{}, false, err
	}
	if req.Rollout != nil && req.Layered {
		return api.DeploymentView{}, false, fleet.Invalid("rollout", "a layered deployment is merged on each device's base at once; roll out the base instead")
	}
	compact, err := compactJSON(req.Content)
	if err != nil {
		return api.DeploymentView{}, false, fleet.Invalid("content", "%v", err)
	}
	if err := b.limits.Content(compact); err != nil {
		return api.DeploymentView{}, false, err
	}
	if err := b.requireSemantics(ctx, req.Layered, req.TargetCondition); err != nil {
		return api.DeploymentView{}, false, err
	}
	if err := b.limits.Devices(b.engineDeploymentOf(id, req.TargetCondition, req.Priority, req.Layered), compact); err != nil {
		return api.DeploymentView{}, false, err
	}
	rollout, err := validateRollout(req.Rollout)
	if err != nil {
		return api.DeploymentView{}, false, err
	}
	res, err := b.apply(ctx, raftstore.PutDeployment{
		Precondition: precondition(opts),
		Time:         now(),
		Actor:        operatorActor,
		Deployment: fleet.Deployment{
			ID: id, Labels: req.Labels, Content: compact, TargetCondition: req.TargetCondition,
			Priority: req.Priority, Metrics: req.Metrics, Layered: req.Layered, Rollout: rollout,
		},
	})
	if err != nil {
		return api.DeploymentView{}, false, err
	}
	return b.deploymentView(*res.Deployment), res.Created, nil
}

func compactJSON(raw json.RawMessage) (json.RawMessage, error) {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

func (b *backend) PatchDeployment(ctx context.Context, id string, p api.DeploymentPatch, opts api.WriteOptions) (api.DeploymentView, error) {
	if len(p.Content) > 0 {
		return api.DeploymentView{}, errContentImmutable
	}
	if p.TargetCondition != nil {
		if _, err := evaluator.Compile(*p.TargetCondition); err != nil {
			return api.DeploymentView{}, conditionError("targetCondition", err)
		}
	}
	if p.Priority != nil {
		if err := fleet.ValidatePriority(*p.Priority); err != nil {
			return api.DeploymentView{}, err
		}
	}
	if err := fleet.ValidateLabels(p.Labels); err != nil {
		return api.DeploymentView{}, err
	}
	if p.TargetCondition != nil || p.Priority != nil {
		var stored fleet.Deployment
		if err := b.viewBeforeWrite(ctx, func(r *raftstore.Reader) (err error) { stored, err = r.Deployment(id); return err }); err != nil {
			return api.DeploymentView{}, err
		}
		if p.TargetCondition != nil {
			if err := b.requireSemantics(ctx, false, *p.TargetCondition); err != nil {
				return api.DeploymentView{}, err
			}
			stored.TargetCondition = *p.TargetCondition
		}
		if p.Priority != nil {
			stored.Priority = *p.Priority
		}
		if err := b.limits.Devices(assign.EngineDeployment(&stored, nil), nil); err != nil {
			return api.DeploymentView{}, err
		}
	}
	cmd := raftstore.PatchDeployment{
		Precondition: precondition(opts), ID: id, Time: now(), Actor: operatorActor,
		TargetCondition: p.TargetCondition, Priority: p.Priority, Labels: p.Labels,
	}
	if p.Metrics != nil {
		// An empty query removes that metric.
		keep := map[string]string{}
		for name, query := range p.Metrics.Queries {
			if query != "" {
				keep[name] = query
			} else if name == "" {
				return api.DeploymentView{}, fleet.Invalid("metrics.queries", "a metric name must not be empty")
			}
		}
		if err := validateMetrics(keep); err != nil {
			return api.DeploymentView{}, err
		}
		cmd.MetricQueries = p.Metrics.Queries
	}
	if p.Rollout != nil {
		// Merged over the stored policy here; the state machine checks
		// again that the waves did not change in between.
		cur, err := b.Deployment(ctx, id, true)
		if err != nil {
			return api.DeploymentView{}, err
		}
		if cmd.Rollout, err = mergeRollout(cur.Rollout, p.Rollout); err != nil {
			return api.DeploymentView{}, err
		}
	}
	res, err := b.apply(ctx, cmd)
	if err != nil {
		return api.DeploymentView{}, err
	}
	return b.deploymentView(*res.Deployment), nil
}

func (b *backend) DeleteDeployment(ctx context.Context, id string, opts api.WriteOptions) error {
	_, err := b.apply(ctx, raftstore.DeleteDeployment{Precondition: precondition(opts), ID: id, Time: now(), Actor: operatorActor})
	return err
}

func (b *backend) deploymentView(d fleet.Deployment) api.DeploymentView {
	var targeted, applied int
	b.assign.Read(func(a assign.View) { targeted, applied = a.Counts(d.ID) })
	v := api.DeploymentView{
		Deployment: d.Public(),
		SystemMetrics: api.SystemMetrics{Results: map[string]int{
			"targetedCount": targeted,
			"appliedCount":  applied,
		}, Queries: assign.SystemMetricQueries(d)},
	}
	if d.Layered {
		v.Warnings = fleet.LayeredEntries(d.Content)
	}
	return v
}

// engineDeploymentOf is what putting a deployment would give the engine:
// a new one created now, an existing one in its place by creation time.
func (b *backend) engineDeploymentOf(id, condition string, priority int64, layered bool) evaluator.Deployment {
	d := evaluator.Deployment{ID: id, Condition: condition, Priority: priority, CreatedUnixNano: now().UnixNano(), Layered: layered}
	_ = b.store.View(func(r *raftstore.Reader) error {
		if old, err := r.Deployment(id); err == nil {
			d.CreatedUnixNano, d.Layered = old.CreatedTimeUTC.UnixNano(), old.Layered
		}
		return nil
	})
	return d
}

func (b *backend) Deployment(ctx context.Context, id string, consistent bool) (api.DeploymentView, error) {
	var d fleet.Deployment
	err := b.view(ctx, consistent, func(r *raftstore.Reader) error {
		var err error
		d, err = r.Deployment(id)
		return err
	})
	if err != nil {
		return api.DeploymentView{}, err
	}
	return b.deploymentView(d), nil
}

func (b *backend) Deployments(ctx context.Context, q api.DeploymentQuery) (api.DeploymentPage, error) {
	page := api.DeploymentPage{Items: []api.DeploymentView{}}
	limit := q.Limit
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	var found []fleet.Deployment
	err := b.view(ctx, q.Consistent, func(r *raftstore.Reader) error {
		return r.Deployments(q.After, func(d fleet.Deployment) bool {
			for k, v := range q.Labels {
				if d.Labels[k] != v {
					return true
				}
			}
			if len(found) == limit {
				page.Next = found[len(found)-1].ID
				return false
			}
			found = append(found, d)
			return true
		})
	})
	if err != nil {
		return page, err
	}
	for _, d := range found {
		page.Items = append(page.Items, b.deploymentView(d))
	}
	return page, nil
}

// errContentImmutable refuses a PATCH that carries content.
var errContentImmutable = &fleet.ValidationError{Field: "content",
	Msg: "a deployment's content cannot change after creation; create a new deployment with a higher priority instead (only targetCondition, priority, labels and metrics can be updated)"}

// operatorActor names who wrote through the operator API: there is one
// admin token today.
const operatorActor = "admin"

// History returns a deployment's or a device's events, newest first.
func (b *backend) History(ctx context.Context, deployment bool, id string, limit int) (api.HistoryPage, error) {
	if limit <= 0 {
		limit = api.DefaultPageSize
	}
	if err := b.node().servingReads(); err != nil {
		return api.HistoryPage{}, err
	}
	items, err := b.history.Events(deployment, id, limit)
	if err != nil {
		return api.HistoryPage{}, fmt.Errorf("read history of %s: %w", id, err)
	}
	if len(items) == 0 {
		// Say "not found" only for what never existed here.
		err := b.view(ctx, false, func(r *raftstore.Reader) error {
			if deployment {
				_, err := r.Deployment(id)
				return err
			}
			_, err := r.Device(id)
			return err
		})
		if err != nil {
			return api.HistoryPage{}, err
		}
	}
	return api.HistoryPage{Items: items}, nil
}

func (b *backend) Health() api.Health {
	_, leader := b.store.Leader()
	return api.Health{Status: "ok", NodeID: b.cfg.NodeID, Raft: b.store.State(), Leader: leader, Version: b.cfg.Version}
}

func (b *backend) Ready(ctx context.Context) error { return b.node().readyErr() }
