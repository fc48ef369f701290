package fleet

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Layered deployments, merged as Azure IoT Edge defines them: a device's
// document is its base deployment (a whole manifest) with every layered
// deployment that targets it merged on top, in priority order, the higher
// priority winning a conflict. A layer's content is "properties.desired"
// or "properties.desired.<path>" entries for $edgeAgent's modules (and the
// registry credentials they need), $edgeHub's routes, and module twins'
// desired properties. A layer never sets the system modules, the schema
// versions, the runtime or the hub's store-and-forward settings: the base
// provides them, and what a layer writes there is left out of the merge
// (Composition.Ignored says so).
//
// The merge is recomputed from the base and the layers each time, so a
// layer that stops targeting a device takes exactly its own modules,
// routes and twin properties out of the next document, and a module it
// replaced or changed goes back to what the layers below (or the base)
// say: nothing of it lingers (Azure/iotedge#7057 is what this avoids).

// LayerContent is one deployment's content, for MergeLayers.
type LayerContent struct {
	ID      string
	Content json.RawMessage // {"modulesContent": {...}}
}

// Composition says what a device's document is made of: the base, the
// layers merged on it, and which deployment gave each module, route and
// module twin.
type Composition struct {
	Base string `json:"base"`
	// Layers are merged on the base in this order: the lowest priority
	// first, so that a later one wins a conflict.
	Layers []string `json:"layers,omitempty"`
	// Modules lists, per module of the document, the deployments that
	// set it: the one whose definition stands, then those that changed a
	// part of it (a layer setting modules.m.env.X), in merge order.
	Modules map[string][]string `json:"modules"`
	// Routes names, per route, the deployment it comes from.
	Routes map[string]string `json:"routes,omitempty"`
	// ModuleTwins lists, per module twin with desired properties, the
	// deployments that set them (as Modules).
	ModuleTwins map[string][]string `json:"moduleTwins,omitempty"`
	// Ignored says what a layer set that the merge leaves out, and why.
	Ignored []string `json:"ignored,omitempty"`
}

// MergeLayers merges layers (in merge order: lowest priority first) on
// base and returns the document's modulesContent and its Composition.
// base must be a standard deployment's content and the layers layered
// ones, each valid (ValidateContent); an error means content that does
// not decode.
func MergeLayers(base LayerContent, layers []LayerContent) (json.RawMessage, Composition, error) {
	comp := Composition{Base: base.ID, Modules: map[string][]string{}, Routes: map[string]string{}, ModuleTwins: map[string][]string{}}
	mc, err := decodeModulesContent(base.Content)
	if err != nil {
		return nil, comp, fmt.Errorf("content of deployment %s: %w", base.ID, err)
	}
	m := merger{mc: mc, comp: &comp}
	for name := range objectAt(mc, edgeAgent, desiredKey, "modules") {
		comp.Modules[name] = []string{base.ID}
	}
	for name := range objectAt(mc, edgeHub, desiredKey, "routes") {
		comp.Routes[name] = base.ID
	}
	for name, entry := range mc {
		if !strings.HasPrefix(name, "$") && len(objectAt(entry, desiredKey)) > 0 {
			comp.ModuleTwins[name] = []string{base.ID}
		}
	}
	for _, l := range layers {
		lc, err := decodeModulesContent(l.Content)
		if err != nil {
			return nil, comp, fmt.Errorf("content of deployment %s: %w", l.ID, err)
		}
		comp.Layers = append(comp.Layers, l.ID)
		for _, twin := range sortedMapKeys(lc) {
			entry, _ := lc[twin].(map[string]any)
			for _, key := range sortedMapKeys(entry) {
				segs, ok := desiredSegs(key)
				if !ok {
					continue // validation refuses these
				}
				m.set(l.ID, twin, segs, entry[key])
			}
		}
	}
	if len(comp.Routes) == 0 {
		comp.Routes = nil
	}
	if len(comp.ModuleTwins) == 0 {
		comp.ModuleTwins = nil
	}
	out, err := marshalNoEscape(mc)
	if err != nil {
		return nil, comp, err
	}
	return out, comp, nil
}

// merger applies layers' entries to a decoded modulesContent.
type merger struct {
	mc   map[string]any
	comp *Composition
}

// set applies one layer entry: value v at segs below twin's desired
// properties.
func (m *merger) set(layer, twin string, segs []string, v any) {
	switch twin {
	case edgeAgent:
		m.agent(layer, segs, v)
	case edgeHub:
		m.hub(layer, segs, v)
	default:
		m.moduleTwin(layer, twin, segs, v)
	}
}

func (m *merger) ignore(layer, twin string, segs []string, why string) {
	p := twin + "." + desiredKey
	if len(segs) > 0 {
		p += "." + strings.Join(segs, ".")
	}
	m.comp.Ignored = append(m.comp.Ignored, fmt.Sprintf("%s: %s: %s", layer, p, why))
}

// agent merges $edgeAgent paths: modules (whole or in part) and registry
// credentials; the rest is the base's.
func (m *merger) agent(layer string, segs []string, v any) {
	switch {
	case len(segs) == 0:
		// A whole desired object: its modules and credentials, one by one.
		obj, _ := v.(map[string]any)
		for _, k := range sortedMapKeys(obj) {
			m.agent(layer, []string{k}, obj[k])
		}
	case segs[0] == "modules" && len(segs) == 1:
		obj, _ := v.(map[string]any)
		for _, name := range sortedMapKeys(obj) {
			m.agent(layer, []string{"modules", name}, obj[name])
		}
	case segs[0] == "modules" && len(segs) == 2:
		setPath(m.mc, []string{edgeAgent, desiredKey, "modules", segs[1]}, v)
		m.comp.Modules[segs[1]] = []string{layer}
	case segs[0] == "modules":
		name := segs[1]
		if _, ok := objectAt(m.mc, edgeAgent, desiredKey, "modules")[name]; !ok {
			m.ignore(layer, edgeAgent, segs, "module "+name+" is not in the base or a lower layer, so there is nothing to change")
			return
		}
		setPath(m.mc, append([]string{edgeAgent, desiredKey}, segs...), v)
		if !slices.Contains(m.comp.Modules[name], layer) {
			m.comp.Modules[name] = append(m.comp.Modules[name], layer)
		}
	case len(segs) >= 3 && segs[0] == "runtime" && segs[1] == "settings" && segs[2] == "registryCredentials":
		if len(segs) == 3 {
			obj, _ := v.(map[string]any)
			for _, name := range sortedMapKeys(obj) {
				m.agent(layer, []string{"runtime", "settings", "registryCredentials", name}, obj[name])
			}
			return
		}
		setPath(m.mc, append([]string{edgeAgent, desiredKey}, segs...), v)
	case segs[0] == "runtime" && len(segs) <= 2:
		// runtime or runtime.settings whole: only its credentials merge.
		obj, _ := v.(map[string]any)
		for _, k := range sortedMapKeys(obj) {
			m.agent(layer, append(slices.Clone(segs), k), obj[k])
		}
	case segs[0] == "systemModules":
		m.ignore(layer, edgeAgent, segs, "a layer does not configure the system modules: the base deployment does")
	default:
		m.ignore(layer, edgeAgent, segs, "a layer sets modules and registry credentials only: the base deployment provides the rest")
	}
}

// hub merges $edgeHub's routes (whole or a field of one); the rest is the
// base's.
func (m *merger) hub(layer string, segs []string, v any) {
	switch {
	case len(segs) == 0:
		obj, _ := v.(map[string]any)
		for _, k := range sortedMapKeys(obj) {
			m.hub(layer, []string{k}, obj[k])
		}
	case segs[0] == "routes" && len(segs) == 1:
		obj, _ := v.(map[string]any)
		for _, name := range sortedMapKeys(obj) {
			m.hub(layer, []string{"routes", name}, obj[name])
		}
	case segs[0] == "routes" && len(segs) == 2:
		setPath(m.mc, []string{edgeHub, desiredKey, "routes", segs[1]}, v)
		m.comp.Routes[segs[1]] = layer
	case segs[0] == "routes":
		name := segs[1]
		if _, ok := objectAt(m.mc, edgeHub, desiredKey, "routes")[name].(map[string]any); !ok {
			m.ignore(layer, edgeHub, segs, "route "+name+" is not an object in the base or a lower layer, so there is nothing to change")
			return
		}
		setPath(m.mc, append([]string{edgeHub, desiredKey}, segs...), v)
		m.comp.Routes[name] = layer
	default:
		m.ignore(layer, edgeHub, segs, "a layer sets routes only: the base deployment provides the rest")
	}
}

// moduleTwin merges a module's desired properties: a whole object replaces
// what lower deployments set, a path sets one property.
func (m *merger) moduleTwin(layer, twin string, segs []string, v any) {
	setPath(m.mc, append([]string{twin, desiredKey}, segs...), v)
	if len(segs) == 0 {
		m.comp.ModuleTwins[twin] = []string{layer}
		return
	}
	if !slices.Contains(m.comp.ModuleTwins[twin], layer) {
		m.comp.ModuleTwins[twin] = append(m.comp.ModuleTwins[twin], layer)
	}
}

// setPath sets v at path in a decoded object, making the objects on the
// way (replacing a value that is not an object).
func setPath(obj map[string]any, path []string, v any) {
	for _, k := range path[:len(path)-1] {
		next, ok := obj[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			obj[k] = next
		}
		obj = next
	}
	obj[path[len(path)-1]] = v
}

// objectAt is the object at path in a decoded value, nil if there is none.
func objectAt(v any, path ...string) map[string]any {
	for _, k := range path {
		obj, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = obj[k]
	}
	obj, _ := v.(map[string]any)
	return obj
}

func sortedMapKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// decodeModulesContent decodes a content's modulesContent (or its
// deprecated alias), numbers kept as written.
func decodeModulesContent(content json.RawMessage) (map[string]any, error) {
	var c map[string]json.RawMessage
	if err := json.Unmarshal(content, &c); err != nil {
		return nil, err
	}
	raw, ok := c["modulesContent"]
	if !ok {
		raw = c["moduleContent"]
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var mc map[string]any
	if err := dec.Decode(&mc); err != nil {
		return nil, fmt.Errorf("modulesContent: %w", err)
	}
	if mc == nil {
		mc = map[string]any{}
	}
	return mc, nil
}

// marshalNoEscape encodes v without HTML escaping (a route's "<" stays as
// written).
func marshalNoEscape(v any) (json.RawMessage, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// LayeredEntries lists the paths a layered deployment's content sets that
// the merge leaves out (system modules, schema versions, the runtime, the
// hub's other settings), each with why: what `deployment create` warns
// about. Content that does not decode has none.
func LayeredEntries(content json.RawMessage) []string {
	lc, err := decodeModulesContent(content)
	if err != nil {
		return nil
	}
	// Merge on an empty base: only the layer's own ignored paths remain.
	// A change to a module the layer does not define is not reported
	// here: the base it lands on may define it.
	comp := Composition{Modules: map[string][]string{}, Routes: map[string]string{}, ModuleTwins: map[string][]string{}}
	m := merger{mc: map[string]any{}, comp: &comp}
	for _, twin := range sortedMapKeys(lc) {
		entry, _ := lc[twin].(map[string]any)
		for _, key := range sortedMapKeys(entry) {
			segs, ok := desiredSegs(key)
			if !ok {
				continue
			}
			switch {
			case twin == edgeAgent && len(segs) > 2 && segs[0] == "modules":
				continue
			case twin == edgeHub && len(segs) > 2 && segs[0] == "routes":
				continue
			}
			m.set("", twin, segs, entry[key])
		}
	}
	out := make([]string, len(comp.Ignored))
	for i, s := range comp.Ignored {
		out[i] = strings.TrimPrefix(s, ": ")
	}
	return out
}
