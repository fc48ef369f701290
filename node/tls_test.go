package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
)

// TestTLSByDefault: with no flags, the API and the broker speak TLS with
// the node's certificate from the cluster CA. A client that trusts the CA
// gets in; one that trusts nothing, or speaks plain text, does not.
func TestTLSByDefault(t *testing.T) {
	dir := t.TempDir()
	n, err := New(Config{
		DataDir: dir, NodeID: "n1", HTTPAddr: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0",
		Logger:               slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn})),
		RaftHeartbeatTimeout: 100 * time.Millisecond, RaftElectionTimeout: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop() })
	waitReady(t, n)
	if !strings.HasPrefix(n.URL(), "https://") || !strings.HasPrefix(n.MQTTURL(), "mqtts://") {
		t.Fatalf("default URLs %s and %s are not TLS", n.URL(), n.MQTTURL())
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(n.CACertPEM()) {
		t.Fatal("CACertPEM holds no certificate")
	}
	trusting := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 10 * time.Second}

	// The API: verified by the CA, host name 127.0.0.1 in the certificate.
	c := &api.Client{BaseURL: n.URL(), Token: n.Token(), HTTP: trusting}
	deadline := time.Now().Add(10 * time.Second)
	for {
		h, err := c.Health(context.Background())
		if err == nil && h.Leader != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health over TLS: %+v, %v", h, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := c.PutDevice(context.Background(), "press-01", api.DeviceRequest{}, api.WriteOptions{}); err != nil {
		t.Fatalf("write over TLS: %v", err)
	}
	// Without the CA the certificate is unknown; plain HTTP gets no API.
	if _, err := (&http.Client{Timeout: 5 * time.Second}).Get(n.URL() + "/healthz"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client without the CA: %v, want a certificate error", err)
	}
	if resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + strings.TrimPrefix(n.URL(), "https://") + "/healthz"); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var h api.Health
		if resp.StatusCode == 200 && json.Unmarshal(body, &h) == nil {
			t.Errorf("plain HTTP reached the API: %s", body)
		}
	}

	// The broker: MQTT over TLS with the device's key; plain MQTT is not
	// served.
	dev, err := c.PutDevice(context.Background(), "press-02", api.DeviceRequest{}, api.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := n.MQTTAddr()
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatalf("TLS to the broker: %v", err)
	}
	pc := paho.NewClient(paho.ClientConfig{Conn: conn, PacketTimeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key := dev.Authentication.SymmetricKey.PrimaryKey
	ack, err := pc.Connect(ctx, &paho.Connect{ClientID: "press-02", Username: "press-02", UsernameFlag: true,
		Password: []byte(key), PasswordFlag: true, KeepAlive: 30, CleanStart: true})
	if err != nil || ack.ReasonCode != 0 {
		t.Fatalf("MQTT over TLS: %+v, %v", ack, err)
	}
	pc.Disconnect(&paho.Disconnect{})
	plain, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	pp := paho.NewClient(paho.ClientConfig{Conn: plain, PacketTimeout: 5 * time.Second})
	if ack, err := pp.Connect(ctx, &paho.Connect{ClientID: "press-02", Username: "press-02", UsernameFlag: true,
		Password: []byte(key), PasswordFlag: true, KeepAlive: 30, CleanStart: true}); err == nil && ack.ReasonCode == 0 {
		t.Errorf("plain MQTT was accepted by a TLS broker")
	}
}
