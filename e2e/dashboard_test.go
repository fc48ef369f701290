//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"appliance/ui"
)

// artifactsDir holds what the e2e tests leave for a human (git-ignored; CI
// keeps it).
const artifactsDir = "artifacts"

// chromiumPath finds Debian's chromium. Without it the test skips, except
// in CI (CI set), where a missing browser is a broken runner.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, p := range []string{os.Getenv("CHROMIUM"), "/usr/bin/chromium"} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("chromium"); err == nil {
		return p
	}
	const msg = "no chromium: install Debian's chromium package (apt-get install -y chromium) or set CHROMIUM"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// dashboardURL is where the browser finds the dashboard and the API on one
// origin: the node itself once it mounts /ui/, else a test server that
// serves ui.Handler() and passes /api/ through to the node.
func dashboardURL(t *testing.T, srv *server) string {
	t.Helper()
	if resp, err := srv.httpClient().Get(srv.url + ui.Prefix); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && strings.Contains(string(body), `content="appliance-dashboard"`) {
			return srv.url
		}
	}
	target, err := url.Parse(srv.url)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(ui.Prefix, ui.Handler())
	mux.Handle("/", httputil.NewSingleHostReverseProxy(target))
	front := httptest.NewServer(mux)
	t.Cleanup(front.Close)
	t.Logf("the node does not serve %s; serving ui.Handler() in front of it at %s", ui.Prefix, front.URL)
	return front.URL
}

// browser starts headless chromium and returns a tab context. Console
// messages that mean the page is broken (an uncaught exception, a CSP
// violation, a request to elsewhere) fail the test at cleanup.
func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Headless,
		chromedp.NoSandbox, // root in a container
		// The node's certificate is from its own cluster CA, which this
		// throwaway profile does not trust (an operator imports the CA).
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.WindowSize(1400, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(allocCtx, chromedp.WithLogf(t.Logf))
	// The first Run starts the browser; it lives as long as ctx.
	if err := chromedp.Do(ctx); err != nil {
		cancelCtx()
		cancelAlloc()
		t.Fatalf("start chromium: %v", err)
	}
	var mu sync.Mutex
	var broken []string
	done := make(chan struct{})
	messages := chromedp.Console(ctx)
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.IsException() || m.Source == "security" || strings.Contains(m.Text, "Content Security Policy") {
				mu.Lock()
				broken = append(broken, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line))
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		cancelCtx()
		cancelAlloc()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, b := range broken {
			t.Errorf("browser console: %s", b)
		}
	})
	return ctx
}

// pageCounts reads every number the page tags with
// data-deployment=id and data-count, e.g. {"targeted": "5", ...}.
func pageCounts(ctx context.Context, id string) (map[string]string, error) {
	sel, _ := json.Marshal(fmt.Sprintf(`[data-deployment=%q][data-count]`, id))
	return chromedp.Run(ctx, chromedp.Evaluate[map[string]string](fmt.Sprintf(
		`Object.fromEntries([...document.querySelectorAll(%s)].map(e => [e.dataset.count, e.textContent.trim()]))`, sel)))
}

// waitCounts waits until the page shows want for deployment id (the page
// polls every 2 s and the evaluator converges in the background).
func waitCounts(t *testing.T, ctx context.Context, id string, want map[string]string) {
	t.Helper()
	var got map[string]string
	var err error
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		got, err = pageCounts(ctx, id)
		if err == nil && matches(got, want) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("deployment %s on the page: counts %v (err %v), want %v", id, got, err, want)
}

func matches(got, want map[string]string) bool {
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.MkdirAll(artifactsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	path, err := filepath.Abs(filepath.Join(artifactsDir, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// TestDashboard loads the operator dashboard in headless Chromium against a
// real node with devices, deployments and one live agent: a wrong token is
// refused, the right one shows each deployment's targeted and applied
// counts and health, a deployment's devices by category, and the devices
// with their tags and connection state. Screenshots go to e2e/artifacts/.
func TestDashboard(t *testing.T) {
	ctx := browser(t)
	dir := t.TempDir()
	srv := startServer(t, dir)

	// Five prod devices, two of them in the canary ring, two test devices,
	// and one live agent that enrolls as a prod canary.
	for _, d := range []struct{ id, tags string }{
		{"prod-01", "environment=prod,site=lyon"},
		{"prod-02", "environment=prod,site=lyon"},
		{"prod-03", "environment=prod,site=oslo"},
		{"prod-04", "environment=prod,site=oslo,ring=canary"},
		{"prod-05", "environment=prod,site=oslo,ring=canary"},
		{"test-01", "environment=test"},
		{"test-02", "environment=test"},
	} {
		args := []string{"device", "create", d.id}
		for _, tag := range strings.Split(d.tags, ",") {
			args = append(args, "--tag", tag)
		}
		cli(t, dir, args...).mustSucceed(t)
	}
	r := cli(t, dir, "enrollment", "create", "line-1", "--tag", "environment=prod", "--tag", "ring=canary", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	if err := json.Unmarshal([]byte(r.stdout), &enr); err != nil {
		t.Fatal(err)
	}
	startAgent(t, "--server", srv.mqttURL(), "--ca-file", srv.caFile(), "--device-id", "line-01", "--enroll-token", enr.Token, "--data-dir", t.TempDir())
	manifest := processManifest(t, t.TempDir(), map[string]map[string]any{"sensor": module("running", "always", nil)})
	cli(t, dir, "deployment", "create", "web-prod", "--content", manifest, "--target-condition", "tags.environment='prod'", "--priority", "10").mustSucceed(t)
	cli(t, dir, "deployment", "create", "web-canary", "--content", manifest, "--target-condition", "tags.ring='canary'", "--priority", "20").mustSucceed(t)
	cli(t, dir, "deployment", "create", "web-test", "--content", manifest, "--target-condition", "tags.environment='test'", "--priority", "5").mustSucceed(t)
	base := dashboardURL(t, srv)

	// A wrong token goes back to the login form with a message.
	err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/ui/"),
		chromedp.WaitVisible(chromedp.ID("login-token")),
		chromedp.SendKeys(chromedp.ID("login-token"), "not-the-token"),
		chromedp.Click(chromedp.ID("login-submit")),
	)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := chromedp.Run(ctx, chromedp.Poll[string](
		`document.getElementById("login").hidden ? "" : document.getElementById("login-message").textContent`,
		chromedp.WithPollingTimeout(15*time.Second)))
	if err != nil || !strings.Contains(msg, "401") {
		t.Fatalf("after a wrong token: login message %q, err %v", msg, err)
	}
	screenshot(t, ctx, "dashboard-login.png")

	// The right token shows the deployments.
	err = chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.ID("login-token"), srv.token),
		chromedp.Click(chromedp.ID("login-submit")),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-deployment="web-prod"]`)),
	)
	if err != nil {
		t.Fatal(err)
	}
	// web-prod matches the six prod devices but the canaries (prod-04,
	// prod-05, line-01) take the higher-priority web-canary.
	waitCounts(t, ctx, "web-prod", map[string]string{"targeted": "6", "applied": "3", "unknown": "3"})
	waitCounts(t, ctx, "web-test", map[string]string{"targeted": "2", "applied": "2", "unknown": "2"})
	// line-01 runs the module: soaking for the default 30 s, then healthy.
	deadline := time.Now().Add(60 * time.Second)
	for {
		got, err := pageCounts(ctx, "web-canary")
		if err == nil && got["targeted"] == "3" && got["applied"] == "3" && got["unknown"] == "2" &&
			(got["soaking"] == "1" || got["healthy"] == "1") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("web-canary on the page: %v (err %v), want 3 targeted, 3 applied, 2 unknown, 1 soaking or healthy", got, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	screenshot(t, ctx, "dashboard.png")

	// One deployment: its devices by category.
	err = chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(`a[data-deployment-link="web-canary"]`)),
		chromedp.WaitVisible(chromedp.CSS(`[data-category="unknown"] [data-device="prod-04"]`)),
		chromedp.WaitVisible(chromedp.CSS(`[data-category="applied"] [data-device="line-01"]`)),
	)
	if err != nil {
		t.Fatal(err)
	}
	waitCounts(t, ctx, "web-canary", map[string]string{"targeted": "3", "applied": "3", "unknown": "2"})
	screenshot(t, ctx, "dashboard-deployment.png")

	// Devices: tags, connection state and which deployment applies.
	err = chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(`a[data-nav="devices"]`)),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-device="test-02"]`)),
	)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := chromedp.Run(ctx, chromedp.Poll[map[string]string](`(() => {
		const s = (id) => document.querySelector('[data-device="' + id + '"][data-field="connectionState"]')?.textContent.trim();
		const applied = document.querySelector('[data-device="prod-01"][data-configuration="web-prod"]')?.dataset.status;
		return s("line-01") === "Connected" ? {line01: s("line-01"), prod01: s("prod-01"), prod01WebProd: applied} : null;
	})()`, chromedp.WithPollingTimeout(30*time.Second)))
	if err != nil {
		t.Fatalf("devices page: line-01 never shown Connected: %v", err)
	}
	if conn["prod01"] != "Disconnected" || conn["prod01WebProd"] != "Applied" {
		t.Fatalf("devices page: %v, want prod-01 Disconnected with web-prod Applied", conn)
	}
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("tr[data-device]").length`))
	if err != nil || rows != 8 {
		t.Fatalf("devices page: %d rows (err %v), want 8", rows, err)
	}
	screenshot(t, ctx, "dashboard-devices.png")

	// Logging out forgets the token.
	err = chromedp.Do(ctx, chromedp.Click(chromedp.ID("logout")), chromedp.WaitVisible(chromedp.ID("login-token")))
	if err != nil {
		t.Fatal(err)
	}
	if tok, err := chromedp.Run(ctx, chromedp.Evaluate[*string](`sessionStorage.getItem("appliance.adminToken")`)); err != nil || tok != nil {
		t.Fatalf("after logout the token is still stored: %v %v", tok, err)
	}
}
