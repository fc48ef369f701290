package raftstore

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
)

// importRecorder is an Observer that keeps the changes it is given.
type importRecorder struct {
	mu      sync.Mutex
	changes []Change
}

func (o *importRecorder) Applied(c []Change) {
	o.mu.Lock()
	o.changes = append(o.changes, c...)
	o.mu.Unlock()
}
func (o *importRecorder) Restored(*Reader) error { return nil }
func (o *importRecorder) Halted(error)           {}

func (o *importRecorder) take() []Change {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := o.changes
	o.changes = nil
	return out
}

func importBatch(mode string, from, to int, tags map[string]any, keys bool) ImportDevices {
	c := ImportDevices{Mode: mode, Time: time.Date(2026, 12, 6, 18, 0, 0, 0, time.UTC), Actor: "admin"}
	for i := from; i <= to; i++ {
		d := ImportedDevice{Line: i, ID: fmt.Sprintf("dev-%04d", i), Tags: tags}
		if keys {
			d.Keys = &fleet.KeyHashes{Primary: fleet.HashKey(fmt.Sprintf("p%d", i)), Secondary: fleet.HashKey(fmt.Sprintf("s%d", i))}
		}
		c.Devices = append(c.Devices, d)
	}
	return c
}

func deviceOf(t *testing.T, s *Store, id string) (fleet.Device, bool) {
	t.Helper()
	var d fleet.Device
	var found bool
	if err := s.View(func(r *Reader) error {
		var err error
		d, err = r.Device(id)
		if errors.Is(err, fleet.ErrNotFound) {
			return nil
		}
		found = err == nil
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return d, found
}

// TestImport_Modes: one entry imports a batch, each device on its own:
// create refuses the ids that exist (by line) and creates the rest with
// the keys given; upsert leaves equal devices alone (their etags stay),
// replaces tags and status and keeps the keys a line does not give;
// delete removes what exists and names the lines of what does not. The
// observer gets one change per device written, marked Imported.
func TestImport_Modes(t *testing.T) {
	obs := &importRecorder{}
	s := openTestStore(t, t.TempDir(), "n1", true, obs)
	defer s.Close()
	ctx := testContext(t)
	tags := map[string]any{"environment": "prod"}

	res, err := s.Apply(ctx, importBatch(ImportCreate, 1, 100, tags, true))
	if err != nil || res.Import.Created != 100 || len(res.Import.Failed) != 0 {
		t.Fatalf("create: %+v, %v", res.Import, err)
	}
	if ch := obs.take(); len(ch) != 100 || !ch[0].Imported || ch[0].Kind != DevicePut || !ch[0].Created {
		t.Fatalf("changes of the create: %d, first %+v", len(ch), ch[0])
	}
	d, _ := deviceOf(t, s, "dev-0042")
	if !d.Authentication.KeyHashes.CheckKey("p42") || !d.Authentication.KeyHashes.CheckKey("s42") || d.Status != fleet.DeviceEnabled || d.Tags["environment"] != "prod" {
		t.Fatalf("imported device %+v", d)
	}
	createdEtag := d.Etag

	res, err = s.Apply(ctx, importBatch(ImportCreate, 99, 102, tags, true))
	if err != nil || res.Import.Created != 2 || len(res.Import.Failed) != 2 || res.Import.Failed[0].Line != 99 || res.Import.Failed[1].Code != codeExists {
		t.Fatalf("create over existing: %+v, %v", res.Import, err)
	}
	obs.take()

	// Upsert of the same: nothing changes, no change is published.
	res, err = s.Apply(ctx, importBatch(ImportUpsert, 1, 102, tags, true))
	if err != nil || res.Import.Unchanged != 102 || res.Import.Updated+res.Import.Created != 0 {
		t.Fatalf("idempotent upsert: %+v, %v", res.Import, err)
	}
	if ch := obs.take(); len(ch) != 0 {
		t.Fatalf("an idempotent upsert published %d changes", len(ch))
	}
	if d, _ := deviceOf(t, s, "dev-0042"); d.Etag != createdEtag {
		t.Fatalf("etag moved %s -> %s on an idempotent upsert", createdEtag, d.Etag)
	}

	// Upsert without keys and new tags: tags replaced, keys kept.
	batch := importBatch(ImportUpsert, 41, 43, map[string]any{"environment": "test"}, false)
	batch.Devices[1].Status = fleet.DeviceDisabled
	res, err = s.Apply(ctx, batch)
	if err != nil || res.Import.Updated != 3 {
		t.Fatalf("upsert: %+v, %v", res.Import, err)
	}
	d, _ = deviceOf(t, s, "dev-0042")
	if d.Tags["environment"] != "test" || d.Status != fleet.DeviceDisabled || !d.Authentication.KeyHashes.CheckKey("p42") || d.Etag == createdEtag {
		t.Fatalf("upserted device %+v", d)
	}
	ch := obs.take()
	if len(ch) != 3 || ch[1].CredentialsChanged != true || ch[0].CredentialsChanged {
		t.Fatalf("upsert changes %+v", ch)
	}

	res, err = s.Apply(ctx, importBatch(ImportDelete, 100, 103, nil, false))
	if err != nil || res.Import.Deleted != 3 || len(res.Import.Failed) != 1 || res.Import.Failed[0].Line != 103 || res.Import.Failed[0].Code != codeNotFound {
		t.Fatalf("delete: %+v, %v", res.Import, err)
	}
	if _, found := deviceOf(t, s, "dev-0100"); found {
		t.Fatal("dev-0100 still there after delete")
	}
	if ch := obs.take(); len(ch) != 3 || ch[0].Kind != DeviceDeleted {
		t.Fatalf("delete changes %+v", ch)
	}

	if _, err := s.Apply(ctx, ImportDevices{Mode: "merge", Time: time.Now()}); !errors.Is(err, fleet.ErrInvalid) {
		t.Fatalf("unknown mode: %v", err)
	}
}

// TestImport_AtomicOnACluster: on three real raft nodes, an atomic
// import's batches change no replica until FinishImport commits them, in
// one entry, on every replica; a commit that would create a device that
// exists is refused whole (with the lines), stores nothing, and leaves no
// stage behind; a batch forwarded by a follower comes back with its
// counts across the wire.
func TestImport_AtomicOnACluster(t *testing.T) {
	fwd := newPeerSet()
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.Forward = fwd.forward })
	fwd.add(stores...)
	leader, follower := stores[0], stores[2]
	ctx := testContext(t)

	for _, b := range []ImportDevices{importBatch(ImportCreate, 1, 50, nil, true), importBatch(ImportCreate, 51, 80, nil, true)} {
		b.Stage = "imp-1"
		res, err := follower.Apply(ctx, b)
		if err != nil || res.Import == nil || res.Import.Staged != len(b.Devices) {
			t.Fatalf("stage through a follower: %+v, %v", res, err)
		}
		if err := follower.WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range stores {
		if _, found := deviceOf(t, s, "dev-0001"); found {
			t.Fatalf("%s: a staged device is visible before the commit", s.NodeID())
		}
	}
	res, err := follower.Apply(ctx, FinishImport{Stage: "imp-1", Commit: true, Time: time.Now().UTC()})
	if err != nil || res.Import.Created != 80 {
		t.Fatalf("commit: %+v, %v", res, err)
	}
	for _, s := range stores {
		if err := s.WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
		d, found := deviceOf(t, s, "dev-0080")
		if !found || d.Etag != etagFor(res.Index) || !d.Authentication.KeyHashes.CheckKey("p80") {
			t.Fatalf("%s: dev-0080 after the commit: %+v (found %v)", s.NodeID(), d, found)
		}
	}

	// Lines 75-90: 75-80 exist, so the create is refused whole.
	b := importBatch(ImportCreate, 75, 90, nil, false)
	b.Stage = "imp-2"
	if _, err := leader.Apply(ctx, b); err != nil {
		t.Fatal(err)
	}
	res, err = follower.Apply(ctx, FinishImport{Stage: "imp-2", Commit: true, Time: time.Now().UTC()})
	if !errors.Is(err, fleet.ErrConflict) || res == nil || res.Import == nil || len(res.Import.Failed) != 6 || res.Import.Failed[0].Line != 75 || !strings.Contains(err.Error(), "line 75") {
		t.Fatalf("conflicting commit: %+v, %v", res, err)
	}
	for _, s := range stores {
		if err := s.WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
		if _, found := deviceOf(t, s, "dev-0081"); found {
			t.Fatalf("%s: a refused atomic import stored dev-0081", s.NodeID())
		}
		var stages []string
		_ = s.View(func(r *Reader) (err error) { stages, err = r.ImportStages(); return err })
		if len(stages) != 0 {
			t.Fatalf("%s: stages left %v", s.NodeID(), stages)
		}
	}
	if _, err := leader.Apply(ctx, FinishImport{Stage: "imp-2", Commit: true, Time: time.Now().UTC()}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("commit of a finished stage: %v", err)
	}
}

// TestImport_StaleStagesAreDropped: a stage left by an importer that died
// is dropped by the next FinishImport more than a day later.
func TestImport_StaleStagesAreDropped(t *testing.T) {
	s := openTestStore(t, t.TempDir(), "n1", true, nil)
	defer s.Close()
	ctx := testContext(t)
	b := importBatch(ImportUpsert, 1, 3, nil, false)
	b.Stage = "dead"
	if _, err := s.Apply(ctx, b); err != nil {
		t.Fatal(err)
	}
	b.Stage, b.Time = "live", b.Time.Add(25*time.Hour)
	if _, err := s.Apply(ctx, b); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply(ctx, FinishImport{Stage: "live", Time: b.Time}); err != nil {
		t.Fatal(err)
	}
	var stages []string
	_ = s.View(func(r *Reader) (err error) { stages, err = r.ImportStages(); return err })
	if len(stages) != 0 {
		t.Fatalf("stages left %v", stages)
	}
	digestHolds(t, s)
}

// TestImport_GatedUntilEveryMemberCanApplyIt: the import's commands are
// refused (nothing proposed) while a member runs the release before them
// (it knows device reset, 26, and no import), and go through once it is
// upgraded.
func TestImport_GatedUntilEveryMemberCanApplyIt(t *testing.T) {
	previous := runs(CmdRevokeNode, CmdRotateEnrollment, CmdRevokeEnrollmentDevices, CmdPutDeploymentRollout, CmdPatchDeploymentRollout,
		CmdAdmitRollout, CmdRolloutAction, CmdPutConsumer, CmdDeleteConsumer, CmdBindNode, CmdResetDevice)
	peers := &fakePeers{answers: map[string]func() (NodeInfo, error){"n2": runs(Commands()...), "n3": previous}}
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.PeerInfo = peers.info })
	leader := stores[0]
	ctx := testContext(t)
	before := leader.AppliedIndex()
	for _, c := range []Command{importBatch(ImportCreate, 1, 2, nil, false), FinishImport{Stage: "x", Commit: true, Time: time.Now()}} {
		_, err := leader.Apply(ctx, c)
		if !errors.Is(err, ErrClusterBehind) || !strings.Contains(err.Error(), "n3") {
			t.Fatalf("%s with n3 on the previous release: %v", c.Type(), err)
		}
	}
	if leader.AppliedIndex() != before {
		t.Fatal("a refused import was proposed")
	}
	peers.set("n3", runs(Commands()...))
	leader.peers.mu.Lock()
	clear(leader.peers.infos)
	leader.peers.mu.Unlock()
	if res, err := leader.Apply(ctx, importBatch(ImportCreate, 1, 2, nil, false)); err != nil || res.Import.Created != 2 {
		t.Fatalf("after the upgrade: %+v, %v", res, err)
	}
}
