//go:build e2e

package e2e

import (
	"archive/zip"
	"bufio"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/secrettest"
)

// tickerScript is the module of TestRemoteTroubleshooting: it says its
// pid, prints its environment (the deployment's secrets among it), then a
// numbered line every 200 ms.
const tickerScript = `echo "started pid $$"; env; i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.2; done`

var (
	tickLine    = regexp.MustCompile(`^tick (\d+)$`)
	startedLine = regexp.MustCompile(`^started pid (\d+)$`)
)

// TestRemoteTroubleshooting (issue 18, acceptance 2), with a real agent
// running a real process module whose environment holds the deployment's
// secrets: `device logs` shows its recent lines and --follow streams the
// new ones, each once and in order; `restart-module` gives it a new
// process and the device's history records it; the support bundle holds
// the agent's log, the module's output, the report and the desired
// document, and none of the manifest's secrets; the module's output never
// reaches the agent's log; and once the agent is gone, `ping` fails with
// the clear error a device that is not connected gets (404).
func TestRemoteTroubleshooting(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	token := enrollmentToken(t, dir, "line-7", "line=7")
	agentDir := t.TempDir()
	ag := startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-07",
		"--enroll-token", token, "--data-dir", agentDir)

	secrets := secrettest.Secrets()
	content := secrettest.Manifest([]string{"/bin/sh", "-c", tickerScript}, secrets)
	manifest := filepath.Join(t.TempDir(), "manifest.json")
	if err := os.WriteFile(manifest, content, 0o600); err != nil {
		t.Fatal(err)
	}
	cli(t, dir, "deployment", "create", "press-line", "--content", manifest, "--target-condition", "tags.line=7", "--priority", "1").mustSucceed(t)
	module := secrettest.EnvModule
	eventually(t, "the module running on press-07", time.Minute, func() bool {
		d, err := srv.client().Device(context.Background(), "press-07", false)
		if err != nil || d.Reported == nil {
			return false
		}
		var rep fleet.ReportedDocument
		return json.Unmarshal(d.Reported.Document, &rep) == nil && rep.Modules[module].RuntimeStatus == fleet.RuntimeRunning
	})

	// device logs: the recent lines, redacted.
	var recent []string
	eventually(t, "five ticks in `device logs --tail 5`", time.Minute, func() bool {
		r := cli(t, dir, "device", "logs", "press-07", module, "--tail", "5")
		recent = strings.Split(strings.TrimSpace(r.stdout), "\n")
		return r.code == 0 && len(recent) == 5 && tickLine.MatchString(recent[0]) && tickLine.MatchString(recent[4])
	})
	if n0, n4 := tickOf(recent[0]), tickOf(recent[4]); n4 != n0+4 {
		t.Errorf("device logs --tail 5: %q, want five consecutive ticks", recent)
	}
	all := cli(t, dir, "device", "logs", "press-07", module, "--since", "1h").mustSucceed(t).stdout
	for k, v := range secrettest.Harmless {
		if !strings.Contains(all, k+"="+v+"\n") {
			t.Errorf("device logs lacks the module's %s=%s line", k, v)
		}
	}
	noSecrets(t, "device logs", all)

	// --follow: new lines as they are written, none twice, none missed.
	follow := startFollow(t, dir, "press-07", module)
	ticks := follow.ticks(t, 10)
	follow.stop(t)
	for i := 1; i < len(ticks); i++ {
		if ticks[i] != ticks[i-1]+1 {
			t.Fatalf("device logs --follow printed ticks %v: not each once, in order", ticks)
		}
	}
	if ticks[len(ticks)-1] <= tickOf(recent[4])+5 {
		t.Errorf("--follow printed ticks %v: none newer than what it started from (%s)", ticks, recent[4])
	}

	// restart-module: a new process, in the device's history.
	firstPid := pidsOf(t, dir, module)[0]
	cli(t, dir, "device", "restart-module", "press-07", module).mustSucceed(t)
	var pids []int
	eventually(t, "the module's second start in its logs", time.Minute, func() bool {
		pids = pidsOf(t, dir, module)
		return len(pids) == 2
	})
	if pids[1] == firstPid || processAlive(firstPid) || !processAlive(pids[1]) {
		t.Errorf("pids %v (first alive %v, second alive %v): want a new process", pids, processAlive(firstPid), processAlive(pids[1]))
	}
	var hist []struct{ Kind, Actor, What string }
	eventually(t, "the restart in the device's history", time.Minute, func() bool {
		r := cli(t, dir, "device", "history", "press-07", "-o", "json")
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &hist) == nil && len(hist) > 0 && hist[0].Kind == "module-restarted"
	})
	if hist[0].Actor != "admin" || hist[0].What != "module "+module+" restarted by the operator (RestartModule)" {
		t.Errorf("history: %+v", hist[0])
	}

	// ping, and the support bundle.
	if r := cli(t, dir, "device", "ping", "press-07").mustSucceed(t); !strings.HasPrefix(r.stdout, "device press-07 answered in ") {
		t.Errorf("ping: %q", r.stdout)
	}
	bundle := filepath.Join(t.TempDir(), "press-07.zip")
	cli(t, dir, "device", "support-bundle", "press-07", "--out", bundle).mustSucceed(t)
	files := unzipAll(t, bundle)
	for _, want := range []string{"device.json", "reported.json", "desired.json", "logs/edgeAgent.log", "logs/" + module + ".log"} {
		if _, ok := files[want]; !ok {
			t.Errorf("the bundle lacks %s (it holds %d files)", want, len(files))
		}
	}
	if !strings.Contains(files["logs/"+module+".log"], " stdout tick ") || !strings.Contains(files["logs/"+module+".log"], " stdout LOG_LEVEL=debug") ||
		!strings.Contains(files["logs/edgeAgent.log"], "module restarted by a RestartModule direct method") {
		t.Errorf("the bundle's logs lack the module's lines or the agent's")
	}
	for name, text := range files {
		noSecrets(t, "the bundle's "+name, text)
	}
	if st, err := os.Stat(bundle); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the bundle file: %v %v", st, err)
	}

	// The module's output went to its own log, never the agent's.
	agentLog, err := os.ReadFile(filepath.Join(agentDir, "logs", "edgeAgent.log"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(agentLog), "tick ") || strings.Contains(ag.logs.String(), "tick ") {
		t.Errorf("the module's output reached the agent's log")
	}
	noSecrets(t, "the agent's log file", string(agentLog))

	// The agent gone: ping fails with the error a device that is not
	// connected gets, and says so in one line.
	ag.cmd.Process.Signal(syscall.SIGINT)
	<-ag.exited
	eventually(t, "press-07 disconnected", time.Minute, func() bool {
		d, err := srv.client().Device(context.Background(), "press-07", false)
		return err == nil && d.ConnectionState == api.Disconnected
	})
	cli(t, dir, "device", "ping", "press-07").mustFailWithOneLine(t, "device press-07 is not connected to any node of the cluster", "status 404")
	cli(t, dir, "device", "logs", "press-07", module).mustFailWithOneLine(t, "not connected", "status 404")
}

func tickOf(line string) int {
	m := tickLine.FindStringSubmatch(line)
	if m == nil {
		return -1
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// pidsOf reads the pids a module said it started with, from its logs.
func pidsOf(t *testing.T, dir, module string) []int {
	t.Helper()
	r := cli(t, dir, "device", "logs", "press-07", module, "--since", "1h")
	var pids []int
	for _, l := range strings.Split(r.stdout, "\n") {
		if m := startedLine.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			pids = append(pids, n)
		}
	}
	return pids
}

// noSecrets fails for every line of text that holds one of the manifest's
// secrets (each planted value holds secrettest.Marker).
func noSecrets(t *testing.T, what, text string) {
	t.Helper()
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, secrettest.Marker) {
			t.Errorf("%s holds a secret: %.200s", what, l)
		}
	}
}

func unzipAll(t *testing.T, path string) map[string]string {
	t.Helper()
	zr, err := zip.OpenReader(path)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
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
	return files
}

// follower is `appliance device logs --follow` running.
type follower struct {
	cmd   *exec.Cmd
	lines chan string
	done  chan error
}

func startFollow(t *testing.T, dir, device, module string) *follower {
	t.Helper()
	cmd := exec.Command(binary, "device", "logs", device, module, "--tail", "1", "--follow")
	cmd.Env = append(os.Environ(), "APPLIANCE_DATA_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var errb syncBuffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f := &follower{cmd: cmd, lines: make(chan string, 1000), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f.lines <- sc.Text()
		}
		close(f.lines)
		f.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("device logs --follow stderr:\n%s", errb.String())
		}
	})
	return f
}

// ticks returns the tick numbers of the lines printed, until n more ticks
// came after the first.
func (f *follower) ticks(t *testing.T, n int) []int {
	t.Helper()
	var ticks []int
	deadline := time.After(2 * time.Minute)
	for len(ticks) <= n {
		select {
		case l, ok := <-f.lines:
			if !ok {
				t.Fatalf("device logs --follow ended: %v (ticks %v)", <-f.done, ticks)
			}
			if k := tickOf(l); k >= 0 {
				ticks = append(ticks, k)
			}
		case <-deadline:
			t.Fatalf("device logs --follow printed only ticks %v", ticks)
		}
	}
	return ticks
}

// stop interrupts it as Ctrl-C does: it exits 0.
func (f *follower) stop(t *testing.T) {
	t.Helper()
	f.cmd.Process.Signal(syscall.SIGINT)
	for range f.lines {
	}
	select {
	case err := <-f.done:
		if err != nil {
			t.Errorf("device logs --follow after Ctrl-C: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("device logs --follow did not exit after Ctrl-C")
	}
}

// TestDashboard_Troubleshooting: the same actions from a device's page, in
// headless Chromium, against a real agent running a real process module:
// ping the agent, read the module's last lines and follow new ones (each
// once, in order), restart it (and see the restart in the page's
// history), download a support bundle; then, the agent gone, the ping's
// error says the device is not connected. Driven by the keyboard where a
// person would (Enter on a focused button).
func TestDashboard_Troubleshooting(t *testing.T) {
	ctx := browser(t)
	dir := t.TempDir()
	srv := startServer(t, dir)
	ag := startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "press-08",
		"--enroll-token", enrollmentToken(t, dir, "line-8", "line=8"), "--data-dir", t.TempDir())
	manifest := filepath.Join(t.TempDir(), "manifest.json")
	content := edgeManifest(map[string]any{"ticker": map[string]any{"type": "process", "status": "running", "restartPolicy": "always",
		"settings": map[string]any{"command": []string{"/bin/sh", "-c", tickerScript}}}})
	if err := os.WriteFile(manifest, content, 0o600); err != nil {
		t.Fatal(err)
	}
	cli(t, dir, "deployment", "create", "line-8", "--content", manifest, "--target-condition", "tags.line=8").mustSucceed(t)
	eventually(t, "ticker's tenth line", time.Minute, func() bool {
		r := cli(t, dir, "device", "logs", "press-08", "ticker", "--tail", "1")
		return r.code == 0 && tickOf(strings.TrimSpace(r.stdout)) >= 10
	})

	run(t, ctx, "sign in and open press-08",
		chromedp.EmulateViewport(1280, 900),
		chromedp.Navigate(dashboardURL(t, srv)+"/ui/#/devices/press-08"),
		chromedp.WaitVisible(chromedp.ID("login-token")),
		chromedp.SendKeys(chromedp.ID("login-token"), srv.token),
		chromedp.Click(chromedp.ID("login-submit")),
		chromedp.WaitVisible(chromedp.ID("device-troubleshooting")))
	waitJS[bool](t, ctx, "ticker in the module list", `!!document.querySelector('#ts-module option[value="ticker"]')`)

	run(t, ctx, "ping by keyboard", chromedp.Focus(chromedp.ID("ts-ping")), chromedp.KeyEvent("\r"))
	if got := waitJS[string](t, ctx, "the ping's answer", `document.getElementById("ts-ping-result").dataset.result`); got != "answered" {
		t.Fatalf("ping: %s", got)
	}

	actions := []chromedp.Action[chromedp.Void]{chromedp.Evaluate[chromedp.Void](`(s => { s.value = "ticker"; s.dispatchEvent(new Event("change", {bubbles: true})); })(document.getElementById("ts-module"))`)}
	actions = append(actions, typeInto("#ts-tail", "5")...)
	actions = append(actions, chromedp.Focus(chromedp.ID("ts-show")), chromedp.KeyEvent("\r"))
	run(t, ctx, "show ticker's last 5 lines", actions...)
	shown := waitJS[[]string](t, ctx, "five lines of ticker", `(() => { const o = document.getElementById("ts-log-output");
		return o.dataset.module === "ticker" && o.dataset.lines === "5" ? [...o.querySelectorAll(".log-line")].map(l => l.textContent.trim()) : null; })()`)
	for i, l := range shown {
		if tickOf(l) < 0 || (i > 0 && tickOf(l) != tickOf(shown[i-1])+1) {
			t.Fatalf("the last 5 lines: %q", shown)
		}
	}
	run(t, ctx, "follow", chromedp.Click(chromedp.ID("ts-follow")))
	followed := waitJS[[]string](t, ctx, "ten more lines followed", `(() => { const o = document.getElementById("ts-log-output");
		return Number(o.dataset.lines) >= 15 ? [...o.querySelectorAll(".log-line")].map(l => l.textContent.trim()) : null; })()`)
	run(t, ctx, "stop following", chromedp.Click(chromedp.ID("ts-follow")))
	for i := 1; i < len(followed); i++ {
		if tickOf(followed[i]) != tickOf(followed[i-1])+1 {
			t.Fatalf("following printed %q: not each line once, in order", followed)
		}
	}
	screenshot(t, ctx, "device-troubleshooting-logs.png")
	pageIsUsable(t, ctx, "device page with its troubleshooting panel")

	// Restart (the confirmation accepted), then see it in the history.
	run(t, ctx, "restart ticker", chromedp.Evaluate[chromedp.Void](`window.confirm = () => true`), chromedp.Click(chromedp.ID("ts-restart")))
	if got := waitJS[string](t, ctx, "the restart's result", `document.getElementById("ts-restart-result").dataset.result`); got != "restarted" {
		t.Fatalf("restart: %s (%s)", got, waitJS[string](t, ctx, "its text", `document.getElementById("ts-restart-result").textContent`))
	}
	waitJS[bool](t, ctx, "the restart in the page's history", `!!document.querySelector('#device-history tr[data-kind="module-restarted"]')`)
	hist, err := srv.client().DeviceHistory(context.Background(), "press-08", 10)
	if err != nil || len(hist.Items) == 0 || hist.Items[0].Kind != "module-restarted" || !strings.Contains(hist.Items[0].What, "module ticker restarted") {
		t.Errorf("the API's history after the page's restart: %+v %v", hist.Items, err)
	}

	run(t, ctx, "support bundle", chromedp.Click(chromedp.ID("ts-bundle")))
	if got := waitJS[string](t, ctx, "the bundle downloaded", `document.getElementById("ts-bundle-status").dataset.result`); got != "downloaded" {
		t.Fatalf("bundle: %s (%s)", got, waitJS[string](t, ctx, "its text", `document.getElementById("ts-bundle-status").textContent`))
	}
	link := waitJS[map[string]string](t, ctx, "the bundle's link", `(() => { const a = document.getElementById("ts-bundle-link"); return {bytes: a.dataset.bytes, sha256: a.dataset.sha256, name: a.download}; })()`)
	if n, _ := strconv.Atoi(link["bytes"]); n < 100 || len(link["sha256"]) != 64 || !strings.HasSuffix(link["name"], ".zip") {
		t.Errorf("bundle link: %v", link)
	}
	screenshot(t, ctx, "device-troubleshooting-actions.png")

	// The agent gone: the page says why the ping fails.
	ag.cmd.Process.Signal(syscall.SIGINT)
	<-ag.exited
	eventually(t, "press-08 disconnected", time.Minute, func() bool {
		d, err := srv.client().Device(context.Background(), "press-08", false)
		return err == nil && d.ConnectionState == api.Disconnected
	})
	run(t, ctx, "ping again", chromedp.Click(chromedp.ID("ts-ping")))
	failed := waitJS[string](t, ctx, "the ping's failure", `(() => { const r = document.getElementById("ts-ping-result"); return r.dataset.result === "failed" ? r.textContent : null; })()`)
	if !strings.Contains(failed, "is not connected") {
		t.Errorf("the ping's error on the page: %q", failed)
	}
	screenshot(t, ctx, "device-troubleshooting-offline.png")
}
