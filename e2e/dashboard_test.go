//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testenv"
	"appliance/ui"
)

// artifactsDir holds what the e2e tests leave for a human (git-ignored; CI
// keeps it).
const artifactsDir = "artifacts"

// chromiumPath finds Debian's chromium. Without it the test skips, except
// under CI, where a missing browser is a broken runner (testenv).
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
	return testenv.LookPath(t, "chromium", "install Debian's chromium package (apt-get install -y chromium) or set CHROMIUM")
}

// dashboardURL is where the browser finds the dashboard: the node itself,
// which serves the page at /ui/ on the API's origin. A node that does not
// mount it fails the test (nothing here serves the page in its place).
func dashboardURL(t *testing.T, srv *server) string {
	t.Helper()
	resp, err := srv.httpClient().Get(srv.url + ui.Prefix)
	if err != nil {
		t.Fatalf("GET %s%s: %v", srv.url, ui.Prefix, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `content="appliance-dashboard"`) {
		t.Fatalf("the node does not serve the dashboard at %s: HTTP %d", ui.Prefix, resp.StatusCode)
	}
	return srv.url
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
// data-deployment=id and data-count, e.g. {"targeted": "5", ...} (the
// exact value: the text shown is formatted for people, 100,000).
func pageCounts(ctx context.Context, id string) (map[string]string, error) {
	sel, _ := json.Marshal(fmt.Sprintf(`[data-deployment=%q][data-count]`, id))
	return chromedp.Run(ctx, chromedp.Evaluate[map[string]string](fmt.Sprintf(
		`Object.fromEntries([...document.querySelectorAll(%s)].map(e => [e.dataset.count, e.dataset.value ?? e.textContent.trim()]))`, sel)))
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

	// The right token shows the overview, and the deployments a click away.
	err = chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.ID("login-token"), srv.token),
		chromedp.Click(chromedp.ID("login-submit")),
		chromedp.WaitVisible(chromedp.CSS(`[data-overview="devices.total"]`)),
		chromedp.Click(chromedp.CSS(`a[data-nav="deployments"]`)),
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
		chromedp.WaitVisible(chromedp.CSS(`[data-category="unknown"] a[data-device="prod-04"]`)),
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
		const s = (id) => document.querySelector('[data-device="' + id + '"][data-field="connectionState"]')?.dataset.state;
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

// waitJS polls a JavaScript expression in the page until it is truthy and
// returns its value; the test fails with what after a minute.
func waitJS[T any](t *testing.T, ctx context.Context, what, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Poll[T](expr, chromedp.WithPollingTimeout(60*time.Second)))
	if err != nil {
		screenshot(t, ctx, "failed-"+strings.NewReplacer(" ", "-", "/", "-").Replace(what)+".png")
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

func run(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, actions...); err != nil {
		screenshot(t, ctx, "failed-"+strings.NewReplacer(" ", "-", "/", "-").Replace(what)+".png")
		t.Fatalf("%s: %v", what, err)
	}
}

// typeInto replaces an input's text by typing, as a person does (each key
// fires the input events the page listens to).
func typeInto(sel, text string) []chromedp.Action[chromedp.Void] {
	actions := []chromedp.Action[chromedp.Void]{setValue(sel, "")}
	if text != "" {
		actions = append(actions, chromedp.SendKeys(chromedp.CSS(sel), text))
	}
	return actions
}

// setValue sets an input's value at once, as a paste does, and fires its
// input event.
func setValue(sel, value string) chromedp.Action[chromedp.Void] {
	return chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`(el => { el.value = %s; el.dispatchEvent(new Event("input", {bubbles: true})); })(document.querySelector(%s))`,
		jsString(value), jsString(sel)))
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// pageIsUsable checks what a keyboard or screen-reader user needs on the
// page shown: every form control has a name (a label or aria-label), every
// button and link has text, and nothing but tables' own scroll boxes
// overflows the window's width.
func pageIsUsable(t *testing.T, ctx context.Context, page string) {
	t.Helper()
	problems, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](`(() => {
		const out = [];
		for (const el of document.querySelectorAll("#view input, #view select, #view textarea")) {
			if (el.type === "hidden") continue;
			const named = el.getAttribute("aria-label") || (el.id && document.querySelector('label[for="' + el.id + '"]'));
			if (!named) out.push("unnamed " + el.tagName + (el.id ? "#" + el.id : ""));
		}
		for (const el of document.querySelectorAll("#view button, #view a")) {
			if (!(el.textContent.trim() || el.getAttribute("aria-label"))) out.push("empty " + el.tagName);
		}
		if (document.documentElement.scrollWidth > window.innerWidth + 1) {
			out.push("the page is " + document.documentElement.scrollWidth + " px wide in a " + window.innerWidth + " px window");
		}
		return out;
	})()`))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", page, p)
	}
}

// TestDashboard_OperatorConsole is issue 18's acceptance 1 (pausing and
// rolling back a rollout is TestDashboard_Rollout's; a device's
// troubleshooting panel TestDashboard_Troubleshooting's), in headless
// Chromium against a real node with `appliance sim` devices: sign in; create a deployment from a pasted manifest with a
// condition checked as it is typed, see the dry run's counts and devices
// before anything is saved, save; watch it converge; open a device from
// the deployment page and see its modules and why its deployment applies;
// edit a tag on the device page and see it re-targeted; find devices by id
// and by condition; change and delete a deployment after their dry runs;
// the overview's numbers equal the API's. Every page is screenshotted at
// 1280 px and on a tablet (e2e/artifacts/console-*.png).
func TestDashboard_OperatorConsole(t *testing.T) {
	ctx := browser(t)
	dir := t.TempDir()
	srv := startServer(t, dir)
	c := srv.client()
	bg := context.Background()

	// Four presses and two bench devices run as simulated agents; a spare
	// prod device is registered but never connects. A catch-all deployment
	// at priority 0 applies to every device to begin with.
	startSim(t, srv.mqttURL(), enrollmentToken(t, dir, "line-a", "environment=prod", "site=lyon"), "press", 4, "--ca-file", srv.caFile())
	startSim(t, srv.mqttURL(), enrollmentToken(t, dir, "bench", "environment=test"), "bench", 2, "--ca-file", srv.caFile())
	cli(t, dir, "device", "create", "spare-01", "--tag", "environment=prod").mustSucceed(t)
	cli(t, dir, "deployment", "create", "base", "--content", "../examples/process-deployment.json", "--target-condition", "*", "--priority", "0").mustSucceed(t)
	eventually(t, "7 devices, 6 of them connected", 60*time.Second, func() bool {
		o, err := c.Overview(bg)
		return err == nil && o.Devices.Total == 7 && o.Devices.Connected == 6
	})
	manifest, err := os.ReadFile("../examples/process-deployment.json")
	if err != nil {
		t.Fatal(err)
	}
	base := dashboardURL(t, srv)
	run(t, ctx, "sign in",
		chromedp.EmulateViewport(1280, 900),
		chromedp.Navigate(base+"/ui/"),
		chromedp.WaitVisible(chromedp.ID("login-token")),
		chromedp.SendKeys(chromedp.ID("login-token"), srv.token),
		chromedp.Click(chromedp.ID("login-submit")),
		chromedp.WaitVisible(chromedp.CSS(`[data-overview="devices.total"]`)))
	waitJS[bool](t, ctx, "the overview counts 7 devices", `document.querySelector('[data-overview="devices.total"]').dataset.value === "7"`)
	screenshot(t, ctx, "console-overview.png")
	pageIsUsable(t, ctx, "overview")

	// New deployment: paste the manifest, type a condition (first with a
	// mistake, shown inline at its column), priority and a label.
	run(t, ctx, "open the new deployment form",
		chromedp.Click(chromedp.CSS(`a[data-nav="deployments"]`)),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-deployment="base"]`)),
		chromedp.Click(chromedp.ID("new-deployment")),
		chromedp.WaitVisible(chromedp.ID("dep-manifest")))
	pageIsUsable(t, ctx, "new deployment")
	actions := typeInto("#dep-id", "presses-v2")
	actions = append(actions, setValue("#dep-manifest", string(manifest))) // pasted
	actions = append(actions, typeInto("#dep-condition", "tags.environment='prod' AND")...)
	run(t, ctx, "fill in the form", actions...)
	bad := waitJS[map[string]string](t, ctx, "the condition's error", `(() => { const m = document.querySelector('[data-check="dep-condition"]'); return m.dataset.valid === "false" ? {column: m.dataset.column, text: m.textContent} : null; })()`)
	if bad["column"] != "28" || !strings.Contains(bad["text"], "Column 28") {
		t.Errorf("an unfinished condition: %v, want an error at column 28", bad)
	}
	screenshot(t, ctx, "console-create-bad-condition.png")
	actions = typeInto("#dep-condition", "tags.environment='prod'")
	actions = append(actions, typeInto("#dep-priority", "10")...)
	actions = append(actions, chromedp.Click(chromedp.CSS(`#dep-labels + button`)))
	actions = append(actions, typeInto(`#dep-labels [data-pair="key"]`, "team")...)
	actions = append(actions, typeInto(`#dep-labels [data-pair="value"]`, "presses")...)
	run(t, ctx, "fix the condition", actions...)
	matches := waitJS[string](t, ctx, "the condition checked", `document.querySelector('[data-check="dep-condition"][data-valid="true"] [data-matches]')?.dataset.matches`)
	if matches != "5" {
		t.Errorf("the condition matches %s devices, want 5 (four presses and the spare)", matches)
	}

	// The dry run before anything is saved.
	run(t, ctx, "preview", chromedp.Click(chromedp.ID("dep-preview-button")), chromedp.WaitVisible(chromedp.ID("dry-run")))
	preview := waitJS[map[string]any](t, ctx, "the dry run's numbers", `(() => {
		const v = (k) => document.querySelector('[data-dry-run="' + k + '"]')?.dataset.value;
		const ids = [...document.querySelectorAll('[data-dry-run-list="wouldApply"] a[data-device]')].map(a => a.dataset.device);
		const move = document.querySelector('tr[data-move-from="base"][data-move-to="presses-v2"] [data-value]')?.dataset.value;
		return v("targetedCount") ? {targeted: v("targetedCount"), wouldApply: v("wouldApplyCount"), ids: ids.join(","), fromBase: move} : null;
	})()`)
	if fmt.Sprint(preview) != "map[fromBase:5 ids:press-0001,press-0002,press-0003,press-0004,spare-01 targeted:5 wouldApply:5]" {
		t.Errorf("dry run shown: %v", preview)
	}
	if _, err := c.Deployment(bg, "presses-v2", false); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("the preview saved the deployment: %v", err)
	}
	screenshot(t, ctx, "console-create-preview.png")

	// Save; the page shows it converging: the presses report it, the spare
	// never does.
	run(t, ctx, "create", chromedp.Click(chromedp.ID("dep-create")), chromedp.WaitVisible(chromedp.ID("deployment-id")))
	waitCounts(t, ctx, "presses-v2", map[string]string{"targeted": "5", "applied": "5", "unknown": "1", "unhealthy": "0"})
	got := waitJS[map[string]string](t, ctx, "presses-v2 converged", `(() => {
		const v = (k) => document.querySelector('[data-deployment="presses-v2"][data-count="' + k + '"]')?.dataset.value;
		return Number(v("soaking")) + Number(v("healthy")) === 4 ? {soaking: v("soaking"), healthy: v("healthy")} : null;
	})()`)
	t.Logf("presses-v2 converged: %v", got)
	dep, err := c.Deployment(bg, "presses-v2", false)
	if err != nil || dep.Priority != 10 || dep.Labels["team"] != "presses" || dep.TargetCondition != "tags.environment='prod'" {
		t.Fatalf("saved deployment: %+v %v", dep, err)
	}
	screenshot(t, ctx, "console-deployment.png")
	pageIsUsable(t, ctx, "deployment")

	// A device from the deployment page: its modules, and why presses-v2
	// applies (and base does not).
	run(t, ctx, "open press-0001",
		chromedp.Click(chromedp.CSS(`[data-category="applied"] a[data-device="press-0001"]`)),
		chromedp.WaitVisible(chromedp.ID("device-id")))
	mod := waitJS[map[string]string](t, ctx, "press-0001's module", `(() => {
		const r = document.querySelector('#modules tr[data-module="press-telemetry"]');
		return r ? {status: r.querySelector("[data-runtime-status]").dataset.runtimeStatus, exit: r.querySelector('[data-field="exitCode"]').textContent,
			restarts: r.querySelector('[data-field="restartCount"]').textContent} : null;
	})()`)
	if fmt.Sprint(mod) != "map[exit:0 restarts:0 status:running]" {
		t.Errorf("press-0001's module on its page: %v", mod)
	}
	why := waitJS[[]string](t, ctx, "press-0001's precedence", `(() => {
		const rows = [...document.querySelectorAll("#device-precedence tr[data-precedence]")];
		return rows.length === 2 ? rows.map(r => r.dataset.precedence + " " + r.dataset.status + ": " + r.querySelector('[data-field="reason"]').textContent) : null;
	})()`)
	if len(why) != 2 || why[0] != "presses-v2 Applied: applies: highest priority (10; next is base with 0)" || why[1] != "base Targeted: loses to presses-v2: lower priority (0 < 10)" {
		t.Errorf("why on press-0001's page: %q", why)
	}
	screenshot(t, ctx, "console-device.png")
	pageIsUsable(t, ctx, "device")

	// A canary deployment appears; tagging press-0001 on its page moves it
	// there at once.
	if _, err := c.PutDeployment(bg, "presses-canary", api.DeploymentRequest{Content: manifest, TargetCondition: "tags.ring='canary'", Priority: 20},
		api.WriteOptions{IfNoneMatch: "*"}); err != nil {
		t.Fatal(err)
	}
	run(t, ctx, "edit press-0001's tags", chromedp.Click(chromedp.ID("edit-tags")), chromedp.WaitVisible(chromedp.ID("tag-form")),
		chromedp.Click(chromedp.ID("add-tag")))
	actions = typeInto(`#tag-rows .pair:last-child [data-tag="key"]`, "ring")
	actions = append(actions, typeInto(`#tag-rows .pair:last-child [data-tag="value"]`, "canary")...)
	actions = append(actions, chromedp.Click(chromedp.ID("save-tags")))
	run(t, ctx, "save the tag", actions...)
	why = waitJS[[]string](t, ctx, "press-0001 re-targeted", `(() => {
		const rows = [...document.querySelectorAll("#device-precedence tr[data-precedence]")].map(r => r.dataset.precedence + " " + r.dataset.status);
		return rows.length === 3 && rows[0] === "presses-canary Applied" ? rows : null;
	})()`)
	if strings.Join(why, ",") != "presses-canary Applied,presses-v2 Targeted,base Targeted" {
		t.Errorf("after the tag: %v", why)
	}
	d, err := c.Device(bg, "press-0001", false)
	if err != nil || d.Tags["ring"] != "canary" || d.Tags["site"] != "lyon" || d.Configurations["presses-canary"].Status != api.StatusApplied {
		t.Fatalf("press-0001 in the API after the edit: %+v %v", d, err)
	}
	waitJS[bool](t, ctx, "the assignment in press-0001's history", `!!document.querySelector('#device-history tr[data-kind="assigned"][data-to="presses-canary"]')`)
	screenshot(t, ctx, "console-device-retargeted.png")

	// The device list: search by id, a condition with a mistake (shown at
	// its column, nothing listed), then a good one.
	run(t, ctx, "devices by prefix", chromedp.Click(chromedp.CSS(`a[data-nav="devices"]`)), chromedp.WaitVisible(chromedp.ID("device-search")))
	actions = typeInto("#device-search", "press-")
	actions = append(actions, chromedp.Click(chromedp.ID("device-apply")))
	run(t, ctx, "search", actions...)
	rows := waitJS[string](t, ctx, "the presses listed", `(() => { const ids = [...document.querySelectorAll("#devices tr[data-device]")].map(r => r.dataset.device).join(","); return location.hash.includes("prefix") && ids.startsWith("press") ? ids : null; })()`)
	if rows != "press-0001,press-0002,press-0003,press-0004" {
		t.Errorf("prefix press-: %s", rows)
	}
	actions = typeInto("#device-search", "")
	actions = append(actions, typeInto("#device-filter", "tags.ring = canary")...)
	run(t, ctx, "a bad filter", actions...)
	bad = waitJS[map[string]string](t, ctx, "the filter's error", `(() => { const m = document.querySelector('[data-check="device-filter"]'); return m.dataset.valid === "false" ? {column: m.dataset.column, text: m.textContent} : null; })()`)
	if bad["column"] != "13" {
		t.Errorf("a filter with an unquoted string: %v, want an error at column 13", bad)
	}
	screenshot(t, ctx, "console-devices-bad-filter.png")
	actions = typeInto("#device-filter", "tags.ring = 'canary' OR tags.environment = 'test'")
	actions = append(actions, chromedp.Click(chromedp.ID("device-apply")))
	run(t, ctx, "a good filter", actions...)
	rows = waitJS[string](t, ctx, "the filtered devices", `(() => { const ids = [...document.querySelectorAll("#devices tr[data-device]")].map(r => r.dataset.device).join(","); return location.hash.includes("condition") && !ids.includes("press-0002") ? ids : null; })()`)
	if rows != "bench-0001,bench-0002,press-0001" {
		t.Errorf("filtered: %s", rows)
	}
	health := waitJS[map[string]string](t, ctx, "health and connection columns", `(() => {
		const row = (id) => document.querySelector('#devices tr[data-device="' + id + '"]');
		const r = row("press-0001");
		return r ? {health: r.querySelector("[data-health]").dataset.health, conn: r.querySelector('[data-field="connectionState"]').dataset.state} : null;
	})()`)
	if health["conn"] != "Connected" || (health["health"] != "soaking" && health["health"] != "healthy" && health["health"] != "unknown") {
		t.Errorf("press-0001 in the list: %v", health)
	}
	screenshot(t, ctx, "console-devices.png")
	pageIsUsable(t, ctx, "devices")

	// Update presses-v2 above the canary: the dry run shows press-0001
	// coming back, then it is saved.
	run(t, ctx, "edit presses-v2", chromedp.Navigate(base+"/ui/#/deployments/presses-v2/edit"), chromedp.WaitVisible(chromedp.ID("dep-priority")))
	actions = typeInto("#dep-priority", "30")
	actions = append(actions, chromedp.Click(chromedp.ID("dep-preview-button")), chromedp.WaitVisible(chromedp.ID("dry-run")))
	run(t, ctx, "preview the update", actions...)
	moved := waitJS[string](t, ctx, "the update's dry run", `document.querySelector('tr[data-move-from="presses-canary"][data-move-to="presses-v2"] a[data-device]')?.dataset.device`)
	if moved != "press-0001" {
		t.Errorf("update dry run moves %q", moved)
	}
	screenshot(t, ctx, "console-update-preview.png")
	run(t, ctx, "save the update", chromedp.Click(chromedp.ID("dep-save")), chromedp.WaitVisible(chromedp.ID("deployment-id")))
	waitCounts(t, ctx, "presses-v2", map[string]string{"applied": "5"})
	if dep, err := c.Deployment(bg, "presses-v2", false); err != nil || dep.Priority != 30 {
		t.Fatalf("after the update: %+v %v", dep, err)
	}

	// Delete the canary, which now applies nowhere; then base, whose dry
	// run says the two bench devices would run nothing.
	run(t, ctx, "delete base", chromedp.Navigate(base+"/ui/#/deployments/base"), chromedp.WaitVisible(chromedp.ID("delete-deployment")),
		chromedp.Click(chromedp.ID("delete-deployment")), chromedp.WaitVisible(chromedp.ID("delete-dry-run")))
	del := waitJS[map[string]string](t, ctx, "the delete's dry run", `(() => {
		const m = document.querySelector('#dry-run-moves tr[data-move-from="base"][data-move-to=""]');
		return m ? {count: m.querySelector("[data-value]").dataset.value, ids: [...m.querySelectorAll("a[data-device]")].map(a => a.dataset.device).join(",")} : null;
	})()`)
	if fmt.Sprint(del) != "map[count:2 ids:bench-0001,bench-0002]" {
		t.Errorf("delete dry run: %v", del)
	}
	if _, err := c.Deployment(bg, "base", false); err != nil {
		t.Fatalf("the delete's dry run deleted: %v", err)
	}
	screenshot(t, ctx, "console-delete-preview.png")
	run(t, ctx, "confirm the delete", chromedp.Click(chromedp.ID("confirm-delete")), chromedp.WaitVisible(chromedp.CSS(`#deployments`)))
	waitJS[bool](t, ctx, "base gone from the list", `!document.querySelector('tr[data-deployment="base"]') && document.getElementById("notice").textContent.includes("base deleted")`)
	if _, err := c.Deployment(bg, "base", false); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("after the delete: %v", err)
	}
	run(t, ctx, "a deleted deployment's page", chromedp.Navigate(base+"/ui/#/deployments/base"), chromedp.WaitVisible(chromedp.ID("deployment-missing")))

	// The overview's numbers equal the API's: the overview itself, and the
	// per-device and per-deployment reads it must agree with.
	run(t, ctx, "overview", chromedp.Click(chromedp.CSS(`a[data-nav="overview"]`)), chromedp.WaitVisible(chromedp.CSS(`[data-overview="devices.total"]`)))
	var shown map[string]string
	var o api.Overview
	eventually(t, "the overview on the page equals GET /api/v1/overview", 60*time.Second, func() bool {
		var err error
		shown, err = chromedp.Run(ctx, chromedp.Evaluate[map[string]string](`Object.fromEntries([...document.querySelectorAll("[data-overview]")].map(e => [e.dataset.overview, e.dataset.value]))`))
		if err != nil {
			return false
		}
		o, err = c.Overview(bg)
		return err == nil && fmt.Sprint(shown) == fmt.Sprint(overviewNumbers(o))
	})
	page, err := c.Devices(bg, api.DeviceQuery{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	fromDevices := map[string]int{}
	for _, d := range page.Items {
		fromDevices["devices.health."+d.Health]++
		fromDevices["devices.total"]++
		if d.ConnectionState == api.Connected {
			fromDevices["devices.connected"]++
		}
	}
	deps, err := c.Deployments(bg, api.DeploymentQuery{})
	if err != nil {
		t.Fatal(err)
	}
	fromDevices["deployments.total"] = len(deps.Items)
	for k, want := range fromDevices {
		if shown[k] != fmt.Sprint(want) {
			t.Errorf("overview %s: %s on the page, %d from the devices and deployments", k, shown[k], want)
		}
	}
	if shown["devices.total"] != "7" || shown["deployments.total"] != "2" {
		t.Errorf("overview: %v", shown)
	}
	screenshot(t, ctx, "console-overview-after.png")

	// A tablet: the same pages fit its width.
	run(t, ctx, "tablet", chromedp.EmulateViewport(820, 1180))
	for _, p := range []struct{ hash, ready, name string }{
		{"#/overview", `[data-overview="devices.total"]`, "overview"},
		{"#/deployments/presses-v2", `#deployment-id`, "deployment"},
		{"#/devices/press-0001", `#device-precedence`, "device"},
		{"#/devices", `#devices`, "devices"},
		{"#/new-deployment", `#dep-manifest`, "new-deployment"},
	} {
		run(t, ctx, "tablet "+p.name, chromedp.Navigate(base+"/ui/"+p.hash), chromedp.WaitVisible(chromedp.CSS(p.ready)))
		pageIsUsable(t, ctx, "tablet "+p.name)
		screenshot(t, ctx, "console-tablet-"+p.name+".png")
	}
}

// overviewNumbers flattens the overview as the page tags its numbers.
func overviewNumbers(o api.Overview) map[string]string {
	m := map[string]string{
		"devices.total": fmt.Sprint(o.Devices.Total), "devices.connected": fmt.Sprint(o.Devices.Connected),
		"devices.disconnected": fmt.Sprint(o.Devices.Disconnected), "deployments.total": fmt.Sprint(o.Deployments.Total),
		"devices.offline": fmt.Sprint(o.Devices.Offline),
	}
	for k, v := range o.Devices.Health {
		m["devices.health."+k] = fmt.Sprint(v)
	}
	for k, v := range o.Deployments.States {
		m["deployments.states."+k] = fmt.Sprint(v)
	}
	return m
}
