package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
)

// hubFuncs are fakeBackend's functions for the device hub's routes.
type hubFuncs struct {
	createConsumer func(ctx context.Context, name string) (fleet.Consumer, error)
	consumer       func(ctx context.Context, name string) (fleet.Consumer, error)
	consumers      func(ctx context.Context) ([]fleet.Consumer, error)
	deleteConsumer func(ctx context.Context, name string, opts WriteOptions) error
	module         func(ctx context.Context, deviceID, moduleID string, consistent bool) (ModuleView, error)
	invokeMethod   func(ctx context.Context, deviceID, moduleID, method string, req MethodRequest) (MethodResult, error)
	tailEvents     func(ctx context.Context, f EventFilter, fn func(EventView) error) error
}

func (b *fakeBackend) CreateConsumer(ctx context.Context, name string) (fleet.Consumer, error) {
	if err := b.record("CreateConsumer", b.hub.createConsumer != nil); err != nil {
		return fleet.Consumer{}, err
	}
	return b.hub.createConsumer(ctx, name)
}

func (b *fakeBackend) Consumer(ctx context.Context, name string) (fleet.Consumer, error) {
	if err := b.record("Consumer", b.hub.consumer != nil); err != nil {
		return fleet.Consumer{}, err
	}
	return b.hub.consumer(ctx, name)
}

func (b *fakeBackend) Consumers(ctx context.Context) ([]fleet.Consumer, error) {
	if err := b.record("Consumers", b.hub.consumers != nil); err != nil {
		return nil, err
	}
	return b.hub.consumers(ctx)
}

func (b *fakeBackend) DeleteConsumer(ctx context.Context, name string, opts WriteOptions) error {
	if err := b.record("DeleteConsumer", b.hub.deleteConsumer != nil); err != nil {
		return err
	}
	return b.hub.deleteConsumer(ctx, name, opts)
}

func (b *fakeBackend) Module(ctx context.Context, deviceID, moduleID string, consistent bool) (ModuleView, error) {
	if err := b.record("Module", b.hub.module != nil); err != nil {
		return ModuleView{}, err
	}
	return b.hub.module(ctx, deviceID, moduleID, consistent)
}

func (b *fakeBackend) InvokeMethod(ctx context.Context, deviceID, moduleID, method string, req MethodRequest) (MethodResult, error) {
	if err := b.record("InvokeMethod", b.hub.invokeMethod != nil); err != nil {
		return MethodResult{}, err
	}
	return b.hub.invokeMethod(ctx, deviceID, moduleID, method, req)
}

func (b *fakeBackend) TailEvents(ctx context.Context, f EventFilter, fn func(EventView) error) error {
	if err := b.record("TailEvents", b.hub.tailEvents != nil); err != nil {
		return err
	}
	return b.hub.tailEvents(ctx, f, fn)
}

// TestServer_InvokeMethod: the method's name and target come from the
// path, bad timeouts and payloads are refused before the backend, and the
// backend's outcomes map to Azure's statuses: 200 with the module's status
// and payload, 404 not_connected, 504 timeout.
func TestServer_InvokeMethod(t *testing.T) {
	b := &fakeBackend{}
	var got MethodRequest
	var outcome error
	b.hub.invokeMethod = func(_ context.Context, d, m, name string, req MethodRequest) (MethodResult, error) {
		got = req
		if d != "press-01" || m != "filter" || name != "reset" {
			t.Errorf("invoked %s/%s/%s", d, m, name)
		}
		return MethodResult{Status: 201, Payload: json.RawMessage(`{"ok":true}`)}, outcome
	}
	s := newTestServer(t, b)
	path := "/api/v1/devices/press-01/modules/filter/methods/reset"
	r := do(t, s, "POST", path, `{"payload":{"x":1},"responseTimeoutInSeconds":10}`)
	if r.code != 200 || !strings.Contains(r.body, `"status": 201`) || !strings.Contains(r.body, `"ok": true`) || string(got.Payload) != `{"x":1}` || got.ResponseTimeoutSeconds != 10 {
		t.Fatalf("invoke: %d %s (request %+v)", r.code, r.body, got)
	}
	for _, tc := range []struct {
		err  error
		code int
		word string
	}{{ErrNotConnected, 404, "not_connected"}, {ErrTimeout, 504, "timeout"}} {
		outcome = tc.err
		if r := do(t, s, "POST", path, `{}`); r.code != tc.code || r.err.Code != tc.word {
			t.Errorf("backend %v: %d %+v", tc.err, r.code, r.err)
		}
	}
	calls := len(b.Calls())
	for _, body := range []string{`{"responseTimeoutInSeconds":1}`, `{"responseTimeoutInSeconds":301}`, `{"connectTimeoutInSeconds":-1}`, `{"methodName":"x"}`} {
		if r := do(t, s, "POST", path, body); r.code != 400 {
			t.Errorf("%s: %d", body, r.code)
		}
	}
	if len(b.Calls()) != calls {
		t.Errorf("refused requests reached the backend: %v", b.Calls()[calls:])
	}
}

// TestServer_TailEvents: GET /events streams one JSON object per line, as
// the backend produces them, with the filter from the query.
func TestServer_TailEvents(t *testing.T) {
	b := &fakeBackend{}
	b.hub.tailEvents = func(ctx context.Context, f EventFilter, fn func(EventView) error) error {
		if f.Device != "press-01" || f.Module != "plc" {
			t.Errorf("filter %+v", f)
		}
		for i := uint64(1); i <= 3; i++ {
			if err := fn(EventView{Node: "n1", Offset: i, DeviceID: "press-01", ModuleID: "plc", Body: "b"}); err != nil {
				return err
			}
		}
		return nil
	}
	s := newTestServer(t, b)
	srv := httptest.NewServer(s)
	defer srv.Close()
	c := &Client{BaseURL: srv.URL, Token: testToken}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var offs []uint64
	err := c.TailEvents(ctx, EventFilter{Device: "press-01", Module: "plc"}, func(ev EventView) error {
		offs = append(offs, ev.Offset)
		return nil
	})
	if len(offs) != 3 || offs[2] != 3 || err == nil || !strings.Contains(err.Error(), "ended the stream") {
		t.Fatalf("tail: %v %v", offs, err)
	}
	if r := do(t, s, "GET", "/api/v1/events?device=a/b", ""); r.code != http.StatusBadRequest {
		t.Fatalf("bad device filter: %d", r.code)
	}
}
