package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"appliance/api"
	"appliance/fleet"
)

// TestAPI_RolloutBadInput: every mistake in a rollout policy is a 400
// naming the field, and stores nothing.
func TestAPI_RolloutBadInput(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		policy fleet.RolloutPolicy
		field  string
	}{
		{"waves that do not increase", fleet.RolloutPolicy{Waves: []string{"10%", "10%"}}, "rollout.waves[1]"},
		{"a wave beyond 100%", fleet.RolloutPolicy{Waves: []string{"150%"}}, "rollout.waves[0]"},
		{"a success share beyond 100%", fleet.RolloutPolicy{WaveSuccess: "101%"}, "rollout.waveSuccess"},
		{"a failure threshold below 0%", fleet.RolloutPolicy{MaxFailures: "-1%"}, "rollout.maxFailures"},
		{"a canary that does not compile", fleet.RolloutPolicy{Canary: "tags.ring = "}, "rollout.canary"},
		{"an unknown action", fleet.RolloutPolicy{OnFailure: "shrug"}, "rollout.onFailure"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*", Rollout: &tc.policy}
			for _, dry := range []bool{false, true} {
				var err error
				if dry {
					_, err = c.DryRunDeployment(ctx, "bad", req, api.DryRunQuery{})
				} else {
					_, err = c.PutDeployment(ctx, "bad", req, api.WriteOptions{})
				}
				var ae *api.Error
				if !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest || ae.Field != tc.field {
					t.Fatalf("dry run %v: err %v, want a 400 naming %s", dry, err, tc.field)
				}
			}
			if _, err := c.Deployment(ctx, "bad", false); !errors.Is(err, fleet.ErrNotFound) {
				t.Fatalf("a refused deployment was stored: %v", err)
			}
		})
	}
}

// TestAPI_RolloutPolicy: a dry run shows each wave's size; the policy is
// stored normalized; a PATCH can change its thresholds but not its waves,
// nor add a rollout to a deployment created without one; an action that
// does not apply to the rollout's state is a 409; a deployment without a
// rollout has no rollout status.
func TestAPI_RolloutPolicy(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	for i := range 20 {
		tags := map[string]any{"environment": "prod"}
		if i < 3 {
			tags["ring"] = "canary"
		}
		createDevice(t, c, fmt.Sprintf("d%02d", i), tags)
	}
	putDeployment(t, c, "plain", "*", 0)
	req := api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 1,
		Rollout: &fleet.RolloutPolicy{Canary: "tags.ring='canary'", Waves: []string{"10%", "50%"}}}
	dry, err := c.DryRunDeployment(ctx, "waves", req, api.DryRunQuery{})
	if err != nil {
		t.Fatal(err)
	}
	// 3 canaries, then 10% and 50% of the other 17 (ceil: 2 and 9), then the rest.
	var sizes []string
	for _, w := range dry.Waves {
		sizes = append(sizes, fmt.Sprintf("%s=%d", w.Target, w.Size))
	}
	if got := strings.Join(sizes, " "); got != "canary=3 10%=2 50%=7 100%=8" {
		t.Fatalf("dry-run waves: %s", got)
	}
	if dry.WouldApplyCount != 20 {
		t.Fatalf("would apply to %d", dry.WouldApplyCount)
	}
	d, err := c.PutDeployment(ctx, "waves", req, api.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p := d.Rollout; p == nil || strings.Join(p.Waves, ",") != "10%,50%,100%" || p.WaveSoak != "30s" || p.OnFailure != fleet.OnFailurePause {
		t.Fatalf("stored policy %+v", d.Rollout)
	}
	// The thresholds can change, the waves cannot.
	d, err = c.PatchDeployment(ctx, "waves", api.DeploymentPatch{Rollout: &fleet.RolloutPolicy{MaxFailures: "40%", OnFailure: fleet.OnFailureRollback}}, api.WriteOptions{})
	if err != nil || d.Rollout.MaxFailures != "40%" || d.Rollout.OnFailure != fleet.OnFailureRollback || d.Rollout.Canary != "tags.ring='canary'" {
		t.Fatalf("patch thresholds: %+v, %v", d.Rollout, err)
	}
	for _, p := range []struct {
		id    string
		patch fleet.RolloutPolicy
		field string
	}{
		{"waves", fleet.RolloutPolicy{Waves: []string{"20%"}}, "rollout.waves"},
		{"plain", fleet.RolloutPolicy{MaxFailures: "5%"}, "rollout"},
	} {
		var ae *api.Error
		if _, err := c.PatchDeployment(ctx, p.id, api.DeploymentPatch{Rollout: &p.patch}, api.WriteOptions{}); !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest || ae.Field != p.field {
			t.Fatalf("patch %s with %+v: %v, want a 400 naming %s", p.id, p.patch, err, p.field)
		}
	}
	// The leader starts the canary wave at once.
	waitFor(t, "the canary wave started", func() bool {
		st, err := c.RolloutStatus(ctx, "waves", false)
		return err == nil && st.Wave == 1 && st.Waves[0].Admitted == 3
	})
	if _, err := c.RolloutAction(ctx, "waves", fleet.RolloutResume, ""); !errors.Is(err, fleet.ErrConflict) {
		t.Fatalf("resume a running rollout: %v, want a 409", err)
	}
	st, err := c.RolloutAction(ctx, "waves", fleet.RolloutPause, "looking at the canaries")
	if err != nil || st.State != fleet.RolloutPaused || st.Reason != "looking at the canaries" || !strings.HasPrefix(st.Next, "resume") {
		t.Fatalf("pause: %+v, %v", st, err)
	}
	var ae *api.Error
	if _, err := c.RolloutAction(ctx, "waves", "dance", ""); !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest || ae.Field != "action" {
		t.Fatalf("an unknown action: %v", err)
	}
	if _, err := c.RolloutStatus(ctx, "plain", false); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("rollout status of a deployment without one: %v", err)
	}
	// The leader may start the canary wave before or after the patch of
	// the thresholds above lands: only the pause is known to come last.
	waitFor(t, "the rollout's transitions in its history", func() bool {
		hist, _ := c.DeploymentHistory(ctx, "waves", 0)
		if len(hist.Items) < 4 || hist.Items[0].Kind != "rollout" || hist.Items[0].Actor != "admin" ||
			!strings.Contains(hist.Items[0].What, "rollout paused by admin: looking at the canaries") {
			return false
		}
		return slices.ContainsFunc(hist.Items[1:], func(e api.HistoryEvent) bool {
			return e.Kind == "rollout" && strings.Contains(e.What, "wave 1 of 4 (canary) started, 3 devices planned")
		})
	})
}
