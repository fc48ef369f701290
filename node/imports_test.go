package node

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/identityfile"
)

// importKey is the key an import file gives a device: derived from its id
// and which, so the test knows it without keeping it.
func importKey(id, which string) string {
	sum := sha256.Sum256([]byte(which + "/" + id))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// importLine is an Azure export line for a device with its keys.
func importLine(id, env string) string {
	return fmt.Sprintf(`{"id":%q,"eTag":"MA==","status":"enabled","authentication":{"symmetricKey":{"primaryKey":%q,"secondaryKey":%q},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"twinETag":"AAAAAAAAAAE=","tags":{"environment":%q},"properties":{"desired":{},"reported":{}},"capabilities":{"iotEdge":true}}`,
		id, importKey(id, "p"), importKey(id, "s"), env)
}

// importFile builds a file of n devices, lines 1..n, with the bad lines
// given (line number -> the line) put in place of the good ones.
func importFile(n int, prefix, env string, bad map[int]string) []byte {
	var b bytes.Buffer
	for i := 1; i <= n; i++ {
		if line, ok := bad[i]; ok {
			b.WriteString(line + "\n")
			continue
		}
		b.WriteString(importLine(fmt.Sprintf("%s-%05d", prefix, i), env) + "\n")
	}
	return b.Bytes()
}

func errorLines(sum api.ImportSummary) []int {
	var out []int
	for _, e := range sum.Errors {
		out = append(out, e.Line)
	}
	return out
}

// TestImport_DevicesKeepTheirKeys imports an Azure export file through the
// API of a real node (raft, bbolt, broker): the bad lines are named by
// number and the rest is imported in batches; an imported device connects
// over MQTT with the key the file gave it and receives the deployment
// that targets it; a device connected while a bulk upsert moves it gets
// its new document; the same file again with upsert changes nothing (the
// etags stay); an export holds every device without keys and reads back.
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

	bad := map[int]string{
		10:   `{"id":"dev-bad-json",`,
		2500: `{"id":"has space","status":"enabled"}`,
		3000: `{"id":"dev-one-key","authentication":{"symmetricKey":{"primaryKey":"` + importKey("x", "p") + `"}}}`,
		4000: importLine("dev-00001", "prod"), // given twice
		4500: `{"id":"dev-long","tags":{"t":"` + strings.Repeat("x", api.MaxImportLineBytes) + `"}}`,
	}
	file := importFile(5000, "dev", "prod", bad)
	sum, err := c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "create"})
	if err != nil {
		t.Fatal(err)
	}
	// dev-04999 exists: its line fails too.
	if want := []int{10, 2500, 3000, 4000, 4500, 4999}; !slices.Equal(errorLines(sum), want) || sum.Created != 4994 || sum.Failed != 6 || sum.Lines != 5000 {
		t.Fatalf("summary %+v, failed lines %v, want %v", sum, errorLines(sum), want)
	}
	if e := sum.Errors[3]; !strings.Contains(e.Message, "also on line 1") || e.DeviceID != "dev-00001" {
		t.Fatalf("the duplicate's error: %+v", e)
	}

	// An imported device connects with its original key and gets prod.
	dev, err := connectDevice(t, n.MQTTAddr(), "dev-02001", importKey("dev-02001", "p"))
	if err != nil {
		t.Fatalf("dev-02001 with the key of the file: %v", err)
	}
	dev.subscribeDesired(t)
	if doc := dev.nextDesired(t); doc.DeploymentID != "prod" {
		t.Fatalf("dev-02001 got %+v, want prod", doc)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-02001", importKey("dev-02002", "p")); err == nil {
		t.Fatal("dev-02001 was accepted with another device's key")
	}
	before, err := c.Device(ctx, "dev-00042", false)
	if err != nil {
		t.Fatal(err)
	}

	// Upsert of the same file: nothing changes, but dev-04999 (which the
	// file gives env prod and keys) is replaced, and being connected, it is
	// pushed its new document; its old key stops working.
	sum, err = c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "upsert"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Unchanged != 4994 || sum.Updated != 1 || sum.Created != 0 || sum.Failed != 5 {
		t.Fatalf("upsert: %+v", sum)
	}
	if after, _ := c.Device(ctx, "dev-00042", false); after.Etag != before.Etag {
		t.Fatalf("an idempotent upsert moved dev-00042's etag %s -> %s", before.Etag, after.Etag)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-04999", importKey("dev-04999", "s")); err != nil {
		t.Fatalf("dev-04999 with the file's secondary key after the upsert: %v", err)
	}

	// The export: every device, no keys, readable by the import.
	var out bytes.Buffer
	lines, err := c.ExportDevices(ctx, &out)
	if err != nil || lines != 4995 {
		t.Fatalf("export: %d lines, %v", lines, err)
	}
	if strings.Contains(out.String(), importKey("dev-00042", "p")) || strings.Contains(out.String(), fleet.HashKey(importKey("dev-00042", "p"))) {
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

// TestImport_AtomicAndDryRun: with atomic, one bad line refuses the whole
// file (400 naming the line) and no device of it is stored, and a create
// of devices that exist is refused whole the same way; a dry run says
// what would happen and changes nothing; a delete by file removes what it
// names.
func TestImport_AtomicAndDryRun(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	exists := func(id string) bool {
		_, err := c.Device(ctx, id, false)
		return err == nil
	}

	file := importFile(3000, "atom", "prod", map[int]string{2999: `{"id":"atom-x","status":"paused"}`})
	sum, err := c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "create", Atomic: true})
	var refused *api.ImportRefusedError
	var apiErr *api.Error
	if !errors.As(err, &refused) || !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Field != "line 2999" ||
		!strings.Contains(apiErr.Message, "status") || sum.Failed != 1 {
		t.Fatalf("atomic with a bad line: %+v, %v", sum, err)
	}
	if exists("atom-00001") || exists("atom-02500") {
		t.Fatal("a refused atomic import stored devices")
	}

	good := importFile(3000, "atom", "prod", nil)
	sum, err = c.ImportDevices(ctx, bytes.NewReader(good), api.ImportOptions{Mode: "create", DryRun: true})
	if err != nil || sum.Created != 3000 || !sum.DryRun || exists("atom-00001") {
		t.Fatalf("dry run: %+v, %v", sum, err)
	}
	sum, err = c.ImportDevices(ctx, bytes.NewReader(good), api.ImportOptions{Mode: "create", Atomic: true})
	if err != nil || sum.Created != 3000 || !exists("atom-03000") {
		t.Fatalf("atomic: %+v, %v", sum, err)
	}
	more := append(importFile(10, "new", "prod", nil), good[:len(importLine("atom-00001", "prod"))+1]...)
	sum, err = c.ImportDevices(ctx, bytes.NewReader(more), api.ImportOptions{Mode: "create", Atomic: true})
	if !errors.As(err, &apiErr) || apiErr.Field != "line 11" || exists("new-00001") {
		t.Fatalf("atomic create of an existing device: %+v, %v", sum, err)
	}

	sum, err = c.ImportDevices(ctx, bytes.NewReader(good[:len(good)/2]), api.ImportOptions{Mode: "delete"})
	if err != nil || sum.Deleted != 1500 || exists("atom-00001") || !exists("atom-03000") {
		t.Fatalf("delete: %+v, %v", sum, err)
	}
}

// failingReader gives the first n bytes of data, then fails: a client
// whose upload breaks part way.
type failingReader struct {
	data []byte
	n    int
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, errors.New("connection reset by the test")
	}
	k := copy(p, r.data[:min(len(r.data), r.n, len(p))])
	r.data, r.n = r.data[k:], r.n-k
	return k, nil
}

// TestImport_InterruptedThenResumedWithUpsert: an upload that breaks part
// way leaves some devices imported; the same file again with upsert
// imports the rest and leaves those alone, so every device is there once,
// as the file says.
func TestImport_InterruptedThenResumedWithUpsert(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	file := importFile(9000, "res", "prod", nil)
	_, err := c.ImportDevices(ctx, &failingReader{data: file, n: len(file) * 2 / 3}, api.ImportOptions{Mode: "create"})
	if err == nil {
		t.Fatal("an import whose upload broke reported success")
	}
	total := func() int {
		page, err := c.Devices(ctx, api.DeviceQuery{Limit: 1})
		if err != nil {
			t.Fatal(err)
		}
		return *page.Total
	}
	// The node finishes (or drops) what it had taken when the upload
	// broke, and answers (to nobody): the request is then counted.
	waitFor(t, "the broken import's request to end", func() bool {
		_, body, _ := rawRequest(t, "GET", n.URL()+"/metrics", n.Token(), "")
		return strings.Contains(body, `route="POST /api/v1/device-import"`)
	})
	partial := total()
	if partial >= 9000 {
		t.Fatalf("%d devices after a broken upload of two thirds of the file", partial)
	}
	sum, err := c.ImportDevices(ctx, bytes.NewReader(file), api.ImportOptions{Mode: "upsert"})
	if err != nil || sum.Created != 9000-partial || sum.Unchanged != partial || sum.Failed != 0 || total() != 9000 {
		t.Fatalf("resume with upsert after %d devices: %+v, %v", partial, sum, err)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "res-08999", importKey("res-08999", "p")); err != nil {
		t.Fatalf("a device of the resumed part with its key: %v", err)
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
	var file bytes.Buffer
	big := strings.Repeat("x", 50_000)
	for i := range 200 {
		id := fmt.Sprintf("big-%03d", i)
		fmt.Fprintf(&file, `{"id":%q,"authentication":{"symmetricKey":{"primaryKey":%q,"secondaryKey":%q}},"tags":{"environment":"prod","notes":%q}}`+"\n",
			id, importKey(id, "p"), importKey(id, "s"), big)
	}
	// An import whose outcome a leader change left unknown (two nodes on
	// a starved machine, under -race) is resumed as an operator would,
	// with upsert; what must never come is a refusal of an entry's size.
	body, mode, imported := file.Bytes(), "create", 0
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
	d, err := tlsClient(t, n1).Device(context.Background(), "big-199", true)
	if err != nil || d.Tags["notes"] != big {
		t.Fatalf("big-199 on the leader: %v", err)
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
	file := importFile(10, "gate", "prod", nil)
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
