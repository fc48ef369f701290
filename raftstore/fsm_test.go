package raftstore

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"appliance/fleet"
	"appliance/internal/testlog"
)

// testLogger logs to t.Log until the test ends: raft's transport
// goroutines may still log a little after Close returns, and t.Log after
// the end of a test panics.
func testLogger(t testing.TB) *slog.Logger { return testlog.New(t, slog.LevelWarn) }

func newTestFSM(t *testing.T) *fsm {
	t.Helper()
	f, err := openFSM(filepath.Join(t.TempDir(), "state.db"), nil, testLogger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.close() })
	return f
}

// dump returns every stored record, for comparing two state machines.
func dump(t *testing.T, f *fsm) string {
	t.Helper()
	var out bytes.Buffer
	err := f.view(func(r *Reader) error {
		if err := r.Devices("", func(d fleet.Device) bool {
			b, _ := json.Marshal(d)
			out.Write(b)
			out.WriteByte('\n')
			return true
		}); err != nil {
			return err
		}
		if err := r.Deployments("", func(d fleet.Deployment) bool {
			b, _ := json.Marshal(d)
			out.Write(b)
			out.WriteByte('\n')
			return true
		}); err != nil {
			return err
		}
		return r.Devices("", func(d fleet.Device) bool {
			if rep, err := r.Report(d.ID); err == nil {
				b, _ := json.Marshal(rep)
				out.Write(b)
				out.WriteByte('\n')
			}
			return true
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out.String()
}

func logOf(t *testing.T, index uint64, c Command) *raft.Log {
	t.Helper()
	data, err := Encode(c)
	if err != nil {
		t.Fatal(err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
}

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func content(image string) json.RawMessage {
	return json.RawMessage(`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"image":"` + image + `"}}}}}}}`)
}

func ptr[T any](v T) *T { return &v }

// TestFSM_Commands applies each command kind in turn, checks what a reader
// sees afterwards, then snapshots, restores into a fresh state machine and
// compares the two.
func TestFSM_Commands(t *testing.T) {
	f := newTestFSM(t)
	hashes := &fleet.KeyHashes{Primary: fleet.HashKey("p"), Secondary: fleet.HashKey("s")}
	steps := []struct {
		name    string
		cmd     Command
		wantErr error
		check   func(t *testing.T, r *Reader, res *Result)
	}{
		{
			name: "create device",
			cmd: PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: t0, Device: fleet.Device{
				ID: "dev-1", Tags: map[string]any{"environment": "prod", "site": map[string]any{"line": 3.0}},
				Authentication: fleet.Authentication{Type: "sas", KeyHashes: hashes},
			}},
			check: func(t *testing.T, r *Reader, res *Result) {
				d, err := r.Device("dev-1")
				if err != nil {
					t.Fatal(err)
				}
				if !res.Created || d.Status != fleet.DeviceEnabled || !d.CreatedTimeUTC.Equal(t0) || d.Etag != "1" {
					t.Fatalf("created device = %+v (created=%v)", d, res.Created)
				}
				if !d.Authentication.KeyHashes.CheckKey("p") || !d.Authentication.KeyHashes.CheckKey("s") || d.Authentication.KeyHashes.CheckKey("x") {
					t.Fatal("stored key hashes do not check the device's keys")
				}
			},
		},
		{
			name:    "create the same device again is refused",
			cmd:     PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: t0, Device: fleet.Device{ID: "dev-1"}},
			wantErr: fleet.ErrExists,
		},
		{
			name: "replace device keeps keys and creation time",
			cmd: PutDevice{Time: t0.Add(time.Minute), Device: fleet.Device{ID: "dev-1", Tags: map[string]any{"environment": "test"},
				Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{Primary: "other", Secondary: "other"}}}},
			check: func(t *testing.T, r *Reader, res *Result) {
				d, _ := r.Device("dev-1")
				if res.Created || d.Tags["environment"] != "test" || !d.CreatedTimeUTC.Equal(t0) || !d.LastUpdatedTimeUTC.Equal(t0.Add(time.Minute)) {
					t.Fatalf("replaced device = %+v", d)
				}
				if !d.Authentication.KeyHashes.CheckKey("p") {
					t.Fatal("replacing a device changed its keys")
				}
			},
		},
		{
			name:    "patch with a stale etag is refused",
			cmd:     PatchDevice{Precondition: Precondition{IfMatch: "1"}, ID: "dev-1", Tags: map[string]any{"x": "y"}, Time: t0},
			wantErr: fleet.ErrPreconditionFailed,
		},
		{
			name: "patch merges tags",
			cmd: PatchDevice{Precondition: Precondition{IfMatch: "3"}, ID: "dev-1", Time: t0.Add(2 * time.Minute),
				Tags: map[string]any{"environment": nil, "site": map[string]any{"hall": "B"}}, Status: fleet.DeviceDisabled},
			check: func(t *testing.T, r *Reader, res *Result) {
				d, _ := r.Device("dev-1")
				want := `{"site":{"hall":"B"}}`
				if got, _ := json.Marshal(d.Tags); string(got) != want || d.Status != fleet.DeviceDisabled || d.Etag != "5" {
					t.Fatalf("patched device tags=%s status=%s etag=%s, want tags %s", got, d.Status, d.Etag, want)
				}
			},
		},
		{
			name:    "patch a missing device",
			cmd:     PatchDevice{ID: "nope", Time: t0},
			wantErr: fleet.ErrNotFound,
		},
		{
			name: "create deployment",
			cmd: PutDeployment{Precondition: Precondition{IfNoneMatch: "*"}, Time: t0, Deployment: fleet.Deployment{
				ID: "base", Content: content("a:1"), TargetCondition: "tags.environment='prod'", Priority: 10,
				Labels: map[string]string{"team": "line"},
			}},
			check: func(t *testing.T, r *Reader, res *Result) {
				d, err := r.Deployment("base")
				if err != nil || !res.Created || d.Priority != 10 || !d.CreatedTimeUTC.Equal(t0) {
					t.Fatalf("deployment = %+v, err %v", d, err)
				}
			},
		},
		{
			name:    "changing content is refused",
			cmd:     PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: "base", Content: content("a:2")}},
			wantErr: fleet.ErrImmutable,
		},
		{
			name: "patch deployment condition, priority, labels",
			cmd: PatchDeployment{ID: "base", Time: t0.Add(time.Hour), TargetCondition: ptr("*"), Priority: ptr[int64](20),
				Labels: map[string]string{"team": "", "stage": "canary"}, MetricQueries: map[string]string{"ok": "x"}},
			check: func(t *testing.T, r *Reader, res *Result) {
				d, _ := r.Deployment("base")
				if d.TargetCondition != "*" || d.Priority != 20 || d.Labels["stage"] != "canary" || len(d.Labels) != 1 ||
					d.Metrics.Queries["ok"] != "x" || !d.LastUpdatedTimeUTC.Equal(t0.Add(time.Hour)) || !d.CreatedTimeUTC.Equal(t0) || d.Etag != "9" {
					t.Fatalf("patched deployment = %+v", d)
				}
			},
		},
		{
			name: "delete device",
			cmd:  DeleteDevice{ID: "dev-1"},
			check: func(t *testing.T, r *Reader, res *Result) {
				if _, err := r.Device("dev-1"); !errors.Is(err, fleet.ErrNotFound) {
					t.Fatalf("device still there: %v", err)
				}
			},
		},
		{
			name:    "delete deployment with wrong etag",
			cmd:     DeleteDeployment{ID: "base", Precondition: Precondition{IfMatch: "2"}},
			wantErr: fleet.ErrPreconditionFailed,
		},
		{
			name: "create a second device for the snapshot",
			cmd:  PutDevice{Time: t0, Device: fleet.Device{ID: "dev-2", Tags: map[string]any{"n": 1.0}}},
		},
		{
			name: "create an enrollment",
			cmd:  PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "line-3", Tags: map[string]any{"line": 3.0}, DerivationKey: "k", Token: "never-stored"}},
			check: func(t *testing.T, r *Reader, res *Result) {
				e, err := r.Enrollment("line-3")
				if err != nil || e.DerivationKey != "k" || e.Token != "" || !res.Created {
					t.Fatalf("enrollment %+v err %v", e, err)
				}
			},
		},
		{
			name:    "delete a missing enrollment",
			cmd:     DeleteEnrollment{Name: "nope"},
			wantErr: fleet.ErrNotFound,
		},
		{
			name: "reports: a known device's is stored, an unknown device's dropped",
			cmd: PutReports{Reports: []Report{
				{DeviceID: "dev-2", Document: json.RawMessage(`{"lastDesiredVersion":7}`), Time: t0},
				{DeviceID: "ghost", Document: json.RawMessage(`{"lastDesiredVersion":1}`), Time: t0},
			}},
			check: func(t *testing.T, r *Reader, res *Result) {
				rep, err := r.Report("dev-2")
				if err != nil || string(rep.Document) != `{"lastDesiredVersion":7}` || res.Stored != 1 {
					t.Fatalf("report %+v err %v stored %d", rep, err, res.Stored)
				}
				if _, err := r.Report("ghost"); !errors.Is(err, fleet.ErrNotFound) {
					t.Fatalf("report of an unknown device was stored: %v", err)
				}
				d, _ := r.Device("dev-2")
				if d.Etag != "12" {
					t.Fatalf("a report changed the device's etag to %s", d.Etag)
				}
			},
		},
		{
			name: "reports: a newer session's report replaces the stored one",
			cmd: PutReports{Reports: []Report{
				{DeviceID: "dev-2", Document: json.RawMessage(`{"lastDesiredVersion":9}`), Time: t0.Add(2 * time.Second), Session: t0.Add(time.Second)},
			}},
			check: func(t *testing.T, r *Reader, res *Result) {
				if rep, _ := r.Report("dev-2"); string(rep.Document) != `{"lastDesiredVersion":9}` || res.Stored != 1 {
					t.Fatalf("report %s stored %d", rep.Document, res.Stored)
				}
			},
		},
		{
			// A node cut off from the network receives a device's packet
			// late, from the session the device has long left.
			name: "reports: one from an older session than the stored one is stale and dropped",
			cmd: PutReports{Reports: []Report{
				{DeviceID: "dev-2", Document: json.RawMessage(`{"lastDesiredVersion":7}`), Time: t0.Add(5 * time.Second), Session: t0},
			}},
			check: func(t *testing.T, r *Reader, res *Result) {
				if rep, _ := r.Report("dev-2"); string(rep.Document) != `{"lastDesiredVersion":9}` || res.Stored != 0 {
					t.Fatalf("a stale report replaced the newer one: %s (stored %d)", rep.Document, res.Stored)
				}
			},
		},
	}
	for i, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			out := f.ApplyBatch([]*raft.Log{logOf(t, uint64(i+1), step.cmd)})
			res := out[0].(*Result)
			if step.wantErr != nil {
				if !errors.Is(res.Err, step.wantErr) {
					t.Fatalf("err = %v, want %v", res.Err, step.wantErr)
				}
			} else if res.Err != nil {
				t.Fatalf("unexpected err %v", res.Err)
			}
			if step.check != nil {
				if err := f.view(func(r *Reader) error { step.check(t, r, res); return nil }); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	if got := f.AppliedIndex(); got != uint64(len(steps)) {
		t.Fatalf("applied index %d, want %d", got, len(steps))
	}

	// Snapshot, restore into a fresh state machine, compare.
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	sink := &memSink{Buffer: &buf}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	g := newTestFSM(t)
	if err := g.Restore(io.NopCloser(&buf)); err != nil {
		t.Fatal(err)
	}
	if a, b := dump(t, f), dump(t, g); a != b || a == "" {
		t.Fatalf("restored state differs:\n%s\nvs\n%s", a, b)
	}
	if g.AppliedIndex() != f.AppliedIndex() {
		t.Fatalf("restored applied index %d, want %d", g.AppliedIndex(), f.AppliedIndex())
	}
}

// TestFSM_ReplayIsIdempotent re-applies entries already in the state, as raft
// does after a restart, and checks nothing changes.
func TestFSM_ReplayIsIdempotent(t *testing.T) {
	f := newTestFSM(t)
	logs := []*raft.Log{
		logOf(t, 1, PutDevice{Time: t0, Device: fleet.Device{ID: "a"}}),
		logOf(t, 2, PatchDevice{ID: "a", Tags: map[string]any{"k": "v"}, Time: t0}),
		logOf(t, 3, DeleteDevice{ID: "a"}),
		logOf(t, 4, PutDevice{Time: t0, Device: fleet.Device{ID: "a", Tags: map[string]any{"k": "w"}}}),
	}
	f.ApplyBatch(logs)
	before := dump(t, f)
	// A replay of the whole log (e.g. restart without a snapshot) must skip
	// entries 1..4 rather than re-creating and re-deleting.
	out := f.ApplyBatch(logs[:3])
	for i, o := range out {
		if o != nil {
			t.Fatalf("replayed entry %d was applied again: %+v", i+1, o)
		}
	}
	if after := dump(t, f); after != before {
		t.Fatalf("replay changed state:\n%s\nvs\n%s", before, after)
	}
}

type memSink struct{ *bytes.Buffer }

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { return nil }
func (m *memSink) Close() error  { return nil }
