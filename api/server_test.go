package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
)

const testToken = "test-token"

// newTestServer serves b with testToken; cfg adjusts the configuration.
func newTestServer(t *testing.T, b *fakeBackend, cfg ...func(*ServerConfig)) *Server {
	t.Helper()
	c := ServerConfig{Backend: b, Token: testToken, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, f := range cfg {
		f(&c)
	}
	s, err := NewServer(c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// response is what a client saw.
type response struct {
	code   int
	header http.Header
	body   string
	err    ErrorDetail // the JSON error body, when there is one
}

// do sends one request with the token (headers are name, value pairs).
func do(t *testing.T, s *Server, method, target, body string, headers ...string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, target, rd)
	req.Header.Set("Authorization", "Bearer "+testToken)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	r := response{code: rec.Code, header: rec.Header(), body: rec.Body.String()}
	if r.code >= 400 {
		var eb ErrorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || eb.Error.Code == "" || eb.Error.Message == "" {
			t.Fatalf("%s %s: %d with a body that is not a JSON error: %q", method, target, r.code, r.body)
		}
		if ct := r.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: error with Content-Type %q", method, target, ct)
		}
		r.err = eb.Error
	}
	return r
}

const validManifest = `{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"a":{}}}}}}`

// TestServer_StrictBodies: a body that is not exactly one JSON value of
// the request's shape is refused with 400 (413 when too large) naming
// what is wrong and where, and never reaches the backend.
func TestServer_StrictBodies(t *testing.T) {
	tests := []struct {
		name, method, path, body string
		code                     int
		field, msg               string
	}{
		{"unknown field", "PUT", "/api/v1/devices/d1", `{"tags":{},"colour":"red"}`, 400, "colour", "unknown field"},
		{"unknown nested field", "PUT", "/api/v1/deployments/x", `{"content":` + validManifest + `,"metrics":{"queries":{},"extra":1}}`, 400, "metrics.extra", "unknown field"},
		{"field in another case", "PUT", "/api/v1/devices/d1", `{"Tags":{"a":1}}`, 400, "Tags", `case-sensitive: "tags"`},
		{"field in another case, nested", "PATCH", "/api/v1/deployments/x", `{"metrics":{"Queries":{}}}`, 400, "metrics.Queries", `"queries"`},
		{"trailing object", "PUT", "/api/v1/devices/d1", `{"tags":{}} {"status":"disabled"}`, 400, "", "after the JSON value at line 1, column 13"},
		{"trailing garbage on a later line", "PATCH", "/api/v1/devices/d1", "{\"tags\":{}}\n\nx", 400, "", "after the JSON value at line 3, column 1"},
		{"two values", "POST", "/api/v1/devices/d1/keys/regenerate", `{"key":"primary"}{"key":"secondary"}`, 400, "", "after the JSON value"},
		{"duplicate key", "PUT", "/api/v1/devices/d1", `{"status":"enabled","status":"disabled"}`, 400, "status", "duplicate key"},
		{"duplicate key in a map", "PUT", "/api/v1/devices/d1", `{"tags":{"env":"prod","env":"test"}}`, 400, "tags.env", "duplicate key"},
		{"duplicate key spelled with an escape", "PUT", "/api/v1/enrollments/e1", `{"tags":{"a":1,"\u0061":2}}`, 400, "tags.a", "duplicate key"},
		{"duplicate key in an array's object", "PATCH", "/api/v1/devices/d1", `{"tags":{"l":[{"x":1},{"x":1,"x":2}]}}`, 400, "tags.l[1].x", "duplicate key"},
		{"duplicate key in the manifest", "PUT", "/api/v1/deployments/x",
			`{"content":{"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"a":{}},"modules":{"b":{}}}}}}}`,
			400, "content.modulesContent.$edgeAgent.properties.desired.modules", "duplicate key"},
		{"duplicate key in a dry run", "PUT", "/api/v1/deployments/x?dryRun=true", `{"priority":1,"priority":2}`, 400, "priority", "duplicate key"},
		{"duplicate label", "PATCH", "/api/v1/deployments/x", `{"labels":{"team":"a","team":"b"}}`, 400, "labels.team", "duplicate key"},
		{"duplicate key to regenerate", "POST", "/api/v1/devices/d1/keys/regenerate", `{"key":"primary","key":"secondary"}`, 400, "key", "duplicate key"},
		{"duplicate key in a condition check", "POST", "/api/v1/conditions/check", `{"condition":"*","kind":"target","condition":"tags.a=1"}`, 400, "condition", "duplicate key"},
		{"duplicate key in a manifest to expand", "POST", "/api/v1/manifests/expand", `{"manifest":"{}","env":"","env":"A=1"}`, 400, "env", "duplicate key"},
		{"trailing data after a rotation", "POST", "/api/v1/enrollments/e1/rotate", `{"revokeDevices":true}]`, 400, "", "after the JSON value"},
		{"wrong type", "PUT", "/api/v1/deployments/x", `{"priority":"high"}`, 400, "priority", "must be an integer, got a string"},
		{"integer too large", "PUT", "/api/v1/deployments/x", `{"priority":9223372036854775808}`, 400, "priority", "fits in 64 bits"},
		{"fraction for an integer", "PATCH", "/api/v1/deployments/x", `{"priority":1.5}`, 400, "priority", "an integer"},
		{"wrong type, nested", "PUT", "/api/v1/deployments/x", `{"labels":{"team":7}}`, 400, "labels.team", "must be a string, got a number"},
		{"not an object", "PUT", "/api/v1/devices/d1", `[1,2]`, 400, "", "must be an object, got an array"},
		{"object for a string", "PUT", "/api/v1/devices/d1", `{"status":{"a":1}}`, 400, "status", "must be a string, got an object"},
		{"syntax error", "PUT", "/api/v1/devices/d1", "{\n  \"tags\": {,}\n}", 400, "", "invalid JSON at line 2, column 12"},
		{"truncated", "PUT", "/api/v1/enrollments/e1", `{"tags":{"a":`, 400, "", "invalid JSON at line 1"},
		{"too large", "PUT", "/api/v1/devices/d1", `{"tags":{"pad":"` + strings.Repeat("x", 300) + `"}}`, 413, "", "larger than the limit of 256 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := &fakeBackend{}
			s := newTestServer(t, b, func(c *ServerConfig) { c.MaxBodyBytes = 256 })
			r := do(t, s, tc.method, tc.path, tc.body)
			if r.code != tc.code || r.err.Field != tc.field || !strings.Contains(r.err.Message, tc.msg) {
				t.Errorf("%d %+v; want %d, field %q, a message containing %q", r.code, r.err, tc.code, tc.field, tc.msg)
			}
			if tc.field != "" && !strings.Contains(r.err.Message, tc.field) {
				t.Errorf("message %q does not name %q", r.err.Message, tc.field)
			}
			if calls := b.Calls(); len(calls) != 0 {
				t.Errorf("a refused body reached the backend: %v", calls)
			}
		})
	}
}

// TestServer_AcceptedBodies: what strict decoding still lets through, and
// that the backend gets it as sent.
func TestServer_AcceptedBodies(t *testing.T) {
	var got DeviceRequest
	b := &fakeBackend{putDevice: func(_ context.Context, id string, req DeviceRequest, _ WriteOptions) (fleet.Device, bool, error) {
		got = req
		return fleet.Device{ID: id}, true, nil
	}}
	s := newTestServer(t, b)
	for _, tc := range []struct{ name, body, want string }{
		{"empty body is {}", "", `{}`},
		{"white space after the value", "{\"tags\":{\"a\":1}}\n\n\t ", `{"tags":{"a":1}}`},
		{"the same key in sibling objects", `{"tags":{"a":{"x":1},"b":{"x":2}}}`, `{"tags":{"a":{"x":1},"b":{"x":2}}}`},
		{"keys that differ by case in a map", `{"tags":{"env":"a","Env":"b"}}`, `{"tags":{"Env":"b","env":"a"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got = DeviceRequest{}
			if r := do(t, s, "PUT", "/api/v1/devices/d1", tc.body); r.code != http.StatusCreated {
				t.Fatalf("%d %+v", r.code, r.err)
			}
			if b, _ := json.Marshal(got); string(b) != tc.want {
				t.Errorf("backend got %s, want %s", b, tc.want)
			}
		})
	}
}

// TestServer_ErrorMapping: each error class of the backend becomes its
// status code, JSON error code and field.
func TestServer_ErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		err         error
		code        int
		word, field string
	}{
		{fleet.Invalid("tags.line", "must be a number"), 400, "bad_request", "tags.line"},
		{fmt.Errorf("patch: %w", fleet.ErrImmutable), 400, "bad_request", ""},
		{fmt.Errorf("device d1: %w", fleet.ErrNotFound), 404, "not_found", ""},
		{fmt.Errorf("device d1: %w", fleet.ErrExists), 409, "conflict", ""},
		{fmt.Errorf("etag 3: %w", fleet.ErrPreconditionFailed), 412, "precondition_failed", ""},
		{fmt.Errorf("no leader: %w", ErrUnavailable), 503, "unavailable", ""},
		{errors.New("disk on fire"), 500, "internal", ""},
	} {
		t.Run(tc.word, func(t *testing.T) {
			var logs bytes.Buffer
			b := &fakeBackend{device: func(context.Context, string, bool) (DeviceView, error) { return DeviceView{}, tc.err }}
			s := newTestServer(t, b, func(c *ServerConfig) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
			r := do(t, s, "GET", "/api/v1/devices/d1", "")
			if r.code != tc.code || r.err.Code != tc.word || r.err.Field != tc.field {
				t.Errorf("%d %+v; want %d %s field %q", r.code, r.err, tc.code, tc.word, tc.field)
			}
			if !strings.Contains(r.err.Message, strings.TrimPrefix(tc.err.Error(), tc.field+": ")) {
				t.Errorf("message %q does not say %q", r.err.Message, tc.err)
			}
			if logged := strings.Contains(logs.String(), "request failed"); logged != (tc.code == 500) {
				t.Errorf("logged %v for a %d: %s", logged, tc.code, logs.String())
			}
		})
	}
}

// TestServer_Writes: status codes, ETags and preconditions of writes.
func TestServer_Writes(t *testing.T) {
	var opts []WriteOptions
	created := true
	b := &fakeBackend{
		putDevice: func(_ context.Context, id string, _ DeviceRequest, o WriteOptions) (fleet.Device, bool, error) {
			opts = append(opts, o)
			return fleet.Device{ID: id, Etag: "7"}, created, nil
		},
		deleteDevice: func(_ context.Context, _ string, o WriteOptions) error { opts = append(opts, o); return nil },
		putDeployment: func(context.Context, string, DeploymentRequest, WriteOptions) (DeploymentView, bool, error) {
			t.Error("a dry run reached PutDeployment")
			return DeploymentView{}, false, nil
		},
		dryRunDeployment: func(_ context.Context, id string, req DeploymentRequest) (DryRunResult, error) {
			return DryRunResult{TargetedCount: 3, WouldApplyCount: 2}, nil
		},
		regenerateDeviceKey: func(_ context.Context, id, which string) (fleet.Device, error) {
			if which != "secondary" {
				return fleet.Device{}, fleet.Invalid("key", "must be primary or secondary")
			}
			return fleet.Device{ID: id, Etag: "9"}, nil
		},
	}
	s := newTestServer(t, b)
	r := do(t, s, "PUT", "/api/v1/devices/d1", `{}`, "If-None-Match", "*")
	if r.code != http.StatusCreated || r.header.Get("ETag") != `"7"` {
		t.Errorf("create: %d, ETag %q", r.code, r.header.Get("ETag"))
	}
	created = false
	if r := do(t, s, "PUT", "/api/v1/devices/d1", `{}`, "If-Match", `W/"7"`); r.code != http.StatusOK {
		t.Errorf("update: %d", r.code)
	}
	if r := do(t, s, "DELETE", "/api/v1/devices/d1", "", "If-Match", `"7"`); r.code != http.StatusNoContent || r.body != "" {
		t.Errorf("delete: %d %q", r.code, r.body)
	}
	want := []WriteOptions{{IfNoneMatch: "*"}, {IfMatch: "7"}, {IfMatch: "7"}}
	if !slices.Equal(opts, want) {
		t.Errorf("preconditions %+v, want %+v", opts, want)
	}
	r = do(t, s, "PUT", "/api/v1/deployments/x?dryRun=true", `{"content":`+validManifest+`}`)
	var dry DryRunResult
	if r.code != http.StatusOK || json.Unmarshal([]byte(r.body), &dry) != nil || dry.TargetedCount != 3 || dry.WouldApplyCount != 2 {
		t.Errorf("dry run: %d %s", r.code, r.body)
	}
	if r := do(t, s, "POST", "/api/v1/devices/d1/keys/regenerate", `{"key":"secondary"}`); r.code != http.StatusOK || r.header.Get("ETag") != `"9"` {
		t.Errorf("regenerate: %d %s", r.code, r.body)
	}
	if r := do(t, s, "POST", "/api/v1/devices/d1/keys/regenerate", `{"key":"tertiary"}`); r.code != http.StatusBadRequest || r.err.Field != "key" {
		t.Errorf("regenerate a third key: %d %+v", r.code, r.err)
	}
}

// TestServer_QueryParameters: paging, filters and options reach the
// backend as given; bad ones are refused naming the parameter.
func TestServer_QueryParameters(t *testing.T) {
	var devQ DeviceQuery
	var depQ DeploymentQuery
	var stQ StatusQuery
	var histLimit int
	b := &fakeBackend{
		devices: func(_ context.Context, q DeviceQuery) (DevicePage, error) {
			devQ = q
			return DevicePage{Items: []DeviceView{}}, nil
		},
		deployments: func(_ context.Context, q DeploymentQuery) (DeploymentPage, error) {
			depQ = q
			return DeploymentPage{}, nil
		},
		deploymentStatus: func(_ context.Context, _ string, q StatusQuery) (DeploymentStatus, error) {
			stQ = q
			return DeploymentStatus{}, nil
		},
		history: func(_ context.Context, _ bool, _ string, limit int) (HistoryPage, error) {
			histLimit = limit
			return HistoryPage{}, nil
		},
	}
	s := newTestServer(t, b)
	if r := do(t, s, "GET", "/api/v1/devices?condition=tags.a%3D%271%27&after=d7&limit=50&consistent=1", ""); r.code != 200 {
		t.Fatalf("devices: %d %+v", r.code, r.err)
	}
	if want := (DeviceQuery{Condition: "tags.a='1'", After: "d7", Limit: 50, Consistent: true}); devQ != want {
		t.Errorf("device query %+v, want %+v", devQ, want)
	}
	if r := do(t, s, "GET", "/api/v1/devices", ""); r.code != 200 || devQ.Limit != DefaultPageSize {
		t.Errorf("default limit: %d %+v", r.code, devQ)
	}
	if r := do(t, s, "GET", "/api/v1/deployments?label=team%3Da&label=ring%3D&after=b&limit=2", ""); r.code != 200 {
		t.Fatalf("deployments: %d %+v", r.code, r.err)
	}
	if depQ.After != "b" || depQ.Limit != 2 || len(depQ.Labels) != 2 || depQ.Labels["team"] != "a" || depQ.Labels["ring"] != "" {
		t.Errorf("deployment query %+v", depQ)
	}
	if r := do(t, s, "GET", "/api/v1/deployments/x/status?category=unhealthy&soak=45s&after=d1&limit=3", ""); r.code != 200 {
		t.Fatalf("status: %d %+v", r.code, r.err)
	}
	if want := (StatusQuery{Soak: 45 * time.Second, Category: "unhealthy", After: "d1", Limit: 3}); stQ != want {
		t.Errorf("status query %+v, want %+v", stQ, want)
	}
	if r := do(t, s, "GET", "/api/v1/devices/d1/history?limit=5", ""); r.code != 200 || histLimit != 5 {
		t.Errorf("history: %d limit %d", r.code, histLimit)
	}
	before := len(b.Calls())
	for _, tc := range []struct{ target, field string }{
		{"/api/v1/devices?limit=0", "limit"},
		{"/api/v1/devices?limit=1001", "limit"},
		{"/api/v1/devices?limit=ten", "limit"},
		{"/api/v1/deployments?label=team", "label"},
		{"/api/v1/deployments?label=%3Da", "label"},
		{"/api/v1/deployments/x/status?category=happy", "category"},
		{"/api/v1/deployments/x/status?soak=-1s", "soak"},
		{"/api/v1/deployments/x/status?soak=forever", "soak"},
		{"/api/v1/deployments/x/history?limit=-3", "limit"},
	} {
		if r := do(t, s, "GET", tc.target, ""); r.code != 400 || r.err.Field != tc.field || r.err.Code != "bad_request" {
			t.Errorf("GET %s: %d %+v; want 400 naming %s", tc.target, r.code, r.err, tc.field)
		}
	}
	if calls := b.Calls()[before:]; len(calls) != 0 {
		t.Errorf("refused queries reached the backend: %v", calls)
	}
}

// TestServer_Health: /healthz answers while the node is up; /readyz
// answers 503 with the reason until the backend is ready. Neither needs
// the token.
func TestServer_Health(t *testing.T) {
	ready := errors.New("no raft leader")
	b := &fakeBackend{ready: func(context.Context) error { return ready }}
	s := newTestServer(t, b)
	get := func(path string) (int, Health) {
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		var h Health
		if err := json.Unmarshal(rec.Body.Bytes(), &h); err != nil {
			t.Fatalf("%s: %d %q", path, rec.Code, rec.Body)
		}
		return rec.Code, h
	}
	if code, h := get("/readyz"); code != http.StatusServiceUnavailable || h.Status != "no raft leader" || h.NodeID != "fake" {
		t.Errorf("/readyz while not ready: %d %+v", code, h)
	}
	if code, h := get("/healthz"); code != http.StatusOK || h.Status != "ok" {
		t.Errorf("/healthz while not ready: %d %+v", code, h)
	}
	ready = nil
	if code, h := get("/readyz"); code != http.StatusOK || h.Status != "ok" {
		t.Errorf("/readyz when ready: %d %+v", code, h)
	}
}

// TestServer_Token: the token is required, compared exactly, replaced by
// SetToken; a server without one cannot be built.
func TestServer_Token(t *testing.T) {
	if _, err := NewServer(ServerConfig{Backend: &fakeBackend{}}); err == nil {
		t.Error("a server without a token was built")
	}
	if _, err := NewServer(ServerConfig{Token: "t"}); err == nil {
		t.Error("a server without a backend was built")
	}
	b := &fakeBackend{enrollments: func(context.Context) ([]fleet.Enrollment, error) { return nil, nil }}
	s := newTestServer(t, b)
	status := func(auth string) int {
		req := httptest.NewRequest("GET", "/api/v1/enrollments", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec.Code
	}
	for _, auth := range []string{"", testToken, "Bearer", "Bearer " + testToken + " ", "bearer " + testToken, "Basic " + testToken} {
		if code := status(auth); code != http.StatusUnauthorized {
			t.Errorf("Authorization %q: %d, want 401", auth, code)
		}
	}
	if code := status("Bearer " + testToken); code != http.StatusOK {
		t.Errorf("the token: %d", code)
	}
	s.SetToken("rotated")
	if code := status("Bearer " + testToken); code != http.StatusUnauthorized {
		t.Errorf("the rotated-out token: %d, want 401", code)
	}
	if code := status("Bearer rotated"); code != http.StatusOK {
		t.Errorf("the new token: %d", code)
	}
	if calls := b.Calls(); len(calls) != 2 {
		t.Errorf("the backend saw %d calls, want the 2 authorised ones", len(calls))
	}
}

// TestServer_Backup: the archive is sent with its size and type; a backup
// that fails is an error response, not a truncated download.
func TestServer_Backup(t *testing.T) {
	archive := strings.Repeat("tar!", 1000)
	fail := error(nil)
	b := &fakeBackend{backup: func(context.Context) (io.ReadCloser, int64, error) {
		if fail != nil {
			return nil, 0, fail
		}
		return io.NopCloser(strings.NewReader(archive)), int64(len(archive)), nil
	}}
	s := newTestServer(t, b)
	r := do(t, s, "GET", "/api/v1/backup", "")
	if r.code != 200 || r.body != archive || r.header.Get("Content-Type") != "application/x-tar" || r.header.Get("Content-Length") != "4000" {
		t.Errorf("backup: %d, %d bytes, headers %v", r.code, len(r.body), r.header)
	}
	fail = fmt.Errorf("snapshot: %w", ErrUnavailable)
	if r := do(t, s, "GET", "/api/v1/backup", ""); r.code != 503 || r.err.Code != "unavailable" {
		t.Errorf("failed backup: %d %+v", r.code, r.err)
	}
}

// TestServer_UnknownRoutes: a path under /api/ that is no route is a JSON
// 404 for a caller with the token, a 401 for anyone else.
func TestServer_UnknownRoutes(t *testing.T) {
	s := newTestServer(t, &fakeBackend{})
	if r := do(t, s, "GET", "/api/v1/nothing", ""); r.code != 404 || !strings.Contains(r.err.Message, "no route GET /api/v1/nothing") {
		t.Errorf("unknown route: %d %+v", r.code, r.err)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest("GET", "/api/v1/nothing", nil))
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("unknown route without a token: %d", rec.Code)
	}
}

// TestServer_ObserveRequest: the metrics hook hears each request's route
// pattern (never the raw path, so stray paths cannot grow the label set)
// and status.
func TestServer_ObserveRequest(t *testing.T) {
	type seen struct {
		pattern string
		status  int
	}
	var got []seen
	b := &fakeBackend{deleteDevice: func(context.Context, string, WriteOptions) error { return nil }}
	s := newTestServer(t, b, func(c *ServerConfig) {
		c.ObserveRequest = func(p string, status int, _ time.Duration) { got = append(got, seen{p, status}) }
	})
	do(t, s, "DELETE", "/api/v1/devices/d1", "")
	do(t, s, "PUT", "/api/v1/devices/d1", "{")
	do(t, s, "GET", "/api/v1/nowhere", "")
	want := []seen{{"DELETE /api/v1/devices/{id}", 204}, {"PUT /api/v1/devices/{id}", 400}, {"/api/", 404}}
	if !slices.Equal(got, want) {
		t.Errorf("observed %+v, want %+v", got, want)
	}
}
