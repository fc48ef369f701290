package agent

import (
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/moby/moby/api/types/container"

	"appliance/fleet"
	"appliance/internal/secrettest"
)

// What the agent runs and what a reader is shown must be the same object:
// every value the agent gives a module (an env variable, a Docker create
// option, a command argument, a registry credential) is either shown as
// it is, or, if it is a secret, shown as "<redacted>" at the same place.
// The checks below build the plan of a desired document twice, from the
// document the device gets and from what fleet.RedactContent shows of it
// (what the API, the CLI and the dashboard show), and compare what each
// plan would run, field by field, through the same decoders the runtimes
// use. Before manifest keys were matched exactly, an "Env" beside "env",
// or {"env": [...]} in createOptions, ran secrets the redactor never saw.

// checkRunsWhatIsShown fails t if the agent would run content with a
// secret that the redacted content shows, or anything that differs from
// it other than by redaction. It returns false if the agent refuses the
// content.
func checkRunsWhatIsShown(t *testing.T, modulesContent json.RawMessage) bool {
	t.Helper()
	run, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: modulesContent})
	if err != nil {
		return false // refused: nothing of it runs
	}
	if run.deploymentID == "" {
		return true // the explicit empty state: nothing runs
	}
	wrapped := append(append([]byte(`{"modulesContent":`), modulesContent...), '}')
	var red struct {
		ModulesContent json.RawMessage `json:"modulesContent"`
	}
	shown := fleet.RedactContent(wrapped)
	if err := json.Unmarshal(shown, &red); err != nil || len(red.ModulesContent) == 0 {
		t.Fatalf("the agent runs content that reads show only as %s", shown)
	}
	view, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: red.ModulesContent})
	if err != nil {
		t.Fatalf("the agent runs content whose redacted form it refuses: %v\n%s", err, shown)
	}

	if !slices.Equal(sortedKeys(run.modules), sortedKeys(view.modules)) {
		t.Fatalf("the agent runs modules %v; reads show %v", sortedKeys(run.modules), sortedKeys(view.modules))
	}
	for name, m := range run.modules {
		v := view.modules[name]
		where := "module " + name
		compareEnv(t, where+" env", envList("dev", m), envList("dev", v))
		compareStrings(t, where+" command", m.Command, v.Command)
		compareStrings(t, where+" settings", []string{m.Type, m.Image, m.WorkingDir, m.Version, m.Status, m.RestartPolicy, m.ImagePullPolicy},
			[]string{v.Type, v.Image, v.WorkingDir, v.Version, v.Status, v.RestartPolicy, v.ImagePullPolicy})
		if m.Type != fleet.ModuleTypeDocker {
			continue
		}
		// What the docker runtime sends the engine: the decoded create
		// options, with the module's env merged in.
		rreq, rerr := decodeCreateOptions(m.CreateOptions)
		vreq, verr := decodeCreateOptions(v.CreateOptions)
		if (rerr == nil) != (verr == nil) {
			t.Fatalf("%s createOptions: the agent decodes them with %v; what reads show with %v", where, rerr, verr)
		}
		if rerr != nil {
			continue // the module fails to be created: nothing runs
		}
		compareEnv(t, where+" createOptions Env", mergeEnv(rreq.Config.Env, envList("dev", m)), mergeEnv(vreq.Config.Env, envList("dev", v)))
		rreq.Config.Env, vreq.Config.Env = nil, nil
		compareJSON(t, where+" createOptions", toGeneric(t, rreq), toGeneric(t, vreq))
	}
	if len(run.credentials) != len(view.credentials) {
		t.Fatalf("registry credentials: %d run, %d shown", len(run.credentials), len(view.credentials))
	}
	for i, c := range run.credentials {
		s := view.credentials[i]
		compareStrings(t, "registry "+c.Name, []string{c.Name, c.Username, c.Address}, []string{s.Name, s.Username, s.Address})
		if s.Password != fleet.Redacted {
			t.Errorf("registry %s: password shown as %q", c.Name, s.Password)
		}
	}
	return true
}

// compareEnv: the same variables in the same order; a secret one (by name
// or value) shown as <redacted>, any other as it runs.
func compareEnv(t *testing.T, where string, run, shown []string) {
	t.Helper()
	if len(run) != len(shown) {
		t.Fatalf("%s: runs %q; shown %q", where, run, shown)
	}
	for i, kv := range run {
		name, value, _ := strings.Cut(kv, "=")
		sname, svalue, _ := strings.Cut(shown[i], "=")
		switch {
		case name != sname:
			t.Errorf("%s: runs %s; shown %s", where, name, sname)
		case fleet.IsSecretName(name) || fleet.IsSecretValue(value):
			if svalue != fleet.Redacted {
				t.Errorf("%s: secret %s shown as %q", where, name, svalue)
			}
		case svalue != value:
			t.Errorf("%s: %s runs %q; shown %q", where, name, value, svalue)
		}
	}
}

// compareStrings: a string that IsSecretValue is shown as <redacted>, any
// other as it runs.
func compareStrings(t *testing.T, where string, run, shown []string) {
	t.Helper()
	if len(run) != len(shown) {
		t.Fatalf("%s: runs %q; shown %q", where, run, shown)
	}
	for i, s := range run {
		want := s
		if fleet.IsSecretValue(s) {
			want = fleet.Redacted
		}
		if shown[i] != want {
			t.Errorf("%s[%d]: runs %q; shown %q", where, i, s, shown[i])
		}
	}
}

// compareJSON walks two decoded JSON values: the same shape, strings as
// compareStrings says, other leaves equal.
func compareJSON(t *testing.T, where string, run, shown any) {
	t.Helper()
	switch r := run.(type) {
	case map[string]any:
		s, ok := shown.(map[string]any)
		if !ok || !slices.Equal(slices.Sorted(maps.Keys(r)), slices.Sorted(maps.Keys(s))) {
			t.Fatalf("%s: runs %v; shown %v", where, run, shown)
		}
		for k := range r {
			compareJSON(t, where+"."+k, r[k], s[k])
		}
	case []any:
		s, ok := shown.([]any)
		if !ok || len(r) != len(s) {
			t.Fatalf("%s: runs %v; shown %v", where, run, shown)
		}
		for i := range r {
			compareJSON(t, where, r[i], s[i])
		}
	case string:
		s, _ := shown.(string)
		compareStrings(t, where, []string{r}, []string{s})
	default:
		if !reflect.DeepEqual(run, shown) {
			t.Errorf("%s: runs %v; shown %v", where, run, shown)
		}
	}
}

func toGeneric(t *testing.T, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var g any
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

// modulesContentOf unwraps {"modulesContent": ...}.
func modulesContentOf(t testing.TB, content json.RawMessage) json.RawMessage {
	var c struct {
		ModulesContent json.RawMessage `json:"modulesContent"`
	}
	if err := json.Unmarshal(content, &c); err != nil {
		t.Fatal(err)
	}
	return c.ModulesContent
}

// TestAgent_RunsWhatReadsShow_EverySpelling: every secret of the shared
// list, in env and createOptions, runs as planted and is shown redacted;
// every manifest key spelled with another case is refused by the agent
// (lastDesiredStatus 400 naming it), so nothing unchecked runs.
func TestAgent_RunsWhatReadsShow_EverySpelling(t *testing.T) {
	secrets := secrettest.Secrets()
	mc := modulesContentOf(t, secrettest.Manifest([]string{"/bin/true"}, secrets))
	if !checkRunsWhatIsShown(t, mc) {
		t.Fatal("the agent refused the manifest of secrets")
	}
	// Not vacuous: the agent does run each secret.
	p, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: mc})
	if err != nil {
		t.Fatal(err)
	}
	envMod := p.modules[secrettest.EnvModule]
	req, err := decodeCreateOptions(p.modules[secrettest.OptionsModule].CreateOptions)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secrets {
		switch s.Placement {
		case secrettest.Env:
			if envMod.Env[s.Name] != s.Value {
				t.Errorf("env %s = %q; want the planted %q", s.Name, envMod.Env[s.Name], s.Value)
			}
		case secrettest.CreateOptions:
			if !slices.Contains(req.Config.Env, s.Name+"="+s.Value) {
				t.Errorf("createOptions Env lacks %s", s.Name)
			}
		}
	}
	for _, r := range secrettest.Refusals([]string{"/bin/true"}) {
		t.Run(r.Name, func(t *testing.T) {
			mc := modulesContentOf(t, r.Content)
			if checkRunsWhatIsShown(t, mc) {
				t.Error("the agent accepts it")
			}
			_, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: mc})
			field := strings.TrimPrefix(r.Field, "content.")
			if err == nil || !strings.Contains(err.Error(), field+": ") || strings.Contains(err.Error(), secrettest.Marker) {
				t.Fatalf("buildPlan: %v; want a refusal naming %s, without the secret", err, field)
			}
		})
	}
}

// TestDockerCreateKeys_MatchTheEngineTypes: fleet refuses, inside
// createOptions, a top-level member spelled otherwise than Docker's create
// request spells it; its list must hold every member of the type the agent
// decodes createOptions into (a moby upgrade that adds one must add it
// there), so that, for example, "env" can never join the environment.
func TestDockerCreateKeys_MatchTheEngineTypes(t *testing.T) {
	var names []string
	var walk func(reflect.Type)
	walk = func(typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if f.Anonymous && tag == "" {
				ft := f.Type
				if ft.Kind() == reflect.Pointer {
					ft = ft.Elem()
				}
				walk(ft)
				continue
			}
			if tag == "-" || !f.IsExported() {
				continue
			}
			if tag == "" {
				tag = f.Name
			}
			names = append(names, tag)
		}
	}
	walk(reflect.TypeFor[container.CreateRequest]())
	if len(names) < 20 {
		t.Fatalf("found only %v", names)
	}
	module := func(opts string) json.RawMessage {
		return manifest(map[string]mod{"m": {"type": "docker", "status": "running", "restartPolicy": "always",
			"settings": map[string]any{"image": "i", "createOptions": opts}}})
	}
	for _, name := range names {
		if err := fleet.ValidateContent(append(append([]byte(`{"modulesContent":`), module(`{"`+name+`":null}`)...), '}'), false); err != nil {
			t.Errorf("%s as Docker spells it refused: %v", name, err)
		}
		for _, spelled := range []string{strings.ToLower(name), strings.ToUpper(name)} {
			if spelled == name {
				continue
			}
			_, err := buildPlan(fleet.DesiredDocument{Version: 1, DeploymentID: "d", ModulesContent: module(`{"` + spelled + `":null}`)})
			if err == nil || !strings.Contains(err.Error(), `differs from "`+name+`" only by case`) {
				t.Errorf("createOptions member %q: %v; want a refusal naming %q", spelled, err, name)
			}
		}
	}
}

// FuzzAgentRunsWhatReadsShow: for any modulesContent, what the agent
// would run equals what reads show of it, secrets aside.
func FuzzAgentRunsWhatReadsShow(f *testing.F) {
	f.Add([]byte(modulesContentOf(f, secrettest.Manifest([]string{"/bin/true"}, secrettest.Secrets()))))
	for _, r := range secrettest.Refusals([]string{"/bin/true"}) {
		f.Add([]byte(modulesContentOf(f, r.Content)))
	}
	f.Fuzz(func(t *testing.T, modulesContent []byte) {
		checkRunsWhatIsShown(t, modulesContent)
	})
}
