//go:build e2e

package e2e

import (
	"testing"
	"time"

	"appliance/fleet"
)

// TestExamples: examples/process-deployment.json runs as it is on the
// README tour's agent (process runtime, enrolled with environment=prod and
// location=westus, nothing installed beyond /bin/sh); the Docker example
// is a valid deployment (running it needs its images, which this machine
// has no registry for).
func TestExamples(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	token := enrollmentToken(t, dir, "line-1", "environment=prod", "location=westus")
	startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-03", "--enroll-token", token, "--data-dir", t.TempDir())
	cli(t, dir, "deployment", "create", "presses-v1", "--content", "../examples/process-deployment.json",
		"--target-condition", "tags.environment='prod' AND tags.location='westus'", "--priority", "10").mustSucceed(t)
	var rep fleet.ReportedDocument
	eventually(t, "press-03 runs press-telemetry", 60*time.Second, func() bool {
		rep, _ = reported(t, dir, "press-03")
		m, ok := rep.Modules["press-telemetry"]
		return rep.DeploymentID == "presses-v1" && rep.LastDesiredStatus.Code == fleet.StatusCodeOK && ok && m.RuntimeStatus == fleet.RuntimeRunning
	})
	// Still running a moment later: the module stays in the foreground.
	time.Sleep(2 * time.Second)
	rep, _ = reported(t, dir, "press-03")
	if m := rep.Modules["press-telemetry"]; m.RuntimeStatus != fleet.RuntimeRunning || m.RestartCount != 0 {
		t.Fatalf("press-telemetry after 2 s: %+v", m)
	}
	cli(t, dir, "deployment", "create", "sensors", "--content", "../examples/docker-deployment.json",
		"--target-condition", "tags.environment='prod'", "--priority", "5", "--dry-run").mustSucceed(t)
}
