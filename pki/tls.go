package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// Every party is this binary, so there is no old client to accommodate:
// TLS 1.3 only, which also keeps node certificates out of the clear.
const minTLSVersion = tls.VersionTLS13

// ServerTLS is the configuration a node serves raft, node-to-node and join
// traffic with. It presents the node certificate followed by the CA, so a
// joiner can check its pin. A client certificate is optional, since a joiner
// has none yet, but one that is sent must verify against the CA; handlers
// for node-only paths must check PeerNodeID.
func (b *Bundle) ServerTLS() *tls.Config {
	cert := b.Node
	cert.Certificate = [][]byte{b.Node.Certificate[0], b.CA.Cert.Raw}
	return &tls.Config{
		MinVersion:   minTLSVersion,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    b.CA.Pool(),
	}
}

// PeerClientTLS is the configuration a node dials another node with. It
// always sends the node certificate and accepts a server whose certificate
// verifies against the CA and carries a node identity. Host names are not
// checked, because peers are dialed by raft address, which may be an IP the
// certificate does not list; the CA and the identity are what authorise.
func (b *Bundle) PeerClientTLS() *tls.Config {
	node := b.Node
	roots := b.CA.Pool()
	return &tls.Config{
		MinVersion: minTLSVersion,
		// Sent unconditionally, rather than matched against the server's
		// acceptable CAs, so a CA mismatch fails loudly at the server
		// instead of silently downgrading to an anonymous connection.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &node, nil },
		InsecureSkipVerify:   true, // replaced by VerifyConnection: CA and node identity, no host name
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := verifyNode(cs.PeerCertificates, roots)
			return err
		},
	}
}

// PinnedClientTLS is the configuration a joiner dials the cluster with,
// holding only the CA fingerprint from its join token. It sends no
// certificate and accepts the server only if the presented chain contains a
// CA whose fingerprint is caFingerprint and the leaf verifies against that
// CA and carries a node identity.
func PinnedClientTLS(caFingerprint string) *tls.Config {
	pin := strings.ToLower(strings.TrimSpace(caFingerprint))
	return &tls.Config{
		MinVersion:         minTLSVersion,
		InsecureSkipVerify: true, // replaced by VerifyConnection: the pin takes the place of a root store
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			var presented *x509.Certificate
			for _, c := range cs.PeerCertificates[1:] {
				if !c.IsCA || !c.BasicConstraintsValid {
					continue
				}
				if fingerprint(c) == pin {
					roots := x509.NewCertPool()
					roots.AddCert(c)
					_, err := verifyNode(cs.PeerCertificates[:1], roots)
					return err
				}
				if presented == nil {
					presented = c
				}
			}
			if presented == nil {
				return fmt.Errorf("server sent no cluster CA to check against the join token's %s: %w", short(pin), ErrWrongCluster)
			}
			return fmt.Errorf("server's cluster CA %s does not match the join token's %s: %w", short(fingerprint(presented)), short(pin), ErrWrongCluster)
		},
	}
}

// PeerNodeID returns the node id of the verified client certificate of a
// server-side connection. ok is false for a client without a certificate
// (a joiner) and for one whose certificate has no node identity.
func PeerNodeID(cs tls.ConnectionState) (string, bool) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", false
	}
	return NodeIdentity(cs.VerifiedChains[0][0])
}

// verifyNode verifies the leaf of a server's chain against roots and returns
// its node id. The rest of the chain is ignored: node certificates are
// issued by the CA directly, and the CA must come from roots, not the peer.
func verifyNode(certs []*x509.Certificate, roots *x509.CertPool) (string, error) {
	if len(certs) == 0 {
		return "", errors.New("peer sent no certificate")
	}
	leaf := certs[0]
	opts := x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	if _, err := leaf.Verify(opts); err != nil {
		return "", fmt.Errorf("verify peer certificate %q: %w", leaf.Subject.CommonName, err)
	}
	id, ok := NodeIdentity(leaf)
	if !ok {
		return "", fmt.Errorf("peer certificate %q: %w", leaf.Subject.CommonName, ErrNotNode)
	}
	return id, nil
}

func short(fp string) string {
	if len(fp) > 12 {
		return fp[:12]
	}
	return fp
}

// CertID identifies a node certificate: the node it names, its SHA-256
// fingerprint (lowercase hex of the DER) and its serial number (hex). The
// fingerprint is what the cluster binds to a member and what it revokes.
type CertID struct {
	NodeID      string `json:"nodeId"`
	Fingerprint string `json:"fingerprint"`
	Serial      string `json:"serial"`
}

// IdentityOf is a node certificate's CertID; ok is false for a
// certificate without a node identity. Call it on verified certificates.
func IdentityOf(cert *x509.Certificate) (CertID, bool) {
	id, ok := NodeIdentity(cert)
	if !ok {
		return CertID{}, false
	}
	return CertID{NodeID: id, Fingerprint: fingerprint(cert), Serial: cert.SerialNumber.Text(16)}, true
}

// PeerCertID is the CertID of the verified certificate a peer presented:
// on the server side the client's (ok is false for a client without one, a
// joiner), on the client side the server's (verified by PeerClientTLS).
func PeerCertID(cs tls.ConnectionState) (CertID, bool) {
	if len(cs.VerifiedChains) > 0 && len(cs.VerifiedChains[0]) > 0 {
		return IdentityOf(cs.VerifiedChains[0][0])
	}
	if len(cs.PeerCertificates) > 0 {
		// A client side with InsecureSkipVerify: PeerClientTLS's
		// VerifyConnection verified the leaf against the CA.
		return IdentityOf(cs.PeerCertificates[0])
	}
	return CertID{}, false
}

// NodeCertID is the CertID of this node's own certificate.
func (b *Bundle) NodeCertID() CertID {
	id, _ := IdentityOf(b.Node.Leaf)
	return id
}
