package raftstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/boltcheck/boltchecktest"
)

// TestStorageFaults is issue 13's first acceptance item for the raft
// directory (the node-level files are node's TestDataDirFaults, the real
// binary e2e's TestStorageFaults_Serve). A stopped node's directory holds
// a raft log, a snapshot with log entries after it, and a state file. For
// every file in it, a copy is damaged: single bytes flipped in each kind
// of bbolt page (both meta pages, the free list, branch and leaf pages:
// headers, element headers, keys, values), bytes across the snapshot's
// meta.json, and the file cut short. Each copy is then opened, and either
//   - Open refuses with one line that names the damaged file and wraps
//     ErrCorrupt (and nothing panicked), or
//   - the store starts and, once it says it has replayed its log, holds
//     exactly the state it had, and so does its observer's derived state.
//
// No case may start with a different state.
func TestStorageFaults(t *testing.T) {
	golden, want, wantDevices := faultFixture(t)
	type damage struct {
		file, what string
		apply      func(t *testing.T, path string)
	}
	flip := func(off int64, mask byte) func(*testing.T, string) {
		return func(t *testing.T, path string) { boltchecktest.Flip(t, path, off, mask) }
	}
	truncate := func(size int64) func(*testing.T, string) {
		return func(t *testing.T, path string) {
			if err := os.Truncate(path, size); err != nil {
				t.Fatal(err)
			}
		}
	}
	var cases []damage
	err := filepath.WalkDir(golden, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(golden, path)
		st, err := os.Stat(path)
		if err != nil || st.Size() == 0 {
			return err // the lock file: nothing in it to damage
		}
		size := st.Size()
		switch filepath.Ext(path) {
		case ".db", ".bin":
			for _, s := range boltchecktest.Spots(t, path, 4) {
				cases = append(cases, damage{rel, s.What, flip(s.Off, 0x01)})
			}
			for _, s := range []struct {
				size int64
				what string
			}{{0, "empty"}, {4096, "one page"}, {size / 2, "half"}, {size - 4096, "last page gone"}, {size - 1, "last byte gone"}} {
				cases = append(cases, damage{rel, "cut to " + s.what, truncate(s.size)})
			}
		default: // meta.json
			for i := int64(0); i < 12; i++ {
				off := i * size / 12
				cases = append(cases, damage{rel, fmt.Sprintf("byte %d", off), flip(off, 0x01)})
			}
			cases = append(cases, damage{rel, "cut in half", truncate(size / 2)}, damage{rel, "empty", truncate(0)})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	outcome := map[string]int{}
	for _, c := range cases {
		t.Run(c.file+": "+c.what, func(t *testing.T) {
			dir := copyDir(t, golden)
			path := filepath.Join(dir, c.file)
			c.apply(t, path)
			damaged, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			obs := &deviceSet{}
			cfg := testConfig(t, dir, "n1")
			cfg.Bootstrap = true // as `appliance serve` without --join
			cfg.Observer = obs
			cfg.bootID = func() (string, error) { return "boot-1", nil }
			s, err := Open(context.Background(), cfg)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("refused without ErrCorrupt: %v", err)
				}
				msg := err.Error()
				if !strings.Contains(msg, path) || strings.Contains(msg, "\n") {
					t.Fatalf("refusal does not name %s in one line: %q", path, msg)
				}
				if after, _ := os.ReadFile(path); string(after) != string(damaged) {
					t.Fatalf("refusing changed %s", c.file)
				}
				t.Logf("refused: %v", err)
				mu.Lock()
				outcome["refused"]++
				mu.Unlock()
				return
			}
			defer s.Close()
			waitFor(t, "the log is replayed", s.Replayed)
			if got := rawState(t, s.fsm); got != want {
				t.Fatalf("started with a different state:\n%s\nwant\n%s", got, want)
			}
			if got := obs.ids(); got != wantDevices {
				t.Fatalf("derived state: devices %s, want %s", got, wantDevices)
			}
			t.Logf("started with the same state")
			mu.Lock()
			outcome["started with the same state"]++
			mu.Unlock()
		})
	}
	t.Logf("%d damaged copies: %v", len(cases), outcome)
}

// faultFixture builds a stopped node's raft directory: a snapshot, a log
// compacted behind it, and writes of every kind after it. It returns the
// directory, its state (rawState) and its device ids.
func faultFixture(t *testing.T) (dir, state, devices string) {
	t.Helper()
	dir = t.TempDir()
	s := openTestStoreInBoot(t, dir, "n1", true, nil, "boot-1", 4)
	ctx := testContext(t)
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	apply := func(c Command) {
		t.Helper()
		if _, err := s.Apply(ctx, c); err != nil {
			t.Fatalf("%T: %v", c, err)
		}
	}
	for i := range 40 {
		apply(PutDevice{Time: t0, Device: fleet.Device{ID: fmt.Sprintf("press-%02d", i), Tags: map[string]any{"line": float64(i % 4)}}})
	}
	apply(PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "everywhere", TargetCondition: "*", Content: content("a:1")}})
	apply(PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "line-1", DerivationKey: "k", Tags: map[string]any{"line": 1.0}}})
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		apply(PatchDevice{ID: fmt.Sprintf("press-%02d", i), Tags: map[string]any{"patched": true}, Time: t0})
	}
	apply(PutReports{Reports: []Report{{DeviceID: "press-01", Document: []byte(`{"modules":{}}`), Time: t0}}})
	apply(PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "line-2", TargetCondition: "tags.line=2", Priority: 5, Content: content("b:1")}})
	apply(DeleteDevice{ID: "press-39"})
	apply(SetAdminToken{Token: strings.Repeat("t", 32)})
	state = rawState(t, s.fsm)
	ids := deviceIDs(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, state, strings.Join(ids, ",")
}

// deviceSet is an Observer keeping the device ids it was told of: the
// derived state a node would build.
type deviceSet struct {
	mu  sync.Mutex
	set map[string]bool
}

func (o *deviceSet) Restored(r *Reader) error {
	set := map[string]bool{}
	err := r.Devices("", func(d fleet.Device) bool { set[d.ID] = true; return true })
	o.mu.Lock()
	o.set = set
	o.mu.Unlock()
	return err
}

func (o *deviceSet) Applied(changes []Change) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, c := range changes {
		switch c.Kind {
		case DevicePut:
			o.set[c.ID] = true
		case DeviceDeleted:
			delete(o.set, c.ID)
		}
	}
}

func (o *deviceSet) Halted(error) {}

func (o *deviceSet) ids() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var ids []string
	for id := range o.set {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return strings.Join(ids, ",")
}

// copyDir copies a directory tree into a new temporary directory.
func copyDir(t testing.TB, src string) string {
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

// TestOpen_ChecksBothFilesBeforeUsingEither: the state file's checks and the
// raft directory's run side by side (Open); either one damaged still
// refuses the start, naming it (the state file first when both are), the
// observer is never given state, and nothing stays open: the same process
// opens the repaired directory at once.
func TestOpen_ChecksBothFilesBeforeUsingEither(t *testing.T) {
	golden, want, _ := faultFixture(t)
	damageState := func(t *testing.T, dir string) {
		path := filepath.Join(dir, "state.db")
		for _, s := range boltchecktest.Spots(t, path, 8) {
			if strings.Contains(s.What, "leaf page") {
				boltchecktest.Flip(t, path, s.Off, 0x01)
				return
			}
		}
		t.Fatalf("no leaf page in %s", path)
	}
	damageLog := func(t *testing.T, dir string) {
		segs, err := filepath.Glob(filepath.Join(dir, logDirName, "*.seg"))
		if err != nil || len(segs) == 0 {
			t.Fatalf("no segment in %s: %v", filepath.Join(dir, logDirName), err)
		}
		st, err := os.Stat(segs[0])
		if err != nil {
			t.Fatal(err)
		}
		boltchecktest.Flip(t, segs[0], st.Size()/3, 0x01) // a record's bytes, not the tail's
	}
	for _, tc := range []struct {
		name    string
		damage  []func(*testing.T, string)
		repair  []string // what to copy back from the fixture
		refused string   // the file the refusal names
	}{
		{"state file", []func(*testing.T, string){damageState}, []string{"state.db"}, "state.db"},
		{"raft log", []func(*testing.T, string){damageLog}, []string{logDirName}, logDirName},
		{"both", []func(*testing.T, string){damageLog, damageState}, []string{"state.db", logDirName}, "state.db"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDir(t, golden)
			for _, damage := range tc.damage {
				damage(t, dir)
			}
			obs := &deviceSet{}
			cfg := testConfig(t, dir, "n1")
			cfg.Bootstrap = true
			cfg.Observer = obs
			cfg.bootID = func() (string, error) { return "boot-1", nil }
			before := openFiles(t)
			_, err := Open(context.Background(), cfg)
			var ce *CorruptError
			if !errors.As(err, &ce) || ce.File != filepath.Join(dir, tc.refused) {
				t.Fatalf("Open = %v, want a refusal naming %s", err, tc.refused)
			}
			if obs.ids() != "" {
				t.Fatalf("the observer was given state from a refused directory: %s", obs.ids())
			}
			if after := openFiles(t); after != before {
				t.Fatalf("the refused start left files open: %d before, %d after", before, after)
			}
			// Repaired, the directory opens in this same process: the
			// refused start left no file open or locked.
			for _, f := range tc.repair {
				replaceFrom(t, golden, dir, f)
			}
			s, err := Open(context.Background(), cfg)
			if err != nil {
				t.Fatalf("reopen after the repair: %v", err)
			}
			defer s.Close()
			waitFor(t, "the log is replayed", s.Replayed)
			if got := rawState(t, s.fsm); got != want {
				t.Fatalf("reopened with a different state:\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// openFiles counts the process's open file descriptors.
func openFiles(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count open files: %v", err)
	}
	return len(fds)
}

// replaceFrom replaces the file or directory name in dir by its copy in src.
func replaceFrom(t *testing.T, src, dir, name string) {
	t.Helper()
	dst := filepath.Join(dir, name)
	if err := os.RemoveAll(dst); err != nil {
		t.Fatal(err)
	}
	from := filepath.Join(src, name)
	if st, err := os.Stat(from); err != nil {
		t.Fatal(err)
	} else if st.IsDir() {
		if err := os.CopyFS(dst, os.DirFS(from)); err != nil {
			t.Fatal(err)
		}
		return
	}
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
