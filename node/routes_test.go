package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/routes"
	"appliance/pki"
	"appliance/ui"
)

// openRoutes are the only API routes served without the admin token: the
// health probes and the dashboard's files (which hold no secret; every API
// call the page makes carries the token). Adding a route here is a
// security decision: say why next to it.
var openRoutes = []string{"GET /healthz", "GET /readyz", ui.Prefix}

// openRPCs are the only cluster RPCs served without a node certificate of
// the cluster: a joiner has none yet and proves the join secret instead.
var openRPCs = []string{"POST /cluster/v1/join"}

// TestAPI_EveryRouteNeedsTheToken walks every route the node's API server
// registered (the mux's own list: a route added tomorrow is walked the day
// it is added) and asks each without a token, with a wrong one and with
// the token rotated out: every one must answer 401 with the JSON error,
// change nothing, and leak nothing.
func TestAPI_EveryRouteNeedsTheToken(t *testing.T) {
	n := startNode(t, t.TempDir())
	ctx := context.Background()
	rotatedOut := n.Token()
	current, err := clientFor(n).RotateAdminToken(ctx)
	if err != nil {
		t.Fatal(err)
	}
	srv := n.apiSrv.Load()
	patterns := srv.Routes()
	for _, want := range append([]string{"GET /api/v1/backup", "GET /metrics", "/api/"}, openRoutes...) {
		if !slices.Contains(patterns, want) {
			t.Errorf("the node does not serve %q (it serves %q)", want, patterns)
		}
	}
	for _, p := range patterns {
		method, path := routes.Example(p)
		if got := srv.Route(httptest.NewRequest(method, path, nil)); got != p {
			t.Fatalf("%s %s is routed to %q, not to the route under test %q", method, path, got, p)
		}
		if slices.Contains(openRoutes, p) {
			continue
		}
		t.Run(p, func(t *testing.T) {
			for _, token := range []string{"", "wrong-token", rotatedOut, current + "x", strings.ToUpper(current)} {
				code, body, hdr := rawRequest(t, method, n.URL()+path, token, `{"tags":{},"key":"primary"}`)
				var eb api.ErrorBody
				if code != http.StatusUnauthorized || json.Unmarshal([]byte(body), &eb) != nil || eb.Error.Code != "unauthorized" {
					t.Errorf("%s %s with token %q: %d %s; want 401 and a JSON unauthorized error", method, path, token, code, body)
				}
				if !strings.HasPrefix(hdr.Get("WWW-Authenticate"), "Bearer") {
					t.Errorf("%s %s: WWW-Authenticate %q", method, path, hdr.Get("WWW-Authenticate"))
				}
				if strings.Contains(body, current) || strings.Contains(body, "BEGIN") {
					t.Errorf("%s %s: the refusal leaks a credential: %s", method, path, body)
				}
			}
		})
	}
	// The refused requests changed nothing: no device, no deployment, no
	// enrollment, no rotation, no member removed.
	c := &api.Client{BaseURL: n.URL(), Token: current}
	if _, err := c.Device(ctx, "x", true); !errors.Is(err, fleet.ErrNotFound) {
		t.Errorf("device x after refused writes: %v", err)
	}
	if _, err := c.Deployment(ctx, "x", true); !errors.Is(err, fleet.ErrNotFound) {
		t.Errorf("deployment x after refused writes: %v", err)
	}
	if _, err := c.Enrollment(ctx, "x"); !errors.Is(err, fleet.ErrNotFound) {
		t.Errorf("enrollment x after refused writes: %v", err)
	}
	if n.Token() != current {
		t.Errorf("the admin token changed after refused requests")
	}
	if v, err := c.Cluster(ctx); err != nil || len(v.Members) != 1 {
		t.Errorf("cluster after refused requests: %+v %v", v, err)
	}
	// The token file is private.
	if st, err := os.Stat(filepath.Join(n.cfg.DataDir, TokenFile)); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("admin token file: %v %v; want mode 0600", st, err)
	}
	// The open routes answer without a token.
	for _, p := range []string{"/healthz", "/readyz", ui.Prefix} {
		if code, body, _ := rawRequest(t, "GET", n.URL()+p, "", ""); code != http.StatusOK {
			t.Errorf("GET %s without a token: %d %s", p, code, body)
		}
	}
}

// TestNode_ServesDashboard: the node itself serves the dashboard at /ui/
// (the page, its script and its style), with its security headers.
func TestNode_ServesDashboard(t *testing.T) {
	n := startNode(t, t.TempDir())
	for _, f := range []struct{ path, contains string }{
		{ui.Prefix, `content="appliance-dashboard"`},
		{ui.Prefix + "app.js", "Authorization"},
		{ui.Prefix + "app.css", "--healthy"},
	} {
		code, body, hdr := rawRequest(t, "GET", n.URL()+f.path, "", "")
		if code != http.StatusOK || !strings.Contains(body, f.contains) {
			t.Errorf("GET %s: %d, body contains %q: %v", f.path, code, f.contains, strings.Contains(body, f.contains))
		}
		if csp := hdr.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
			t.Errorf("GET %s: Content-Security-Policy %q", f.path, csp)
		}
	}
}

// TestCluster_EveryRPCNeedsANodeCertificate walks every cluster RPC the
// node serves on its cluster port (the RPC server's own list) as a client
// that trusts the cluster's CA and knows the join secret (a joiner, or a
// removed node) but holds no node certificate: each answers 401, and the
// join RPC, the one open to joiners, refuses a wrong secret.
func TestCluster_EveryRPCNeedsANodeCertificate(t *testing.T) {
	n := startNode(t, t.TempDir())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: pki.PinnedClientTLS(n.bundle.CA.Fingerprint())}}
	defer hc.CloseIdleConnections()
	_, joinSecret, err := pki.ParseJoinToken(n.JoinToken())
	if err != nil {
		t.Fatal(err)
	}
	patterns := n.rpc.Routes()
	for _, want := range append([]string{"POST /cluster/v1/apply", "GET " + connectionsPath}, openRPCs...) {
		if !slices.Contains(patterns, want) {
			t.Errorf("the cluster port does not serve %q (it serves %q)", want, patterns)
		}
	}
	for _, p := range patterns {
		method, path := routes.Example(p)
		if got := n.rpc.Route(httptest.NewRequest(method, path, nil)); got != p {
			t.Fatalf("%s %s is routed to %q, not to the RPC under test %q", method, path, got, p)
		}
		secret := joinSecret
		if slices.Contains(openRPCs, p) {
			secret = "wrong"
		}
		body := fmt.Sprintf(`{"nodeId":"intruder","hosts":["127.0.0.1"],"secret":%q,"address":"127.0.0.1:1"}`, secret)
		req, err := http.NewRequest(method, "https://"+n.RaftAddr()+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var rpcErr struct{ Code, Error string }
		if resp.StatusCode != http.StatusUnauthorized || json.Unmarshal(data, &rpcErr) != nil || rpcErr.Code != "unauthorized" {
			t.Errorf("%s without a node certificate: %d %s; want 401 unauthorized", p, resp.StatusCode, data)
		}
		if strings.Contains(string(data), "BEGIN") || strings.Contains(string(data), n.Token()) {
			t.Errorf("%s: the refusal leaks a credential: %s", p, data)
		}
	}
	if v, err := clientFor(n).Cluster(context.Background()); err != nil || len(v.Members) != 1 {
		t.Errorf("cluster after refused RPCs: %+v %v", v, err)
	}
}
