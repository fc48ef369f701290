package raftstore

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"appliance/fleet"
)

// FuzzStoredTags: the tags found without decoding a stored device are the
// member encoding/json decodes into the tags field, or the same refusal.
func FuzzStoredTags(f *testing.F) {
	d, err := json.Marshal(fleet.Device{ID: "line3-press-000001", Tags: map[string]any{"environment": "prod", "site": map[string]any{"line": 3}},
		Status: "enabled", CreatedTimeUTC: time.Unix(1, 0).UTC(), Etag: "7", Authentication: fleet.Authentication{Type: "sas"}})
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{string(d), `{"tags":null}`, `{}`, `{"Tags":{"a":1}}`, `{"tags":{"a":1},"TAGS":{"b":2}}`,
		`{"t\u0061gs":{"a":1}}`, `{"tags":1,"tags":{"x":"y"}}`, `{"tagſ":{"a":1}}`, `{"tags":{"a":1}`, `[]`, `{"tags":{}} x`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		got, err := storedTags(doc)
		want, werr := decodeTags(doc)
		if (err == nil) != (werr == nil) {
			t.Fatalf("storedTags(%q): err %v; encoding/json: %v", doc, err, werr)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("storedTags(%q) = %q, encoding/json %q", doc, got, want)
		}
	})
}
