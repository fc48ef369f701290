package fleet

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func lookupIn(vars map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
}

func TestExpandTemplate(t *testing.T) {
	vars := map[string]string{
		"REG":                         "myacr.azurecr.io",
		"PW":                          `p"a\ss`,
		"EMPTY":                       "",
		"MODULES.filter.debug":        "myacr.azurecr.io/filter:0.0.1-amd64.debug",
		"MODULEDIR<./modules/x>.arm":  "myacr.azurecr.io/x:arm",
		"lower":                       "l",
		"EDGEAGENT_SCHEMA_VERSION":    "1.1",
		"CONTAINER_REGISTRY_PASSWORD": "s3cret",
	}
	tests := []struct {
		name, in, want string
	}{
		{"braces in a value", `{"a": "${REG}/img:1"}`, `{"a": "myacr.azurecr.io/img:1"}`},
		{"braces in a key", `{"${REG}": {"${REG}": 1}}`, `{"myacr.azurecr.io": {"myacr.azurecr.io": 1}}`},
		{"bare in a value", `{"a": "$REG/img", "b": ["$REG"]}`, `{"a": "myacr.azurecr.io/img", "b": ["myacr.azurecr.io"]}`},
		{"bare in a key is not a placeholder", `{"$REG": "x"}`, `{"$REG": "x"}`},
		{"value escaped", `{"a": "${PW}", "b": "$PW"}`, `{"a": "p\"a\\ss", "b": "p\"a\\ss"}`},
		{"empty value", `{"a": "<${EMPTY}>"}`, `{"a": "<>"}`},
		{"iotedgedev module image", `{"image": "${MODULES.filter.debug}"}`, `{"image": "myacr.azurecr.io/filter:0.0.1-amd64.debug"}`},
		{"iotedgedev module dir", `{"image": "${MODULEDIR<./modules/x>.arm}"}`, `{"image": "myacr.azurecr.io/x:arm"}`},
		{"lower-case braces", `{"a": "${lower}"}`, `{"a": "l"}`},
		{"azure words", `{"$edgeAgent": {"r": "FROM /* WHERE $connectionDeviceId = 'x' INTO $upstream", "v": "$version $body.x $iothub-enqueuedtime $edgeHub/x"}, "$schema-template": "4.0.0"}`, ""},
		{"mixed case is not a placeholder", `{"a": "$Reg $REGx $REG_x"}`, ""},
		{"bare ends at a non-word", `{"a": "$REG-x $REG.y $REG/z"}`, `{"a": "myacr.azurecr.io-x myacr.azurecr.io.y myacr.azurecr.io/z"}`},
		{"digit after the dollar", `{"a": "$1 $9REG"}`, ""},
		{"lone dollars", `{"a": "$", "b": "$$", "c": "a$ ", "d": "${", "e": "${}", "f": "$}"}`, ""},
		{"double dollar before a placeholder", `{"a": "$$REG"}`, `{"a": "$myacr.azurecr.io"}`},
		{"not a brace name", `{"a": "${REG-x}", "b": "${REG x}", "c": "${1X}", "d": "${HOME:-/root}"}`, ""},
		{"escaped dollar", `{"a": "\u0024{REG} \u0024REG"}`, ""},
		{"escapes kept", `{"a": "x\"$REG\"\\${REG}\n"}`, `{"a": "x\"myacr.azurecr.io\"\\myacr.azurecr.io\n"}`},
		{"numbers and literals kept", "{\n\t\"n\": 1.5e3, \"t\": true, \"z\": null, \"s\": \"${REG}\"\n}\n", "{\n\t\"n\": 1.5e3, \"t\": true, \"z\": null, \"s\": \"myacr.azurecr.io\"\n}\n"},
		{"byte order mark dropped", "\xef\xbb\xbf{\"a\": \"$REG\"}", `{"a": "myacr.azurecr.io"}`},
		{"not an object", `"${REG}"`, `"myacr.azurecr.io"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.want
			if want == "" {
				want = tc.in
			}
			got, err := ExpandTemplate([]byte(tc.in), lookupIn(vars))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
			if !json.Valid(got) {
				t.Errorf("result is not JSON")
			}
		})
	}
}

func TestExpandTemplate_Errors(t *testing.T) {
	vars := map[string]string{"REG": "r"}
	tests := []struct {
		name, in         string
		placeholder      string // as written, for a *PlaceholderError
		line             int
		field, msgSubstr string // for a *ValidationError
	}{
		{"missing braces", "{\n  \"a\": \"${REG}\",\n  \"b\": \"${CONTAINER_REGISTRY_PASSWORD}\"\n}", "${CONTAINER_REGISTRY_PASSWORD}", 3, "", ""},
		{"missing bare", "{\"a\": [\n\"$REG\",\n\n\"$CONTAINER_REGISTRY_PASSWORD\"]}", "$CONTAINER_REGISTRY_PASSWORD", 4, "", ""},
		{"first missing in document order", "{\"z\": \"${B}\",\n \"a\": \"${A}\"}", "${B}", 1, "", ""},
		{"missing in a key", "{\n\"${GROUP}\": {}}", "${GROUP}", 2, "", ""},
		{"missing module image", `{"image": "${MODULES.filter}"}`, "${MODULES.filter}", 1, "", ""},
		{"not JSON", "{\n  \"a\": \"${REG}\"\n  \"b\": 1\n}", "", 0, "", "invalid JSON at line 3, column 3"},
		{"empty", "", "", 0, "", "invalid JSON"},
		{"duplicate key", "{\"modulesContent\": {\"$edgeAgent\": {\"properties.desired\": {\"modules\": {\"${M}\": {}, \"${M}\": {}}}}}}", "", 0, "modulesContent.$edgeAgent.properties.desired.modules.${M}", `duplicate key "${M}"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ExpandTemplate([]byte(tc.in), lookupIn(vars))
			if tc.placeholder == "" {
				assertField(t, err, tc.field, tc.msgSubstr)
				return
			}
			var pe *PlaceholderError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v (%T) is not a *PlaceholderError", err, err)
			}
			if pe.Placeholder != tc.placeholder || pe.Line != tc.line {
				t.Errorf("got %s at line %d; want %s at line %d", pe.Placeholder, pe.Line, tc.placeholder, tc.line)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Error("does not match ErrInvalid")
			}
		})
	}
	var pe *PlaceholderError
	_, err := ExpandTemplate([]byte(`{"a": "${CONTAINER_REGISTRY_PASSWORD}"}`), nil)
	if !errors.As(err, &pe) || err.Error() != "unresolved placeholder ${CONTAINER_REGISTRY_PASSWORD} (line 1)" || pe.Name != "CONTAINER_REGISTRY_PASSWORD" {
		t.Errorf("nil lookup: %v", err)
	}
}

func TestTemplatePlaceholders(t *testing.T) {
	data := readFile(t, "testdata/azure/Azure_iotedgedev__iotedgedev__template__deployment.template.json")
	got, err := TemplatePlaceholders(data)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"EDGEAGENT_SCHEMA_VERSION", "EDGE_RUNTIME_VERSION", "EDGEHUB_SCHEMA_VERSION"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("got %v; want %v", got, want)
	}
}

// templateEnv gives every placeholder a value that makes the manifest
// valid: schema versions, and otherwise a token without spaces. Secret
// names get values starting with "s3cret-" for the redaction tests.
func templateEnv(names []string) map[string]string {
	vars := map[string]string{}
	clean := strings.NewReplacer("<", "", ">", "", "/", "_", " ", "_")
	for _, n := range names {
		switch {
		case strings.Contains(n, "SCHEMA_VERSION"):
			vars[n] = "1.1"
		case IsSecretName(n):
			vars[n] = "s3cret-" + clean.Replace(strings.ToLower(n))
		default:
			vars[n] = "v-" + clean.Replace(strings.ToLower(n))
		}
	}
	return vars
}

// placeholderLine is the first line of a template where the placeholder
// for name is written, found without ExpandTemplate's scanner.
func placeholderLine(t *testing.T, data []byte, name string) int {
	t.Helper()
	q := regexp.QuoteMeta(name)
	re := regexp.MustCompile(`\$\{` + q + `\}|\$` + q + `(?:[^A-Za-z0-9_]|$)`)
	for i, line := range strings.Split(string(data), "\n") {
		if re.MatchString(line) {
			return i + 1
		}
	}
	t.Fatalf("placeholder %s not found", name)
	return 0
}

// expandAzureTemplate runs a corpus template through the whole pipeline:
// ParseContentFile, ExpandTemplate, NormalizeCreateOptions.
func expandAzureTemplate(t *testing.T, data []byte, vars map[string]string) json.RawMessage {
	t.Helper()
	content, err := ParseContentFile(data)
	if err != nil {
		t.Fatalf("ParseContentFile: %v", err)
	}
	content, err = ExpandTemplate(content, lookupIn(vars))
	if err != nil {
		t.Fatalf("ExpandTemplate: %v", err)
	}
	content, err = NormalizeCreateOptions(content)
	if err != nil {
		t.Fatalf("NormalizeCreateOptions: %v", err)
	}
	return content
}

func TestExpandTemplate_AzureTemplates(t *testing.T) {
	azureWord := regexp.MustCompile(`\$(edgeAgent|edgeHub|upstream|schema-template)\b`)
	for _, dir := range manifestDirs() {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			for _, path := range manifestFiles(t, dir) {
				name := filepath.Base(path)
				if !strings.Contains(name, ".template.") {
					continue
				}
				t.Run(name, func(t *testing.T) {
					data := readFile(t, path)
					names, err := TemplatePlaceholders(data)
					if err != nil {
						t.Fatal(err)
					}
					vars := templateEnv(names)
					content := expandAzureTemplate(t, data, vars)
					if err := ValidateContent(content, false); err != nil {
						t.Fatalf("expanded template rejected: %v", err)
					}
					// The CLI's order (expand the file, then parse) gives the same content.
					expanded, err := ExpandTemplate(data, lookupIn(vars))
					if err != nil {
						t.Fatal(err)
					}
					if n := len(azureWord.FindAll(expanded, -1)); n != len(azureWord.FindAll(data, -1)) {
						t.Errorf("expansion changed Azure's $ words")
					}
					c2, err := ParseContentFile(expanded)
					if err != nil {
						t.Fatal(err)
					}
					if c2, err = NormalizeCreateOptions(c2); err != nil {
						t.Fatal(err)
					}
					if !jsonEqual(t, c2, content) {
						t.Errorf("expanding before parsing gives other content")
					}
					// Each placeholder, left out, is the one reported, at its line.
					for _, missing := range names {
						without := templateEnv(names)
						delete(without, missing)
						_, err := ExpandTemplate(data, lookupIn(without))
						var pe *PlaceholderError
						if !errors.As(err, &pe) {
							t.Fatalf("without %s: %v", missing, err)
						}
						if pe.Name != missing || pe.Line != placeholderLine(t, data, missing) {
							t.Errorf("without %s: got %v", missing, err)
						}
					}
					if len(names) > 0 {
						_, err := ExpandTemplate(data, nil)
						var pe *PlaceholderError
						if !errors.As(err, &pe) || pe.Name != names[0] {
							t.Errorf("with no variables: %v; want %s", err, names[0])
						}
					}
				})
			}
		})
	}
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatal(err)
	}
	xs, _ := json.Marshal(x)
	ys, _ := json.Marshal(y)
	return bytes.Equal(xs, ys)
}

func TestParseEnvFile(t *testing.T) {
	tests := []struct {
		name, in string
		want     map[string]string
		msg      string // error message part, when an error is expected
	}{
		{"iotedgedev", `#
# CONTAINER REGISTRY
#

CONTAINER_REGISTRY_SERVER="localhost:5000"
CONTAINER_REGISTRY_USERNAME=""
CONTAINER_REGISTRY_PASSWORD=
EDGE_RUNTIME_VERSION="1.4"
EDGEAGENT_SCHEMA_VERSION=1.1
`, map[string]string{"CONTAINER_REGISTRY_SERVER": "localhost:5000", "CONTAINER_REGISTRY_USERNAME": "", "CONTAINER_REGISTRY_PASSWORD": "", "EDGE_RUNTIME_VERSION": "1.4", "EDGEAGENT_SCHEMA_VERSION": "1.1"}, ""},
		{"spaces and export", "  export A = b c  \nB\t=\t'x y'\n", map[string]string{"A": "b c", "B": "x y"}, ""},
		{"comments", "A=b # note\nB='c # d' # note\nC=e#f\nD=\"g\"\t# note\n", map[string]string{"A": "b", "B": "c # d", "C": "e#f", "D": "g"}, ""},
		{"double-quote escapes", `A="a\"b\\c\nd\te\x"`, map[string]string{"A": "a\"b\\c\nd\te\\x"}, ""},
		{"single quotes literal", `A='a\nb"c'`, map[string]string{"A": `a\nb"c`}, ""},
		{"equals in value", "URL=https://h/?a=b&c=d\n", map[string]string{"URL": "https://h/?a=b&c=d"}, ""},
		{"dotted key", "MODULES.filter=myacr/filter:1\nMODULEDIR<./x>.debug=y\n", map[string]string{"MODULES.filter": "myacr/filter:1", "MODULEDIR<./x>.debug": "y"}, ""},
		{"set twice", "A=1\n# again\nexport A=2\n", nil, "line 3: A is already set on line 1"},
		{"CRLF and BOM", "\xef\xbb\xbfA=1\r\nB=\"2\"\r\n", map[string]string{"A": "1", "B": "2"}, ""},
		{"placeholders stay", "A=${B}\n", map[string]string{"A": "${B}"}, ""},
		{"empty", "", map[string]string{}, ""},
		{"no equals", "A=1\nJUSTAWORD\n", nil, "line 2: expected KEY=value"},
		{"bad name", "\n\n1A=x\n", nil, `line 3: "1A" is not a variable name`},
		{"empty name", "=x\n", nil, "line 1"},
		{"unterminated quote", "A=\"abc\n", nil, "line 1: A: missing closing \""},
		{"text after quote", "A='abc' d\n", nil, `line 1: A: unexpected "d" after the closing quote`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseEnvFile([]byte(tc.in))
			if tc.msg != "" {
				assertField(t, err, "", tc.msg)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Errorf("got %q; want %q", got, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s = %q; want %q", k, got[k], v)
				}
			}
		})
	}
}

func TestNormalizeCreateOptions(t *testing.T) {
	long := strings.Repeat("x", 1100)
	longJSON := `{"Hostname":"` + long + `"}`
	tests := []struct {
		name, in string
		want     string // "" when in must come back unchanged
		field    string // for an error
	}{
		{"iotedgedev edgeHub",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"systemModules":{"edgeHub":{"settings":{"image":"h","createOptions":{"HostConfig":{"PortBindings":{"5671/tcp":[{"HostPort":"5671"}],"8883/tcp":[{"HostPort":"8883"}],"443/tcp":[{"HostPort":"443"}]}}}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"systemModules":{"edgeHub":{"settings":{"image":"h","createOptions":"{\"HostConfig\":{\"PortBindings\":{\"5671/tcp\":[{\"HostPort\":\"5671\"}],\"8883/tcp\":[{\"HostPort\":\"8883\"}],\"443/tcp\":[{\"HostPort\":\"443\"}]}}}"}}}}}}}`, ""},
		{"empty object",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":{}}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{}"}}}}}}}`, ""},
		{"order, numbers and non-ASCII as iotedgedev writes them",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":{"z":1.50,"a":"é😀<&>","m":[true,null]},"image":"i"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"z\":1.50,\"a\":\"\\u00e9\\ud83d\\ude00<&>\",\"m\":[true,null]}","image":"i"}}}}}}}`, ""},
		{"chunked",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":` + longJSON + `,"image":"i"}}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":"{\"Hostname\":\"` + long[:512-13] + `","createOptions01":"` + long[512-13:1024-13] + `","createOptions02":"` + long[1024-13:] + `\"}","image":"i"}}}}}}}`, ""},
		{"layered key",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings.createOptions":{"a":1},"properties.desired.modules.n":{"settings":{"createoptions":{"b":2}}}}}}`,
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.m.settings.createOptions":"{\"a\":1}","properties.desired.modules.n":{"settings":{"createoptions":"{\"b\":2}"}}}}}`, ""},
		{"strings unchanged", "{\"modulesContent\": {\"$edgeAgent\": {\"properties.desired\": {\"modules\": {\"m\": {\"settings\": {\"createOptions\": \"{}\"}}}}}}}\n", "", ""},
		{"outside modules unchanged", `{"modulesContent":{"$edgeAgent":{"properties.desired":{"createOptions":{}}},"m":{"properties.desired":{"settings":{"createOptions":{}}}}}}`, "", ""},
		{"object beside chunks",
			`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"settings":{"createOptions":{},"createOptions01":"x"}}}}}}}`,
			"", "content.modulesContent.$edgeAgent.properties.desired.modules.m.settings.createOptions01"},
		{"not JSON", `{"modulesContent":`, "", "content"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NormalizeCreateOptions(json.RawMessage(tc.in))
			if tc.field != "" {
				assertField(t, err, tc.field, "")
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := tc.want
			if want == "" {
				want = tc.in
			}
			if string(got) != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
		})
	}
}

// TestNormalizeCreateOptions_Chunks checks that chunks join back to the
// options and pass validation, at the chunk-size boundaries.
func TestNormalizeCreateOptions_Chunks(t *testing.T) {
	for _, n := range []int{0, 1, 497, 498, 499, 1010, 1011, 5000} {
		opts := `{"Hostname":"` + strings.Repeat("y", n) + `"}`
		content := `{"modulesContent":{"$edgeAgent":{"properties.desired":{"schemaVersion":"1.1","runtime":{"type":"docker","settings":{}},` +
			`"systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"a"}},"edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"h"}}},` +
			`"modules":{"m":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"i","createOptions":` + opts + `}}}}},` +
			`"$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{}}}}}`
		got, err := NormalizeCreateOptions(json.RawMessage(content))
		if err != nil {
			t.Fatal(err)
		}
		if err := ValidateContent(got, false); err != nil {
			t.Fatalf("%d: %v", n, err)
		}
		var doc struct {
			ModulesContent struct {
				Agent struct {
					Desired struct {
						Modules map[string]struct {
							Settings map[string]string `json:"settings"`
						} `json:"modules"`
					} `json:"properties.desired"`
				} `json:"$edgeAgent"`
			} `json:"modulesContent"`
		}
		if err := json.Unmarshal(got, &doc); err != nil {
			t.Fatal(err)
		}
		s := doc.ModulesContent.Agent.Desired.Modules["m"].Settings
		var joined strings.Builder
		for i := 0; ; i++ {
			c, ok := s["createOptions"+chunkSuffix(i)]
			if !ok {
				if want := (len(opts) + 511) / 512; i != want {
					t.Errorf("%d: %d chunks; want %d", n, i, want)
				}
				break
			}
			if len(c) > 512 {
				t.Errorf("%d: chunk %d has %d bytes", n, i, len(c))
			}
			joined.WriteString(c)
		}
		if joined.String() != opts {
			t.Errorf("%d: chunks join to %q", n, joined.String())
		}
	}
}

func FuzzExpandTemplate(f *testing.F) {
	for _, dir := range []string{"testdata/azure", "testdata"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
		for _, path := range files {
			data, err := os.ReadFile(path)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Every placeholder resolves: the result is JSON and has none left.
		const value = `v"\`
		out, err := ExpandTemplate(data, func(string) (string, bool) { return value, true })
		if err != nil {
			var pe *PlaceholderError
			if errors.As(err, &pe) {
				t.Fatalf("placeholder error with every name defined: %v", err)
			}
			if _, perr := parseJSON(bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")), ""); perr == nil {
				t.Fatalf("valid JSON without duplicate keys refused: %v", err)
			}
			return
		}
		if !json.Valid(out) {
			t.Fatalf("expansion is not JSON: %q", out)
		}
		if names, err := TemplatePlaceholders(out); err != nil || len(names) > 0 {
			t.Fatalf("expansion still has placeholders %v (%v): %q", names, err, out)
		}
		// No placeholder resolves: either nothing changed or the first
		// placeholder is reported.
		out, err = ExpandTemplate(data, nil)
		names, _ := TemplatePlaceholders(data)
		switch {
		case err == nil:
			if len(names) > 0 || !bytes.Equal(out, bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))) {
				t.Fatalf("no placeholder resolved yet the document changed")
			}
		default:
			var pe *PlaceholderError
			if !errors.As(err, &pe) || len(names) == 0 || pe.Name != names[0] {
				t.Fatalf("got %v; placeholders %v", err, names)
			}
		}
	})
}
