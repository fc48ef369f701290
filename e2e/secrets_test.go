//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"appliance/internal/secrettest"
)

// TestCLI_SecretsHidden is issue 13's redaction table through the CLI, with
// real processes: every secret of the shared list (in module env, Docker
// create options and module twins, from a manifest file and from an
// iotedgedev template whose values come from --env-file) is hidden from
// every command's table and JSON, from the node's log and from the agent's;
// every manifest key spelled with another case is refused with one line
// naming its path, without the secret. The agent takes its key from a file
// (--device-key-file), so the key is not in its command line, and runs each
// env secret as planted.
func TestCLI_SecretsHidden(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	work := t.TempDir()
	write := func(name string, data []byte) string {
		t.Helper()
		p := filepath.Join(work, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	noSecret := func(what, text string) {
		t.Helper()
		if i := strings.Index(text, secrettest.Marker); i >= 0 {
			t.Errorf("%s shows a secret: ...%s...", what, text[max(0, i-120):min(len(text), i+40)])
		}
	}
	run := func(args ...string) result {
		t.Helper()
		r := cli(t, dir, args...).mustSucceed(t)
		noSecret(strings.Join(args, " "), r.stdout+r.stderr)
		return r
	}

	envFile := filepath.Join(work, "module-env")
	command := []string{"/bin/sh", "-c", "env > " + envFile + ".tmp && mv " + envFile + ".tmp " + envFile + " && exec sleep 600"}
	for i, r := range secrettest.Refusals(command) {
		f := write(fmt.Sprintf("refused-%d.json", i), r.Content)
		res := cli(t, dir, "deployment", "create", fmt.Sprintf("refused-%d", i), "--content", f, "--target-condition", "*")
		res.mustFailWithOneLine(t, r.Field, "only by case")
		noSecret("the refusal of "+r.Name, res.stderr)
	}

	r := run("device", "create", "press-01", "--tag", "line=secrets", "-o", "json")
	var dev struct {
		Authentication struct {
			SymmetricKey struct{ PrimaryKey string }
		}
	}
	if err := json.Unmarshal([]byte(r.stdout), &dev); err != nil || dev.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("device create: %v\n%s", err, r.stdout)
	}
	keyFile := write("device-key", []byte(dev.Authentication.SymmetricKey.PrimaryKey+"\n"))

	secrets := secrettest.Secrets()
	manifest := write("secrets.json", secrettest.Manifest(command, secrets))
	run("deployment", "create", "secrets", "--content", manifest, "--target-condition", "tags.line='secrets'", "--priority", "10", "--label", "team=plant")
	// An iotedgedev template: the secrets come from --env-file, in env and
	// in createOptions written as an object.
	template := write("deployment.template.json", []byte(`{"modulesContent": {
  "$edgeAgent": {"properties.desired": {
    "schemaVersion": "1.1",
    "runtime": {"type": "docker", "settings": {"registryCredentials": {"acr": {"username": "$CONTAINER_REGISTRY_USERNAME", "password": "$CONTAINER_REGISTRY_PASSWORD", "address": "acr.local"}}}},
    "systemModules": {
      "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5"}},
      "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5"}}},
    "modules": {"historian": {"type": "docker", "status": "running", "restartPolicy": "always",
      "env": {"SESSION_SECRET": {"value": "${SESSION_SECRET}"}, "IOTHUB_CS": {"value": "${IOTHUB_CS}"}},
      "settings": {"image": "acr.local/historian:1", "createOptions": {"Env": ["GITHUB_PAT=${GITHUB_PAT}", "MODE=fast"]}}}}}},
  "$edgeHub": {"properties.desired": {"schemaVersion": "1.1", "routes": {}}},
  "historian": {"properties.desired": {"hmacKey": "${HMAC_KEY}"}}}}`))
	env := write(".env", []byte(strings.Join([]string{
		"CONTAINER_REGISTRY_USERNAME=deployer", "CONTAINER_REGISTRY_PASSWORD=" + secrettest.Marker + "T1",
		"SESSION_SECRET=" + secrettest.Marker + "T2", "IOTHUB_CS=HostName=h;DeviceId=d;SharedAccessKey=" + secrettest.Marker + "T3",
		"GITHUB_PAT=" + secrettest.Marker + "T4", "HMAC_KEY=" + secrettest.Marker + "T5", ""}, "\n")))
	run("deployment", "create", "from-template", "--content", template, "--env-file", env, "--target-condition", "tags.line='none'", "--priority", "1", "-o", "json")

	ag := startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-01", "--device-key-file", keyFile, "--data-dir", t.TempDir())
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", ag.cmd.Process.Pid))
	if err == nil && strings.Contains(string(cmdline), dev.Authentication.SymmetricKey.PrimaryKey) {
		t.Errorf("the device key is in the agent's command line")
	}
	eventually(t, "the module writes its environment", 30*time.Second, func() bool {
		_, err := os.Stat(envFile)
		return err == nil
	})
	ran, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secrets {
		if s.Placement == secrettest.Env && !strings.Contains(string(ran), "\n"+s.Name+"="+s.Value+"\n") && !strings.HasPrefix(string(ran), s.Name+"="+s.Value+"\n") {
			t.Errorf("the module does not run %s as planted", s.Name)
		}
	}
	eventually(t, "press-01 reports the deployment", 30*time.Second, func() bool {
		doc, _ := reported(t, dir, "press-01")
		return doc.DeploymentID == "secrets"
	})
	eventually(t, "history is written", 30*time.Second, func() bool {
		r := cli(t, dir, "device", "history", "press-01", "-o", "json")
		return r.code == 0 && strings.Contains(r.stdout, "secrets")
	})

	for _, id := range []string{"secrets", "from-template"} {
		for _, o := range []string{"table", "json"} {
			run("deployment", "show", id, "-o", o)
			run("deployment", "history", id, "-o", o)
			run("deployment", "status", id, "-o", o)
		}
	}
	for _, o := range []string{"table", "json"} {
		run("deployment", "list", "-o", o)
		run("deployment", "list", "--label", "team=plant", "-o", o)
		run("device", "show", "press-01", "-o", o)
		run("device", "list", "-o", o)
		run("device", "history", "press-01", "-o", o)
	}
	// The JSON shows each secret redacted in its place.
	var shown struct {
		Content struct {
			ModulesContent struct {
				Agent struct {
					Desired struct {
						Runtime struct {
							Settings struct {
								RegistryCredentials map[string]map[string]string `json:"registryCredentials"`
							} `json:"settings"`
						} `json:"runtime"`
						Modules map[string]struct {
							Env      map[string]map[string]any `json:"env"`
							Settings map[string]string         `json:"settings"`
						} `json:"modules"`
					} `json:"properties.desired"`
				} `json:"$edgeAgent"`
				Historian struct {
					Desired map[string]any `json:"properties.desired"`
				} `json:"historian"`
			} `json:"modulesContent"`
		} `json:"content"`
	}
	show := run("deployment", "show", "from-template", "-o", "json").stdout
	if err := json.Unmarshal([]byte(show), &shown); err != nil {
		t.Fatal(err)
	}
	mc := shown.Content.ModulesContent
	historian := mc.Agent.Desired.Modules["historian"]
	for what, got := range map[string]any{
		"registry password":   mc.Agent.Desired.Runtime.Settings.RegistryCredentials["acr"]["password"],
		"env SESSION_SECRET":  historian.Env["SESSION_SECRET"]["value"],
		"env IOTHUB_CS":       historian.Env["IOTHUB_CS"]["value"],
		"module twin hmacKey": mc.Historian.Desired["hmacKey"],
	} {
		if got != "<redacted>" {
			t.Errorf("%s shown as %v", what, got)
		}
	}
	if opts := historian.Settings["createOptions"]; !strings.Contains(opts, `"GITHUB_PAT=<redacted>"`) || !strings.Contains(opts, `"MODE=fast"`) {
		t.Errorf("createOptions shown as %s", opts)
	}
	if user := mc.Agent.Desired.Runtime.Settings.RegistryCredentials["acr"]["username"]; user != "deployer" {
		t.Errorf("registry user shown as %q", user)
	}

	ag.kill()
	noSecret("the agent's log", ag.logs.String())
	noSecret("the node's log", srv.logs.String())
}
