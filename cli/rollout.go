package cli

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"appliance/fleet"
)

// rolloutFlags are the rollout policy's flags of deployment create and
// update.
type rolloutFlags struct {
	waves, canary, soak, success, timeout, maxFailures, onFailure string
}

// rolloutFlagFields maps each flag to the policy field it sets, so that a
// refusal names the flag the operator typed.
var rolloutFlagFields = []struct{ flag, field string }{
	{"waves", "rollout.waves"}, {"canary", "rollout.canary"}, {"wave-soak", "rollout.waveSoak"},
	{"wave-success", "rollout.waveSuccess"}, {"wave-timeout", "rollout.waveTimeout"},
	{"max-failures", "rollout.maxFailures"}, {"on-failure", "rollout.onFailure"},
}

func (r *rolloutFlags) add(f *pflag.FlagSet, create bool) {
	if create {
		f.StringVar(&r.waves, "waves", "", "roll out in waves: cumulative percentages or counts of the devices it would move, e.g. 1%,10%,50%,100% or 5,50,100% (a last 100% wave is added)")
		f.StringVar(&r.canary, "canary", "", "a first wave of the devices this condition matches, e.g. \"tags.ring='canary'\"")
	}
	f.StringVar(&r.soak, "wave-soak", "", "rollout: how long every module must run before a device counts as healthy (default 30s)")
	f.StringVar(&r.success, "wave-success", "", "rollout: share of a wave that must be healthy before the next starts (default 95%)")
	f.StringVar(&r.timeout, "wave-timeout", "", "rollout: a device of a started wave that has not reported after this counts as failed (default 5m)")
	f.StringVar(&r.maxFailures, "max-failures", "", "rollout: share of the devices reached that may fail before it stops (default 10%)")
	f.StringVar(&r.onFailure, "on-failure", "", "rollout: what stopping does: pause (default) or rollback (every device reached returns to what it ran)")
}

// policy is the policy the flags give, nil when no rollout flag was set.
// It is checked here first, so that a mistake names the flag.
func (r *rolloutFlags) policy(cmd *cobra.Command) (*fleet.RolloutPolicy, error) {
	set := false
	for _, f := range rolloutFlagFields {
		if cmd.Flags().Lookup(f.flag) != nil && cmd.Flags().Changed(f.flag) {
			set = true
		}
	}
	if !set {
		return nil, nil
	}
	p := &fleet.RolloutPolicy{Canary: r.canary, WaveSoak: r.soak, WaveSuccess: r.success, WaveTimeout: r.timeout,
		MaxFailures: r.maxFailures, OnFailure: r.onFailure}
	if r.waves != "" {
		p.Waves = strings.Split(r.waves, ",")
	}
	if _, err := p.Normalize(); err != nil {
		return nil, flagError(err)
	}
	return p, nil
}

// flagError names the flag of a rollout field in a refusal.
func flagError(err error) error {
	var ve *fleet.ValidationError
	if !errors.As(err, &ve) {
		return err
	}
	for _, f := range rolloutFlagFields {
		if ve.Field == f.field || strings.HasPrefix(ve.Field, f.field+"[") {
			return fmt.Errorf("flag --%s: %s", f.flag, ve.Msg)
		}
	}
	return err
}

// printWaves prints a dry run's (or a status's) waves.
func (a *app) printWaves(waves []fleet.WaveStatus, full bool) {
	header := []string{"WAVE", "TARGET", "DEVICES"}
	if full {
		header = []string{"WAVE", "TARGET", "STATE", "SIZE", "HEALTHY", "FAILED", "PENDING", "STARTED"}
	}
	rows := [][]string{header}
	for _, w := range waves {
		if !full {
			rows = append(rows, []string{strconv.Itoa(w.Number), w.Target, strconv.Itoa(w.Size)})
			continue
		}
		started := "-"
		if w.StartedTimeUTC != nil {
			started = w.StartedTimeUTC.Format(time.RFC3339)
		}
		rows = append(rows, []string{strconv.Itoa(w.Number), w.Target, w.State, strconv.Itoa(w.Size),
			strconv.Itoa(w.Healthy), strconv.Itoa(w.Failed), strconv.Itoa(w.Pending), started})
	}
	a.table(rows)
}

func (a *app) rolloutCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Follow and steer a deployment's rollout: status, pause, resume, promote, abort, rollback",
		Long: `A deployment created with --waves or --canary reaches its devices wave by wave:
each wave starts once the one before is healthy (--wave-success of its devices
running for --wave-soak), and the rollout stops when more than --max-failures of
the devices reached fail (unhealthy, document refused, or silent past
--wave-timeout): it halts, or with --on-failure rollback returns every device it
reached to what it ran before. These commands show where it stands and steer it.`,
	}
	cmd.AddCommand(a.rolloutStatus())
	for _, act := range []struct{ name, short string }{
		{fleet.RolloutPause, "Pause a running rollout: no device is reached until resume"},
		{fleet.RolloutResume, "Resume a paused or halted rollout"},
		{fleet.RolloutPromote, "Start the next wave now, without waiting for the current one's soak and threshold"},
		{fleet.RolloutAbort, "Stop a rollout for good: devices reached keep the deployment, the others never get it"},
		{fleet.RolloutRollback, "Return every device the rollout reached to what it ran before"},
	} {
		cmd.AddCommand(a.rolloutAction(act.name, act.short))
	}
	return cmd
}

func (a *app) rolloutStatus() *cobra.Command {
	var consistent bool
	cmd := &cobra.Command{
		Use:   "status ID",
		Short: "Where a rollout stands: its state, each wave's devices, what the next step waits for",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			st, err := c.RolloutStatus(cmd.Context(), args[0], consistent)
			if err != nil {
				return err
			}
			return a.printRollout(st)
		},
	}
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) rolloutAction(action, short string) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   action + " ID",
		Short: short,
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			st, err := c.RolloutAction(cmd.Context(), args[0], action, reason)
			if err != nil {
				return err
			}
			return a.printRollout(st)
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the deployment's history")
	return cmd
}

func (a *app) printRollout(st fleet.RolloutStatus) error {
	if a.output == "json" {
		return a.printJSON(st)
	}
	state := st.State
	if st.Aborted {
		state += " (aborted)"
	}
	wave := "-"
	if st.Wave > 0 {
		wave = fmt.Sprintf("%d of %d", st.Wave, len(st.Waves))
	}
	rows := [][]string{
		{"deployment", st.Deployment},
		{"state", state},
	}
	if st.Reason != "" {
		rows = append(rows, []string{"reason", st.Reason})
	}
	rows = append(rows,
		[]string{"wave", wave},
		[]string{"reached", reached(st)},
		[]string{"policy", fmt.Sprintf("soak %s, success %s, timeout %s, max failures %s, on failure %s",
			st.Policy.WaveSoak, st.Policy.WaveSuccess, st.Policy.WaveTimeout, st.Policy.MaxFailures, st.Policy.OnFailure)},
		[]string{"next", st.Next},
	)
	a.keyValues(rows)
	fmt.Fprintln(a.stdout)
	a.printWaves(st.Waves, true)
	return nil
}

// rolloutSummary is the policy of a deployment in one line.
func rolloutSummary(p *fleet.RolloutPolicy) string {
	if p == nil {
		return "-"
	}
	s := "waves " + strings.Join(p.Waves, ",")
	if p.Canary != "" {
		s = "canary " + p.Canary + ", " + s
	}
	return s + ", on failure " + p.OnFailure
}

// reached says how many devices the rollout reached and how they fare.
func reached(st fleet.RolloutStatus) string {
	switch st.State {
	case fleet.RolloutRolledBack:
		return fmt.Sprintf("%d devices, returned to what they ran before", st.Reached)
	case fleet.RolloutRunning:
		return fmt.Sprintf("%d devices, %d run it now, %d failed (it stops beyond %d)", st.Reached, st.Exposed, st.Failed, st.FailureLimit)
	}
	return fmt.Sprintf("%d devices, %d run it now, %d failed", st.Reached, st.Exposed, st.Failed)
}
