package node

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/fleet"
)

// TestDeploymentStatus has real MQTT devices report different outcomes and
// checks the categories and Azure's metrics the API derives from them.
func TestDeploymentStatus(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	if _, err := c.PutDeployment(ctx, "prod", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 1,
		Metrics: fleet.Metrics{Queries: map[string]string{
			"tempRunning": "properties.reported.modules.temp.runtimeStatus = 'running'",
			"applied":     "SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200",
		}}}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutDeployment(ctx, "canary", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.ring='canary'", Priority: 5}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	old := time.Now().UTC().Add(-time.Hour)
	fresh := time.Now().UTC()
	reports := map[string]string{
		// From an agent a release ahead: a newer minor schema and fields
		// this controller does not know, which it ignores.
		"healthy":   fmt.Sprintf(`{"schemaVersion":"1.9","deploymentId":"prod","lastDesiredStatus":{"code":200},"hub":{"routes":3},"modules":{"temp":{"runtimeStatus":"running","status":"running","lastStartTimeUtc":%q,"exitCode":0,"restartCount":0,"settings":{},"twin":{"version":4}}}}`, old.Format(time.RFC3339Nano)),
		"soaking":   fmt.Sprintf(`{"deploymentId":"prod","lastDesiredStatus":{"code":200},"modules":{"temp":{"runtimeStatus":"running","status":"running","lastStartTimeUtc":%q,"exitCode":0,"restartCount":0,"settings":{}}}}`, fresh.Format(time.RFC3339Nano)),
		"failing":   `{"deploymentId":"prod","lastDesiredStatus":{"code":200},"modules":{"temp":{"runtimeStatus":"failed","status":"running","exitCode":3,"restartCount":2,"settings":{}}}}`,
		"rejecting": `{"deploymentId":"prod","lastDesiredStatus":{"code":400,"description":"bad"},"modules":{}}`,
		"silent":    "",
	}
	for id, rep := range reports {
		key := createDevice(t, c, id, map[string]any{"environment": "prod"})
		if rep == "" {
			continue
		}
		d, err := connectDevice(t, n.MQTTAddr(), id, key)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic(id), QoS: 1, Payload: []byte(rep)}); err != nil {
			t.Fatal(err)
		}
	}
	// A prod device in the canary ring: targeted by prod, applied elsewhere.
	createDevice(t, c, "canary-1", map[string]any{"environment": "prod", "ring": "canary"})

	// The silent device never connected: offline beside its health.
	want := api.StatusCounts{Targeted: 6, Applied: 5, Healthy: 1, Soaking: 1, Unhealthy: 2, Unknown: 1, Offline: 1}
	var st api.DeploymentStatus
	waitFor(t, fmt.Sprintf("counts %+v", want), func() bool {
		var err error
		st, err = c.DeploymentStatus(ctx, "prod", api.StatusQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return st.Counts == want
	})
	if fmt.Sprint(st.Devices[api.CategoryUnhealthy]) != "[failing rejecting]" || fmt.Sprint(st.Devices[api.CategoryUnknown]) != "[silent]" {
		t.Fatalf("devices by category %v", st.Devices)
	}
	// Azure's success count is the plain code 200: it includes the device
	// whose module failed, which is why we report health separately.
	if st.Metrics["tempRunning"] != 2 || st.Metrics["applied"] != 3 {
		t.Fatalf("custom metrics %v", st.Metrics)
	}
	if st.SystemMetrics["reportedSuccessfulCount"] != 3 || st.SystemMetrics["reportedFailedCount"] != 1 || st.SystemMetrics["appliedCount"] != 5 {
		t.Fatalf("system metrics %v", st.SystemMetrics)
	}
	// A soak of one second makes the soaking device healthy... after a second.
	time.Sleep(1100 * time.Millisecond)
	st, err := c.DeploymentStatus(ctx, "prod", api.StatusQuery{Soak: time.Second, Category: api.CategoryHealthy, Limit: 1})
	if err != nil || st.Counts.Healthy != 2 || len(st.Devices[api.CategoryHealthy]) != 1 || st.Next[api.CategoryHealthy] == "" {
		t.Fatalf("paged healthy %+v %v", st, err)
	}
	if _, err := c.DeploymentStatus(ctx, "prod", api.StatusQuery{Category: "sleepy"}); err == nil {
		t.Fatal("an unknown category was accepted")
	}
	if _, err := c.DeploymentStatus(ctx, "nope", api.StatusQuery{}); err == nil {
		t.Fatal("status of a missing deployment")
	}
}

func TestMetricQueries(t *testing.T) {
	for _, tc := range []struct {
		query   string
		wantErr string
	}{
		{"properties.reported.modules.tempSensor.runtimeStatus = 'running'", ""},
		{"SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200", ""},
		{"select deviceId from devices where tags.environment = 'prod'", ""},
		{"properties.reported.x = ", "column"},
		{"SELECT deviceId FROM devices WHERE properties.reported.x = \"a\"", "single quote"},
	} {
		err := validateMetrics(map[string]string{"m": tc.query})
		if tc.wantErr == "" && err != nil {
			t.Errorf("%q: %v", tc.query, err)
		}
		if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "metrics.queries.m")) {
			t.Errorf("%q: err %v, want one naming metrics.queries.m and %q", tc.query, err, tc.wantErr)
		}
	}
}

// TestHistory follows a deployment's changes and a device's assignment
// changes, and the retention that bounds them.
func TestHistory(t *testing.T) {
	dir := t.TempDir()
	n := startNode(t, dir)
	c := clientFor(n)
	ctx := context.Background()
	createDevice(t, c, "d1", map[string]any{"environment": "test"})
	put := func(id, cond string, prio int64) {
		t.Helper()
		if _, err := c.PutDeployment(ctx, id, api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: cond, Priority: prio}, api.WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	put("base", "*", 1)
	put("prod", "tags.environment='prod'", 5)
	if _, err := c.PatchDevice(ctx, "d1", api.DevicePatch{Tags: map[string]any{"environment": "prod"}}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	cond := "tags.environment='none'"
	if _, err := c.PatchDeployment(ctx, "prod", api.DeploymentPatch{TargetCondition: &cond}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	var dev, dep api.HistoryPage
	waitFor(t, "the history written", func() bool {
		dev, _ = c.DeviceHistory(ctx, "d1", 0)
		dep, _ = c.DeploymentHistory(ctx, "prod", 0)
		return len(dev.Items) >= 3 && len(dep.Items) >= 2
	})
	// Newest first: prod → base (condition changed), base → prod (tags
	// changed), none → base (base created).
	var moves []string
	for _, e := range dev.Items {
		moves = append(moves, e.From+">"+e.Deployment)
	}
	if fmt.Sprint(moves) != "[prod>base base>prod >base]" {
		t.Fatalf("device history %v\n%+v", moves, dev.Items)
	}
	if len(dep.Items) != 2 || dep.Items[0].Kind != "updated" || dep.Items[1].Kind != "created" || dep.Items[0].Actor != "admin" ||
		!strings.Contains(dep.Items[0].What, "tags.environment='none'") {
		t.Fatalf("deployment history %+v", dep.Items)
	}
	if _, err := c.DeviceHistory(ctx, "nobody", 0); err == nil {
		t.Fatal("history of an unknown device")
	}
}
