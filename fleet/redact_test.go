package fleet

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"slices"
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
		// The names issue 13 added.
		{"AUTH", true},
		{"BASIC_AUTH", true},
		{"mqttAuth", true},
		{"OAuth", true},
		{"AUTHORIZATION_HEADER", true},
		{"CERT", true},
		{"TLS_CERT_FILE", true},
		{"clientCertificate", true},
		{"COOKIE", true},
		{"SessionCookieName", true},
		{"DATABASE_URL", true},
		{"databaseUrl", true},
		{"DATABASE_URI", true},
		{"GITHUB_PAT", true},
		{"AdoPat", true},
		{"PAT", true},
		{"HMAC", true},
		{"HmacSha256", true},
		{"JWT", true},
		{"JWT_ISSUER", true},
		{"SAS", true},
		{"BLOB_SAS_URL", true},
		{"BlobSasUrl", true},
		{"SESSION", true},
		{"SESSION_ID", true},
		{"PASSPHRASE", true},
		{"keyPassphrase", true},
		{"AUTHOR", false},
		{"AUTHORS_FILE", false},
		{"PATH", false},
		{"PAT_COUNT", false},
		{"SPATIAL_INDEX", false},
		{"CONCERTO", false},
		{"KANSAS_CITY", false},
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

func TestIsSecretValue(t *testing.T) {
	tests := []struct {
		value  string
		secret bool
	}{
		{"HostName=hub.azure-devices.net;DeviceId=d1;SharedAccessKey=abc=", true},
		{"HostName=hub;DeviceId=d1;ModuleId=m;sharedaccesskey=abc", true},
		{"DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc;EndpointSuffix=core.windows.net", true},
		{"Server=db;Database=x;User Id=sa;Password=hunter2;", true},
		{"Driver={ODBC};Server=db;Uid=sa;Pwd=hunter2", true},
		{"SharedAccessSignature sr=hub%2Fdevices%2Fd1&sig=abc&se=1700000000", true},
		{"postgres://app:hunter2@db:5432/plant", true},
		{"amqps://user:p%40ss@broker.local", true},
		{"see mqtts://u:p@h and more", true},
		{"https://registry.local:5000/v2/", false},
		{"https://user@registry.local/", false},
		{"http://[::1]:8080/path?a=b@c", false},
		{"a@b:c", false},
		{"info", false},
		{"", false},
		{"PasswordPolicy", false},
	}
	for _, tc := range tests {
		if got := IsSecretValue(tc.value); got != tc.secret {
			t.Errorf("IsSecretValue(%q) = %v; want %v", tc.value, got, tc.secret)
		}
	}
}

func TestRedactModuleTwinDesired(t *testing.T) {
	tests := []struct{ in, want string }{
		{`{"threshold":30,"apiKey":"k","nested":{"Password":12,"list":[{"token":"t"},"x"],"conn":"Endpoint=sb://n/;SharedAccessKeyName=r;SharedAccessKey=k"},"credentials":{"user":"u","pass":"p","expires":null},"$version":4}`,
			`{"threshold":30,"apiKey":"<redacted>","nested":{"Password":"<redacted>","list":[{"token":"<redacted>"},"x"],"conn":"<redacted>"},"credentials":{"user":"<redacted>","pass":"<redacted>","expires":null},"$version":4}`},
		{`{"threshold": 30}`, ""},
		{`{"a":`, `"<redacted>"`},
		{`{"a":1,"a":2}`, `"<redacted>"`},
	}
	for _, tc := range tests {
		got := RedactModuleTwinDesired(json.RawMessage(tc.in))
		want := tc.want
		if want == "" {
			want = tc.in
		}
		if string(got) != want {
			t.Errorf("RedactModuleTwinDesired(%s)\n got  %s\n want %s", tc.in, got, want)
		}
		if again := RedactModuleTwinDesired(got); !bytes.Equal(again, got) {
			t.Errorf("redacting twice changes the result: %s", again)
		}
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
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"u","password":"p1","address":"r","token":{"x":1}}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"username":"u","password":"<redacted>","address":"r","token":"<redacted>"}}}}}}}}`},
		// Keys spelled with another case (refused by ValidateContent, but
		// perhaps stored by an earlier version): the agent's decoder reads
		// them as the schema's, so the content is hidden whole.
		{"credential Password", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"registryCredentials":{"a":{"Username":"u","Password":"p1"}}}}}}}}`, `"<redacted>"`},
		{"RegistryCredentials", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"runtime":{"settings":{"RegistryCredentials":{"a":{"password":"p1"}}}}}}}}`, `"<redacted>"`},
		{"module Env", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"Env":{"API_KEY":{"value":"k"}}}}}}}}`, `"<redacted>"`},
		{"Modules", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"Modules":{"m":{"env":{"API_KEY":{"value":"k"}}}}}}}}`, `"<redacted>"`},
		{"layered Modules", `{"modulesContent":{"$edgeAgent":{"properties.desired.Modules.m.env.API_KEY":{"value":"k"}}}}`, `"<redacted>"`},
		{"whole configuration with Env", `{"id":"d","content":{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"ENV":{"A_KEY":{"value":"k"}}}}}}}}}`, `"<redacted>"`},
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
		{"createOptions env of any case",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"env\":[\"A_TOKEN=t\"],\"ENV\":[\"DB_PASSWORD=p\"]}"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"env\":[\"A_TOKEN=<redacted>\"],\"ENV\":[\"DB_PASSWORD=<redacted>\"]}"}}}}}}}`},
		{"createOptions connection strings",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"HUB=HostName=h;DeviceId=d;SharedAccessKey=k\",\"MODE=fast\"],\"Cmd\":[\"--db\",\"Server=s;User Id=u;Password=p;\"],\"Labels\":{\"storage\":\"DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k\"}}"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":[\"HUB=<redacted>\",\"MODE=fast\"],\"Cmd\":[\"--db\",\"<redacted>\"],\"Labels\":{\"storage\":\"<redacted>\"}}"}}}}}}}`},
		{"createOptions Env a string",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":\"API_KEY=k\"}"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Env\":\"API_KEY=<redacted>\"}"}}}}}}}`},
		{"createOptions not JSON: chunks looked at one by one",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{Password=p","createOptions01":"x"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"<redacted>","createOptions01":"x"}}}}}}}`},
		{"env value connection string",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"IOTHUB_CS":{"value":"HostName=h;DeviceId=d;SharedAccessKey=k"},"DB":{"value":"postgres://app:pw@db:5432/x"},"SITE":{"value":"https://example.com/a"}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"env":{"IOTHUB_CS":{"value":"<redacted>"},"DB":{"value":"<redacted>"},"SITE":{"value":"https://example.com/a"}}}}}}}}`},
		{"module twins",
			`{"modulesContent":{"m":{"properties.desired":{"password":"p","env":{"API_KEY":{"value":"k"}},"threshold":30,"db":{"connection":"Server=s;Password=p","SessionTimeout":5,"hosts":["a","b"]},"jwtSigning":{"alg":"HS256","keys":[1,null]}}},"$edgeHub":{"properties.desired":{"password":"p"}}}}`,
			`{"modulesContent":{"m":{"properties.desired":{"password":"<redacted>","env":{"API_KEY":{"value":"<redacted>"}},"threshold":30,"db":{"connection":"<redacted>","SessionTimeout":"<redacted>","hosts":["a","b"]},"jwtSigning":{"alg":"<redacted>","keys":["<redacted>",null]}}},"$edgeHub":{"properties.desired":{"password":"p"}}}}`},
		{"layered module twin",
			`{"modulesContent":{"m":{"properties.desired.auth.user":"u","properties.desired.settings":{"apiKey":"k"},"properties.desired.x":"AccountKey=k"}}}`,
			`{"modulesContent":{"m":{"properties.desired.auth.user":"<redacted>","properties.desired.settings":{"apiKey":"<redacted>"},"properties.desired.x":"<redacted>"}}}`},
		{"nothing secret", "{\n  \"modulesContent\": {\"$edgeAgent\": {\"properties.desired\": {\"modules\": {\"m\": {\"env\": {\"PORT\": {\"value\": 1}}}}}}}\n}", ""},
		{"twin without secrets", `{"modulesContent":{"m":{"properties.desired":{"threshold":30,"Env":{"MODE":"x"}}},"$edgeHub":{"properties.desired":{"password":"p"}}}}`, ""},
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

// FuzzRedactModuleTwinDesired: whatever the properties, the result is JSON
// that redacting again leaves as it is; for properties that are JSON, it
// has the same shape, and no secret-named member nor connection string
// keeps a value.
func FuzzRedactModuleTwinDesired(f *testing.F) {
	f.Add([]byte(`{"threshold":30,"apiKey":"k","nested":{"list":[{"token":"t"},"Password=p"]}}`))
	f.Add([]byte(`{"a":1,"a":2}`))
	f.Add([]byte(`[{"SESSION":{"x":[true,null,1.5e3]}}]`))
	f.Fuzz(func(t *testing.T, in []byte) {
		out := RedactModuleTwinDesired(in)
		if !json.Valid(out) {
			t.Fatalf("not JSON: %q", out)
		}
		if again := RedactModuleTwinDesired(out); !bytes.Equal(again, out) {
			t.Fatalf("redacting twice changes %s into %s", out, again)
		}
		root, err := parseJSON(in, "")
		if err != nil {
			if string(out) != `"<redacted>"` {
				t.Fatalf("%q is not JSON, yet %s is shown", in, out)
			}
			return
		}
		red, err := parseJSON(out, "")
		if err != nil {
			t.Fatal(err)
		}
		var same func(a, b *jnode, secret bool)
		same = func(a, b *jnode, secret bool) {
			switch {
			case a.kind == jObject && b.kind == jObject && slices.Equal(a.keys, b.keys):
				for i, k := range a.keys {
					same(a.vals[i], b.vals[i], secret || IsSecretName(k))
				}
			case a.kind == jArray && b.kind == jArray && len(a.vals) == len(b.vals):
				for i := range a.vals {
					same(a.vals[i], b.vals[i], secret)
				}
			case a.kind == jNull && b.kind == jNull:
			case (secret || a.kind == jString && IsSecretValue(a.s)) && a.kind != jObject && a.kind != jArray:
				if b.kind != jString || b.s != Redacted {
					t.Fatalf("secret %s shown as %s", describe(a), describe(b))
				}
			default:
				if !bytes.Equal(a.encode(nil, false), b.encode(nil, false)) {
					t.Fatalf("%s changed into %s", a.encode(nil, false), b.encode(nil, false))
				}
			}
		}
		same(root, red, false)
	})
}
