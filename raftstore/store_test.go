package raftstore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testenv"
)

func openTestStore(t testing.TB, dir, id string, bootstrap bool, obs Observer) *Store {
	t.Helper()
	return openTestStoreInBoot(t, dir, id, bootstrap, obs, "", 0)
}

// openTestStoreInBoot is openTestStore on a machine whose boot id is boot
// (the real one when empty), keeping trailingLogs entries after a snapshot
// (the default when 0).
func openTestStoreInBoot(t testing.TB, dir, id string, bootstrap bool, obs Observer, boot string, trailingLogs uint64) *Store {
	t.Helper()
	cfg := Config{
		Dir: dir, NodeID: id, BindAddr: "127.0.0.1:0", Bootstrap: bootstrap, Observer: obs, Logger: testLogger(t),
		HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond,
		TrailingLogs: trailingLogs,
	}
	if boot != "" {
		cfg.bootID = func() (string, error) { return boot, nil }
	}
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if bootstrap {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.WaitLeader(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func putDevice(t testing.TB, s *Store, id string, tags map[string]any) *Result {
	t.Helper()
	res, err := s.Apply(context.Background(), PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: id, Tags: tags}})
	if err != nil {
		t.Fatalf("put device %s: %v", id, err)
	}
	return res
}

func deviceIDs(t *testing.T, s *Store) []string {
	t.Helper()
	var ids []string
	if err := s.View(func(r *Reader) error {
		return r.Devices("", func(d fleet.Device) bool { ids = append(ids, d.ID); return true })
	}); err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestStore_RestartResumes closes a node and reopens it from the same
// directory: with its state file, after losing its state file (raft
// replays the log), after a snapshot plus the loss of the state file (raft
// installs the snapshot then replays the rest), and after the two ways a
// run can end without closing the state file, which is committed without
// fsync (statefile.go). No test can cut the machine's power; a machine
// restart is simulated by the boot id changing between the runs, and what
// the lost page cache could leave on disk by overwriting the middle of the
// state file with garbage.
func TestStore_RestartResumes(t *testing.T) {
	for _, tc := range []struct {
		name          string
		snapshot      bool
		loseStateFile bool
		// leftOpen: the first run ends without closing the state file (its
		// open marker stays); rebooted: the second run is in another boot,
		// and the state file is torn.
		leftOpen, rebooted bool
	}{
		{name: "state file kept"},
		{name: "state file lost, log replayed", loseStateFile: true},
		{name: "state file lost after a snapshot", loseStateFile: true, snapshot: true},
		{name: "state file kept after a snapshot", snapshot: true},
		// (A real process crash, with the file never synced, is
		// TestStore_ProcessCrashKeepsState.)
		{name: "process stopped without closing, same boot: file kept", leftOpen: true, snapshot: true},
		{name: "machine went down with the file open: torn file rebuilt from the log", leftOpen: true, rebooted: true},
		{name: "machine went down with the file open after a snapshot: rebuilt", leftOpen: true, rebooted: true, snapshot: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			statePath := filepath.Join(dir, "state.db")
			// Two trailing logs: a snapshot compacts the log behind it, so
			// a state rebuilt without the snapshot would miss devices.
			s := openTestStoreInBoot(t, dir, "n1", true, nil, "boot-1", 2)
			for i := range 20 {
				putDevice(t, s, fmt.Sprintf("dev-%02d", i), map[string]any{"i": float64(i)})
				if tc.snapshot && i == 9 {
					if err := s.Snapshot(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if _, err := s.Apply(context.Background(), DeleteDevice{ID: "dev-05"}); err != nil {
				t.Fatal(err)
			}
			want := deviceIDs(t, s)
			applied := s.AppliedIndex()
			if _, err := os.Stat(statePath + openMarkerSuffix); err != nil {
				t.Fatalf("while open, the state file has no open marker: %v", err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(statePath + openMarkerSuffix); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("after a clean close the open marker is still there (%v)", err)
			}
			if tc.loseStateFile {
				if err := os.Remove(statePath); err != nil {
					t.Fatal(err)
				}
			}
			if tc.leftOpen {
				// What a run that never reached close leaves: the marker
				// of its boot.
				if err := os.WriteFile(statePath+openMarkerSuffix, []byte("boot-1\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			boot2 := "boot-1"
			if tc.rebooted {
				boot2 = "boot-2"
				tearFile(t, statePath)
			}
			s2 := openTestStoreInBoot(t, dir, "n1", true, nil, boot2, 2)
			defer s2.Close()
			// A restarted single node must re-elect itself and catch up.
			deadline := time.Now().Add(10 * time.Second)
			for s2.AppliedIndex() < applied && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			got := deviceIDs(t, s2)
			if fmt.Sprint(got) != fmt.Sprint(want) || len(got) != 19 {
				t.Fatalf("after restart devices = %v\nwant %v", got, want)
			}
			_, err := os.Stat(statePath + uncleanSuffix)
			if setAside := err == nil; setAside != tc.rebooted {
				t.Errorf("state file set aside as %s: %v, want %v", uncleanSuffix, setAside, tc.rebooted)
			}
			// And it still takes writes.
			putDevice(t, s2, "after-restart", nil)
		})
	}
}

// tearFile overwrites the middle of path with garbage, the kind of file a
// machine crash can leave of one written without fsync.
func tearFile(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	garbage := make([]byte, st.Size()/2)
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	if _, err := f.WriteAt(garbage, st.Size()/4); err != nil {
		t.Fatal(err)
	}
	// The meta pages too, or bbolt would open it and fail later.
	if _, err := f.WriteAt(garbage[:8192], 0); err != nil {
		t.Fatal(err)
	}
}

// recorder is an Observer that keeps every change it sees.
type recorder struct {
	mu       sync.Mutex
	changes  []Change
	restored int
	halted   error
}

func (r *recorder) Applied(c []Change) {
	r.mu.Lock()
	r.changes = append(r.changes, c...)
	r.mu.Unlock()
}
func (r *recorder) Restored(*Reader) error { r.mu.Lock(); r.restored++; r.mu.Unlock(); return nil }
func (r *recorder) Halted(err error)       { r.mu.Lock(); r.halted = err; r.mu.Unlock() }

// TestStore_ThreeNodes runs three stores in one process on loopback: writes
// on the leader reach every replica, the followers refuse writes, and every
// observer sees the same changes in the same order.
func TestStore_ThreeNodes(t *testing.T) {
	recs := map[string]*recorder{"n1": {}, "n2": {}, "n3": {}}
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.Observer = recs[cfg.NodeID] })
	ctx := context.Background()
	for i := range 10 {
		putDevice(t, stores[0], fmt.Sprintf("d%d", i), map[string]any{"n": float64(i)})
	}
	if _, err := stores[1].Apply(ctx, DeleteDevice{ID: "d1"}); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("write on a follower: err %v, want ErrNotLeader", err)
	}
	if err := stores[1].VerifyLeader(ctx); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("follower VerifyLeader: %v", err)
	}
	if err := stores[0].VerifyLeader(ctx); err != nil {
		t.Fatalf("leader VerifyLeader: %v", err)
	}
	want := stores[0].AppliedIndex()
	for _, s := range stores {
		waitFor(t, s.NodeID()+" applies the writes", func() bool { return s.AppliedIndex() >= want })
		if got := deviceIDs(t, s); len(got) != 10 {
			t.Fatalf("%s has devices %v", s.NodeID(), got)
		}
	}
	recs["n1"].mu.Lock()
	leaderSaw := fmt.Sprint(changeKeys(recs["n1"].changes))
	recs["n1"].mu.Unlock()
	for _, id := range []string{"n2", "n3"} {
		recs[id].mu.Lock()
		saw := fmt.Sprint(changeKeys(recs[id].changes))
		recs[id].mu.Unlock()
		if saw != leaderSaw {
			t.Fatalf("%s saw changes %s, leader saw %s", id, saw, leaderSaw)
		}
	}
}

func changeKeys(cs []Change) []string {
	var out []string
	for _, c := range cs {
		out = append(out, fmt.Sprintf("%d:%d:%s", c.Index, c.Kind, c.ID))
	}
	return out
}

// Rotated admin and join tokens are kept by the state machine; a token too
// short to be a secret is refused as invalid and changes nothing.
func TestStore_SetAdminToken(t *testing.T) {
	s := openTestStore(t, t.TempDir(), "n1", true, nil)
	defer s.Close()
	ctx := context.Background()
	if _, err := s.Apply(ctx, SetAdminToken{Token: "short"}); !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("short token: %v; want fleet.ErrInvalid", err)
	}
	token := strings.Repeat("k", 43)
	if _, err := s.Apply(ctx, SetAdminToken{Token: token}); err != nil {
		t.Fatal(err)
	}
	var got string
	if err := s.View(func(r *Reader) error { got = r.AdminToken(); return nil }); err != nil || got != token {
		t.Fatalf("AdminToken() = %q, %v", got, err)
	}
	if _, err := s.Apply(ctx, SetJoinToken{Token: "short"}); !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("short join token: %v; want fleet.ErrInvalid", err)
	}
	join := "APL1" + strings.Repeat("j", 40)
	if _, err := s.Apply(ctx, SetJoinToken{Token: join}); err != nil {
		t.Fatal(err)
	}
	if err := s.View(func(r *Reader) error { got = r.JoinToken(); return nil }); err != nil || got != join {
		t.Fatalf("JoinToken() = %q, %v", got, err)
	}
}

// TestStore_ProcessCrashKeepsState kills a process of this test binary with
// SIGKILL after it acknowledged writes to a state file it never synced,
// then reopens the directory in this process (the same boot): the file is
// kept, not set aside, and holds every acknowledged write. A machine crash
// cannot be staged in a test (TestStore_RestartResumes simulates it).
func TestStore_ProcessCrashKeepsState(t *testing.T) {
	if dir := os.Getenv("RAFTSTORE_CRASH_CHILD_DIR"); dir != "" {
		crashChild(t, dir)
		return
	}
	if _, err := readBootID(); err != nil {
		testenv.Missing(t, "no boot id on this system (%v): the state file is fsynced on every commit there, so there is no unsynced state to keep", err)
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestStore_ProcessCrashKeepsState$", "-test.v")
	cmd.Env = append(os.Environ(), "RAFTSTORE_CRASH_CHILD_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var acked []string
	var lastIndex uint64
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var id string
		if n, _ := fmt.Sscanf(sc.Text(), "acked %s at %d", &id, &lastIndex); n == 2 {
			acked = append(acked, id)
		}
		if sc.Text() == "holding" {
			break
		}
	}
	if len(acked) != 40 {
		t.Fatalf("the child acknowledged %d writes, want 40", len(acked))
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if _, err := os.Stat(filepath.Join(dir, "state.db"+openMarkerSuffix)); err != nil {
		t.Fatalf("the killed process left no open marker: %v", err)
	}

	// Read the state file as it was left: at once, before this node
	// elects itself and raft replays anything from the log.
	s, err := Open(context.Background(), testConfig(t, dir, "n1"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.AppliedIndex(); got < lastIndex {
		t.Errorf("state file's applied index after the crash = %d, want at least %d (the last acknowledged write)", got, lastIndex)
	}
	got := map[string]bool{}
	for _, id := range deviceIDs(t, s) {
		got[id] = true
	}
	for _, id := range acked {
		if !got[id] {
			t.Errorf("acknowledged write %s is missing after the crash", id)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "state.db"+uncleanSuffix)); err == nil {
		t.Errorf("the state file was set aside after a process crash in the same boot")
	}
}

// crashChild writes 40 devices, says which were acknowledged, and waits to
// be killed.
func crashChild(t *testing.T, dir string) {
	s := openTestStore(t, dir, "n1", true, nil)
	for i := range 40 {
		id := fmt.Sprintf("dev-%02d", i)
		res := putDevice(t, s, id, nil)
		fmt.Printf("acked %s at %d\n", id, res.Index)
	}
	fmt.Println("holding")
	time.Sleep(time.Minute)
	t.Fatal("not killed")
}
