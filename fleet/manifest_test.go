package fleet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"appliance/internal/testenv"
)

// corpusDir is the shared corpus of real Azure manifests, cloned beside the
// repository (../../shared from this package).
const corpusDir = "../../shared/corpus/azure-manifests"

// manifestDirs returns the directories of Azure manifests to test: the
// copies in testdata (always) and the shared corpus (skipped with a message
// when it is not checked out).
func manifestDirs() []string {
	return []string{"testdata/azure", corpusDir}
}

// manifestFiles lists the *.json manifests of dir, or skips t if dir is the
// corpus and is absent.
func manifestFiles(t *testing.T, dir string) []string {
	t.Helper()
	if dir == corpusDir {
		testenv.Dir(t, dir, "clone the shared repository beside this one, so that it sits at ../../shared from fleet/")
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no manifests in %s", dir)
	}
	return files
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// corpusExpect says what ValidateContent makes of the Azure manifests that
// are not templates. Files not listed are standard deployments that must be
// accepted.
var corpusExpect = map[string]struct {
	layered bool   // layered content: accepted only with layered true
	field   string // rejected, naming this field
}{
	"Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_layered.json": {layered: true},
	"Azure_azure-iot-cli-extension__scripts__smoke_tests__edge_deployment_content.json":                          {layered: true},
	"Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_malformed.json": {
		field: "content.modulesContent.$edgeAgent.properties.desired.modules.mongo-server.restartPolicy",
	},
}

func TestValidateContent_AzureManifests(t *testing.T) {
	seen := map[string]bool{}
	for _, dir := range manifestDirs() {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			for _, path := range manifestFiles(t, dir) {
				name := filepath.Base(path)
				if strings.Contains(name, ".template.") {
					continue // see TestExpandTemplate_AzureTemplates
				}
				seen[name] = true
				t.Run(name, func(t *testing.T) {
					data := readFile(t, path)
					content, err := ParseContentFile(data)
					if err != nil {
						t.Fatalf("ParseContentFile: %v", err)
					}
					check := func(c json.RawMessage) {
						t.Helper()
						want := corpusExpect[name]
						std, lay := ValidateContent(c, false), ValidateContent(c, true)
						switch {
						case want.field != "":
							assertField(t, std, want.field, "")
							assertField(t, lay, want.field, "")
						case want.layered:
							if lay != nil {
								t.Errorf("layered: %v", lay)
							}
							assertField(t, std, "", "--layered")
						default:
							if std != nil {
								t.Errorf("standard: %v", std)
							}
							if lay != nil {
								t.Errorf("layered: %v", lay)
							}
						}
					}
					check(content)
					// A file that is the content itself validates as it is.
					var top map[string]json.RawMessage
					if err := json.Unmarshal(data, &top); err != nil {
						t.Fatal(err)
					}
					if _, ok := top["content"]; !ok {
						check(data)
					}
					// The CLI expands every file: one without placeholders is unchanged.
					out, err := ExpandTemplate(data, nil)
					if err != nil || !bytes.Equal(out, data) {
						t.Errorf("ExpandTemplate changed a file without placeholders (err %v)", err)
					}
				})
			}
		})
	}
	for name := range corpusExpect {
		if !seen[name] && fileExists(filepath.Join(corpusDir, name)) {
			t.Errorf("expectation for %s was not checked", name)
		}
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// assertField checks that err is a *ValidationError naming field (any
// field if field is "") whose message contains msg.
func assertField(t *testing.T, err error, field, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want an error naming %q", field)
	}
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v (%T) is not a *ValidationError", err, err)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("error %v does not match ErrInvalid", err)
	}
	if field != "" && ve.Field != field {
		t.Errorf("field = %q; want %q (error: %v)", ve.Field, field, err)
	}
	if !strings.Contains(ve.Msg, msg) {
		t.Errorf("message %q does not contain %q", ve.Msg, msg)
	}
}

// TestValidateContent_MalformedFixture fixes the CLI's malformed fixture one
// error at a time: errors come in sorted key order, depth first.
func TestValidateContent_MalformedFixture(t *testing.T) {
	data := readFile(t, "testdata/azure/Azure_azure-iot-cli-extension__azext_iot__tests__iothub__configurations__test_edge_deployment_malformed.json")
	content, err := ParseContentFile(data)
	if err != nil {
		t.Fatal(err)
	}
	const a = "modulesContent/$edgeAgent/properties.desired/"
	const f = "content.modulesContent.$edgeAgent.properties.desired."
	steps := []struct {
		field, msg string
		fix        edit
	}{
		{f + "modules.mongo-server.restartPolicy", `must be one of never, on-failure, on-unhealthy, always; got "on-failured"`, edit{a + "modules/mongo-server/restartPolicy", "on-failure"}},
		{f + "runtime", "is required", edit{a + "runtime", map[string]any{"type": "docker", "settings": map[string]any{}}}},
		{f + "systemModules.edgeAgent.settings.image", "must not be empty", edit{a + "systemModules/edgeAgent/settings/image", "mcr.microsoft.com/azureiotedge-agent:1.5"}},
		{f + "systemModules.edgeHub.settings.image", "must not be empty", edit{a + "systemModules/edgeHub/settings/image", "mcr.microsoft.com/azureiotedge-hub:1.5"}},
		// The route is not IoT Edge's syntax either: its source is not a path.
		{"content.modulesContent.$edgeHub.properties.desired.routes.route1", "column 6: expected a source path", edit{"modulesContent/$edgeHub/properties.desired/routes/route1", `FROM /messages/* WHERE $connectionModuleId = "adapterglobalconfig" INTO BrokeredEndpoint("/modules/alertLogic/inputs/in")`}},
	}
	for _, s := range steps {
		assertField(t, ValidateContent(content, false), s.field, s.msg)
		content = mutate(t, content, s.fix)
	}
	if err := ValidateContent(content, false); err != nil {
		t.Fatalf("fixed fixture: %v", err)
	}
}

// edit sets the value at a "/"-separated path of a JSON document (keys may
// hold dots, like "properties.desired"); a value of del removes the key.
type edit struct {
	path  string
	value any
}

var del = &struct{}{}

func mutate(t *testing.T, data []byte, edits ...edit) []byte {
	t.Helper()
	var doc map[string]any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		t.Fatal(err)
	}
	for _, e := range edits {
		keys := strings.Split(e.path, "/")
		m := doc
		for _, k := range keys[:len(keys)-1] {
			next, ok := m[k].(map[string]any)
			if !ok {
				next = map[string]any{}
				m[k] = next
			}
			m = next
		}
		last := keys[len(keys)-1]
		if e.value == del {
			if _, ok := m[last]; !ok {
				t.Fatalf("edit %s: no such key", e.path)
			}
			delete(m, last)
		} else {
			m[last] = e.value
		}
	}
	out, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Paths into testdata/process_module.json: for mutate ("/"-separated) and
// as ValidateContent names them.
const (
	pa  = "modulesContent/$edgeAgent/properties.desired/"
	ph  = "modulesContent/$edgeHub/properties.desired/"
	fa  = "content.modulesContent.$edgeAgent.properties.desired."
	fh  = "content.modulesContent.$edgeHub.properties.desired."
	his = pa + "modules/historian/"
	fhi = fa + "modules.historian."
	col = pa + "modules/collector/"
	fco = fa + "modules.collector."
)

func TestValidateContent_Rules(t *testing.T) {
	base := readFile(t, "testdata/process_module.json")
	if err := ValidateContent(base, false); err != nil {
		t.Fatalf("base manifest: %v", err)
	}
	obj := map[string]any{}
	tests := []ruleCase{
		// Module fields.
		{"restartPolicy not allowed", []edit{{his + "restartPolicy", "sometimes"}}, fhi + "restartPolicy", `must be one of never, on-failure, on-unhealthy, always; got "sometimes"`},
		{"each restartPolicy", []edit{{his + "restartPolicy", "on-unhealthy"}, {col + "restartPolicy", "never"}}, "", ""},
		{"status not allowed", []edit{{his + "status", "paused"}}, fhi + "status", `must be one of running, stopped; got "paused"`},
		{"status stopped", []edit{{his + "status", "stopped"}}, "", ""},
		{"type not allowed", []edit{{his + "type", "rkt"}}, fhi + "type", `must be one of docker, process; got "rkt"`},
		{"type not a string", []edit{{his + "type", 5}}, fhi + "type", "got 5"},
		{"imagePullPolicy not allowed", []edit{{his + "imagePullPolicy", "always"}}, fhi + "imagePullPolicy", `must be one of on-create, never; got "always"`},
		{"imagePullPolicy never", []edit{{his + "imagePullPolicy", "never"}}, "", ""},
		{"startupOrder negative", []edit{{his + "startupOrder", -1}}, fhi + "startupOrder", "must be an integer from 0 to 4294967295; got -1"},
		{"startupOrder too large", []edit{{his + "startupOrder", json.Number("4294967296")}}, fhi + "startupOrder", "got 4294967296"},
		{"startupOrder fraction", []edit{{his + "startupOrder", 1.5}}, fhi + "startupOrder", "got 1.5"},
		{"startupOrder string", []edit{{his + "startupOrder", "1"}}, fhi + "startupOrder", `got "1"`},
		{"startupOrder largest", []edit{{his + "startupOrder", json.Number("4294967295")}}, "", ""},
		{"startupOrder integral float", []edit{{his + "startupOrder", json.Number("2.0")}}, "", ""},
		{"version not a string", []edit{{his + "version", 2}}, fhi + "version", "must be a string; got 2"},
		{"module name with a dot", []edit{{pa + "modules/temp.sensor", obj}}, fa + "modules.temp.sensor", "module name must match ^[a-zA-Z0-9_-]+$"},
		{"module not an object", []edit{{his[:len(his)-1], "x"}}, fa + "modules.historian", `must be an object; got "x"`},
		{"module type missing", []edit{{his + "type", del}}, fhi + "type", "is required"},
		{"module status missing", []edit{{his + "status", del}}, fhi + "status", "is required"},
		{"module restartPolicy missing", []edit{{his + "restartPolicy", del}}, fhi + "restartPolicy", "is required"},
		{"module settings missing", []edit{{his + "settings", del}}, fhi + "settings", "is required"},
		{"docker image missing", []edit{{his + "settings/image", del}}, fhi + "settings.image", "is required"},
		{"docker image empty", []edit{{his + "settings/image", ""}}, fhi + "settings.image", "must not be empty"},
		{"docker image not a string", []edit{{his + "settings/image", 5}}, fhi + "settings.image", "must be a string"},
		{"modules empty", []edit{{pa + "modules", obj}, {"modulesContent/$edgeHub/properties.desired/routes", obj}, {"modulesContent/historian", del}}, "", ""},
		{"modules not an object", []edit{{pa + "modules", []any{}}}, fa + "modules", "must be an object"},
		// Env.
		{"env name with a dot", []edit{{his + "env/A.B", map[string]any{"value": 1}}}, fhi + "env.A.B", "must not contain + # $ . or whitespace"},
		{"env name with a space", []edit{{his + "env/A B", map[string]any{"value": 1}}}, fhi + "env.A B", "must not contain"},
		{"env name with a dollar", []edit{{his + "env/A$B", map[string]any{"value": 1}}}, fhi + "env.A$B", "must not contain"},
		{"env name with a plus", []edit{{his + "env/A+B", map[string]any{"value": 1}}}, fhi + "env.A+B", "must not contain"},
		{"env name with a hash", []edit{{his + "env/A#B", map[string]any{"value": 1}}}, fhi + "env.A#B", "must not contain"},
		{"env value missing", []edit{{his + "env/X", obj}}, fhi + "env.X.value", "is required"},
		{"env value object", []edit{{his + "env/X", map[string]any{"value": obj}}}, fhi + "env.X.value", "must be a string, number or boolean; got an object"},
		{"env value null", []edit{{his + "env/X", map[string]any{"value": nil}}}, fhi + "env.X.value", "got null"},
		{"env entry not an object", []edit{{his + "env/X", "1"}}, fhi + "env.X", `must be an object {"value": ...}`},
		{"env not an object", []edit{{his + "env", []any{}}}, fhi + "env", "must be an object"},
		// createOptions.
		{"createOptions not JSON", []edit{{his + "settings/createOptions", "{"}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", "must hold the Docker create options as a JSON object: invalid JSON"},
		{"createOptions an array", []edit{{his + "settings/createOptions", "[]"}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", "as a JSON object; got an array"},
		{"createOptions an object", []edit{{his + "settings/createOptions", obj}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", "must be a string; got an object (templates write createOptions as an object"},
		{"createOptions a number", []edit{{his + "settings/createOptions", 5}}, fhi + "settings.createOptions", "must be a string; got 5"},
		{"createOptions empty", []edit{{his + "settings/createOptions", ""}, {his + "settings/createOptions01", del}}, "", ""},
		{"createoptions spelling", []edit{{his + "settings/createOptions", del}, {his + "settings/createOptions01", del}, {his + "settings/createoptions", "{}"}}, "", ""},
		{"createOptions spellings mixed", []edit{{his + "settings/createOptions01", del}, {his + "settings/createoptions01", "}"}, {his + "settings/createOptions", "{"}}, fhi + "settings.createoptions01", "mixes the spellings createOptions and createoptions"},
		{"chunks broken JSON", []edit{{his + "settings/createOptions01", "rian"}}, fhi + "settings.createOptions", "together with createOptions01 must hold the Docker create options"},
		{"chunk gap", []edit{{his + "settings/createOptions01", del}, {his + "settings/createOptions02", "rian:/data\"]}}"}}, fhi + "settings.createOptions02", "without gaps: createOptions01 is missing"},
		{"chunk without the first", []edit{{pa + "systemModules/edgeHub/settings/createOptions", del}, {pa + "systemModules/edgeHub/settings/createOptions01", "{}"}}, fa + "systemModules.edgeHub.settings.createOptions01", "createOptions is missing"},
		{"chunk suffix of one digit", []edit{{his + "settings/createOptions1", "x"}}, fhi + "settings.createOptions1", "numbered with two digits"},
		{"chunk duplicate", []edit{{his + "settings/createOptions01", del}, {his + "settings/createOptions", "{}"}, {his + "settings/createOptions001", "x"}}, fhi + "settings.createOptions001", "numbered with two digits"},
		{"many chunks", []edit{{his + "settings/createOptions", "{\"Hostname\":"}, {his + "settings/createOptions01", "\"h"}, {his + "settings/createOptions02", "i"}, {his + "settings/createOptions03", ""}, {his + "settings/createOptions04", "\"}"}}, "", ""},
		// Process modules.
		{"process command missing", []edit{{col + "settings/command", del}}, fco + "settings.command", "is required"},
		{"process command empty", []edit{{col + "settings/command", []any{}}}, fco + "settings.command", "must not be empty"},
		{"process program empty", []edit{{col + "settings/command", []any{""}}}, fco + "settings.command[0]", "must not be empty"},
		{"process argument not a string", []edit{{col + "settings/command", []any{"/bin/x", 3}}}, fco + "settings.command[1]", "must be a string; got 3"},
		{"process command a string", []edit{{col + "settings/command", "/bin/x --y"}}, fco + "settings.command", "must be an array of strings"},
		{"process workingDir not a string", []edit{{col + "settings/workingDir", 5}}, fco + "settings.workingDir", "must be a string"},
		{"process with an image", []edit{{col + "settings/image", "x"}}, fco + "settings.image", "is not a setting of a process module"},
		{"process with createOptions", []edit{{col + "settings/createOptions", "{}"}}, fco + "settings.createOptions", "is not a setting of a process module"},
		{"process without workingDir", []edit{{col + "settings/workingDir", del}}, "", ""},
		{"process arguments may be empty", []edit{{col + "settings/command", []any{"/bin/true", ""}}}, "", ""},
		{"unknown type skips type checks of settings", []edit{{col + "type", "podman"}}, fco + "type", `got "podman"`},
		// $edgeAgent desired properties.
		{"agent schemaVersion not allowed", []edit{{pa + "schemaVersion", "2.0"}}, fa + "schemaVersion", `must be one of 1.0, 1.1; got "2.0"`},
		{"agent schemaVersion placeholder", []edit{{pa + "schemaVersion", "${EDGEAGENT_SCHEMA_VERSION}"}}, fa + "schemaVersion", "unexpanded template placeholder"},
		{"agent schemaVersion 1.0", []edit{{pa + "schemaVersion", "1.0"}}, "", ""},
		{"agent schemaVersion missing", []edit{{pa + "schemaVersion", del}}, fa + "schemaVersion", "is required"},
		{"runtime missing", []edit{{pa + "runtime", del}}, fa + "runtime", "is required"},
		{"runtime type not docker", []edit{{pa + "runtime/type", "moby"}}, fa + "runtime.type", `must be one of docker; got "moby"`},
		{"runtime settings missing", []edit{{pa + "runtime/settings", del}}, fa + "runtime.settings", "is required"},
		{"loggingOptions not a string", []edit{{pa + "runtime/settings/loggingOptions", obj}}, fa + "runtime.settings.loggingOptions", "must be a string"},
		{"minDockerVersion not a string", []edit{{pa + "runtime/settings/minDockerVersion", 1.25}}, fa + "runtime.settings.minDockerVersion", "must be a string"},
		{"registry password missing", []edit{{pa + "runtime/settings/registryCredentials/plant/password", del}}, fa + "runtime.settings.registryCredentials.plant.password", "is required"},
		{"registry username not a string", []edit{{pa + "runtime/settings/registryCredentials/plant/username", 5}}, fa + "runtime.settings.registryCredentials.plant.username", "must be a string"},
		{"registry address with a space", []edit{{pa + "runtime/settings/registryCredentials/plant/address", "my registry"}}, fa + "runtime.settings.registryCredentials.plant.address", `must not contain whitespace; got "my registry"`},
		{"registry address empty", []edit{{pa + "runtime/settings/registryCredentials/plant/address", ""}}, fa + "runtime.settings.registryCredentials.plant.address", "must not be empty"},
		{"registry credential not an object", []edit{{pa + "runtime/settings/registryCredentials/plant", "x"}}, fa + "runtime.settings.registryCredentials.plant", "must be an object {username, password, address}"},
		{"registryCredentials not an object", []edit{{pa + "runtime/settings/registryCredentials", "x"}}, fa + "runtime.settings.registryCredentials", "must be an object"},
		{"registry password empty", []edit{{pa + "runtime/settings/registryCredentials/plant/password", ""}}, "", ""},
		{"systemModules missing", []edit{{pa + "systemModules", del}}, fa + "systemModules", "is required"},
		{"edgeHub system module missing", []edit{{pa + "systemModules/edgeHub", del}}, fa + "systemModules.edgeHub", "is required"},
		{"unknown system module", []edit{{pa + "systemModules/edgeProxy", obj}}, fa + "systemModules.edgeProxy", "unknown system module"},
		{"edgeHub status missing", []edit{{pa + "systemModules/edgeHub/status", del}}, fa + "systemModules.edgeHub.status", "is required"},
		{"edgeHub restartPolicy not allowed", []edit{{pa + "systemModules/edgeHub/restartPolicy", "sometimes"}}, fa + "systemModules.edgeHub.restartPolicy", "must be one of"},
		{"edgeAgent process", []edit{{pa + "systemModules/edgeAgent/type", "process"}}, fa + "systemModules.edgeAgent.type", `must be one of docker; got "process"`},
		{"edgeAgent image empty", []edit{{pa + "systemModules/edgeAgent/settings/image", ""}}, fa + "systemModules.edgeAgent.settings.image", "must not be empty"},
		{"edgeAgent env", []edit{{pa + "systemModules/edgeAgent/env/X.Y", map[string]any{"value": "1"}}}, fa + "systemModules.edgeAgent.env.X.Y", "must not contain"},
		{"edgeAgent imagePullPolicy", []edit{{pa + "systemModules/edgeAgent/imagePullPolicy", "never"}}, "", ""},
		// $edgeHub desired properties.
		{"hub schemaVersion not allowed", []edit{{ph + "schemaVersion", "1.3"}}, fh + "schemaVersion", `must be one of 1.0, 1.1, 1.2; got "1.3"`},
		{"hub schemaVersion 1.2", []edit{{ph + "schemaVersion", "1.2"}}, "", ""},
		{"routes missing", []edit{{ph + "routes", del}}, fh + "routes", "is required"},
		{"route empty", []edit{{ph + "routes/upstream", ""}}, fh + "routes.upstream", "must not be empty"},
		{"route a number", []edit{{ph + "routes/upstream", 5}}, fh + "routes.upstream", "got 5"},
		{"route on two lines", []edit{{ph + "routes/upstream", "FROM /*\nINTO $upstream"}}, fh + "routes.upstream", "one line"},
		{"route object with 1.0", []edit{{ph + "schemaVersion", "1.0"}}, fh + "routes.toHistorian", "need schemaVersion 1.1 or later"},
		{"route object without route", []edit{{ph + "routes/toHistorian/route", del}}, fh + "routes.toHistorian.route", "is required"},
		{"route priority too large", []edit{{ph + "routes/toHistorian/priority", 10}}, fh + "routes.toHistorian.priority", "must be an integer from 0 to 9; got 10"},
		{"route ttl negative", []edit{{ph + "routes/toHistorian/timeToLiveSecs", -1}}, fh + "routes.toHistorian.timeToLiveSecs", "must be an integer from 0 to 4294967295"},
		{"route object unknown key", []edit{{ph + "routes/toHistorian/weight", 1}}, fh + "routes.toHistorian.weight", "unknown key"},
		{"route name with a dot", []edit{{ph + "routes/a.b", "FROM /* INTO $upstream"}}, fh + "routes.a.b", "route name must not contain . $ # or space"},
		{"route name with a dot, 1.0", []edit{{ph + "schemaVersion", "1.0"}, {ph + "routes/toHistorian", del}, {ph + "routes/a.b", "FROM /* INTO $upstream"}}, "", ""},
		{"routes empty", []edit{{ph + "routes", obj}}, "", ""},
		{"storeAndForward without ttl", []edit{{ph + "storeAndForwardConfiguration/timeToLiveSecs", del}}, fh + "storeAndForwardConfiguration.timeToLiveSecs", "is required"},
		{"storeAndForward ttl a string", []edit{{ph + "storeAndForwardConfiguration/timeToLiveSecs", "7200"}}, fh + "storeAndForwardConfiguration.timeToLiveSecs", `must be an integer from 0 to 4294967295; got "7200"`},
		{"storeAndForward absent", []edit{{ph + "storeAndForwardConfiguration", del}}, "", ""},
		{"storeAndForward unknown key", []edit{{ph + "storeAndForwardConfiguration/maxBytes", 1}}, fh + "storeAndForwardConfiguration.maxBytes", "unknown key"},
		{"hub unknown key", []edit{{ph + "routesV2", obj}}, fh + "routesV2", "unknown key"},
		{"hub unknown key, 1.0", []edit{{ph + "schemaVersion", "1.0"}, {ph + "routes/toHistorian", del}, {ph + "routesV2", obj}}, "", ""},
		{"mqttBroker with 1.1", []edit{{ph + "mqttBroker", obj}}, fh + "mqttBroker", "needs schemaVersion 1.2"},
		{"mqttBroker", []edit{{ph + "schemaVersion", "1.2"}, {ph + "mqttBroker", map[string]any{
			"bridges": []any{map[string]any{"endpoint": "$upstream", "settings": []any{map[string]any{"direction": "in", "topic": "alerts/#", "outPrefix": "/local/"}}}},
			"authorizations": []any{map[string]any{"identities": []any{"{{iot:identity}}"},
				"allow": []any{map[string]any{"operations": []any{"mqtt:connect"}}}}},
		}}}, "", ""},
		{"mqttBroker bridge direction", []edit{{ph + "schemaVersion", "1.2"}, {ph + "mqttBroker", map[string]any{
			"bridges": []any{map[string]any{"endpoint": "$upstream", "settings": []any{map[string]any{"direction": "both"}}}},
		}}}, fh + "mqttBroker.bridges[0].settings[0].direction", `must be one of in, out; got "both"`},
		{"mqttBroker operation", []edit{{ph + "schemaVersion", "1.2"}, {ph + "mqttBroker", map[string]any{
			"authorizations": []any{map[string]any{"deny": []any{map[string]any{"operations": []any{"mqtt:kick"}}}}},
		}}}, fh + "mqttBroker.authorizations[0].deny[0].operations[0]", "must be one of mqtt:connect, mqtt:subscribe, mqtt:publish"},
		// Module twin entries.
		{"twin desired not an object", []edit{{"modulesContent/historian/properties.desired", 5}}, "content.modulesContent.historian.properties.desired", "must be an object"},
		{"twin desired missing", []edit{{"modulesContent/historian/properties.desired", del}}, "content.modulesContent.historian.properties.desired", "is required"},
		{"twin unknown key", []edit{{"modulesContent/historian/tags", obj}}, "content.modulesContent.historian.tags", "unknown key"},
		{"twin entry not an object", []edit{{"modulesContent/historian", "x"}}, "content.modulesContent.historian", "must be an object"},
		{"twin of an unknown system module", []edit{{"modulesContent/$edgeProxy/properties.desired", obj}}, "content.modulesContent.$edgeProxy", "unknown system module"},
		{"twin with a bad module name", []edit{{"modulesContent/my module/properties.desired", obj}}, "content.modulesContent.my module", "module name must match"},
		{"twin of a module not deployed", []edit{{"modulesContent/elsewhere/properties.desired", obj}}, "", ""},
		{"edgeAgent missing", []edit{{"modulesContent/$edgeAgent", del}}, "content.modulesContent.$edgeAgent", "is required"},
		{"edgeHub missing", []edit{{"modulesContent/$edgeHub", del}}, "content.modulesContent.$edgeHub", "is required"},
		{"edgeAgent desired not an object", []edit{{"modulesContent/$edgeAgent/properties.desired", "x"}}, "content.modulesContent.$edgeAgent.properties.desired", "must be an object"},
		// Layered keys in a standard deployment.
		{"layered key", []edit{{"modulesContent/$edgeHub/properties.desired.routes.r", "FROM /* INTO $upstream"}}, "content.modulesContent.$edgeHub.properties.desired.routes.r", `create the deployment with --layered (API: "layered": true)`},
		{"layered key reported first", []edit{{pa + "schemaVersion", "9"}, {"modulesContent/zz/properties.desired.x", 1}}, "content.modulesContent.zz.properties.desired.x", "layered content"},
	}
	runRuleCases(t, base, tests, nil)
}

// ruleCase is base content with edits, and the field ValidateContent must
// name ("" when the edited content is accepted) with part of its message.
type ruleCase struct {
	name  string
	edits []edit
	field string
	msg   string
}

// runRuleCases runs each case as a subtest; refused, when set, checks a
// refused content and its error further.
func runRuleCases(t *testing.T, base []byte, cases []ruleCase, refused func(t *testing.T, content []byte, err error)) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			content := mutate(t, base, tc.edits...)
			err := ValidateContent(content, false)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			assertField(t, err, tc.field, tc.msg)
			if refused != nil {
				refused(t, content, err)
			}
		})
	}
}

func TestValidateContent_Content(t *testing.T) {
	valid := string(readFile(t, "testdata/process_module.json"))
	tests := []struct {
		name, content string
		field, msg    string // field "" for accepted
	}{
		{"empty", "", "content", "is required"},
		{"spaces", " \n", "content", "is required"},
		{"not an object", "[]", "content", "must be a JSON object"},
		{"no modulesContent", "{}", "content.modulesContent", "is required"},
		{"modulesContent not an object", `{"modulesContent": 5}`, "content.modulesContent", "must be an object; got 5"},
		{"both names", `{"modulesContent": {}, "moduleContent": {}}`, "content.moduleContent", "duplicates modulesContent"},
		{"unknown key", `{"modulesContent": {}, "deviceContent": {}}`, "content.deviceContent", "unknown key"},
		{"a whole configuration", `{"content": {"modulesContent": {}}}`, "content.content", "ParseContentFile"},
		{"duplicate key", `{"modulesContent": {"$edgeAgent": {}, "$edgeAgent": {}}}`, "content.modulesContent.$edgeAgent", "duplicate key"},
		{"syntax error", "{\n  \"modulesContent\": {]\n}", "content", "invalid JSON at line 2, column 22"},
		{"truncated", `{"modulesContent": {`, "content", "invalid JSON at line 1"},
		{"trailing data", `{"modulesContent": {}} {}`, "content", "invalid JSON at line 1, column 24"},
		{"deprecated moduleContent", strings.Replace(valid, "modulesContent", "moduleContent", 1), "", ""},
		{"$schema beside", strings.Replace(valid, "{", `{"$schema": "http://json.schemastore.org/azure-iot-edge-deployment-2.0", "$schema-template": "4.0.0",`, 1), "", ""},
		{"modulesContent empty", `{"modulesContent": {}}`, "content.modulesContent.$edgeAgent", "is required"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateContent(json.RawMessage(tc.content), false)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			assertField(t, err, tc.field, tc.msg)
		})
	}
}

func TestValidateContent_Layered(t *testing.T) {
	base := readFile(t, "testdata/azure/Azure_azure-iot-cli-extension__scripts__smoke_tests__edge_deployment_content.json")
	base, err := ParseContentFile(base)
	if err != nil {
		t.Fatal(err)
	}
	const (
		ea  = "modulesContent/$edgeAgent/"
		eh  = "modulesContent/$edgeHub/"
		fa  = "content.modulesContent.$edgeAgent."
		fh  = "content.modulesContent.$edgeHub."
		m0  = ea + "properties.desired.modules.mymodule0/"
		fm0 = fa + "properties.desired.modules.mymodule0."
	)
	obj := map[string]any{}
	tests := []struct {
		name  string
		edits []edit
		field string // "" for accepted
		msg   string
	}{
		{"as it is", nil, "", ""},
		{"empty", []edit{{"modulesContent/$edgeAgent", del}, {"modulesContent/$edgeHub", del}, {"modulesContent/mymodule0", del}}, "", ""},
		{"module status", []edit{{m0 + "status", "bogus"}}, fm0 + "status", `must be one of running, stopped; got "bogus"`},
		{"module restartPolicy missing", []edit{{m0 + "restartPolicy", del}}, fm0 + "restartPolicy", "is required"},
		{"module image empty", []edit{{m0 + "settings/image", ""}}, fm0 + "settings.image", "must not be empty"},
		{"module createOptions object", []edit{{m0 + "settings/createOptions", obj}}, fm0 + "settings.createOptions", "must be a string; got an object"},
		{"module status by path", []edit{{ea + "properties.desired.modules.m1.status", "bogus"}}, fa + "properties.desired.modules.m1.status", `got "bogus"`},
		{"module env by path", []edit{{ea + "properties.desired.modules.m1.env.A", map[string]any{"value": []any{}}}}, fa + "properties.desired.modules.m1.env.A.value", "must be a string, number or boolean"},
		{"module env value by path", []edit{{ea + "properties.desired.modules.m1.env.A.value", true}}, "", ""},
		{"module image by path", []edit{{ea + "properties.desired.modules.m1.settings.image", ""}}, fa + "properties.desired.modules.m1.settings.image", "must not be empty"},
		{"module createOptions by path", []edit{{ea + "properties.desired.modules.m1.settings.createOptions", obj}}, fa + "properties.desired.modules.m1.settings.createOptions", "must be a string"},
		{"module settings by path", []edit{{ea + "properties.desired.modules.m1.settings", map[string]any{"createOptions": "{", "image": "x"}}}, fa + "properties.desired.modules.m1.settings.createOptions", "invalid JSON"},
		{"process command by path", []edit{{ea + "properties.desired.modules.m1.settings.command", []any{}}}, fa + "properties.desired.modules.m1.settings.command", "must not be empty"},
		{"module name by path", []edit{{ea + "properties.desired.modules.m$1", obj}}, fa + "properties.desired.modules.m$1", "module name must match"},
		{"module name of a deeper path", []edit{{ea + "properties.desired.modules.m$1.status", "running"}}, fa + "properties.desired.modules.m$1", "module name must match"},
		{"whole modules", []edit{{ea + "properties.desired.modules", map[string]any{"m1": obj}}}, fa + "properties.desired.modules.m1.restartPolicy", "is required"},
		{"whole modules and a module", []edit{{ea + "properties.desired.modules", map[string]any{}}}, fa + "properties.desired.modules.mymodule0", `overlaps with key "properties.desired.modules"`},
		{"overlapping keys", []edit{{ea + "properties.desired.modules.mymodule0.env", obj}}, fa + "properties.desired.modules.mymodule0.env", `overlaps with key "properties.desired.modules.mymodule0"`},
		{"unknown path", []edit{{ea + "properties.desired.foo.bar", 1}}, "", ""},
		{"unknown key", []edit{{ea + "tags", obj}}, fa + "tags", "unknown key"},
		{"registry credential", []edit{{ea + "properties.desired.runtime.settings.registryCredentials.acr", map[string]any{"username": "u", "address": "a"}}}, fa + "properties.desired.runtime.settings.registryCredentials.acr.password", "is required"},
		{"registry address", []edit{{ea + "properties.desired.runtime.settings.registryCredentials.acr.address", "a b"}}, fa + "properties.desired.runtime.settings.registryCredentials.acr.address", "whitespace"},
		{"unknown system module", []edit{{ea + "properties.desired.systemModules.edgeProxy", obj}}, fa + "properties.desired.systemModules.edgeProxy", "unknown system module"},
		{"unknown system module of a deeper path", []edit{{ea + "properties.desired.systemModules.edgeProxy.settings", obj}}, fa + "properties.desired.systemModules.edgeProxy", "unknown system module"},
		{"system module image", []edit{{ea + "properties.desired.systemModules.edgeHub.settings.image", ""}}, fa + "properties.desired.systemModules.edgeHub.settings.image", "must not be empty"},
		{"schemaVersion", []edit{{ea + "properties.desired.schemaVersion", "1.2"}}, fa + "properties.desired.schemaVersion", "must be one of 1.0, 1.1"},
		{"runtime type", []edit{{ea + "properties.desired.runtime.type", "moby"}}, fa + "properties.desired.runtime.type", "must be one of docker"},
		{"route empty", []edit{{eh + "properties.desired.routes.route0", " "}}, fh + "properties.desired.routes.route0", "must not be empty"},
		{"route object", []edit{{eh + "properties.desired.routes.route1", map[string]any{"route": "FROM /* INTO $upstream", "priority": 1}}}, "", ""},
		{"route priority", []edit{{eh + "properties.desired.routes.route1", map[string]any{"route": "FROM /* INTO $upstream", "priority": 11}}}, fh + "properties.desired.routes.route1.priority", "from 0 to 9"},
		{"route priority by path", []edit{{eh + "properties.desired.routes.route1.priority", -1}}, fh + "properties.desired.routes.route1.priority", "from 0 to 9"},
		{"hub ttl", []edit{{eh + "properties.desired.storeAndForwardConfiguration.timeToLiveSecs", "1"}}, fh + "properties.desired.storeAndForwardConfiguration.timeToLiveSecs", "must be an integer"},
		{"hub schemaVersion", []edit{{eh + "properties.desired.schemaVersion", "2"}}, fh + "properties.desired.schemaVersion", "must be one of 1.0, 1.1, 1.2"},
		{"twin desired not an object", []edit{{"modulesContent/mymodule0/properties.desired.settings", del}, {"modulesContent/mymodule0/properties.desired", 5}}, "content.modulesContent.mymodule0.properties.desired", "must be an object"},
		{"twin path", []edit{{"modulesContent/mymodule0/properties.desired.layeredProperties", map[string]any{"a": 1}}}, "", ""},
		{"twin key not under desired", []edit{{"modulesContent/mymodule0/properties.reported", obj}}, "content.modulesContent.mymodule0.properties.reported", "unknown key"},
		{"whole desired without requirements", []edit{{ea + "properties.desired.modules.mymodule0", del}, {ea + "properties.desired", map[string]any{"modules": map[string]any{"m": map[string]any{
			"type": "process", "status": "running", "restartPolicy": "always", "settings": map[string]any{"command": []any{"/bin/m"}}}}}}}, "", ""},
		{"whole desired with a bad module", []edit{{ea + "properties.desired.modules.mymodule0", del}, {ea + "properties.desired", map[string]any{"modules": map[string]any{"m": obj}}}}, fa + "properties.desired.modules.m.restartPolicy", "is required"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			content := mutate(t, base, tc.edits...)
			err := ValidateContent(content, true)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			assertField(t, err, tc.field, tc.msg)
		})
	}
}

func TestParseContentFile(t *testing.T) {
	const mc = `{"$edgeAgent": {"properties.desired": {}}}`
	want := `{"modulesContent":` + mc + `}`
	tests := []struct {
		name, file string
		want       string // "" when an error is expected
		field, msg string
	}{
		{"content", `{"modulesContent": ` + mc + `}`, want, "", ""},
		{"content with $schema-template", `{"$schema-template": "4.0.0", "modulesContent": ` + mc + `}`, want, "", ""},
		{"wrapped content", `{"content": {"modulesContent": ` + mc + `}}`, want, "", ""},
		{"configuration", `{"id": "d1", "priority": 10, "targetCondition": "tags.a='b'", "metrics": {"queries": {}}, "content": {"$schema": "x", "modulesContent": ` + mc + `}}`, want, "", ""},
		{"deprecated moduleContent", `{"moduleContent": ` + mc + `}`, want, "", ""},
		{"byte order mark", "\xef\xbb\xbf" + `{"modulesContent": ` + mc + `}`, want, "", ""},
		{"modulesContent kept as written", "{\"modulesContent\": {\n  \"a\" : 1\n}}", "{\"modulesContent\":{\n  \"a\" : 1\n}}", "", ""},
		{"syntax error", "{\n  \"content\": {\n    \"modulesContent\": {,}\n  }\n}", "", "content", "invalid JSON at line 3, column 24"},
		{"not an object", `[1]`, "", "content", "must hold a JSON object"},
		{"nothing", `{"id": "x"}`, "", "content.modulesContent", `is required: the file must hold {"modulesContent": {...}}`},
		{"content without modulesContent", `{"content": {"deviceContent": {}}}`, "", "content.modulesContent", "is required"},
		{"content not an object", `{"content": "x"}`, "", "content", `must be a JSON object; got "x"`},
		{"content and modulesContent", `{"content": {"modulesContent": {}}, "modulesContent": {}}`, "", "content", `both "content" and "modulesContent"`},
		{"both names", `{"modulesContent": {}, "moduleContent": {}}`, "", "content.moduleContent", "duplicates modulesContent"},
		{"unknown key in content", `{"content": {"modulesContent": {}, "deviceContent": {}}}`, "", "content.deviceContent", "unknown key"},
		{"duplicate key", `{"content": {"modulesContent": {}, "modulesContent": {}}}`, "", "content.content.modulesContent", "duplicate key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseContentFile([]byte(tc.file))
			if tc.want == "" {
				assertField(t, err, tc.field, tc.msg)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("got %s; want %s", got, tc.want)
			}
			if !json.Valid(got) {
				t.Errorf("result is not JSON: %s", got)
			}
		})
	}
}

func FuzzValidateContent(f *testing.F) {
	for _, dir := range []string{"testdata/azure", "testdata"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
		for _, path := range files {
			data, err := os.ReadFile(path)
			if err != nil {
				f.Fatal(err)
			}
			if c, err := ParseContentFile(data); err == nil {
				f.Add([]byte(c), false)
				f.Add([]byte(c), true)
			}
		}
	}
	f.Fuzz(func(t *testing.T, content []byte, layered bool) {
		err := ValidateContent(content, layered)
		redacted := RedactContent(content)
		if !json.Valid(redacted) {
			t.Fatalf("RedactContent returned invalid JSON %q", redacted)
		}
		if err != nil {
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error %v (%T) is not a *ValidationError", err, err)
			}
			return
		}
		// Accepted content round-trips through a generic decode and encode.
		var v any
		dec := json.NewDecoder(bytes.NewReader(content))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("accepted content does not decode: %v", err)
		}
		again, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("accepted content does not encode: %v", err)
		}
		if err := ValidateContent(again, layered); err != nil {
			t.Fatalf("re-encoded content rejected: %v\n%s", err, again)
		}
		// It is already normalized, still valid once redacted, and reads
		// back through ParseContentFile.
		n, err := NormalizeCreateOptions(content)
		if err != nil || !bytes.Equal(n, content) {
			t.Fatalf("NormalizeCreateOptions changed accepted content: %v\n%s", err, n)
		}
		if err := ValidateContent(redacted, layered); err != nil {
			t.Fatalf("redacted content rejected: %v\n%s", err, redacted)
		}
		c, err := ParseContentFile(content)
		if err != nil {
			t.Fatalf("ParseContentFile: %v", err)
		}
		if err := ValidateContent(c, layered); err != nil {
			t.Fatalf("parsed content rejected: %v", err)
		}
	})
}

// TestLargeDocuments feeds documents nested as deep as encoding/json
// allows, and very wide ones: every function must stay linear, so that an
// API body cannot make the server allocate gigabytes. Doubling the size of
// a document must not much more than double what is allocated.
func TestLargeDocuments(t *testing.T) {
	nest := func(n int, open, leaf, close string) string {
		return strings.Repeat(open, n) + leaf + strings.Repeat(close, n)
	}
	wideModules := func(n int) string {
		var b strings.Builder
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"properties.desired.modules.m%d":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"i","createOptions":{"Env":["A_KEY=%d"]}}}`, i, i)
		}
		return `{"modulesContent":{"$edgeAgent":{` + b.String() + `}}}`
	}
	wideEnv := func(n int) string {
		var b strings.Builder
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"API_KEY_%d":{"value":"%d"}`, i, i)
		}
		return `{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"i"},"env":{` + b.String() + `}}}}}}}`
	}
	docs := map[string]func(n int) string{
		"deep twin": func(n int) string {
			return `{"modulesContent":{"m":{"properties.desired":` + nest(n, `{"a":`, "1", "}") + `}}}`
		},
		"deep settings": func(n int) string {
			return `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings":{"x":` + nest(n, `{"a":`, "1", "}") + `}}}}`
		},
		"deep credential": func(n int) string {
			return `{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials":{"r":` + nest(n, `{"a":`, "1", "}") + `}}}}`
		},
		"deep array": func(n int) string {
			return `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings.command":` + nest(n, "[", "1", "]") + `}}}`
		},
		"deep duplicate": func(n int) string {
			return `{"modulesContent":{"$edgeAgent":{"properties.desired.x":` + nest(n, `{"a":`, `{"b":1,"b":2}`, "}") + `}}}`
		},
		"long keys": func(n int) string {
			return `{"modulesContent":{"$edgeAgent":{"properties.desired` + strings.Repeat(".a", n) + `":1,"properties.desired` + strings.Repeat(".b", n) + `":1}}}`
		},
		"wide layered": func(n int) string { return wideModules(n) },
		"wide env":     func(n int) string { return wideEnv(n) },
	}
	const n = 4000 // and 8000; encoding/json allows 10000 levels
	for name, doc := range docs {
		t.Run(name, func(t *testing.T) {
			small, large := allocated(doc(n)), allocated(doc(2*n))
			if large > 3*small {
				t.Errorf("allocated %d kB for size %d and %d kB for size %d", small>>10, n, large>>10, 2*n)
			}
		})
	}
}

// allocated returns the bytes allocated by every function of the package
// that reads content, run on doc.
func allocated(doc string) uint64 {
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	_ = ValidateContent(json.RawMessage(doc), true)
	_ = ValidateContent(json.RawMessage(doc), false)
	_ = RedactContent(json.RawMessage(doc))
	_, _ = NormalizeCreateOptions(json.RawMessage(doc))
	_, _ = ExpandTemplate([]byte(doc), nil)
	_, _ = TemplatePlaceholders([]byte(doc))
	_, _ = ParseContentFile([]byte(doc))
	runtime.ReadMemStats(&ms1)
	return ms1.TotalAlloc - ms0.TotalAlloc
}
