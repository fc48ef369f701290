package pki

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"
)

func TestTLS_Handshake(t *testing.T) {
	caA, caZ := newTestCA(t, "alpha"), newTestCA(t, "zulu")
	a, b := newTestBundle(t, caA, "node-a"), newTestBundle(t, caA, "node-b")
	z := newTestBundle(t, caZ, "node-z")

	plain := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{plainServerCert(t, caA)}}
	leafOnly := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{a.Node}}
	// A server of cluster Z that appends cluster A's CA to its chain, hoping
	// the joiner checks only that the pinned CA is present.
	zWithA := z.Node
	zWithA.Certificate = [][]byte{z.Node.Certificate[0], caA.Cert.Raw}
	impostor := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{zWithA}}
	// A client that accepts any server and always sends z's certificate, to
	// exercise the server's own verification.
	zAnyServer := &tls.Config{
		MinVersion:           tls.VersionTLS13,
		InsecureSkipVerify:   true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &z.Node, nil },
	}

	tests := []struct {
		name           string
		server, client *tls.Config
		wantServerErr  bool
		serverErrText  string
		wantClientErr  bool
		clientErrIs    error
		clientErrText  string
		wantPeer       string // "" means PeerNodeID must report ok=false
	}{
		{name: "node b dials node a", server: a.ServerTLS(), client: b.PeerClientTLS(), wantPeer: "node-b"},
		{name: "node a dials node b", server: b.ServerTLS(), client: a.PeerClientTLS(), wantPeer: "node-a"},
		{name: "client cert from another cluster", server: a.ServerTLS(), client: zAnyServer, wantServerErr: true, serverErrText: "unknown authority", wantClientErr: true},
		{name: "node of another cluster dials", server: a.ServerTLS(), client: z.PeerClientTLS(), wantServerErr: true, wantClientErr: true, clientErrText: "unknown authority"},
		{name: "joiner with the right pin", server: a.ServerTLS(), client: PinnedClientTLS(caA.Fingerprint())},
		{name: "joiner pin in upper case", server: a.ServerTLS(), client: PinnedClientTLS(strings.ToUpper(caA.Fingerprint()))},
		{
			name: "joiner with another cluster's pin", server: a.ServerTLS(), client: PinnedClientTLS(caZ.Fingerprint()),
			wantServerErr: true, wantClientErr: true, clientErrIs: ErrWrongCluster,
			clientErrText: "server's cluster CA " + caA.Fingerprint()[:12] + " does not match the join token's " + caZ.Fingerprint()[:12] + ": wrong cluster or wrong token",
		},
		{name: "joiner, server sends no CA", server: leafOnly, client: PinnedClientTLS(caA.Fingerprint()), wantServerErr: true, wantClientErr: true, clientErrIs: ErrWrongCluster},
		{name: "joiner, pinned CA appended to a foreign leaf", server: impostor, client: PinnedClientTLS(caA.Fingerprint()), wantServerErr: true, wantClientErr: true, clientErrText: "unknown authority"},
		{name: "peer refuses leaf without node identity", server: plain, client: b.PeerClientTLS(), wantServerErr: true, wantClientErr: true, clientErrIs: ErrNotNode},
		{name: "joiner refuses leaf without node identity", server: plain, client: PinnedClientTLS(caA.Fingerprint()), wantServerErr: true, wantClientErr: true, clientErrIs: ErrNotNode},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := handshake(t, tt.server, tt.client)
			t.Logf("server: %v; client: %v", res.serverErr, res.clientErr)
			if (res.serverErr != nil) != tt.wantServerErr {
				t.Errorf("server error = %v, want error: %v", res.serverErr, tt.wantServerErr)
			}
			if tt.serverErrText != "" && (res.serverErr == nil || !strings.Contains(res.serverErr.Error(), tt.serverErrText)) {
				t.Errorf("server error = %v, want it to contain %q", res.serverErr, tt.serverErrText)
			}
			if (res.clientErr != nil) != tt.wantClientErr {
				t.Fatalf("client error = %v, want error: %v", res.clientErr, tt.wantClientErr)
			}
			if tt.clientErrIs != nil && !errors.Is(res.clientErr, tt.clientErrIs) {
				t.Errorf("client error = %v, want one matching %v", res.clientErr, tt.clientErrIs)
			}
			if tt.clientErrText != "" && !strings.Contains(res.clientErr.Error(), tt.clientErrText) {
				t.Errorf("client error = %q, want it to contain %q", res.clientErr, tt.clientErrText)
			}
			if tt.wantClientErr || tt.wantServerErr {
				return
			}
			if v := res.server.Version; v != tls.VersionTLS13 {
				t.Errorf("negotiated %s, want TLS 1.3", tls.VersionName(v))
			}
			id, ok := PeerNodeID(res.server)
			if ok != (tt.wantPeer != "") || id != tt.wantPeer {
				t.Errorf("PeerNodeID = %q, %v; want %q", id, ok, tt.wantPeer)
			}
		})
	}
}
