package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"appliance/api"
	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// The checks of a deployment write beyond its own validity: the cluster
// can apply what it means (layers, the newer condition functions), it fits
// the limits, and a PUT of what a GET returned keeps the stored content.

// ResetDevice marks a device reset: no deployment targets it, and from
// now on it is sent an empty document (its modules are removed) instead
// of keeping what it last ran. A device a deployment applies to is a
// conflict: its document is that deployment's.
func (b *backend) ResetDevice(ctx context.Context, id string, opts api.WriteOptions) (fleet.Device, error) {
	if err := b.viewBeforeWrite(ctx, func(r *raftstore.Reader) error {
		_, err := r.Device(id)
		return err
	}); err != nil {
		return fleet.Device{}, err
	}
	var applied string
	var layers []string
	b.assign.Read(func(v assign.View) { applied, layers = v.Applied(id), v.Layers(id) })
	if applied != "" {
		return fleet.Device{}, fmt.Errorf("device %s: deployment %s applies to it: a reset is for a device no deployment targets (it removes what the device kept running); change the device's tags or the deployments first: %w",
			id, applied, fleet.ErrConflict)
	}
	_ = layers // a device with layers and no base keeps what it runs too: a reset applies
	res, err := b.apply(ctx, raftstore.ResetDevice{Precondition: precondition(opts), ID: id, Time: now(), Actor: operatorActor})
	if err != nil {
		return fleet.Device{}, err
	}
	return res.Device.Public(), nil
}

// requireSemantics refuses, with 503 upgrade_required, a deployment whose
// meaning some member of the cluster does not know: a layered one (an
// older node would apply it as a base) or a condition with a function of
// evaluator.SemanticsVersion 2 (an older node cannot compile it, and would
// target no device). Both came with raftstore.CmdResetDevice: a node that
// can apply it knows them.
func (b *backend) requireSemantics(ctx context.Context, layered bool, conditions ...string) error {
	need := layered
	for _, c := range conditions {
		if cond, err := evaluator.Compile(c); err == nil && cond.Semantics() > 1 {
			need = true
		}
	}
	if !need || b.store == nil {
		return nil
	}
	if err := b.store.CheckCommand(ctx, raftstore.CmdResetDevice); err != nil {
		if errors.Is(err, raftstore.ErrClusterBehind) {
			return fmt.Errorf("%w: layered deployments and the functions STARTSWITH, ENDSWITH and IS_<type> need every member at this release: %w", api.ErrUpgradeRequired, err)
		}
		return err
	}
	return nil
}

// checkContentLimits refuses content over the manifest limits, naming the
// limit and its flag.
func (b *backend) checkContentLimits(content json.RawMessage) error {
	lim := b.cfg.DeploymentLimits
	if n := len(content); n > lim.MaxManifestBytes {
		return fleet.Invalid("content", "is %d bytes; at most %d are allowed (serve --max-manifest-bytes)", n, lim.MaxManifestBytes)
	}
	var c struct {
		ModulesContent map[string]map[string]json.RawMessage `json:"modulesContent"`
	}
	if json.Unmarshal(content, &c) != nil {
		return nil // ValidateContent says what is wrong
	}
	modules := map[string]bool{}
	for twin, entry := range c.ModulesContent {
		for key, v := range entry {
			if twin == "$edgeAgent" {
				if name, ok := strings.CutPrefix(key, "properties.desired.modules."); ok {
					name, _, _ = strings.Cut(name, ".")
					modules[name] = true
				} else if key == "properties.desired" || key == "properties.desired.modules" {
					var d struct {
						Modules map[string]json.RawMessage `json:"modules"`
					}
					if key == "properties.desired.modules" {
						_ = json.Unmarshal(v, &d.Modules)
					} else {
						_ = json.Unmarshal(v, &d)
					}
					for name := range d.Modules {
						modules[name] = true
					}
				}
				continue
			}
			if strings.HasPrefix(twin, "$") || !strings.HasPrefix(key, "properties.desired") {
				continue
			}
			if n := len(v); n > lim.MaxModuleDesiredBytes {
				return fleet.Invalid("content.modulesContent."+twin+"."+key, "is %d bytes; a module twin's desired properties may have at most %d (serve --max-module-desired-bytes)", n, lim.MaxModuleDesiredBytes)
			}
		}
	}
	if len(modules) > lim.MaxModules {
		return fleet.Invalid("content.modulesContent.$edgeAgent.properties.desired.modules", "has %d modules; at most %d are allowed (serve --max-modules)", len(modules), lim.MaxModules)
	}
	return nil
}

// checkDeviceLimits refuses a write of d after which a device would be
// targeted by more deployments or layers than allowed, or would get a
// merged document (its base with its layers) over the manifest limits.
// content is d's (nil for a PATCH: read from the store).
func (b *backend) checkDeviceLimits(d evaluator.Deployment, content json.RawMessage) error {
	lim := b.cfg.DeploymentLimits
	v := b.assign.Loose()
	total, layered := deploymentCounts(v)
	deploymentsBound := total+1 > lim.MaxDeploymentsPerDevice
	layersBound := d.Layered && layered+1 > lim.MaxLayersPerDevice
	if !deploymentsBound && !layersBound && !d.Layered {
		return nil // no device can reach a limit: nothing to count
	}
	targeted, _, err := v.DryRunDevices(d)
	if err != nil {
		return conditionError("targetCondition", err)
	}
	// A layer's merged documents: one per distinct base and layers.
	groups := map[string][]string{} // base, layers in merge order → ids
	for _, dev := range targeted {
		tg := v.Targeting(dev)
		n, nl := 1, 0
		if d.Layered {
			nl = 1
		}
		var layers []string
		for _, other := range tg {
			if other == d.ID {
				continue
			}
			n++
			if v.IsLayered(other) {
				nl++
				layers = append(layers, other)
			}
		}
		if n > lim.MaxDeploymentsPerDevice {
			return fleet.Invalid("targetCondition", "device %s would be targeted by %d deployments; at most %d are allowed (serve --max-deployments-per-device)", dev, n, lim.MaxDeploymentsPerDevice)
		}
		if nl > lim.MaxLayersPerDevice {
			return fleet.Invalid("targetCondition", "device %s would have %d layered deployments; at most %d are allowed (serve --max-layers-per-device)", dev, nl, lim.MaxLayersPerDevice)
		}
		if base := v.Applied(dev); d.Layered && base != "" {
			layers = append(layers, d.ID)
			key := base + "\x00" + strings.Join(layers, "\x00")
			groups[key] = append(groups[key], dev)
		}
	}
	if len(groups) == 0 {
		return nil
	}
	keys := make([]string, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return b.store.View(func(r *raftstore.Reader) error {
		for _, key := range keys {
			ids := strings.Split(key, "\x00")
			base, err := r.Deployment(ids[0])
			if err != nil {
				continue // deleted meanwhile
			}
			var ls []fleet.LayerContent
			for _, id := range ids[1:] {
				l := fleet.LayerContent{ID: id, Content: content}
				if id != d.ID || content == nil {
					dep, err := r.Deployment(id)
					if err != nil {
						continue
					}
					l.Content = dep.Content
				}
				ls = append(ls, l)
			}
			// Merge in precedence order: the engine ranked them, the
			// new one placed by its priority among them.
			sortLayers(ls, r, d)
			mc, comp, err := fleet.MergeLayers(fleet.LayerContent{ID: base.ID, Content: base.Content}, ls)
			if err != nil {
				return err
			}
			dev := groups[key][0]
			if n := len(mc) + len(`{"modulesContent":}`); n > lim.MaxManifestBytes {
				return fleet.Invalid("content", "device %s's document (%s with its layers) would be %d bytes; at most %d are allowed (serve --max-manifest-bytes)", dev, base.ID, n, lim.MaxManifestBytes)
			}
			if n := len(comp.Modules); n > lim.MaxModules {
				return fleet.Invalid("content", "device %s's document (%s with its layers) would have %d modules; at most %d are allowed (serve --max-modules)", dev, base.ID, n, lim.MaxModules)
			}
		}
		return nil
	})
}

// checkDeviceTagLimits refuses tags that would have a device targeted by
// more deployments or layers than allowed. Only when the cluster holds
// more deployments than a limit can a device reach it: then each
// deployment's condition is evaluated on the new tags.
func (b *backend) checkDeviceTagLimits(id string, tags map[string]any) error {
	if !b.tagLimitsReachable() {
		return nil
	}
	lim := b.cfg.DeploymentLimits
	// The counts with the new tags and, for a device that exists, with its
	// current ones: a device already over a limit (the limit was lowered,
	// or the deployments were written by a release without limits) may
	// still have its tags edited, as long as the edit does not add to it.
	n, nl := 0, 0
	was, wasLayered := 0, 0
	err := b.store.View(func(r *raftstore.Reader) error {
		var current map[string]any
		exists := false
		if dev, err := r.Device(id); err == nil {
			current, exists = dev.Tags, true
		} else if !errors.Is(err, fleet.ErrNotFound) {
			return err
		}
		return r.Deployments("", func(d fleet.Deployment) bool {
			c, err := evaluator.Compile(d.TargetCondition)
			if err != nil {
				return true
			}
			if c.Eval(id, tags) {
				n++
				if d.Layered {
					nl++
				}
			}
			if exists && c.Eval(id, current) {
				was++
				if d.Layered {
					wasLayered++
				}
			}
			return true
		})
	})
	if err != nil {
		return err
	}
	if n > lim.MaxDeploymentsPerDevice && n > was {
		return fleet.Invalid("tags", "would have device %s targeted by %d deployments; at most %d are allowed (serve --max-deployments-per-device)", id, n, lim.MaxDeploymentsPerDevice)
	}
	if nl > lim.MaxLayersPerDevice && nl > wasLayered {
		return fleet.Invalid("tags", "would have device %s targeted by %d layered deployments; at most %d are allowed (serve --max-layers-per-device)", id, nl, lim.MaxLayersPerDevice)
	}
	return nil
}

// tagLimitsReachable tells whether the cluster holds more deployments (or
// layered ones) than a device may be targeted by: only then can a device's
// tags take it over a limit.
func (b *backend) tagLimitsReachable() bool {
	lim := b.cfg.DeploymentLimits
	total, layered := deploymentCounts(b.assign.Loose())
	return total > lim.MaxDeploymentsPerDevice || layered > lim.MaxLayersPerDevice
}

// deploymentCounts counts the deployments v knows and the layered ones
// among them: no device can be targeted by more.
func deploymentCounts(v assign.View) (total, layered int) {
	ids := v.DeploymentIDs()
	for _, id := range ids {
		if v.IsLayered(id) {
			layered++
		}
	}
	return len(ids), layered
}

// sortLayers puts layers in merge order: the lowest precedence first
// (priority, then the oldest, then the larger id), d as it would be.
func sortLayers(ls []fleet.LayerContent, r *raftstore.Reader, d evaluator.Deployment) {
	rank := map[string]evaluator.Deployment{}
	for _, l := range ls {
		if l.ID == d.ID {
			rank[l.ID] = d
		} else if dep, err := r.Deployment(l.ID); err == nil {
			rank[l.ID] = assign.EngineDeployment(&dep, nil)
		}
	}
	sort.SliceStable(ls, func(i, j int) bool {
		a, b := rank[ls[i].ID], rank[ls[j].ID]
		switch {
		case a.Priority != b.Priority:
			return a.Priority < b.Priority
		case a.CreatedUnixNano != b.CreatedUnixNano:
			return a.CreatedUnixNano < b.CreatedUnixNano
		}
		return a.ID > b.ID
	})
}

// storedContent is what a PUT's content stands for: a deployment's
// content shown redacted by a GET (a read never shows its secrets) stands
// for the stored content, so that a PUT of what a GET returned keeps it;
// any other content is taken as sent.
func (b *backend) storedContent(id string, content json.RawMessage) json.RawMessage {
	var out json.RawMessage
	_ = b.store.View(func(r *raftstore.Reader) error {
		d, err := r.Deployment(id)
		if err != nil {
			return nil
		}
		if equalJSON(fleet.RedactContent(d.Content), content) {
			out = d.Content
		}
		return nil
	})
	if out != nil {
		return out
	}
	return content
}

// equalJSON compares two JSON values by meaning (key order, spacing).
func equalJSON(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	ca, _ := json.Marshal(x)
	cb, _ := json.Marshal(y)
	return string(ca) == string(cb)
}
