package evaluator

import (
	"slices"
)

// A plan is a condition bound to the engine's dictionary: tag equalities
// become term ids, other tag comparisons a path id. It is evaluated two
// ways, both derived from the same syntax tree and both tested equal to the
// CEL program:
//
//   - per device (match), over the device's leaves; and
//   - per set (setEval), over the postings, for a deployment change: an
//     equality or IN is its posting (or their union), any other tag
//     comparison is the union of the postings of the path's terms whose
//     value satisfies it (each device has at most one term per path), and
//     AND, OR, NOT are set operations. Only deviceId comparisons other than
//     = and IN cannot be answered from the index; a plan that has one
//     yields a superset, and match decides for each candidate.

type pop uint8

const (
	pFalse pop = iota
	pTrue
	pAnd
	pOr
	pNot
	pTerm    // the device holds term
	pAnyTerm // the device holds one of terms
	pPath    // src.evalValue(value at path)
	pID      // src.evalValue(deviceId)
)

type pnode struct {
	op    pop
	kids  []*pnode
	term  uint32
	terms []uint32 // sorted
	path  uint32
	src   *node
}

// binder binds a condition. With pin set it takes references on every term
// and path it names (a stored deployment); without, it only looks them up
// and a missing one can match nothing (a one-off query).
type binder struct {
	d     *dict
	pin   bool
	terms []uint32 // pinned, to release with the plan
	paths []uint32
}

func (b *binder) bind(n *node) *pnode {
	switch n.op {
	case nFalse:
		return &pnode{op: pFalse}
	case nTrue:
		return &pnode{op: pTrue}
	case nAnd, nOr, nNot:
		p := &pnode{op: map[nodeOp]pop{nAnd: pAnd, nOr: pOr, nNot: pNot}[n.op]}
		for _, k := range n.kids {
			p.kids = append(p.kids, b.bind(k))
		}
		return p
	}
	if n.path.root == rootDeviceID {
		return &pnode{op: pID, src: n}
	}
	key := []byte(n.path.key())
	switch {
	case n.op == nCmp && n.cmp == opEq:
		return &pnode{op: pTerm, term: b.term(key, n.val)}
	case n.op == nIn:
		p := &pnode{op: pAnyTerm}
		for _, v := range n.vals {
			if t := b.term(key, v); t != 0 && !slices.Contains(p.terms, t) {
				p.terms = append(p.terms, t)
			}
		}
		slices.Sort(p.terms)
		return p
	}
	return &pnode{op: pPath, path: b.path(key), src: n}
}

func (b *binder) term(key []byte, v value) uint32 {
	if !b.pin {
		return b.d.lookupTerm(b.d.lookupPath(key), v)
	}
	t := b.d.acquireTerm(key, v)
	b.terms = append(b.terms, t)
	return t
}

func (b *binder) path(key []byte) uint32 {
	if !b.pin {
		return b.d.lookupPath(key)
	}
	p := b.d.acquirePath(key)
	b.paths = append(b.paths, p)
	return p
}

// match evaluates a plan for one device.
func (d *dict) match(p *pnode, id string, leaves []uint32) bool {
	switch p.op {
	case pTrue:
		return true
	case pAnd:
		for _, k := range p.kids {
			if !d.match(k, id, leaves) {
				return false
			}
		}
		return true
	case pOr:
		for _, k := range p.kids {
			if d.match(k, id, leaves) {
				return true
			}
		}
		return false
	case pNot:
		return !d.match(p.kids[0], id, leaves)
	case pTerm:
		return p.term != 0 && hasTerm(leaves, p.term)
	case pAnyTerm:
		for _, t := range p.terms {
			if hasTerm(leaves, t) {
				return true
			}
		}
		return false
	case pPath:
		if p.path != 0 {
			for _, t := range leaves {
				if d.termPath[t] == p.path {
					return p.src.evalValue(d.terms[t].val, true)
				}
			}
		}
		return p.src.evalValue(value{}, false)
	case pID:
		return p.src.evalValue(value{kind: kString, s: id}, true)
	}
	return false
}

func hasTerm(leaves []uint32, t uint32) bool {
	for _, l := range leaves {
		if l >= t {
			return l == t
		}
	}
	return false
}

// anchors are what a device must hold for a plan to possibly match it: one
// of the terms, one of the paths defined, or one of the ids. A plan without
// anchors (nil) can match any device and is evaluated on every device
// change; an empty, non-nil set never matches.
type anchors struct {
	terms []uint32
	paths []uint32
	ids   []string
}

// anchorsOf computes a plan's anchors. For AND it keeps the operand whose
// anchors hold the fewest devices now (only speed depends on the choice).
func (e *Engine) anchorsOf(p *pnode) *anchors {
	switch p.op {
	case pFalse:
		return &anchors{}
	case pTerm:
		if p.term == 0 {
			return &anchors{}
		}
		return &anchors{terms: []uint32{p.term}}
	case pAnyTerm:
		return &anchors{terms: slices.Clone(p.terms)}
	case pPath:
		if p.path == 0 {
			return &anchors{}
		}
		return &anchors{paths: []uint32{p.path}}
	case pID:
		switch {
		case p.src.op == nCmp && p.src.cmp == opEq:
			return &anchors{ids: []string{p.src.val.s}}
		case p.src.op == nIn:
			a := &anchors{}
			for _, v := range p.src.vals {
				a.ids = append(a.ids, v.s)
			}
			slices.Sort(a.ids)
			a.ids = slices.Compact(a.ids)
			return a
		}
	case pAnd:
		var best *anchors
		bestCost := 0
		for _, k := range p.kids {
			a := e.anchorsOf(k)
			if a == nil {
				continue
			}
			if c := e.anchorCost(a); best == nil || c < bestCost {
				best, bestCost = a, c
			}
		}
		return best
	case pOr:
		out := &anchors{}
		for _, k := range p.kids {
			a := e.anchorsOf(k)
			if a == nil {
				return nil
			}
			out.terms = append(out.terms, a.terms...)
			out.paths = append(out.paths, a.paths...)
			out.ids = append(out.ids, a.ids...)
		}
		slices.Sort(out.terms)
		out.terms = slices.Compact(out.terms)
		slices.Sort(out.paths)
		out.paths = slices.Compact(out.paths)
		slices.Sort(out.ids)
		out.ids = slices.Compact(out.ids)
		return out
	}
	return nil
}

func (e *Engine) anchorCost(a *anchors) int {
	n := len(a.ids)
	for _, t := range a.terms {
		n += e.d.terms[t].post.Len()
	}
	for _, p := range a.paths {
		n += int(e.d.paths[p].count)
	}
	return n
}

// setEval evaluates a plan over every device at once. It returns the set of
// matching slots and exact=true, or a superset of them and exact=false (a
// nil set standing for every device).
func (e *Engine) setEval(p *pnode) (dense, bool) {
	switch p.op {
	case pFalse:
		return e.emptySet(), true
	case pTrue:
		return slices.Clone(e.live), true
	case pTerm:
		s := e.emptySet()
		if p.term != 0 {
			s.or(&e.d.terms[p.term].post)
		}
		return s, true
	case pAnyTerm:
		s := e.emptySet()
		for _, t := range p.terms {
			s.or(&e.d.terms[t].post)
		}
		return s, true
	case pPath:
		s := e.emptySet()
		if p.path != 0 {
			for _, t := range e.d.paths[p.path].terms {
				if p.src.evalValue(e.d.terms[t].val, true) {
					s.or(&e.d.terms[t].post)
				}
			}
		}
		return s, true
	case pID:
		switch {
		case p.src.op == nCmp && p.src.cmp == opEq:
			s := e.emptySet()
			if slot, ok := e.byID[p.src.val.s]; ok {
				s.set(slot)
			}
			return s, true
		case p.src.op == nIn:
			s := e.emptySet()
			for _, v := range p.src.vals {
				if slot, ok := e.byID[v.s]; ok {
					s.set(slot)
				}
			}
			return s, true
		case p.src.op == nStartsWith:
			// Indexed: a range of the id order.
			s := e.emptySet()
			e.idsWithPrefix(p.src.val.s, s.set)
			return s, true
		case p.src.op == nDefined || p.src.op == nIsType:
			// Every device has an id, and it is a string.
			if p.src.evalValue(value{kind: kString}, true) {
				return slices.Clone(e.live), true
			}
			return e.emptySet(), true
		}
		return nil, false
	case pNot:
		s, exact := e.setEval(p.kids[0])
		if !exact {
			return nil, false
		}
		out := slices.Clone(e.live)
		out.andNotD(s)
		return out, true
	case pAnd:
		var acc dense
		exact := true
		for _, k := range p.kids {
			s, ex := e.setEval(k)
			exact = exact && ex
			switch {
			case s == nil:
			case acc == nil:
				acc = s
			default:
				acc.andD(s)
			}
		}
		return acc, exact
	case pOr:
		acc := e.emptySet()
		exact := true
		for _, k := range p.kids {
			s, ex := e.setEval(k)
			if s == nil {
				return nil, false
			}
			exact = exact && ex
			acc.orD(s)
		}
		return acc, exact
	}
	return nil, false
}
