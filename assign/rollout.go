package assign

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// Rollouts. A deployment created with a rollout policy is gated in the
// evaluator: it applies only to the devices its rollout admitted. The
// leader judges each running rollout (judge) from the devices the
// deployment would move, the waves started, and the health those devices
// report, and proposes what follows (RunRollouts): start the first wave,
// admit the devices of the started waves, start the next wave once the
// current one passed, complete, or stop on a breach of the failure
// threshold. Every node answers a rollout's status with the same judge.
//
// Membership of a wave is fixed by the two ids (fleet.WavePosition) and
// the wave's threshold, recorded when it started: a device joining the
// target set later lands in a wave by the same rule, and a new leader
// continues from what was committed.

// rolloutInfo is what the Assigner keeps of a rollout (under its lock).
type rolloutInfo struct {
	rollout  fleet.Rollout
	policy   fleet.RolloutPolicy
	plan     fleet.RolloutPlan
	planErr  error
	canary   *evaluator.Condition // compiled Canary, nil for none
	admitted map[string]fleet.RolloutDevice
}

func (a *Assigner) rolloutOf(id string) *rolloutInfo {
	info := a.rollouts[id]
	if info == nil {
		info = &rolloutInfo{admitted: map[string]fleet.RolloutDevice{}}
		a.rollouts[id] = info
	}
	return info
}

// noteRollout keeps a deployment's rollout policy (and its progress, when
// ro is given) as it is written.
func (a *Assigner) noteRollout(id string, d *fleet.Deployment, ro *fleet.Rollout) {
	if d.Rollout == nil {
		if ro == nil {
			delete(a.rollouts, id)
		}
		return
	}
	info := a.rolloutOf(id)
	info.policy = *d.Rollout
	info.plan, info.planErr = d.Rollout.Plan()
	info.canary = nil
	if c := strings.TrimSpace(d.Rollout.Canary); c != "" {
		cond, err := evaluator.Compile(c)
		if err != nil && info.planErr == nil {
			info.planErr = fmt.Errorf("rollout.canary: %w", err)
		}
		info.canary = cond
	}
	if ro != nil {
		info.rollout = *ro
	}
}

func (a *Assigner) anyRunning() bool {
	for _, info := range a.rollouts {
		if info.rollout.State == fleet.RolloutRunning {
			return true
		}
	}
	return false
}

// wake kicks the rollout loop without blocking.
func (a *Assigner) wake() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func describePolicy(p fleet.RolloutPolicy) string {
	var b strings.Builder
	if p.Canary != "" {
		fmt.Fprintf(&b, "canary %q, ", p.Canary)
	}
	fmt.Fprintf(&b, "waves %s, soak %s, success %s, timeout %s, max failures %s, on failure %s",
		strings.Join(p.Waves, " "), p.WaveSoak, p.WaveSuccess, p.WaveTimeout, p.MaxFailures, p.OnFailure)
	return b.String()
}

// describeAction says in words what a rollout change did.
func (a *Assigner) describeAction(c raftstore.Change) string {
	ro := c.Rollout
	waves := 0
	if info := a.rollouts[c.ID]; info != nil {
		waves = len(info.plan.Waves)
	}
	by := ""
	if c.Actor != "" {
		by = " by " + c.Actor
	}
	why := ""
	if ro.Reason != "" {
		why = ": " + ro.Reason
	}
	switch c.Action {
	case fleet.RolloutStartWave:
		n := len(ro.Waves)
		label := ""
		if info := a.rollouts[c.ID]; info != nil && n-1 < len(info.plan.Waves) {
			label = " (" + info.plan.Waves[n-1].Label() + ")"
		}
		return fmt.Sprintf("rollout: wave %d of %d%s started, %d devices planned%s", n, waves, label, ro.Waves[n-1].Planned, why)
	case fleet.RolloutComplete:
		return "rollout completed: every wave passed"
	case fleet.RolloutHalt:
		return "rollout halted" + why
	case fleet.RolloutPause:
		return "rollout paused" + by + why
	case fleet.RolloutResume:
		return "rollout resumed" + by + why
	case fleet.RolloutPromote:
		return fmt.Sprintf("rollout: wave %d promoted%s%s", len(ro.Waves), by, why)
	case fleet.RolloutAbort:
		return "rollout aborted" + by + why
	case fleet.RolloutRollback:
		return "rollout rolled back" + by + why + "; every device it moved returns to what it ran before"
	}
	return "rollout " + c.Action + by + why
}

// positionCache keeps WavePosition per rollout and device: a hash per
// device per judgement would cost more than the rest of it.
type positionCache struct {
	mu sync.Mutex
	by map[string]map[string]uint64
}

func (p *positionCache) of(deployment, device string) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.by == nil {
		p.by = map[string]map[string]uint64{}
	}
	m := p.by[deployment]
	if m == nil {
		m = map[string]uint64{}
		p.by[deployment] = m
	}
	pos, ok := m[device]
	if !ok {
		pos = fleet.WavePosition(deployment, device)
		m[device] = pos
	}
	return pos
}

func (p *positionCache) drop(deployment string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.by, deployment)
}

func (p *positionCache) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.by = nil
}

// rolloutSnapshot is what judging a rollout needs from under the lock,
// copied so that reading reports does not hold up the apply path.
type rolloutSnapshot struct {
	id      string
	rollout fleet.Rollout
	policy  fleet.RolloutPolicy
	plan    fleet.RolloutPlan
	planErr error
	// asOf is the applied index the snapshot reflects.
	asOf uint64
	// candidates are the devices the deployment would move, sorted;
	// canary those of them the canary condition matches (nil: no canary).
	candidates []string
	canary     map[string]bool
	admitted   map[string]fleet.RolloutDevice
	// exposed are the admitted devices the deployment applies to now;
	// previous is what each candidate not admitted runs.
	exposed  map[string]bool
	previous map[string]string
}

// snapshot copies a rollout's state; ok is false when there is none.
func (a *Assigner) snapshot(id string) (rolloutSnapshot, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	info := a.rollouts[id]
	if info == nil {
		return rolloutSnapshot{}, false
	}
	s := rolloutSnapshot{id: id, rollout: info.rollout, policy: info.policy, plan: info.plan, planErr: info.planErr, asOf: a.applied,
		admitted: make(map[string]fleet.RolloutDevice, len(info.admitted)), exposed: map[string]bool{}, previous: map[string]string{}}
	s.rollout.Waves = slices.Clone(s.rollout.Waves)
	for dev, d := range info.admitted {
		s.admitted[dev] = d
		if a.effectiveLocked(dev).deployment == id {
			s.exposed[dev] = true
		}
	}
	if !info.rollout.Active() {
		return s, true
	}
	s.candidates = a.engine.WouldApply(id)
	if info.canary != nil {
		s.canary = map[string]bool{}
		if matched, err := a.engine.Match(info.canary); err == nil {
			for _, dev := range matched {
				s.canary[dev] = true
			}
		}
	}
	for _, dev := range s.candidates {
		if _, ok := info.admitted[dev]; !ok {
			s.previous[dev] = a.effectiveLocked(dev).deployment
		}
	}
	return s, true
}

// waveTally counts one wave's devices.
type waveTally struct {
	size, admitted, healthy, failed, pending int
	unhealthy, timedOut                      []string
}

// judgement is a rollout judged at one moment: its status and what the
// leader should propose.
type judgement struct {
	status fleet.RolloutStatus
	admit  []raftstore.AdmitDevice
	action *raftstore.RolloutAction
}

// reportSource reads a device's last report.
type reportSource func(deviceID string) *healthReport

// judge decides where a rollout stands at now.
func (a *Assigner) judge(s rolloutSnapshot, reports reportSource, now time.Time) judgement {
	ro, plan := s.rollout, s.plan
	st := fleet.RolloutStatus{Deployment: s.id, State: ro.State, Reason: ro.Reason, Aborted: ro.Aborted, Policy: s.policy,
		Wave: len(ro.Waves), UpdatedTimeUTC: ro.UpdatedTimeUTC, Waves: []fleet.WaveStatus{}}
	j := judgement{}
	if s.planErr != nil {
		st.Next = "nothing: the stored policy is invalid (" + s.planErr.Error() + ")"
		j.status = st
		return j
	}
	tally := make([]waveTally, len(plan.Waves))
	canaryWave := len(plan.Waves) > 0 && plan.Waves[0].Canary != ""

	// The devices reached: their health under this deployment.
	var failedIDs []string
	for dev, d := range s.admitted {
		if d.Wave < 0 || d.Wave >= len(tally) {
			continue
		}
		t := &tally[d.Wave]
		t.admitted++
		st.Reached++
		if !s.exposed[dev] {
			continue
		}
		t.size++
		st.Exposed++
		switch classifyAs(reports(dev), s.id, now, plan.Soak) {
		case fleet.CategoryHealthy:
			t.healthy++
		case fleet.CategoryUnhealthy:
			t.failed++
			t.unhealthy = append(t.unhealthy, dev)
			failedIDs = append(failedIDs, dev)
		case fleet.CategoryUnknown:
			if now.Sub(d.Time) > plan.Timeout {
				t.failed++
				t.timedOut = append(t.timedOut, dev)
				failedIDs = append(failedIDs, dev)
				break
			}
			t.pending++
		default:
			t.pending++
		}
	}
	st.Failed = len(failedIDs)
	st.FailureLimit = int(math.Floor(plan.MaxFailures * float64(st.Exposed) / 100))

	// The devices not reached yet: the wave each lands in, if started.
	var toAdmit []raftstore.AdmitDevice
	var hashCands []uint64 // positions of the candidates outside the canary
	for _, dev := range s.candidates {
		if _, ok := s.admitted[dev]; ok {
			continue
		}
		if s.canary != nil && s.canary[dev] {
			if canaryWave && len(ro.Waves) > 0 {
				toAdmit = append(toAdmit, raftstore.AdmitDevice{ID: dev, Wave: 0, Previous: s.previous[dev]})
				tally[0].size++
				tally[0].pending++
			}
			continue
		}
		pos := a.positions.of(s.id, dev)
		hashCands = append(hashCands, pos)
		for w := range ro.Waves {
			if plan.Waves[w].Canary == "" && pos <= ro.Waves[w].Threshold {
				toAdmit = append(toAdmit, raftstore.AdmitDevice{ID: dev, Wave: w, Previous: s.previous[dev]})
				tally[w].size++
				tally[w].pending++
				break
			}
		}
	}
	// Waves not started: what they would reach now.
	totalHash := len(hashCands) + len(s.exposedHash())
	planned := 0
	for w, spec := range plan.Waves {
		if w < len(ro.Waves) {
			if spec.Canary == "" {
				planned = ro.Waves[w].Planned
			}
			continue
		}
		if spec.Canary != "" {
			n := s.canaryCandidates()
			tally[w].size, tally[w].pending = n, n
			continue
		}
		next := spec.Size(totalHash, planned)
		tally[w].size, tally[w].pending = next-planned, next-planned
		planned = next
	}
	for w, spec := range plan.Waves {
		ws := fleet.WaveStatus{Number: w + 1, Target: spec.Label(), State: fleet.WavePending, Size: tally[w].size,
			Healthy: tally[w].healthy, Failed: tally[w].failed, Pending: tally[w].pending, Admitted: tally[w].admitted}
		if w < len(ro.Waves) {
			started := ro.Waves[w].StartedTimeUTC
			ws.StartedTimeUTC, ws.PassedTimeUTC = &started, ro.Waves[w].PassedTimeUTC
			ws.State = fleet.WaveRunning
			switch {
			case ro.State == fleet.RolloutRolledBack:
				// Its devices run what they ran before: the wave held
				// the devices it reached.
				ws.State, ws.Size = fleet.WaveRolledBack, tally[w].admitted
			case ws.PassedTimeUTC != nil:
				ws.State = fleet.WavePassed
			}
		}
		st.Waves = append(st.Waves, ws)
	}

	st.Next = a.next(s, &j, tally, toAdmit, failedIDs, hashCands, now)
	j.status = st
	return j
}

// next decides the leader's next step (into j) and says what it waits for.
func (a *Assigner) next(s rolloutSnapshot, j *judgement, tally []waveTally, toAdmit []raftstore.AdmitDevice, failedIDs []string, hashCands []uint64, now time.Time) string {
	ro, plan := s.rollout, s.plan
	switch ro.State {
	case fleet.RolloutPaused:
		return "resume (paused" + reasonSuffix(ro.Reason) + ")"
	case fleet.RolloutHalted:
		if ro.Aborted {
			return "nothing: aborted (roll back to return the devices it reached to what they ran before)"
		}
		return "resume, promote or roll back (halted" + reasonSuffix(ro.Reason) + ")"
	case fleet.RolloutCompleted:
		return "nothing: completed"
	case fleet.RolloutRolledBack:
		return "nothing: rolled back" + reasonSuffix(ro.Reason)
	}
	waves := len(ro.Waves)
	decide := func(action string) *raftstore.RolloutAction {
		return &raftstore.RolloutAction{Deployment: s.id, Action: action, Time: now, IfState: fleet.RolloutRunning, Waves: &waves}
	}
	exposed := 0
	for range s.exposed {
		exposed++
	}
	limit := int(math.Floor(plan.MaxFailures * float64(exposed) / 100))
	if len(failedIDs) > limit {
		slices.Sort(failedIDs)
		unhealthy, timedOut := 0, 0
		for _, t := range tally {
			unhealthy += len(t.unhealthy)
			timedOut += len(t.timedOut)
		}
		reason := fmt.Sprintf("failure threshold crossed: %d of %d devices reached failed (%s > %s; %d unhealthy, %d timed out), e.g. %s",
			len(failedIDs), exposed, percent(len(failedIDs), exposed), formatShare(plan.MaxFailures), unhealthy, timedOut,
			strings.Join(failedIDs[:min(len(failedIDs), 5)], ", "))
		act := decide(fleet.RolloutHalt)
		if plan.OnFailure == fleet.OnFailureRollback {
			act = decide(fleet.RolloutRollback)
		}
		act.Reason = reason
		j.action = act
		return "stopping: " + reason
	}
	if waves == 0 {
		act := decide(fleet.RolloutStartWave)
		a.setWave(s, act, 0, hashCands)
		j.action = act
		return "starting wave 1"
	}
	if len(toAdmit) > 0 {
		slices.SortFunc(toAdmit, func(x, y raftstore.AdmitDevice) int { return strings.Compare(x.ID, y.ID) })
		j.admit = toAdmit
		return fmt.Sprintf("sending the deployment to %d devices of the started waves", len(toAdmit))
	}
	cur := waves - 1
	t := tally[cur]
	spec := plan.Waves[cur]
	passed := false
	switch {
	case ro.Promote:
		passed = true
	case t.size == 0 && spec.Canary != "":
		act := decide(fleet.RolloutHalt)
		act.Reason = "the canary condition matches none of the devices this deployment would move: promote to go on without a canary"
		j.action = act
		return "stopping: " + act.Reason
	case t.size == 0:
		passed = true
	default:
		passed = float64(t.healthy)*100 >= plan.Success*float64(t.size)
	}
	if !passed {
		need := int(math.Ceil(plan.Success * float64(t.size) / 100))
		return fmt.Sprintf("wave %d: %d of %d devices healthy, %d needed (%s, each running for %s); %d failed, %d pending",
			cur+1, t.healthy, t.size, need, formatShare(plan.Success), plan.Soak, t.failed, t.pending)
	}
	if cur+1 < len(plan.Waves) {
		act := decide(fleet.RolloutStartWave)
		a.setWave(s, act, cur+1, hashCands)
		if ro.Promote {
			act.Reason = fmt.Sprintf("wave %d promoted", cur+1)
		}
		j.action = act
		return fmt.Sprintf("starting wave %d: wave %d passed", cur+2, cur+1)
	}
	act := decide(fleet.RolloutComplete)
	act.Reason = "every wave passed"
	j.action = act
	return "completing: every wave passed"
}

// setWave fills in what a StartWave of wave w starts: for a hash wave the
// highest position it reaches and the devices it plans to, for a canary
// wave the devices its condition matches.
func (a *Assigner) setWave(s rolloutSnapshot, act *raftstore.RolloutAction, w int, hashCands []uint64) {
	spec := s.plan.Waves[w]
	if spec.Canary != "" {
		act.Planned = s.canaryCandidates()
		return
	}
	// The positions of every device outside the canary the deployment
	// would move, reached or not.
	all := slices.Clone(hashCands)
	for _, dev := range s.exposedHash() {
		all = append(all, a.positions.of(s.id, dev))
	}
	slices.Sort(all)
	prev := 0
	for i := w - 1; i >= 0; i-- {
		if s.plan.Waves[i].Canary == "" && i < len(s.rollout.Waves) {
			prev = s.rollout.Waves[i].Planned
			break
		}
	}
	n := spec.Size(len(all), prev)
	act.Planned = n
	switch {
	case spec.Percent >= 100:
		act.Threshold = math.MaxUint64
	case n == 0:
		act.Threshold = 0
	default:
		act.Threshold = all[n-1]
	}
	// A later wave never reaches less than an earlier one.
	for i := 0; i < w && i < len(s.rollout.Waves); i++ {
		act.Threshold = max(act.Threshold, s.rollout.Waves[i].Threshold)
	}
}

func reasonSuffix(r string) string {
	if r == "" {
		return ""
	}
	return ": " + r
}

func percent(n, of int) string {
	if of == 0 {
		return "0%"
	}
	return formatShare(float64(n) * 100 / float64(of))
}

func formatShare(v float64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.1f", v), "0"), ".") + "%"
}

// RolloutStatus is where a deployment's rollout stands, judged on this
// node from the replica r (the caller's read transaction) at now;
// fleet.ErrNotFound when the deployment has no rollout.
func (a *Assigner) RolloutStatus(r *raftstore.Reader, deploymentID string, now time.Time) (fleet.RolloutStatus, error) {
	s, ok := a.snapshot(deploymentID)
	if ok && s.rollout.State == fleet.RolloutCompleted {
		// Not kept in memory once completed: read them.
		if err := r.RolloutDevices(deploymentID, func(id string, d fleet.RolloutDevice) bool {
			s.admitted[id] = d
			return true
		}); err != nil {
			return fleet.RolloutStatus{}, err
		}
		a.mu.RLock()
		for dev := range s.admitted {
			if a.effectiveLocked(dev).deployment == deploymentID {
				s.exposed[dev] = true
			}
		}
		a.mu.RUnlock()
	}
	if !ok {
		if _, err := r.Deployment(deploymentID); err != nil {
			return fleet.RolloutStatus{}, err
		}
		return fleet.RolloutStatus{}, fmt.Errorf("deployment %q has no rollout: %w", deploymentID, fleet.ErrNotFound)
	}
	j := a.judge(s, a.reportSource(r), now)
	return j.status, nil
}

// PlannedWaves is, for a dry run, how many devices each wave of a policy
// would reach among the devices a deployment would move (would, sorted)
// and the canary's matches among them.
func PlannedWaves(deploymentID string, plan fleet.RolloutPlan, would []string, canary map[string]bool) []fleet.WaveStatus {
	out := make([]fleet.WaveStatus, 0, len(plan.Waves))
	total := 0
	for _, dev := range would {
		if !canary[dev] || plan.Waves[0].Canary == "" {
			total++
		}
	}
	prev := 0
	for w, spec := range plan.Waves {
		ws := fleet.WaveStatus{Number: w + 1, Target: spec.Label(), State: fleet.WavePending}
		if spec.Canary != "" {
			for _, dev := range would {
				if canary[dev] {
					ws.Size++
				}
			}
		} else {
			n := spec.Size(total, prev)
			ws.Size, prev = n-prev, n
		}
		ws.Pending = ws.Size
		out = append(out, ws)
	}
	return out
}

// exposedHash are the devices reached by a hash wave that the deployment
// applies to now.
func (s rolloutSnapshot) exposedHash() []string {
	var out []string
	for dev := range s.exposed {
		if w := s.admitted[dev].Wave; w < len(s.plan.Waves) && s.plan.Waves[w].Canary == "" {
			out = append(out, dev)
		}
	}
	return out
}

// canaryCandidates counts the devices the deployment would move that the
// canary condition matches.
func (s rolloutSnapshot) canaryCandidates() int {
	n := 0
	for _, dev := range s.candidates {
		if s.canary[dev] {
			n++
		}
	}
	return n
}
