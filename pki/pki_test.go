package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNewCA(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ca, err := NewCA("prod", now)
	if err != nil {
		t.Fatal(err)
	}
	c := ca.Cert
	checks := []struct {
		name string
		ok   bool
	}{
		{"common name", c.Subject.CommonName == "appliance cluster CA prod"},
		{"is CA", c.IsCA && c.BasicConstraintsValid},
		{"key usage", c.KeyUsage == x509.KeyUsageCertSign|x509.KeyUsageCRLSign},
		{"not before", c.NotBefore.Equal(now.Add(-time.Hour))},
		{"not after", c.NotAfter.Equal(now.Add(validity))},
		{"ECDSA", c.PublicKeyAlgorithm == x509.ECDSA},
		{"serial up to 128 bits", c.SerialNumber.Sign() > 0 && c.SerialNumber.BitLen() <= 128},
		{"self-signed", c.CheckSignatureFrom(c) == nil},
		{"fingerprint is 64 lowercase hex", len(ca.Fingerprint()) == 64 && strings.ToLower(ca.Fingerprint()) == ca.Fingerprint()},
	}
	for _, ck := range checks {
		if !ck.ok {
			t.Errorf("%s: wrong in %+v", ck.name, c)
		}
	}
	other := newTestCA(t, "prod")
	if other.Fingerprint() == ca.Fingerprint() || other.Cert.SerialNumber.Cmp(c.SerialNumber) == 0 {
		t.Error("two CAs share a fingerprint or serial")
	}
}

func TestParseCA(t *testing.T) {
	ca := newTestCA(t, "alpha")
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := newTestCA(t, "beta").KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cert    []byte
		key     []byte
		wantErr bool
		wantKey bool
	}{
		{name: "cert and key", cert: ca.CertPEM(), key: keyPEM, wantKey: true},
		{name: "cert only", cert: ca.CertPEM()},
		{name: "key of another CA", cert: ca.CertPEM(), key: otherKey, wantErr: true},
		{name: "key in place of cert", cert: keyPEM, wantErr: true},
		{name: "garbage key", cert: ca.CertPEM(), key: []byte("nope"), wantErr: true},
		{name: "empty", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCA(tt.cert, tt.key)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error: %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if got.Fingerprint() != ca.Fingerprint() || (got.Key != nil) != tt.wantKey {
				t.Errorf("got fingerprint %s key %v", got.Fingerprint(), got.Key != nil)
			}
		})
	}
}

func TestCA_IssueNode(t *testing.T) {
	ca := newTestCA(t, "alpha")
	verifier, err := ParseCA(ca.CertPEM(), nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		ca      *CA
		id      string
		wantErr error
	}{
		{name: "plain", ca: ca, id: "node-1"},
		{name: "all allowed characters", ca: ca, id: "Node_1.example-A"},
		{name: "128 characters", ca: ca, id: strings.Repeat("n", 128)},
		{name: "empty", ca: ca, id: "", wantErr: ErrInvalidNodeID},
		{name: "129 characters", ca: ca, id: strings.Repeat("n", 129), wantErr: ErrInvalidNodeID},
		{name: "slash", ca: ca, id: "a/b", wantErr: ErrInvalidNodeID},
		{name: "space", ca: ca, id: "node 1", wantErr: ErrInvalidNodeID},
		{name: "dot dot", ca: ca, id: "..", wantErr: ErrInvalidNodeID},
		{name: "CA without key", ca: verifier, id: "node-1", wantErr: ErrNoCAKey},
	}
	now := time.Now()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certPEM, keyPEM, err := tt.ca.IssueNode(tt.id, []string{"10.0.0.7", "node-1.local", ""}, now)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tt.id) {
					t.Errorf("error %q does not name the node id", err)
				}
				return
			}
			if len(keyPEM) == 0 {
				t.Error("no key")
			}
			c := parsePEMCert(t, certPEM)
			if _, err := c.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("verify as client: %v", err)
			}
			if id, ok := NodeIdentity(c); !ok || id != tt.id {
				t.Errorf("NodeIdentity = %q, %v", id, ok)
			}
			if c.Subject.CommonName != tt.id || !c.NotAfter.Equal(now.Add(validity).Truncate(time.Second)) {
				t.Errorf("CN %q, NotAfter %v", c.Subject.CommonName, c.NotAfter)
			}
			if !slices.Equal(c.DNSNames, []string{"node-1.local"}) || len(c.IPAddresses) != 1 || !c.IPAddresses[0].Equal(net.ParseIP("10.0.0.7")) {
				t.Errorf("SANs: DNS %v IP %v", c.DNSNames, c.IPAddresses)
			}
		})
	}
}

func TestBundle_SaveLoad(t *testing.T) {
	ca := newTestCA(t, "alpha")
	b := newTestBundle(t, ca, "node-a")
	dir := filepath.Join(t.TempDir(), "pki")
	if _, err := LoadBundle(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("LoadBundle of a missing dir: %v, want fs.ErrNotExist", err)
	}
	if err := b.Save(dir); err != nil {
		t.Fatal(err)
	}
	modes := map[string]fs.FileMode{".": 0o700 | fs.ModeDir, "ca.crt": 0o644, "ca.key": 0o600, "node.crt": 0o644, "node.key": 0o600}
	for name, want := range modes {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode(), want)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != len(modes)-1 {
		t.Errorf("dir holds %d entries, want %d (temp files left behind?)", len(entries), len(modes)-1)
	}

	got, err := LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.NodeID != "node-a" || got.CA.Fingerprint() != ca.Fingerprint() || got.CA.Key == nil ||
		!bytes.Equal(got.Node.Certificate[0], b.Node.Certificate[0]) || got.Node.Leaf == nil {
		t.Errorf("round trip: got %+v", got)
	}

	// A node that may not issue keeps no CA key: it still loads and verifies.
	if err := os.Remove(filepath.Join(dir, "ca.key")); err != nil {
		t.Fatal(err)
	}
	got, err = LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.CA.Key != nil {
		t.Error("CA key loaded from nowhere")
	}
	if _, _, err := got.CA.IssueNode("node-c", nil, time.Now()); !errors.Is(err, ErrNoCAKey) {
		t.Errorf("IssueNode without key: %v", err)
	}
}

func TestBundleFromPEM_RefusesForeignNode(t *testing.T) {
	caA, caZ := newTestCA(t, "alpha"), newTestCA(t, "zulu")
	certPEM, keyPEM, err := caZ.IssueNode("node-z", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := BundleFromPEM(caA.CertPEM(), nil, certPEM, keyPEM); err == nil {
		t.Fatal("bundle accepted a node certificate from another CA")
	}
}

// A device CA issues the hub's server certificate, which a client that
// trusts only that CA accepts for each of the names and addresses given.
func TestDeviceCA_IssueServer(t *testing.T) {
	now := time.Now()
	ca, err := NewDeviceCA("press-01", now)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ca.Cert.Subject.CommonName, "press-01") {
		t.Errorf("CA subject %q", ca.Cert.Subject.CommonName)
	}
	certPEM, keyPEM, err := ca.IssueServer("hub", []string{"127.0.0.5", "appliance-hub"}, now)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.5", "appliance-hub"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: host, CurrentTime: now}); err != nil {
			t.Errorf("verify for %s: %v", host, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "other", CurrentTime: now}); err == nil {
		t.Error("verified for a name not in the certificate")
	}
	loaded, _ := ParseCA(ca.CertPEM(), nil)
	if _, _, err := loaded.IssueServer("hub", nil, now); !errors.Is(err, ErrNoCAKey) {
		t.Errorf("issue without the CA key: %v", err)
	}
}
