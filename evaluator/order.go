package evaluator

import (
	"slices"
	"strings"
)

// idOrder keeps device slots sorted by device id, so that large answers
// (a million targeted devices, the Change list of a re-target) come out
// sorted without sorting a million strings each time.
//
// New slots wait in pending and deleted slots stay in sorted (skipped as
// dead) until compact merges them in; a deleted slot is not reused before
// that (it waits in limbo), so a slot number in sorted always means the
// device it was sorted as, or a dead one.
type idOrder struct {
	sorted  []uint32
	pending []uint32
	limbo   []uint32
}

// compact merges pending into sorted and purges dead slots. Writers only.
func (e *Engine) compactOrder() {
	o := &e.order
	if len(o.pending) == 0 && len(o.limbo) == 0 {
		return
	}
	pend := e.sortSlots(o.pending, func(x uint32) bool { return e.live.has(x) })
	merged := make([]uint32, 0, e.nlive)
	i := 0
	for _, s := range o.sorted {
		if !e.live.has(s) {
			continue
		}
		for i < len(pend) && e.ids[pend[i]] < e.ids[s] {
			merged = append(merged, pend[i])
			i++
		}
		merged = append(merged, s)
	}
	merged = append(merged, pend[i:]...)
	o.sorted = merged
	o.pending = o.pending[:0]
	for _, s := range o.limbo {
		e.ids[s] = "" // kept while it stood in sorted (DeleteDevice)
	}
	e.free = append(e.free, o.limbo...)
	o.limbo = o.limbo[:0]
}

// maybeCompact bounds the unsorted and dead entries to a fraction of the
// devices, which keeps readers' merges cheap and slots reused.
func (e *Engine) maybeCompact() {
	o := &e.order
	if len(o.pending)+len(o.limbo) > max(e.tune.compactMin, e.nlive/8) {
		e.compactOrder()
	}
}

// sortSlots returns the slots of src that keep accepts, sorted by id.
func (e *Engine) sortSlots(src []uint32, keep func(uint32) bool) []uint32 {
	out := make([]uint32, 0, len(src))
	for _, s := range src {
		if keep(s) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b uint32) int { return strings.Compare(e.ids[a], e.ids[b]) })
	return out
}

// eachSorted calls fn for every live slot that in accepts, in id order.
// count is how many slots in accepts (or an upper bound); small answers are
// sorted directly, large ones read off the order. Readers may call it.
func (e *Engine) eachSorted(count int, candidates func(func(uint32)), in func(uint32) bool, fn func(uint32)) {
	if count <= e.tune.smallSort || count*32 < e.nlive {
		var slots []uint32
		candidates(func(x uint32) {
			if in(x) {
				slots = append(slots, x)
			}
		})
		for _, s := range e.sortSlots(slots, func(uint32) bool { return true }) {
			fn(s)
		}
		return
	}
	o := &e.order
	pend := e.sortSlots(o.pending, func(x uint32) bool { return e.live.has(x) && in(x) })
	i := 0
	for _, s := range o.sorted {
		if !e.live.has(s) || !in(s) {
			continue
		}
		for i < len(pend) && e.ids[pend[i]] < e.ids[s] {
			fn(pend[i])
			i++
		}
		fn(s)
	}
	for _, s := range pend[i:] {
		fn(s)
	}
}

// sortedIDs returns the ids of the live slots in d, sorted.
func (e *Engine) sortedIDs(d dense) []string {
	n := d.count()
	out := make([]string, 0, n)
	e.eachSorted(n, d.each, d.has, func(x uint32) { out = append(out, e.ids[x]) })
	return out
}

// idsWithPrefix calls fn for every live slot whose device id starts with
// prefix: a binary search of the sorted order (whose dead slots keep their
// ids until compaction, so it stays sorted) and a scan of the slots not
// merged into it yet. Readers may call it.
func (e *Engine) idsWithPrefix(prefix string, fn func(uint32)) {
	o := &e.order
	i, _ := slices.BinarySearchFunc(o.sorted, prefix, func(s uint32, p string) int { return strings.Compare(e.ids[s], p) })
	for ; i < len(o.sorted) && strings.HasPrefix(e.ids[o.sorted[i]], prefix); i++ {
		if s := o.sorted[i]; e.live.has(s) {
			fn(s)
		}
	}
	for _, s := range o.pending {
		if e.live.has(s) && strings.HasPrefix(e.ids[s], prefix) {
			fn(s)
		}
	}
}
