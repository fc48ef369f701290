package sim_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"appliance/cli"
	"appliance/sim"
)

// The command's wiring (package cli owns no test of it): flags, the
// APPLIANCE_SIM_* fallbacks, the refusal of --tag, the JSON summary.

func TestCommand_UsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"sim", "--server", "mqtt://127.0.0.1:1", "--devices", "2", "--enroll-token", "a.b", "--tag", "environment=prod"}, "appliance enrollment create NAME --tag environment=prod"},
		{[]string{"sim", "--devices", "2", "--enroll-token", "a.b"}, "--server is required"},
		{[]string{"sim", "--server", "mqtt://127.0.0.1:1", "--enroll-token", "a.b"}, "--devices is required"},
		{[]string{"sim", "--server", "mqtt://127.0.0.1:1", "--devices", "2"}, "--enroll-token-file is required"},
		{[]string{"sim", "--server", "mqtt://127.0.0.1:1", "--devices", "2", "--enroll-token", "a.b", "--fail-share", "2"}, "fail share"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		code := cli.Execute(context.Background(), tt.args, &out, &errb, func(string) string { return "" }, "test")
		if code == 0 || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want %q", tt.args, code, errb.String(), tt.want)
		}
	}
	var out, errb bytes.Buffer
	env := map[string]string{"APPLIANCE_SIM_DEVICES": "many"}
	if code := cli.Execute(context.Background(), []string{"sim"}, &out, &errb, func(k string) string { return env[k] }, "test"); code == 0 || !strings.Contains(errb.String(), "APPLIANCE_SIM_DEVICES") {
		t.Errorf("a bad environment value: exit %d, stderr %q", code, errb.String())
	}
}

func TestCommand_EnvAndJSONSummary(t *testing.T) {
	n, c := startNode(t)
	token := createEnrollment(t, c, "line-9")
	env := map[string]string{
		"APPLIANCE_SIM_SERVER":       "mqtt://" + n.MQTTAddr(),
		"APPLIANCE_SIM_DEVICES":      "3",
		"APPLIANCE_SIM_ENROLL_TOKEN": token,
		"APPLIANCE_SIM_PREFIX":       "envpress",
		"APPLIANCE_SIM_DURATION":     "1s",
		"APPLIANCE_SIM_FAIL_SHARE":   "0.5",
	}
	var out, errb bytes.Buffer
	if code := cli.Execute(context.Background(), []string{"sim", "-o", "json"}, &out, &errb, func(k string) string { return env[k] }, "test"); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var st sim.Stats
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("summary %q: %v", out.String(), err)
	}
	if st.Devices != 3 || st.Prefix != "envpress" || st.Enrolled != 3 || st.PeakConnected != 3 || st.ReportsAcked != 3 || st.Deployments[""].OK != 3 {
		t.Fatalf("summary %+v", st)
	}
	if !strings.Contains(errb.String(), "envpress-0001..envpress-0003") {
		t.Fatalf("stderr %q", errb.String())
	}
	// The flag wins over the environment.
	out.Reset()
	if code := cli.Execute(context.Background(), []string{"sim", "--prefix", "flagpress", "--duration", "300ms"}, &out, &errb, func(k string) string { return env[k] }, "test"); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if !strings.Contains(out.String(), "flagpress-") || !strings.Contains(out.String(), "enrolled:") {
		t.Fatalf("table summary %q", out.String())
	}
}
