package deviceimport

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/importtest"
	"appliance/internal/storetest"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// testStore is a real one-node raft store (bbolt state, raft log on
// disk) as an import sees it. Ready answers as a node that serves reads;
// every ImportDevices entry proposed is kept, to see how the file was cut
// into entries.
type testStore struct {
	*raftstore.Store
	mu      sync.Mutex
	entries []raftstore.ImportDevices
}

func (s *testStore) Ready() error { return nil }

func (s *testStore) Apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
	if c, ok := cmd.(raftstore.ImportDevices); ok {
		s.mu.Lock()
		s.entries = append(s.entries, c)
		s.mu.Unlock()
	}
	return s.Store.Apply(ctx, cmd)
}

func (s *testStore) device(id string) (d fleet.Device, ok bool) {
	_ = s.View(func(r *raftstore.Reader) error {
		var err error
		d, err = r.Device(id)
		ok = err == nil
		return nil
	})
	return d, ok
}

// newImporter opens a one-node store in a temporary directory and an
// Importer over it.
func newImporter(t *testing.T, cfg Config) (*Importer, *testStore) {
	t.Helper()
	ts := &testStore{Store: storetest.Open(t, nil, slog.LevelWarn)}
	cfg.Store, cfg.Actor, cfg.Logger = ts, "admin", testlog.New(t, slog.LevelWarn)
	return New(cfg), ts
}

// TestImport_BadLinesFailAloneTheRestIsImported: the bad lines of a file
// (not JSON, a bad id, one key of two, a device given twice, a line over
// the cap, a device that exists) are named by number and the rest is
// imported, in entries of at most 2,000 devices, with the keys' digests;
// the same file again with upsert changes nothing but what differs; the
// export reads back every device, across its pages.
func TestImport_BadLinesFailAloneTheRestIsImported(t *testing.T) {
	im, s := newImporter(t, Config{})
	ctx := testutil.Context(t)
	if _, err := s.Store.Apply(ctx, raftstore.PutDevice{Device: fleet.Device{ID: "dev-04999", Tags: map[string]any{"environment": "test"}}}); err != nil {
		t.Fatal(err)
	}
	bad := map[int]string{
		10:   `{"id":"dev-bad-json",`,
		2500: `{"id":"has space","status":"enabled"}`,
		3000: `{"id":"dev-one-key","authentication":{"symmetricKey":{"primaryKey":"` + importtest.Key("x", "p") + `"}}}`,
		4000: importtest.Line("dev-00001", "prod"), // given twice
		4500: `{"id":"dev-long","tags":{"t":"` + strings.Repeat("x", api.MaxImportLineBytes) + `"}}`,
	}
	file := importtest.File(5000, "dev", "prod", bad)
	sum, err := im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportCreate})
	if err != nil {
		t.Fatal(err)
	}
	// dev-04999 exists: its line fails too.
	if want := []int{10, 2500, 3000, 4000, 4500, 4999}; !slices.Equal(importtest.ErrorLines(sum), want) || sum.Created != 4994 || sum.Failed != 6 || sum.Lines != 5000 {
		t.Fatalf("summary %+v, failed lines %v, want %v", sum, importtest.ErrorLines(sum), want)
	}
	if e := sum.Errors[3]; !strings.Contains(e.Message, "also on line 1") || e.DeviceID != "dev-00001" || e.Field != "id" {
		t.Fatalf("the duplicate's error: %+v", e)
	}
	if e := sum.Errors[4]; !strings.Contains(e.Message, "the cap of a line") {
		t.Fatalf("the long line's error: %+v", e)
	}
	s.mu.Lock()
	for _, e := range s.entries {
		if len(e.Devices) > batchDevices || e.Actor != "admin" || e.Mode != raftstore.ImportCreate {
			t.Fatalf("an entry of %d devices by %q, mode %q", len(e.Devices), e.Actor, e.Mode)
		}
	}
	if len(s.entries) != 3 {
		t.Fatalf("5,000 lines went in %d entries, want 3", len(s.entries))
	}
	s.mu.Unlock()
	d, ok := s.device("dev-02001")
	if !ok || d.Authentication.KeyHashes == nil || d.Authentication.KeyHashes.Primary != fleet.HashKey(importtest.Key("dev-02001", "p")) || d.Tags["environment"] != "prod" {
		t.Fatalf("dev-02001 as stored: %+v", d)
	}
	before, _ := s.device("dev-00042")

	// Upsert of the same file: nothing changes but dev-04999, which the
	// file gives env prod and keys.
	sum, err = im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportUpsert})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Unchanged != 4994 || sum.Updated != 1 || sum.Created != 0 || sum.Failed != 5 {
		t.Fatalf("upsert: %+v", sum)
	}
	if after, _ := s.device("dev-00042"); after.Etag != before.Etag {
		t.Fatalf("an idempotent upsert moved dev-00042's etag %s -> %s", before.Etag, after.Etag)
	}
	if d, _ := s.device("dev-04999"); d.Tags["environment"] != "prod" || d.Authentication.KeyHashes == nil {
		t.Fatalf("dev-04999 after the upsert: %+v", d)
	}
}

// TestImport_LargeTagsEndTheirBatchEarly: devices with large tags end
// their batch before 2,000 devices, so that no entry is over what the
// cluster port takes in one forwarded request (8 MiB): 200 devices with
// 50 KB of tags each (10 MB) go in several entries, all imported.
func TestImport_LargeTagsEndTheirBatchEarly(t *testing.T) {
	im, s := newImporter(t, Config{})
	big := strings.Repeat("x", 50_000)
	file := importtest.LargeFile(200, big)
	sum, err := im.Import(testutil.Context(t), bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportCreate})
	if err != nil || sum.Created != 200 || sum.Failed != 0 {
		t.Fatalf("import of large devices: %+v, %v", sum, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.entries) < 5 {
		t.Fatalf("10 MB of devices went in %d entries", len(s.entries))
	}
	for _, e := range s.entries {
		if b, _ := json.Marshal(e); len(b) > 4<<20 {
			t.Fatalf("an entry of %d bytes (%d devices)", len(b), len(e.Devices))
		}
	}
	if d, ok := s.device("big-199"); !ok || d.Tags["notes"] != big {
		t.Fatal("big-199 is not stored with its tags")
	}
}

// TestImport_TagsOverTheLimitsFailTheirLine: a device whose tags the
// deployment limits refuse is a failed line naming the field, and the
// others are imported; a delete by file does not look at tags.
func TestImport_TagsOverTheLimitsFailTheirLine(t *testing.T) {
	calls := 0
	im, s := newImporter(t, Config{TagLimits: func() func(string, map[string]any) error {
		calls++
		return func(id string, tags map[string]any) error {
			if tags["environment"] == "crowded" {
				return fleet.Invalid("tags", "would have device %s targeted by 51 deployments", id)
			}
			return nil
		}
	}})
	ctx := testutil.Context(t)
	file := importtest.File(20, "lim", "prod", map[int]string{7: importtest.Line("lim-crowded", "crowded")})
	sum, err := im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportCreate})
	if err != nil || sum.Created != 19 || sum.Failed != 1 || calls != 1 {
		t.Fatalf("import: %+v, %v (%d checks made)", sum, err, calls)
	}
	if e := sum.Errors[0]; e.Line != 7 || e.DeviceID != "lim-crowded" || e.Field != "tags" || !strings.Contains(e.Message, "51 deployments") {
		t.Fatalf("the crowded line's error: %+v", e)
	}
	if _, ok := s.device("lim-crowded"); ok {
		t.Fatal("a device over the limits was stored")
	}
	sum, err = im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportDelete})
	if err != nil || sum.Deleted != 19 || sum.Failed != 1 || sum.Errors[0].Line != 7 || !strings.Contains(sum.Errors[0].Message, "does not exist") {
		t.Fatalf("delete: %+v, %v", sum, err)
	}
}

// TestImport_AtomicAndDryRun: with atomic, one bad line refuses the whole
// file (an error naming the line) and no device of it is stored, and a
// create of devices that exist is refused whole the same way; a dry run
// says what would happen and changes nothing; a delete by file removes
// what it names.
func TestImport_AtomicAndDryRun(t *testing.T) {
	im, s := newImporter(t, Config{})
	ctx := testutil.Context(t)
	exists := func(id string) bool { _, ok := s.device(id); return ok }

	file := importtest.File(3000, "atom", "prod", map[int]string{2999: `{"id":"atom-x","status":"paused"}`})
	sum, err := im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportCreate, Atomic: true})
	var refused *api.ImportRefusedError
	var ve *fleet.ValidationError
	if !errors.As(err, &refused) || !errors.As(err, &ve) || !errors.Is(err, fleet.ErrInvalid) || ve.Field != "line 2999" ||
		!strings.Contains(ve.Msg, "status") || sum.Failed != 1 {
		t.Fatalf("atomic with a bad line: %+v, %v", sum, err)
	}
	if exists("atom-00001") || exists("atom-02500") {
		t.Fatal("a refused atomic import stored devices")
	}

	good := importtest.File(3000, "atom", "prod", nil)
	sum, err = im.Import(ctx, bytes.NewReader(good), api.ImportOptions{Mode: raftstore.ImportCreate, DryRun: true})
	if err != nil || sum.Created != 3000 || !sum.DryRun || exists("atom-00001") {
		t.Fatalf("dry run: %+v, %v", sum, err)
	}
	sum, err = im.Import(ctx, bytes.NewReader(good), api.ImportOptions{Mode: raftstore.ImportCreate, Atomic: true})
	if err != nil || sum.Created != 3000 || !exists("atom-03000") {
		t.Fatalf("atomic: %+v, %v", sum, err)
	}
	more := append(importtest.File(10, "new", "prod", nil), good[:len(importtest.Line("atom-00001", "prod"))+1]...)
	sum, err = im.Import(ctx, bytes.NewReader(more), api.ImportOptions{Mode: raftstore.ImportCreate, Atomic: true})
	if !errors.As(err, &ve) || ve.Field != "line 11" || exists("new-00001") {
		t.Fatalf("atomic create of an existing device: %+v, %v", sum, err)
	}

	sum, err = im.Import(ctx, bytes.NewReader(good[:len(good)/2]), api.ImportOptions{Mode: raftstore.ImportDelete})
	if err != nil || sum.Deleted != 1500 || exists("atom-00001") || !exists("atom-03000") {
		t.Fatalf("delete: %+v, %v", sum, err)
	}
	if _, err := im.Import(ctx, bytes.NewReader(good), api.ImportOptions{Mode: "merge"}); !errors.As(err, &ve) || ve.Field != "mode" {
		t.Fatalf("an unknown mode: %v", err)
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
// way stops the import with an error naming the line, and leaves some
// devices imported; the same file again with upsert imports the rest and
// leaves those alone, so every device is there once, as the file says;
// the export reads them back in id order, over two pages.
func TestImport_InterruptedThenResumedWithUpsert(t *testing.T) {
	im, _ := newImporter(t, Config{})
	ctx := testutil.Context(t)
	file := importtest.File(9000, "res", "prod", nil)
	_, err := im.Import(ctx, &failingReader{data: file, n: len(file) * 2 / 3}, api.ImportOptions{Mode: raftstore.ImportCreate})
	var stopped *api.ImportStoppedError
	if !errors.As(err, &stopped) || stopped.Line <= 1 || stopped.Line > 6001 {
		t.Fatalf("an import whose upload broke: %v", err)
	}
	var ids []string
	export := func() {
		ids = ids[:0]
		if err := im.Export(ctx, func(d fleet.Device) error { ids = append(ids, d.ID); return nil }); err != nil {
			t.Fatal(err)
		}
	}
	export()
	partial := len(ids)
	if partial == 0 || partial >= 9000 {
		t.Fatalf("%d devices after a broken upload of two thirds of the file", partial)
	}
	sum, err := im.Import(ctx, bytes.NewReader(file), api.ImportOptions{Mode: raftstore.ImportUpsert})
	if err != nil || sum.Created != 9000-partial || sum.Unchanged != partial || sum.Failed != 0 {
		t.Fatalf("resume with upsert after %d devices: %+v, %v", partial, sum, err)
	}
	export()
	if len(ids) != 9000 || !slices.IsSorted(ids) || ids[0] != "res-00001" || ids[8999] != "res-09000" {
		t.Fatalf("export after the resume: %d devices, sorted %v", len(ids), slices.IsSorted(ids))
	}
}
