package deploylimits

import (
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/internal/storetest"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// replica feeds an Assigner from a store as the node's observer does.
type replica struct{ a *assign.Assigner }

func (r replica) Applied(changes []raftstore.Change)  { r.a.Apply(changes) }
func (r replica) Restored(rd *raftstore.Reader) error { return r.a.Restore(rd) }
func (r replica) Halted(error)                        {}
func (r replica) assignments() Assignments            { return r.a.Loose() }

// manifestOf is a deployment's content with the modules named.
func manifestOf(modules ...string) json.RawMessage {
	var ms []string
	for _, m := range modules {
		ms = append(ms, `"`+m+`":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"`+m+`"}}`)
	}
	return json.RawMessage(`{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{` + strings.Join(ms, ",") + `}}}}}`)
}

// newChecker opens a one-node store whose applied changes feed an
// Assigner, and a Checker over both with lim.
func newChecker(t *testing.T, lim Limits) (*Checker, *raftstore.Store) {
	t.Helper()
	logger := testlog.New(t, slog.LevelWarn)
	var store *raftstore.Store
	view := func(fn func(r *raftstore.Reader) error) error { return store.View(fn) }
	rep := replica{a: assign.New(assign.Config{View: view, Logger: logger})}
	s := storetest.Open(t, rep, slog.LevelWarn)
	store = s
	return &Checker{Limits: lim.WithDefaults(), Assignments: rep.assignments, View: view}, s
}

var at = time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)

func put(t *testing.T, s *raftstore.Store, cmds ...raftstore.Command) {
	t.Helper()
	for _, c := range cmds {
		if _, err := s.Apply(testutil.Context(t), c); err != nil {
			t.Fatal(err)
		}
	}
}

func deployment(id, cond string, priority int64, layered bool, content json.RawMessage) raftstore.PutDeployment {
	return raftstore.PutDeployment{Time: at, Deployment: fleet.Deployment{ID: id, TargetCondition: cond, Priority: priority, Layered: layered, Content: content}}
}

func device(id string, tags map[string]any) raftstore.PutDevice {
	return raftstore.PutDevice{Time: at, Device: fleet.Device{ID: id, Tags: tags}}
}

// wantRefused checks err is a validation error on field saying msg (nil
// field and msg: no error).
func wantRefused(t *testing.T, what string, err error, field, msg string) {
	t.Helper()
	if field == "" {
		if err != nil {
			t.Fatalf("%s: %v, want accepted", what, err)
		}
		return
	}
	var ve *fleet.ValidationError
	if !errors.As(err, &ve) || ve.Field != field || !strings.Contains(ve.Msg, msg) {
		t.Fatalf("%s: %v, want refused on %s with %q", what, err, field, msg)
	}
}

// TestChecker_Content: content over the manifest's size, a module twin's
// desired properties over theirs, and more modules than allowed however
// the manifest spells them are refused, naming the limit's flag.
func TestChecker_Content(t *testing.T) {
	c := &Checker{Limits: Limits{MaxManifestBytes: 2048, MaxModuleDesiredBytes: 64, MaxModules: 2}.WithDefaults()}
	tests := []struct {
		name, content, field, msg string
	}{
		{"two modules", string(manifestOf("a", "b")), "", ""},
		{"three modules", string(manifestOf("a", "b", "c")),
			"content.modulesContent.$edgeAgent.properties.desired.modules", "has 3 modules; at most 2 are allowed (serve --max-modules)"},
		{"three modules, one key each",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules.a":{},"properties.desired.modules.b":{},"properties.desired.modules.c.settings.image":"c"}}}`,
			"content.modulesContent.$edgeAgent.properties.desired.modules", "has 3 modules"},
		{"three modules under properties.desired.modules",
			`{"modulesContent":{"$edgeAgent":{"properties.desired.modules":{"a":{},"b":{}},"properties.desired.modules.c.settings.image":"c"}}}`,
			"content.modulesContent.$edgeAgent.properties.desired.modules", "has 3 modules"},
		{"a module twin's desired properties", `{"modulesContent":{"filter":{"properties.desired":{"notes":"` + strings.Repeat("x", 64) + `"}}}}`,
			"content.modulesContent.filter.properties.desired", "a module twin's desired properties may have at most 64 (serve --max-module-desired-bytes)"},
		{"the hub's own twin is not a module's", `{"modulesContent":{"$edgeHub":{"properties.desired":{"routes":{"r":"` + strings.Repeat("x", 64) + `"}}}}}`, "", ""},
		{"the manifest", `{"modulesContent":{"$edgeAgent":{"properties.desired.modules.a.settings.image":"` + strings.Repeat("x", 2048) + `"}}}`,
			"content", "at most 2048 are allowed (serve --max-manifest-bytes)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantRefused(t, tc.name, c.Content(json.RawMessage(tc.content)), tc.field, tc.msg)
		})
	}
}

// TestChecker_Devices: a deployment that would take a device over the
// deployments or layers it may be targeted by, or give it a merged
// document (its base and layers) over the manifest limits, is refused
// naming the device; one within them is accepted.
func TestChecker_Devices(t *testing.T) {
	c, s := newChecker(t, Limits{MaxDeploymentsPerDevice: 3, MaxLayersPerDevice: 1, MaxModules: 3})
	put(t, s, device("d1", map[string]any{"x": 1}), device("d2", map[string]any{"x": 2}),
		deployment("base", "*", 1, false, manifestOf("a", "b")),
		deployment("l1", "tags.x = 1", 2, true, manifestOf("c")))
	engine := func(id, cond string, priority int64, layered bool) evaluator.Deployment {
		return evaluator.Deployment{ID: id, Condition: cond, Priority: priority, CreatedUnixNano: at.Add(time.Hour).UnixNano(), Layered: layered}
	}
	tests := []struct {
		name    string
		d       evaluator.Deployment
		content json.RawMessage
		field   string
		msg     string
	}{
		{"a second layer on d1", engine("l2", "tags.x = 1", 3, true), manifestOf("e"),
			"targetCondition", "device d1 would have 2 layered deployments; at most 1 are allowed (serve --max-layers-per-device)"},
		{"a layer on d2 within the modules", engine("l2", "tags.x = 2", 3, true), manifestOf("c"), "", ""},
		{"a layer on d2 over the modules", engine("l2", "tags.x = 2", 3, true), manifestOf("c", "e"),
			"content", "device d2's document (base with its layers) would have 4 modules; at most 3 are allowed (serve --max-modules)"},
		{"a layer that overrides a module", engine("l2", "tags.x = 2", 3, true), manifestOf("a", "c"), "", ""},
		{"a third base", engine("b3", "*", 0, false), manifestOf("a"), "", ""},
		{"a layer with a bad condition", engine("l2", "tags.x = ", 3, true), manifestOf("a"), "targetCondition", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantRefused(t, tc.name, c.Devices(tc.d, tc.content), tc.field, tc.msg)
		})
	}
	put(t, s, deployment("b2", "*", 0, false, manifestOf("a")))
	wantRefused(t, "a fourth deployment on d1", c.Devices(engine("b3", "*", 0, false), manifestOf("a")),
		"targetCondition", "device d1 would be targeted by 4 deployments; at most 3 are allowed (serve --max-deployments-per-device)")
}

// TestChecker_Tags: tags are checked only once the cluster holds more
// deployments than a device may be targeted by; then a tag change that
// would add to a device over the limit is refused, and one that keeps a
// device already over it (a lowered limit) where it is, accepted.
func TestChecker_Tags(t *testing.T) {
	c, s := newChecker(t, Limits{MaxDeploymentsPerDevice: 2})
	put(t, s, device("d1", map[string]any{"line": 1}),
		deployment("all", "*", 1, false, manifestOf("a")),
		deployment("line1", "tags.line = 1", 2, false, manifestOf("a")))
	if c.TagCheck() != nil {
		t.Fatal("tags are checked with 2 deployments and a limit of 2")
	}
	put(t, s, deployment("line1b", "tags.line = 1", 3, false, manifestOf("a")),
		deployment("blue", "tags.color = 'blue'", 4, false, manifestOf("a")))
	if c.TagCheck() == nil {
		t.Fatal("tags are not checked with 4 deployments and a limit of 2")
	}
	wantRefused(t, "d1 kept at 3", c.Tags("d1", map[string]any{"line": 1, "shift": "night"}), "", "")
	wantRefused(t, "d1 brought to 4", c.Tags("d1", map[string]any{"line": 1, "color": "blue"}),
		"tags", "would have device d1 targeted by 4 deployments; at most 2 are allowed (serve --max-deployments-per-device)")
	wantRefused(t, "a new device at 3", c.Tags("d9", map[string]any{"line": 1}),
		"tags", "would have device d9 targeted by 3 deployments")
	wantRefused(t, "a new device at 2", c.Tags("d9", map[string]any{"color": "blue"}), "", "")
}
