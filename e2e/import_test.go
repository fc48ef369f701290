//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/identityfile"
)

// exportKey is the key an Azure export gives a device in these tests:
// derived from its id, so a test knows every key without keeping them.
func exportKey(id, which string) string {
	sum := sha256.Sum256([]byte("azure/" + which + "/" + id))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// writeAzureExport writes an export file of n devices as `az iot hub
// device-identity export` writes it (keys included, the fields we ignore
// too), with bad lines in place of the good ones at the numbers given.
// Every 10th device is disabled, every 3rd is in environment prod.
func writeAzureExport(t *testing.T, path string, n int, bad map[int]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(f)
	for i := 1; i <= n; i++ {
		if line, ok := bad[i]; ok {
			fmt.Fprintln(w, line)
			continue
		}
		id := fmt.Sprintf("line3-press-%06d", i)
		status, env := "enabled", "test"
		if i%10 == 0 {
			status = "disabled"
		}
		if i%3 == 0 {
			env = "prod"
		}
		fmt.Fprintf(w, `{"id":%q,"eTag":"MA==","status":%q,"statusReason":null,"authentication":{"symmetricKey":{"primaryKey":%q,"secondaryKey":%q},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"twinETag":"AAAAAAAAAAE=","tags":{"environment":%q,"site":{"line":%d}},"properties":{"desired":{"$metadata":{}},"reported":{}},"capabilities":{"iotEdge":true},"deviceScope":null,"parentScopes":[]}`+"\n",
			id, status, exportKey(id, "p"), exportKey(id, "s"), env, i%7)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// identitiesOf reads an export file into id -> (status, tags) as JSON.
func identitiesOf(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		id, err := identityfile.Parse(line)
		if err != nil {
			t.Fatalf("export line %s: %v", line, err)
		}
		if id.HasKeys() {
			t.Fatalf("an export line holds keys: %s", line)
		}
		tags, _ := json.Marshal(id.Tags)
		out[id.ID] = id.Status + " " + string(tags)
	}
	return out
}

// TestImport_AzureExportOf100000Devices is issue 19's first acceptance:
// an Azure export of 100,000 devices, keys and tags, with malformed lines,
// is imported by the CLI into a real node; the malformed lines are named
// by number and the rest is imported; devices connect with their original
// keys (mosquitto_sub, a third-party MQTT client) and receive the
// deployment that targets them; importing the file again with upsert
// changes nothing (etags stay); an export imported into a fresh node gives
// the same ids, statuses and tags.
func TestImport_AzureExportOf100000Devices(t *testing.T) {
	sub, _ := mosquittoTools(t)
	dir := t.TempDir()
	srv := startServer(t, dir)
	cli(t, dir, "deployment", "create", "presses-prod", "--content", writeManifest(t), "--target-condition", "tags.environment='prod'").mustSucceed(t)

	const devices = 100_000
	bad := map[int]string{
		777:    `{"id":"line3-press-000777","status":"enabled",`,                                                             // cut short
		12345:  `{"id":"line3-press-012345","status":"retired"}`,                                                             // not a status
		54321:  `{"id":"line3-press-054321","authentication":{"symmetricKey":{"primaryKey":"` + exportKey("x", "p") + `"}}}`, // one key
		99999:  `{"id":"line3 press 099999"}`,                                                                                // not an id
		100000: `{"id":"line3-press-000001"}`,                                                                                // given twice
	}
	file := filepath.Join(t.TempDir(), "devices.txt")
	writeAzureExport(t, file, devices, bad)

	start := time.Now()
	r := cli(t, dir, "device", "import", file)
	t.Logf("imported %d lines in %s", devices, time.Since(start))
	if r.code == 0 || !strings.Contains(r.stderr, fmt.Sprintf("5 of %d lines were not imported", devices)) {
		t.Fatalf("import with bad lines: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	for line, field := range map[int]string{777: "not a JSON object", 12345: "status", 54321: "authentication.symmetricKey.secondaryKey", 99999: "id", 100000: "also on line 1"} {
		if !regexpLine(r.stdout, line, field) {
			t.Errorf("the import's output does not name line %d (%s):\n%s", line, field, r.stdout)
		}
	}
	if !strings.Contains(r.stdout, "99995") {
		t.Errorf("the summary does not count 99,995 devices created:\n%s", r.stdout)
	}

	// Devices connect with the keys of the file and get their deployment.
	host, port, _ := net.SplitHostPort(strings.TrimPrefix(srv.mqttURL(), "mqtts://"))
	for _, i := range []int{3, 50001, 99996} {
		id := fmt.Sprintf("line3-press-%06d", i)
		for _, which := range []string{"p", "s"} {
			out, code := mosq(t, 20*time.Second, sub, "-h", host, "-p", port, "--cafile", srv.caFile(), "-V", "mqttv311", "-q", "1",
				"-i", id, "-u", id, "-P", exportKey(id, which), "-t", fleet.DesiredTopic(id), "-C", "1")
			var doc fleet.DesiredDocument
			if code != 0 || json.Unmarshal([]byte(strings.TrimSpace(out)), &doc) != nil || doc.DeploymentID != "presses-prod" {
				t.Fatalf("%s with its original %s key: exit %d, %q", id, which, code, out)
			}
		}
	}
	// A disabled one is refused, as is a key of another device.
	for _, try := range [][2]string{{"line3-press-000030", exportKey("line3-press-000030", "p")}, {"line3-press-000003", exportKey("line3-press-000006", "p")}} {
		if out, code := mosq(t, 10*time.Second, sub, "-h", host, "-p", port, "--cafile", srv.caFile(), "-V", "mqttv311", "-q", "1",
			"-i", try[0], "-u", try[0], "-P", try[1], "-t", fleet.DesiredTopic(try[0]), "-C", "1"); code == 0 {
			t.Fatalf("%s was admitted: %q", try[0], out)
		}
	}

	etagOf := func(id string) string {
		var d api.DeviceView
		if err := json.Unmarshal([]byte(cli(t, dir, "device", "show", id, "-o", "json").mustSucceed(t).stdout), &d); err != nil {
			t.Fatal(err)
		}
		return d.Etag
	}
	sample := []string{"line3-press-000002", "line3-press-050000", "line3-press-099998"}
	var before []string
	for _, id := range sample {
		before = append(before, etagOf(id))
	}

	// The same file again, upsert: nothing changes, the bad lines still fail.
	r = cli(t, dir, "device", "import", file, "--mode", "upsert", "-o", "json")
	var sum api.ImportSummary
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil {
		t.Fatalf("upsert -o json: %v\n%s\n%s", err, r.stdout, r.stderr)
	}
	if sum.Unchanged != devices-5 || sum.Created+sum.Updated+sum.Deleted != 0 || sum.Failed != 5 {
		t.Fatalf("upsert of the same file: %+v", sum)
	}
	for i, id := range sample {
		if got := etagOf(id); got != before[i] {
			t.Fatalf("%s: etag %s -> %s after an idempotent upsert", id, before[i], got)
		}
	}

	// Export, import into a fresh node, export again: the same identities.
	exported := filepath.Join(t.TempDir(), "export.txt")
	r = cli(t, dir, "device", "export", "--out", exported).mustSucceed(t)
	if !strings.Contains(r.stdout, fmt.Sprintf("exported %d devices", devices-5)) || !strings.Contains(r.stderr, "holds no keys") {
		t.Fatalf("export: %s %s", r.stdout, r.stderr)
	}
	want := identitiesOf(t, exported)
	fresh := t.TempDir()
	startServer(t, fresh)
	r = cli(t, fresh, "device", "import", exported, "-o", "json").mustSucceed(t)
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil || sum.Created != devices-5 || sum.WithoutKeys != devices-5 {
		t.Fatalf("import of the export: %+v, %v", sum, err)
	}
	again := filepath.Join(t.TempDir(), "again.txt")
	cli(t, fresh, "device", "export", "--out", again).mustSucceed(t)
	got := identitiesOf(t, again)
	if len(got) != len(want) {
		t.Fatalf("round trip: %d devices, want %d", len(got), len(want))
	}
	var differ []string
	for id, w := range want {
		if got[id] != w {
			differ = append(differ, fmt.Sprintf("%s: %s, want %s", id, got[id], w))
		}
	}
	slices.Sort(differ)
	if len(differ) > 0 {
		t.Fatalf("%d devices differ after the round trip, e.g. %s", len(differ), differ[0])
	}
	if want["line3-press-000030"] != `disabled {"environment":"prod","site":{"line":2}}` {
		t.Fatalf("line3-press-000030 exported as %q", want["line3-press-000030"])
	}
}

// regexpLine tells whether the import's table has a row for line that
// mentions what.
func regexpLine(out string, line int, what string) bool {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == fmt.Sprint(line) && strings.Contains(l, what) {
			return true
		}
	}
	return false
}
