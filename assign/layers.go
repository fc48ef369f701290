package assign

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"

	"appliance/fleet"
	"appliance/raftstore"
)

// A device's document: its base deployment (the one the evaluator
// applies) with the layered deployments that target it merged on top
// (fleet.MergeLayers). A device without a base gets no layer: it keeps
// what it runs (keep.go).

// assignment is what a device's document is made of: the base, and the
// layers in merge order (lowest priority first). No base: nothing applies.
// source is set for a device a rolled-back rollout returned to what it ran
// before (pins.go): the base's content is the one that rollout kept, and
// no layer is merged on it (it is exactly what the device ran); with no
// base, it ran nothing and is sent the empty document.
type assignment struct {
	base   string
	layers []string
	source string
}

// rolledBackToNothing is the source of the assignment of a device a
// rollback returned to running nothing.
const rolledBackToNothing = "\x00rollback"

// key identifies the document content of an assignment.
func (as assignment) key() string {
	k := as.base
	if as.source != "" {
		k += "\x01" + as.source
	}
	if len(as.layers) == 0 {
		return k
	}
	return k + "\x00" + strings.Join(as.layers, "\x00")
}

// assignmentLocked reads a device's assignment from the engine (and the
// restore points); the caller holds a.mu.
func (a *Assigner) assignmentLocked(deviceID string) assignment {
	eff := a.effectiveLocked(deviceID)
	if eff.deployment == "" && len(a.pins.by[deviceID]) > 0 {
		// A rollback returned it to running nothing: the empty document
		// (not "keep what it runs", which is the rolled-back deployment).
		return assignment{source: rolledBackToNothing}
	}
	if eff.source != "" || eff.deployment == "" {
		return assignment{base: eff.deployment, source: eff.source}
	}
	layers := a.engine.Layers(deviceID) // by precedence: merge them last to first
	slices.Reverse(layers)
	return assignment{base: eff.deployment, layers: layers}
}

// merged is one assignment's document content and how it was made.
type merged struct {
	modulesContent json.RawMessage
	comp           fleet.Composition
}

// mergeCache keeps the merged content of the assignments in use, so that
// a fleet sharing a base and layers is merged once, not once per device
// (a reconnect storm asks for every document at once). Content is
// immutable, so an entry stays right until one of its deployments is
// written or deleted (a deleted and re-created id has new content):
// Apply clears the cache then.
type mergeCache struct {
	mu sync.Mutex
	m  map[string]merged
}

// maxMergeCache bounds the cache: past it, it starts over.
const maxMergeCache = 1024

func (c *mergeCache) get(key string) (merged, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, ok := c.m[key]
	return m, ok
}

func (c *mergeCache) put(key string, m merged) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxMergeCache {
		c.m = map[string]merged{}
	}
	c.m[key] = m
}

func (c *mergeCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m = nil
}

// content reads an assignment's document content (unredacted: it goes
// only to the device) from the replica r: the base's modulesContent as
// stored when it has no layers, else the merge, with its composition.
func (a *Assigner) content(r *raftstore.Reader, as assignment) (merged, error) {
	key := as.key()
	if m, ok := a.merges.get(key); ok {
		return m, nil
	}
	base, err := r.Deployment(as.base)
	if as.source != "" {
		// What a rolled-back rollout kept of the deployment the device
		// ran before (it may have been deleted or changed since).
		kept, ok := r.RolloutContent(as.source, as.base)
		if !ok {
			return merged{}, fmt.Errorf("the rollout of %s kept no content of %s: %w", as.source, as.base, fleet.ErrNotFound)
		}
		base, err = fleet.Deployment{ID: as.base, Content: kept}, nil
	}
	if err != nil {
		return merged{}, err
	}
	layers := make([]fleet.LayerContent, 0, len(as.layers))
	for _, id := range as.layers {
		l, err := r.Deployment(id)
		if err != nil {
			return merged{}, err
		}
		layers = append(layers, fleet.LayerContent{ID: id, Content: l.Content})
	}
	var m merged
	if len(layers) == 0 {
		// The content as stored, byte for byte; the composition is
		// the base's alone.
		var c struct {
			ModulesContent json.RawMessage `json:"modulesContent"`
		}
		if err := json.Unmarshal(base.Content, &c); err != nil {
			return merged{}, fmt.Errorf("content of deployment %s: %w", as.base, err)
		}
		m.modulesContent = c.ModulesContent
	}
	mc, comp, err := fleet.MergeLayers(fleet.LayerContent{ID: base.ID, Content: base.Content}, layers)
	if err != nil {
		return merged{}, err
	}
	if m.modulesContent == nil {
		m.modulesContent = mc
	}
	m.comp = comp
	a.merges.put(key, m)
	return m, nil
}

// Composition says what a device's document is made of (its base, its
// layers, which deployment gave each module and route), from the replica
// r and the assignment v reads; ok is false when no deployment applies.
func (a *Assigner) Composition(r *raftstore.Reader, v View, deviceID string) (fleet.Composition, bool, error) {
	as := v.assignment(deviceID)
	if as.base == "" {
		return fleet.Composition{}, false, nil
	}
	m, err := a.content(r, as)
	if err != nil {
		return fleet.Composition{}, false, err
	}
	return m.comp, true, nil
}

// contributed lists the modules a deployment gave a document (defined or
// changed), sorted.
func contributed(comp fleet.Composition, deployment string) []string {
	var out []string
	for name, deps := range comp.Modules {
		if slices.Contains(deps, deployment) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// ModulesOf lists the modules deployment dep gave the document of s
// (those whose state counts toward dep's health), nil when it cannot be
// read (every module then counts).
func (a *Assigner) ModulesOf(r *raftstore.Reader, s Subject, dep string) []string {
	if s.Base == "" {
		return nil
	}
	m, err := a.content(r, assignment{base: s.Base, layers: s.Layers})
	if err != nil {
		return nil
	}
	return contributed(m.comp, dep)
}
