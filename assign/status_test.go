package assign

import (
	"testing"
	"time"

	"appliance/fleet"
)

func TestClassify(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) *time.Time { t := now.Add(-d); return &t }
	running := func(since time.Duration) fleet.ModuleStatus {
		return fleet.ModuleStatus{RuntimeStatus: fleet.RuntimeRunning, Status: "running", LastStartTimeUTC: ago(since)}
	}
	doc := func(dep string, code int, mods map[string]fleet.ModuleStatus) *fleet.ReportedDocument {
		return &fleet.ReportedDocument{DeploymentID: dep, LastDesiredStatus: fleet.DesiredStatus{Code: code}, Modules: mods}
	}
	for _, tc := range []struct {
		name string
		rep  *fleet.ReportedDocument
		want string
	}{
		{"no report", nil, fleet.CategoryUnknown},
		{"report about the previous deployment", doc("old", 200, nil), fleet.CategoryUnknown},
		{"agent could not apply", doc("d", 400, nil), fleet.CategoryUnhealthy},
		{"no modules, applied", doc("d", 200, nil), fleet.CategoryHealthy},
		{"running past the soak", doc("d", 200, map[string]fleet.ModuleStatus{"a": running(time.Minute), "b": running(31 * time.Second)}), fleet.CategoryHealthy},
		{"one still soaking", doc("d", 200, map[string]fleet.ModuleStatus{"a": running(time.Minute), "b": running(5 * time.Second)}), fleet.CategorySoaking},
		{"a failed module beats soaking", doc("d", 200, map[string]fleet.ModuleStatus{"a": running(5 * time.Second), "b": {RuntimeStatus: fleet.RuntimeFailed, ExitCode: 3}}), fleet.CategoryUnhealthy},
		{"backoff is unhealthy", doc("d", 200, map[string]fleet.ModuleStatus{"a": {RuntimeStatus: fleet.RuntimeBackoff}}), fleet.CategoryUnhealthy},
		{"a module meant to be stopped does not count", doc("d", 200, map[string]fleet.ModuleStatus{"a": running(time.Hour), "b": {RuntimeStatus: fleet.RuntimeStopped, Status: "stopped"}}), fleet.CategoryHealthy},
		{"status unknown yet", doc("d", 200, map[string]fleet.ModuleStatus{"a": {RuntimeStatus: fleet.RuntimeUnknown}}), fleet.CategorySoaking},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := classifyAs(summarize(tc.rep, nil), "d", now, 30*time.Second); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}
