package fleet

import (
	"encoding/json"
	"strings"
	"testing"

	"appliance/internal/secrettest"
)

// TestValidateContent_KeySpelling: a manifest key that differs from
// Azure's spelling only by case is refused, naming its path, wherever the
// schema spells it; before this rule the agent's case-insensitive decoder
// ran what the validator and the redactor never looked at (an "Env" map
// merged into "env", a "Modules" map into "modules", "RegistryCredentials"
// shown in clear).
func TestValidateContent_KeySpelling(t *testing.T) {
	base := readFile(t, "testdata/process_module.json")
	secretEnv := map[string]any{"API_KEY": map[string]any{"value": "s3cret"}}
	module := map[string]any{"type": "docker", "status": "running", "restartPolicy": "always", "settings": map[string]any{"image": "i"}, "env": secretEnv}
	differs := func(got, want string) string { return `"` + got + `" differs from "` + want + `" only by case` }
	tests := []ruleCase{
		{"module Env", []edit{{his + "Env", secretEnv}}, fhi + "Env", differs("Env", "env")},
		{"module ENV", []edit{{his + "ENV", secretEnv}}, fhi + "ENV", differs("ENV", "env")},
		{"module Settings", []edit{{his + "Settings", map[string]any{"image": "other"}}}, fhi + "Settings", differs("Settings", "settings")},
		{"module settings with a long s", []edit{{his + "\u017fettings", map[string]any{"image": "other"}}}, fhi + "\u017fettings", differs("\u017fettings", "settings")},
		{"module Type", []edit{{his + "Type", "process"}}, fhi + "Type", differs("Type", "type")},
		{"module RestartPolicy", []edit{{his + "RestartPolicy", "never"}}, fhi + "RestartPolicy", differs("RestartPolicy", "restartPolicy")},
		{"env Value", []edit{{his + "env/X", map[string]any{"value": "a", "Value": "b"}}}, fhi + "env.X.Value", differs("Value", "value")},
		{"settings Image", []edit{{his + "settings/Image", "other"}}, fhi + "settings.Image", differs("Image", "image")},
		{"settings CreateOptions", []edit{{his + "settings/CreateOptions", `{"Env":["API_KEY=s3cret"]}`}}, fhi + "settings.CreateOptions", differs("CreateOptions", "createOptions")},
		{"settings CREATEOPTIONS01", []edit{{his + "settings/CREATEOPTIONS01", "x"}}, fhi + "settings.CREATEOPTIONS01", differs("CREATEOPTIONS", "createOptions")},
		{"desired Modules", []edit{{pa + "Modules", map[string]any{"evil": module}}}, fa + "Modules", differs("Modules", "modules")},
		{"desired SystemModules", []edit{{pa + "SystemModules", map[string]any{}}}, fa + "SystemModules", differs("SystemModules", "systemModules")},
		{"runtime Settings", []edit{{pa + "runtime/Settings", map[string]any{}}}, fa + "runtime.Settings", differs("Settings", "settings")},
		{"RegistryCredentials", []edit{{pa + "runtime/settings/RegistryCredentials", map[string]any{"x": map[string]any{"username": "u", "password": "s3cret", "address": "a"}}}}, fa + "runtime.settings.RegistryCredentials", differs("RegistryCredentials", "registryCredentials")},
		{"registry Password", []edit{{pa + "runtime/settings/registryCredentials/plant/Password", "s3cret"}}, fa + "runtime.settings.registryCredentials.plant.Password", differs("Password", "password")},
		{"system module EdgeHub", []edit{{pa + "systemModules/EdgeHub", module}}, fa + "systemModules.EdgeHub", differs("EdgeHub", "edgeHub")},
		{"system module env", []edit{{pa + "systemModules/edgeHub/Env", secretEnv}}, fa + "systemModules.edgeHub.Env", differs("Env", "env")},
		{"$EdgeAgent twin", []edit{{"modulesContent/$EdgeAgent/properties.desired", map[string]any{}}}, "content.modulesContent.$EdgeAgent", differs("$EdgeAgent", "$edgeAgent")},
		{"Properties.Desired", []edit{{"modulesContent/historian/Properties.Desired", map[string]any{}}}, "content.modulesContent.historian.Properties.Desired", differs("Properties.Desired", "properties.desired")},
		{"hub Routes", []edit{{ph + "Routes", map[string]any{}}}, fh + "Routes", differs("Routes", "routes")},
		{"route object Route", []edit{{ph + "routes/toHistorian/Route", "FROM /* INTO $upstream"}}, fh + "routes.toHistorian.Route", differs("Route", "route")},
		{"storeAndForward TimeToLiveSecs", []edit{{ph + "storeAndForwardConfiguration/TimeToLiveSecs", 1}}, fh + "storeAndForwardConfiguration.TimeToLiveSecs", differs("TimeToLiveSecs", "timeToLiveSecs")},
		// Docker reads createOptions ignoring case too.
		{"createOptions env", []edit{{his + "settings/createOptions", `{"env":["API_KEY=s3cret"]}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `Docker create option "env" differs from "Env" only by case`},
		{"createOptions ENV beside Env", []edit{{his + "settings/createOptions", `{"Env":["A=1"],"ENV":["API_KEY=s3cret"]}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `"ENV" differs from "Env"`},
		{"createOptions hostconfig", []edit{{his + "settings/createOptions", `{"hostconfig":{}}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `"hostconfig" differs from "HostConfig"`},
		{"createOptions with a Kelvin sign", []edit{{his + "settings/createOptions", "{\"Healthchec\u212a\":{}}"}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `differs from "Healthcheck"`},
		{"createOptions Env a string", []edit{{his + "settings/createOptions", `{"Env":"API_KEY=s3cret"}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `"Env" must be an array of "NAME=value" strings; got a string`},
		{"createOptions Env entry a number", []edit{{his + "settings/createOptions", `{"Env":[1]}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `"Env"[0] must be a "NAME=value" string; got a number`},
		{"createOptions duplicate key named", []edit{{his + "settings/createOptions", `{"HostConfig":{"Binds":[],"Binds":[]}}`}, {his + "settings/createOptions01", del}}, fhi + "settings.createOptions", `HostConfig.Binds: duplicate key "Binds"`},
		// Free names are not schema keys; neither are the keys a module
		// twin's own properties or the validator's unknown keys.
		{"env names differing by case", []edit{{his + "env/api_key", map[string]any{"value": "a"}}, {his + "env/API_KEY", map[string]any{"value": "b"}}}, "", ""},
		{"twin properties of any case", []edit{{"modulesContent/historian/properties.desired/Env", 1}, {"modulesContent/historian/properties.desired/env", 2}}, "", ""},
		{"createoptions is Azure's other spelling", []edit{{his + "settings/createOptions", del}, {his + "settings/createOptions01", del}, {his + "settings/createoptions", `{"Env":["A=1"],"Labels":{"env":"x"}}`}}, "", ""},
		{"createOptions Env null", []edit{{his + "settings/createOptions", `{"Env":null}`}, {his + "settings/createOptions01", del}}, "", ""},
	}
	runRuleCases(t, base, tests, func(t *testing.T, content []byte, err error) {
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("the error shows the secret: %v", err)
		}
		// What is refused is never shown member by member either.
		if red := RedactContent(content); strings.Contains(string(red), "s3cret") {
			t.Errorf("RedactContent shows the secret: %s", red)
		}
	})
}

// TestValidateContent_LayeredKeySpelling checks each segment of layered
// keys against the schema too.
func TestValidateContent_LayeredKeySpelling(t *testing.T) {
	const agent = "content.modulesContent.$edgeAgent."
	tests := []struct {
		name, content, field, msg string
	}{
		{"Modules segment", `{"modulesContent":{"$edgeAgent":{"properties.desired.Modules.m":{"env":{"API_KEY":{"value":"s3cret"}}}}}}`,
			agent + "properties.desired.Modules.m", `"Modules" differs from "modules" only by case`},
		{"Env segment", `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.Env":{"API_KEY":{"value":"s3cret"}}}}}`,
			agent + "properties.desired.modules.m.Env", `"Env" differs from "env"`},
		{"Env below a layered module", `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m":{"Env":{"API_KEY":{"value":"s3cret"}}}}}}`,
			agent + "properties.desired.modules.m.Env", `"Env" differs from "env"`},
		{"RegistryCredentials segment", `{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.RegistryCredentials.acr":{"password":"s3cret"}}}}`,
			agent + "properties.desired.runtime.settings.RegistryCredentials.acr", `"RegistryCredentials" differs from "registryCredentials"`},
		{"Properties segment", `{"modulesContent":{"$edgeAgent":{"Properties.desired.modules.m":{}}}}`,
			agent + "Properties.desired.modules.m", `"Properties.desired" differs from "properties.desired"`},
		{"hub Routes segment", `{"modulesContent":{"$edgeHub":{"properties.desired.Routes.r":"FROM /* INTO $upstream"}}}`,
			"content.modulesContent.$edgeHub.properties.desired.Routes.r", `"Routes" differs from "routes"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assertField(t, ValidateContent(json.RawMessage(tc.content), true), tc.field, tc.msg)
			if red := RedactContent(json.RawMessage(tc.content)); strings.Contains(string(red), "s3cret") {
				t.Errorf("RedactContent shows the secret: %s", red)
			}
		})
	}
	// A layered path the schema does not know is still accepted, whatever
	// its case, and twins are free.
	for _, ok := range []string{
		`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.labels":{"A":1}}}}`,
		`{"modulesContent":{"m":{"properties.desired.Settings.Env":1}}}`,
	} {
		if err := ValidateContent(json.RawMessage(ok), true); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

func TestParseContentFile_KeySpelling(t *testing.T) {
	for _, file := range []string{
		`{"ModulesContent": {}}`,
		`{"content": {"MODULESCONTENT": {}}}`,
	} {
		_, err := ParseContentFile([]byte(file))
		assertField(t, err, "", "only by case")
	}
	assertField(t, ValidateContent(json.RawMessage(`{"modulesContent":{},"ModulesContent":{}}`), false), "content.ModulesContent", `"ModulesContent" differs from "modulesContent"`)
}

// TestValidateContent_PasswordNeverEchoed: a registry password of the wrong
// type is refused without showing it (the message reaches API clients and,
// from an agent, the device's report).
func TestValidateContent_PasswordNeverEchoed(t *testing.T) {
	base := readFile(t, "testdata/process_module.json")
	content := mutate(t, base, edit{"modulesContent/$edgeAgent/properties.desired/runtime/settings/registryCredentials/plant/password", json.Number("918273645")})
	err := ValidateContent(content, false)
	assertField(t, err, "content.modulesContent.$edgeAgent.properties.desired.runtime.settings.registryCredentials.plant.password", "must be a string; got a number")
	if strings.Contains(err.Error(), "918273645") {
		t.Errorf("the error shows the password: %v", err)
	}
}

// TestRedaction_EverySpelling: every secret name of the list (issue 13's
// and the earlier ones) and every connection string, in module env, Docker
// create options and module twins, is accepted and hidden by
// RedactContent; every manifest key spelled with another case is refused,
// naming its path, without showing the secret, and hidden whole.
func TestRedaction_EverySpelling(t *testing.T) {
	content := secrettest.Manifest([]string{"/bin/true"}, secrettest.Secrets())
	if err := ValidateContent(content, false); err != nil {
		t.Fatalf("manifest of secrets refused: %v", err)
	}
	red := RedactContent(content)
	if strings.Contains(string(red), secrettest.Marker) {
		t.Errorf("secrets shown: %s", red)
	}
	if err := ValidateContent(red, false); err != nil {
		t.Errorf("redacted manifest refused: %v", err)
	}
	for _, shown := range []string{`"LOG_LEVEL":{"value":"debug"}`, `"AUTHOR":{"value":"plant-team"}`, `OPTS_MODE=fast`, `"threshold":30`, `"mode":"fast"`, `"username":"deployer"`} {
		if !strings.Contains(string(red), shown) {
			t.Errorf("%s not shown: %s", shown, red)
		}
	}
	for _, r := range secrettest.Refusals([]string{"/bin/true"}) {
		t.Run(r.Name, func(t *testing.T) {
			err := ValidateContent(r.Content, false)
			assertField(t, err, r.Field, "only by case")
			if strings.Contains(err.Error(), secrettest.Marker) {
				t.Errorf("the error shows the secret: %v", err)
			}
			if red := RedactContent(r.Content); strings.Contains(string(red), secrettest.Marker) {
				t.Errorf("RedactContent shows the secret: %s", red)
			}
		})
	}
}
