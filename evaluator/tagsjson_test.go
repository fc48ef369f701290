package evaluator

import (
	"encoding/json"
	"reflect"
	"slices"
	"testing"
)

// twinEngines returns two engines holding the same devices and
// deployments, so that one device put in each, one as JSON and one
// decoded, must leave them equal.
func twinEngines(t testing.TB) (*Engine, *Engine) {
	t.Helper()
	var es [2]*Engine
	for i := range es {
		e := NewEngine()
		e.PutDevice("base", map[string]any{"env": "prod", "site": map[string]any{"line": 3.0}, "a.b": true})
		for _, d := range []Deployment{
			{ID: "prod", Condition: "tags.env = 'prod'", Priority: 1},
			{ID: "line", Condition: "tags.site.line >= 2", Priority: 2},
			{ID: "named", Condition: "IS_DEFINED(tags.x) OR tags.n = 1", Priority: 3},
		} {
			if _, err := e.PutDeployment(d); err != nil {
				t.Fatal(err)
			}
		}
		es[i] = e
	}
	return es[0], es[1]
}

// checkPutDeviceJSON puts doc as device d1 with PutDeviceJSON in one engine
// and, decoded by encoding/json, with PutDevice in its twin: the same
// error or none, the same changes, the same state.
func checkPutDeviceJSON(t *testing.T, doc []byte) {
	t.Helper()
	viaJSON, viaMap := twinEngines(t)
	got, err := viaJSON.PutDeviceJSON("d1", doc)
	var tags map[string]any
	jerr := error(nil)
	if len(doc) > 0 {
		jerr = json.Unmarshal(doc, &tags)
	}
	if (err == nil) != (jerr == nil) {
		t.Fatalf("PutDeviceJSON(%q): err %v; encoding/json: %v", doc, err, jerr)
	}
	var want []Change
	if jerr == nil {
		want = viaMap.PutDevice("d1", tags)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("PutDeviceJSON(%q) = %v, PutDevice %v", doc, got, want)
	}
	if !reflect.DeepEqual(viaJSON.state, viaMap.state) {
		t.Fatalf("PutDeviceJSON(%q): the engine differs from PutDevice's: leaves %v, want %v",
			doc, viaJSON.leaves, viaMap.leaves)
	}
}

func TestEngine_PutDeviceJSON(t *testing.T) {
	for _, doc := range []string{
		``, `null`, ` null `, `{}`,
		`{"env":"prod","site":{"line":3}}`,
		`{"site":{"line":3,"floor":{"n":-0.0}},"env":"test","x":[1,2],"n":1,"on":true,"off":false,"none":null}`,
		`{"a.b":true,"c\\d":1}`, // keys that flatten escapes
		`{"z":1,"a":2,"m":{"y":"é","b":""}}`,
		`{"e":"t\u00e9st","q":"\"x\""}`, // escapes: encoding/json reads them
		`{"n":1,"n":2}`,                 // a duplicate: the last wins
		`{"big":1e400}`,                 // out of range: an error both ways
		`{"s":"\xff"}`,                  // invalid UTF-8: replaced both ways
		`[1]`, `"x"`, `{"a":1`, `{"a":01}`, `{} {}`,
	} {
		t.Run(doc, func(t *testing.T) { checkPutDeviceJSON(t, []byte(doc)) })
	}
}

// TestEngine_PutDeviceJSON_Replaces: a device put again as JSON releases
// its old terms like PutDevice.
func TestEngine_PutDeviceJSON_Replaces(t *testing.T) {
	viaJSON, viaMap := twinEngines(t)
	for _, doc := range []string{`{"env":"prod","x":1}`, `{"env":"test","site":{"line":1}}`, `null`, `{"n":1}`} {
		var tags map[string]any
		if err := json.Unmarshal([]byte(doc), &tags); err != nil {
			t.Fatal(err)
		}
		got, err := viaJSON.PutDeviceJSON("base", []byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		if want := viaMap.PutDevice("base", tags); !slices.Equal(got, want) {
			t.Fatalf("%s: changes %v, want %v", doc, got, want)
		}
		if !reflect.DeepEqual(viaJSON.state, viaMap.state) {
			t.Fatalf("%s: the engines differ", doc)
		}
	}
}

// FuzzPutDeviceJSON: reading tags straight from JSON gives exactly what
// decoding them and PutDevice give, or the same refusal.
func FuzzPutDeviceJSON(f *testing.F) {
	for _, s := range []string{`{"env":"prod","site":{"line":3}}`, `{"a":{"b":{"c":[{"d":1}]}},"x":null}`,
		`{"n":1,"n":"1"}`, `{"k\u0041":"v"}`, `{"a.b\\c":{"":0}}`, `{"f":-1.5e-7,"t":true}`, `{"s":"\xc3"}`, `{"d":{"d":{"d":{}}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, doc []byte) { checkPutDeviceJSON(t, doc) })
}

// TestEngine_FlattenJSON_ReadsTagsDirectly: tags as the node stores them
// (json.Marshal of decoded maps) are read without encoding/json; only the
// unusual go the long way.
func TestEngine_FlattenJSON_ReadsTagsDirectly(t *testing.T) {
	for _, tc := range []struct {
		doc    string
		direct bool
	}{
		{`{"environment":"prod","site":{"line":3}}`, true},
		{`{"a":[1,{"b":2}],"n":null,"t":true,"f":-2.5e3,"e":{},"s":"ü"}`, true},
		{`{"s":"a\"b"}`, false},
		{`{"\u0041":1}`, false},
		{`{"a":1,"a":1}`, false},
		{`{"n":1e999}`, false},
	} {
		e := NewEngine()
		e.mu.Lock()
		_, ok := e.flattenJSON([]byte(tc.doc))
		e.mu.Unlock()
		if ok != tc.direct {
			t.Errorf("flattenJSON(%s) read directly: %v, want %v", tc.doc, ok, tc.direct)
		}
		if !ok && len(e.d.termIDs) != 0 {
			t.Errorf("flattenJSON(%s) gave up after interning %d terms", tc.doc, len(e.d.termIDs))
		}
	}
}
