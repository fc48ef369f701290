//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/sim"
)

// cliRow is one invocation of the built binary, as an operator types it,
// against a real node: the exit code, the lines of the table (or of the
// single error line) and, for -o json, the shape of the document.
//
// A new command needs a row: TestCLI_Table walks `appliance --help` and
// its subcommands and fails for a command no row covers.
type cliRow struct {
	// cmd is the command path the row covers ("device keys regenerate").
	cmd string
	// args follow the command path; {name} is replaced by the value the
	// table recorded under name (vars), e.g. {manifest}, {token}.
	args []string
	// fail: the command must exit non-zero with one line on stderr
	// containing every one of errLine.
	fail    bool
	errLine []string
	// exit, when not 0, is the exit code of a command that did part of
	// its work (an import with failed lines): stdout is checked as for a
	// success, and stderr's last line must contain every one of errLine.
	exit int
	// lines are regular expressions, each of which must match a whole
	// line of stdout (a table's key line, a header).
	lines []string
	// notLines must match no line of stdout.
	notLines []string
	// json, for -o json: stdout must decode, unknown fields refused, into
	// a value of this type (a pointer to its zero value), which check then
	// receives.
	json any
	// check looks at the result (and the decoded json) and may record
	// values for later rows.
	check func(t *testing.T, r result, v any, vars map[string]string)
	// retry repeats the row until it passes (bounded): for what the node
	// derives after the write (history).
	retry bool
	// run replaces the plain invocation, for commands that run until
	// interrupted (agent, status --watch).
	run func(t *testing.T, tc *cliTable, args []string) result
}

// cliTable is the node the rows run against and what they recorded.
type cliTable struct {
	t    *testing.T // the whole table's: what a row starts for later rows ends with it
	srv  *server
	vars map[string]string
}

// TestCLI_Table runs every command of the CLI, with its main flags, against
// a real node, checking exit codes, table lines and -o json shapes. Paging
// through more than one page of a condition's matches (1,005 devices, the
// CLI asks for 1,000 at a time) is in it.
func TestCLI_Table(t *testing.T) {
	dir := t.TempDir()
	srv := startServer(t, dir)
	tc := &cliTable{t: t, srv: srv, vars: map[string]string{
		"manifest":   writeManifest(t),
		"identities": writeIdentities(t),
		"tmp":        t.TempDir(),
		"mqtt":       srv.mqttURL(),
		"ca":         srv.caFile(),
		"raft":       freePort(t),
	}}
	// More than one page of matches for a condition, and a few that do not
	// match; through the API, many at a time (the CLI's side is the list).
	createDevices(t, srv.client(), 1005, func(i int) (string, map[string]any) {
		return fmt.Sprintf("bulk-%04d", i), map[string]any{"batch": "big", "n": float64(i)}
	})
	rows := cliRows()
	covered := map[string]bool{}
	for _, r := range rows {
		covered[r.cmd] = true
	}
	commands := cliCommands(t)
	for _, c := range commands {
		if !covered[c] {
			t.Errorf("command %q has no row in the CLI table (e2e/cli_table_test.go, cliRows): add one that runs it as an operator would", c)
		}
	}
	for c := range covered {
		if !slices.Contains(commands, c) {
			t.Errorf("the CLI table has a row for %q, which `appliance --help` does not list", c)
		}
	}
	if t.Failed() {
		return
	}
	for i, row := range rows {
		name := fmt.Sprintf("%02d %s %s", i, row.cmd, strings.Join(row.args, " "))
		if !t.Run(name, func(t *testing.T) { tc.runRow(t, row) }) {
			// Later rows build on this one's effect.
			t.Fatalf("row %q failed; the rows after it depend on it", name)
		}
	}
}

// cliCommands walks `appliance --help` and each command's --help, and
// returns every command that does something (groups such as "device" are
// covered by their subcommands), "help" aside.
func cliCommands(t *testing.T) []string {
	t.Helper()
	var out []string
	var walk func(path []string)
	walk = func(path []string) {
		r := runBinary(context.Background(), t, append(path, "--help")...).mustSucceed(t)
		subs := availableCommands(r.stdout)
		if len(subs) == 0 {
			out = append(out, strings.Join(path, " "))
			return
		}
		for _, s := range subs {
			if s != "help" {
				walk(append(slices.Clone(path), s))
			}
		}
	}
	walk(nil)
	sort.Strings(out)
	if len(out) < 20 {
		t.Fatalf("found only %d commands in `appliance --help`: %v", len(out), out)
	}
	return out
}

// availableCommands reads the "Available Commands:" section of cobra's
// help.
func availableCommands(help string) []string {
	var names []string
	in := false
	for _, line := range strings.Split(help, "\n") {
		switch {
		case strings.HasPrefix(line, "Available Commands:"):
			in = true
		case in && strings.TrimSpace(line) == "":
			return names
		case in:
			names = append(names, strings.Fields(line)[0])
		}
	}
	return names
}

func (tc *cliTable) expand(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		for k, v := range tc.vars {
			a = strings.ReplaceAll(a, "{"+k+"}", v)
		}
		out[i] = a
	}
	return out
}

func (tc *cliTable) runRow(t *testing.T, row cliRow) {
	args := append(strings.Fields(row.cmd), tc.expand(row.args)...)
	attempts := 1
	if row.retry {
		attempts = 100
	}
	for i := 1; ; i++ {
		var r result
		if row.run != nil {
			r = row.run(t, tc, args)
		} else {
			r = cli(t, tc.srv.dataDir, args...)
		}
		problems := row.verify(r)
		if len(problems) == 0 {
			if row.check != nil {
				var v any
				if row.json != nil {
					v = decodeStrict(t, r.stdout, row.json)
				}
				row.check(t, r, v, tc.vars)
			}
			return
		}
		if i == attempts {
			t.Fatalf("appliance %s\nexit %d\nstdout:\n%s\nstderr:\n%s\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr, strings.Join(problems, "\n"))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// verify lists what the result does not hold of the row.
func (row cliRow) verify(r result) []string {
	var problems []string
	if row.fail {
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		switch {
		case r.code == 0:
			problems = append(problems, "exit 0, want a failure")
		case len(lines) != 1 || !strings.HasPrefix(lines[0], "error: "):
			problems = append(problems, "stderr is not one error line")
		default:
			for _, w := range row.errLine {
				if !strings.Contains(lines[0], w) {
					problems = append(problems, fmt.Sprintf("the error line does not say %q", w))
				}
			}
		}
		return problems
	}
	if r.code != row.exit {
		return []string{fmt.Sprintf("exit %d, want %d", r.code, row.exit)}
	}
	if row.exit != 0 {
		errLines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		for _, w := range row.errLine {
			if last := errLines[len(errLines)-1]; !strings.Contains(last, w) {
				problems = append(problems, fmt.Sprintf("stderr's last line does not say %q: %q", w, last))
			}
		}
	}
	lines := strings.Split(r.stdout, "\n")
	for _, want := range row.lines {
		re := regexp.MustCompile("^" + want + "$")
		if !slices.ContainsFunc(lines, re.MatchString) {
			problems = append(problems, fmt.Sprintf("no stdout line matches %q", want))
		}
	}
	for _, bad := range row.notLines {
		re := regexp.MustCompile("^" + bad + "$")
		if slices.ContainsFunc(lines, re.MatchString) {
			problems = append(problems, fmt.Sprintf("a stdout line matches %q", bad))
		}
	}
	if row.json != nil {
		dec := json.NewDecoder(strings.NewReader(r.stdout))
		dec.DisallowUnknownFields()
		if err := dec.Decode(newOf(row.json)); err != nil {
			problems = append(problems, fmt.Sprintf("stdout does not decode as %T: %v", row.json, err))
		}
	}
	return problems
}

// newOf returns a pointer to a new zero value of the type proto points to.
func newOf(proto any) any { return reflect.New(reflect.TypeOf(proto).Elem()).Interface() }

func decodeStrict(t *testing.T, stdout string, proto any) any {
	t.Helper()
	v := newOf(proto)
	dec := json.NewDecoder(strings.NewReader(stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("stdout does not decode as %T: %v\n%s", proto, err, stdout)
	}
	return v
}

// createDevices creates n devices through the API, several at a time.
func createDevices(t *testing.T, c *api.Client, n int, device func(i int) (string, map[string]any)) {
	t.Helper()
	createDevicesWith(t, c, n, 8, func(i int) (string, api.DeviceRequest) {
		id, tags := device(i)
		return id, api.DeviceRequest{Tags: tags}
	})
}

// createDevicesWith creates devices 0..n-1 through the API with clients
// concurrent callers (the benchmarks' baseline uses 64), and fails the
// test on the first error.
func createDevicesWith(t *testing.T, c *api.Client, n, clients int, device func(i int) (string, api.DeviceRequest)) {
	t.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				id, req := device(i)
				if _, err := c.PutDevice(context.Background(), id, req, api.WriteOptions{}); err != nil {
					select {
					case errs <- fmt.Errorf("create %s: %w", id, err):
					default:
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

// interruptAfter starts the command and sends it SIGINT, as Ctrl-C does,
// once its stdout holds lines lines; it returns when the command exits.
func interruptAfter(lines int) func(t *testing.T, tc *cliTable, args []string) result {
	return func(t *testing.T, tc *cliTable, args []string) result {
		t.Helper()
		cmd := exec.Command(binary, args...)
		cmd.Env = append(os.Environ(), "APPLIANCE_DATA_DIR="+tc.srv.dataDir)
		var out, errb syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		deadline := time.After(time.Minute)
		for strings.Count(out.String(), "\n") < lines {
			select {
			case err := <-done:
				t.Fatalf("appliance %s ended before printing %d lines (%v)\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), lines, err, out.String(), errb.String())
			case <-deadline:
				cmd.Process.Kill()
				t.Fatalf("appliance %s printed %d lines in a minute, want %d\nstdout:\n%s", strings.Join(args, " "), strings.Count(out.String(), "\n"), lines, out.String())
			case <-time.After(50 * time.Millisecond):
			}
		}
		cmd.Process.Signal(syscall.SIGINT)
		var err error
		select {
		case err = <-done:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			t.Fatalf("appliance %s did not exit within a minute of SIGINT", strings.Join(args, " "))
		}
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return result{code: code, stdout: out.String(), stderr: errb.String()}
	}
}

// jsonLines decodes stdout as one JSON document per line, strictly.
func jsonLines[T any](t *testing.T, stdout string) []T {
	t.Helper()
	var out []T
	sc := bufio.NewScanner(strings.NewReader(stdout))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var v T
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("line %q does not decode as %T: %v", sc.Text(), v, err)
		}
		out = append(out, v)
	}
	return out
}

// The shapes of the -o json outputs that are not API types.
type (
	deletedJSON struct {
		Deleted string `json:"deleted"`
	}
	removedJSON struct {
		Removed string `json:"removed"`
	}
	versionJSON struct {
		Version string `json:"version"`
	}
	backupJSON struct {
		File         string    `json:"file"`
		Bytes        int64     `json:"bytes"`
		AppliedIndex uint64    `json:"appliedIndex"`
		Node         string    `json:"node"`
		CreatedAt    time.Time `json:"createdAt"`
	}
	restoreJSON struct {
		DataDir      string `json:"dataDir"`
		AppliedIndex uint64 `json:"appliedIndex"`
		NodeID       string `json:"nodeId"`
	}
	enrollmentDeletedJSON struct {
		Name           string   `json:"name"`
		RevokedDevices []string `json:"revokedDevices"`
	}
)

// cliRows is the table, in order: later rows use what earlier ones made.
func cliRows() []cliRow {
	var devices []api.DeviceView
	return []cliRow{
		// version
		{cmd: "version", lines: []string{`appliance \S+`}},
		{cmd: "version", args: []string{"-o", "json"}, json: &versionJSON{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if v.(*versionJSON).Version == "" {
					t.Error("empty version")
				}
			}},
		{cmd: "version", args: []string{"-o", "yaml"}, fail: true, errLine: []string{"-o/--output must be table or json"}},

		// serve: the node under test runs `appliance serve`; here its
		// refusals (a second node's flags are in TestCLI_HistoryFlags).
		{cmd: "serve", args: []string{"--data-dir", "{tmp}/s", "--shed-devices-after", "-1s"}, fail: true, errLine: []string{"--shed-devices-after"}},
		{cmd: "serve", args: []string{"--data-dir", "{tmp}/s", "--max-modules", "0"}, fail: true, errLine: []string{"--max-modules", "positive"}},
		{cmd: "serve", args: []string{"--data-dir", "{tmp}/s", "--offline-after", "0s"}, fail: true, errLine: []string{"--offline-after"}},
		{cmd: "serve", args: []string{"--data-dir", "{tmp}/s", "--log-level", "loud"}, fail: true, errLine: []string{"--log-level"}},

		// device
		{cmd: "device create", args: []string{"press-01", "--tag", "environment=prod", "--tag", "site.line=3"},
			lines: []string{`deviceId:\s+press-01`, `status:\s+enabled`, `tags:\s+\{"environment":"prod","site":\{"line":3\}\}`, `primaryKey:\s+\S{44}`, `secondaryKey:\s+\S{44}`}},
		{cmd: "device create", args: []string{"press-02", "--tags", `{"environment":"test"}`, "--status", "disabled", "-o", "json"}, json: &fleet.Device{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				d := v.(*fleet.Device)
				if d.ID != "press-02" || d.Status != fleet.DeviceDisabled || d.Authentication.SymmetricKey == nil || d.Authentication.SymmetricKey.PrimaryKey == "" {
					t.Errorf("created %+v", d)
				}
			}},
		{cmd: "device create", args: []string{"press-01"}, fail: true, errLine: []string{"already exists"}},
		{cmd: "device create", args: []string{"bad/id"}, fail: true, errLine: []string{"deviceId"}},
		{cmd: "device create", args: []string{"press-03", "--tag", "novalue"}, fail: true, errLine: []string{"--tag"}},
		{cmd: "device show", args: []string{"press-01"},
			lines: []string{`deviceId:\s+press-01`, `connection:\s+Disconnected`, `presence:\s+offline`, `applied:\s+-`, `base:\s+no deployment targets this device; it has not reported what it runs`,
				`DEPLOYMENT\s+STATUS\s+PRIORITY\s+CREATED\s+KIND\s+WHY`, `no report yet`}},
		// reset: for a device no deployment targets (this one, now).
		{cmd: "device reset", args: []string{"press-01"}, lines: []string{`reset device press-01: it is sent an empty document and removes its modules`}},
		{cmd: "device show", args: []string{"press-01", "--consistent", "-o", "json"}, json: &api.DeviceView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				d := v.(*api.DeviceView)
				if d.ID != "press-01" || d.ConnectionState != api.Disconnected || d.Authentication.SymmetricKey != nil {
					t.Errorf("device %+v (a read must never show the keys)", d)
				}
			}},
		{cmd: "device show", args: []string{"nobody"}, fail: true, errLine: []string{"not found"}},
		// import and export: Azure's device-identity export format, a bad
		// line named by its number while the others go on.
		{cmd: "device import", args: []string{"{identities}", "--dry-run"}, exit: 1, errLine: []string{"1 of 3 lines were not imported"},
			lines: []string{`MODE\s+LINES\s+CREATED\s+UPDATED\s+UNCHANGED\s+DELETED\s+FAILED`, `create\s+3\s+2\s+0\s+0\s+0\s+1`, `2\s+-\s+id: .*not allowed.*`}},
		{cmd: "device show", args: []string{"imp-01"}, fail: true, errLine: []string{"not found"}},
		{cmd: "device import", args: []string{"{identities}", "--atomic"}, exit: 1, errLine: []string{"line 2", "nothing was imported (atomic)"},
			lines: []string{`create\s+3\s+0\s+0\s+0\s+0\s+1`}},
		{cmd: "device show", args: []string{"imp-02"}, fail: true, errLine: []string{"not found"}},
		{cmd: "device import", args: []string{"{identities}"}, exit: 1, errLine: []string{"1 of 3 lines were not imported"},
			lines: []string{`create\s+3\s+2\s+0\s+0\s+0\s+1`, `2\s+-\s+id: .*not allowed.*`}},
		{cmd: "device import", args: []string{"{identities}", "--mode", "upsert", "-o", "json"}, exit: 1, json: &api.ImportSummary{},
			check: func(t *testing.T, r result, v any, vars map[string]string) {
				if s := v.(*api.ImportSummary); s.Unchanged != 2 || s.Created != 0 || s.Updated != 0 || s.Failed != 1 {
					t.Errorf("an upsert of the same file: %+v, want 2 unchanged and the bad line failed", s)
				}
			}},
		{cmd: "device show", args: []string{"imp-01"}, lines: []string{`deviceId:\s+imp-01`, `tags:\s+\{"environment":"migrated"\}`}},
		{cmd: "device import", args: []string{"{tmp}/missing.jsonl"}, fail: true, errLine: []string{"missing.jsonl"}},
		{cmd: "device export", args: []string{"--out", "{tmp}/export.jsonl"}, lines: []string{`exported \d+ devices to .*export\.jsonl`},
			check: func(t *testing.T, r result, _ any, vars map[string]string) {
				b, err := os.ReadFile(filepath.Join(vars["tmp"], "export.jsonl"))
				if err != nil || !bytes.Contains(b, []byte(`"imp-01"`)) || bytes.Contains(b, []byte(identityKey)) {
					t.Errorf("the export (%v) lacks imp-01 or holds a key:\n%.2000s", err, b)
				}
				if !strings.Contains(r.stderr, "no keys") {
					t.Errorf("the export does not say it holds no keys: %q", r.stderr)
				}
			}},
		{cmd: "device export", args: nil, fail: true, errLine: []string{"--out"}},
		{cmd: "device import", args: []string{"{identities}", "--mode", "delete"}, exit: 1, errLine: []string{"1 of 3 lines were not imported"},
			lines: []string{`delete\s+3\s+0\s+0\s+0\s+2\s+1`}},
		{cmd: "device show", args: []string{"imp-01"}, fail: true, errLine: []string{"not found"}},
		{cmd: "device update", args: []string{"press-01", "--tag", "location=westus", "--remove-tag", "site"},
			lines: []string{`tags:\s+\{"environment":"prod","location":"westus"\}`}},
		{cmd: "device update", args: []string{"press-02", "--status", "enabled", "-o", "json"}, json: &fleet.Device{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if d := v.(*fleet.Device); d.Status != fleet.DeviceEnabled {
					t.Errorf("status %q", d.Status)
				}
			}},
		{cmd: "device update", args: []string{"press-01", "--etag", "1", "--tag", "x=y"}, fail: true, errLine: []string{"etag"}},
		{cmd: "device update", args: []string{"press-01"}, fail: true, errLine: []string{"nothing to update"}},
		// More than one page of matches: 1,005 devices, the CLI pages by
		// 1,000, and each comes once, in order.
		{cmd: "device list", args: []string{"--condition", "tags.batch='big'", "-o", "json"}, json: &devices,
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				got := *v.(*[]api.DeviceView)
				if len(got) != 1005 {
					t.Fatalf("%d devices, want the 1005 that match", len(got))
				}
				for i, d := range got {
					if want := fmt.Sprintf("bulk-%04d", i); d.ID != want {
						t.Fatalf("item %d is %s, want %s", i, d.ID, want)
					}
				}
			}},
		{cmd: "device list", args: []string{"--condition", "tags.batch='big' AND tags.n >= 990", "--limit", "12"},
			lines: []string{`DEVICE\s+STATUS\s+APPLIED\s+TAGS`, `bulk-0990\s+enabled\s+-\s+.*`, `bulk-1001\s+enabled\s+-\s+.*`}, notLines: []string{`bulk-1002.*`, `bulk-0989.*`}},
		{cmd: "device list", args: []string{"--limit", "1002", "-o", "json"}, json: &devices,
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if got := *v.(*[]api.DeviceView); len(got) != 1002 || got[1001].ID != "bulk-1001" {
					t.Errorf("%d devices with --limit 1002", len(got))
				}
			}},
		{cmd: "device list", args: []string{"--condition", "tags.environment='prod' AND"}, fail: true, errLine: []string{"column"}},
		{cmd: "device list", args: []string{"-o", "yaml"}, fail: true, errLine: []string{"-o"}},

		// deployment
		{cmd: "deployment create", args: []string{"presses-v1", "--content", "{manifest}", "--target-condition", "tags.environment='prod'", "--dry-run"},
			lines: []string{`would target:\s+1 device`, `would apply to:\s+1 device`, `WOULD\s+DEVICES\s+EXAMPLES`, `start running it\s+1\s+press-01`,
				`switch to it from another deployment\s+0\s*`, `nothing was changed \(dry run\); -o json lists every device`}},
		{cmd: "deployment create", args: []string{"presses-v1", "--content", "{manifest}", "--target-condition", "*", "--dry-run", "-o", "json"}, json: &api.DryRunResult{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				// Every device listed, the CLI paging through them.
				if r := v.(*api.DryRunResult); r.TargetedCount != 1007 || r.WouldApplyCount != 1007 || len(r.Devices) != 1007 || r.Changes[fleet.PreviewStart] != 1007 || r.Next != "" {
					t.Errorf("dry run: targeted %d, would apply %d, %d devices listed, changes %v", r.TargetedCount, r.WouldApplyCount, len(r.Devices), r.Changes)
				}
			}},
		{cmd: "deployment list", args: []string{"-o", "json"}, json: &[]api.DeploymentView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if got := *v.(*[]api.DeploymentView); len(got) != 0 {
					t.Errorf("a dry run created %d deployments", len(got))
				}
			}},
		{cmd: "deployment create", args: []string{"presses-v1", "--content", "{manifest}", "--target-condition", "tags.environment='prod'", "--priority", "10",
			"--label", "team=presses", "--label", "ring=1", "--metric", "ok=properties.reported.lastDesiredStatus.code = 200"},
			lines: []string{`id:\s+presses-v1`, `priority:\s+10`, `labels:\s+ring=1,team=presses`, `metrics:\s+ok=properties.reported.lastDesiredStatus.code = 200`, `targeted:\s+1`, `applied:\s+1`}},
		{cmd: "deployment create", args: []string{"fallback", "--content", "{manifest}", "--target-condition", "*", "--label", "team=base", "-o", "json"}, json: &api.DeploymentView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				d := v.(*api.DeploymentView)
				if d.ID != "fallback" || d.Priority != 0 || d.Labels["team"] != "base" {
					t.Errorf("created %+v", d.Deployment)
				}
			}},
		{cmd: "deployment create", args: []string{"x", "--content", "{manifest}", "--priority", "high"}, fail: true, errLine: []string{"--priority"}},
		{cmd: "deployment create", args: []string{"x"}, fail: true, errLine: []string{"--content"}},
		{cmd: "deployment create", args: []string{"x", "--content", "{tmp}/missing.json"}, fail: true, errLine: []string{"--content"}},
		{cmd: "deployment create", args: []string{"x", "--content", "{manifest}", "--target-condition", "tags.a = 'b"}, fail: true, errLine: []string{"column"}},
		{cmd: "deployment create", args: []string{"x", "--content", "{manifest}", "--metric", "novalue"}, fail: true, errLine: []string{"--metric"}},
		{cmd: "deployment show", args: []string{"presses-v1"},
			lines: []string{`id:\s+presses-v1`, `targetCondition:\s+tags.environment='prod'`, `layered:\s+false`, `modules:\s+\S+.*`}},
		{cmd: "deployment show", args: []string{"presses-v1", "--consistent", "-o", "json"}, json: &api.DeploymentView{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				d := v.(*api.DeploymentView)
				if d.SystemMetrics.Results["targetedCount"] != 1 || d.SystemMetrics.Results["appliedCount"] != 1 {
					t.Errorf("system metrics %v", d.SystemMetrics.Results)
				}
				vars["depEtag"] = d.Etag
			}},
		{cmd: "deployment list", args: []string{"--label", "team=presses"},
			lines:    []string{`ID\s+PRIORITY\s+TARGETED\s+APPLIED\s+TARGET CONDITION\s+LABELS\s+CREATED`, `presses-v1\s+10\s+1\s+1\s+tags.environment='prod'\s+ring=1,team=presses\s+\S+`},
			notLines: []string{`fallback.*`}},
		{cmd: "deployment list", args: []string{"--label", "team"}, fail: true, errLine: []string{"--label"}},
		{cmd: "deployment update", args: []string{"presses-v1", "--priority", "20", "--label", "ring=", "--etag", "{depEtag}"},
			lines: []string{`priority:\s+20`, `labels:\s+team=presses`}},
		{cmd: "deployment update", args: []string{"presses-v1", "--target-condition", "tags.location='westus'", "--metric", "ok=", "-o", "json"}, json: &api.DeploymentView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				d := v.(*api.DeploymentView)
				if d.TargetCondition != "tags.location='westus'" || len(d.Metrics.Queries) != 0 {
					t.Errorf("updated %+v", d.Deployment)
				}
			}},
		{cmd: "deployment update", args: []string{"presses-v1", "--content", "{manifest}"}, fail: true, errLine: []string{"content"}},
		{cmd: "deployment update", args: []string{"presses-v1", "--priority", "-1", "--dry-run"}, fail: true, errLine: []string{"priority"}},
		{cmd: "deployment update", args: []string{"presses-v1", "--target-condition", "tags.nothing='x'", "--dry-run", "-o", "json"}, json: &api.DryRunResult{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				// press-01 would fall back to fallback; nothing changed.
				r := v.(*api.DryRunResult)
				if r.Changes[fleet.PreviewLeave] != 1 || len(r.Devices) != 1 || r.Devices[0].ID != "press-01" || r.Devices[0].To != "fallback" {
					t.Errorf("dry-run update %+v", r)
				}
			}},
		{cmd: "device reset", args: []string{"press-01"}, fail: true, errLine: []string{"deployment presses-v1 applies to it"}},
		{cmd: "deployment update", args: []string{"presses-v1", "--etag", "1", "--priority", "6"}, fail: true, errLine: []string{"etag"}},
		{cmd: "deployment status", args: []string{"presses-v1"},
			lines: []string{`CATEGORY\s+DEVICES\s+EXAMPLES`, `targeted\s+1\s+press-01`, `applied\s+1\s+press-01`, `unknown\s+1\s+press-01`,
				`Azure metrics: targetedCount=1 appliedCount=1 reportedSuccessfulCount=0 reportedFailedCount=0 \(soak 30s\)`,
				`\d\d:\d\d:\d\d \[\.{30}\] 0/1 healthy, 0 soaking, 0 unhealthy, 1 unknown \(targeted 1, 1 offline\)`}},
		{cmd: "deployment status", args: []string{"fallback", "--category", "applied", "--soak", "1m", "-o", "json"}, json: &api.DeploymentStatus{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				st := v.(*api.DeploymentStatus)
				if st.SoakSeconds != 60 || st.Counts.Targeted != 1007 || st.Counts.Applied != 1006 || len(st.Devices[api.CategoryApplied]) != 100 || st.Next[api.CategoryApplied] == "" {
					t.Errorf("status: soak %v, counts %+v, %d applied listed, next %q", st.SoakSeconds, st.Counts, len(st.Devices[api.CategoryApplied]), st.Next[api.CategoryApplied])
				}
			}},
		{cmd: "deployment status", args: []string{"presses-v1", "--category", "happy"}, fail: true, errLine: []string{"category"}},
		// --watch follows the rollout until Ctrl-C: a line per refresh.
		{cmd: "deployment status", args: []string{"presses-v1", "--watch", "--interval", "100ms"}, run: interruptAfter(3),
			lines: []string{`\d\d:\d\d:\d\d \[\.{30}\] 0/1 healthy, 0 soaking, 0 unhealthy, 1 unknown \(targeted 1, 1 offline\)`}},
		{cmd: "deployment status", args: []string{"presses-v1", "--watch", "--interval", "100ms", "-o", "json"}, run: interruptAfter(2),
			check: func(t *testing.T, r result, _ any, _ map[string]string) {
				for _, st := range jsonLines[api.DeploymentStatus](t, r.stdout) {
					if st.ID != "presses-v1" || st.Counts.Targeted != 1 {
						t.Errorf("watched status %+v", st)
					}
				}
			}},
		{cmd: "deployment history", args: []string{"presses-v1"}, retry: true,
			lines: []string{`TIME\s+INDEX\s+WHO\s+EVENT\s+WHAT`, `\S+\s+\d+\s+admin\s+created\s+.*`, `\S+\s+\d+\s+admin\s+updated\s+.*tags.location='westus'.*`}},
		{cmd: "deployment history", args: []string{"presses-v1", "--limit", "1", "-o", "json"}, json: &[]api.HistoryEvent{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if evs := *v.(*[]api.HistoryEvent); len(evs) != 1 || evs[0].Kind != "updated" {
					t.Errorf("--limit 1: %+v", evs)
				}
			}},
		{cmd: "device history", args: []string{"press-01"}, retry: true,
			lines: []string{`TIME\s+INDEX\s+WHO\s+EVENT\s+WHAT`, `\S+\s+\d+\s+-\s+assigned\s+applied deployment none → presses-v1 .*`}},
		{cmd: "device history", args: []string{"press-01", "-o", "json"}, json: &[]api.HistoryEvent{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				// Its assignment, and before it the reset (a row above).
				evs := *v.(*[]api.HistoryEvent)
				if len(evs) != 2 || evs[0].Deployment != "presses-v1" || evs[1].Kind != "reset" {
					t.Errorf("device history %+v", evs)
				}
			}},
		{cmd: "device history", args: []string{"nobody"}, fail: true, errLine: []string{"not found"}},

		// keys, and deleting a device
		{cmd: "device keys regenerate", args: []string{"press-02", "--key", "secondary"},
			lines: []string{`deviceId:\s+press-02`, `secondaryKey:\s+\S{44}`}},
		{cmd: "device keys regenerate", args: []string{"press-02", "--key", "primary", "-o", "json"}, json: &fleet.Device{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				d := v.(*fleet.Device)
				if d.Authentication.SymmetricKey == nil || d.Authentication.SymmetricKey.PrimaryKey == "" {
					t.Errorf("regenerated %+v: the new key is shown once", d.Authentication)
				}
			}},
		{cmd: "device keys regenerate", args: []string{"press-02", "--key", "tertiary"}, fail: true, errLine: []string{"--key"}},
		{cmd: "device delete", args: []string{"press-02"}, lines: []string{`deleted device press-02`}},
		{cmd: "device delete", args: []string{"press-02"}, fail: true, errLine: []string{"not found"}},
		{cmd: "device delete", args: []string{"bulk-0000", "-o", "json"}, json: &deletedJSON{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if v.(*deletedJSON).Deleted != "bulk-0000" {
					t.Errorf("%+v", v)
				}
			}},

		// enrollment, and a device that enrolls with the agent
		{cmd: "enrollment create", args: []string{"line-1", "--tag", "environment=prod", "--tag", "location=westus", "-o", "json"}, json: &fleet.Enrollment{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				e := v.(*fleet.Enrollment)
				if e.Name != "line-1" || !strings.HasPrefix(e.Token, "line-1.") {
					t.Fatalf("enrollment %+v", e)
				}
				vars["token"] = e.Token
			}},
		{cmd: "enrollment create", args: []string{"line-2", "--tags", `{"environment":"test"}`},
			lines: []string{`name:\s+line-2`, `tags:\s+\{"environment":"test"\}`, `token:\s+line-2\.\S+`}},
		{cmd: "enrollment create", args: []string{"line-1"}, fail: true, errLine: []string{"already exists"}},
		{cmd: "enrollment show", args: []string{"line-1"}, lines: []string{`name:\s+line-1`, `tags:\s+\{"environment":"prod","location":"westus"\}`}, notLines: []string{`token.*`}},
		{cmd: "enrollment show", args: []string{"line-1", "-o", "json"}, json: &fleet.Enrollment{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if e := v.(*fleet.Enrollment); e.Token != "" || e.DerivationKey != "" {
					t.Errorf("a read shows a secret: %+v", e)
				}
			}},
		{cmd: "enrollment show", args: []string{"nobody"}, fail: true, errLine: []string{"not found"}},
		{cmd: "enrollment list", lines: []string{`NAME\s+TAGS\s+CREATED`, `line-1\s+.*`, `line-2\s+.*`}},
		{cmd: "enrollment list", args: []string{"-o", "json"}, json: &[]fleet.Enrollment{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if es := *v.(*[]fleet.Enrollment); len(es) != 2 {
					t.Errorf("%d enrollments", len(es))
				}
			}},
		{cmd: "agent", args: []string{"--server", "{mqtt}", "--ca-file", "{ca}", "--device-id", "press-09", "--enroll-token", "{token}",
			"--runtime", "process", "--data-dir", "{tmp}/agent"}, run: runAgentUntilReported("press-09")},
		{cmd: "agent", args: []string{"--server", "{mqtt}", "--device-id", "press-10"}, fail: true, errLine: []string{"--device-key"}},
		{cmd: "sim", args: []string{"--server", "{mqtt}", "--ca-file", "{ca}", "--devices", "3", "--enroll-token", "{token}", "--prefix", "simrow",
			"--duration", "2s", "-o", "json"}, json: &sim.Stats{},
			check: func(t *testing.T, r result, v any, _ map[string]string) {
				if st := v.(*sim.Stats); st.Devices != 3 || st.Enrolled != 3 || st.Prefix != "simrow" {
					t.Errorf("sim summary %+v", st)
				}
			}},
		{cmd: "sim", args: []string{"--server", "{mqtt}", "--devices", "3", "--enroll-token", "{token}", "--tag", "a=b"}, fail: true, errLine: []string{"--tag"}},

		// the device hub's controller side: consumers, the events tail
		// (simrow-0001 sends telemetry), module twins and direct methods
		{cmd: "consumer create", args: []string{"mes"}, lines: []string{`name:\s+mes`, `key:\s+\S{44}`}},
		{cmd: "consumer create", args: []string{"historian", "-o", "json"}, json: &fleet.Consumer{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if c := v.(*fleet.Consumer); c.Name != "historian" || c.Key == "" || c.KeyHash != "" {
					t.Errorf("consumer %+v", c)
				}
			}},
		{cmd: "consumer create", args: []string{"mes"}, fail: true, errLine: []string{"already exists"}},
		{cmd: "consumer create", args: []string{"Bad!"}, fail: true, errLine: []string{"name"}},
		{cmd: "consumer show", args: []string{"mes"}, lines: []string{`name:\s+mes`}, notLines: []string{`key.*`}},
		{cmd: "consumer show", args: []string{"mes", "-o", "json"}, json: &fleet.Consumer{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if c := v.(*fleet.Consumer); c.Key != "" || c.KeyHash != "" {
					t.Errorf("a read shows a secret: %+v", c)
				}
			}},
		{cmd: "consumer show", args: []string{"nobody"}, fail: true, errLine: []string{"not found"}},
		{cmd: "consumer list", lines: []string{`NAME\s+CREATED`, `historian\s+.*`, `mes\s+.*`}},
		{cmd: "consumer list", args: []string{"-o", "json"}, json: &api.ConsumerPage{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if p := v.(*api.ConsumerPage); len(p.Items) != 2 {
					t.Errorf("%d consumers", len(p.Items))
				}
			}},
		{cmd: "consumer delete", args: []string{"historian"}, lines: []string{`consumer historian deleted`}},
		{cmd: "consumer delete", args: []string{"historian", "-o", "json"}, fail: true, errLine: []string{"not found"}},
		{cmd: "events tail", args: []string{"--device", "simrow-0001", "--count", "2"}, run: tailWhileSimSends,
			lines: []string{`RECEIVED\s+NODE\s+DEVICE\s+MODULE\s+OUTPUT\s+SEQ\s+BODY`, `\S+\s+n1\s+simrow-0001\s+sim\s+telemetry\s+\d+\s+\{"device":"simrow-0001",.*`}},
		{cmd: "events tail", args: []string{"--module", "sim", "--count", "1", "-o", "json"}, run: tailWhileSimSends, json: &api.EventView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if ev := v.(*api.EventView); ev.DeviceID != "simrow-0001" || ev.ModuleID != "sim" || ev.SystemProperties["messageId"] == "" {
					t.Errorf("event %+v", ev)
				}
			}},
		{cmd: "events tail", args: []string{"--device", "a/b"}, fail: true, errLine: []string{"--device"}},
		{cmd: "module show", args: []string{"press-09", "m"}, lines: []string{`device:\s+press-09`, `module:\s+m`, `deployment:\s+presses-v1`, `reported properties:\s+\{\}`}},
		{cmd: "module show", args: []string{"press-09", "m", "-o", "json"}, json: &api.ModuleView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if m := v.(*api.ModuleView); m.DeviceID != "press-09" || m.ModuleID != "m" || m.Runtime == nil {
					t.Errorf("module %+v", m)
				}
			}},
		{cmd: "module show", args: []string{"press-09", "nope"}, fail: true, errLine: []string{"not found"}},
		// press-09's agent was stopped: a call is 404 (the success is
		// TestHub_DirectMethodFromTheCLI's, with a module that answers).
		{cmd: "module invoke", args: []string{"press-09", "m", "reset", "--payload", `{"x":1}`}, fail: true, errLine: []string{"not connected", "status 404"}},
		{cmd: "module invoke", args: []string{"press-09", "m", "reset", "--timeout", "1s"}, fail: true, errLine: []string{"--timeout"}},
		{cmd: "module invoke", args: []string{"press-09", "m", "reset", "--payload", "not json"}, fail: true, errLine: []string{"--payload"}},

		// remote troubleshooting through the agent: press-09 is offline
		// first (404 at once), then its agent runs again (e2e
		// TestRemoteTroubleshooting has the whole story)
		{cmd: "device ping", args: []string{"press-09"}, fail: true, errLine: []string{"device press-09 is not connected", "status 404"}},
		{cmd: "device logs", args: []string{"press-09", "m"}, fail: true, errLine: []string{"not connected", "status 404"}},
		{cmd: "device logs", args: []string{"press-09", "m", "--since", "yesterday"}, fail: true, errLine: []string{"--since", "not a time"}},
		{cmd: "device restart-module", args: []string{"press-09", "m"}, fail: true, errLine: []string{"not connected", "status 404"}},
		{cmd: "device support-bundle", args: []string{"press-09"}, fail: true, errLine: []string{"--out"}},
		{cmd: "device support-bundle", args: []string{"press-09", "--out", "{tmp}/offline.zip"}, fail: true, errLine: []string{"not connected", "status 404"}},
		{cmd: "device ping", args: []string{"press-09"}, run: withLiveAgent("press-09"), lines: []string{`device press-09 answered in \S+`}},
		{cmd: "device ping", args: []string{"press-09", "-o", "json"}, json: &struct {
			Device      string `json:"device"`
			Answered    bool   `json:"answered"`
			RoundTripMs int64  `json:"roundTripMs"`
		}{}},
		{cmd: "device logs", args: []string{"press-09", "m"}, retry: true, lines: []string{`module m started, pid \d+`, `module m writes to stderr too`}},
		{cmd: "device logs", args: []string{"press-09", "edgeAgent", "--timestamps", "--since", "1h"},
			lines: []string{`\d{4}-\d\d-\d\dT\S+Z agent .*msg="agent starting".*`}, notLines: []string{`.*module m started.*`}},
		{cmd: "device logs", args: []string{"press-09", "m", "--tail", "1", "-o", "json"},
			check: func(t *testing.T, r result, _ any, _ map[string]string) {
				var l fleet.ModuleLogMessage
				if err := json.Unmarshal([]byte(r.stdout), &l); err != nil || l.ID != "m" || l.Device != "press-09" || l.Timestamp.IsZero() || l.Stream == "" {
					t.Errorf("logs -o json: %v %s", err, r.stdout)
				}
			}},
		{cmd: "device restart-module", args: []string{"press-09", "m"}, lines: []string{`module m of device press-09 restarted`}},
		{cmd: "device restart-module", args: []string{"press-09", "ghost", "-o", "json"}, fail: true, errLine: []string{"Module ghost not found", "status 404"}},
		{cmd: "device history", args: []string{"press-09"}, retry: true, lines: []string{`\S+\s+\d+\s+admin\s+module-restarted\s+module m restarted by the operator \(RestartModule\)`}},
		{cmd: "device support-bundle", args: []string{"press-09", "--out", "{tmp}/bundle.zip"}, lines: []string{`wrote \S+/bundle.zip: \d+ bytes, sha256 [0-9a-f]{64}`}},
		{cmd: "device support-bundle", args: []string{"press-09", "--out", "{tmp}/bundle2.zip", "--since", "1h", "-o", "json"}, json: &struct {
			Device string `json:"device"`
			File   string `json:"file"`
			Bytes  int64  `json:"bytes"`
			SHA256 string `json:"sha256"`
		}{}},
		{cmd: "device list", args: []string{"--condition", "tags.location='westus'"},
			lines: []string{`press-01\s+enabled\s+presses-v1\s+.*`, `press-09\s+enabled\s+presses-v1\s+.*`, `simrow-0001\s+enabled\s+presses-v1\s+.*`}},
		{cmd: "enrollment rotate", args: []string{"line-1"}, lines: []string{`name:\s+line-1`, `token:\s+line-1\.\S+`}},
		{cmd: "enrollment rotate", args: []string{"line-2", "-o", "json"}, json: &api.EnrollmentRotation{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if r := v.(*api.EnrollmentRotation); r.Name != "line-2" || !strings.HasPrefix(r.Token, "line-2.") {
					t.Errorf("rotation %+v", r)
				}
			}},
		{cmd: "enrollment delete", args: []string{"line-2"}, lines: []string{`deleted enrollment line-2`}},
		{cmd: "enrollment delete", args: []string{"line-1", "--revoke-devices", "-o", "json"}, json: &enrollmentDeletedJSON{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				d := v.(*enrollmentDeletedJSON)
				slices.Sort(d.RevokedDevices)
				if d.Name != "line-1" || !slices.Equal(d.RevokedDevices, []string{"press-09", "simrow-0001", "simrow-0002", "simrow-0003"}) {
					t.Errorf("deleted %+v", d)
				}
			}},
		{cmd: "enrollment delete", args: []string{"line-1"}, fail: true, errLine: []string{"not found"}},
		{cmd: "deployment delete", args: []string{"fallback", "--dry-run"}, lines: []string{`WOULD\s+DEVICES\s+EXAMPLES`, `keep running it, nothing targeting them\s+[1-9]\d*\s+bulk-\S+, .*`}},
		{cmd: "deployment delete", args: []string{"fallback"}, lines: []string{`deleted deployment fallback`}},
		{cmd: "deployment delete", args: []string{"presses-v1", "-o", "json"}, json: &deletedJSON{}},
		{cmd: "deployment delete", args: []string{"presses-v1"}, fail: true, errLine: []string{"not found"}},

		// a rollout in waves, steered: two devices that never connect
		// keep wave 1 soaking while it is paused, resumed, promoted,
		// aborted and rolled back
		{cmd: "device create", args: []string{"ring-01", "--tag", "ring=canary"}, lines: []string{`deviceId:\s+ring-01`}},
		{cmd: "device create", args: []string{"ring-02", "--tag", "ring=canary"}, lines: []string{`deviceId:\s+ring-02`}},
		{cmd: "deployment create", args: []string{"staged", "--content", "{manifest}", "--target-condition", "tags.ring='canary'", "--priority", "5",
			"--waves", "50%,100%", "--wave-soak", "10m"}, lines: []string{`id:\s+staged`}},
		{cmd: "deployment rollout status", args: []string{"staged"}, retry: true,
			lines: []string{`deployment:\s+staged`, `state:\s+running`, `wave:\s+1 of 2`, `WAVE\s+TARGET\s+STATE\s+SIZE\s+HEALTHY\s+FAILED\s+PENDING\s+STARTED`, `1\s+50%\s+running\s+1\s+0\s+0\s+1\s+\S+`}},
		{cmd: "deployment rollout pause", args: []string{"staged", "--reason", "checking the line"}, lines: []string{`state:\s+paused`}},
		{cmd: "deployment rollout pause", args: []string{"staged"}, fail: true, errLine: []string{"paused"}},
		{cmd: "deployment rollout resume", args: []string{"staged", "-o", "json"}, json: &fleet.RolloutStatus{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if st := v.(*fleet.RolloutStatus); st.State != fleet.RolloutRunning || st.Deployment != "staged" {
					t.Errorf("resumed: %+v", st)
				}
			}},
		{cmd: "deployment rollout promote", args: []string{"staged"}, lines: []string{`state:\s+running`, `reason:\s+promote by admin`}},
		{cmd: "deployment rollout abort", args: []string{"staged"}, lines: []string{`state:\s+halted \(aborted\)`}},
		{cmd: "deployment rollout rollback", args: []string{"staged"}, lines: []string{`state:\s+rolled-back( \(aborted\))?`, `reason:\s+rollback by admin`}},
		{cmd: "deployment rollout status", args: []string{"staged", "--consistent", "-o", "json"}, json: &fleet.RolloutStatus{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if st := v.(*fleet.RolloutStatus); st.State != fleet.RolloutRolledBack {
					t.Errorf("after the rollback: %+v", st)
				}
			}},
		{cmd: "deployment rollout status", args: []string{"presses-v1"}, fail: true, errLine: []string{"not found"}},
		{cmd: "deployment delete", args: []string{"staged"}, lines: []string{`deleted deployment staged`}},

		// cluster: a second node joins with the join token, and is removed
		{cmd: "cluster join-token", lines: []string{`APL1[0-9a-f]{64}::\S+`}},
		{cmd: "cluster join-token", args: []string{"-o", "json"}, json: &api.JoinTokenReply{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				vars["joinToken"] = v.(*api.JoinTokenReply).JoinToken
			}},
		{cmd: "cluster members", run: joinSecondNode,
			lines: []string{`ID\s+ADDRESS\s+ROLE\s+VOTER\s+.*`, `n1 \(answered\)\s+\S+\s+leader\s+yes\s+.*`, `n2\s+\S+\s+follower\s+yes\s+.*`}},
		{cmd: "cluster members", args: []string{"-o", "json"}, json: &api.ClusterView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if c := v.(*api.ClusterView); c.Self != "n1" || c.Leader != "n1" || len(c.Members) != 2 {
					t.Errorf("cluster %+v", c)
				}
			}},
		// Removing a node revokes its certificate and rotates both tokens
		// (the CLI on this machine reads the new admin token from the data
		// directory).
		{cmd: "cluster remove", args: []string{"n2"}, lines: []string{`removed:\s+n2`, `certificateRevoked:\s+yes .*`, `adminToken:\s+\S{43}`, `joinToken:\s+APL1[0-9a-f]{64}::\S+`}},
		{cmd: "cluster remove", args: []string{"n2", "-o", "json"}, fail: true, errLine: []string{"n2"}},
		{cmd: "cluster members", args: []string{"-o", "json"}, json: &api.ClusterView{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				if c := v.(*api.ClusterView); len(c.Members) != 1 || c.Members[0].ID != "n1" {
					t.Errorf("after remove: %+v", c.Members)
				}
			}},

		// backup and restore
		{cmd: "backup", args: []string{"--out", "{tmp}/b.tar"}, lines: []string{`wrote \S+/b.tar: \d+ bytes, state at raft index \d+ from node n1, in .*`}},
		{cmd: "backup", args: []string{"--out", "{tmp}/b2.tar", "-o", "json"}, json: &backupJSON{},
			check: func(t *testing.T, _ result, v any, _ map[string]string) {
				b := v.(*backupJSON)
				if b.Node != "n1" || b.Bytes == 0 || b.AppliedIndex == 0 {
					t.Errorf("backup %+v", b)
				}
				if st, err := os.Stat(b.File); err != nil || st.Mode().Perm() != 0o600 || st.Size() != b.Bytes {
					t.Errorf("backup file %s: %v %v", b.File, st, err)
				}
			}},
		{cmd: "backup", fail: true, errLine: []string{"--out"}},
		{cmd: "restore", args: []string{"{tmp}/b.tar", "--data-dir", "{tmp}/restored", "--node-id", "r1", "--raft-addr", "{raft}"},
			lines: []string{`restored the state at raft index \d+ .*`, `start it with: appliance serve --data-dir \S+ --node-id r1 --raft-addr \S+`}},
		{cmd: "restore", args: []string{"{tmp}/b2.tar", "--data-dir", "{tmp}/restored2", "--node-id", "r2", "--raft-addr", "{raft}", "-o", "json"}, json: &restoreJSON{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				if r := v.(*restoreJSON); r.NodeID != "r2" || r.DataDir != filepath.Join(vars["tmp"], "restored2") || r.AppliedIndex == 0 {
					t.Errorf("restore %+v", r)
				}
			}},
		{cmd: "restore", args: []string{"{tmp}/b.tar", "--data-dir", "{tmp}/restored", "--node-id", "r1", "--raft-addr", "{raft}"}, fail: true, errLine: []string{"restored"}},

		// Token rotations last: the table's node keeps working with the
		// new tokens, which the CLI reads from the data directory.
		{cmd: "cluster rotate-join-token", lines: []string{`APL1[0-9a-f]{64}::\S+`}},
		{cmd: "cluster rotate-join-token", args: []string{"-o", "json"}, json: &api.JoinTokenReply{}},
		{cmd: "cluster rotate-admin-token", lines: []string{`\S{43}`}},
		{cmd: "cluster rotate-admin-token", args: []string{"-o", "json"}, json: &api.AdminTokenReply{},
			check: func(t *testing.T, _ result, v any, vars map[string]string) {
				vars["adminToken"] = v.(*api.AdminTokenReply).AdminToken
			}},
		{cmd: "device list", args: []string{"--token", "{adminToken}", "--limit", "1"}, lines: []string{`DEVICE\s+STATUS\s+APPLIED\s+TAGS`}},
		{cmd: "device list", args: []string{"--token", "wrong"}, fail: true, errLine: []string{"token"}},
	}
}

// tailWhileSimSends runs `appliance events tail` (with --count) while
// simrow-0001, a device the sim row enrolled, sends telemetry through
// `appliance sim`, until the tail has what it counts.
func tailWhileSimSends(t *testing.T, tc *cliTable, args []string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan result, 1)
	go func() { done <- cliContext(ctx, t, tc.srv.dataDir, args...) }()
	for {
		cli(t, tc.srv.dataDir, "sim", "--server", tc.vars["mqtt"], "--ca-file", tc.vars["ca"], "--devices", "1", "--enroll-token", tc.vars["token"],
			"--prefix", "simrow", "--telemetry-rate", "5", "--duration", "2s").mustSucceed(t)
		select {
		case r := <-done:
			return r
		default:
		}
		if ctx.Err() != nil {
			t.Fatal("the tail got nothing while the device sent telemetry")
		}
	}
}

// runAgentUntilReported runs `appliance agent` until the device has
// enrolled, connected and reported to the node, then interrupts it as
// Ctrl-C does: it must exit 0.
func runAgentUntilReported(deviceID string) func(t *testing.T, tc *cliTable, args []string) result {
	return func(t *testing.T, tc *cliTable, args []string) result {
		t.Helper()
		cmd := exec.Command(binary, args...)
		var out, errb syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		eventually(t, deviceID+" enrolled, connected and reporting", time.Minute, func() bool {
			select {
			case err := <-done:
				t.Fatalf("the agent exited (%v):\n%s", err, errb.String())
			default:
			}
			v, err := tc.srv.client().Device(context.Background(), deviceID, false)
			return err == nil && v.ConnectionState == api.Connected && v.Reported != nil
		})
		cmd.Process.Signal(syscall.SIGINT)
		var err error
		select {
		case err = <-done:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			t.Fatal("the agent did not exit within a minute of SIGINT")
		}
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != 0 {
			t.Logf("agent stderr:\n%s", errb.String())
		}
		return result{code: code, stdout: out.String(), stderr: errb.String()}
	}
}

// withLiveAgent starts deviceID's agent again (the table's first agent,
// enrolled then stopped: same data directory), runs the row once it is
// connected, and leaves it running until the test ends.
func withLiveAgent(deviceID string) func(t *testing.T, tc *cliTable, args []string) result {
	return func(t *testing.T, tc *cliTable, args []string) result {
		t.Helper()
		cmd := exec.Command(binary, "agent", "--server", tc.vars["mqtt"], "--ca-file", tc.vars["ca"], "--device-id", deviceID,
			"--enroll-token", tc.vars["token"], "--runtime", "process", "--data-dir", tc.vars["tmp"]+"/agent")
		var errb syncBuffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		tc.t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-done:
			case <-time.After(time.Minute):
				cmd.Process.Kill()
			}
		})
		eventually(t, deviceID+"'s agent connected again and answering", time.Minute, func() bool {
			select {
			case <-done:
				t.Fatalf("the agent exited:\n%s", errb.String())
			default:
			}
			return cli(t, tc.srv.dataDir, "device", "ping", deviceID).code == 0
		})
		return cli(t, tc.srv.dataDir, args...)
	}
}

// joinSecondNode starts a node that joins the table's node with the join
// token (as `appliance serve --join` does for an operator), then runs the
// row: `cluster members`.
func joinSecondNode(t *testing.T, tc *cliTable, args []string) result {
	t.Helper()
	raft := freePort(t)
	n2 := startServer(t, t.TempDir(), "--node-id", "n2", "--raft-addr", raft,
		"--join", "https://"+members(t, tc.srv).Members[0].Address, "--join-token", tc.vars["joinToken"])
	tc.vars["n2dir"] = n2.dataDir
	eventually(t, "n2 a voter", time.Minute, func() bool {
		v := members(t, tc.srv)
		return len(v.Members) == 2 && v.Members[1].Voter
	})
	return cli(t, tc.srv.dataDir, args...)
}

// TestCLI_HistoryFlags: `serve --history-per-key` and `--history-retention`
// bound what `deployment history` shows. A deployment changed four times
// keeps its two newest events; a deployment whose creation is older than
// the retention when it next changes keeps only that change.
func TestCLI_HistoryFlags(t *testing.T) {
	const retention = 6 * time.Second
	dir := t.TempDir()
	startServer(t, dir, "--history-per-key", "2", "--history-retention", retention.String())
	manifest := writeManifest(t)
	history := func(id string) []api.HistoryEvent {
		r := cli(t, dir, "deployment", "history", id, "-o", "json").mustSucceed(t)
		return *decodeStrict(t, r.stdout, &[]api.HistoryEvent{}).(*[]api.HistoryEvent)
	}
	kinds := func(evs []api.HistoryEvent) string {
		var k []string
		for _, e := range evs {
			k = append(k, fmt.Sprintf("%s@%d", e.Kind, e.Index))
		}
		return strings.Join(k, " ")
	}

	created := time.Now()
	cli(t, dir, "deployment", "create", "old", "--content", manifest, "--target-condition", "*").mustSucceed(t)
	cli(t, dir, "deployment", "create", "busy", "--content", manifest, "--target-condition", "*").mustSucceed(t)
	var last string
	for p := 1; p <= 3; p++ {
		r := cli(t, dir, "deployment", "update", "busy", "--priority", fmt.Sprint(p), "-o", "json").mustSucceed(t)
		last = decodeStrict(t, r.stdout, &api.DeploymentView{}).(*api.DeploymentView).Etag
	}
	var evs []api.HistoryEvent
	eventually(t, "busy's last update in its history", time.Minute, func() bool {
		evs = history("busy")
		return len(evs) > 0 && fmt.Sprint(evs[0].Index) == last
	})
	if len(evs) != 2 || evs[0].Kind != "updated" || evs[1].Kind != "updated" {
		t.Fatalf("busy's history with --history-per-key 2: %s; want its two newest updates", kinds(evs))
	}
	eventually(t, "old's creation in its history", time.Minute, func() bool { return len(history("old")) == 1 })

	// Its creation is older than the retention when it changes again.
	time.Sleep(time.Until(created.Add(retention + time.Second)))
	r := cli(t, dir, "deployment", "update", "old", "--priority", "5", "-o", "json").mustSucceed(t)
	etag := decodeStrict(t, r.stdout, &api.DeploymentView{}).(*api.DeploymentView).Etag
	eventually(t, "old's update in its history", time.Minute, func() bool {
		evs = history("old")
		return len(evs) > 0 && fmt.Sprint(evs[0].Index) == etag
	})
	if len(evs) != 1 {
		t.Fatalf("old's history with --history-retention %s: %s; want only the update (its creation expired)", retention, kinds(evs))
	}
}

// identityKey is the primary key of the identities writeIdentities
// writes (base64 of 32 bytes, as Azure's): an export must never hold it.
const identityKey = "cHJpbWFyeS1rZXktb2YtaW1wb3J0ZWQtZGV2aWNlcyE="

// writeIdentities writes three lines of Azure's device-identity export
// format: two devices with keys and tags, and between them one whose id
// is not valid.
func writeIdentities(t *testing.T) string {
	t.Helper()
	line := func(id string) string {
		return `{"id":"` + id + `","eTag":"AAAAAAAAAAE=","status":"enabled","authentication":{"symmetricKey":{"primaryKey":"` + identityKey +
			`","secondaryKey":"c2Vjb25kYXJ5LWtleS1vZi1pbXBvcnRlZC1kZXZpY2VzIQ=="},"type":"sas"},"tags":{"environment":"migrated"}}`
	}
	path := filepath.Join(t.TempDir(), "identities.jsonl")
	if err := os.WriteFile(path, []byte(line("imp-01")+"\n"+line("bad/id")+"\n"+line("imp-02")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
