//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"appliance/internal/testenv"
)

const corpusDir = "../../shared/corpus/azure-manifests"

func corpusFiles(t *testing.T) []string {
	t.Helper()
	testenv.Dir(t, corpusDir, "the shared corpus lies beside the clone (../shared), as CI lays it")
	files, err := filepath.Glob(filepath.Join(corpusDir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", corpusDir, err)
	}
	return files
}

var missingPlaceholder = regexp.MustCompile(`unresolved placeholder \$(?:\{([^}]+)\}|([A-Z_][A-Z0-9_]*))`)

// placeholderValue picks a value a real .env file would hold.
func placeholderValue(name string) string {
	switch {
	case strings.Contains(name, "EDGEAGENT_SCHEMA_VERSION"):
		return "1.1"
	case strings.Contains(name, "EDGEHUB_SCHEMA_VERSION"):
		return "1.2"
	case strings.Contains(name, "SCHEMA_VERSION"):
		return "1.0"
	}
	return "value-for-" + strings.ToLower(strings.ReplaceAll(name, "_", "-"))
}

// TestCLI_CorpusManifests sends every real manifest through the CLI as an
// Azure user would: plain ones as they are, templates with an env file that
// the test fills in one placeholder at a time (each failing run must name
// the first missing one), layered ones with --layered, and the malformed one
// is refused naming the field.
func TestCLI_CorpusManifests(t *testing.T) {
	files := corpusFiles(t)
	dir := t.TempDir()
	startServer(t, dir)
	for i, f := range files {
		name := filepath.Base(f)
		t.Run(name, func(t *testing.T) {
			id := "corpus-" + string(rune('a'+i))
			args := []string{"deployment", "create", id, "--content", f, "--target-condition", "*", "-o", "json"}
			layered := strings.Contains(name, "layered") || strings.Contains(name, "smoke_tests__edge_deployment_content")
			var r result
			switch {
			case strings.Contains(name, "malformed"):
				cli(t, dir, args...).mustFailWithOneLine(t, "content.modulesContent.$edgeAgent")
				return
			case strings.Contains(name, ".template."):
				envFile := filepath.Join(t.TempDir(), ".env")
				os.WriteFile(envFile, nil, 0o600)
				vars := map[string]string{}
				args = append(args, "--env-file", envFile)
				if layered {
					args = append(args, "--layered")
				}
				for range 50 {
					r = cli(t, dir, args...)
					if r.code == 0 {
						break
					}
					m := missingPlaceholder.FindStringSubmatch(r.stderr)
					if m == nil {
						t.Fatalf("template refused for another reason than a placeholder: %s", r.stderr)
					}
					r.mustFailWithOneLine(t, m[0])
					name := m[1] + m[2]
					if _, dup := vars[name]; dup {
						t.Fatalf("placeholder %s named again after it was given", name)
					}
					vars[name] = placeholderValue(name)
					var env strings.Builder
					for k, v := range vars {
						env.WriteString(k + "=" + v + "\n")
					}
					os.WriteFile(envFile, []byte(env.String()), 0o600)
				}
				data, _ := os.ReadFile(f)
				if len(vars) == 0 && strings.Contains(string(data), "${") {
					t.Fatalf("template with ${...} placeholders accepted with none given")
				}
			default:
				if layered {
					// Without --layered, layered content is refused and the
					// error says what to do.
					cli(t, dir, args...).mustFailWithOneLine(t, "--layered")
					args = append(args, "--layered")
				}
			}
			if r.stdout == "" {
				r = cli(t, dir, args...)
			}
			r.mustSucceed(t)
			var d struct {
				ID      string          `json:"id"`
				Content json.RawMessage `json:"content"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &d); err != nil || d.ID != id {
				t.Fatalf("create output is not the deployment: %v\n%s", err, r.stdout)
			}
			show := cli(t, dir, "deployment", "show", id, "-o", "json").mustSucceed(t)
			for _, secret := range []string{`"password": "password"`, `"password":"password"`, "value-for-container-registry-password"} {
				if strings.Contains(show.stdout, secret) {
					t.Fatalf("deployment show reveals a registry password:\n%s", show.stdout)
				}
			}
		})
	}
}
