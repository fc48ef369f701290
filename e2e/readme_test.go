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

	"appliance/internal/testenv"
	"appliance/internal/testutil"
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
	testenv.LookPath(t, "make", "apt-get install make")
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

// TestReadmeMakeCluster runs `make cluster` as the README's "Three nodes"
// section tells a newcomer to, on ports the test picks (CLUSTER_PORTS):
// three nodes join, the simulated devices enroll and apply the demo
// deployment, any node answers for the cluster, and Ctrl-C stops it all.
func TestReadmeMakeCluster(t *testing.T) {
	testenv.LookPath(t, "make", "apt-get install make")
	var list []string
	for range 9 {
		_, port, _ := strings.Cut(testutil.FreeAddr(t, "127.0.0.1"), ":")
		list = append(list, port)
	}
	dir := t.TempDir()
	run := exec.Command("make", "cluster")
	run.Dir = ".."
	run.Env = append(os.Environ(), "CLUSTER_DIR="+dir, "CLUSTER_PORTS="+strings.Join(list, " "), "DEVICES=20")
	logs := &syncBuffer{}
	run.Stdout, run.Stderr = logs, logs
	run.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- run.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			syscall.Kill(-run.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("make cluster output:\n%s", logs.String())
		}
	})
	eventually(t, "make cluster says the cluster runs", 3*time.Minute, func() bool {
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("make cluster ended: %v", err)
		default:
		}
		return strings.Contains(logs.String(), "Three nodes and 20 simulated devices are running")
	})
	// What the script's message suggests: talk to n2 (any node serves).
	n2 := filepath.Join(dir, "n2")
	r := cli(t, n2, "cluster", "members", "-o", "json").mustSucceed(t)
	for _, id := range []string{`"n1"`, `"n2"`, `"n3"`} {
		if !strings.Contains(r.stdout, id) {
			t.Fatalf("cluster members on n2 lacks %s:\n%s", id, r.stdout)
		}
	}
	eventually(t, "the 20 simulated devices apply demo-v1", time.Minute, func() bool {
		r := cli(t, n2, "deployment", "show", "demo-v1", "-o", "json")
		return r.code == 0 && strings.Contains(r.stdout, `"appliedCount": 20`)
	})

	// Ctrl-C: the whole process group gets the signal; everything stops.
	syscall.Kill(-run.Process.Pid, syscall.SIGINT)
	select {
	case <-exited:
		stopped = true
	case <-time.After(30 * time.Second):
		t.Fatal("make cluster did not stop within 30 s of Ctrl-C")
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		b, err := os.ReadFile(filepath.Join(dir, id+".log"))
		if err != nil || !strings.Contains(string(b), "shutting down") || strings.Contains(string(b), "second signal") {
			t.Errorf("%s did not shut down gracefully: %v; its log:\n%s", id, err, b)
		}
	}
}
