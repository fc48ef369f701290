package raftstore

import (
	"bytes"
	"encoding/json"
	"strconv"
	"time"

	"appliance/internal/jsonscan"
)

// A stored report is the device's document wrapped with what the node
// knew when it stored it (StoredReport, written by putJSON). The console's
// reads, a deployment's status and the apply of every report batch read
// it per device, and encoding/json spent most of their time on the
// wrapper: it checks and copies the whole document to fill a RawMessage.
// decodeStoredReport reads the wrapper as putJSON writes it, the document
// first and the few fields after it, and gives every other shape to
// encoding/json: the result is always the one json.Unmarshal gives
// (FuzzDecodeStoredReport).

const (
	storedReportPrefix = `{"document":`
	// storedReportAfter begins what follows the document; the last
	// occurrence in the value is the wrapper's own (a document containing
	// the same bytes would end the document early, and a document cut
	// short is not one JSON value).
	storedReportAfter = `,"receivedTimeUtc":`
)

// decodeStoredReport decodes a stored report as json.Unmarshal does.
func decodeStoredReport(v []byte) (StoredReport, error) {
	if rep, ok := decodeStoredReportFast(v); ok {
		return rep, nil
	}
	var out StoredReport
	err := json.Unmarshal(v, &out)
	return out, err
}

// decodeStoredReportFast decodes the wrapper exactly as putJSON writes
// it; false for any other shape.
func decodeStoredReportFast(v []byte) (StoredReport, bool) {
	doc, out, ok := splitStoredReport(v)
	if !ok || mayNestTooDeep(doc) || !jsonscan.Valid(doc) {
		return StoredReport{}, false
	}
	out.Document = bytes.Clone(doc)
	return out, true
}

// splitStoredReport finds the document of a wrapper as putJSON writes it,
// unchecked, and decodes what follows it; false for any other shape.
func splitStoredReport(v []byte) (doc []byte, out StoredReport, ok bool) {
	if !bytes.HasPrefix(v, []byte(storedReportPrefix)) {
		return nil, StoredReport{}, false
	}
	i := bytes.LastIndex(v, []byte(storedReportAfter))
	if i <= len(storedReportPrefix) {
		return nil, StoredReport{}, false
	}
	doc = v[len(storedReportPrefix):i]
	// An object with no space around it, as json.Marshal leaves it (a
	// RawMessage from encoding/json has none either).
	if doc[0] != '{' || doc[len(doc)-1] != '}' {
		return nil, StoredReport{}, false
	}
	t := tailReader{rest: v[i+len(storedReportAfter):]}
	if !t.time(&out.ReceivedTimeUTC) {
		return nil, StoredReport{}, false
	}
	if t.key(`,"node":`) && !t.plainString(&out.Node) {
		return nil, StoredReport{}, false
	}
	if !t.key(`,"session":`) || !t.time(&out.Session) || !t.key(`,"index":`) || !t.uint(&out.Index) || string(t.rest) != "}" {
		return nil, StoredReport{}, false
	}
	return doc, out, true
}

// mayNestTooDeep tells whether doc might nest too deeply for encoding/json
// once wrapped (its limit, 10,000, counts the wrapper's level; jsonscan's
// counts from doc): such a document goes to encoding/json, for its answer.
// The nesting is at most the number of brackets that open.
func mayNestTooDeep(doc []byte) bool {
	const jsonMaxDepth = 10000
	return bytes.Count(doc, []byte("{"))+bytes.Count(doc, []byte("[")) >= jsonMaxDepth
}

// decodeStoredReportMeta is decodeStoredReport without the document, for
// a wrapper putJSON wrote: it is read without checking the document (the
// state file's checks at open cover its bytes; a value in another shape
// whose members repeat could be split elsewhere than encoding/json reads
// it, which putJSON never writes); any other shape is decoded whole.
func decodeStoredReportMeta(v []byte) (StoredReport, error) {
	if _, out, ok := splitStoredReport(v); ok {
		return out, nil
	}
	out, err := decodeStoredReport(v)
	out.Document = nil
	return out, err
}

// tailReader reads the members after the document, each exactly as
// json.Marshal writes them.
type tailReader struct{ rest []byte }

// key consumes k when the rest begins with it.
func (t *tailReader) key(k string) bool {
	if !bytes.HasPrefix(t.rest, []byte(k)) {
		return false
	}
	t.rest = t.rest[len(k):]
	return true
}

// quoted consumes a string of printable ASCII other than '"' and '\',
// the quotes included: the bytes encoding/json would give unchanged.
func (t *tailReader) quoted() ([]byte, bool) {
	if len(t.rest) < 2 || t.rest[0] != '"' {
		return nil, false
	}
	for j := 1; j < len(t.rest); j++ {
		switch c := t.rest[j]; {
		case c == '"':
			q := t.rest[:j+1]
			t.rest = t.rest[j+1:]
			return q, true
		case c < 0x20 || c > 0x7e || c == '\\':
			return nil, false
		}
	}
	return nil, false
}

func (t *tailReader) plainString(dst *string) bool {
	q, ok := t.quoted()
	if ok {
		*dst = string(q[1 : len(q)-1])
	}
	return ok
}

// time reads a time with the method encoding/json calls.
func (t *tailReader) time(dst *time.Time) bool {
	q, ok := t.quoted()
	return ok && dst.UnmarshalJSON(q) == nil
}

// uint reads digits without a leading zero (JSON's), in range.
func (t *tailReader) uint(dst *uint64) bool {
	j := 0
	for j < len(t.rest) && t.rest[j] >= '0' && t.rest[j] <= '9' {
		j++
	}
	if j == 0 || j > 1 && t.rest[0] == '0' {
		return false
	}
	n, err := strconv.ParseUint(string(t.rest[:j]), 10, 64)
	if err != nil {
		return false
	}
	*dst, t.rest = n, t.rest[j:]
	return true
}
