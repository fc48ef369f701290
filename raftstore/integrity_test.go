package raftstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
	"appliance/internal/boltcheck/boltchecktest"
)

// digestHolds recomputes the state file's content digest and compares it
// with the stored one.
func digestHolds(t *testing.T, s *Store) {
	t.Helper()
	err := s.fsm.view(func(r *Reader) error {
		var sum uint64
		err := r.tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			return b.ForEach(func(k, v []byte) error {
				if !isDigestKey(name, k) {
					sum += entryHash(name, k, v)
				}
				return nil
			})
		})
		if err != nil {
			return err
		}
		stored := r.tx.Bucket(bucketMeta).Get(keyContentDigest)
		if len(stored) != 16 {
			return fmt.Errorf("no digest stored")
		}
		if idx := binary.BigEndian.Uint64(stored); idx != r.AppliedIndex() {
			return fmt.Errorf("digest of index %d, applied %d", idx, r.AppliedIndex())
		}
		if got := binary.BigEndian.Uint64(stored[8:]); got != sum {
			return fmt.Errorf("stored digest %x, content %x", got, sum)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDigest_EveryCommandKeepsIt applies every command type, accepted and
// rejected, and checks after each that the stored digest is the digest of
// the content: a write that bypassed writer.put/del would show here (and
// make the next open refuse the file). A new command type belongs here.
func TestDigest_EveryCommandKeepsIt(t *testing.T) {
	dir := t.TempDir()
	s := openTestStore(t, dir, "n1", true, nil)
	ctx := testContext(t)
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	cond := "tags.line='2'"
	prio := int64(4)
	for _, c := range []Command{
		PutDevice{Time: t0, Device: fleet.Device{ID: "d1", Tags: map[string]any{"line": "1"}}},
		PutDevice{Time: t0, Device: fleet.Device{ID: "d2"}},
		PutDevice{Time: t0, Device: fleet.Device{ID: "d1", Tags: map[string]any{"line": "2"}}},            // replace
		PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: t0, Device: fleet.Device{ID: "d1"}}, // rejected
		PatchDevice{ID: "d1", Tags: map[string]any{"site": "a"}, Time: t0},
		PatchDevice{ID: "d2", Status: fleet.DeviceDisabled, KeyHashes: &fleet.KeyHashes{Primary: "p", Secondary: "s"}, Time: t0},
		PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "dep", TargetCondition: "*", Content: content("a:1")}},
		PatchDeployment{ID: "dep", TargetCondition: &cond, Priority: &prio, Labels: map[string]string{"team": "x"}, MetricQueries: map[string]string{"q": "*"}, Time: t0},
		PutReports{Reports: []Report{{DeviceID: "d1", Document: []byte(`{"ok":1}`), Time: t0}, {DeviceID: "nobody", Document: []byte(`{}`), Time: t0}}},
		PutReports{Reports: []Report{{DeviceID: "d1", Document: []byte(`{"ok":2}`), Time: t0}}}, // replaces the report
		PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "grp", DerivationKey: "k", Tags: map[string]any{"a": "b"}}},
		PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "grp", Tags: map[string]any{"a": "c"}}},
		SetAdminToken{Token: strings.Repeat("a", 32)},
		SetAdminToken{Token: strings.Repeat("b", 32)},
		SetJoinToken{Token: strings.Repeat("c", 40)},
		SetAdminToken{Token: "short"}, // rejected
		DeleteEnrollment{Name: "grp"},
		DeleteDevice{ID: "d1"}, // and its report
		DeleteDeployment{ID: "dep"},
		DeleteDeployment{ID: "dep"}, // rejected: gone
		ImportDevices{Mode: ImportUpsert, Time: t0, Devices: []ImportedDevice{{Line: 1, ID: "i1", Keys: &fleet.KeyHashes{Primary: "p", Secondary: "s"}}, {Line: 2, ID: "d2", Tags: map[string]any{"a": 1.0}}}},
		ImportDevices{Mode: ImportCreate, Stage: "st", Time: t0, Devices: []ImportedDevice{{Line: 1, ID: "i2"}}},
		FinishImport{Stage: "st", Commit: true, Time: t0},
		ImportDevices{Mode: ImportDelete, Stage: "st2", Time: t0, Devices: []ImportedDevice{{Line: 1, ID: "i2"}}},
		FinishImport{Stage: "st2", Time: t0}, // dropped
		ImportDevices{Mode: ImportDelete, Time: t0, Devices: []ImportedDevice{{Line: 1, ID: "i1"}, {Line: 2, ID: "nobody"}}},
	} {
		if _, err := s.Apply(ctx, c); err != nil && !errors.Is(err, fleet.ErrExists) && !errors.Is(err, fleet.ErrNotFound) && !errors.Is(err, fleet.ErrInvalid) {
			t.Fatalf("%T: %v", c, err)
		}
		digestHolds(t, s)
	}
	want := rawState(t, s.fsm)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openTestStore(t, dir, "n1", true, nil)
	defer s2.Close()
	if got := rawState(t, s2.fsm); got != want {
		t.Fatalf("state after reopening differs:\n%s\nwant\n%s", got, want)
	}
}

// rawState is every entry of every bucket of a state machine but the
// digest, in order, one per line.
func rawState(t *testing.T, f *fsm) string {
	t.Helper()
	var out string
	err := f.view(func(r *Reader) error {
		var err error
		out, err = rawTx(r.tx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rawFileState is rawState of the state file in dir of a closed store.
func rawFileState(t *testing.T, dir string) string {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "state.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var out string
	if err := db.View(func(tx *bolt.Tx) error {
		out, err = rawTx(tx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func rawTx(tx *bolt.Tx) (string, error) {
	var out strings.Builder
	err := tx.ForEach(func(name []byte, b *bolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			if !isDigestKey(name, k) {
				fmt.Fprintf(&out, "%s/%s=%s\n", name, k, v)
			}
			return nil
		})
	})
	return out.String(), err
}

// TestDigest_EarlierReleaseFile: a state file of the previous release has
// no digest and is not refused for it: the first open computes and stores
// one. A file that says it keeps a digest but has none (its key damaged)
// is refused.
func TestDigest_EarlierReleaseFile(t *testing.T) {
	build := func(t *testing.T) (dir, want string) {
		dir = t.TempDir()
		s := openTestStore(t, dir, "n1", true, nil)
		for i := range 5 {
			putDevice(t, s, fmt.Sprintf("d%d", i), map[string]any{"i": float64(i)})
		}
		want = rawState(t, s.fsm)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		return dir, want
	}
	edit := func(t *testing.T, dir string, fn func(meta *bolt.Bucket) error) {
		db, err := bolt.Open(filepath.Join(dir, "state.db"), 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if err := db.Update(func(tx *bolt.Tx) error { return fn(tx.Bucket(bucketMeta)) }); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("previous release: migrated", func(t *testing.T) {
		dir, want := build(t)
		edit(t, dir, func(meta *bolt.Bucket) error {
			if err := meta.SetSequence(0); err != nil {
				return err
			}
			return meta.Delete(keyContentDigest)
		})
		s := openTestStore(t, dir, "n1", true, nil)
		defer s.Close()
		if got := rawState(t, s.fsm); got != want {
			t.Fatalf("state differs after migration:\n%s\nwant\n%s", got, want)
		}
		digestHolds(t, s)
	})
	t.Run("digest key gone: refused", func(t *testing.T) {
		dir, _ := build(t)
		edit(t, dir, func(meta *bolt.Bucket) error { return meta.Delete(keyContentDigest) })
		_, err := Open(context.Background(), testConfig(t, dir, "n1"))
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), filepath.Join(dir, "state.db")) {
			t.Fatalf("open: %v; want a refusal naming state.db", err)
		}
	})
}

// TestEntryChecksums: every command this node proposes carries its
// checksum in the raft entry, proposed here or forwarded from a follower;
// an entry without one (an earlier release's) is applied and accepted on
// restart; a command whose bytes changed in the log is refused at open,
// naming the file and the entry.
func TestEntryChecksums(t *testing.T) {
	peers := newPeerSet()
	stores := newTestCluster(t, 2, func(cfg *Config) { cfg.Forward = peers.forward })
	peers.add(stores...)
	leader, follower := stores[0], stores[1]
	ctx := testContext(t)
	local := putDevice(t, leader, "from-leader", nil)
	fwd, err := follower.Apply(ctx, PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: "from-follower"}})
	if err != nil {
		t.Fatal(err)
	}
	// An earlier release's entry: no extension.
	old, err := Encode(PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: "from-old-release"}})
	if err != nil {
		t.Fatal(err)
	}
	f := leader.raft.Apply(old, 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	oldIndex := f.Index()
	for _, s := range stores {
		if err := s.WaitApplied(ctx, oldIndex); err != nil {
			t.Fatal(err)
		}
		for _, idx := range []uint64{local.Index, fwd.Index} {
			var l raft.Log
			if err := s.logStore.GetLog(idx, &l); err != nil {
				t.Fatal(err)
			}
			if len(l.Extensions) != entryChecksumLen || verifyEntry(&l) != nil {
				t.Fatalf("%s: entry %d has extensions %x", s.NodeID(), idx, l.Extensions)
			}
		}
	}
	if got := deviceIDs(t, follower); strings.Join(got, ",") != "from-follower,from-leader,from-old-release" {
		t.Fatalf("devices %v", got)
	}

	// Restart the follower: its log (with the unchecked entry) passes.
	dir := follower.cfg.Dir
	if err := follower.Close(); err != nil {
		t.Fatal(err)
	}
	reopened := openConfig(t, follower.cfg)
	if err := reopened.Close(); err != nil {
		t.Fatal(err)
	}

	// One byte of a command in the log: the device id of the leader's write.
	raftPath := flipInLog(t, dir, []byte(`"from-leader"`), 2)[0]
	_, err = Open(context.Background(), follower.cfg)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a damaged entry: %v", err)
	}
	for _, want := range []string{raftPath, fmt.Sprintf("raft entry %d", local.Index), "checksum", "rejoin"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestCheckedLogStore: a follower never stores an entry that arrived
// damaged; entries with a good checksum or none are stored.
func TestCheckedLogStore(t *testing.T) {
	ls, err := raftboltdb.NewBoltStore(filepath.Join(t.TempDir(), "raft.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()
	var reported error
	store := checkedLogStore{LogStore: ls, damaged: func(err error) { reported = err }}
	data := []byte{byte(CmdDeleteDevice), '{', '}'}
	good := commandLog(data)
	good.Index, good.Term = 1, 1
	unchecked := raft.Log{Index: 2, Term: 1, Type: raft.LogCommand, Data: data}
	bad := commandLog(data)
	bad.Index, bad.Term = 3, 1
	bad.Data = []byte{byte(CmdDeleteDevice), '{', ' ', '}'}
	if err := store.StoreLogs([]*raft.Log{&good, &unchecked}); err != nil {
		t.Fatal(err)
	}
	err = store.StoreLog(&bad)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "raft entry 3") {
		t.Fatalf("storing a damaged entry: %v", err)
	}
	if last, _ := ls.LastIndex(); last != 2 {
		t.Fatalf("last index %d after refusing entry 3", last)
	}
	// An entry damaged on disk after it was stored is reported when raft
	// reads it back (and still returned: raft cannot take a read error).
	if err := ls.StoreLog(&bad); err != nil {
		t.Fatal(err)
	}
	for _, i := range []uint64{1, 2} {
		var l raft.Log
		if err := store.GetLog(i, &l); err != nil || reported != nil {
			t.Fatalf("entry %d: %v, reported %v", i, err, reported)
		}
	}
	var l raft.Log
	if err := store.GetLog(3, &l); err != nil || l.Index != 3 {
		t.Fatalf("entry 3: %v %+v", err, l)
	}
	if !errors.Is(reported, ErrCorrupt) || !strings.Contains(reported.Error(), "raft entry 3") {
		t.Fatalf("reading back a damaged entry reported %v", reported)
	}
}

// TestStateMachine_StopsOnDamagedEntry: an entry whose checksum fails when
// it is applied is not applied, nor is anything after it; the observer is
// told, no snapshot is taken, and the node leaves raft.
func TestStateMachine_StopsOnDamagedEntry(t *testing.T) {
	rec := &recorder{}
	dir := t.TempDir()
	s := openTestStore(t, dir, "n1", true, rec)
	defer s.Close()
	putDevice(t, s, "before", nil)
	applied := s.AppliedIndex()
	before := rawState(t, s.fsm)

	data, err := Encode(PutDevice{Device: fleet.Device{ID: "damaged"}})
	if err != nil {
		t.Fatal(err)
	}
	l := commandLog(data)
	l.Index, l.Term, l.Type = applied+1, 1, raft.LogCommand
	l.Data = bytes.Replace(data, []byte("damaged"), []byte("damages"), 1)
	results := s.fsm.ApplyBatch([]*raft.Log{&l})
	res, _ := results[0].(*Result)
	if res == nil || !errors.Is(res.Err, ErrStopped) || !errors.Is(res.Err, ErrCorrupt) {
		t.Fatalf("result %+v", res)
	}
	if err := s.HaltError(); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), filepath.Join(dir, logDirName)) {
		t.Fatalf("HaltError() = %v", err)
	}
	rec.mu.Lock()
	halted := rec.halted
	rec.mu.Unlock()
	if halted == nil {
		t.Fatal("the observer was not told")
	}
	// A good entry after it is refused too.
	good, _ := Encode(PutDevice{Device: fleet.Device{ID: "after"}})
	next := commandLog(good)
	next.Index, next.Term, next.Type = applied+2, 1, raft.LogCommand
	if res, _ := s.fsm.ApplyBatch([]*raft.Log{&next})[0].(*Result); res == nil || !errors.Is(res.Err, ErrStopped) {
		t.Fatalf("entry after the damaged one: %+v", res)
	}
	if _, err := s.fsm.Snapshot(); !errors.Is(err, ErrStopped) {
		t.Fatalf("snapshot of a stopped state machine: %v", err)
	}
	waitFor(t, "the node leaves raft", func() bool { return s.State() == raft.Shutdown.String() })
	if _, err := s.Apply(testContext(t), PutDevice{Device: fleet.Device{ID: "later"}}); err == nil {
		t.Fatal("a write succeeded on a stopped node")
	}
	// The halted store closes itself (in the background: its state file
	// may already be closed); the file is as it was before the damaged
	// entry.
	s.Close()
	if got, stored := rawFileState(t, dir), storedAppliedIndex(t, dir); got != before || s.AppliedIndex() != applied || stored != applied {
		t.Fatalf("the state changed after the damaged entry (applied %d, stored %d, was %d)", s.AppliedIndex(), stored, applied)
	}
}

// failingObserver fails Restored after the first call (the one at open).
type failingObserver struct {
	recorder
	calls int
}

func (o *failingObserver) Restored(r *Reader) error {
	o.calls++
	if o.calls > 1 {
		return errors.New("read failed")
	}
	return nil
}

// TestRestore_Checks: a snapshot whose bytes were damaged on the way is
// refused and the state stays as it was (raft tries again later); one
// that installs but whose derived state cannot be rebuilt stops the state
// machine rather than serve partial state.
func TestRestore_Checks(t *testing.T) {
	src := openTestStore(t, t.TempDir(), "src", true, nil)
	defer src.Close()
	for i := range 20 {
		putDevice(t, src, fmt.Sprintf("snap-%02d", i), nil)
	}
	var image bytes.Buffer
	if _, err := src.Backup(testContext(t), &image); err != nil {
		t.Fatal(err)
	}

	obs := &failingObserver{}
	s := openTestStore(t, t.TempDir(), "n1", true, obs)
	defer s.Close()
	putDevice(t, s, "mine", nil)
	before := rawState(t, s.fsm)

	imagePath := filepath.Join(t.TempDir(), "image.db")
	if err := os.WriteFile(imagePath, image.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	boltchecktest.Flip(t, imagePath, boltchecktest.LiveOffset(t, imagePath, []byte(`"snap-07"`))+3, 0x01)
	damaged, err := os.ReadFile(imagePath)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.fsm.Restore(nopCloser{bytes.NewReader(damaged)}); !errors.Is(err, ErrCorrupt) && !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("restore of a damaged snapshot: %v", err)
	}
	if got := rawState(t, s.fsm); got != before || s.HaltError() != nil {
		t.Fatalf("a refused snapshot changed the state or stopped it (%v)", s.HaltError())
	}
	if _, err := os.Stat(s.fsm.path + ".restore"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused snapshot was left behind: %v", err)
	}

	if err := s.fsm.Restore(nopCloser{bytes.NewReader(image.Bytes())}); err == nil {
		t.Fatal("restore succeeded although the observer failed")
	}
	if err := s.HaltError(); err == nil || !strings.Contains(err.Error(), "read failed") {
		t.Fatalf("HaltError() = %v", err)
	}
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

// TestCluster_LeaderWithDamagedLogStepsOut: a leader whose raft log went
// bad while it ran (a command it applied long ago changed on its disk)
// finds out when it reads the entry back to send it to a follower that was
// away. It stops (HaltError names the log) instead of offering the
// follower an entry the follower refuses to store; the others elect a
// leader with a good copy, and the follower catches up from it.
func TestCluster_LeaderWithDamagedLogStepsOut(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	leader := leaderOf(t, stores)
	var rest []*Store
	for _, s := range stores {
		if s != leader {
			rest = append(rest, s)
		}
	}
	away := rest[1]
	cfg := away.cfg
	cfg.BindAddr = away.RaftAddr() // back at the address the others know
	if err := away.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		putDevice(t, leader, fmt.Sprintf("lagged-%02d", i), nil)
	}
	// The damage, in the command's record.
	flipInLog(t, leader.cfg.Dir, []byte(`"lagged-05"`), 3)
	raftPath := filepath.Join(leader.cfg.Dir, logDirName)

	back := openConfig(t, cfg)
	select {
	case <-leader.Halted():
	case <-time.After(30 * time.Second):
		t.Fatal("the leader did not stop on its damaged entry")
	}
	if err := leader.HaltError(); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), raftPath) {
		t.Fatalf("HaltError() = %v", err)
	}
	survivor := rest[0]
	waitFor(t, "the follower catches up from the new leader", func() bool {
		return back.AppliedIndex() >= survivor.AppliedIndex() && len(deviceIDs(t, back)) == 20
	})
	if a, b := rawState(t, survivor.fsm), rawState(t, back.fsm); a != b {
		t.Fatalf("the replicas differ:\n%s\n%s", a, b)
	}
}

// TestStore_Replayed: a node that opens with state says it has replayed
// once its state machine has applied the log it had; one that opens with
// nothing (new, or joining) never says so by itself, whatever it applies:
// only its leader can tell it has caught up (the node's readiness asks).
func TestStore_Replayed(t *testing.T) {
	dir := t.TempDir()
	s := openTestStoreInBoot(t, dir, "n1", true, nil, "boot-1", 0)
	for i := range 5 {
		putDevice(t, s, fmt.Sprintf("d%d", i), nil)
	}
	if s.Replayed() {
		t.Fatal("a new node says it replayed a log it never had")
	}
	want := rawState(t, s.fsm)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTestStoreInBoot(t, dir, "n1", true, nil, "boot-1", 0)
	if !s.Replayed() {
		t.Fatal("a node whose state file holds its whole log does not say it replayed it")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The state file lost: the log is replayed into a new one, and the
	// node says so only once the state is whole.
	if err := os.Remove(filepath.Join(dir, "state.db")); err != nil {
		t.Fatal(err)
	}
	s = openTestStoreInBoot(t, dir, "n1", true, nil, "boot-1", 0)
	defer s.Close()
	waitFor(t, "the log is replayed", func() bool {
		if !s.Replayed() {
			return false
		}
		if got := rawState(t, s.fsm); got != want {
			t.Fatalf("replayed, with a state that differs:\n%s\nwant\n%s", got, want)
		}
		return true
	})
}
