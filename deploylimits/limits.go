// Package deploylimits owns the limits of what one deployment may hold
// and how many deployments reach one device (serve's --max-* flags;
// README, "Limits"), and their checks before a write is proposed: a
// deployment's content (its size, its modules, a module twin's desired
// properties), the devices a deployment write would take over a limit
// (deployments or layers per device, a device's merged document's size
// and modules), and a device's tags that would. A write over a limit is
// refused with a fleet.ValidationError naming the limit and its flag, and
// changes nothing.
//
// It reads the assignments through the Assignments interface it declares
// (assign.View satisfies it) and the replica through a view function; the
// node gives it both.
package deploylimits

import (
	"encoding/json"
	"errors"
	"sort"
	"strings"

	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// Limits bound what one deployment may hold and how many deployments
// reach one device. Zero means the default.
type Limits struct {
	// MaxManifestBytes caps a deployment's content, and a device's merged
	// document (base and layers), as compact JSON.
	MaxManifestBytes int
	// MaxModuleDesiredBytes caps one module twin's desired properties
	// (Azure's limit of a module twin's desired section, 512 KB).
	MaxModuleDesiredBytes int
	// MaxModules caps the modules of a deployment, and of a device's
	// merged document (Azure: 50 per deployment).
	MaxModules int
	// MaxDeploymentsPerDevice caps the deployments (bases and layers) a
	// device may be targeted by; MaxLayersPerDevice the layered ones.
	MaxDeploymentsPerDevice int
	MaxLayersPerDevice      int
}

// Defaults of Limits.
const (
	DefaultMaxManifestBytes        = 1 << 20
	DefaultMaxModuleDesiredBytes   = 512 << 10
	DefaultMaxModules              = 50
	DefaultMaxDeploymentsPerDevice = 50
	DefaultMaxLayersPerDevice      = 20
)

// WithDefaults is l with each limit not above zero set to its default.
func (l Limits) WithDefaults() Limits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.MaxManifestBytes, DefaultMaxManifestBytes)
	def(&l.MaxModuleDesiredBytes, DefaultMaxModuleDesiredBytes)
	def(&l.MaxModules, DefaultMaxModules)
	def(&l.MaxDeploymentsPerDevice, DefaultMaxDeploymentsPerDevice)
	def(&l.MaxLayersPerDevice, DefaultMaxLayersPerDevice)
	return l
}

// Assignments is what the checks need of the current assignments.
type Assignments interface {
	DeploymentIDs() []string
	IsLayered(deploymentID string) bool
	// Applied is the base deployment applied to a device ("" none).
	Applied(deviceID string) string
	// Targeting lists the deployments targeting a device.
	Targeting(deviceID string) []string
	// DryRunDevices lists the devices d would target.
	DryRunDevices(d evaluator.Deployment) (targeted, wouldApply []string, err error)
}

var _ Assignments = assign.View{}

// Checker checks writes against the limits.
type Checker struct {
	// Limits are the limits, with their defaults (Limits.WithDefaults).
	Limits Limits
	// Assignments are the assignments as they are now; a check does not
	// need them consistent with the replica (a write racing another is
	// checked again by neither: the limits bound what an operator means
	// to write, not what two writes at once may reach).
	Assignments func() Assignments
	// View reads the local replica in one read transaction.
	View func(fn func(r *raftstore.Reader) error) error
}

// Content refuses content over the manifest limits, naming the limit and
// its flag. content is compact JSON.
func (c *Checker) Content(content json.RawMessage) error {
	lim := c.Limits
	if n := len(content); n > lim.MaxManifestBytes {
		return fleet.Invalid("content", "is %d bytes; at most %d are allowed (serve --max-manifest-bytes)", n, lim.MaxManifestBytes)
	}
	var mc struct {
		ModulesContent map[string]map[string]json.RawMessage `json:"modulesContent"`
	}
	if json.Unmarshal(content, &mc) != nil {
		return nil // ValidateContent says what is wrong
	}
	modules := map[string]bool{}
	for twin, entry := range mc.ModulesContent {
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

// Devices refuses a write of d after which a device would be targeted by
// more deployments or layers than allowed, or would get a merged
// document (its base with its layers) over the manifest limits. content
// is d's (nil for a PATCH: read from the replica).
func (c *Checker) Devices(d evaluator.Deployment, content json.RawMessage) error {
	lim := c.Limits
	v := c.Assignments()
	total, layered := Counts(v)
	deploymentsBound := total+1 > lim.MaxDeploymentsPerDevice
	layersBound := d.Layered && layered+1 > lim.MaxLayersPerDevice
	if !deploymentsBound && !layersBound && !d.Layered {
		return nil // no device can reach a limit: nothing to count
	}
	targeted, _, err := v.DryRunDevices(d)
	if err != nil {
		return &fleet.ValidationError{Field: "targetCondition", Msg: err.Error()}
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
	return c.View(func(r *raftstore.Reader) error {
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

// TagCheck is the check of a device's tags against the limits, or nil
// when no device's tags can reach one: only when the cluster holds more
// deployments (or layered ones) than a device may be targeted by can
// tags take a device over a limit.
func (c *Checker) TagCheck() func(id string, tags map[string]any) error {
	total, layered := Counts(c.Assignments())
	if total <= c.Limits.MaxDeploymentsPerDevice && layered <= c.Limits.MaxLayersPerDevice {
		return nil
	}
	return c.tags
}

// Tags refuses tags that would have a device targeted by more
// deployments or layers than allowed.
func (c *Checker) Tags(id string, tags map[string]any) error {
	if check := c.TagCheck(); check != nil {
		return check(id, tags)
	}
	return nil
}

// tags evaluates each deployment's condition on the new tags.
func (c *Checker) tags(id string, tags map[string]any) error {
	lim := c.Limits
	// The counts with the new tags and, for a device that exists, with its
	// current ones: a device already over a limit (the limit was lowered,
	// or the deployments were written by a release without limits) may
	// still have its tags edited, as long as the edit does not add to it.
	n, nl := 0, 0
	was, wasLayered := 0, 0
	err := c.View(func(r *raftstore.Reader) error {
		var current map[string]any
		exists := false
		if dev, err := r.Device(id); err == nil {
			current, exists = dev.Tags, true
		} else if !errors.Is(err, fleet.ErrNotFound) {
			return err
		}
		return r.Deployments("", func(d fleet.Deployment) bool {
			cond, err := evaluator.Compile(d.TargetCondition)
			if err != nil {
				return true
			}
			if cond.Eval(id, tags) {
				n++
				if d.Layered {
					nl++
				}
			}
			if exists && cond.Eval(id, current) {
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

// Counts counts the deployments v knows and the layered ones among
// them: no device can be targeted by more.
func Counts(v Assignments) (total, layered int) {
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
