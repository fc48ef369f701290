package agent

import (
	"archive/zip"
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/secrettest"
	"appliance/internal/testcontroller"
)

// The agent's own direct methods, called as the controller calls them:
// a request on the device's session (a stand-in controller's broker), the
// answer back on it.

// methodAgent runs an agent against a stand-in controller, with no device
// hub (the agent answers its own methods without one), and the modules
// given.
func methodAgent(t *testing.T, modules map[string]mod) (*runningAgent, *testcontroller.Controller, *recordingHandler) {
	t.Helper()
	rec := &recordingHandler{}
	ctl := testcontroller.Start(t, "dev-methods-"+strconv.Itoa(int(time.Now().UnixNano()%1e6)), testLogger(t))
	cfg := testConfig(t)
	cfg.Servers = []string{ctl.URL()}
	cfg.DeviceID = ctl.DeviceID()
	cfg.Hub = HubConfig{Disabled: true}
	cfg.Logger = slogTee(testLogger(t), rec)
	a := startAgent(t, cfg)
	ctl.SetDesired(desired(1, "dep-1", modules))
	ctl.WaitReport(time.Minute, "the deployment applied", func(d fleet.ReportedDocument) bool { return d.LastDesiredVersion == 1 })
	return a, ctl, rec
}

// call calls one of the agent's methods and waits for the answer.
func call(t *testing.T, ctl *testcontroller.Controller, method string, payload any) fleet.MethodResponse {
	t.Helper()
	var raw [8]byte
	_, _ = rand.Read(raw[:])
	id := hex.EncodeToString(raw[:])
	req := fleet.MethodRequest{ID: id, Module: fleet.EdgeAgentModule, Method: method}
	if payload != nil {
		req.Payload = mustJSON(payload)
	}
	ctl.Invoke(req)
	var resp fleet.MethodResponse
	waitFor(t, 30*time.Second, "the answer to "+method, func() bool {
		var ok bool
		resp, ok = ctl.Response(id)
		return ok
	})
	return resp
}

// logs calls GetModuleLogs for one module and returns its item.
func logs(t *testing.T, ctl *testcontroller.Controller, module string, filter map[string]any, extra map[string]any) fleet.ModuleLogsResponseItem {
	t.Helper()
	req := map[string]any{"schemaVersion": "1.0", "items": []any{map[string]any{"id": "^" + regexp.QuoteMeta(module) + "$", "filter": filter}}}
	for k, v := range extra {
		req[k] = v
	}
	resp := call(t, ctl, fleet.MethodGetModuleLogs, req)
	if resp.Status != 200 {
		t.Fatalf("GetModuleLogs %s %v: status %d %s %s", module, filter, resp.Status, resp.Payload, resp.Error)
	}
	var items []fleet.ModuleLogsResponseItem
	if err := json.Unmarshal(resp.Payload, &items); err != nil || len(items) != 1 || items[0].ID != module {
		t.Fatalf("GetModuleLogs %s: %s (%v)", module, resp.Payload, err)
	}
	return items[0]
}

func lines(item fleet.ModuleLogsResponseItem) []string {
	return strings.Split(strings.TrimSuffix(item.Payload, "\n"), "\n")
}

// shModule is a process module running a shell script.
func shModule(script string, env map[string]string) mod {
	e := map[string]any{}
	for k, v := range env {
		e[k] = map[string]any{"value": v}
	}
	return mod{"type": "process", "status": "running", "restartPolicy": "always", "env": e,
		"settings": map[string]any{"command": []string{"/bin/sh", "-c", script}}}
}

// ticker prints its pid, then a numbered line on stdout and on stderr
// every 20 ms.
const ticker = `echo "pid $$ up"; i=0; while :; do i=$((i+1)); echo "tick $i"; echo "err $i" >&2; sleep 0.02; done`

// GetModuleLogs: a module's recent lines by tail, since, regex and level,
// as text, JSON or gzip; the agent's own log by the name edgeAgent, with
// none of the module's output in it; ping; refusals with edgeAgent's
// status codes.
func TestAgentMethods_GetModuleLogs(t *testing.T) {
	_, ctl, rec := methodAgent(t, map[string]mod{"ticker": shModule(ticker, nil)})
	waitFor(t, time.Minute, "ticker to print 20 ticks", func() bool {
		return strings.Contains(logs(t, ctl, "ticker", map[string]any{"tail": 1000}, nil).Payload, "tick 20\n")
	})

	tail := lines(logs(t, ctl, "ticker", map[string]any{"tail": 6}, nil))
	if len(tail) != 6 {
		t.Fatalf("tail 6: %q", tail)
	}
	n := 0
	for _, l := range tail {
		// Lines of both streams, in the order written: ticks count up.
		var k int
		if _, err := fmt.Sscanf(l, "tick %d", &k); err == nil {
			if k <= n {
				t.Errorf("tail 6: %q out of order", tail)
			}
			n = k
		} else if !strings.HasPrefix(l, "err ") {
			t.Errorf("tail 6: unexpected line %q", l)
		}
	}

	// JSON: each line with its stream and time; since from one of them
	// returns that line first.
	item := logs(t, ctl, "ticker", map[string]any{"tail": 10}, map[string]any{"contentType": "json"})
	var msgs []fleet.ModuleLogMessage
	if err := json.Unmarshal([]byte(item.Payload), &msgs); err != nil || len(msgs) != 10 {
		t.Fatalf("json content: %v %s", err, item.Payload)
	}
	streams := map[string]bool{}
	for i, m := range msgs {
		streams[m.Stream] = true
		if m.ID != "ticker" || m.Device != ctl.DeviceID() || m.LogLevel != 6 || (i > 0 && m.Timestamp.Before(msgs[i-1].Timestamp)) {
			t.Errorf("message %d: %+v", i, m)
		}
	}
	if !streams["stdout"] || !streams["stderr"] {
		t.Errorf("streams: %v", streams)
	}
	from := msgs[3]
	since := lines(logs(t, ctl, "ticker", map[string]any{"since": from.Timestamp.Format(time.RFC3339Nano)}, nil))
	if since[0] != from.Text && !(len(since) > 1 && since[1] == from.Text) { // a line written in the same nanosecond may come first
		t.Errorf("since %s: first lines %q, want %q", from.Timestamp, since[:min(3, len(since))], from.Text)
	}
	until := logs(t, ctl, "ticker", map[string]any{"since": from.Timestamp.Format(time.RFC3339Nano), "until": msgs[6].Timestamp.Format(time.RFC3339Nano)}, map[string]any{"contentType": "json"})
	var window []fleet.ModuleLogMessage
	json.Unmarshal([]byte(until.Payload), &window)
	if len(window) < 3 || window[len(window)-1].Timestamp.After(msgs[6].Timestamp) || !window[len(window)-1].Timestamp.Before(msgs[6].Timestamp) {
		t.Errorf("since %s until %s: %d lines", from.Timestamp, msgs[6].Timestamp, len(window))
	}

	// Regex and level filters; gzip.
	for _, l := range lines(logs(t, ctl, "ticker", map[string]any{"tail": 50, "regex": "^err"}, nil)) {
		if !strings.HasPrefix(l, "err ") {
			t.Errorf("regex ^err kept %q", l)
		}
	}
	if got := logs(t, ctl, "ticker", map[string]any{"tail": 50, "loglevel": 3}, nil).Payload; got != "" {
		t.Errorf("loglevel 3 kept lines without a level (informational): %q", got)
	}
	z := logs(t, ctl, "ticker", map[string]any{"tail": 5}, map[string]any{"encoding": "gzip"})
	zr, err := gzip.NewReader(bytes.NewReader(z.PayloadBytes))
	if err != nil {
		t.Fatal(err)
	}
	unz, _ := io.ReadAll(zr)
	if z.Payload != "" || len(strings.Split(strings.TrimSpace(string(unz)), "\n")) != 5 {
		t.Errorf("gzip: payload %q, unzipped %q", z.Payload, unz)
	}

	// The agent's own log: its lines, none of the module's.
	agentLog := logs(t, ctl, fleet.AgentLogModule, map[string]any{}, nil).Payload
	if !strings.Contains(agentLog, "agent starting") || !strings.Contains(agentLog, "desired document accepted") {
		t.Errorf("the agent's log lacks its own lines:\n%s", agentLog)
	}
	if strings.Contains(agentLog, "tick ") || rec.contains("tick ") {
		t.Errorf("the module's output reached the agent's log")
	}

	// Both by one regex: edgeAgent and the module, one item each.
	resp := call(t, ctl, "getmodulelogs", map[string]any{"schemaVersion": "1.0", "items": []any{map[string]any{"id": ".*", "filter": map[string]any{"tail": 1}}}})
	var items []fleet.ModuleLogsResponseItem
	json.Unmarshal(resp.Payload, &items)
	if resp.Status != 200 || len(items) != 2 || items[0].ID != "edgeAgent" || items[1].ID != "ticker" {
		t.Errorf("id .*: %d %s", resp.Status, resp.Payload)
	}

	if resp := call(t, ctl, "ping", nil); resp.Status != 200 || len(resp.Payload) != 0 {
		t.Errorf("ping: %+v", resp)
	}
	for _, tc := range []struct {
		method  string
		payload any
		status  int
		message string
	}{
		{"GetModuleLogs", map[string]any{"schemaVersion": "1.0", "items": []any{map[string]any{"id": "^nope$"}}}, 404, `no module matches "^nope$": the running deployment has ticker`},
		{"GetModuleLogs", map[string]any{"schemaVersion": "1.0", "items": []any{map[string]any{"id": "ticker", "filter": map[string]any{"since": "yesterday"}}}}, 400, "items[0].filter.since"},
		{"GetModuleLogs", map[string]any{"schemaVersion": "1.0", "items": []any{map[string]any{"id": "("}}}, 400, "is not a regular expression"},
		{"GetModuleLogs", map[string]any{"schemaVersion": "1.0", "items": []any{}}, 400, "items is empty"},
		{"GetModuleLogs", map[string]any{"schemaVersion": "2.0", "items": []any{map[string]any{"id": "ticker"}}}, 400, "schemaVersion"},
		{"GetModuleLogs", "not an object", 400, "Error parsing command payload"},
		{"Reboot", nil, 400, "Command 'Reboot' not found"},
	} {
		resp := call(t, ctl, tc.method, tc.payload)
		if msg := fleet.MethodErrorMessage(resp.Payload); resp.Status != tc.status || !strings.Contains(msg, tc.message) {
			t.Errorf("%s %v: %d %q, want %d with %q", tc.method, tc.payload, resp.Status, msg, tc.status, tc.message)
		}
	}
}

// A module's output beyond the answer's size: the newest lines that fit,
// marked truncated; reading on from a time, the oldest.
func TestAgentMethods_GetModuleLogsFitsTheAnswer(t *testing.T) {
	// 2,000 lines of 100 bytes: 200 KB, more than one answer holds.
	_, ctl, _ := methodAgent(t, map[string]mod{"chatty": shModule(`i=0; while [ $i -lt 2000 ]; do i=$((i+1)); printf 'line %05d %090d\n' $i 0; done; sleep 1000`, nil)})
	waitFor(t, time.Minute, "2000 lines", func() bool {
		return strings.HasPrefix(logs(t, ctl, "chatty", map[string]any{"tail": 1}, nil).Payload, "line 02000 ")
	})
	newest := logs(t, ctl, "chatty", map[string]any{}, nil)
	l := lines(newest)
	if !newest.Truncated || !strings.HasPrefix(l[len(l)-1], "line 02000 ") || strings.HasPrefix(l[0], "line 00001 ") || len(newest.Payload) > fleet.MaxMethodResponsePayload {
		t.Errorf("no filter: truncated=%v, %d lines from %.10q to %.10q", newest.Truncated, len(l), l[0], l[len(l)-1])
	}
	oldest := logs(t, ctl, "chatty", map[string]any{"since": "1h"}, nil)
	l = lines(oldest)
	if !oldest.Truncated || !strings.HasPrefix(l[0], "line 00001 ") || strings.HasPrefix(l[len(l)-1], "line 02000 ") {
		t.Errorf("since 1h: truncated=%v, %d lines from %.10q to %.10q", oldest.Truncated, len(l), l[0], l[len(l)-1])
	}
}

// RestartModule: a new process (new pid), not counted as a failure; a
// module that exited for good runs again; refusals for a module that is
// not there or is desired stopped.
func TestAgentMethods_RestartModule(t *testing.T) {
	a, ctl, _ := methodAgent(t, map[string]mod{
		"ticker":  shModule(ticker, nil),
		"quitter": shModule(`echo "ran once"; exit 3`, nil).with("restartPolicy", "never"),
		"idle":    shModule(ticker, nil).with("status", "stopped"),
	})
	pidOf := func() []string {
		var pids []string
		for _, l := range lines(logs(t, ctl, "ticker", map[string]any{"regex": "^pid "}, nil)) {
			if l != "" {
				pids = append(pids, strings.Fields(l)[1])
			}
		}
		return pids
	}
	waitFor(t, time.Minute, "ticker's first pid", func() bool { return len(pidOf()) == 1 })
	first, _ := strconv.Atoi(pidOf()[0])
	before := waitReport(t, a.Agent, time.Minute, "ticker running, quitter failed", func(d fleet.ReportedDocument) bool {
		return d.Modules["ticker"].RuntimeStatus == fleet.RuntimeRunning && d.Modules["quitter"].RuntimeStatus == fleet.RuntimeFailed
	})

	resp := call(t, ctl, "RestartModule", fleet.RestartModuleRequest{SchemaVersion: "1.0", ID: "ticker"})
	if resp.Status != 200 || len(resp.Payload) != 0 {
		t.Fatalf("RestartModule: %d %s", resp.Status, resp.Payload)
	}
	waitFor(t, time.Minute, "a second pid", func() bool { return len(pidOf()) == 2 })
	second, _ := strconv.Atoi(pidOf()[1])
	if second == first || alive(first) || !alive(second) {
		t.Errorf("pids %d then %d (first alive %v, second alive %v)", first, second, alive(first), alive(second))
	}
	after := waitReport(t, a.Agent, time.Minute, "ticker running after the restart", func(d fleet.ReportedDocument) bool {
		m := d.Modules["ticker"]
		return m.RuntimeStatus == fleet.RuntimeRunning && m.LastRestartTimeUTC != nil
	})
	if m := after.Modules["ticker"]; m.RestartCount != before.Modules["ticker"].RestartCount || !m.LastStartTimeUTC.After(*before.Modules["ticker"].LastStartTimeUTC) {
		t.Errorf("after the restart: %+v (before %+v)", m, before.Modules["ticker"])
	}

	if resp := call(t, ctl, "RestartModule", map[string]any{"schemaVersion": "1.0", "id": "quitter"}); resp.Status != 200 {
		t.Fatalf("restart quitter: %d %s", resp.Status, resp.Payload)
	}
	waitFor(t, time.Minute, "quitter to run again", func() bool {
		return strings.Count(logs(t, ctl, "quitter", map[string]any{}, nil).Payload, "ran once") == 2
	})

	for _, tc := range []struct {
		payload any
		status  int
		message string
	}{
		{map[string]any{"schemaVersion": "1.0", "id": "ghost"}, 404, "Module ghost not found in the current environment"},
		{map[string]any{"schemaVersion": "1.0", "id": "idle"}, 400, "module idle desired stopped"},
		{map[string]any{"schemaVersion": "1.0"}, 400, "names no module"},
	} {
		resp := call(t, ctl, "RestartModule", tc.payload)
		if msg := fleet.MethodErrorMessage(resp.Payload); resp.Status != tc.status || !strings.Contains(msg, tc.message) {
			t.Errorf("RestartModule %v: %d %q, want %d with %q", tc.payload, resp.Status, msg, tc.status, tc.message)
		}
	}
}

// fetchBundle fetches a support bundle chunk by chunk and checks its size
// and digest.
func fetchBundle(t *testing.T, ctl *testcontroller.Controller, since string) ([]byte, int) {
	t.Helper()
	var data []byte
	chunks := 0
	req := fleet.SupportBundleRequest{SchemaVersion: "1.0", Since: since}
	for {
		resp := call(t, ctl, "GetSupportBundle", req)
		if resp.Status != 200 {
			t.Fatalf("GetSupportBundle %+v: %d %s", req, resp.Status, resp.Payload)
		}
		var c fleet.SupportBundleChunkResponse
		if err := json.Unmarshal(resp.Payload, &c); err != nil {
			t.Fatal(err)
		}
		if c.Offset != int64(len(data)) || len(c.Data) > fleet.SupportBundleChunk || len(resp.Payload) > fleet.MaxMethodResponsePayload {
			t.Fatalf("chunk at %d: offset %d, %d bytes, payload %d bytes", len(data), c.Offset, len(c.Data), len(resp.Payload))
		}
		data = append(data, c.Data...)
		chunks++
		if int64(len(data)) >= c.Size {
			sum := sha256.Sum256(data)
			if hex.EncodeToString(sum[:]) != c.SHA256 || int64(len(data)) != c.Size {
				t.Fatalf("bundle: %d bytes of %d, digest mismatch", len(data), c.Size)
			}
			return data, chunks
		}
		req = fleet.SupportBundleRequest{SchemaVersion: "1.0", ID: c.ID, Offset: int64(len(data))}
	}
}

// A support bundle holds the agent's log, each module's logs, the report
// and the desired document, and none of the deployment's secrets: the
// module prints its whole environment and every planted secret, which the
// manifest also gives on its command line.
func TestAgentMethods_SupportBundleHoldsNoSecret(t *testing.T) {
	secrets := secrettest.Secrets()
	var all []string
	for _, s := range secrets {
		all = append(all, s.Value)
	}
	all = append(all, secrettest.RegistryPassword)
	// Random output too, so that the bundle takes several chunks.
	script := `env; echo "twin and options secrets: ` + strings.Join(all, " ") + `"; head -c 200000 /dev/urandom | od -x | head -4000; sleep 1000`
	content := secrettest.Manifest([]string{"/bin/sh", "-c", script}, secrets)
	var wrapped struct {
		ModulesContent json.RawMessage `json:"modulesContent"`
	}
	if err := json.Unmarshal(content, &wrapped); err != nil {
		t.Fatal(err)
	}
	rec := &recordingHandler{}
	ctl := testcontroller.Start(t, "dev-bundle", testLogger(t))
	cfg := testConfig(t)
	cfg.Servers, cfg.DeviceID = []string{ctl.URL()}, ctl.DeviceID()
	cfg.Logger = slogTee(testLogger(t), rec)
	startAgent(t, cfg)
	ctl.SetDesired(fleet.DesiredDocument{Version: 1, DeploymentID: "secrets", ModulesContent: wrapped.ModulesContent})
	// Once it reported, the agent has subscribed to its methods.
	ctl.WaitReport(time.Minute, "the deployment applied", func(d fleet.ReportedDocument) bool { return d.LastDesiredVersion == 1 })
	waitFor(t, time.Minute, "the module to print its environment and the random data", func() bool {
		return strings.HasPrefix(logs(t, ctl, secrettest.EnvModule, map[string]any{"tail": 1}, nil).Payload, "0174760 ")
	})

	data, chunks := fetchBundle(t, ctl, "")
	if chunks < 2 {
		t.Errorf("the bundle came in %d chunk(s) of %d bytes: the test wants several", chunks, len(data))
	}
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(rc)
		rc.Close()
		files[f.Name] = string(b)
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	want := []string{"desired.json", "device.json", "logs/edgeAgent.log", "logs/" + secrettest.EnvModule + ".log", "logs/" + secrettest.OptionsModule + ".log", "reported.json"}
	if !slices.Equal(names, want) {
		t.Errorf("files %q, want %q", names, want)
	}
	for name, text := range files {
		if strings.Contains(text, secrettest.Marker) {
			for _, l := range strings.Split(text, "\n") {
				if strings.Contains(l, secrettest.Marker) {
					t.Errorf("%s holds a secret: %.300s", name, l)
				}
			}
		}
	}
	moduleLog := files["logs/"+secrettest.EnvModule+".log"]
	for k, v := range secrettest.Harmless {
		if !strings.Contains(moduleLog, k+"="+v) {
			t.Errorf("the module's log in the bundle lacks %s=%s (what it printed is not all there)", k, v)
		}
	}
	if !strings.Contains(moduleLog, "twin and options secrets: <redacted>") || !strings.Contains(files["logs/edgeAgent.log"], "agent starting") ||
		!strings.Contains(files["reported.json"], `"lastDesiredVersion": 1`) || !strings.Contains(files["desired.json"], `"deploymentId": "secrets"`) ||
		!strings.Contains(files["device.json"], `"deviceId": "dev-bundle"`) {
		t.Errorf("the bundle's files lack what they should hold:\n%.2000s", files["device.json"])
	}

	if resp := call(t, ctl, "GetSupportBundle", fleet.SupportBundleRequest{SchemaVersion: "1.0", ID: "feedface", Offset: 0}); resp.Status != 404 {
		t.Errorf("an unknown bundle: %d %s", resp.Status, resp.Payload)
	}
}

// Without a device hub the agent still answers its own methods; a module's
// method gets 404 saying why.
func TestAgentMethods_NoHub(t *testing.T) {
	_, ctl, _ := methodAgent(t, map[string]mod{"ticker": shModule(ticker, nil)})
	if resp := call(t, ctl, "ping", nil); resp.Status != 200 {
		t.Errorf("ping: %+v", resp)
	}
	ctl.Invoke(fleet.MethodRequest{ID: "to-module", Module: "ticker", Method: "hello"})
	var resp fleet.MethodResponse
	waitFor(t, 30*time.Second, "the answer for the module", func() bool {
		var ok bool
		resp, ok = ctl.Response("to-module")
		return ok
	})
	if resp.Status != fleet.MethodStatusNotConnected || !strings.Contains(resp.Error, "no device hub") {
		t.Errorf("a module's method without a hub: %+v", resp)
	}
}
