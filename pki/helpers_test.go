package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

func newTestCA(t *testing.T, cluster string) *CA {
	t.Helper()
	ca, err := NewCA(cluster, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func newTestBundle(t *testing.T, ca *CA, nodeID string) *Bundle {
	t.Helper()
	b, err := NewBundle(ca, nodeID, []string{"127.0.0.1", "localhost"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// plainServerCert issues, with the cluster CA's key, an ordinary server
// certificate without a node identity: what a stolen CA key or a misuse of
// the CA for another service would produce.
func plainServerCert(t *testing.T, ca *CA) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := newSerial()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "node-x", Organization: []string{"appliance"}},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key}
}

func parsePEMCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// handshakeResult is what each side of a real TLS connection saw.
type handshakeResult struct {
	server    tls.ConnectionState
	serverErr error
	clientErr error
}

// handshake runs a TLS handshake over a 127.0.0.1 listener and then one
// byte from server to client. The byte matters for TLS 1.3: the client's
// handshake completes before the server has checked the client certificate,
// so a rejection only reaches the client on its first read.
func handshake(t *testing.T, server, client *tls.Config) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	type serverSide struct {
		state tls.ConnectionState
		err   error
	}
	done := make(chan serverSide, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- serverSide{err: err}
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(conn, server)
		if err := tc.Handshake(); err != nil {
			done <- serverSide{err: err}
			return
		}
		_, err = tc.Write([]byte{1})
		done <- serverSide{state: tc.ConnectionState(), err: err}
	}()

	var res handshakeResult
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(conn, client)
	res.clientErr = tc.Handshake()
	if res.clientErr == nil {
		if _, err := io.ReadFull(tc, make([]byte, 1)); err != nil {
			res.clientErr = fmt.Errorf("read after handshake: %w", err)
		}
	}
	conn.Close() // unblocks a server still waiting for the client's flight
	s := <-done
	res.server, res.serverErr = s.state, s.err
	return res
}
