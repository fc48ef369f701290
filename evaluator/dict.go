package evaluator

import (
	"slices"
	"strings"
)

// The dictionary interns what devices' tags contain. A path is a flattened
// tag name ("location.state"); a term is a path with one value
// (location.state = 'Oregon', or location = <object>). A device is stored as
// the sorted list of its term ids (its "leaves"), and every term keeps the
// posting set of devices that hold it. Terms and paths are reference
// counted (one per device holding them, one per stored plan naming them)
// and their ids are recycled when the count drops to zero.

type termKey struct {
	path uint32
	kind kind
	s    string
	f    uint64 // canonicalBits of a number, 0/1 for a bool
}

type pathInfo struct {
	name  string
	refs  int32    // terms with this path + plans pinning it
	count int32    // devices on which the path is defined
	terms []uint32 // its terms, in no particular order
	deps  []uint32 // deployments anchored on this path
}

type termInfo struct {
	path uint32
	val  value
	refs int32 // devices holding it + plans pinning it
	idx  int32 // position in paths[path].terms
	post bitmap
}

type dict struct {
	paths    []pathInfo // by path id; id 0 means "no such path"
	pathIDs  map[string]uint32
	pathFree []uint32
	terms    []termInfo // by term id; id 0 means "no such term"
	termPath []uint32   // terms[t].path, packed for the evaluators' scans
	termIDs  map[termKey]uint32
	termFree []uint32
	// termDeps lists the deployments anchored on a term. Few terms have
	// any, so a map costs less than a field in every term.
	termDeps map[uint32][]uint32
}

func newDict() dict {
	return dict{
		paths:    make([]pathInfo, 1),
		pathIDs:  map[string]uint32{},
		terms:    make([]termInfo, 1),
		termPath: make([]uint32, 1),
		termIDs:  map[termKey]uint32{},
		termDeps: map[uint32][]uint32{},
	}
}

func keyOf(p uint32, v value) termKey {
	k := termKey{path: p, kind: v.kind, s: v.s}
	if v.kind == kNumber || v.kind == kBool {
		k.f = canonicalBits(v.f)
	}
	return k
}

// lookupPath returns the id of a path, 0 if no device or plan has it.
func (d *dict) lookupPath(name []byte) uint32 { return d.pathIDs[string(name)] }

// acquirePath returns the id of a path, creating it, and takes a reference.
func (d *dict) acquirePath(name []byte) uint32 {
	if id, ok := d.pathIDs[string(name)]; ok {
		d.paths[id].refs++
		return id
	}
	var id uint32
	if n := len(d.pathFree); n > 0 {
		id = d.pathFree[n-1]
		d.pathFree = d.pathFree[:n-1]
	} else {
		id = uint32(len(d.paths))
		d.paths = append(d.paths, pathInfo{})
	}
	s := string(name)
	d.paths[id] = pathInfo{name: s, refs: 1}
	d.pathIDs[s] = id
	return id
}

func (d *dict) releasePath(id uint32) {
	p := &d.paths[id]
	if p.refs--; p.refs > 0 {
		return
	}
	delete(d.pathIDs, p.name)
	*p = pathInfo{}
	d.pathFree = append(d.pathFree, id)
}

func (d *dict) lookupTerm(path uint32, v value) uint32 {
	if path == 0 {
		return 0
	}
	return d.termIDs[keyOf(path, v)]
}

// acquireTerm returns the id of the term (path, v), creating it (and taking
// a reference on the path for it), and takes a reference on the term.
func (d *dict) acquireTerm(name []byte, v value) uint32 {
	p := d.pathIDs[string(name)]
	if p != 0 {
		if id, ok := d.termIDs[keyOf(p, v)]; ok {
			d.terms[id].refs++
			return id
		}
	}
	p = d.acquirePath(name)
	// The value may be a view of the caller's bytes (tagsjson.go): the
	// dictionary keeps a copy.
	v.s = strings.Clone(v.s)
	var id uint32
	if n := len(d.termFree); n > 0 {
		id = d.termFree[n-1]
		d.termFree = d.termFree[:n-1]
	} else {
		id = uint32(len(d.terms))
		d.terms = append(d.terms, termInfo{})
		d.termPath = append(d.termPath, 0)
	}
	pi := &d.paths[p]
	d.terms[id] = termInfo{path: p, val: v, refs: 1, idx: int32(len(pi.terms))}
	d.termPath[id] = p
	pi.terms = append(pi.terms, id)
	d.termIDs[keyOf(p, v)] = id
	return id
}

func (d *dict) releaseTerm(id uint32) {
	t := &d.terms[id]
	if t.refs--; t.refs > 0 {
		return
	}
	p := t.path
	pi := &d.paths[p]
	last := pi.terms[len(pi.terms)-1]
	pi.terms[t.idx] = last
	d.terms[last].idx = t.idx
	pi.terms = pi.terms[:len(pi.terms)-1]
	delete(d.termIDs, keyOf(p, t.val))
	*t = termInfo{}
	d.termPath[id] = 0
	d.termFree = append(d.termFree, id)
	d.releasePath(p)
}

// flatten interns a device's tags and returns its leaves, sorted, holding a
// reference on each. Keys are visited in sorted order so that ids are
// assigned identically on every node.
func (d *dict) flatten(tags map[string]any) []uint32 {
	if len(tags) == 0 {
		return nil
	}
	var buf [128]byte
	out := make([]uint32, 0, len(tags)+2)
	out = d.flattenObject(tags, buf[:0], out)
	slices.Sort(out)
	return slices.Clip(out)
}

func (d *dict) flattenObject(obj any, prefix []byte, out []uint32) []uint32 {
	switch m := obj.(type) {
	case map[string]any:
		keys := sortedKeys(m)
		for _, k := range keys {
			p := appendKey(prefix, k)
			v := m[k]
			cv := classify(v)
			out = append(out, d.acquireTerm(p, cv))
			if cv.kind == kObject {
				out = d.flattenObject(v, p, out)
			}
		}
	case map[string]string:
		keys := sortedKeys(m)
		for _, k := range keys {
			out = append(out, d.acquireTerm(appendKey(prefix, k), value{kind: kString, s: m[k]}))
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// appendKey appends one key to a flattened path. Keys from conditions are
// identifiers, so "a.b" always means key a then key b; a key from a
// document that contains '.' or '\' is escaped so that it cannot collide
// (no condition can name it).
func appendKey(prefix []byte, k string) []byte {
	if len(prefix) > 0 {
		prefix = append(prefix, '.')
	}
	if !strings.ContainsAny(k, `.\`) {
		return append(prefix, k...)
	}
	for i := 0; i < len(k); i++ {
		if k[i] == '.' || k[i] == '\\' {
			prefix = append(prefix, '\\')
		}
		prefix = append(prefix, k[i])
	}
	return prefix
}
