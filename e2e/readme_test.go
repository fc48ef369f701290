//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tourCommands returns the shell commands of the README's CLI tour (between
// the tour markers), with backslash continuations joined.
func tourCommands(t *testing.T) []string {
	t.Helper()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "<!-- tour:begin -->")
	tour, _, ok2 := strings.Cut(rest, "<!-- tour:end -->")
	if !ok || !ok2 {
		t.Fatal("README.md has no tour markers")
	}
	var cmds []string
	cur := ""
	for _, line := range strings.Split(tour, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "```") || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cur += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		cmds = append(cmds, cur+line)
		cur = ""
	}
	return cmds
}

// TestReadmeQuickStart does what the README tells a newcomer: `make run` in
// one shell, the CLI tour in another. Only the listen addresses and the data
// directory are moved (through their environment variables) so the test
// never touches fixed ports or the user's home.
func TestReadmeQuickStart(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed")
	}
	dataDir := t.TempDir()
	env := append(os.Environ(),
		"APPLIANCE_DATA_DIR="+dataDir,
		"APPLIANCE_HTTP_ADDR=127.0.0.1:0",
		"APPLIANCE_RAFT_ADDR=127.0.0.1:0",
		"APPLIANCE_MQTT_ADDR=127.0.0.1:0",
	)
	run := exec.Command("make", "run")
	run.Dir = ".."
	run.Env = env
	logs := &syncBuffer{}
	run.Stdout, run.Stderr = logs, logs
	run.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{t: t, dataDir: dataDir, cmd: run, logs: logs}
	s.watch()
	t.Cleanup(func() {
		// Ctrl-C in the terminal: the whole process group gets the signal.
		syscall.Kill(-run.Process.Pid, syscall.SIGINT)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			syscall.Kill(-run.Process.Pid, syscall.SIGKILL)
			<-s.exited
		}
		if t.Failed() {
			t.Logf("make run output:\n%s", logs.String())
		}
	})
	s.waitReady() // make run builds first: waitReady allows for a cold cache
	if !strings.Contains(logs.String(), filepath.Join(dataDir, "admin-token")) {
		t.Fatalf("make run did not print where the admin token is:\n%s", logs.String())
	}

	outputs := map[string]string{}
	for _, c := range tourCommands(t) {
		cmd := exec.Command("bash", "-c", c)
		cmd.Dir = ".."
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("README command failed: %s\n%v\n%s", c, err, out)
		}
		outputs[c] = string(out)
	}
	find := func(prefix string) string {
		for c, out := range outputs {
			if strings.HasPrefix(c, prefix) {
				return out
			}
		}
		t.Fatalf("the tour has no %q", prefix)
		return ""
	}
	if out := find("./bin/appliance device list"); !strings.Contains(out, "press-01") || !strings.Contains(out, "press-02") || !strings.Contains(out, "presses-v1") {
		t.Fatalf("device list does not show both devices and the applied deployment:\n%s", out)
	}
	if out := find("./bin/appliance deployment list"); !strings.Contains(out, "presses-v1") {
		t.Fatalf("deployment list:\n%s", out)
	}
	show := find("./bin/appliance deployment show presses-v1 -o json")
	if !strings.Contains(show, `"targetedCount": 2`) || !strings.Contains(show, "<redacted>") || strings.Contains(show, `"password": "password"`) {
		t.Fatalf("deployment show after widening the condition:\n%s", show)
	}
}
