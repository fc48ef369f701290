//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"appliance/api"
)

// Issue 18's fourth acceptance item: how fast the device list and a
// condition filter answer with 100,000 devices, in the browser and, as the
// baseline in the same run, the API calls the page makes. Measured, never
// asserted; skipped unless APPLIANCE_CONSOLE_BENCH_DEVICES is set (the
// results and the command are in docs/benchmarks.md).

// benchTimes runs fn n times and returns the durations it measured, sorted.
func benchTimes(n int, fn func() (time.Duration, error)) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for range n {
		d, err := fn()
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	slices.Sort(out)
	return out, nil
}

// timed measures fn from the caller's side.
func timed(fn func() error) func() (time.Duration, error) {
	return func() (time.Duration, error) {
		start := time.Now()
		err := fn()
		return time.Since(start), err
	}
}

// latencies is "median / p90 / max" in milliseconds.
func latencies(ds []time.Duration) string {
	m := func(d time.Duration) string { return strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 1, 64) }
	return fmt.Sprintf("%s / %s / %s", m(ds[len(ds)/2]), m(ds[len(ds)*9/10]), m(ds[len(ds)-1]))
}

func TestConsoleBenchmark(t *testing.T) {
	total, _ := strconv.Atoi(os.Getenv("APPLIANCE_CONSOLE_BENCH_DEVICES"))
	if total <= 0 {
		t.Skip("set APPLIANCE_CONSOLE_BENCH_DEVICES=100000 to run the console benchmark")
	}
	reporting, _ := strconv.Atoi(os.Getenv("APPLIANCE_CONSOLE_BENCH_REPORTING"))
	if reporting <= 0 {
		reporting = 5000
	}
	rounds := 20
	ctx := browser(t)
	dir := t.TempDir()
	srv := startServer(t, dir)
	c := srv.client()
	bg := context.Background()

	// The fleet: total devices, `reporting` of them simulated agents that
	// report (enrolled, so their ids are sim-00001...), the others created
	// through the API (dev-000001...), over 50 lines, 80 % prod, 1 % in the
	// canary ring; three deployments.
	for _, d := range []struct {
		id, cond string
		prio     int64
	}{{"all", "*", 0}, {"prod", "tags.environment='prod'", 10}, {"canary", "tags.ring='canary'", 20}} {
		if _, err := c.PutDeployment(bg, d.id, api.DeploymentRequest{Content: edgeManifest(map[string]any{}), TargetCondition: d.cond, Priority: d.prio},
			api.WriteOptions{IfNoneMatch: "*"}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	startSim(t, srv.mqttURL(), enrollmentToken(t, dir, "sims", "environment=prod", "line=line-00"), "sim", reporting, "--ca-file", srv.caFile())
	created := total - reporting
	createDevicesWith(t, c, created, 64, func(i int) (string, api.DeviceRequest) {
		i++ // dev-000001...
		tags := map[string]any{"environment": "prod", "line": fmt.Sprintf("line-%02d", i%50)}
		if i%5 == 0 {
			tags["environment"] = "test"
		}
		if i%100 == 0 {
			tags["ring"] = "canary"
		}
		return fmt.Sprintf("dev-%06d", i), api.DeviceRequest{Tags: tags}
	})
	eventually(t, "every device registered and every sim reporting", 10*time.Minute, func() bool {
		o, err := c.Overview(bg)
		return err == nil && o.Devices.Total == total && o.Devices.Connected == reporting
	})
	t.Logf("fleet of %d devices (%d reporting) ready in %s", total, reporting, time.Since(start).Round(time.Second))

	// The API calls the pages make, timed from this process over HTTPS
	// (keep-alive): the baseline.
	deep := fmt.Sprintf("dev-%06d", created/2)
	prefix := deep[:len(deep)-2] // the 100 ids around deep
	broad := "tags.environment='prod'"
	narrow := "tags.environment='prod' AND tags.line='line-07'"
	hc := srv.httpClient() // one client: its connection is kept alive, as the browser's is
	get := func(path string) func() error {
		return func() error {
			resp, err := hc.Do(authGet(srv, path))
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			var sink [32 << 10]byte
			for {
				if _, err := resp.Body.Read(sink[:]); err != nil {
					break
				}
			}
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%s: %s", path, resp.Status)
			}
			return nil
		}
	}
	check := func(cond string) func() error {
		return func() error {
			_, err := c.CheckCondition(bg, api.ConditionRequest{Condition: cond})
			return err
		}
	}
	q := url.QueryEscape
	apiCases := []struct {
		name string
		fn   func() error
	}{
		{"GET /devices?limit=100 (first page, reporting devices)", get("/api/v1/devices?limit=100&after=sim")},
		{"GET /devices?limit=100&after=" + deep + " (a page in the middle)", get("/api/v1/devices?limit=100&after=" + deep)},
		{"GET /devices?limit=100&prefix=" + prefix, get("/api/v1/devices?limit=100&prefix=" + prefix)},
		{"POST /conditions/check " + broad, check(broad)},
		{"GET /devices?limit=100&condition=" + broad, get("/api/v1/devices?limit=100&condition=" + q(broad))},
		{"POST /conditions/check " + narrow, check(narrow)},
		{"GET /devices?limit=100&condition=" + narrow, get("/api/v1/devices?limit=100&condition=" + q(narrow))},
		{"GET /overview", get("/api/v1/overview")},
	}
	var rows []string
	for _, tc := range apiCases {
		ds, err := benchTimes(rounds, timed(tc.fn))
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, fmt.Sprintf("| API | %s | %s |", tc.name, latencies(ds)))
	}

	// The pages: from a click (a hash change) to the rows on screen, in
	// Chromium, measured by the page's clock. Each navigation starts from
	// the new-deployment form, which polls nothing, so no earlier view's
	// refresh can be mistaken for the new one.
	base := dashboardURL(t, srv)
	run(t, ctx, "sign in", chromedp.EmulateViewport(1280, 900), chromedp.Navigate(base+"/ui/"),
		chromedp.WaitVisible(chromedp.ID("login-token")), chromedp.SendKeys(chromedp.ID("login-token"), srv.token),
		chromedp.Click(chromedp.ID("login-submit")), chromedp.WaitVisible(chromedp.CSS(`[data-overview="devices.total"]`)))
	pageLoad := func(hash, ready string) func() (time.Duration, error) {
		return func() (time.Duration, error) {
			if err := chromedp.Do(ctx, chromedp.Navigate(base+"/ui/#/new-deployment"), chromedp.WaitVisible(chromedp.ID("dep-manifest"))); err != nil {
				return 0, err
			}
			took, err := chromedp.Run(ctx, chromedp.Evaluate[float64](fmt.Sprintf(`(async () => {
				const t0 = performance.now();
				location.hash = %s;
				const deadline = t0 + 60000;
				while (performance.now() < deadline) {
					if (document.body.dataset.loaded === "true" && document.querySelector(%s)) return performance.now() - t0;
					await new Promise(r => setTimeout(r, 1));
				}
				return -1;
			})()`, jsString(hash), jsString(ready)), chromedp.EvalAwaitPromise))
			if err != nil {
				return 0, err
			}
			if took < 0 {
				return 0, fmt.Errorf("%s: not shown within a minute", hash)
			}
			return time.Duration(took * float64(time.Millisecond)), nil
		}
	}
	pageCases := []struct{ name, hash, ready string }{
		{"#/devices (first page)", "#/devices", `#devices tr[data-device]`},
		{"#/devices?after=" + deep, "#/devices?after=" + deep, `#devices tr[data-device]`},
		{"#/devices?prefix=" + prefix, "#/devices?prefix=" + prefix, `#devices tr[data-device^="` + prefix + `"]`},
		{"#/devices?condition=" + broad, "#/devices?condition=" + q(broad), `#devices tr[data-device]`},
		{"#/devices?condition=" + narrow, "#/devices?condition=" + q(narrow), `#devices tr[data-device]`},
		{"#/overview", "#/overview", `[data-overview="devices.total"][data-value="` + strconv.Itoa(total) + `"]`},
	}
	for _, pc := range pageCases {
		ds, err := benchTimes(rounds, pageLoad(pc.hash, pc.ready))
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, fmt.Sprintf("| page | %s | %s |", pc.name, latencies(ds)))
	}
	screenshot(t, ctx, "console-bench-devices.png")
	load, _ := os.ReadFile("/proc/loadavg")
	t.Logf("%d devices (%d reporting), %d rounds each, load %s\n| what | case | median / p90 / max (ms) |\n| --- | --- | ---: |\n%s",
		total, reporting, rounds, strings.TrimSpace(string(load)), strings.Join(rows, "\n"))
}

func authGet(s *server, path string) *http.Request {
	req, _ := http.NewRequest(http.MethodGet, s.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+s.token)
	return req
}
