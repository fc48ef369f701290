package evaluator

import (
	"bytes"
	"encoding/json"
	"slices"
	"strconv"
	"unicode/utf8"
	"unsafe"

	"appliance/internal/jsonscan"
)

// PutDeviceJSON is PutDevice with the device's tags as stored: a JSON
// object, or null or nothing for none. It reads the tags straight into the
// dictionary, without decoding them into maps, which made most of a
// restart's rebuild of a million devices; tags it cannot read that way
// (escapes, duplicate keys, invalid UTF-8, very deep nesting) are decoded
// with encoding/json and given to PutDevice, so both ways give the same
// leaves. A document that is not an object (or null) is an error and
// changes nothing.
func (e *Engine) PutDeviceJSON(id string, tags []byte) ([]Change, error) {
	if id == "" {
		return nil, nil
	}
	e.mu.Lock()
	if nw, ok := e.flattenJSON(tags); ok {
		defer e.mu.Unlock()
		return e.putLeaves(id, nw), nil
	}
	e.mu.Unlock()
	var m map[string]any
	if err := json.Unmarshal(tags, &m); err != nil {
		return nil, err
	}
	return e.PutDevice(id, m), nil
}

// tagsScratch holds the members of the tags being read (flattenJSON),
// kept between devices so that reading allocates nothing.
type tagsScratch struct {
	members []jsonMember
}

// jsonMember is one member of a tags object: its key and value (a string
// value a view of the document's bytes) and, for an object, where its own
// members are in the scratch.
type jsonMember struct {
	key      []byte
	raw      []byte
	val      value
	first, n int
}

// maxTagsDepth bounds the objects flattenJSON reads in each other; deeper
// tags (no condition can name them: 16 keys a path) go to encoding/json.
const maxTagsDepth = 32

// flattenJSON interns the tags document raw, as flatten does its decoded
// form; false (and nothing interned) for what only encoding/json reads
// right. Nothing is acquired until the whole document has been read.
func (e *Engine) flattenJSON(raw []byte) ([]uint32, bool) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, true
	}
	sc := &e.scratch
	// The members point into raw: let go of them once read.
	defer func() { clear(sc.members); sc.members = sc.members[:0] }()
	first, n, ok := sc.read(raw, 0)
	if !ok {
		return nil, false
	}
	if n == 0 {
		return nil, true
	}
	var buf [128]byte
	out := make([]uint32, 0, n+2)
	out = e.d.acquireMembers(sc.members, first, n, buf[:0], out)
	slices.Sort(out)
	return slices.Clip(out), true
}

// read appends the members of the object obj to the scratch, sorted by
// key (as flatten visits them), then reads each object-valued member's
// own; it returns where they are.
func (sc *tagsScratch) read(obj []byte, depth int) (first, n int, ok bool) {
	if depth >= maxTagsDepth {
		return 0, 0, false
	}
	o, err := jsonscan.NewObject(obj)
	if err != nil {
		return 0, 0, false
	}
	first = len(sc.members)
	var m jsonscan.Member
	for o.Next(&m) {
		if !m.Plain || !utf8.Valid(m.Key) {
			return 0, 0, false
		}
		v, ok := scalar(m.Value)
		if !ok {
			return 0, 0, false
		}
		sc.members = append(sc.members, jsonMember{key: m.Key, raw: m.Value, val: v})
	}
	if o.Err() != nil {
		return 0, 0, false
	}
	n = len(sc.members) - first
	level := sc.members[first:]
	slices.SortFunc(level, func(a, b jsonMember) int { return bytes.Compare(a.key, b.key) })
	for i := 1; i < n; i++ {
		if bytes.Equal(level[i-1].key, level[i].key) {
			return 0, 0, false // a map keeps the last: leave it to encoding/json
		}
	}
	for i := first; i < first+n; i++ {
		if sc.members[i].val.kind != kObject {
			continue
		}
		f, k, ok := sc.read(sc.members[i].raw, depth+1)
		if !ok {
			return 0, 0, false
		}
		sc.members[i].first, sc.members[i].n = f, k
	}
	return first, n, true
}

// scalar classifies a member's value as classify does its decoded form; a
// string is a view of raw. False for a string with escapes or invalid
// UTF-8 and a number out of float64's range.
func scalar(raw []byte) (value, bool) {
	switch raw[0] {
	case '{':
		return value{kind: kObject}, true
	case '[':
		return value{kind: kArray}, true
	case 't':
		return boolValue(true), true
	case 'f':
		return boolValue(false), true
	case 'n':
		return value{kind: kNull}, true
	case '"':
		s := raw[1 : len(raw)-1]
		if bytes.IndexByte(s, '\\') >= 0 || !utf8.Valid(s) {
			return value{}, false
		}
		return value{kind: kString, s: unsafe.String(unsafe.SliceData(s), len(s))}, true
	}
	f, err := strconv.ParseFloat(unsafe.String(unsafe.SliceData(raw), len(raw)), 64)
	if err != nil {
		return value{}, false
	}
	return value{kind: kNumber, f: f}, true
}

// acquireMembers interns members[first:first+n] under prefix, and the
// members of each object among them after it, as flattenObject does.
func (d *dict) acquireMembers(members []jsonMember, first, n int, prefix []byte, out []uint32) []uint32 {
	for i := first; i < first+n; i++ {
		m := &members[i]
		p := appendKey(prefix, unsafe.String(unsafe.SliceData(m.key), len(m.key)))
		out = append(out, d.acquireTerm(p, m.val))
		if m.val.kind == kObject {
			out = d.acquireMembers(members, m.first, m.n, p, out)
		}
	}
	return out
}
