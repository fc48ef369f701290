package routing

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// msg builds a message from module m's output o (o "" for none) with
// application properties given as k=v pairs.
func msg(m, o string, props ...string) *Message {
	src := "/messages/modules/" + m
	if o != "" {
		src += "/outputs/" + o
	}
	p := map[string]string{}
	for _, kv := range props {
		k, v, _ := strings.Cut(kv, "=")
		p[k] = v
	}
	return &Message{Source: src, Properties: p, SystemProperties: map[string]string{
		"connectionDeviceId": "dev1", "connectionModuleId": m,
	}}
}

func jsonMsg(body string) *Message {
	m := msg("sensor", "out")
	m.SystemProperties["contentType"] = "application/json"
	m.SystemProperties["contentEncoding"] = "utf-8"
	m.Body = []byte(body)
	return m
}

func mustParse(t *testing.T, text string) *Route {
	t.Helper()
	r, err := Parse(text)
	if err != nil {
		t.Fatalf("Parse(%q): %v", text, err)
	}
	return r
}

func TestParse_Sinks(t *testing.T) {
	tests := []struct {
		text string
		want Sink
	}{
		{"FROM /* INTO $upstream", Sink{Kind: SinkUpstream}},
		{"from /messages/* into $UPSTREAM", Sink{Kind: SinkUpstream}},
		{`SELECT * FROM /messages/modules/a/outputs/o1 INTO BrokeredEndpoint("/modules/b/inputs/in1")`, Sink{Kind: SinkModuleInput, Module: "b", Input: "in1"}},
		{`FROM /messages/* INTO brokeredEndpoint("modules/b/inputs/in1/")`, Sink{Kind: SinkModuleInput, Module: "b", Input: "in1"}},
		{`FROM /messages/* INTO BrokeredEndpoint('/modules/filter-1/inputs/input 2')`, Sink{Kind: SinkModuleInput, Module: "filter-1", Input: "input 2"}},
	}
	for _, tt := range tests {
		if got := mustParse(t, tt.text).Sink; got != tt.want {
			t.Errorf("%q: sink %+v; want %+v", tt.text, got, tt.want)
		}
	}
}

// Every error names the column of the offending token.
func TestParse_Errors(t *testing.T) {
	tests := []struct {
		text string
		col  int
		msg  string
	}{
		{"", 1, "empty"},
		{"FROM garbage INTO nowhere blah", 6, "source path"},
		{"FROM /messages/* INTO nowhere blah", 23, "unknown endpoint 'nowhere'"},
		{"FROM /messages/* INTO $upstream blah", 33, "after the sink"},
		{"FROM /messages/* INTO $downstream", 23, "only one is $upstream"},
		{"FROM /messages/* WHERE INTO $upstream", 24, "condition after WHERE"},
		{"FROM /messages/* WHERE a = 'x INTO $upstream", 28, "unterminated string"},
		{"FROM /messages/* WHERE (a = 'x' INTO $upstream", 24, "missing closing ')'"},
		{"FROM /messages/* WHERE a = 'x') INTO $upstream", 31, "unmatched closing ')'"},
		{"FROM /messages/* WHERE a = 'x' b = 'y' INTO $upstream", 32, "an operator or INTO"},
		{"FROM /messages/* WHERE a @ 'x' INTO $upstream", 26, "invalid symbol '@'"},
		{"FROM /messages/* WHERE temperature > 30 INTO $upstream", 36, "have string and number"},
		{"FROM /messages/* WHERE a = null INTO $upstream", 26, "have string and null"},
		{"FROM /messages/* WHERE nope(a) INTO $upstream", 24, "unknown function 'nope'"},
		{"FROM /messages/* WHERE length(3) INTO $upstream", 24, "expected length(string)"},
		{"FROM /messages/* WHERE NOT a = 'x' INTO $upstream", 24, "NOT needs a bool"},
		{"FROM /messages/* WHERE $body. = 1 INTO $upstream", 24, "$body query"},
		{"FROM /messages/* WHERE $body.a[x] = 1 INTO $upstream", 24, "$body query"},
		{"FROM /messages/modules/*/outputs/o INTO $upstream", 6, "'*' may only end the path"},
		{"FROM /messages/modules/a/output/* INTO $upstream", 6, "unknown source"},
		{"FROM /devices/* INTO $upstream", 6, "unknown source"},
		{"FROM /messages/ INTO $upstream", 17, "path segment"},
		{`FROM /* INTO BrokeredEndpoint("/modinstances/b/in")`, 31, "must be /modules/<module>/inputs/<input>"},
		{`FROM /* INTO BrokeredEndpoint("/modules/+/inputs/in")`, 31, "no module or input"},
		{`FROM /* INTO BrokeredEndpoint(/modules/b/inputs/in)`, 31, "quoted address"},
		{"FROM device messages WHERE $connectedModuleInstanceId=\"adapterglobalconfig\" INTO brokeredEndpoint(\"/modinstances/alertLogic/in\");", 6, "source path"},
		{"FROM /* WHERE twin_change_includes(x) INTO $upstream", 15, "twin change notifications"},
		{"SELECT a FROM /* INTO $upstream", 8, "'*' after SELECT"},
		{"INTO $upstream", 1, "expected FROM"},
		{"FROM /* WHERE -as_number(x) = 1 INTO $upstream", 15, "unknown function '-as_number'"}, // one name, as in edgeHub
		{"FROM /* WHERE missing ?? 'd' = 'd' INTO $upstream", 23, "operator '??'"},              // ?? binds loosest
		// Columns count characters, not bytes.
		{"FROM /* WHERE \"é\" = 2 INTO $upstream", 19, "have string and number"},
	}
	for _, tt := range tests {
		_, err := Parse(tt.text)
		var se *SyntaxError
		if !errors.As(err, &se) {
			t.Errorf("%q: error %v; want a *SyntaxError", tt.text, err)
			continue
		}
		if !errors.Is(err, ErrInvalidRoute) {
			t.Errorf("%q: error does not match ErrInvalidRoute", tt.text)
		}
		if se.Column != tt.col || !strings.Contains(se.Msg, tt.msg) {
			t.Errorf("%q: %v; want column %d and a message containing %q", tt.text, err, tt.col, tt.msg)
		}
	}
}

func TestRoute_Sources(t *testing.T) {
	tests := []struct {
		source string
		match  []*Message
		miss   []*Message
	}{
		{"/*", []*Message{msg("a", "o"), msg("b", "")}, nil},
		{"/messages/*", []*Message{msg("a", "o"), msg("b", "")}, nil},
		{"/messages/modules/a/*", []*Message{msg("a", "o"), msg("a", ""), msg("A", "x")}, []*Message{msg("ab", "o"), msg("b", "o")}},
		{"/messages/modules/a", []*Message{msg("a", "o"), msg("a", "")}, []*Message{msg("ab", "o")}},
		{"/messages/modules/a/outputs/*", []*Message{msg("a", "o"), msg("a", "p")}, []*Message{msg("a", ""), msg("b", "o")}},
		{"/messages/modules/a/outputs/o", []*Message{msg("a", "o"), msg("a", "O")}, []*Message{msg("a", "o2"), msg("a", ""), msg("a", "p")}},
		{"/messages/events", nil, []*Message{msg("a", "o")}},
		{"/twinChangeNotifications", nil, []*Message{msg("a", "o")}},
	}
	for _, tt := range tests {
		r := mustParse(t, "FROM "+tt.source+" INTO $upstream")
		for _, m := range tt.match {
			if !r.Matches(m) {
				t.Errorf("%s does not match %s", tt.source, m.Source)
			}
		}
		for _, m := range tt.miss {
			if r.Matches(m) {
				t.Errorf("%s matches %s", tt.source, m.Source)
			}
		}
	}
}

func TestRoute_Conditions(t *testing.T) {
	alert := msg("a", "o", "alert=true", "level=3", "Site=Plant 1", "empty=")
	tests := []struct {
		cond string
		m    *Message
		want bool
	}{
		{"alert = 'true'", alert, true},
		{"ALERT = 'true'", alert, true}, // names ignore case
		{"alert = 'false'", alert, false},
		{"alert <> 'false'", alert, true},
		{"alert != 'false'", alert, true},
		{"missing = 'x'", alert, false},
		{"missing <> 'x'", alert, false}, // undefined, not true
		{"NOT (missing = 'x')", alert, false},
		{"NOT (alert = 'x')", alert, true},
		{"is_defined(missing)", alert, false},
		{"NOT is_defined(missing)", alert, true},
		{"is_defined(empty) AND empty = ''", alert, true},
		{"alert = 'true' AND level = '3'", alert, true},
		{"alert = 'true' AND missing = '3'", alert, false},
		{"alert = 'x' OR level = '3'", alert, true},
		{"missing = 'x' OR level = '3'", alert, true},
		{"as_number(level) > 2", alert, true},
		{"as_number(level) * 2 = 6", alert, true},
		{"as_number(level) + 1 >= 4 AND as_number(level) - 1 < 3", alert, true},
		{"as_number(level) % 2 = 1", alert, true},
		{"- as_number(level) = -3", alert, true},
		{"as_number(alert) > 2", alert, false},
		{"level > '20'", alert, true}, // strings compare ordinally
		{"Site = 'Plant 1'", alert, true},
		{"starts_with(Site, 'Plant') AND ends_with(Site, '1') AND contains(Site, 'ant')", alert, true},
		{"lower(Site) = 'plant 1' AND upper(Site) = 'PLANT 1'", alert, true},
		{"length(Site) = 7 AND index_of(Site, '1') = 6", alert, true},
		{"substring(Site, 6) = '1' AND substring(Site, 0, 5) = 'Plant'", alert, true},
		{"substring(Site, 99) = ''", alert, false},
		{"concat(alert, '-', level) = 'true-3'", alert, true},
		{"alert || level = 'true3'", alert, true},
		{"(missing ?? 'd') = 'd' AND (alert ?? 'd') = 'true'", alert, true},
		{"$connectionModuleId = 'a' AND $connectionDeviceId = 'dev1'", alert, true},
		{"$CONNECTIONMODULEID = 'a'", alert, true},
		{"{$connectionModuleId} = 'a'", alert, true},
		{"$nope = 'a'", alert, false},
		{"abs(-2) = 2 AND power(2, 10) = 1024 AND square(3) = 9 AND sqrt(16) = 4", alert, true},
		{"ceiling(1.2) = 2 AND floor(1.8) = 1 AND sign(-5) = -1 AND exp(0) = 1", alert, true},
		{"is_string(alert) AND NOT is_number(alert) AND NOT is_bool(alert)", alert, true},
		{"0x10 = 16 AND 1.5e1 = 15 AND .5 = 0.5", alert, true},
		{"true", alert, true},
		{"false OR null", alert, false},
		{"null OR true", alert, true},
		{"'x' = \"x\" AND 'it\\'s' = \"it's\" AND '\\u0041' = 'A'", alert, true},
		{"1 / 0 > 1000", alert, true},
		{"0 / 0 = 0 OR 0 / 0 <> 0", alert, false}, // NaN is undefined
	}
	for _, tt := range tests {
		r := mustParse(t, "FROM /* WHERE "+tt.cond+" INTO $upstream")
		if got := r.Matches(tt.m); got != tt.want {
			t.Errorf("WHERE %s: %v; want %v", tt.cond, got, tt.want)
		}
	}
}

// An application property named "$x" wins over the system property x,
// except in braces.
func TestRoute_ApplicationPropertyShadowsSystemProperty(t *testing.T) {
	m := msg("a", "o", "$connectionModuleId=spoofed")
	if !mustParse(t, "FROM /* WHERE $connectionModuleId = 'spoofed' INTO $upstream").Matches(m) {
		t.Error("$connectionModuleId does not read the application property of that name")
	}
	if !mustParse(t, "FROM /* WHERE {$connectionModuleId} = 'a' INTO $upstream").Matches(m) {
		t.Error("{$connectionModuleId} does not read the system property")
	}
}

func TestRoute_BodyQueries(t *testing.T) {
	body := `{"machine": {"temperature": 31.5, "state": "run", "ok": true, "tags": ["x", "y"], "none": null}, "n": 3}`
	tests := []struct {
		cond string
		m    *Message
		want bool
	}{
		{"$body.machine.temperature > 30", jsonMsg(body), true},
		{"$body.machine.temperature > 40", jsonMsg(body), false},
		{"$body.machine.state = 'run'", jsonMsg(body), true},
		{"$body.machine.ok = true", jsonMsg(body), true},
		{"$body.machine.ok", jsonMsg(body), true},
		{"$body.machine.tags[1] = 'y'", jsonMsg(body), true},
		{"$body.machine.tags[5] = 'y'", jsonMsg(body), false},
		{"$body.machine.none = null", jsonMsg(body), true},
		{"is_null($body.machine.none)", jsonMsg(body), true},
		{"$body.machine.missing = null", jsonMsg(body), true},
		{"is_defined($body.machine)", jsonMsg(body), false}, // objects are undefined, as in edgeHub
		{"$body.machine = 'x'", jsonMsg(body), false},       // an object is undefined
		{"$body.n = 3 AND $body.n + 1 = 4", jsonMsg(body), true},
		{"$body.machine.state = 3", jsonMsg(body), false}, // different kinds are unequal
		{"$body.machine.state <> 3", jsonMsg(body), true},
		{"$BODY.n = 3", jsonMsg(body), true},
		{"upper($body.machine.state) = 'RUN'", jsonMsg(body), true},
		{"$body.n = 3", msg("a", "o"), false},                       // no content type
		{"$body.n = 3", jsonMsg(`[1,2]`), false},                    // not an object
		{"$body.n = 3", jsonMsg(`{"n": 3`), false},                  // not JSON
		{"$body.n = 3", jsonMsg("\xef\xbb\xbf" + `{"n": 3}`), true}, // a BOM is skipped
	}
	for _, tt := range tests {
		r := mustParse(t, "FROM /* WHERE "+tt.cond+" INTO $upstream")
		if got := r.Matches(tt.m); got != tt.want {
			t.Errorf("WHERE %s: %v; want %v", tt.cond, got, tt.want)
		}
	}
	// An application property named like the query wins.
	m := jsonMsg(body)
	m.Properties["$body.n"] = "prop"
	if !mustParse(t, "FROM /* WHERE $body.n = 'prop' INTO $upstream").Matches(m) {
		t.Error("$body.n does not read the application property of that name")
	}
	if !mustParse(t, "FROM /* WHERE {$body.n} = 3 INTO $upstream").Matches(m) {
		t.Error("{$body.n} does not query the body")
	}
	// Other encodings are not read.
	m = jsonMsg(body)
	m.SystemProperties["contentEncoding"] = "utf-16"
	if mustParse(t, "FROM /* WHERE $body.n = 3 INTO $upstream").Matches(m) {
		t.Error("a utf-16 body was queried")
	}
}

// The lexer reproduces edgeHub's longest-match quirks.
func TestLex_EdgeHubQuirks(t *testing.T) {
	tests := []struct {
		cond string
		m    *Message
		want bool
	}{
		{"temp-1 = 'x'", msg("a", "o", "temp-1=x"), true},  // one name
		{"a!='x'", msg("a", "o", "a!=x"), true},            // "a!" then '='
		{"as_number(x) = -1", msg("a", "o", "x=-1"), true}, // "-1" is one number
	}
	for _, tt := range tests {
		r := mustParse(t, "FROM /* WHERE "+tt.cond+" INTO $upstream")
		if got := r.Matches(tt.m); got != tt.want {
			t.Errorf("WHERE %s: %v; want %v", tt.cond, got, tt.want)
		}
	}
	if _, err := Parse("FROM /* WHERE as_number(x) -1 > 0 INTO $upstream"); err == nil {
		t.Error(`"x -1": a number literal after an expression was accepted`)
	}
}

func TestParseRoutes(t *testing.T) {
	raw := json.RawMessage(`{
		"toB": {"route": "FROM /messages/modules/a/outputs/o WHERE alert = 'true' INTO BrokeredEndpoint(\"/modules/b/inputs/in\")", "priority": 0, "timeToLiveSecs": 5},
		"up": "FROM /messages/* INTO $upstream",
		"upHigh": {"route": "FROM /messages/modules/a/* INTO $upstream", "priority": 2}
	}`)
	routes, err := ParseRoutes(raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 3 || routes[0].Name != "toB" || routes[1].Name != "up" || routes[2].Name != "upHigh" {
		t.Fatalf("routes: %+v", routes)
	}
	if r := routes[0]; r.Priority != 0 || r.TimeToLive != 5*time.Second {
		t.Errorf("toB: priority %d ttl %s", r.Priority, r.TimeToLive)
	}
	if routes[1].Priority != DefaultPriority {
		t.Errorf("a string route's priority is %d", routes[1].Priority)
	}
	table := NewTable(routes)
	got := table.Route(msg("a", "o", "alert=true"))
	if len(got) != 2 || got[0].Route.Name != "toB" || got[1].Route.Name != "upHigh" {
		t.Fatalf("deliveries: %+v", got)
	}
	got = table.Route(msg("c", "o"))
	if len(got) != 1 || got[0].Route.Name != "up" || got[0].Sink.Kind != SinkUpstream {
		t.Fatalf("deliveries: %+v", got)
	}

	for _, bad := range []struct{ raw, name, msg string }{
		{`{"r1": "FROM garbage INTO nowhere blah"}`, "r1", "column 6"},
		{`{"r2": {"route": "FROM /* INTO $upstream", "priority": 10}}`, "r2", "priority"},
		{`{"r3": {"priority": 1}}`, "r3", "must be a string or an object"},
		{`{"r4": 5}`, "r4", "must be a string or an object"},
	} {
		_, err := ParseRoutes(json.RawMessage(bad.raw))
		var re *RouteError
		if !errors.As(err, &re) || re.Name != bad.name || !strings.Contains(err.Error(), bad.msg) || !errors.Is(err, ErrInvalidRoute) {
			t.Errorf("%s: %v", bad.raw, err)
		}
	}
}
