package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"
)

const (
	validity     = 10 * 365 * 24 * time.Hour
	clockSkew    = time.Hour // NotBefore is backdated so a peer whose clock lags still accepts a fresh cert
	organization = "appliance"
	nodeOU       = "appliance-node"
	nodeURIHost  = "node"
	uriScheme    = "appliance"
)

// CA is the cluster certificate authority. Key is nil for a CA that was
// loaded without its key: it verifies peers but cannot issue.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA creates a self-signed ECDSA P-256 CA valid for ten years.
func NewCA(clusterName string, now time.Time) (*CA, error) {
	return newCA("appliance cluster CA "+clusterName, now)
}

// NewDeviceCA creates a device's own CA (ECDSA P-256, ten years), the root
// its device hub's modules trust: it signs only the hub's server
// certificate (IssueServer) and never leaves the device.
func NewDeviceCA(deviceID string, now time.Time) (*CA, error) {
	return newCA("appliance device CA "+deviceID, now)
}

func newCA(commonName string, now time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{organization}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // node certs are issued directly; there are no intermediates
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// ParseCA parses a CA certificate and, if keyPEM is not nil, its PKCS#8 (or
// SEC 1) private key, which must match the certificate.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, fmt.Errorf("CA certificate %q: not a CA", cert.Subject.CommonName)
	}
	ca := &CA{Cert: cert}
	if keyPEM == nil {
		return ca, nil
	}
	if ca.Key, err = parseKeyPEM(keyPEM); err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	if !publicKeyEqual(ca.Key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("CA key: does not match CA certificate %q", cert.Subject.CommonName)
	}
	return ca, nil
}

// CertPEM returns the CA certificate as PEM.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// KeyPEM returns the CA key as a PKCS#8 "PRIVATE KEY" PEM block.
func (ca *CA) KeyPEM() ([]byte, error) {
	if ca.Key == nil {
		return nil, ErrNoCAKey
	}
	return keyPEM(ca.Key)
}

// Fingerprint is the lowercase hex SHA-256 of the CA certificate, the value
// join tokens pin.
func (ca *CA) Fingerprint() string { return fingerprint(ca.Cert) }

// Pool returns a pool holding only the CA certificate.
func (ca *CA) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return pool
}

// IssueNode issues a certificate and a new ECDSA P-256 key for nodeID, valid
// for 10 years (but never past the CA), for both server and client auth.
// Each host becomes an IP SAN if it parses as an IP, else a DNS SAN; they are
// informational, since peers check node identity, not host names.
func (ca *CA) IssueNode(nodeID string, hosts []string, now time.Time) (certPEM, keyPEMBytes []byte, err error) {
	if ca.Key == nil {
		return nil, nil, fmt.Errorf("issue node certificate %q: %w", nodeID, ErrNoCAKey)
	}
	if err := ValidateNodeID(nodeID); err != nil {
		return nil, nil, err
	}
	return ca.issue(&x509.Certificate{
		Subject: pkix.Name{
			CommonName:         nodeID,
			Organization:       []string{organization},
			OrganizationalUnit: []string{nodeOU},
		},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{nodeURI(nodeID)},
	}, hosts, now)
}

// IssueServer issues a TLS server certificate and a new ECDSA P-256 key
// for commonName, valid for 10 years (but never past the CA), for server
// auth only. Each host becomes an IP SAN if it parses as an IP, else a DNS
// SAN: clients check the name they dialled against them.
func (ca *CA) IssueServer(commonName string, hosts []string, now time.Time) (certPEM, keyPEMBytes []byte, err error) {
	if ca.Key == nil {
		return nil, nil, fmt.Errorf("issue server certificate %q: %w", commonName, ErrNoCAKey)
	}
	return ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName, Organization: []string{organization}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, hosts, now)
}

// issue completes tmpl (serial, validity, key usage, hosts as IP or DNS
// SANs), signs it with a new ECDSA P-256 key, and returns both as PEM.
func (ca *CA) issue(tmpl *x509.Certificate, hosts []string, now time.Time) (certPEM, keyPEMBytes []byte, err error) {
	name := tmpl.Subject.CommonName
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key for %q: %w", name, err)
	}
	if tmpl.SerialNumber, err = newSerial(); err != nil {
		return nil, nil, err
	}
	tmpl.NotBefore = now.Add(-clockSkew)
	tmpl.NotAfter = now.Add(validity)
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %q: %w", name, err)
	}
	if keyPEMBytes, err = keyPEM(key); err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEMBytes, nil
}

// ValidateNodeID reports whether id can name a node: 1-128 characters of
// A-Z a-z 0-9 . _ -, and not "." or ".." (callers may use ids as file
// names).
func ValidateNodeID(id string) error {
	ok := len(id) >= 1 && len(id) <= 128 && id != "." && id != ".."
	for i := 0; ok && i < len(id); i++ {
		c := id[i]
		ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
	}
	if !ok {
		return fmt.Errorf("node id %q: %w", id, ErrInvalidNodeID)
	}
	return nil
}

// NodeIdentity returns the node id of a certificate issued by IssueNode. It
// requires OU "appliance-node" and the URI SAN "appliance://node/<id>"; it
// does not verify the signature, so call it on verified certificates only.
func NodeIdentity(cert *x509.Certificate) (nodeID string, ok bool) {
	if cert == nil || !slices.Contains(cert.Subject.OrganizationalUnit, nodeOU) {
		return "", false
	}
	for _, u := range cert.URIs {
		if u.Scheme != uriScheme || u.Host != nodeURIHost || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			continue
		}
		id, found := strings.CutPrefix(u.Path, "/")
		if found && ValidateNodeID(id) == nil {
			return id, true
		}
	}
	return "", false
}

func nodeURI(id string) *url.URL {
	return &url.URL{Scheme: uriScheme, Host: nodeURIHost, Path: "/" + id}
}

func fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:])
}

func newSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return serial, nil
}

func keyPEM(key any) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseCertPEM(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("no CERTIFICATE PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	return cert, nil
}

func parseKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("no PEM block")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("private key of type %T cannot sign", key)
	}
	return signer, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
