package fleet

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// A deployment with a rollout policy reaches its devices in waves: each
// wave is a larger share of the devices the deployment would move, and the
// next wave starts only when the devices of the current one are healthy.
// A failure threshold over every device exposed so far stops it (pause) or
// returns each of them to what it ran before (rollback). The decisions are
// replicated (package raftstore's rollout commands); the leader takes them
// from the health it sees (package assign).

// Rollout states.
const (
	RolloutRunning    = "running"     // waves start as the ones before pass
	RolloutPaused     = "paused"      // an operator paused it: nothing moves until resume
	RolloutHalted     = "halted"      // the failure threshold was crossed (or it was aborted): nothing moves
	RolloutCompleted  = "completed"   // every wave passed: the deployment applies as any other
	RolloutRolledBack = "rolled-back" // every device it moved runs what it ran before
)

// RolloutStates lists them in display order.
var RolloutStates = []string{RolloutRunning, RolloutPaused, RolloutHalted, RolloutCompleted, RolloutRolledBack}

// Rollout actions: what a RolloutAction command does. The leader proposes
// StartWave, Complete, Halt and (on a breach with OnFailureRollback)
// Rollback; an operator Pause, Resume, Promote, Abort and Rollback.
const (
	RolloutStartWave = "start-wave"
	RolloutComplete  = "complete"
	RolloutHalt      = "halt"
	RolloutPause     = "pause"
	RolloutResume    = "resume"
	RolloutPromote   = "promote"
	RolloutAbort     = "abort"
	RolloutRollback  = "rollback"
)

// What a rollout does when its failure threshold is crossed.
const (
	OnFailurePause    = "pause"
	OnFailureRollback = "rollback"
)

// Defaults of a rollout policy.
const (
	DefaultWaveSuccess = 95.0 // percent of a wave healthy before the next starts
	DefaultWaveTimeout = 5 * time.Minute
	DefaultMaxFailures = 10.0 // percent of the devices exposed so far
	// MaxWaves bounds a plan (a canary wave included).
	MaxWaves = 20
)

// RolloutPolicy is how a deployment reaches its devices. Its JSON is what
// the API takes and stores; Normalize checks it and fills in the defaults.
type RolloutPolicy struct {
	// Waves are cumulative shares of the devices the deployment would
	// move: percentages ("5%") or counts ("10"), counts first, each larger
	// than the one before. A last wave of 100% is added when missing.
	Waves []string `json:"waves,omitempty"`
	// Canary, when set, is a target condition: the devices it matches
	// (among those the deployment would move) are the first wave.
	Canary string `json:"canary,omitempty"`
	// WaveSoak is how long every module must have run on a device before
	// it counts as healthy (a Go duration; default 30s).
	WaveSoak string `json:"waveSoak,omitempty"`
	// WaveSuccess is the share of a wave that must be healthy before the
	// next wave starts (default 95%).
	WaveSuccess string `json:"waveSuccess,omitempty"`
	// WaveTimeout: a device of a started wave that has not reported the
	// deployment this long after it was sent counts as failed (default 5m).
	WaveTimeout string `json:"waveTimeout,omitempty"`
	// MaxFailures is the share of the devices exposed so far (failed:
	// unhealthy, document refused or timed out) beyond which the rollout
	// stops (default 10%).
	MaxFailures string `json:"maxFailures,omitempty"`
	// OnFailure is what stopping means: pause (default: halt, devices stay
	// as they are) or rollback (every device the rollout moved returns to
	// what it ran before).
	OnFailure string `json:"onFailure,omitempty"`
}

// WaveSpec is one wave of a plan.
type WaveSpec struct {
	// Canary is the condition of a canary wave; empty for the others.
	Canary string
	// Percent (0-100] or Count (≥ 1) is the cumulative share of the
	// deployment's devices the waves so far reach; one of them is set
	// unless Canary is.
	Percent float64
	Count   int
}

// Label is the wave as an operator wrote it: "5%", "10", "canary".
func (w WaveSpec) Label() string {
	switch {
	case w.Canary != "":
		return "canary"
	case w.Count > 0:
		return strconv.Itoa(w.Count)
	}
	return formatPercent(w.Percent)
}

// Size is how many of total devices the waves up to and including this
// one reach, given the previous wave's size: at least one device for a
// positive share of a non-empty set, never fewer than before, never more
// than total. A canary wave has no size of its own (its condition decides).
func (w WaveSpec) Size(total, prev int) int {
	n := prev
	switch {
	case w.Count > 0:
		n = w.Count
	case w.Percent > 0:
		n = int(math.Ceil(w.Percent * float64(total) / 100))
	}
	return min(max(n, prev), total)
}

// RolloutPlan is a policy parsed.
type RolloutPlan struct {
	Waves       []WaveSpec
	Soak        time.Duration
	Timeout     time.Duration
	Success     float64 // percent
	MaxFailures float64 // percent
	OnFailure   string
}

// Normalize checks a policy and returns it with its defaults filled in and
// its values in one spelling, as it is stored. A mistake is a
// ValidationError naming the field ("rollout.waves[2]"). The canary
// condition is checked for syntax by the caller (it needs the evaluator).
func (p RolloutPolicy) Normalize() (RolloutPolicy, error) {
	plan, err := p.Plan()
	if err != nil {
		return RolloutPolicy{}, err
	}
	out := RolloutPolicy{
		Canary:      strings.TrimSpace(p.Canary),
		WaveSoak:    plan.Soak.String(),
		WaveSuccess: formatPercent(plan.Success),
		WaveTimeout: plan.Timeout.String(),
		MaxFailures: formatPercent(plan.MaxFailures),
		OnFailure:   plan.OnFailure,
	}
	for _, w := range plan.Waves {
		if w.Canary == "" {
			out.Waves = append(out.Waves, w.Label())
		}
	}
	return out, nil
}

// Plan parses a policy; defaults apply to empty fields.
func (p RolloutPolicy) Plan() (RolloutPlan, error) {
	plan := RolloutPlan{Soak: DefaultSoak, Timeout: DefaultWaveTimeout, Success: DefaultWaveSuccess,
		MaxFailures: DefaultMaxFailures, OnFailure: OnFailurePause}
	if c := strings.TrimSpace(p.Canary); c != "" {
		plan.Waves = append(plan.Waves, WaveSpec{Canary: c})
	}
	waves, err := parseWaves(p.Waves)
	if err != nil {
		return RolloutPlan{}, err
	}
	plan.Waves = append(plan.Waves, waves...)
	if len(plan.Waves) > MaxWaves {
		return RolloutPlan{}, Invalid("rollout.waves", "at most %d waves (the canary included); got %d", MaxWaves, len(plan.Waves))
	}
	if p.WaveSoak != "" {
		if plan.Soak, err = parseDuration("rollout.waveSoak", p.WaveSoak, true); err != nil {
			return RolloutPlan{}, err
		}
	}
	if p.WaveTimeout != "" {
		if plan.Timeout, err = parseDuration("rollout.waveTimeout", p.WaveTimeout, false); err != nil {
			return RolloutPlan{}, err
		}
	}
	if p.WaveSuccess != "" {
		if plan.Success, err = ParsePercent("rollout.waveSuccess", p.WaveSuccess); err != nil {
			return RolloutPlan{}, err
		}
	}
	if p.MaxFailures != "" {
		if plan.MaxFailures, err = ParsePercent("rollout.maxFailures", p.MaxFailures); err != nil {
			return RolloutPlan{}, err
		}
	}
	switch p.OnFailure {
	case "":
	case OnFailurePause, OnFailureRollback:
		plan.OnFailure = p.OnFailure
	default:
		return RolloutPlan{}, Invalid("rollout.onFailure", "must be %s or %s; got %q", OnFailurePause, OnFailureRollback, p.OnFailure)
	}
	return plan, nil
}

// parseWaves checks the waves and adds a last one of 100% when missing.
func parseWaves(in []string) ([]WaveSpec, error) {
	var out []WaveSpec
	lastCount, lastPercent := 0, 0.0
	for i, s := range in {
		field := fmt.Sprintf("rollout.waves[%d]", i)
		s = strings.TrimSpace(s)
		if strings.HasSuffix(s, "%") {
			v, err := ParsePercent(field, s)
			if err != nil {
				return nil, err
			}
			switch {
			case v <= 0:
				return nil, Invalid(field, "a wave must reach some devices; got %s", s)
			case v <= lastPercent:
				return nil, Invalid(field, "waves must increase: %s does not exceed the wave before (%s)", s, formatPercent(lastPercent))
			}
			lastPercent = v
			out = append(out, WaveSpec{Percent: v})
			continue
		}
		n, err := strconv.Atoi(s)
		switch {
		case err != nil:
			return nil, Invalid(field, "must be a percentage (\"10%%\") or a number of devices (\"50\"); got %q", s)
		case n <= 0:
			return nil, Invalid(field, "a wave must reach some devices; got %d", n)
		case lastPercent > 0:
			return nil, Invalid(field, "counts come before percentages (%d after %s)", n, formatPercent(lastPercent))
		case n <= lastCount:
			return nil, Invalid(field, "waves must increase: %d does not exceed the wave before (%d)", n, lastCount)
		}
		lastCount = n
		out = append(out, WaveSpec{Count: n})
	}
	if lastPercent < 100 {
		out = append(out, WaveSpec{Percent: 100})
	}
	return out, nil
}

// ParsePercent reads "95%" or "95" as a percentage between 0 and 100; the
// error names field.
func ParsePercent(field, s string) (float64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "%")
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, Invalid(field, "must be a percentage such as \"10%%\"; got %q", s)
	}
	if v < 0 || v > 100 {
		return 0, Invalid(field, "must be between 0%% and 100%%; got %s", s)
	}
	return v, nil
}

func formatPercent(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) + "%" }

func parseDuration(field, s string, zeroOK bool) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	switch {
	case err != nil:
		return 0, Invalid(field, "must be a duration such as \"30s\" or \"5m\"; got %q", s)
	case d < 0 || d == 0 && !zeroOK:
		return 0, Invalid(field, "must be positive; got %s", s)
	case d > 7*24*time.Hour:
		return 0, Invalid(field, "must be at most a week; got %s", s)
	}
	return d, nil
}

// WavePosition places a device in a deployment's rollout: a number fixed by
// the two ids alone (the first 8 bytes of SHA-256(deployment, 0, device)),
// so that every node, and every rerun, orders the devices alike. A hash
// wave reaches the devices whose position is at most its threshold.
func WavePosition(deploymentID, deviceID string) uint64 {
	h := sha256.New()
	h.Write([]byte(deploymentID))
	h.Write([]byte{0})
	h.Write([]byte(deviceID))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// Rollout is the replicated progress of a deployment's rollout.
type Rollout struct {
	Deployment string `json:"deployment"`
	State      string `json:"state"`
	// Reason says why it is paused, halted, completed or rolled back.
	Reason string `json:"reason,omitempty"`
	// Aborted: an operator stopped it for good (state halted); it can
	// still be rolled back, not resumed.
	Aborted bool `json:"aborted,omitempty"`
	// Waves holds one entry per wave started, in order.
	Waves []WaveProgress `json:"waves"`
	// Promote: an operator promoted the current wave; the leader starts
	// the next one without waiting for its soak and threshold.
	Promote bool `json:"promote,omitempty"`
	// Exposed counts the devices admitted to the deployment so far.
	Exposed        int       `json:"exposed"`
	CreatedTimeUTC time.Time `json:"createdTimeUtc"`
	UpdatedTimeUTC time.Time `json:"updatedTimeUtc"`
	// Index is the raft index of its last change of state; AdmittedIndex
	// that of the last admission of devices.
	Index         uint64 `json:"index"`
	AdmittedIndex uint64 `json:"admittedIndex,omitempty"`
}

// Active reports whether the rollout still gates its deployment: devices
// reach it only when admitted (every state but completed).
func (r *Rollout) Active() bool { return r != nil && r.State != RolloutCompleted }

// WaveProgress is a started wave.
type WaveProgress struct {
	StartedTimeUTC time.Time `json:"startedTimeUtc"`
	// Threshold is, for a hash wave, the highest WavePosition it reaches
	// (fixed when it starts, so that a device joining later lands in a
	// wave by the same rule); 0 for a canary wave.
	Threshold uint64 `json:"threshold,string"`
	// Planned is how many devices the waves up to this one were to reach
	// when it started.
	Planned       int        `json:"planned"`
	PassedTimeUTC *time.Time `json:"passedTimeUtc,omitempty"`
}

// RolloutDevice is a device a rollout admitted: the wave that reached it
// and what it ran before, kept so that a rollback can return it there.
type RolloutDevice struct {
	Wave int `json:"wave"`
	// Previous is the deployment applied to the device when it was
	// admitted ("" for none); the content it had then is kept with the
	// rollout (a deployment's content never changes, but the deployment
	// may be deleted).
	Previous string    `json:"previous,omitempty"`
	Time     time.Time `json:"time"`
}

// RolloutStatus is where a rollout stands, as the node that answers sees
// it: its replicated progress and the health of the devices it reached.
type RolloutStatus struct {
	Deployment string        `json:"deployment"`
	State      string        `json:"state"`
	Reason     string        `json:"reason,omitempty"`
	Aborted    bool          `json:"aborted,omitempty"`
	Policy     RolloutPolicy `json:"policy"`
	// Wave is the current wave, from 1; 0 before the first started.
	Wave  int          `json:"wave"`
	Waves []WaveStatus `json:"waves"`
	// Reached are the devices it admitted (sent the deployment) so far;
	// Exposed those of them that run the deployment now; Failed those of
	// them that failed (unhealthy, document refused, or timed out), and
	// FailureLimit how many may fail before it stops.
	Reached      int `json:"reached"`
	Exposed      int `json:"exposed"`
	Failed       int `json:"failed"`
	FailureLimit int `json:"failureLimit"`
	// Next says what the next step waits for.
	Next           string    `json:"next"`
	UpdatedTimeUTC time.Time `json:"updatedTimeUtc"`
}

// WaveStatus is one wave of a RolloutStatus.
type WaveStatus struct {
	Number int    `json:"number"`
	Target string `json:"target"` // "5%", "10", "canary"
	// State: pending (not started), running, passed, rolled-back (its
	// devices returned to what they ran before).
	State string `json:"state"`
	// Size is how many devices the wave holds: those admitted, or for a
	// wave not started the devices it would reach now.
	Size    int `json:"size"`
	Healthy int `json:"healthy"`
	Failed  int `json:"failed"`
	Pending int `json:"pending"`
	// Admitted counts the wave's devices sent the deployment so far.
	Admitted       int        `json:"admitted"`
	StartedTimeUTC *time.Time `json:"startedTimeUtc,omitempty"`
	PassedTimeUTC  *time.Time `json:"passedTimeUtc,omitempty"`
}

// Wave states in a WaveStatus.
const (
	WavePending = "pending"
	WaveRunning = "running"
	WavePassed  = "passed"
	// WaveRolledBack: a started wave of a rolled-back rollout.
	WaveRolledBack = "rolled-back"
)
