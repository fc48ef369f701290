//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"appliance/internal/boltcheck/boltchecktest"
)

// TestStorageFaults_Serve is issue 13's first acceptance item with the
// real binary (raftstore's TestStorageFaults and node's TestDataDirFaults
// damage every file byte by byte in process). A controller serves a fleet
// with a '*' deployment; an agent runs its module. The controller stops,
// and `appliance serve` is started on damaged copies of its data
// directory, on the same device port:
//   - a damaged device record in state.db (the case issue 13 found: the
//     old build started and sent the agent an empty document, and it
//     removed its module), a damaged command in the raft log, the log cut
//     short, a damaged CA certificate, a damaged history page: serve exits
//     non-zero, its last stderr line is one "error: ..." naming the file,
//     and no panic trace; the agent, which keeps retrying meanwhile, keeps
//     running its module;
//   - state.db's newest meta page damaged (bbolt falls back one
//     transaction, which the log replays): serve starts with the same
//     fleet, and the agent is sent the same deployment and keeps its
//     module running.
func TestStorageFaults_Serve(t *testing.T) {
	golden := t.TempDir()
	mqttAddr := freePort(t)
	srv := startServer(t, golden, "--mqtt-addr", mqttAddr)
	for i := range 12 {
		cli(t, golden, "device", "create", fmt.Sprintf("press-%02d", i), "--tag", fmt.Sprintf("line=%d", i%3)).mustSucceed(t)
	}
	r := cli(t, golden, "enrollment", "create", "line-1", "--tag", "line=1", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	if err := json.Unmarshal([]byte(r.stdout), &enr); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	manifest := processManifest(t, out, map[string]map[string]any{"work": module("running", "always", nil)})
	cli(t, golden, "deployment", "create", "everywhere", "--content", manifest, "--target-condition", "*").mustSucceed(t)
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	ca, err := os.ReadFile(srv.caFile())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	startAgent(t, "--server", "mqtts://"+mqttAddr, "--ca-file", caFile, "--device-id", "press-99",
		"--enroll-token", enr.Token, "--data-dir", t.TempDir(), "--keepalive", "2s")
	eventually(t, "the agent runs its module", 30*time.Second, func() bool { _, ok := alivePid(out, "work"); return ok })
	pid, _ := alivePid(out, "work")
	want := fleetList(t, golden)
	srv.stop()

	moduleRuns := func(t *testing.T) {
		t.Helper()
		if p, ok := alivePid(out, "work"); !ok || p != pid {
			t.Fatalf("the agent's module stopped or was restarted (pid %d, alive %v; was %d)", p, ok, pid)
		}
	}
	for _, tc := range []struct {
		name, file string
		damage     func(t *testing.T, path string)
		starts     bool
	}{
		{name: "a device record in state.db", file: "raft/state.db", damage: func(t *testing.T, path string) {
			boltchecktest.Flip(t, path, boltchecktest.LiveOffset(t, path, []byte(`{"deviceId":"press-07"`)), 0x01)
		}},
		{name: "a command in the raft log", file: "raft/log/00000000000000000001.seg", damage: func(t *testing.T, path string) {
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			off := bytes.Index(raw, []byte(`"id":"everywhere"`))
			if off < 0 {
				t.Fatalf("the deployment's command is not in %s", path)
			}
			boltchecktest.Flip(t, path, int64(off)+8, 0x01)
		}},
		{name: "the raft log cut in half", file: "raft/log/00000000000000000001.seg", damage: func(t *testing.T, path string) {
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, st.Size()/2); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "the CA certificate", file: "tls/ca.crt", damage: func(t *testing.T, path string) {
			st, _ := os.Stat(path)
			boltchecktest.Flip(t, path, st.Size()/2, 0x01)
		}},
		{name: "a history page", file: "history.db", damage: func(t *testing.T, path string) {
			for _, s := range boltchecktest.Spots(t, path, 1) {
				if strings.Contains(s.What, "leaf page") && strings.Contains(s.What, "flags") {
					boltchecktest.Flip(t, path, s.Off, 0x01)
					return
				}
			}
			t.Fatal("no leaf page in history.db")
		}},
		{name: "state.db's newest meta page", file: "raft/state.db", starts: true, damage: func(t *testing.T, path string) {
			// bbolt writes transaction n's meta page at page n%2; damage
			// both fields of the newer one (its checksum), whichever it is.
			newest := newestMetaPage(t, path)
			boltchecktest.Flip(t, path, int64(newest*4096+16+56), 0x01)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDataDir(t, golden)
			path := filepath.Join(dir, tc.file)
			tc.damage(t, path)
			s := launchServer(t, dir, "--mqtt-addr", mqttAddr)
			if tc.starts {
				s.waitReady()
				defer s.stop()
				if got := fleetList(t, dir); got != want {
					t.Fatalf("devices after the restart:\n%s\nwant\n%s", got, want)
				}
				eventually(t, "the agent reconnected and reported the same deployment", 30*time.Second, func() bool {
					doc, at := reported(t, dir, "press-99")
					return doc.DeploymentID == "everywhere" && doc.LastDesiredStatus.Code == 200 && !at.IsZero()
				})
				moduleRuns(t)
				return
			}
			select {
			case <-s.exited:
			case <-time.After(60 * time.Second):
				t.Fatalf("serve on a damaged %s did not exit; log:\n%s", tc.file, s.logs.String())
			}
			if code := s.cmd.ProcessState.ExitCode(); code == 0 {
				t.Fatalf("serve on a damaged %s exited 0", tc.file)
			}
			logs := strings.TrimSpace(s.logs.String())
			if strings.Contains(logs, "panic:") || strings.Contains(logs, "goroutine ") {
				t.Fatalf("a panic trace:\n%s", logs)
			}
			lines := strings.Split(logs, "\n")
			last := lines[len(lines)-1]
			named := strings.Contains(last, path) || strings.Contains(last, filepath.Dir(path))
			if !strings.HasPrefix(last, "error: ") || !named {
				t.Fatalf("last line %q is not one error naming %s", last, path)
			}
			t.Logf("refused: %s", last)
			// The agent kept retrying against a node that never served it.
			time.Sleep(2 * time.Second)
			moduleRuns(t)
		})
	}
}

// fleetList is the devices (id, tags, status, etag, the deployments that
// target them) and deployments a node serves, without what changes with
// connections and restarts.
func fleetList(t *testing.T, dataDir string) string {
	t.Helper()
	var devices []struct {
		ID             string         `json:"deviceId"`
		Tags           map[string]any `json:"tags"`
		Status, Etag   string
		Configurations map[string]struct{ Status string }
	}
	if err := json.Unmarshal([]byte(cli(t, dataDir, "device", "list", "-o", "json").mustSucceed(t).stdout), &devices); err != nil {
		t.Fatal(err)
	}
	var deployments []struct {
		ID, TargetCondition, Etag string
	}
	if err := json.Unmarshal([]byte(cli(t, dataDir, "deployment", "list", "-o", "json").mustSucceed(t).stdout), &deployments); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal([]any{devices, deployments})
	if len(devices) == 0 || len(deployments) == 0 {
		t.Fatalf("an empty fleet: %s", b)
	}
	return string(b)
}

// newestMetaPage is the page (0 or 1) of the bbolt file's newer meta.
func newestMetaPage(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	txid := func(page int) uint64 {
		off := page*4096 + 16 + 48
		var v uint64
		for i := 7; i >= 0; i-- {
			v = v<<8 | uint64(b[off+i])
		}
		return v
	}
	if txid(1) > txid(0) {
		return 1
	}
	return 0
}

// copyDataDir copies a stopped node's data directory.
func copyDataDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}
