package pki

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"appliance/internal/fsutil"
)

// File names inside a bundle directory.
const (
	caCertFile   = "ca.crt"
	caKeyFile    = "ca.key"
	nodeCertFile = "node.crt"
	nodeKeyFile  = "node.key"
)

// Bundle is what one node keeps on disk: the cluster CA (with its key on
// nodes that may issue certificates to joiners) and the node's own
// certificate. Node.Leaf is always set; Node.Certificate holds the leaf only.
type Bundle struct {
	CA     *CA
	Node   tls.Certificate
	NodeID string
}

// NewBundle issues a node certificate for nodeID from ca.
func NewBundle(ca *CA, nodeID string, hosts []string, now time.Time) (*Bundle, error) {
	certPEM, keyPEM, err := ca.IssueNode(nodeID, hosts, now)
	if err != nil {
		return nil, err
	}
	var caKeyPEM []byte
	if ca.Key != nil {
		if caKeyPEM, err = ca.KeyPEM(); err != nil {
			return nil, err
		}
	}
	return BundleFromPEM(ca.CertPEM(), caKeyPEM, certPEM, keyPEM)
}

// BundleFromPEM assembles a bundle; caKeyPEM may be nil. The node
// certificate must be signed by the CA and carry a node identity. Its
// validity period is deliberately not checked here: a node whose clock is
// wrong at boot should still load its bundle, and the handshake will report
// an expired certificate precisely.
func BundleFromPEM(caCertPEM, caKeyPEM, nodeCertPEM, nodeKeyPEM []byte) (*Bundle, error) {
	ca, err := ParseCA(caCertPEM, caKeyPEM)
	if err != nil {
		return nil, err
	}
	node, err := tls.X509KeyPair(nodeCertPEM, nodeKeyPEM)
	if err != nil {
		return nil, fmt.Errorf("node certificate and key: %w", err)
	}
	node.Certificate = node.Certificate[:1]
	if node.Leaf == nil { // only under GODEBUG=x509keypairleaf=0
		if node.Leaf, err = x509.ParseCertificate(node.Certificate[0]); err != nil {
			return nil, fmt.Errorf("node certificate: %w", err)
		}
	}
	if err := node.Leaf.CheckSignatureFrom(ca.Cert); err != nil {
		return nil, fmt.Errorf("node certificate %q: not issued by %q: %w", node.Leaf.Subject.CommonName, ca.Cert.Subject.CommonName, err)
	}
	id, ok := NodeIdentity(node.Leaf)
	if !ok {
		return nil, fmt.Errorf("node certificate %q: %w", node.Leaf.Subject.CommonName, ErrNotNode)
	}
	return &Bundle{CA: ca, Node: node, NodeID: id}, nil
}

// LoadBundle reads a bundle saved by Save. ca.key is optional. When ca.crt
// is absent the error matches fs.ErrNotExist, so a caller can tell "this
// node has no identity yet" from a damaged bundle.
func LoadBundle(dir string) (*Bundle, error) {
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }
	caCert, err := read(caCertFile)
	if err != nil {
		return nil, fmt.Errorf("load bundle: %w", err)
	}
	caKey, err := read(caKeyFile)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load bundle: %w", err)
	}
	nodeCert, err := read(nodeCertFile)
	if err != nil {
		return nil, fmt.Errorf("load bundle: %w", err)
	}
	nodeKey, err := read(nodeKeyFile)
	if err != nil {
		return nil, fmt.Errorf("load bundle: %w", err)
	}
	b, err := BundleFromPEM(caCert, caKey, nodeCert, nodeKey)
	if err != nil {
		return nil, fmt.Errorf("load bundle %s: %w", dir, err)
	}
	return b, nil
}

// Save writes the bundle to dir (mode 0700): keys 0600, certificates 0644,
// each file atomically. ca.crt is written last: since LoadBundle treats its
// absence as "no bundle", a crash part way leaves a directory that reads as
// empty rather than one with a CA but no node certificate. A bundle without
// a CA key leaves an existing ca.key alone: deleting key material is a
// decision for the caller, not a side effect of saving.
func (b *Bundle) Save(dir string) error {
	nodeKey, err := keyPEM(b.Node.PrivateKey)
	if err != nil {
		return fmt.Errorf("save bundle: node key: %w", err)
	}
	type file struct {
		name string
		data []byte
		mode fs.FileMode
	}
	files := []file{
		{nodeKeyFile, nodeKey, 0o600},
		{nodeCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b.Node.Certificate[0]}), 0o644},
	}
	if b.CA.Key != nil {
		caKey, err := b.CA.KeyPEM()
		if err != nil {
			return fmt.Errorf("save bundle: %w", err)
		}
		files = append([]file{{caKeyFile, caKey, 0o600}}, files...)
	}
	files = append(files, file{caCertFile, b.CA.CertPEM(), 0o644})

	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save bundle: %w", err)
	}
	// MkdirAll leaves an existing directory's mode alone, and it holds keys.
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("save bundle: %w", err)
	}
	for _, f := range files {
		if err := fsutil.WriteFileAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return fmt.Errorf("save bundle: %w", err)
		}
	}
	return syncDir(dir)
}

// syncDir makes the renames durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("save bundle: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save bundle: sync %s: %w", dir, err)
	}
	return nil
}
