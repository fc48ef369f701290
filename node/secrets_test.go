package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"appliance/agent"
	"appliance/api"
	"appliance/fleet"
	"appliance/internal/secrettest"
)

// lockedBuffer collects logs written from many goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestSecrets_HiddenOnEveryRead is issue 13's redaction table (acceptance
// 4) on a real node with a real agent: every secret name of the shared list
// and every connection string, in module env, Docker create options and
// module twins, is accepted and hidden from every read (the API's answers,
// the reads the dashboard makes, history, the device's report) and from
// the node's and the agent's logs at debug level; every manifest key
// spelled with another case is refused with 400 naming its path, without
// the secret. The agent runs each env secret as planted, and no variable it
// gives the module is shown in clear by the API unless it is not a secret.
// (The CLI's tables and JSON are checked end to end in e2e.)
func TestSecrets_HiddenOnEveryRead(t *testing.T) {
	nodeLogs := &lockedBuffer{}
	n := startNodeWith(t, t.TempDir(), func(cfg *Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(nodeLogs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	agentLogs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node logs:\n%s\nagent logs:\n%s", nodeLogs, agentLogs)
		}
	})
	ctx := context.Background()
	c := clientFor(n)
	key := createDevice(t, c, "press-01", map[string]any{"line": "secrets"})
	get := func(path string) string {
		t.Helper()
		code, body, _ := rawRequest(t, "GET", n.URL()+path, n.Token(), "")
		if code != 200 {
			t.Fatalf("GET %s: %d %s", path, code, body)
		}
		return body
	}
	noSecret := func(what, text string) {
		t.Helper()
		if strings.Contains(text, secrettest.Marker) {
			i := strings.Index(text, secrettest.Marker)
			t.Errorf("%s shows a secret: ...%s...", what, text[max(0, i-120):min(len(text), i+40)])
		}
	}

	// Keys spelled with another case: refused, naming the path.
	outDir := t.TempDir()
	envFile := filepath.Join(outDir, "env")
	command := []string{"/bin/sh", "-c", "env > " + envFile + ".tmp && mv " + envFile + ".tmp " + envFile + " && exec sleep 600"}
	for _, r := range secrettest.Refusals(command) {
		for _, query := range []string{"", "?dryRun=true"} {
			body := mustJSON(api.DeploymentRequest{Content: r.Content, TargetCondition: "*", Priority: 100})
			code, resp, _ := rawRequest(t, "PUT", n.URL()+"/api/v1/deployments/refused"+query, n.Token(), body)
			var e api.ErrorBody
			if code != 400 || json.Unmarshal([]byte(resp), &e) != nil || e.Error.Field != r.Field || !strings.Contains(e.Error.Message, "only by case") {
				t.Errorf("%s%s: %d %s; want 400 naming %s", r.Name, query, code, resp, r.Field)
			}
			noSecret("the refusal of "+r.Name, resp)
		}
	}
	if code, _, _ := rawRequest(t, "GET", n.URL()+"/api/v1/deployments/refused", n.Token(), ""); code != 404 {
		t.Fatalf("a refused deployment exists (%d)", code)
	}

	// Every secret in its place: accepted.
	secrets := secrettest.Secrets()
	req := api.DeploymentRequest{Content: secrettest.Manifest(command, secrets), TargetCondition: "tags.line='secrets'", Priority: 10,
		Labels: map[string]string{"team": "plant"}}
	code, body, _ := rawRequest(t, "PUT", n.URL()+"/api/v1/deployments/secrets", n.Token(), mustJSON(req))
	if code != 201 {
		t.Fatalf("PUT: %d %s", code, body)
	}
	noSecret("PUT's answer", body)
	code, body, _ = rawRequest(t, "PATCH", n.URL()+"/api/v1/deployments/secrets", n.Token(), `{"priority": 11}`)
	if code != 200 {
		t.Fatalf("PATCH: %d %s", code, body)
	}
	noSecret("PATCH's answer", body)

	// A real agent runs the deployment's process module.
	agentCtx, stopAgent := context.WithCancel(ctx)
	ag, err := agent.New(agent.Config{
		Servers: []string{n.MQTTURL()}, DeviceID: "press-01", DeviceKey: key, DataDir: t.TempDir(),
		Runtime: agent.RuntimeProcess, Logger: slog.New(slog.NewTextHandler(agentLogs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- ag.Run(agentCtx) }()
	t.Cleanup(func() {
		stopAgent()
		<-agentDone
	})
	ran := waitEnvFile(t, envFile)
	for _, s := range secrets {
		if s.Placement == secrettest.Env && ran[s.Name] != s.Value {
			t.Errorf("the module runs %s=%q; want the planted %q", s.Name, ran[s.Name], s.Value)
		}
	}
	waitForReport(t, c, "press-01", "secrets")

	// Everything a reader gets: the API, the dashboard's reads (the same
	// routes with the dashboard's queries), history, metrics.
	waitFor(t, "history written", func() bool {
		dep, _ := c.DeploymentHistory(ctx, "secrets", 0)
		dev, _ := c.DeviceHistory(ctx, "press-01", 0)
		return len(dep.Items) >= 2 && len(dev.Items) >= 1
	})
	deployment := get("/api/v1/deployments/secrets")
	for _, path := range []string{
		"/api/v1/deployments/secrets", "/api/v1/deployments/secrets?consistent=true", "/api/v1/deployments",
		"/api/v1/deployments?limit=500", "/api/v1/deployments?label=team=plant",
		"/api/v1/deployments/secrets/status?limit=1000", "/api/v1/deployments/secrets/status?limit=1",
		"/api/v1/devices", "/api/v1/devices?limit=100", "/api/v1/devices/press-01",
		"/api/v1/deployments/secrets/history", "/api/v1/devices/press-01/history",
		"/api/v1/overview", "/metrics",
	} {
		noSecret("GET "+path, get(path))
	}

	// The agent never runs a variable the API shows in clear, unless it is
	// not a secret; and each secret is shown redacted where it is.
	var view api.DeploymentView
	if err := json.Unmarshal([]byte(deployment), &view); err != nil {
		t.Fatal(err)
	}
	var shown struct {
		ModulesContent struct {
			Agent struct {
				Desired struct {
					Modules map[string]struct {
						Env map[string]struct {
							Value any `json:"value"`
						} `json:"env"`
					} `json:"modules"`
				} `json:"properties.desired"`
			} `json:"$edgeAgent"`
		} `json:"modulesContent"`
	}
	if err := json.Unmarshal(view.Content, &shown); err != nil {
		t.Fatal(err)
	}
	shownEnv := shown.ModulesContent.Agent.Desired.Modules[secrettest.EnvModule].Env
	checked := 0
	for name, value := range ran {
		s, ok := shownEnv[name]
		if !ok {
			continue // PATH, IOTEDGE_*: the agent's own
		}
		checked++
		secret := fleet.IsSecretName(name) || fleet.IsSecretValue(value)
		switch {
		case s.Value == fleet.Redacted && !secret:
			t.Errorf("%s=%q is hidden, though not a secret", name, value)
		case s.Value != fleet.Redacted && (secret || s.Value != value):
			t.Errorf("the module runs %s=%q; the API shows %v", name, value, s.Value)
		}
	}
	if checked != len(shownEnv) || checked < len(secrettest.Names) {
		t.Errorf("compared %d variables of %d shown", checked, len(shownEnv))
	}

	stopAgent()
	if err := <-agentDone; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("agent: %v", err)
	}
	agentDone <- nil // for the cleanup
	noSecret("the node's logs", nodeLogs.String())
	noSecret("the agent's logs", agentLogs.String())
}

// waitEnvFile waits for the module's dump of its environment and parses it.
func waitEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	var data []byte
	waitFor(t, "the module writes its environment", func() bool {
		var err error
		data, err = os.ReadFile(path)
		return err == nil
	})
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			env[k] = v
		}
	}
	return env
}

// waitForReport waits until the device reports the deployment applied.
func waitForReport(t *testing.T, c *api.Client, deviceID, deployment string) {
	t.Helper()
	waitFor(t, deviceID+" reports "+deployment, func() bool {
		d, err := c.Device(context.Background(), deviceID, false)
		var r fleet.ReportedDocument
		return err == nil && d.Reported != nil && json.Unmarshal(d.Reported.Document, &r) == nil && r.DeploymentID == deployment
	})
}
