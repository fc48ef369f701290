package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/edgeclient"
)

// awaitTopic reads messages until one whose topic starts with prefix.
func awaitTopic(t *testing.T, m *edgeclient.Module, prefix string) edgeclient.Message {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case msg := <-m.Messages():
			if strings.HasPrefix(msg.Topic, prefix) {
				return msg
			}
		case <-deadline:
			t.Fatalf("%s: no message on %s", m.Name, prefix)
		}
	}
}

func jsonObj(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return v
}

// A module gets its desired properties on GET, with a $version; a new
// deployment that changes them sends a patch with the next $version, and
// reported properties it patches are stored with their own $version.
func TestHub_ModuleTwin(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.ws.Sync([]string{"b"})
	th.h.Configure(Configuration{Modules: []string{"b"}, Twins: map[string]json.RawMessage{"b": json.RawMessage(`{"interval": 5, "limits": {"hi": 30, "lo": 10}}`)}})
	b := th.connect("b")
	if _, err := b.Subscribe(ctxT(t), filterTwinResponses, filterTwinPatches); err != nil {
		t.Fatal(err)
	}
	if err := b.Publish(ctxT(t), "$iothub/twin/GET/?$rid=1", nil, 1); err != nil {
		t.Fatal(err)
	}
	res := awaitTopic(t, b, "$iothub/twin/res/")
	if res.Topic != "$iothub/twin/res/200/?$rid=1" {
		t.Fatalf("topic %s", res.Topic)
	}
	twin := jsonObj(t, res.Payload)
	want := map[string]any{"desired": map[string]any{"interval": 5.0, "limits": map[string]any{"hi": 30.0, "lo": 10.0}, "$version": 1.0},
		"reported": map[string]any{"$version": 1.0}}
	if !reflect.DeepEqual(twin, want) {
		t.Fatalf("twin %v; want %v", twin, want)
	}

	// A redeployment with the same properties changes nothing; one that
	// changes them sends the difference.
	th.h.Configure(Configuration{Modules: []string{"b"}, Twins: map[string]json.RawMessage{"b": json.RawMessage(`{"limits": {"lo": 10, "hi": 30}, "interval": 5}`)}})
	th.h.Configure(Configuration{Modules: []string{"b"}, Twins: map[string]json.RawMessage{"b": json.RawMessage(`{"interval": 7, "limits": {"hi": 30}}`)}})
	patch := awaitTopic(t, b, "$iothub/twin/PATCH/properties/desired/")
	if patch.Topic != "$iothub/twin/PATCH/properties/desired/?$version=2" {
		t.Fatalf("patch topic %s", patch.Topic)
	}
	if got, want := jsonObj(t, patch.Payload), map[string]any{"interval": 7.0, "limits": map[string]any{"lo": nil}, "$version": 2.0}; !reflect.DeepEqual(got, want) {
		t.Fatalf("patch %v; want %v", got, want)
	}

	// Reported properties.
	if err := b.Publish(ctxT(t), "$iothub/twin/PATCH/properties/reported/?$rid=2", []byte(`{"state": "run", "temp": {"now": 21}}`), 1); err != nil {
		t.Fatal(err)
	}
	if r := awaitTopic(t, b, "$iothub/twin/res/"); r.Topic != "$iothub/twin/res/204/?$rid=2&$version=2" {
		t.Fatalf("reported patch answer %s", r.Topic)
	}
	if err := b.Publish(ctxT(t), "$iothub/twin/PATCH/properties/reported/?$rid=3", []byte(`{"temp": {"now": null, "max": 25}}`), 1); err != nil {
		t.Fatal(err)
	}
	if r := awaitTopic(t, b, "$iothub/twin/res/"); r.Topic != "$iothub/twin/res/204/?$rid=3&$version=3" {
		t.Fatalf("reported patch answer %s", r.Topic)
	}
	tooDeep := strings.Repeat(`{"a":`, fleet.MaxModuleTwinDepth+2) + `1` + strings.Repeat(`}`, fleet.MaxModuleTwinDepth+2)
	for rid, bad := range map[int]string{4: `[1]`, 5: `{"$x": 1}`, 6: `nope`, 7: fmt.Sprintf(`{"big": %q}`, strings.Repeat("x", fleet.MaxModuleTwinReported)), 8: tooDeep} {
		if err := b.Publish(ctxT(t), fmt.Sprintf("$iothub/twin/PATCH/properties/reported/?$rid=%d", rid), []byte(bad), 1); err != nil {
			t.Fatal(err)
		}
		r := awaitTopic(t, b, "$iothub/twin/res/")
		want := fmt.Sprintf("$iothub/twin/res/400/?$rid=%d", rid)
		if rid == 7 {
			want = "$iothub/twin/res/413/?$rid=7"
		}
		if r.Topic != want {
			t.Errorf("bad patch %s answered %s; want %s", bad[:min(len(bad), 20)], r.Topic, want)
		}
	}
	got := th.h.ReportedTwins()
	if want := map[string]any{"state": "run", "temp": map[string]any{"max": 25.0}, "$version": 3.0}; !reflect.DeepEqual(jsonObj(t, got["b"]), want) {
		t.Fatalf("reported twins %s; want %v", got["b"], want)
	}

	// Versions survive a restart.
	dir := th.dir
	b.Close()
	th.stop()
	th = startHub(t, dir)
	th.h.Configure(Configuration{Modules: []string{"b"}, Twins: map[string]json.RawMessage{"b": json.RawMessage(`{"interval": 8}`)}})
	b = th.connect("b", clean)
	b.Subscribe(ctxT(t), filterTwinResponses)
	b.Publish(ctxT(t), "$iothub/twin/GET/?$rid=9", nil, 1)
	twin = jsonObj(t, awaitTopic(t, b, "$iothub/twin/res/").Payload)
	if d := twin["desired"].(map[string]any); d["$version"] != 3.0 || d["interval"] != 8.0 {
		t.Errorf("desired after restart %v; want interval 8 at $version 3", d)
	}
	if r := twin["reported"].(map[string]any); r["$version"] != 3.0 || r["state"] != "run" {
		t.Errorf("reported after restart %v", r)
	}
}

// Direct methods reach the module and return its answer; 404 when it is
// not connected or not listening, 504 when it does not answer.
func TestHub_DirectMethods(t *testing.T) {
	th := startHub(t, t.TempDir())
	th.configure(nil, "b", "c")
	ctx := context.Background()
	if r := th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "1", Module: "b", Method: "reset"}); r.Status != 404 || r.ID != "1" {
		t.Fatalf("not connected: %+v", r)
	}
	b := th.connect("b")
	if r := th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "2", Module: "b", Method: "reset"}); r.Status != 404 {
		t.Fatalf("not subscribed: %+v", r)
	}
	if _, err := b.Subscribe(ctxT(t), filterMethods); err != nil {
		t.Fatal(err)
	}
	go func() {
		for msg := range b.Messages() {
			if !strings.HasPrefix(msg.Topic, "$iothub/methods/POST/") {
				continue
			}
			rest := strings.TrimPrefix(msg.Topic, "$iothub/methods/POST/")
			name, query, _ := strings.Cut(rest, "/?")
			name, _ = url.PathUnescape(name)
			rid := strings.TrimPrefix(query, "$rid=")
			if name == "silent" {
				continue
			}
			reply := fmt.Sprintf(`{"method": %q, "got": %s}`, name, msg.Payload)
			b.Publish(context.Background(), "$iothub/methods/res/201/?$rid="+rid, []byte(reply), 1)
		}
	}()
	r := th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "3", Module: "b", Method: "set speed", Payload: json.RawMessage(`{"rpm": 900}`)})
	if r.Status != 201 || r.ID != "3" {
		t.Fatalf("answer %+v", r)
	}
	if got, want := jsonObj(t, r.Payload), map[string]any{"method": "set speed", "got": map[string]any{"rpm": 900.0}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("payload %v; want %v", got, want)
	}
	// A module subscribing later, within the connect timeout, is waited for.
	go func() {
		time.Sleep(200 * time.Millisecond)
		c := th.connect("c")
		c.Subscribe(context.Background(), filterMethods)
		for msg := range c.Messages() {
			_, query, _ := strings.Cut(msg.Topic, "/?")
			c.Publish(context.Background(), "$iothub/methods/res/200/?"+query, []byte(`"ok"`), 1)
		}
	}()
	if r := th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "4", Module: "c", Method: "m", ConnectTimeoutSeconds: 10}); r.Status != 200 || string(r.Payload) != `"ok"` {
		t.Fatalf("waiting for the module: %+v", r)
	}
	if testing.Short() {
		return
	}
	r = th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "5", Module: "b", Method: "silent", ResponseTimeoutSeconds: 5})
	if r.Status != 504 {
		t.Fatalf("silent module: %+v", r)
	}
	if r := th.h.InvokeMethod(ctx, fleet.MethodRequest{ID: "6", Module: "b", Method: "x", Payload: json.RawMessage(`{`)}); r.Status != 400 {
		t.Fatalf("bad payload: %+v", r)
	}
}
