package raftstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
)

// TestStore_BackupRestore backs up a three-node cluster's state from a
// follower and from the leader, restores each into a fresh directory as a
// one-node cluster (raft over a StreamLayer on an address chosen before the
// restore), and checks that the data is all there, that the node takes
// writes, that both survive a restart, and that a new node can join.
func TestStore_BackupRestore(t *testing.T) {
	stores := newTestCluster(t, 3, nil)
	leader := stores[0]
	ctx := testContext(t)
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for i := range 30 {
		putDevice(t, leader, fmt.Sprintf("dev-%02d", i), map[string]any{"i": float64(i)})
	}
	if _, err := leader.Apply(ctx, PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "dep", Content: content("a:1"), TargetCondition: "*"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := leader.Apply(ctx, PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "grp", DerivationKey: "k"}}); err != nil {
		t.Fatal(err)
	}
	// A snapshot in the middle: the backup must not depend on the log.
	if err := leader.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if _, err := leader.Apply(ctx, DeleteDevice{ID: "dev-07"}); err != nil {
		t.Fatal(err)
	}
	readIdx, err := leader.ReadIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := dumpState(t, leader)

	for _, from := range []*Store{stores[1], leader} {
		t.Run("from "+from.NodeID(), func(t *testing.T) {
			if err := from.WaitApplied(ctx, readIdx); err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			idx, err := from.Backup(ctx, &buf)
			if err != nil {
				t.Fatal(err)
			}
			if idx != from.AppliedIndex() {
				t.Fatalf("backup index %d, applied %d", idx, from.AppliedIndex())
			}

			dir := filepath.Join(t.TempDir(), "raft")
			stream := newTCPStream(t, "127.0.0.1:0")
			addr := stream.Addr().String()
			restored, err := RestoreDir(dir, "r1", addr, &buf)
			if err != nil {
				t.Fatal(err)
			}
			if restored != idx {
				t.Fatalf("RestoreDir index %d, backup %d", restored, idx)
			}

			cfg := clusterConfig(t, dir, "r1") // r2 joins it below
			cfg.Stream = stream
			s := openConfig(t, cfg)
			if err := s.WaitLeader(ctx); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the restored node leads", s.IsLeader)
			if got := dumpState(t, s); got != want {
				t.Fatalf("restored state differs:\n got %s\nwant %s", got, want)
			}
			if ms, err := s.Members(ctx); err != nil || len(ms) != 1 || ms[0].ID != "r1" || ms[0].Address != addr {
				t.Fatalf("members %+v, %v", ms, err)
			}
			res := putDevice(t, s, "after-restore", nil)
			if res.Index <= idx {
				t.Fatalf("new write at index %d, not after the restored %d", res.Index, idx)
			}
			after := dumpState(t, s)

			s.Close()
			cfg.Stream = newTCPStream(t, addr)
			s2 := openConfig(t, cfg)
			waitFor(t, "the restarted node leads", s2.IsLeader)
			if got := dumpState(t, s2); got != after {
				t.Fatalf("after restart:\n got %s\nwant %s", got, after)
			}
			putDevice(t, s2, "after-restart", nil)

			// A new node joins the restored cluster: it gets the restored
			// snapshot from raft, then the log after it.
			r2 := openConfig(t, clusterConfig(t, t.TempDir(), "r2"))
			if err := s2.AddVoter(ctx, "r2", r2.RaftAddr()); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "r2 catches up", func() bool { return r2.AppliedIndex() >= s2.AppliedIndex() })
			if got, want := dumpState(t, r2), dumpState(t, s2); got != want {
				t.Fatalf("joined node:\n got %s\nwant %s", got, want)
			}
		})
	}
}

// dumpState renders every device, deployment and enrollment of a replica.
func dumpState(t *testing.T, s *Store) string {
	t.Helper()
	var b strings.Builder
	err := s.View(func(r *Reader) error {
		if err := r.Devices("", func(d fleet.Device) bool { fmt.Fprintf(&b, "dev %s %s %v;", d.ID, d.Etag, d.Tags); return true }); err != nil {
			return err
		}
		if err := r.Deployments("", func(d fleet.Deployment) bool { fmt.Fprintf(&b, "dep %s %s;", d.ID, d.Etag); return true }); err != nil {
			return err
		}
		return r.Enrollments(func(e fleet.Enrollment) bool { fmt.Fprintf(&b, "enr %s %s;", e.Name, e.Etag); return true })
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// TestRestoreDir_Refuses checks what RestoreDir will not do, and that it
// leaves nothing behind when it refuses.
func TestRestoreDir_Refuses(t *testing.T) {
	s := openTestStore(t, t.TempDir(), "n1", true, nil)
	defer s.Close()
	putDevice(t, s, "d", nil)
	var good bytes.Buffer
	if _, err := s.Backup(context.Background(), &good); err != nil {
		t.Fatal(err)
	}
	random := make([]byte, 64<<10)
	rand.Read(random)
	foreign := filepath.Join(t.TempDir(), "foreign.db")
	db, err := bolt.Open(foreign, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("other")); return err }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	foreignBytes, err := os.ReadFile(foreign)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		present string // a file or directory already in the raft dir
		input   []byte
		wantErr string
	}{
		{name: "raft.db present", present: "raft.db", input: good.Bytes(), wantErr: "raft.db already exists"},
		{name: "state.db present", present: "state.db", input: good.Bytes(), wantErr: "state.db already exists"},
		{name: "snapshots present", present: "snapshots/", input: good.Bytes(), wantErr: "snapshots already exists"},
		{name: "random bytes", input: random, wantErr: "not an appliance backup"},
		{name: "empty input", input: nil, wantErr: "not an appliance backup"},
		{name: "another program's bbolt file", input: foreignBytes, wantErr: "not an appliance backup"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.present != "" {
				p := filepath.Join(dir, tc.present)
				var err error
				if strings.HasSuffix(p, "/") {
					err = os.Mkdir(p, 0o700)
				} else {
					err = os.WriteFile(p, []byte("x"), 0o600)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			_, err := RestoreDir(dir, "r1", "127.0.0.1:1", bytes.NewReader(tc.input))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			if tc.present != "" && !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q does not name the path", err)
			}
			entries, _ := os.ReadDir(dir)
			if len(entries) != 0 && tc.present == "" {
				t.Errorf("left behind %v", entries)
			}
		})
	}
}
