package api

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"appliance/fleet"
)

// TestServer_Import: the import route checks its parameters before the
// backend sees the body, streams the body to it with the options, answers
// a refused import with the JSON error naming the line and what the import
// found, and the export route writes one export line per device, without
// keys.
func TestServer_Import(t *testing.T) {
	b := &fakeBackend{}
	s := newTestServer(t, b)
	for _, target := range []string{"/api/v1/device-import?mode=merge", "/api/v1/device-import?atomic=yes", "/api/v1/device-import?dryRun=2"} {
		r := do(t, s, http.MethodPost, target, `{"id":"a"}`)
		if r.code != http.StatusBadRequest || r.err.Field == "" {
			t.Errorf("%s: %d %+v", target, r.code, r.err)
		}
	}
	if calls := b.Calls(); len(calls) != 0 {
		t.Fatalf("refused parameters reached the backend: %v", calls)
	}

	var got ImportOptions
	var body string
	b.importDevices = func(ctx context.Context, r io.Reader, opts ImportOptions) (ImportSummary, error) {
		got = opts
		data, _ := io.ReadAll(r)
		body = string(data)
		sum := ImportSummary{Mode: opts.Mode, Lines: 2, Failed: 1, Errors: []ImportError{{Line: 2, Field: "status", Message: "must be enabled or disabled"}}}
		return sum, &ImportRefusedError{Summary: sum, Err: &fleet.ValidationError{Field: "line 2", Msg: "status: must be enabled or disabled; nothing was imported (atomic)"}}
	}
	r := do(t, s, http.MethodPost, "/api/v1/device-import?mode=upsert&atomic=true", "{\"id\":\"a\"}\n{\"id\":\"b\",\"status\":\"x\"}\n")
	var eb importErrorBody
	if err := json.Unmarshal([]byte(r.body), &eb); err != nil || r.code != http.StatusBadRequest || eb.Error.Field != "line 2" || eb.Import == nil || eb.Import.Errors[0].Line != 2 {
		t.Fatalf("refused import: %d %s", r.code, r.body)
	}
	if got != (ImportOptions{Mode: "upsert", Atomic: true}) || !strings.HasSuffix(body, "\"x\"}\n") {
		t.Fatalf("backend got %+v and body %q", got, body)
	}

	b.exportDevices = func(ctx context.Context, fn func(fleet.Device) error) error {
		for _, id := range []string{"a", "b"} {
			if err := fn(fleet.Device{ID: id, Etag: "3", Tags: map[string]any{"k": id}, Authentication: fleet.Authentication{KeyHashes: &fleet.KeyHashes{Primary: "hash"}}}); err != nil {
				return err
			}
		}
		return nil
	}
	r = do(t, s, http.MethodGet, "/api/v1/device-export", "")
	lines := strings.Split(strings.TrimSpace(r.body), "\n")
	if r.code != http.StatusOK || len(lines) != 2 || strings.Contains(r.body, "hash") || !strings.Contains(lines[1], `"primaryKey":null`) || r.header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("export: %d %q", r.code, r.body)
	}
	b.exportDevices = func(ctx context.Context, fn func(fleet.Device) error) error { return ErrUnavailable }
	if r := do(t, s, http.MethodGet, "/api/v1/device-export", ""); r.code != http.StatusServiceUnavailable {
		t.Fatalf("export failing before the first line: %d %s", r.code, r.body)
	}
}
