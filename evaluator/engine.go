package evaluator

import (
	"math/bits"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Deployment is what the engine needs of a deployment: its condition and
// its precedence.
type Deployment struct {
	ID        string
	Condition string // a target condition; see Compile
	Priority  int64
	// CreatedUnixNano breaks priority ties: the most recently created wins.
	// It must come from the raft command, never from a local clock.
	CreatedUnixNano int64
	// Gated: the deployment applies only to the devices admitted to it
	// (Admit, SetAdmitted), while it targets every device its condition
	// matches; a device it does not admit falls to the next deployment by
	// precedence. A rollout gates its deployment until it completes.
	Gated bool
	// Layered: a layered deployment, merged on top of the deployment that
	// applies to a device (its base) rather than competing with it. It
	// targets devices like any other and ranks by the same precedence
	// (which orders the layers of a device), but it never applies as a
	// base: a device targeted by layers only has no applied deployment.
	Layered bool
}

// Change reports that what applies to a device changed. From and To are
// deployment ids, "" for none: the applied (base) deployment before and
// after. A deleted device that had a deployment applied reports To "".
//
// A change of a device's layers has Layer set, the layered deployment
// that started (LayerAdded) or stopped (LayerRemoved) targeting the device
// or whose precedence changed (LayerMoved); From and To are then both the
// device's applied deployment. A device's changes come base first, then
// by layer id.
type Change struct {
	DeviceID, From, To string
	Layer              string `json:",omitempty"`
	LayerOp            string `json:",omitempty"`
}

// Layer operations of a Change.
const (
	LayerAdded   = "added"
	LayerRemoved = "removed"
	LayerMoved   = "moved"
)

// precedes orders deployments by precedence: higher priority first, then
// the most recently created, then the smaller id, so that two deployments
// never tie and the result never depends on the order they arrived in.
func precedes(a, b *Deployment) int {
	switch {
	case a.Priority != b.Priority:
		if a.Priority > b.Priority {
			return -1
		}
		return 1
	case a.CreatedUnixNano != b.CreatedUnixNano:
		if a.CreatedUnixNano > b.CreatedUnixNano {
			return -1
		}
		return 1
	}
	return strings.Compare(a.ID, b.ID)
}

type dep struct {
	Deployment
	plan    *pnode
	pins    binder   // terms and paths the plan holds references on
	anc     *anchors // nil: evaluated on every device change
	targets bitmap   // slots the condition matches
	rank    int      // position in Engine.ranked
	mark    uint64   // candidate dedup (Engine.epoch)
	// admitted are the slots a gated deployment may apply to (a subset of
	// the live slots, not necessarily of targets); empty when not gated.
	admitted bitmap
}

// admits tells whether the deployment may apply to slot, when it targets it.
func (dp *dep) admits(slot uint32) bool { return !dp.Gated || dp.admitted.Contains(slot) }

type slotChange struct{ slot, from, to uint32 }

// Engine maintains, for every device, the deployments whose condition
// matches it (they target it) and the one that applies (the first of them
// by precedence). It is updated incrementally by Put/Delete calls and is
// deterministic: the same sequence of calls gives the same answers and the
// same Change lists on every node. It is safe for concurrent use; it starts
// no goroutines and does no I/O.
type Engine struct {
	mu sync.RWMutex
	state
	scratch tagsScratch // PutDeviceJSON's, under mu
	// quiet: the call lists no changes (RestoreDeployment), under mu.
	quiet bool
}

// state is everything Reset drops.
type state struct {
	d dict

	// Devices, by slot.
	byID    map[string]uint32
	ids     []string
	leaves  [][]uint32 // sorted term ids
	applied []uint32   // deployment handle, 0 for none
	live    dense
	nlive   int
	free    []uint32
	order   idOrder

	// Deployments, by handle (0 is none).
	deps       []*dep
	depIDs     map[string]uint32
	depFree    []uint32
	ranked     []uint32 // handles by precedence
	unanchored []uint32 // sorted handles
	idDeps     map[string][]uint32
	epoch      uint64
	cands      []uint32 // scratch

	scanOnly bool // tests and benchmarks: never answer from the index
	tune     tuning
}

// tuning holds the size thresholds between the small and the large
// algorithms; tests lower them to drive the large ones with few devices.
type tuning struct {
	smallResolve int // resolve up to this many slots one by one
	smallSort    int // sort up to this many ids directly
	compactMin   int // let this many slots wait for the order's compaction
}

var defaultTuning = tuning{smallResolve: 64, smallSort: 1024, compactMin: 1024}

// NewEngine returns an empty engine.
func NewEngine() *Engine {
	e := &Engine{}
	e.init()
	return e
}

func (e *Engine) init() {
	scan, tune := e.scanOnly, e.tune
	if tune == (tuning{}) {
		tune = defaultTuning
	}
	e.state = state{
		tune:     tune,
		d:        newDict(),
		byID:     map[string]uint32{},
		deps:     make([]*dep, 1),
		depIDs:   map[string]uint32{},
		idDeps:   map[string][]uint32{},
		scanOnly: scan,
	}
}

// Reset drops every device and deployment, e.g. before a snapshot restore
// rebuilds the engine. Rebuild devices first, then deployments: each
// deployment is then evaluated once over the whole fleet.
func (e *Engine) Reset() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.init()
}

// Grow makes room for n more devices, so that a rebuild that knows how
// many follow does not grow the engine's tables (a map and three slices
// of a million entries) step by step.
func (e *Engine) Grow(n int) {
	if n <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.byID) == 0 {
		e.byID = make(map[string]uint32, n)
	}
	e.ids = slices.Grow(e.ids, n)
	e.leaves = slices.Grow(e.leaves, n)
	e.applied = slices.Grow(e.applied, n)
	e.live = slices.Grow(e.live, n/64+1)
}

// PutDevice creates a device or replaces its tags, re-evaluates it against
// the deployments that can match it, and returns the change of its applied
// deployment (at most one). tags is the device's decoded JSON tags; the
// engine does not keep it. An empty id is ignored.
func (e *Engine) PutDevice(id string, tags map[string]any) []Change {
	if id == "" {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.putLeaves(id, e.d.flatten(tags))
}

// putLeaves is PutDevice once the device's tags are interned as its new
// leaves nw (each holding a reference).
func (e *Engine) putLeaves(id string, nw []uint32) []Change {
	slot, ok := e.byID[id]
	if !ok {
		slot = e.allocSlot(id)
	}
	old := e.leaves[slot]
	e.updatePostings(slot, old, nw)
	cands := e.candidates(id, old, nw)
	e.leaves[slot] = nw
	// A deployment's targets are exactly the devices its plan matches, so
	// matching the old leaves tells whether the slot was a member without
	// searching the (large, cache-cold) target set: it is touched only
	// when membership changes.
	var best uint32
	var layers []Change
	for _, h := range cands {
		dp := e.deps[h]
		was := ok && e.d.match(dp.plan, id, old)
		now := e.d.match(dp.plan, id, nw)
		switch {
		case now && !was:
			dp.targets.Add(slot)
		case was && !now:
			dp.targets.Remove(slot)
		}
		if dp.Layered {
			if now != was {
				op := LayerAdded
				if was {
					op = LayerRemoved
				}
				layers = append(layers, Change{DeviceID: id, Layer: dp.ID, LayerOp: op})
			}
			continue
		}
		if now && dp.admits(slot) && (best == 0 || dp.rank < e.deps[best].rank) {
			best = h
		}
	}
	for _, t := range old {
		e.d.releaseTerm(t)
	}
	out := e.setApplied(slot, best)
	if len(layers) > 0 {
		base := e.name(best)
		slices.SortFunc(layers, func(a, b Change) int { return strings.Compare(a.Layer, b.Layer) })
		for i := range layers {
			layers[i].From, layers[i].To = base, base
		}
		out = append(out, layers...)
	}
	e.maybeCompact()
	return out
}

// DeleteDevice forgets a device. If a deployment applied to it, the Change
// has To "".
func (e *Engine) DeleteDevice(id string) []Change {
	e.mu.Lock()
	defer e.mu.Unlock()
	slot, ok := e.byID[id]
	if !ok {
		return nil
	}
	old := e.leaves[slot]
	e.updatePostings(slot, old, nil)
	for _, h := range e.candidates(id, old, nil) {
		if dp := e.deps[h]; e.d.match(dp.plan, id, old) {
			dp.targets.Remove(slot)
		}
	}
	for _, h := range e.ranked {
		if dp := e.deps[h]; dp.Gated {
			dp.admitted.Remove(slot) // the slot may hold another device next
		}
	}
	for _, t := range old {
		e.d.releaseTerm(t)
	}
	out := e.setApplied(slot, 0)
	e.leaves[slot] = nil
	// The slot keeps its id until the order's compaction frees it, so that
	// the sorted order stays sorted for prefix searches (idsWithPrefix).
	delete(e.byID, id)
	e.live.clear(slot)
	e.nlive--
	e.order.limbo = append(e.order.limbo, slot)
	e.maybeCompact()
	return out
}

func (e *Engine) allocSlot(id string) uint32 {
	var slot uint32
	if n := len(e.free); n > 0 {
		slot = e.free[n-1]
		e.free = e.free[:n-1]
	} else {
		slot = uint32(len(e.ids))
		e.ids = append(e.ids, "")
		e.leaves = append(e.leaves, nil)
		e.applied = append(e.applied, 0)
		if int(slot) >= 64*len(e.live) {
			e.live = append(e.live, 0)
		}
	}
	e.ids[slot] = id
	e.byID[id] = slot
	e.live.set(slot)
	e.nlive++
	e.order.pending = append(e.order.pending, slot)
	return slot
}

// updatePostings moves a slot from the postings of its old leaves to those
// of its new ones; both are sorted.
func (e *Engine) updatePostings(slot uint32, old, nw []uint32) {
	i, j := 0, 0
	for i < len(old) || j < len(nw) {
		switch {
		case j == len(nw) || i < len(old) && old[i] < nw[j]:
			e.d.terms[old[i]].post.Remove(slot)
			e.d.paths[e.d.termPath[old[i]]].count--
			i++
		case i == len(old) || nw[j] < old[i]:
			e.d.terms[nw[j]].post.Add(slot)
			e.d.paths[e.d.termPath[nw[j]]].count++
			j++
		default:
			i++
			j++
		}
	}
}

// candidates returns the deployments that may match a device with the old
// or the new leaves: those anchored on one of its terms, paths or its id,
// and the unanchored ones. Every deployment that matches is among them.
func (e *Engine) candidates(id string, old, nw []uint32) []uint32 {
	e.epoch++
	c := e.cands[:0]
	add := func(hs []uint32) {
		for _, h := range hs {
			if dp := e.deps[h]; dp.mark != e.epoch {
				dp.mark = e.epoch
				c = append(c, h)
			}
		}
	}
	for _, leaves := range [2][]uint32{old, nw} {
		for _, t := range leaves {
			add(e.d.termDeps[t])
			add(e.d.paths[e.d.termPath[t]].deps)
		}
	}
	add(e.idDeps[id])
	add(e.unanchored)
	e.cands = c
	return c
}

func (e *Engine) setApplied(slot, h uint32) []Change {
	old := e.applied[slot]
	if old == h {
		return nil
	}
	e.applied[slot] = h
	return []Change{{DeviceID: e.ids[slot], From: e.name(old), To: e.name(h)}}
}

func (e *Engine) name(h uint32) string {
	if h == 0 {
		return ""
	}
	return e.deps[h].ID
}

func (e *Engine) emptySet() dense { return make(dense, len(e.live)) }

// PutDeployment creates a deployment or replaces it (its condition,
// priority or creation time may change), and returns the devices whose
// applied deployment changed, sorted by device id. A condition that does
// not compile is returned as an error and the engine is unchanged.
func (e *Engine) PutDeployment(d Deployment) ([]Change, error) {
	return e.putDeployment(d, false)
}

// RestoreDeployment is PutDeployment in a rebuild (Reset, every device,
// then every deployment): the same state, but no Change list, which
// nobody reads then and which was most of a deployment's cost over a
// large fleet (sorting a million changes by device id).
func (e *Engine) RestoreDeployment(d Deployment) error {
	_, err := e.putDeployment(d, true)
	return err
}

func (e *Engine) putDeployment(d Deployment, quiet bool) ([]Change, error) {
	if d.ID == "" {
		return nil, ErrNoDeploymentID
	}
	cond, err := Compile(d.Condition)
	if err != nil {
		return nil, err
	}
	if d.Layered {
		d.Gated = false // a layer is merged, never gated: it applies where a base does
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.quiet = quiet
	defer func() { e.quiet = false }()
	if h, ok := e.depIDs[d.ID]; ok && e.deps[h].Deployment == d {
		return nil, nil // e.g. only the manifest changed: nothing to re-target
	}
	var out []Change
	if h, ok := e.depIDs[d.ID]; ok && e.deps[h].Layered != d.Layered {
		// A base becoming a layer or the reverse (not done by the
		// store, whose content is immutable): leave, then come back.
		out = e.deleteLocked(d.ID)
	}
	b := binder{d: &e.d, pin: true}
	plan := b.bind(cond.root)
	targets := e.targetSet(plan)
	if h, ok := e.depIDs[d.ID]; ok {
		return e.updateDeployment(h, d, plan, b, targets), nil
	}
	if out == nil {
		return e.addDeployment(d, plan, b, targets), nil
	}
	out = mergeChanges(out, e.addDeployment(d, plan, b, targets))
	for i, c := range out {
		if c.Layer != "" { // From and To are the base as it is now
			base := e.name(e.applied[e.byID[c.DeviceID]])
			out[i].From, out[i].To = base, base
		}
	}
	return out, nil
}

// mergeChanges merges two Change lists, each sorted by device id, into
// one sorted by device id, base change first, then layer.
func mergeChanges(a, b []Change) []Change {
	if len(a) == 0 {
		return b
	}
	out := append(a, b...)
	slices.SortStableFunc(out, compareChanges)
	return out
}

func compareChanges(a, b Change) int {
	if c := strings.Compare(a.DeviceID, b.DeviceID); c != 0 {
		return c
	}
	return strings.Compare(a.Layer, b.Layer)
}

// layerChanges lists, sorted by device id, the devices of s with a change
// of layer id (op), each with its applied deployment as From and To.
func (e *Engine) layerChanges(s dense, id, op string) []Change {
	n := s.count()
	if n == 0 || e.quiet {
		return nil
	}
	out := make([]Change, 0, n)
	e.eachSorted(n, s.each, s.has, func(x uint32) {
		base := e.name(e.applied[x])
		out = append(out, Change{DeviceID: e.ids[x], From: base, To: base, Layer: id, LayerOp: op})
	})
	return out
}

func (e *Engine) addDeployment(d Deployment, plan *pnode, b binder, targets dense) []Change {
	var h uint32
	if n := len(e.depFree); n > 0 {
		h = e.depFree[n-1]
		e.depFree = e.depFree[:n-1]
	} else {
		h = uint32(len(e.deps))
		e.deps = append(e.deps, nil)
	}
	dp := &dep{Deployment: d, plan: plan, pins: b, targets: *targets.toBitmap()}
	e.deps[h] = dp
	e.depIDs[d.ID] = h
	dp.anc = e.anchorsOf(plan)
	e.register(h)
	e.ranked = append(e.ranked, h)
	e.rerank()
	if d.Layered {
		return e.layerChanges(targets, d.ID, LayerAdded)
	}
	chs := make([]slotChange, 0, targets.count())
	targets.each(func(x uint32) {
		if cur := e.applied[x]; dp.admits(x) && (cur == 0 || dp.rank < e.deps[cur].rank) {
			chs = append(chs, slotChange{x, cur, h})
			e.applied[x] = h
		}
	})
	return e.finish(chs)
}

func (e *Engine) updateDeployment(h uint32, d Deployment, plan *pnode, b binder, targets dense) []Change {
	dp := e.deps[h]
	if d.Layered {
		return e.updateLayer(h, d, plan, b, targets)
	}
	affected := e.emptySet()
	affected.or(&dp.targets)
	if dp.Priority != d.Priority || dp.CreatedUnixNano != d.CreatedUnixNano || dp.Gated != d.Gated {
		affected.orD(targets) // every device it targets may see it win or lose
	} else {
		for i := range affected {
			affected[i] ^= targets[i] // only devices it starts or stops targeting
		}
	}
	e.unregister(h)
	oldPins := dp.pins
	dp.Deployment, dp.plan, dp.pins = d, plan, b
	dp.targets = *targets.toBitmap()
	if !d.Gated {
		dp.admitted = bitmap{}
	}
	dp.anc = e.anchorsOf(plan)
	e.register(h)
	e.rerank()
	e.releasePins(oldPins)
	return e.finish(e.resolve(affected))
}

// updateLayer is updateDeployment for a layered deployment: the devices it
// starts and stops targeting, and, when its precedence changed, those it
// goes on targeting (their merge order changed).
func (e *Engine) updateLayer(h uint32, d Deployment, plan *pnode, b binder, targets dense) []Change {
	dp := e.deps[h]
	added, removed, kept := e.emptySet(), e.emptySet(), e.emptySet()
	added.orD(targets)
	added.andNot(&dp.targets)
	removed.or(&dp.targets)
	removed.andNotD(targets)
	moved := dp.Priority != d.Priority || dp.CreatedUnixNano != d.CreatedUnixNano
	if moved {
		kept.or(&dp.targets)
		kept.andD(targets)
	}
	e.unregister(h)
	oldPins := dp.pins
	dp.Deployment, dp.plan, dp.pins = d, plan, b
	dp.targets = *targets.toBitmap()
	dp.anc = e.anchorsOf(plan)
	e.register(h)
	e.rerank()
	e.releasePins(oldPins)
	out := e.layerChanges(added, d.ID, LayerAdded)
	out = mergeChanges(out, e.layerChanges(removed, d.ID, LayerRemoved))
	return mergeChanges(out, e.layerChanges(kept, d.ID, LayerMoved))
}

// DeleteDeployment removes a deployment; the devices it applied to fall
// back to their next deployment by precedence, or none. A layered one
// leaves every device it targeted (LayerRemoved).
func (e *Engine) DeleteDeployment(id string) []Change {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.deleteLocked(id)
}

func (e *Engine) deleteLocked(id string) []Change {
	h, ok := e.depIDs[id]
	if !ok {
		return nil
	}
	dp := e.deps[h]
	if dp.Layered {
		left := e.emptySet()
		left.or(&dp.targets)
		out := e.layerChanges(left, id, LayerRemoved)
		e.unregister(h)
		e.ranked = slices.DeleteFunc(e.ranked, func(x uint32) bool { return x == h })
		e.rerank()
		dp.targets = bitmap{}
		e.releasePins(dp.pins)
		e.deps[h] = nil
		delete(e.depIDs, id)
		e.depFree = append(e.depFree, h)
		return out
	}
	affected := e.emptySet()
	dp.targets.Each(func(x uint32) bool {
		if e.applied[x] == h {
			affected.set(x)
		}
		return true
	})
	e.unregister(h)
	e.ranked = slices.DeleteFunc(e.ranked, func(x uint32) bool { return x == h })
	e.rerank()
	dp.targets = bitmap{}
	out := e.finish(e.resolve(affected))
	e.releasePins(dp.pins)
	e.deps[h] = nil
	delete(e.depIDs, id)
	e.depFree = append(e.depFree, h)
	return out
}

func (e *Engine) releasePins(b binder) {
	for _, t := range b.terms {
		e.d.releaseTerm(t)
	}
	for _, p := range b.paths {
		e.d.releasePath(p)
	}
}

func (e *Engine) rerank() {
	slices.SortFunc(e.ranked, func(a, b uint32) int { return precedes(&e.deps[a].Deployment, &e.deps[b].Deployment) })
	for i, h := range e.ranked {
		e.deps[h].rank = i
	}
}

func (e *Engine) register(h uint32) {
	a := e.deps[h].anc
	if a == nil {
		i, _ := slices.BinarySearch(e.unanchored, h)
		e.unanchored = slices.Insert(e.unanchored, i, h)
		return
	}
	for _, t := range a.terms {
		e.d.termDeps[t] = append(e.d.termDeps[t], h)
	}
	for _, p := range a.paths {
		e.d.paths[p].deps = append(e.d.paths[p].deps, h)
	}
	for _, id := range a.ids {
		e.idDeps[id] = append(e.idDeps[id], h)
	}
}

func (e *Engine) unregister(h uint32) {
	a := e.deps[h].anc
	is := func(x uint32) bool { return x == h }
	if a == nil {
		e.unanchored = slices.DeleteFunc(e.unanchored, is)
		return
	}
	for _, t := range a.terms {
		if hs := slices.DeleteFunc(e.d.termDeps[t], is); len(hs) > 0 {
			e.d.termDeps[t] = hs
		} else {
			delete(e.d.termDeps, t)
		}
	}
	for _, p := range a.paths {
		e.d.paths[p].deps = slices.DeleteFunc(e.d.paths[p].deps, is)
	}
	for _, id := range a.ids {
		if hs := slices.DeleteFunc(e.idDeps[id], is); len(hs) > 0 {
			e.idDeps[id] = hs
		} else {
			delete(e.idDeps, id)
		}
	}
}

// targetSet returns the slots a plan matches: from the index when it can
// answer exactly, else by evaluating the plan on each candidate.
func (e *Engine) targetSet(plan *pnode) dense {
	var cands dense
	if !e.scanOnly {
		s, exact := e.setEval(plan)
		if exact {
			return s
		}
		cands = s
	}
	if cands == nil {
		cands = e.live
	}
	out := e.emptySet()
	cands.each(func(x uint32) {
		if e.d.match(plan, e.ids[x], e.leaves[x]) {
			out.set(x)
		}
	})
	return out
}

// resolve recomputes the applied deployment of every slot in s (which it
// consumes) from the deployments' target sets, and records the changes.
func (e *Engine) resolve(s dense) []slotChange {
	n := s.count()
	if n == 0 {
		return nil
	}
	chs := make([]slotChange, 0, n)
	assign := func(x, h uint32) {
		if cur := e.applied[x]; cur != h {
			chs = append(chs, slotChange{x, cur, h})
			e.applied[x] = h
		}
	}
	if n <= e.tune.smallResolve {
		s.each(func(x uint32) { assign(x, e.bestFor(x)) })
		return chs
	}
	// Sweep the deployments in precedence order: each takes the remaining
	// slots it targets. rem counts the remaining slots per chunk.
	rem := make([]int32, (len(s)+chunkWords-1)/chunkWords)
	for i, w := range s {
		rem[i/chunkWords] += int32(bits.OnesCount64(w))
	}
	for _, h := range e.ranked {
		if e.deps[h].Layered {
			continue // layers never apply as a base
		}
		if dp := e.deps[h]; dp.Gated {
			// Only the admitted slots it targets: usually far fewer.
			dp.admitted.Each(func(x uint32) bool {
				if s.has(x) && dp.targets.Contains(x) {
					s.clear(x)
					rem[x>>chunkBits]--
					n--
					assign(x, h)
				}
				return n > 0
			})
			if n == 0 {
				return chs
			}
			continue
		}
		t := &e.deps[h].targets
		for _, x := range t.small {
			if s.has(x) {
				s.clear(x)
				rem[x>>chunkBits]--
				n--
				assign(x, h)
			}
		}
		for i := range t.conts {
			c := &t.conts[i]
			hi := c.key
			if int(hi) >= len(rem) || rem[hi] == 0 {
				continue
			}
			words := s.chunk(hi)
			base := uint32(hi) << chunkBits
			take := func(w int, m uint64) {
				words[w] &^= m
				rem[hi] -= int32(bits.OnesCount64(m))
				n -= bits.OnesCount64(m)
				for m != 0 {
					assign(base|uint32(w*64+bits.TrailingZeros64(m)), h)
					m &= m - 1
				}
			}
			switch {
			case c.bits != nil:
				for w := range words {
					if m := words[w] & c.bits[w]; m != 0 {
						take(w, m)
					}
				}
			case int(rem[hi])*8 < len(c.arr):
				for w := range words {
					for m := words[w]; m != 0; m &= m - 1 {
						lo := uint16(w*64 + bits.TrailingZeros64(m))
						if _, ok := slices.BinarySearch(c.arr, lo); ok {
							take(w, m&-m)
						}
					}
				}
			default:
				for _, lo := range c.arr {
					w, bit := int(lo>>6), uint64(1)<<(lo&63)
					if w < len(words) && words[w]&bit != 0 {
						take(w, bit)
					}
				}
			}
		}
		if n == 0 {
			return chs
		}
	}
	s.each(func(x uint32) { assign(x, 0) })
	return chs
}

// bestFor returns the first deployment by precedence that targets slot.
func (e *Engine) bestFor(slot uint32) uint32 {
	var best uint32
	for _, h := range e.candidates(e.ids[slot], e.leaves[slot], nil) {
		dp := e.deps[h]
		if !dp.Layered && dp.targets.Contains(slot) && dp.admits(slot) && (best == 0 || dp.rank < e.deps[best].rank) {
			best = h
		}
	}
	return best
}

// finish turns slot changes into Changes sorted by device id.
func (e *Engine) finish(chs []slotChange) []Change {
	if len(chs) == 0 {
		return nil
	}
	small := len(chs) <= e.tune.smallSort || len(chs)*32 < e.nlive
	if !small {
		e.compactOrder() // quiet or not, so that both leave the same state
	}
	if e.quiet {
		return nil
	}
	out := make([]Change, 0, len(chs))
	mk := func(c slotChange) Change {
		return Change{DeviceID: e.ids[c.slot], From: e.name(c.from), To: e.name(c.to)}
	}
	if small {
		for _, c := range chs {
			out = append(out, mk(c))
		}
		slices.SortFunc(out, func(a, b Change) int { return strings.Compare(a.DeviceID, b.DeviceID) })
		return out
	}
	idx := make([]int32, len(e.ids))
	for i, c := range chs {
		idx[c.slot] = int32(i + 1)
	}
	for _, s := range e.order.sorted {
		if i := idx[s]; i != 0 {
			out = append(out, mk(chs[i-1]))
		}
	}
	return out
}

// Applied returns the id of the deployment applied to a device, "" if none
// (or if the device is unknown).
func (e *Engine) Applied(deviceID string) string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	slot, ok := e.byID[deviceID]
	if !ok {
		return ""
	}
	return e.name(e.applied[slot])
}

// HasDevice tells whether the engine holds a device.
func (e *Engine) HasDevice(deviceID string) bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	_, ok := e.byID[deviceID]
	return ok
}

// Targeting returns the deployments whose condition matches a device, by
// precedence: the first one is applied, the others are only targeting it.
func (e *Engine) Targeting(deviceID string) []string {
	return e.targetingWhere(deviceID, false)
}

// targetingWhere is Targeting, of the layered deployments only when
// layeredOnly.
func (e *Engine) targetingWhere(deviceID string, layeredOnly bool) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	slot, ok := e.byID[deviceID]
	if !ok {
		return nil
	}
	var out []string
	for _, h := range e.ranked {
		if dp := e.deps[h]; (dp.Layered || !layeredOnly) && dp.targets.Contains(slot) {
			out = append(out, dp.ID)
		}
	}
	return out
}

// TargetedDevices returns the ids of the devices a deployment's condition
// matches, sorted.
func (e *Engine) TargetedDevices(deploymentID string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	if !ok {
		return nil
	}
	s := e.emptySet()
	s.or(&e.deps[h].targets)
	return e.sortedIDs(s)
}

// AppliedDevices returns the ids of the devices a deployment applies to,
// sorted. A layered deployment applies to the devices it targets that
// have a base (an applied deployment) to merge on.
func (e *Engine) AppliedDevices(deploymentID string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	if !ok {
		return nil
	}
	s := e.emptySet()
	e.deps[h].targets.Each(func(x uint32) bool {
		if e.appliesTo(h, x) {
			s.set(x)
		}
		return true
	})
	return e.sortedIDs(s)
}

// appliesTo tells whether deployment h, which targets slot x, applies to
// it: as its base, or as a layer on a base.
func (e *Engine) appliesTo(h, x uint32) bool {
	if e.deps[h].Layered {
		return e.applied[x] != 0
	}
	return e.applied[x] == h
}

// Layers returns the layered deployments that target a device, by
// precedence (the first wins a conflict; merge them last to first). They
// apply only if the device has an applied deployment (Applied).
func (e *Engine) Layers(deviceID string) []string {
	return e.targetingWhere(deviceID, true)
}

// IsLayered tells whether a deployment the engine holds is layered.
func (e *Engine) IsLayered(deploymentID string) bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	return ok && e.deps[h].Layered
}

// UnassignedDevices returns the ids of the devices no deployment applies
// to (layers may target them), sorted.
func (e *Engine) UnassignedDevices() []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	s := e.emptySet()
	e.live.each(func(x uint32) {
		if e.applied[x] == 0 {
			s.set(x)
		}
	})
	return e.sortedIDs(s)
}

// Counts returns how many devices a deployment targets and how many it
// applies to (the Azure targetedCount and appliedCount).
func (e *Engine) Counts(deploymentID string) (targeted, applied int) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	if !ok {
		return 0, 0
	}
	dp := e.deps[h]
	dp.targets.Each(func(x uint32) bool {
		if e.appliesTo(h, x) {
			applied++
		}
		return true
	})
	return dp.targets.Len(), applied
}

// Match returns the ids of the devices a condition matches, sorted, for
// listing devices by condition. The condition may name only deviceId and
// tags (ErrNotTargetCondition otherwise).
func (e *Engine) Match(c *Condition) ([]string, error) {
	if !c.onlyTags {
		return nil, ErrNotTargetCondition
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	b := binder{d: &e.d}
	return e.sortedIDs(e.targetSet(b.bind(c.root))), nil
}

// DryRun reports how many devices a deployment would target and how many
// it would apply to if it were put now, without changing anything.
func (e *Engine) DryRun(d Deployment) (targeted, wouldApply int, err error) {
	cond, err := Compile(d.Condition) // before the lock: a long condition takes a while
	if err != nil {
		return 0, 0, err
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	targets, would := e.dryRunSets(d, cond)
	return targets.count(), would.count(), nil
}

// DryRunDevices is DryRun with the devices themselves: the ids the
// deployment would target and those it would apply to, each sorted.
func (e *Engine) DryRunDevices(d Deployment) (targeted, wouldApply []string, err error) {
	cond, err := Compile(d.Condition)
	if err != nil {
		return nil, nil, err
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	targets, would := e.dryRunSets(d, cond)
	return e.sortedIDs(targets), e.sortedIDs(would), nil
}

// dryRunSets computes the sets DryRun counts: the devices cond (d's
// condition) matches, and those of them no deployment that precedes d
// targets (d itself, if it exists, does not count against its new
// version; layers never do). For a layered d, those it would apply to are
// the devices it matches that have a base. The caller holds the read lock.
func (e *Engine) dryRunSets(d Deployment, cond *Condition) (targets, would dense) {
	b := binder{d: &e.d}
	targets = e.targetSet(b.bind(cond.root))
	would = e.emptySet()
	if d.Layered {
		targets.each(func(x uint32) {
			if e.applied[x] != 0 {
				would.set(x)
			}
		})
		return targets, would
	}
	would.orD(targets)
	self := e.depIDs[d.ID]
	for _, h := range e.ranked {
		dp := e.deps[h]
		if precedes(&dp.Deployment, &d) > 0 {
			break
		}
		switch {
		case h == self, dp.Layered:
		case dp.Gated:
			dp.admitted.Each(func(x uint32) bool {
				if dp.targets.Contains(x) {
					would.clear(x)
				}
				return true
			})
		default:
			would.andNot(&dp.targets)
		}
	}
	return targets, would
}

// Stats describes the engine's size.
type Stats struct {
	Devices, Deployments, Terms, Paths int
}

// Stats returns the engine's size.
func (e *Engine) Stats() Stats {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return Stats{
		Devices:     e.nlive,
		Deployments: len(e.depIDs),
		Terms:       len(e.d.termIDs),
		Paths:       len(e.d.pathIDs),
	}
}

// DeploymentIDs lists the deployments the engine holds, sorted.
func (e *Engine) DeploymentIDs() []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	ids := make([]string, 0, len(e.depIDs))
	for id := range e.depIDs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Admit lets a gated deployment apply to more devices: each one it targets
// then applies to the device unless a deployment that precedes it does.
// Unknown devices are ignored (a device created later is not admitted);
// so is a deployment that is unknown or not gated. It returns the devices
// whose applied deployment changed, sorted.
func (e *Engine) Admit(deploymentID string, deviceIDs []string) []Change {
	e.mu.Lock()
	defer e.mu.Unlock()
	h, ok := e.depIDs[deploymentID]
	if !ok || !e.deps[h].Gated {
		return nil
	}
	dp := e.deps[h]
	var chs []slotChange
	for _, id := range deviceIDs {
		slot, ok := e.byID[id]
		if !ok || !dp.admitted.Add(slot) || !dp.targets.Contains(slot) {
			continue
		}
		if cur := e.applied[slot]; cur == 0 || dp.rank < e.deps[cur].rank {
			chs = append(chs, slotChange{slot, cur, h})
			e.applied[slot] = h
		}
	}
	return e.finish(chs)
}

// SetAdmitted replaces the devices a gated deployment may apply to (none,
// to roll it back; all of them at once, when rebuilding), and returns the
// devices whose applied deployment changed.
func (e *Engine) SetAdmitted(deploymentID string, deviceIDs []string) []Change {
	e.mu.Lock()
	defer e.mu.Unlock()
	h, ok := e.depIDs[deploymentID]
	if !ok || !e.deps[h].Gated {
		return nil
	}
	dp := e.deps[h]
	affected := e.emptySet()
	affected.or(&dp.admitted)
	var next bitmap
	for _, id := range deviceIDs {
		if slot, ok := e.byID[id]; ok && next.Add(slot) {
			affected.set(slot)
		}
	}
	dp.admitted = next
	affected.and(&dp.targets) // only a device it targets can change
	return e.finish(e.resolve(affected))
}

// Admitted tells whether a gated deployment admits a device.
func (e *Engine) Admitted(deploymentID, deviceID string) bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	slot, known := e.byID[deviceID]
	return ok && known && e.deps[h].admits(slot)
}

// WouldApply returns the devices a deployment targets that no deployment
// preceding it applies to, sorted: those it applies to, and those it
// would apply to if it admitted them.
func (e *Engine) WouldApply(deploymentID string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	h, ok := e.depIDs[deploymentID]
	if !ok {
		return nil
	}
	dp := e.deps[h]
	s := e.emptySet()
	dp.targets.Each(func(x uint32) bool {
		cur := e.applied[x]
		switch {
		case dp.Layered:
			if cur != 0 { // a layer applies where a base does
				s.set(x)
			}
		case cur == 0 || cur == h || e.deps[cur].rank > dp.rank:
			s.set(x)
		}
		return true
	})
	return e.sortedIDs(s)
}

// Precedes tells whether deployment a ranks before deployment b (a
// deployment ranks before none; none before nothing).
func (e *Engine) Precedes(a, b string) bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	ha, okA := e.depIDs[a]
	if !okA {
		return false
	}
	hb, okB := e.depIDs[b]
	return !okB || e.deps[ha].rank < e.deps[hb].rank
}

// SetGated gates a deployment (it then applies only to the devices
// admitted to it, none at first) or lifts its gate (it applies wherever it
// precedes), and returns the devices whose applied deployment changed.
func (e *Engine) SetGated(deploymentID string, gated bool) []Change {
	e.mu.RLock()
	h, ok := e.depIDs[deploymentID]
	var d Deployment
	if ok {
		d = e.deps[h].Deployment
	}
	e.mu.RUnlock()
	if !ok || d.Gated == gated {
		return nil
	}
	d.Gated = gated
	ch, _ := e.PutDeployment(d) // its condition compiled before
	return ch
}
