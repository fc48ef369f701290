package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"appliance/api"
	"appliance/internal/boltcheck/boltchecktest"
	"appliance/raftstore"
)

// TestNode_RefusesDamagedStateFile replays the case issue 13 found: one
// byte of state.db changed while the node was stopped, under a deployment
// that targets every device ("*"). The node used to load the devices up to
// the damaged record, ignore the read error, and start: the deployment then
// targeted only those, and every other device was sent an empty desired
// document (its agent removed its modules). Now the node refuses to start,
// with one line naming the file and what to do, and no device is served.
func TestNode_RefusesDamagedStateFile(t *testing.T) {
	dir := t.TempDir()
	n := startNode(t, dir)
	c := clientFor(n)
	ctx := context.Background()
	keys := map[string]string{}
	for i := range 40 {
		id := fmt.Sprintf("press-%02d", i)
		keys[id] = createDevice(t, c, id, map[string]any{"line": float64(i)})
	}
	if _, err := c.PutDeployment(ctx, "everywhere", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "*"}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}

	// One byte: the '{' that opens press-20's stored record.
	statePath := filepath.Join(dir, "raft", "state.db")
	off := boltchecktest.LiveOffset(t, statePath, []byte(`{"deviceId":"press-20"`))
	boltchecktest.Flip(t, statePath, off, 0x01)

	n2 := newTestNode(t, dir)
	err := n2.Start(ctx)
	if err == nil {
		defer n2.Stop()
		waitReady(t, n2)
		d, cerr := connectDevice(t, n2.MQTTAddr(), "press-30", keys["press-30"])
		if cerr != nil {
			t.Fatalf("the node started on a damaged state file (and press-30 could not connect: %v)", cerr)
		}
		d.subscribeDesired(t)
		doc := d.nextDesired(t)
		t.Fatalf("the node started on a damaged state file and sent press-30 deployment %q (want a refusal; the fleet's deployment is %q)",
			doc.DeploymentID, "everywhere")
	}
	if !errors.Is(err, raftstore.ErrCorrupt) {
		t.Errorf("error %v does not wrap raftstore.ErrCorrupt", err)
	}
	msg := err.Error()
	for _, want := range []string{statePath, "appliance restore", "rebuild"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("error is not one line: %q", msg)
	}
}

// TestNode_StopsServingWhenStateMachineStops: when the store reports that
// its state machine stopped (raftstore's Observer.Halted: a damaged entry
// at apply, a snapshot installed whose derived state could not be rebuilt;
// raftstore's TestStateMachine_StopsOnDamagedEntry and TestRestore_Checks
// show the store making that call), the node serves nothing from then on:
// its devices are disconnected and refused, /readyz answers 503 saying
// why, and reads and writes answer 503.
func TestNode_StopsServingWhenStateMachineStops(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	key := createDevice(t, c, "press-01", nil)
	d, err := connectDevice(t, n.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	d.subscribeDesired(t)
	d.nextDesired(t)

	(*observer)(n).Halted(fmt.Errorf("%s: %w: a raft entry does not match its checksum", filepath.Join(n.cfg.DataDir, "raft", "log", "00000000000000000001.seg"), raftstore.ErrCorrupt))

	waitFor(t, "press-01 is disconnected", func() bool {
		select {
		case <-d.c.Done():
			return true
		default:
			return false
		}
	})
	if _, err := connectDevice(t, n.MQTTAddr(), "press-01", key); err == nil {
		t.Fatal("a device connected to a stopped node")
	}

	code, body, _ := rawRequest(t, "GET", n.URL()+"/readyz", "", "")
	if code != 503 || !strings.Contains(body, "00000000000000000001.seg") {
		t.Fatalf("/readyz: %d %s", code, body)
	}
	code, body, _ = rawRequest(t, "GET", n.URL()+"/api/v1/devices", n.Token(), "")
	if code != 503 || !strings.Contains(body, `"unavailable"`) {
		t.Fatalf("GET /devices: %d %s", code, body)
	}
	code, body, _ = rawRequest(t, "PUT", n.URL()+"/api/v1/devices/press-02", n.Token(), `{"tags":{}}`)
	if code != 503 {
		t.Fatalf("PUT /devices/press-02: %d %s", code, body)
	}
}
