//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"appliance/api"
)

// Issue 19's import benchmark: a million device identities imported from
// an Azure export file with `appliance device import`, against the same
// devices created through the API by 64 clients, in the same run; then,
// with APPLIANCE_IMPORT_BENCH_RESTART=1, the importing node restarted with
// 100 deployments: time to ready and heap a device. Measured, never
// asserted; skipped unless APPLIANCE_IMPORT_BENCH_DEVICES is set (results
// and command in docs/benchmarks.md). APPLIANCE_IMPORT_BENCH_DIR names a
// new directory for the importing node's data, kept after the test, so
// that restarts can be profiled on it again and again.
func TestImportBenchmark(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("APPLIANCE_IMPORT_BENCH_DEVICES"))
	if n <= 0 {
		t.Skip("set APPLIANCE_IMPORT_BENCH_DEVICES=1000000 to run the import benchmark")
	}
	bg := context.Background()
	file := filepath.Join(t.TempDir(), "devices.txt")
	writeAzureExport(t, file, n, nil)
	st, _ := os.Stat(file)
	t.Logf("export file: %d devices, %.0f MB", n, float64(st.Size())/(1<<20))

	// The import: one node, one deployment over a third of the fleet.
	dir := t.TempDir()
	if keep := os.Getenv("APPLIANCE_IMPORT_BENCH_DIR"); keep != "" {
		if err := os.Mkdir(keep, 0o700); err != nil {
			t.Fatalf("APPLIANCE_IMPORT_BENCH_DIR must name a new directory: %v", err)
		}
		dir = keep
	}
	srv := startServer(t, dir)
	cli(t, dir, "deployment", "create", "presses-prod", "--content", writeManifest(t), "--target-condition", "tags.environment='prod'").mustSucceed(t)
	ctx, cancel := context.WithTimeout(bg, 20*time.Minute)
	defer cancel()
	start := time.Now()
	r := cliContext(ctx, t, dir, "device", "import", file, "-o", "json")
	took := time.Since(start)
	if r.code != 0 {
		t.Fatalf("import: exit %d\n%s\n%s", r.code, r.stdout, tail(r.stderr, 2000))
	}
	t.Logf("import: %d devices in %.1f s: %.0f devices/s (the CLI process, from start to its summary)", n, took.Seconds(), float64(n)/took.Seconds())
	var sum api.ImportSummary
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil || sum.Created != n {
		t.Fatalf("import summary %+v, %v", sum, err)
	}

	// The baseline: the same devices, through PUT /devices/{id}, 64 clients
	// (APPLIANCE_IMPORT_BENCH_BASELINE=off skips it, to measure a restart
	// alone).
	if os.Getenv("APPLIANCE_IMPORT_BENCH_BASELINE") != "off" {
		importBaseline(t, n)
	}

	if os.Getenv("APPLIANCE_IMPORT_BENCH_RESTART") == "" {
		return
	}
	// The importing node with 100 deployments, restarted.
	for i := range 99 {
		cli(t, dir, "deployment", "create", fmt.Sprintf("line-%02d", i), "--content", writeManifest(t), "--priority", strconv.Itoa(i+1),
			"--target-condition", fmt.Sprintf("tags.site.line=%d AND tags.environment='%s'", i%7, []string{"prod", "test"}[i%2])).mustSucceed(t)
	}
	srv.stop()
	t.Logf("restart: the raft log holds %.0f MB, the state file %.0f MB", float64(dirSize(t, filepath.Join(dir, "raft", "log")))/1e6,
		float64(dirSize(t, filepath.Join(dir, "raft", "state.db")))/1e6)
	start = time.Now()
	srv = startServer(t, dir)
	ready := time.Since(start)
	// The runtime collects at least every two minutes, even when idle:
	// the lowest heap over a little more than that is the live heap.
	heap := heapLow(t, srv, 130*time.Second)
	t.Logf("restart with %d devices and 100 deployments: ready (readyz 200) %.1f s after the process started; live heap %.0f MB, %.0f B a device",
		n, ready.Seconds(), float64(heap)/(1<<20), float64(heap)/float64(n))
}

// importBaseline creates n devices like those of writeAzureExport through
// the API with 64 clients, on a fresh node, and logs how long it took.
func importBaseline(t *testing.T, n int) {
	base := t.TempDir()
	bsrv := startServer(t, base)
	cli(t, base, "deployment", "create", "presses-prod", "--content", writeManifest(t), "--target-condition", "tags.environment='prod'").mustSucceed(t)
	hc := bsrv.httpClient()
	hc.Transport.(*http.Transport).MaxIdleConnsPerHost = 64
	c := &api.Client{BaseURL: bsrv.url, Token: bsrv.token, HTTP: hc}
	start := time.Now()
	createDevicesWith(t, c, n, 64, func(i int) (string, api.DeviceRequest) {
		i++ // line3-press-000001, as in the export file
		env, status := "test", ""
		if i%3 == 0 {
			env = "prod"
		}
		if i%10 == 0 {
			status = "disabled"
		}
		return fmt.Sprintf("line3-press-%06d", i), api.DeviceRequest{Status: status, Tags: map[string]any{"environment": env, "site": map[string]any{"line": i % 7}}}
	})
	baseTook := time.Since(start)
	t.Logf("baseline: %d devices through the API, 64 clients, in %.1f s: %.0f devices/s", n, baseTook.Seconds(), float64(n)/baseTook.Seconds())
	bsrv.kill()
}

// heapLow is the lowest go_memstats_heap_alloc_bytes the node reports
// over d (polled every 200 ms): the heap just after a collection, near
// the live heap.
func heapLow(t *testing.T, s *server, d time.Duration) int64 {
	t.Helper()
	low := int64(-1)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		resp, err := s.httpClient().Do(authGet(s, "/metrics"))
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_alloc_bytes "); ok {
				f, _ := strconv.ParseFloat(v, 64)
				if low < 0 || int64(f) < low {
					low = int64(f)
				}
			}
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	return low
}

// dirSize is the bytes of the files under path (a file or a directory).
func dirSize(t *testing.T, path string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(path, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		n += info.Size()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
