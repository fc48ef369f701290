package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"appliance/fleet"
)

// selfSignedTLS returns a server config with a fresh certificate for
// 127.0.0.1 and a client config that trusts only it.
func selfSignedTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "appliance test broker"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12}
	client = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return server, client
}

func TestBroker_TLS(t *testing.T) {
	serverTLS, clientTLS := selfSignedTLS(t)
	f := newTestFleet("press-01")
	b := startBroker(t, f, func(c *Config) { c.TLSConfig = serverTLS })

	d, _, err := dialDevice(t, b.Addr(), "press-01", "key-press-01", clientTLS)
	if err != nil {
		t.Fatalf("connect over TLS: %v", err)
	}
	d.subscribe(t, fleet.DesiredTopic("press-01"))
	d.expectDesired(t, `{"deviceId":"press-01","version":1}`)
	if info, ok := b.Connection("press-01"); !ok || !info.TLS {
		t.Fatalf("Connection = %+v, %v; want TLS", info, ok)
	}

	// Plain MQTT on the TLS port gets no CONNACK.
	if c, err := rawConnect(b.Addr(), "press-01", "key-press-01"); err == nil {
		c.Close()
		t.Fatal("plain-text CONNECT accepted on the TLS listener")
	}
	// A client that opens TCP and never handshakes is closed after ConnectTimeout
	// like any other (covered for plain TCP in TestBroker_PreConnectIdleIsClosed).
}
