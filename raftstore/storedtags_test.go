package raftstore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

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

// TestReader_DeviceTags: every device, in id order, with its stored tags,
// across the walk's batches; fn's error ends the walk (and its goroutine)
// and is returned; a stored device that does not decode is an error
// naming it, after the devices before it.
func TestReader_DeviceTags(t *testing.T) {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "state.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	const n = 3000
	want := make([]string, n)
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket(bucketDevices)
		if err != nil {
			return err
		}
		for i := range n {
			id := fmt.Sprintf("dev%04d", i)
			d := fleet.Device{ID: id, Tags: map[string]any{"n": float64(i)}}
			if i%7 == 0 {
				d.Tags = nil
			}
			v, _ := json.Marshal(d)
			want[i] = id + "=" + string(mustTags(t, v))
			if err := b.Put([]byte(id), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	walk := func(stopAt int) ([]string, error) {
		var got []string
		err := db.View(func(tx *bolt.Tx) error {
			return (&Reader{tx: tx}).DeviceTags(func(id string, tags json.RawMessage) error {
				if len(got) == stopAt {
					return errStop
				}
				got = append(got, id+"="+string(tags))
				return nil
			})
		})
		return got, err
	}
	before := runtime.NumGoroutine()
	got, err := walk(-1)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("DeviceTags: %d devices, err %v; want %d", len(got), err, n)
	}
	if got, err := walk(1000); !errors.Is(err, errStop) || len(got) != 1000 {
		t.Fatalf("fn failing at device 1000: %d devices, err %v", len(got), err)
	}
	waitFor(t, "the walk's goroutine ends", func() bool { return runtime.NumGoroutine() <= before })

	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketDevices).Put([]byte("dev2000"), []byte(`{"tags":`)) }); err != nil {
		t.Fatal(err)
	}
	got, err = walk(-1)
	if err == nil || !strings.Contains(err.Error(), `"dev2000"`) || !slices.Equal(got, want[:2000]) {
		t.Fatalf("a device that does not decode: %d devices, err %v", len(got), err)
	}
}

var errStop = errors.New("stop")

func mustTags(t *testing.T, doc []byte) json.RawMessage {
	t.Helper()
	tags, err := decodeTags(doc)
	if err != nil {
		t.Fatal(err)
	}
	return tags
}
