package raftstore

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

// FuzzDecodeStoredReport: a stored report decodes to what json.Unmarshal
// gives, or the same refusal, whatever its shape (nesting near
// encoding/json's limit included), and so does its meta (ReportMeta) for
// every wrapper in the shape putJSON writes; that shape takes the fast
// path.
func FuzzDecodeStoredReport(f *testing.F) {
	at := time.Date(2026, 12, 7, 0, 30, 0, 123456789, time.UTC)
	written, err := json.Marshal(StoredReport{
		Document:        json.RawMessage(`{"lastDesiredVersion":3,"modules":{"temp":{"runtimeStatus":"running"}},"moduleTwins":{"temp":{"note":"},\"receivedTimeUtc\":"}}}`),
		ReceivedTimeUTC: at, Node: "n1", Session: at.Add(-time.Hour), Index: 42,
	})
	if err != nil {
		f.Fatal(err)
	}
	noNode, err := json.Marshal(StoredReport{Document: json.RawMessage(`{}`), ReceivedTimeUTC: at.Local(), Index: 1 << 63})
	if err != nil {
		f.Fatal(err)
	}
	for _, w := range [][]byte{written, noNode} {
		if _, ok := decodeStoredReportFast(w); !ok {
			f.Fatalf("the wrapper putJSON writes does not take the fast path: %s", w)
		}
	}
	f.Add(noNode)
	deep := func(levels int) string {
		return `{"document":` + strings.Repeat(`{"a":`, levels-1) + `{}` + strings.Repeat(`}`, levels-1) + `,"receivedTimeUtc":"2026-12-07T00:00:00Z","session":"0001-01-01T00:00:00Z","index":3}`
	}
	for _, s := range []string{
		string(written),
		deep(9999), // 10,000 deep once wrapped: encoding/json's limit
		deep(10000),
		`{"document":{},"receivedTimeUtc":"2026-12-07T00:00:00Z","session":"0001-01-01T00:00:00Z","index":1}`,
		`{"document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z","index":1,"document":{"b":2}}`,
		`{"document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z","DOCUMENT":{"b":2}}`,
		`{"document":{"a":1},"receivedTimeUtc":"x","receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":{"a":1,"receivedTimeUtc":"2026-12-07T00:00:00Z"}}`,
		`{"document":{"a":1} ,"receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":null,"receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z","index":-1}`,
		`{"document":{"a":"\xff"},"receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z"} x`,
		`{"Document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":{"a":1},"receivedTimeUtc":"2026-12-07T00:00:00Z","Index":7,"NODE":"n2"}`,
		`{"document":{"a":[1,2,{"b":"},\"receivedTimeUtc\":"}]},"receivedTimeUtc":"2026-12-07T00:00:00Z"}`,
		`{"document":{},"receivedTimeUtc":"2026-12-07T00:00:00Z","node":"n\u0031","session":"2026-12-07T00:00:00+01:00","index":01}`,
		`{"document":{},"receivedTimeUtc":"2026-12-07T24:00:00Z","session":"2026-12-07T00:00:00.5Z","index":18446744073709551616}`,
		`{"document":{},"receivedTimeUtc":"2026-12-07T00:00:00Z","node":"\xc3\xa9","session":"2026-12-07T00:00:00Z","index":2}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, v []byte) {
		got, err := decodeStoredReport(v)
		var want StoredReport
		werr := json.Unmarshal(v, &want)
		if (err == nil) != (werr == nil) {
			t.Fatalf("decodeStoredReport(%.300q): err %v; encoding/json: %v", v, err, werr)
		}
		if err != nil {
			return
		}
		if !bytes.Equal(got.Document, want.Document) || !got.ReceivedTimeUTC.Equal(want.ReceivedTimeUTC) || !got.Session.Equal(want.Session) ||
			got.Node != want.Node || got.Index != want.Index {
			t.Fatalf("decodeStoredReport(%.300q) = %.300v, encoding/json %.300v", v, got, want)
		}
		if _, ok := decodeStoredReportFast(v); !ok {
			return // the meta is read unchecked only from what putJSON writes
		}
		meta, err := decodeStoredReportMeta(v)
		if err != nil || meta.Document != nil || !meta.ReceivedTimeUTC.Equal(want.ReceivedTimeUTC) || !meta.Session.Equal(want.Session) ||
			meta.Node != want.Node || meta.Index != want.Index {
			t.Fatalf("decodeStoredReportMeta(%.300q) = %.300v, %v; encoding/json %.300v", v, meta, err, want)
		}
		if !reflect.DeepEqual(got.ReceivedTimeUTC.Location(), want.ReceivedTimeUTC.Location()) {
			t.Fatalf("decodeStoredReport(%.300q): time zone %v, encoding/json %v", v, got.ReceivedTimeUTC.Location(), want.ReceivedTimeUTC.Location())
		}
	})
}
