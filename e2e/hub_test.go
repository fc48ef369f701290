//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/pysdk"
	"appliance/internal/testcontroller"
	"appliance/linelog"
)

// hubManifest is a deployment of modules (name → module) with routes.
func hubManifest(modules map[string]any, routes map[string]any) []byte {
	var c map[string]map[string]any
	if err := json.Unmarshal(edgeManifest(modules), &c); err != nil {
		panic(err)
	}
	mc := c["modulesContent"]
	mc["$edgeHub"] = map[string]any{"properties.desired": map[string]any{"schemaVersion": "1.1", "routes": routes,
		"storeAndForwardConfiguration": map[string]any{"timeToLiveSecs": 7200}}}
	b, _ := json.Marshal(mc)
	return b
}

// pyProcessModule runs one of agent/testdata/pymodules with the Azure IoT
// Python SDK as a process module.
func pyProcessModule(t *testing.T, script string, env map[string]string) map[string]any {
	python, sdk := pysdk.Find(t)
	path, _ := filepath.Abs(filepath.Join("..", "agent", "testdata", "pymodules", script))
	e := map[string]any{"PYTHONPATH": map[string]any{"value": sdk}}
	for k, v := range env {
		e[k] = map[string]any{"value": v}
	}
	return map[string]any{"type": "process", "status": "running", "restartPolicy": "always", "env": e,
		"settings": map[string]any{"command": []string{python, "-u", path}}}
}

// moduleOutput reads what a module printed on stdout (JSON lines) that
// has key, from the output log the agent keeps for it in its data
// directory (never the agent's own log).
func moduleOutput(dataDir, module, key string) []map[string]any {
	if !filepath.IsAbs(dataDir) {
		// A log's text or "" passed by mistake reads as an empty, missing
		// file: every count would be 0.
		panic(fmt.Sprintf("moduleOutput: %q is not an agent's data directory", dataDir))
	}
	res, err := linelog.Read(filepath.Join(dataDir, "logs", "modules", module+".log"), linelog.Filter{})
	if err != nil {
		panic(err)
	}
	var out []map[string]any
	for _, e := range res.Entries {
		if e.Stream != "stdout" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(e.Text), &m) == nil {
			if _, ok := m[key]; ok {
				out = append(out, m)
			}
		}
	}
	return out
}

// (f) Messages a module sent (acknowledged by the hub) while the controller
// was away are on the device's disk: the agent SIGKILLed and started again
// delivers every one, in order.
func TestHub_AgentKilledWithQueuedMessages(t *testing.T) {
	pysdk.Find(t)
	ctl := testcontroller.Start(t, "hub-kill-01", slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	modules := map[string]any{"a": pyProcessModule(t, "sender.py", map[string]string{"SEND_COUNT": "200", "SEND_INTERVAL": "0.01"})}
	routes := map[string]any{"up": `FROM /messages/modules/a/* INTO $upstream`}
	ctl.SetDesired(fleet.DesiredDocument{Version: 1, DeploymentID: "d1", ModulesContent: hubManifest(modules, routes)})
	dataDir := t.TempDir()
	args := []string{"--server", ctl.URL(), "--device-id", "hub-kill-01", "--device-key", "k", "--data-dir", dataDir,
		"--hub-addr", testcontroller.FreeGateway(t) + ":8883", "--log-format", "json"}
	// The controller is away from the start of the sending: everything
	// waits on the device.
	ag := startAgent(t, args...)
	ctl.WaitReport(60*time.Second, "the agent running the deployment", func(d fleet.ReportedDocument) bool { return d.LastDesiredVersion == 1 })
	ctl.Stop()
	eventually(t, "the module to send 200 messages", 120*time.Second, func() bool {
		return len(moduleOutput(dataDir, "a", "done")) == 1
	})
	sent := moduleOutput(dataDir, "a", "sent")
	ag.kill()
	if len(sent) != 200 {
		t.Fatalf("the module printed %d sends", len(sent))
	}

	ctl.Resume()
	startAgent(t, args...)
	eventually(t, "the queued messages to reach the controller", 120*time.Second, func() bool {
		return len(testcontroller.MessageIDs(t, ctl.Upstream())) >= 200
	})
	got := testcontroller.MessageIDs(t, ctl.Upstream())
	for i, l := range sent {
		if got[i] != l["sent"] {
			t.Fatalf("message %d: the controller got %s; the module sent %s", i, got[i], l["sent"])
		}
	}
	t.Logf("all 200 messages acknowledged before the SIGKILL arrived after the restart (%d batches)", ctl.Batches())
}
