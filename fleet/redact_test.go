package fleet

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

func TestIsSecretName(t *testing.T) {
	tests := []struct {
		name   string
		secret bool
	}{
		{"PASSWORD", true},
		{"CONTAINER_REGISTRY_PASSWORD", true},
		{"db_password", true},
		{"AdminPassword", true},
		{"PASSWD", true},
		{"INFLUX_ADMIN_PASS", true},
		{"MYSQL_PWD", true},
		{"CLIENT_SECRET", true},
		{"clientSecret", true},
		{"GITHUB_TOKEN", true},
		{"SasToken", true},
		{"API_KEY", true},
		{"api-key", true},
		{"ApiKey", true},
		{"APIKey", true},
		{"APIKEY", true},
		{"apikey", true},
		{"LogAnalyticsSharedKey", true},
		{"PRIMARY_KEY", true},
		{"KEY", true},
		{"ENCRYPTION_KEYS", true},
		{"IOTHUB_CONNECTION_STRING", true},
		{"DeviceConnectionString", true},
		{"AWS_CREDENTIALS", true},
		{"GF_SECURITY_ADMIN_PASSWORD", true},
		{"MONKEY", false},
		{"KEYBOARD_LAYOUT", false},
		{"BYPASS_PROXY", false},
		{"PASSPORT_ID", false},
		{"LogAnalyticsWorkspaceId", false},
		{"USERNAME", false},
		{"REGISTRY_PROXY_REMOTEURL", false},
		{"TemperatureThreshold", false},
		{"", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsSecretName(tc.name); got != tc.secret {
				t.Errorf("IsSecretName(%q) = %v; want %v", tc.name, got, tc.secret)
			}
		})
	}
}

func TestRedactContent(t *testing.T) {
	tests := []struct {
		name, in, want string // want "" means unchanged
	}{
		{"registry password",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"u","password":"p1","address":"r"},"b":{"password":""}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"u","password":"<redacted>","address":"r"},"b":{"password":"<redacted>"}}}}}}}}`},
		{"other credential members",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"Username":"u","Password":"p1","address":"r","token":{"x":1}}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"Username":"u","Password":"<redacted>","address":"r","token":"<redacted>"}}}}}}}}`},
		{"layered credential",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.acr":{"username":"u","password":"p1","address":"r"}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.acr":{"username":"u","password":"<redacted>","address":"r"}}}}`},
		{"layered credentials",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings":{"registryCredentials":{"my.acr":{"password":"p1"}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings":{"registryCredentials":{"my.acr":{"password":"<redacted>"}}}}}}`},
		{"layered credential with a dotted name",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.my.acr":{"username":"u","password":"p1"}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.my.acr":"<redacted>"}}}`},
		{"layered password",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.acr.password":"p1"}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.runtime.settings.registryCredentials.acr.password":"<redacted>"}}}`},
		{"env",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"API_KEY":{"value":"k"},"PORT":{"value":80},"DB_PASSWORD":{"value":1234},"TOKEN":{"value":true}}}},"systemModules":{"edgeHub":{"env":{"SslKey":{"value":"x"},"RuntimeLogLevel":{"value":"info"}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"API_KEY":{"value":"<redacted>"},"PORT":{"value":80},"DB_PASSWORD":{"value":"<redacted>"},"TOKEN":{"value":"<redacted>"}}}},"systemModules":{"edgeHub":{"env":{"SslKey":{"value":"<redacted>"},"RuntimeLogLevel":{"value":"info"}}}}}}}}`},
		{"layered env",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.env.API_KEY":{"value":"k"},"properties.desired.modules.n.env.SECRET.value":"s","properties.desired.modules.o.env":{"A_TOKEN":{"value":"t"}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.env.API_KEY":{"value":"<redacted>"},"properties.desired.modules.n.env.SECRET.value":"<redacted>","properties.desired.modules.o.env":{"A_TOKEN":{"value":"<redacted>"}}}}}`},
		{"malformed secret env entry",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"API_KEY":"k"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"API_KEY":"<redacted>"}}}}}}}`},
		{"createOptions Env",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"image":"i","createOptions":"{\"Env\":[\"GF_SECURITY_ADMIN_PASSWORD=pw\",\"GF_LOG=debug\",\"NOEQUALS_TOKEN\"],\"Hostname\":\"g\"}"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"image":"i","createOptions":"{\"Env\":[\"GF_SECURITY_ADMIN_PASSWORD=<redacted>\",\"GF_LOG=debug\",\"NOEQUALS_TOKEN=<redacted>\"],\"Hostname\":\"g\"}"}}}}}}}`},
		{"createOptions Env across chunks",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"DB_PASS","createOptions01":"WORD=pw\"]}","image":"i"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"DB_PASSWORD=<redacted>\"]}","image":"i"}}}}}}}`},
		{"createOptions Env across spellings",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"DB_PASS","createoptions01":"WORD=pw\"]}"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"DB_PASSWORD=<redacted>\"]}"}}}}}}}`},
		{"createOptions Env of a layered key",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings.createOptions":"{\"Env\":[\"A_KEY=k\"]}"}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings.createOptions":"{\"Env\":[\"A_KEY=<redacted>\"]}"}}}`},
		{"createOptions object",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"systemModules":{"edgeHub":{"settings":{"createOptions":{"Env":["A_KEY=k"]}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"systemModules":{"edgeHub":{"settings":{"createOptions":{"Env":["A_KEY=<redacted>"]}}}}}}}}`},
		{"deprecated moduleContent",
			`{"moduleContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"password":"p1"}}}}}}}}`,
			`{"moduleContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"password":"<redacted>"}}}}}}}}`},
		{"whole configuration",
			`{"id":"d","content":{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"password":"p1"}}}}}}}}}`,
			`{"id":"d","content":{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"password":"<redacted>"}}}}}}}}}`},
		{"HTML characters not escaped",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"<CR.Username>","password":"<CR.Password>","address":"a&b"}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"<CR.Username>","password":"<redacted>","address":"a&b"}}}}}}}}`},
		{"nothing secret", "{\n  \"modulesContent\": {\"$edgeAgent\": {\"properties.desired\": {\"modules\": {\"m\": {\"env\": {\"PORT\": {\"value\": 1}}}}}}}\n}", ""},
		{"other twins untouched", `{"modulesContent":{"m":{"properties.desired":{"password":"p","env":{"API_KEY":{"value":"k"}}}},"$edgeHub":{"properties.desired":{"password":"p"}}}}`, ""},
		{"not JSON", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"password":"p1"`, `"<redacted>"`},
		{"duplicate keys", `{"modulesContent":{},"modulesContent":{"$edgeAgent":{}}}`, `"<redacted>"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := json.RawMessage(tc.in)
			got := RedactContent(in)
			want := tc.want
			if want == "" {
				want = tc.in
			}
			if string(got) != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
			if string(in) != tc.in {
				t.Error("RedactContent changed its argument")
			}
			if again := RedactContent(got); !bytes.Equal(again, got) {
				t.Errorf("redacting twice changes the result: %s", again)
			}
		})
	}
}

// TestRedactContent_AzureManifests redacts every corpus manifest and
// expanded template: no registry password and no secret env value is left,
// and the result is still accepted.
func TestRedactContent_AzureManifests(t *testing.T) {
	for _, dir := range append(manifestDirs(), "testdata") {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			for _, path := range manifestFiles(t, dir) {
				name := filepath.Base(path)
				t.Run(name, func(t *testing.T) {
					data := readFile(t, path)
					var content json.RawMessage
					if strings.Contains(name, ".template.") {
						names, err := TemplatePlaceholders(data)
						if err != nil {
							t.Fatal(err)
						}
						content = expandAzureTemplate(t, data, templateEnv(names))
					} else {
						var err error
						if content, err = ParseContentFile(data); err != nil {
							t.Fatal(err)
						}
					}
					red := RedactContent(content)
					if bytes.Contains(red, []byte("s3cret")) {
						t.Errorf("a secret placeholder value survived: %s", red)
					}
					secrets := checkRedacted(t, red)
					if bytes.Equal(red, content) != (secrets == 0) {
						t.Errorf("%d secrets redacted, but content changed: %v", secrets, !bytes.Equal(red, content))
					}
					t.Logf("%d secrets redacted", secrets)
					layered := corpusExpect[name].layered
					if ValidateContent(content, layered) == nil {
						if err := ValidateContent(red, layered); err != nil {
							t.Errorf("redacted content rejected: %v", err)
						}
					}
				})
			}
		})
	}
}

// checkRedacted fails t if a registry password or a secret env value is
// shown in a standard content, and returns how many secrets it found
// redacted.
func checkRedacted(t *testing.T, content []byte) int {
	t.Helper()
	var doc struct {
		ModulesContent struct {
			Agent map[string]json.RawMessage `json:"$edgeAgent"`
		} `json:"modulesContent"`
	}
	if err := json.Unmarshal(content, &doc); err != nil {
		t.Fatal(err)
	}
	var desired struct {
		Runtime struct {
			Settings struct {
				RegistryCredentials map[string]struct {
					Password string `json:"password"`
				} `json:"registryCredentials"`
			} `json:"settings"`
		} `json:"runtime"`
		Modules       map[string]redactModule `json:"modules"`
		SystemModules map[string]redactModule `json:"systemModules"`
	}
	n := 0
	raw, ok := doc.ModulesContent.Agent["properties.desired"]
	if !ok {
		return strings.Count(string(content), Redacted) // layered: counted only
	}
	if err := json.Unmarshal(raw, &desired); err != nil {
		t.Fatal(err)
	}
	for name, c := range desired.Runtime.Settings.RegistryCredentials {
		if c.Password != Redacted {
			t.Errorf("registry %s: password %q shown", name, c.Password)
		}
		n++
	}
	for name, m := range mergeModules(desired.Modules, desired.SystemModules) {
		for env, v := range m.Env {
			if IsSecretName(env) {
				if v.Value != Redacted {
					t.Errorf("module %s: env %s = %v shown", name, env, v.Value)
				}
				n++
			} else if v.Value == Redacted {
				t.Errorf("module %s: env %s redacted", name, env)
			}
		}
		var text string
		for i := 0; ; i++ {
			c, ok := m.Settings["createOptions"+chunkSuffix(i)].(string)
			if !ok {
				break
			}
			text += c
		}
		if text == "" {
			continue
		}
		var opts struct{ Env []string }
		if err := json.Unmarshal([]byte(text), &opts); err != nil {
			t.Fatalf("module %s: createOptions: %v", name, err)
		}
		for _, e := range opts.Env {
			k, v, _ := strings.Cut(e, "=")
			if IsSecretName(k) {
				if v != Redacted {
					t.Errorf("module %s: createOptions Env %s shown", name, e)
				}
				n++
			}
		}
	}
	return n
}

type redactModule struct {
	Env map[string]struct {
		Value any `json:"value"`
	} `json:"env"`
	Settings map[string]any `json:"settings"`
}

func mergeModules(a, b map[string]redactModule) map[string]redactModule {
	out := map[string]redactModule{}
	for k, v := range a {
		out["modules."+k] = v
	}
	for k, v := range b {
		out["systemModules."+k] = v
	}
	return out
}

// TestRedactContent_Counts pins what the corpus holds, so that a file that
// stops being redacted is noticed.
func TestRedactContent_Counts(t *testing.T) {
	data := readFile(t, "testdata/process_module.json")
	red := RedactContent(data)
	for _, secret := range []string{"hunter2", "k-123", "p4ss", "adm1n"} {
		if bytes.Contains(red, []byte(secret)) {
			t.Errorf("%s shown: %s", secret, red)
		}
	}
	for _, shown := range []string{"deployer", "HISTORIAN_PORT=9000", `"LOG_LEVEL":{"value":"info"}`, `"RETENTION_DAYS":{"value":30}`, "/var/lib/historian:/data"} {
		if !bytes.Contains(red, []byte(shown)) {
			t.Errorf("%s not shown: %s", shown, red)
		}
	}
	if n := checkRedacted(t, red); n != 4 {
		t.Errorf("%d secrets redacted; want 4", n)
	}
}

func TestDeploymentPublic_RedactsContent(t *testing.T) {
	d := Deployment{ID: "d", Content: readFile(t, "testdata/process_module.json")}
	if p := d.Public(); bytes.Contains(p.Content, []byte("hunter2")) {
		t.Errorf("Public shows the registry password")
	}
}
