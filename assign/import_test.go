package assign

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/history"
	"appliance/internal/testlog"
	"appliance/raftstore"
)

// countingPublisher is the node's broker as assign sees it: a few devices
// connected, every document sent to them recorded, and every document
// sent to one that is not connected counted too.
type countingPublisher struct {
	mu        sync.Mutex
	connected []string
	sent      map[string][]fleet.DesiredDocument
	elsewhere int
}

func (p *countingPublisher) PublishDesired(id string, doc []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !slices.Contains(p.connected, id) {
		p.elsewhere++
		return nil
	}
	var d fleet.DesiredDocument
	if err := json.Unmarshal(doc, &d); err != nil {
		return err
	}
	p.sent[id] = append(p.sent[id], d)
	return nil
}

func (p *countingPublisher) Connected() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.connected)
}

// importObserver feeds an Assigner as the node's observer does and keeps
// the history items it returned.
type importObserver struct {
	a     *Assigner
	mu    sync.Mutex
	items []history.Item
}

func (o *importObserver) Applied(changes []raftstore.Change) {
	moved, items := o.a.Apply(changes)
	o.mu.Lock()
	o.items = append(o.items, items...)
	o.mu.Unlock()
	o.a.Push(moved)
}
func (o *importObserver) Restored(r *raftstore.Reader) error { return o.a.Restore(r) }
func (o *importObserver) Halted(error)                       {}

// TestImport_OneEntryOneHistoryItemNoPushToAbsentDevices: a bulk import
// entry of 3,000 devices, 1,000 of them targeted by a deployment, is one
// history item with every device's move, and the push sends documents to
// the devices connected to this node only (each once, the deployment's),
// never one per device of the batch.
func TestImport_OneEntryOneHistoryItemNoPushToAbsentDevices(t *testing.T) {
	logger := testlog.New(t, slog.LevelWarn)
	pub := &countingPublisher{sent: map[string][]fleet.DesiredDocument{}}
	var store *raftstore.Store
	a := New(Config{Logger: logger, Publisher: pub, View: func(fn func(r *raftstore.Reader) error) error { return store.View(fn) }})
	obs := &importObserver{a: a}
	s, err := raftstore.Open(context.Background(), raftstore.Config{Dir: t.TempDir(), NodeID: "n1", BindAddr: "127.0.0.1:0", Bootstrap: true, Observer: obs, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	store = s
	t.Cleanup(func() { s.Close() })
	pub.mu.Lock()
	pub.connected = []string{"d-0003", "d-0004", "d-2999"} // they connect now
	pub.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	if _, err := s.Apply(ctx, raftstore.PutDeployment{Time: at, Deployment: fleet.Deployment{ID: "prod", TargetCondition: "tags.environment='prod'",
		Content: json.RawMessage(`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{}}}}}`)}}); err != nil {
		t.Fatal(err)
	}
	obs.mu.Lock()
	obs.items = nil
	obs.mu.Unlock()
	batch := raftstore.ImportDevices{Mode: raftstore.ImportCreate, Time: at}
	for i := range 3000 {
		env := "test"
		if i%3 == 0 {
			env = "prod"
		}
		batch.Devices = append(batch.Devices, raftstore.ImportedDevice{Line: i + 1, ID: fmt.Sprintf("d-%04d", i), Tags: map[string]any{"environment": env}})
	}
	res, err := s.Apply(ctx, batch)
	if err != nil || res.Import.Created != 3000 {
		t.Fatalf("import: %+v, %v", res, err)
	}
	obs.mu.Lock()
	items := obs.items
	obs.mu.Unlock()
	if len(items) != 1 || len(items[0].Moves) != 1000 || items[0].Cause != "the device was imported" {
		t.Fatalf("history items of the entry: %d (first with %d moves, cause %q), want one with 1,000", len(items), len(items[0].Moves), items[0].Cause)
	}
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if pub.elsewhere != 0 {
		t.Fatalf("%d documents were handed over for devices not connected here", pub.elsewhere)
	}
	// d-0003 is targeted (prod) and connected: its document; d-0004 and
	// d-2999 are connected but untargeted new devices: nothing to keep,
	// nothing sent.
	if docs := pub.sent["d-0003"]; len(docs) != 1 || docs[0].DeploymentID != "prod" || docs[0].Version != res.Index {
		t.Fatalf("d-0003 was sent %+v, want prod at version %d once", docs, res.Index)
	}
	if len(pub.sent) != 1 {
		t.Fatalf("documents sent to %v, want d-0003 only", pub.sent)
	}
}
