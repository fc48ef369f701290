//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testenv"
)

// mosquittoTools finds the Debian mosquitto-clients programs; CI installs
// them, so there their absence is a failure rather than a skip.
func mosquittoTools(t *testing.T) (sub, pub string) {
	t.Helper()
	sub = testenv.LookPath(t, "mosquitto_sub", "apt-get install mosquitto-clients")
	pub = testenv.LookPath(t, "mosquitto_pub", "apt-get install mosquitto-clients")
	return sub, pub
}

// mosq runs a mosquitto client for at most d and returns what it printed
// and its exit code.
func mosq(t *testing.T, d time.Duration, prog string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, prog, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	return out.String(), code
}

// TestMosquittoClients_AgainstTheNode checks the device protocol's access
// rules with real third-party MQTT clients against `appliance serve`.
func TestMosquittoClients_AgainstTheNode(t *testing.T) {
	sub, pub := mosquittoTools(t)
	dir := t.TempDir()
	srv := startServer(t, dir)
	host, port, _ := net.SplitHostPort(strings.TrimPrefix(srv.mqttURL(), "mqtts://"))
	// MQTT over TLS, the broker verified with the cluster CA (its default).
	base := []string{"-h", host, "-p", port, "--cafile", srv.caFile(), "-V", "mqttv311", "-q", "1"}

	keys := map[string]string{}
	for _, id := range []string{"press-01", "press-02"} {
		r := cli(t, dir, "device", "create", id, "--tag", "environment=prod", "-o", "json").mustSucceed(t)
		var d fleet.Device
		json.Unmarshal([]byte(r.stdout), &d)
		keys[id] = d.Authentication.SymmetricKey.PrimaryKey
	}
	manifest := writeManifest(t)
	cli(t, dir, "deployment", "create", "prod", "--content", manifest, "--target-condition", "tags.environment='prod'").mustSucceed(t)
	as := func(id string) []string {
		return append(append([]string{}, base...), "-i", id, "-u", id, "-P", keys[id])
	}

	// A device with its key receives its desired state.
	out, code := mosq(t, 10*time.Second, sub, append(as("press-01"), "-t", fleet.DesiredTopic("press-01"), "-C", "1")...)
	var doc fleet.DesiredDocument
	if code != 0 || json.Unmarshal([]byte(strings.TrimSpace(out)), &doc) != nil || doc.DeploymentID != "prod" {
		t.Fatalf("press-01 desired: exit %d, %q", code, out)
	}

	// A wrong key is refused.
	wrong := append(append([]string{}, base...), "-i", "press-01", "-u", "press-01", "-P", "not-the-key", "-t", fleet.DesiredTopic("press-01"), "-C", "1")
	if out, code := mosq(t, 10*time.Second, sub, wrong...); code == 0 || strings.Contains(out, "prod") {
		t.Fatalf("wrong key: exit %d, %q", code, out)
	}

	// Another device's desired topic, or appliance/#, yields nothing of
	// press-02: within the wait, press-01 sees at most its own document.
	for _, topic := range []string{fleet.DesiredTopic("press-02"), "appliance/#", "#", "appliance/devices/+/desired"} {
		out, code := mosq(t, 3*time.Second, sub, append(as("press-01"), "-t", topic, "-v", "-W", "2")...)
		t.Logf("subscribe %s: exit %d: %q", topic, code, out)
		if strings.Contains(out, "press-02") {
			t.Fatalf("press-01 subscribed to %s and saw press-02's messages: %q", topic, out)
		}
	}

	// Publishing to another device's reported topic changes nothing.
	report := `{"lastDesiredVersion":1,"lastDesiredStatus":{"code":200},"modules":{}}`
	mosq(t, 10*time.Second, pub, append(as("press-01"), "-t", fleet.ReportedTopic("press-02"), "-m", report)...)
	// Its own report is taken, which shows the publish path works at all.
	if _, code := mosq(t, 10*time.Second, pub, append(as("press-01"), "-t", fleet.ReportedTopic("press-01"), "-m", report)...); code != 0 {
		t.Fatalf("press-01 could not publish its own report")
	}
	eventually(t, "press-01's own report stored", 10*time.Second, func() bool {
		_, at := reported(t, dir, "press-01")
		return !at.IsZero()
	})
	if _, at := reported(t, dir, "press-02"); !at.IsZero() {
		t.Fatal("press-01 wrote press-02's reported state")
	}
}

func writeManifest(t *testing.T) string {
	t.Helper()
	return processManifest(t, t.TempDir(), map[string]map[string]any{"m": module("running", "always", nil)})
}
