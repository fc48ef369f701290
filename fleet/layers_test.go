package fleet

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"appliance/internal/testenv"
)

// mergeBase is a base deployment: the system modules, module A, route
// "up", and module A's twin.
const mergeBase = `{"modulesContent": {
 "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1",
   "runtime": {"type": "docker", "settings": {"registryCredentials": {"base": {"username": "u", "password": "p", "address": "base.example"}}}},
   "systemModules": {"edgeAgent": {"type": "docker", "settings": {"image": "agent"}},
     "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "hub"}}},
   "modules": {"A": {"type": "process", "status": "running", "restartPolicy": "always", "settings": {"command": ["/bin/a"]}, "env": {"X": {"value": "base"}}}}}},
 "$edgeHub": {"properties.desired": {"schemaVersion": "1.2", "routes": {"up": "FROM /messages/* INTO $upstream"}, "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}},
 "A": {"properties.desired": {"threshold": 1, "keep": true}}}}`

// l1 adds module M, route R and M's twin; l2 changes M's env; l3 tries
// what a layer may not do.
const (
	mergeL1 = `{"modulesContent": {
 "$edgeAgent": {"properties.desired.modules.M": {"type": "process", "status": "running", "restartPolicy": "always", "settings": {"command": ["/bin/m"]}, "env": {"MODE": {"value": "l1"}}},
   "properties.desired.runtime.settings.registryCredentials.l1reg": {"username": "u1", "password": "p1", "address": "l1.example"}},
 "$edgeHub": {"properties.desired.routes.R": "FROM /messages/modules/M/* INTO $upstream"},
 "M": {"properties.desired": {"rate": 5}}}}`
	mergeL2 = `{"modulesContent": {
 "$edgeAgent": {"properties.desired.modules.M.env.MODE": {"value": "l2"}},
 "A": {"properties.desired.threshold": 2}}}`
	mergeL3 = `{"modulesContent": {
 "$edgeAgent": {"properties.desired.systemModules.edgeHub.settings.image": "evil",
   "properties.desired.schemaVersion": "1.0",
   "properties.desired.modules.Ghost.env.X": {"value": "1"}},
 "$edgeHub": {"properties.desired.storeAndForwardConfiguration.timeToLiveSecs": 1}}}`
)

func merge(t *testing.T, layers ...string) (map[string]any, Composition) {
	t.Helper()
	var ls []LayerContent
	for i, l := range layers {
		ls = append(ls, LayerContent{ID: "l" + string(rune('1'+i)), Content: json.RawMessage(l)})
	}
	return mergeOn(t, mergeBase, ls)
}

func mergeOn(t *testing.T, base string, ls []LayerContent) (map[string]any, Composition) {
	t.Helper()
	mc, comp, err := MergeLayers(LayerContent{ID: "base", Content: json.RawMessage(base)}, ls)
	if err != nil {
		t.Fatal(err)
	}
	// The document an agent gets must be a valid standard manifest.
	if err := ValidateContent(json.RawMessage(`{"modulesContent":`+string(mc)+`}`), false); err != nil {
		t.Fatalf("merged document is not a valid manifest: %v\n%s", err, mc)
	}
	var doc map[string]any
	if err := json.Unmarshal(mc, &doc); err != nil {
		t.Fatal(err)
	}
	return doc, comp
}

func at(doc map[string]any, path ...string) any {
	var v any = doc
	for _, k := range path {
		m, _ := v.(map[string]any)
		v = m[k]
	}
	return v
}

func TestMergeLayers(t *testing.T) {
	modules := func(doc map[string]any) []string {
		var names []string
		for n := range objectAt(doc, "$edgeAgent", "properties.desired", "modules") {
			names = append(names, n)
		}
		slices.Sort(names)
		return names
	}
	// The base alone.
	doc, comp := merge(t)
	if got := modules(doc); !slices.Equal(got, []string{"A"}) {
		t.Fatalf("base modules %v", got)
	}
	if comp.Base != "base" || len(comp.Layers) != 0 || !slices.Equal(comp.Modules["A"], []string{"base"}) || comp.Routes["up"] != "base" {
		t.Fatalf("base composition %+v", comp)
	}

	// Base + L1 + L2 (L2 the higher priority): A and M, M with L2's env,
	// both routes, M's twin from L1, A's twin with L2's threshold.
	doc, comp = merge(t, mergeL1, mergeL2)
	if got := modules(doc); !slices.Equal(got, []string{"A", "M"}) {
		t.Fatalf("modules %v", got)
	}
	if got := at(doc, "$edgeAgent", "properties.desired", "modules", "M", "env", "MODE", "value"); got != "l2" {
		t.Fatalf("M's MODE = %v, want l2's", got)
	}
	if got := at(doc, "$edgeAgent", "properties.desired", "modules", "M", "settings", "command"); got == nil {
		t.Fatalf("M lost its settings when l2 changed its env")
	}
	if got := at(doc, "$edgeHub", "properties.desired", "routes", "R"); got != "FROM /messages/modules/M/* INTO $upstream" {
		t.Fatalf("route R = %v", got)
	}
	if at(doc, "$edgeAgent", "properties.desired", "runtime", "settings", "registryCredentials", "l1reg") == nil ||
		at(doc, "$edgeAgent", "properties.desired", "runtime", "settings", "registryCredentials", "base") == nil {
		t.Fatalf("registry credentials not merged: %v", at(doc, "$edgeAgent", "properties.desired", "runtime"))
	}
	if got := at(doc, "A", "properties.desired", "threshold"); got != 2.0 || at(doc, "A", "properties.desired", "keep") != true {
		t.Fatalf("A's twin = %v", at(doc, "A", "properties.desired"))
	}
	if got := at(doc, "M", "properties.desired", "rate"); got != 5.0 {
		t.Fatalf("M's twin = %v", at(doc, "M"))
	}
	want := Composition{Base: "base", Layers: []string{"l1", "l2"},
		Modules:     map[string][]string{"A": {"base"}, "M": {"l1", "l2"}},
		Routes:      map[string]string{"up": "base", "R": "l1"},
		ModuleTwins: map[string][]string{"A": {"base", "l2"}, "M": {"l1"}}}
	if got, _ := json.Marshal(comp); string(got) != string(must(json.Marshal(want))) {
		t.Fatalf("composition\n got %s\nwant %s", got, must(json.Marshal(want)))
	}

	// L2 gone (deleted): M reverts to L1's env. L1 gone too: M, R and M's
	// twin leave, A and its twin are the base's again.
	doc, _ = merge(t, mergeL1)
	if got := at(doc, "$edgeAgent", "properties.desired", "modules", "M", "env", "MODE", "value"); got != "l1" {
		t.Fatalf("without l2, M's MODE = %v, want l1's", got)
	}
	doc, _ = merge(t)
	if got := modules(doc); !slices.Equal(got, []string{"A"}) || at(doc, "$edgeHub", "properties.desired", "routes", "R") != nil || at(doc, "M") != nil {
		t.Fatalf("without the layers: modules %v, routes %v, M's twin %v", got, at(doc, "$edgeHub", "properties.desired", "routes"), at(doc, "M"))
	}
	if at(doc, "A", "properties.desired", "threshold") != 1.0 {
		t.Fatalf("A's twin kept a layer's value: %v", at(doc, "A"))
	}

	// A layer that replaces a base module wins, and gives it back when it goes.
	doc, comp = merge(t, `{"modulesContent": {"$edgeAgent": {"properties.desired.modules.A": {"type": "process", "status": "stopped", "restartPolicy": "never", "settings": {"command": ["/bin/a2"]}}}}}`)
	if at(doc, "$edgeAgent", "properties.desired", "modules", "A", "status") != "stopped" || !slices.Equal(comp.Modules["A"], []string{"l1"}) {
		t.Fatalf("replaced A = %v, %v", at(doc, "$edgeAgent", "properties.desired", "modules", "A"), comp.Modules)
	}

	// What a layer may not set is left out, and said.
	doc, comp = merge(t, mergeL3)
	if at(doc, "$edgeAgent", "properties.desired", "systemModules", "edgeHub", "settings", "image") != "hub" ||
		at(doc, "$edgeAgent", "properties.desired", "schemaVersion") != "1.1" ||
		at(doc, "$edgeHub", "properties.desired", "storeAndForwardConfiguration", "timeToLiveSecs") != 7200.0 {
		t.Fatalf("a layer changed what the base owns: %v", doc)
	}
	if _, ok := comp.Modules["Ghost"]; ok {
		t.Fatal("a partial module with no definition below it was merged")
	}
	ignored := strings.Join(comp.Ignored, "\n")
	for _, w := range []string{
		"l1: $edgeAgent.properties.desired.systemModules.edgeHub.settings.image: a layer does not configure the system modules",
		"l1: $edgeAgent.properties.desired.schemaVersion: a layer sets modules and registry credentials only",
		"l1: $edgeAgent.properties.desired.modules.Ghost.env.X: module Ghost is not in the base or a lower layer",
		"l1: $edgeHub.properties.desired.storeAndForwardConfiguration.timeToLiveSecs: a layer sets routes only",
	} {
		if !strings.Contains(ignored, w) {
			t.Errorf("Ignored lacks %q:\n%s", w, ignored)
		}
	}
	if got := LayeredEntries(json.RawMessage(mergeL3)); len(got) != 3 || !strings.HasPrefix(got[0], "$edgeAgent.properties.desired.schemaVersion") {
		t.Fatalf("LayeredEntries = %q", got)
	}
	if got := LayeredEntries(json.RawMessage(mergeL1)); len(got) != 0 {
		t.Fatalf("LayeredEntries of a clean layer = %q", got)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// The corpus's layered deployments are accepted as layered content and
// merge on a base (ours, and the corpus's top-layer deployments): their modules, routes and module twins come in, what a
// layer may not set (the iotedgedev template's system modules and schema
// versions) stays the base's.
func TestMergeLayers_CorpusLayered(t *testing.T) {
	testenv.Dir(t, corpusDir, "clone the shared repository beside this one, so that it sits at ../../shared from fleet/")
	read := func(name string, env map[string]string) json.RawMessage {
		data := readFile(t, filepath.Join(corpusDir, name))
		data, err := ExpandTemplate(data, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
		if err != nil {
			t.Fatal(err)
		}
		c, err := ParseContentFile(data)
		if err != nil {
			t.Fatal(err)
		}
		if c, err = NormalizeCreateOptions(c); err != nil {
			t.Fatal(err)
		}
		if err := ValidateContent(c, true); err != nil {
			t.Fatalf("%s refused as layered content: %v", name, err)
		}
		return c
	}
	cli := read("Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_layered.json", nil)
	tmpl := read("Azure_iotedgedev__tests__assets__test_solution_shared_lib__layered_deployment.flattened_props.template.json", map[string]string{
		"EDGEAGENT_SCHEMA_VERSION": "1.1", "EDGEHUB_SCHEMA_VERSION": "1.2", "EDGE_RUNTIME_VERSION": "1.5", "MODULES.sample_module": "registry.local/sample:1",
	})
	doc, comp := mergeOn(t, mergeBase, []LayerContent{{ID: "cli", Content: cli}, {ID: "tmpl", Content: tmpl}})
	if !slices.Equal(comp.Modules["mymodule0"], []string{"cli"}) || !slices.Equal(comp.Modules["sample_module"], []string{"tmpl"}) || !slices.Equal(comp.Modules["A"], []string{"base"}) {
		t.Fatalf("modules %v", comp.Modules)
	}
	if comp.Routes["route0"] != "cli" || comp.Routes["route"] != "tmpl" || comp.Routes["up"] != "base" {
		t.Fatalf("routes %v", comp.Routes)
	}
	if at(doc, "mymodule0", "properties.desired", "settings", "prop0") != "val0" {
		t.Fatalf("module twin not merged: %v", at(doc, "mymodule0"))
	}
	if at(doc, "$edgeAgent", "properties.desired", "systemModules", "edgeAgent", "settings", "image") != "agent" {
		t.Fatal("the template's system modules replaced the base's")
	}
	if len(comp.Ignored) == 0 || !strings.Contains(strings.Join(comp.Ignored, "\n"), "tmpl: $edgeAgent.properties.desired.systemModules") {
		t.Fatalf("Ignored = %q", comp.Ignored)
	}
	// The corpus's top-layer deployments are bases: the layers merge on
	// them too, into documents an agent accepts.
	for _, name := range []string{
		"Azure_azure-iot-cli-extension__azext_iot__tests__iothub__devices__device_configs__deployments__deploymentTopLayer.json",
		"Azure_iotedge__e2e_deployment_files__nestededge_topLayerBaseDeployment_mqtt.json",
	} {
		base, err := ParseContentFile(readFile(t, filepath.Join(corpusDir, name)))
		if err != nil {
			t.Fatal(err)
		}
		if err := ValidateContent(base, false); err != nil {
			t.Fatalf("%s refused as a base: %v", name, err)
		}
		_, comp := mergeOn(t, string(base), []LayerContent{{ID: "cli", Content: cli}, {ID: "tmpl", Content: tmpl}})
		if !slices.Equal(comp.Modules["mymodule0"], []string{"cli"}) || !slices.Equal(comp.Modules["sample_module"], []string{"tmpl"}) ||
			!slices.Equal(comp.Modules["IoTEdgeAPIProxy"], []string{"base"}) || comp.Routes["route0"] != "cli" || comp.Routes["route"] != "tmpl" {
			t.Fatalf("%s with the layers: %+v", name, comp)
		}
	}
	if _, err := os.Stat(corpusDir); err != nil {
		t.Fatal(err)
	}
}
