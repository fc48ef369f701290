package node

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/identityfile"
	"appliance/internal/importtest"
)

// TestImport_DevicesKeepTheirKeys imports an Azure export file through the
// API of a real node (raft, bbolt, broker); what an import does with each
// line is package deviceimport's to test, this is the node's wiring: a
// failed line comes back by number, an imported device connects over MQTT
// with the key the file gave it and receives the deployment that targets
// it; a device connected while a bulk upsert moves it gets its new
// document and its old key stops working; an export holds every device
// without keys and reads back.
func TestImport_DevicesKeepTheirKeys(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	if _, err := c.PutDeployment(ctx, "prod", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 5}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	key := createDevice(t, c, "dev-04999", map[string]any{"environment": "test"})
	connected, err := connectDevice(t, n.MQTTAddr(), "dev-04999", key)
	if err != nil {
		t.Fatal(err)
	}
	connected.subscribeDesired(t)
	if doc := connected.nextDesired(t); doc.DeploymentID != "" {
		t.Fatalf("dev-04999 before the import: %+v", doc)
	}

	file := importtest.File(5000, "dev", "prod", map[int]string{10: `{"id":"dev-bad-json",`})
	sum, err := c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "create"})
	if err != nil {
		t.Fatal(err)
	}
	// dev-04999 exists: its line fails too.
	if want := []int{10, 4999}; !slices.Equal(importtest.ErrorLines(sum), want) || sum.Created != 4998 || sum.Failed != 2 || sum.Lines != 5000 {
		t.Fatalf("summary %+v, failed lines %v, want %v", sum, importtest.ErrorLines(sum), want)
	}

	// An imported device connects with its original key and gets prod.
	dev, err := connectDevice(t, n.MQTTAddr(), "dev-02001", importtest.Key("dev-02001", "p"))
	if err != nil {
		t.Fatalf("dev-02001 with the key of the file: %v", err)
	}
	dev.subscribeDesired(t)
	if doc := dev.nextDesired(t); doc.DeploymentID != "prod" {
		t.Fatalf("dev-02001 got %+v, want prod", doc)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-02001", importtest.Key("dev-02002", "p")); err == nil {
		t.Fatal("dev-02001 was accepted with another device's key")
	}

	// Upsert of the same file: nothing changes, but dev-04999 (which the
	// file gives env prod and keys) is replaced, and being connected, it is
	// pushed its new document; its old key stops working.
	sum, err = c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "upsert"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Unchanged != 4998 || sum.Updated != 1 || sum.Created != 0 || sum.Failed != 1 {
		t.Fatalf("upsert: %+v", sum)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-04999", key); err == nil {
		t.Fatal("dev-04999 was accepted with the key the upsert replaced")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-04999", importtest.Key("dev-04999", "s")); err != nil {
		t.Fatalf("dev-04999 with the file's secondary key after the upsert: %v", err)
	}

	// The export: every device, no keys, readable by the import.
	var out bytes.Buffer
	lines, err := c.ExportDevices(ctx, &out)
	if err != nil || lines != 4999 {
		t.Fatalf("export: %d lines, %v", lines, err)
	}
	if strings.Contains(out.String(), importtest.Key("dev-00042", "p")) || strings.Contains(out.String(), fleet.HashKey(importtest.Key("dev-00042", "p"))) {
		t.Fatal("the export holds a key or a key's hash")
	}
	sc := bufio.NewScanner(&out)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		id, err := identityfile.Parse(sc.Bytes())
		if err != nil || id.HasKeys() || id.Tags["environment"] != "prod" {
			t.Fatalf("export line %s: %+v, %v", sc.Text(), id, err)
		}
	}
}

// TestImport_ThroughAFollowerWithLargeTags: an import taken by a follower
// goes to the leader entry by entry over the cluster port (mutual TLS);
// devices with large tags end their batch early, so that no entry is over
// what the port takes in one request (8 MiB): 200 devices with 50 KB of
// tags each (10 MB) are imported whole.
func TestImport_ThroughAFollowerWithLargeTags(t *testing.T) {
	n1 := startTLSNode(t, Config{NodeID: "n1"})
	n2 := startTLSNode(t, Config{NodeID: "n2", Join: "https://" + n1.RaftAddr(), JoinToken: n1.JoinToken()})
	waitFor(t, "n2 follows n1", func() bool { _, id := n2.store.Leader(); return id == "n1" })
	big := strings.Repeat("x", 50_000)
	file := importtest.LargeFile(200, big)
	// An import whose outcome a leader change left unknown (two nodes on
	// a starved machine, under -race) is resumed as an operator would,
	// with upsert; what must never come is a refusal of an entry's size.
	body, mode, imported := file, "create", 0
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		sum, err := tlsClient(t, n2).ImportDevices(context.Background(), bytes.NewReader(body), api.ImportOptions{Mode: mode})
		if err == nil && sum.Failed == 0 {
			imported = sum.Created + sum.Unchanged
			break
		}
		if !errors.Is(err, api.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("import of large devices through the follower: %+v, %v", sum, err)
		}
		t.Logf("import resumed after: %v", err)
		mode = "upsert"
	}
	if imported != 200 {
		t.Fatalf("import of large devices through the follower: %d devices created or already there, want 200", imported)
	}
	// A consistent read, through whichever node leads once the starved
	// cluster has one again (the leader change above may not be over).
	var d api.DeviceView
	var err error
	waitFor(t, "a consistent read of big-199", func() bool {
		d, err = tlsClient(t, n1).Device(context.Background(), "big-199", true)
		return !errors.Is(err, api.ErrUnavailable)
	})
	if err != nil || d.Tags["notes"] != big {
		t.Fatalf("big-199: %v", err)
	}
}

// TestImport_RefusedWhileAMemberMayRunAnOlderRelease: the import's raft
// commands are new in this release, so while a member does not say it can
// apply them (here it is down: it may be an older release, and the gate
// fails closed) the import is refused before the body is read, with 503
// upgrade_required naming the member, and nothing is stored; a dry run,
// which proposes nothing, still answers.
func TestImport_RefusedWhileAMemberMayRunAnOlderRelease(t *testing.T) {
	n1 := startTLSNode(t, Config{NodeID: "n1"})
	n2 := startTLSNode(t, Config{NodeID: "n2", Join: "https://" + n1.RaftAddr(), JoinToken: n1.JoinToken()})
	n3 := startTLSNode(t, Config{NodeID: "n3", Join: "https://" + n1.RaftAddr(), JoinToken: n1.JoinToken()})
	waitFor(t, "n3 follows n1", func() bool { _, id := n3.store.Leader(); return id == "n1" })
	n3.Stop()
	ctx := context.Background()
	file := importtest.File(10, "gate", "prod", nil)
	_, err := tlsClient(t, n2).ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "create"})
	var apiErr *api.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusServiceUnavailable || apiErr.Code != "upgrade_required" || !strings.Contains(apiErr.Message, "n3") {
		t.Fatalf("import with n3 silent: %v", err)
	}
	t.Logf("refused: %v", err)
	if _, err := tlsClient(t, n1).Device(ctx, "gate-00001", true); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("gate-00001 after a refused import: %v", err)
	}
	sum, err := tlsClient(t, n1).ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "create", DryRun: true})
	if err != nil || sum.Created != 10 {
		t.Fatalf("dry run with n3 silent: %+v, %v", sum, err)
	}
}
