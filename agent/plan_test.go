package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"appliance/fleet"
)

func TestBuildPlan_MixedManifest(t *testing.T) {
	raw, err := os.ReadFile("testdata/mixed_manifest.json")
	if err != nil {
		t.Fatal(err)
	}
	var content struct {
		ModulesContent json.RawMessage `json:"modulesContent"`
	}
	if err := json.Unmarshal(raw, &content); err != nil {
		t.Fatal(err)
	}
	p, err := buildPlan(fleet.DesiredDocument{Version: 12, DeploymentID: "plant", ModulesContent: content.ModulesContent})
	if err != nil {
		t.Fatalf("buildPlan: %v", err)
	}
	c := p.modules["collector"]
	if c == nil || c.Type != "process" || strings.Join(c.Command, " ") != "/opt/collector/bin/collector --config /etc/collector.yaml" ||
		c.WorkingDir != "/opt/collector" || c.RestartPolicy != "on-failure" || c.StartupOrder != 1 || c.Env["LOG_LEVEL"] != "info" ||
		c.Deployment != "plant" || c.image() != "/opt/collector/bin/collector" {
		t.Errorf("collector: %+v", c)
	}
	h := p.modules["historian"]
	wantOpts := `{"Env":["HISTORIAN_ADMIN_PASSWORD=adm1n","HISTORIAN_PORT=9000"],"HostConfig":{"Binds":["/var/lib/historian:/data"]}}`
	if h == nil || h.CreateOptions != wantOpts || h.Image != "registry.plant.local:5000/historian:2.3" || h.Version != "2.3" ||
		h.Env["RETENTION_DAYS"] != "30" || h.Env["COMPRESS"] != "true" || h.StartupOrder != 0 || h.ImagePullPolicy != "on-create" {
		t.Errorf("historian: %+v", h)
	}
	if !json.Valid([]byte(h.CreateOptions)) {
		t.Error("joined createOptions is not JSON")
	}
	if len(p.credentials) != 1 || p.credentials[0].Address != "registry.plant.local:5000" || p.credentials[0].Password != "hunter2" {
		t.Errorf("credentials: %v", p.credentials)
	}
	if p.systemModules["edgeHub"].Image != "registry.plant.local:5000/edge-hub:1.5" || p.systemModules["edgeAgent"].Status != "running" {
		t.Errorf("systemModules: %+v", p.systemModules)
	}
}

func TestBuildPlan_EmptyDesiredState(t *testing.T) {
	for _, doc := range []fleet.DesiredDocument{
		{Version: 3},
		{Version: 3, DeploymentID: "gone"},
		{Version: 3, ModulesContent: manifest(map[string]mod{"x": processModule("/tmp", nil)})},
		{Version: 3, DeploymentID: "d", ModulesContent: json.RawMessage(`null`)},
	} {
		p, err := buildPlan(doc)
		if err != nil || len(p.modules) != 0 || p.deploymentID != "" {
			t.Errorf("buildPlan(%s): %+v, %v; want an empty plan", mustJSON(doc), p, err)
		}
	}
}

func TestBuildPlan_Refusals(t *testing.T) {
	good := processModule("/tmp", nil)
	for _, tc := range []struct {
		name    string
		content json.RawMessage
		code    int
		field   string
	}{
		{"unknown restartPolicy", manifest(map[string]mod{"m": good.with("restartPolicy", "sometimes")}), 400,
			"modulesContent.$edgeAgent.properties.desired.modules.m.restartPolicy: must be one of never, on-failure, on-unhealthy, always"},
		{"unknown module type", manifest(map[string]mod{"m": good.with("type", "vm")}), 400, "modules.m.type"},
		{"process module without command", manifest(map[string]mod{"m": good.with("settings", map[string]any{"workingDir": "/"})}), 400, "modules.m.settings.command"},
		{"bad env name", manifest(map[string]mod{"m": good.with("env", map[string]any{"A B": map[string]any{"value": "x"}})}), 400, "modules.m.env"},
		{"missing $edgeHub", json.RawMessage(strings.Replace(string(manifest(map[string]mod{})), `"$edgeHub"`, `"$edgeHubX"`, 1)), 400, "modulesContent.$edgeHub"},
		{"schemaVersion", json.RawMessage(strings.Replace(string(manifest(map[string]mod{})), `"schemaVersion":"1.1","systemModules"`, `"schemaVersion":"2.0","systemModules"`, 1)), 412,
			"modulesContent.$edgeAgent.properties.desired.schemaVersion"},
		{"content not an object", json.RawMessage(`[1,2]`), 400, "modulesContent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: tc.content})
			de, ok := err.(*desiredError)
			if !ok {
				t.Fatalf("err %v (%T); want a *desiredError", err, err)
			}
			if de.code != tc.code || !strings.Contains(de.msg, tc.field) {
				t.Errorf("got %d %q; want %d naming %q", de.code, de.msg, tc.code, tc.field)
			}
		})
	}
}

// TestParseDesired_AdjacentVersions: a desired document from a
// controller one release ahead or behind is read as far as it is
// understood: fields this agent does not know are ignored, a newer minor
// schema and no schema at all (the release before schemaVersion) are
// accepted; only another major is refused, with 412.
func TestParseDesired_AdjacentVersions(t *testing.T) {
	content := string(manifest(map[string]mod{"m": processModule("/tmp", nil)}))
	for _, tc := range []struct {
		name    string
		payload string
		code    int // 0: accepted
	}{
		{"this release", `{"schemaVersion":"` + fleet.DocumentSchema + `","version":5,"deploymentId":"d","modulesContent":` + content + `}`, 0},
		{"the previous release: no schemaVersion", `{"version":5,"deploymentId":"d","modulesContent":` + content + `}`, 0},
		{"a newer minor with fields this agent does not know", `{"schemaVersion":"1.9","version":5,"deploymentId":"d","rollout":{"wave":3},"hub":null,"modulesContent":` + content + `}`, 0},
		{"another major", `{"schemaVersion":"2.0","version":5,"deploymentId":"d","modulesContent":` + content + `}`, fleet.StatusCodeInvalidSchema},
		{"a schema that is not a version", `{"schemaVersion":"next","version":5,"deploymentId":"d","modulesContent":` + content + `}`, fleet.StatusCodeInvalidSchema},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc, err := parseDesired([]byte(tc.payload))
			if err != nil {
				t.Fatalf("parseDesired: %v", err)
			}
			p, err := buildPlan(doc)
			if tc.code == 0 {
				if err != nil || p.modules["m"] == nil || p.version != 5 {
					t.Fatalf("buildPlan: %+v, %v; want module m at version 5", p, err)
				}
				return
			}
			de, ok := err.(*desiredError)
			if !ok || de.code != tc.code || !strings.Contains(de.msg, "schemaVersion") {
				t.Fatalf("buildPlan: %v; want %d naming schemaVersion", err, tc.code)
			}
		})
	}
}

func TestParseDesired_BadJSON(t *testing.T) {
	for _, payload := range []string{`{"version": 1, "modulesContent": {`, `not json`, `{"version": "seven"}`, `{"version":1} {"version":2}`} {
		_, err := parseDesired([]byte(payload))
		de, ok := err.(*desiredError)
		if !ok || de.code != 400 || !strings.HasPrefix(de.msg, "desired document: ") {
			t.Errorf("parseDesired(%q) = %v; want a 400 naming the desired document", payload, err)
		}
	}
}

func TestModuleSpec_Hash(t *testing.T) {
	base := moduleSpec{Name: "m", Type: "docker", Image: "a:1", CreateOptions: "{}", Env: map[string]string{"A": "1"},
		Status: "running", RestartPolicy: "always", StartupOrder: 1, ImagePullPolicy: "on-create"}
	for _, tc := range []struct {
		name    string
		change  func(*moduleSpec)
		replace bool
	}{
		{"image", func(s *moduleSpec) { s.Image = "a:2" }, true},
		{"env value", func(s *moduleSpec) { s.Env = map[string]string{"A": "2"} }, true},
		{"env added", func(s *moduleSpec) { s.Env = map[string]string{"A": "1", "B": "1"} }, true},
		{"createOptions", func(s *moduleSpec) { s.CreateOptions = `{"User":"1"}` }, true},
		{"version", func(s *moduleSpec) { s.Version = "2" }, true},
		{"command", func(s *moduleSpec) { s.Command = []string{"/x"} }, true},
		{"workingDir", func(s *moduleSpec) { s.WorkingDir = "/w" }, true},
		{"status", func(s *moduleSpec) { s.Status = "stopped" }, false},
		{"restartPolicy", func(s *moduleSpec) { s.RestartPolicy = "never" }, false},
		{"startupOrder", func(s *moduleSpec) { s.StartupOrder = 9 }, false},
		{"imagePullPolicy", func(s *moduleSpec) { s.ImagePullPolicy = "never" }, false},
		{"deployment", func(s *moduleSpec) { s.Deployment = "other" }, false},
	} {
		s := base
		tc.change(&s)
		if replaced := s.hash() != base.hash(); replaced != tc.replace {
			t.Errorf("%s: instance replaced %v; want %v", tc.name, replaced, tc.replace)
		}
	}
}

func TestRestartConfig_CoolOff(t *testing.T) {
	r := RestartConfig{}.withDefaults()
	want := []time.Duration{10, 20, 40, 80, 160, 300, 300}
	for n, w := range want {
		if got := r.coolOff(n); got != w*time.Second {
			t.Errorf("coolOff(%d) = %s; want %s", n, got, w*time.Second)
		}
	}
	if r.MaxRestarts != 20 || r.HealthyReset != 10*time.Minute {
		t.Errorf("defaults: %+v", r)
	}
}

func TestParseServers(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		tls  bool // a CA file or TLS configuration is given
		want string
		err  string
	}{
		{[]string{"mqtt://node1:1883", "mqtts://node2"}, false, "mqtt://node1:1883 mqtts://node2:8883", ""},
		{[]string{" tcp://10.0.0.1 ", "tls://[::1]:9", "SSL://n"}, false, "mqtt://10.0.0.1:1883 mqtts://[::1]:9 mqtts://n:8883", ""},
		// Without a scheme: TLS when a CA is given, else refused (before,
		// plaintext MQTT, silently).
		{[]string{"node1:1883", "node2"}, true, "mqtts://node1:1883 mqtts://node2:8883", ""},
		{[]string{"mqtts://node1", "node2:1883"}, false, "", `server "node2:1883": no scheme: write mqtts://node2:1883 (TLS`},
		{[]string{"node1"}, false, "", "or mqtt://node1 (plaintext"},
		{[]string{"http://node1"}, false, "", "scheme must be mqtts:// or mqtt://"},
		{[]string{"mqtt://user:pw@node1"}, false, "", "only scheme://host:port"},
		{[]string{"mqtt://"}, false, "", "no host"},
		{[]string{" ", ""}, false, "", "at least one"},
	} {
		urls, err := parseServers(tc.in, tc.tls)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrConfig) {
				t.Errorf("parseServers(%q, %v) error %v; want %q", tc.in, tc.tls, err, tc.err)
			}
			continue
		}
		var got []string
		for _, u := range urls {
			got = append(got, u.String())
		}
		if err != nil || strings.Join(got, " ") != tc.want {
			t.Errorf("parseServers(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestNew_ValidatesConfig(t *testing.T) {
	ok := Config{Servers: []string{"mqtt://n:1"}, DeviceID: "d1", DeviceKey: "k", DataDir: "/tmp/x"}
	if _, err := New(ok); err != nil {
		t.Fatalf("New(minimal config): %v", err)
	}
	for name, change := range map[string]func(*Config){
		"DeviceID":    func(c *Config) { c.DeviceID = "" },
		"deviceId":    func(c *Config) { c.DeviceID = "a/b" },
		"DeviceKey":   func(c *Config) { c.DeviceKey = "" },
		"DataDir":     func(c *Config) { c.DataDir = "" },
		"Servers":     func(c *Config) { c.Servers = nil },
		"Runtime":     func(c *Config) { c.Runtime = "podman" },
		"CAFile":      func(c *Config) { c.CAFile = "/nonexistent/ca.pem" },
		"MaxRestarts": func(c *Config) { c.Restart.MaxRestarts = -1 },
		"KeepAlive":   func(c *Config) { c.KeepAlive = time.Millisecond },
	} {
		c := ok
		change(&c)
		_, err := New(c)
		if err == nil || !errorsIs(err, ErrConfig) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: New error %v; want ErrConfig naming it", name, err)
		}
	}
}

func TestCredentialFor(t *testing.T) {
	creds := []registryCredential{
		{Name: "hub", Address: "https://index.docker.io/v1/", Username: "u1"},
		{Name: "plant", Address: "registry.plant.local:5000", Username: "u2"},
	}
	for domain, want := range map[string]string{"docker.io": "u1", "registry.plant.local:5000": "u2", "REGISTRY.plant.local:5000": "u2", "other.io": ""} {
		c, ok := credentialFor(domain, creds)
		if ok != (want != "") || c.Username != want {
			t.Errorf("credentialFor(%s) = %v, %v; want %q", domain, c.Username, ok, want)
		}
	}
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=create", "B=create", "C"}, []string{"B=manifest", "D=manifest"})
	if strings.Join(got, ",") != "A=create,C,B=manifest,D=manifest" {
		t.Errorf("mergeEnv: %v", got)
	}
}

func TestRegistryCredential_NeverPrinted(t *testing.T) {
	c := registryCredential{Name: "r", Address: "r.io", Username: "u", Password: "pa55"}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "cred", c, "creds", []registryCredential{c})
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%v %+v", c, []registryCredential{c}), buf.String()} {
		if strings.Contains(s, "pa55") {
			t.Errorf("password printed: %s", s)
		}
	}
}

func TestTruncate(t *testing.T) {
	long := strings.Repeat("é", 600) // 1200 bytes
	got := truncate(long, 1024)
	if len(got) > 1024 || !strings.HasSuffix(got, "…") || !utf8.ValidString(got) {
		t.Errorf("truncate: %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
	if truncate("short", 10) != "short" {
		t.Error("short strings change")
	}
}
