package cluster_test

import (
	"cmp"
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"appliance/cluster"
	"appliance/internal/testutil"
	"appliance/pki"
)

// TestJoin_Refused checks the joins a cluster refuses, and that a joiner
// holding the token of another cluster never sends a request (and so
// never its secret) to the server it reached.
func TestJoin_Refused(t *testing.T) {
	c := newTestCluster(t, "home")
	other := newTestCluster(t, "other")
	n1 := startFirst(t, c, "n1")
	_, secret, err := pki.ParseJoinToken(c.token)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		token  string
		nodeID string
		// want is in the error's message.
		want string
		// logged is what n1 logs about the attempt.
		logged string
		// unseen: n1 logs nothing about a join at all.
		unseen bool
	}{
		{
			name:   "wrong secret",
			token:  pki.FormatJoinToken(c.ca.Fingerprint(), "not-the-secret"),
			want:   "wrong join token secret",
			logged: "refused a join with a wrong secret",
		},
		{
			// The right secret, pinned to another CA: had the joiner sent
			// it, n1 would have issued a certificate and logged so.
			name:   "token of another cluster",
			token:  pki.FormatJoinToken(other.ca.Fingerprint(), secret),
			want:   "does not match the join token",
			unseen: true,
		},
		{
			// No certificate can name this node: asking again is futile,
			// so a node must not retry it.
			name:   "node id no certificate can carry",
			token:  c.token,
			nodeID: "node one",
			want:   `node id "node one"`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mark := n1.logs.mark()
			nodeID := cmp.Or(tc.nodeID, "joiner")
			resp, err := cluster.Join(testContext(t), "https://"+n1.addr(), tc.token, nodeID, []string{"127.0.0.1"})
			if !errors.Is(err, cluster.ErrRefused) {
				t.Fatalf("Join: %v (credentials %v), want an error wrapping ErrRefused", err, resp != nil)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Join error %q does not say %q", err, tc.want)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("Join error %q shows the secret", err)
			}
			joinLines := n1.logs.since(mark, "join")
			if tc.unseen && len(joinLines) > 0 {
				t.Errorf("n1 saw the join: %q", joinLines)
			}
			if tc.logged != "" && len(n1.logs.since(mark, tc.logged)) != 1 {
				t.Errorf("n1 logged %q, want one line with %q", joinLines, tc.logged)
			}
		})
	}

	t.Run("a joiner with the right token is admitted", func(t *testing.T) {
		resp, err := cluster.Join(testContext(t), n1.addr(), c.token, "joiner", []string{"127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		b, err := pki.BundleFromPEM([]byte(resp.CACert), []byte(resp.CAKey), []byte(resp.NodeCert), []byte(resp.NodeKey))
		if err != nil {
			t.Fatal(err)
		}
		if b.NodeID != "joiner" || b.CA.Fingerprint() != c.ca.Fingerprint() || resp.JoinToken != c.token || resp.AdminToken != c.admin {
			t.Fatalf("credentials for %q of CA %s, tokens %q %q", b.NodeID, b.CA.Fingerprint(), resp.JoinToken, resp.AdminToken)
		}
	})
}

// TestJoin_PinCheckedBeforeAnyRequest serves a cluster port whose HTTP
// side only counts requests, and checks that a joiner pinned to another
// CA sends none, while one pinned to this CA gets through.
func TestJoin_PinCheckedBeforeAnyRequest(t *testing.T) {
	c := newTestCluster(t, "home")
	other := newTestCluster(t, "other")
	logs := newLogRecorder(t, "mux")
	mux, err := cluster.Listen("127.0.0.1:0", "", c.bundle(t, "n1"), logs.logger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mux.Close() })
	var requests atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		http.Error(w, `{"code":"internal","error":"counting only"}`, http.StatusInternalServerError)
	})}
	go srv.Serve(mux.HTTPListener())
	t.Cleanup(func() { srv.Close() })

	_, secret, _ := pki.ParseJoinToken(c.token)
	_, err = cluster.Join(testContext(t), "https://"+mux.Advertise(), pki.FormatJoinToken(other.ca.Fingerprint(), secret), "joiner", nil)
	if !errors.Is(err, cluster.ErrRefused) || !strings.Contains(err.Error(), "does not match the join token") {
		t.Fatalf("Join pinned to another CA: %v, want ErrRefused saying the CA does not match", err)
	}
	if n := requests.Load(); n != 0 {
		t.Fatalf("the server received %d requests from a joiner pinned to another CA", n)
	}

	// The same server does see a joiner pinned to its CA: the count above
	// would have caught a request.
	_, err = cluster.Join(testContext(t), "https://"+mux.Advertise(), c.token, "joiner", nil)
	if err == nil {
		t.Fatal("Join succeeded against a counting server")
	}
	if n := requests.Load(); n != 1 {
		t.Fatalf("the server received %d requests from a joiner pinned to its CA, want 1", n)
	}
}

// TestJoin_RefusedWithoutDialing checks that a join that cannot be right
// (malformed token or URL) is refused before anything is dialed, and that
// an unreachable server is not a refusal (the node retries it).
func TestJoin_RefusedWithoutDialing(t *testing.T) {
	c := newTestCluster(t, "home")
	fp := c.ca.Fingerprint()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	url := "https://" + ln.Addr().String()

	for _, tc := range []struct {
		name, url, token, want string
	}{
		{"empty token", url, "", "APL1"},
		{"not a token", url, "hello", "APL1"},
		{"short fingerprint", url, "APL1" + fp[:10] + "::s", "fingerprint"},
		{"no secret", url, "APL1" + fp, "secret"},
		{"empty secret", url, "APL1" + fp + "::", "secret"},
		{"plain http URL", "http://" + ln.Addr().String(), c.token, "https only"},
		{"URL without a port", "https://127.0.0.1", c.token, "port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := cluster.Join(testContext(t), tc.url, tc.token, "joiner", nil)
			if !errors.Is(err, cluster.ErrRefused) {
				t.Fatalf("Join: %v, want an error wrapping ErrRefused", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Join error %q does not mention %q", err, tc.want)
			}
			// Connections queue in order: had Join dialed, its connection
			// would be accepted before this marker one.
			marker, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer marker.Close()
			got, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			got.Close()
			if got.RemoteAddr().String() != marker.LocalAddr().String() {
				t.Fatalf("Join dialed %s before refusing", ln.Addr())
			}
		})
	}

	t.Run("unreachable server is not a refusal", func(t *testing.T) {
		addr := testutil.FreeAddr(t, "127.0.0.1")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := cluster.Join(ctx, "https://"+addr, c.token, "joiner", nil)
		if err == nil || errors.Is(err, cluster.ErrRefused) {
			t.Fatalf("Join to a closed port: %v, want a retryable error", err)
		}
	})
}
