package raftstore

import (
	"errors"
	"testing"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// TestFSM_Consumers: a consumer is created once (a second put of the name
// is refused: a new key needs a new consumer), is read back with its key
// digest (for the node's check) but the result carries none, is deleted
// with a ConsumerDeleted change for the nodes to end its connections, and
// survives a reopen of the state file with the content digest intact.
func TestFSM_Consumers(t *testing.T) {
	f := newTestFSM(t)
	obs := &recordingObserver{}
	f.observer = obs
	index := uint64(0)
	apply := func(c Command) *Result {
		t.Helper()
		index++
		return f.ApplyBatch([]*raft.Log{logOf(t, index, c)})[0].(*Result)
	}
	res := apply(PutConsumer{Time: t0, Consumer: fleet.Consumer{Name: "mes", KeyHash: fleet.HashKey("k"), Key: "k"}})
	if res.Err != nil || !res.Created || res.Consumer == nil || res.Consumer.KeyHash != "" || res.Consumer.Key != "" || res.Consumer.Etag == "" {
		t.Fatalf("create: %+v %v", res.Consumer, res.Err)
	}
	if res := apply(PutConsumer{Time: t0, Consumer: fleet.Consumer{Name: "mes", KeyHash: fleet.HashKey("k2")}}); !errors.Is(res.Err, fleet.ErrExists) {
		t.Fatalf("second create: %v, want exists", res.Err)
	}
	for _, bad := range []fleet.Consumer{{Name: "Bad", KeyHash: "x"}, {Name: "ok"}} {
		if res := apply(PutConsumer{Time: t0, Consumer: bad}); !errors.Is(res.Err, fleet.ErrInvalid) {
			t.Errorf("create %+v: %v, want invalid", bad, res.Err)
		}
	}
	apply(PutConsumer{Time: t0, Consumer: fleet.Consumer{Name: "historian", KeyHash: fleet.HashKey("h")}})
	var names []string
	err := f.view(func(r *Reader) error {
		c, err := r.Consumer("mes")
		if err != nil || c.KeyHash != fleet.HashKey("k") || !c.CreatedTimeUTC.Equal(t0) {
			t.Errorf("read: %+v %v", c, err)
		}
		return r.Consumers(func(c fleet.Consumer) bool { names = append(names, c.Name); return true })
	})
	if err != nil || len(names) != 2 || names[0] != "historian" || names[1] != "mes" {
		t.Fatalf("list: %v %v", names, err)
	}
	obs.changes = nil
	if res := apply(DeleteConsumer{Name: "mes", Precondition: Precondition{IfMatch: "99"}}); !errors.Is(res.Err, fleet.ErrPreconditionFailed) {
		t.Fatalf("delete with a stale etag: %v", res.Err)
	}
	if res := apply(DeleteConsumer{Name: "mes"}); res.Err != nil || res.Consumer == nil || res.Consumer.Name != "mes" {
		t.Fatalf("delete: %+v", res)
	}
	if len(obs.changes) != 1 || obs.changes[0].Kind != ConsumerDeleted || obs.changes[0].ID != "mes" {
		t.Fatalf("changes of the delete: %+v", obs.changes)
	}
	if res := apply(DeleteConsumer{Name: "mes"}); !errors.Is(res.Err, fleet.ErrNotFound) {
		t.Fatalf("second delete: %v", res.Err)
	}
	if err := f.view(func(r *Reader) error { _, err := r.Consumer("mes"); return err }); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("read after delete: %v", err)
	}
	path := f.path
	if err := f.close(); err != nil {
		t.Fatal(err)
	}
	db, _, err := openStateDB(path, false, testLogger(t), nil)
	if err != nil {
		t.Fatalf("reopen after consumer writes (content digest): %v", err)
	}
	db.Close()
}
