// Package testcontroller is a stand-in for a controller's device protocol
// in tests of the agent's device hub: a plain MQTT server (mochi-mqtt,
// admitting everyone) that keeps a device's desired document (retained),
// records its reports, upstream batches and method responses, and sends it
// method requests. The agent's tests of its hub use it to see each batch
// as the agent sent it and to take the controller away and back at will,
// in process; the controller's side of these topics has its own tests
// (node, broker). Tests only.
package testcontroller

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
)

// Controller serves one device.
type Controller struct {
	t        testing.TB
	deviceID string
	addr     string
	log      *slog.Logger

	mu        sync.Mutex
	srv       *mqtt.Server
	desired   []byte
	reports   []fleet.ReportedDocument
	upstream  []fleet.UpstreamMessage
	batches   int
	responses map[string]fleet.MethodResponse
}

// Start serves deviceID on a free port of 127.0.0.1 until the test ends.
func Start(t testing.TB, deviceID string, log *slog.Logger) *Controller {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := &Controller{t: t, deviceID: deviceID, addr: addr, log: log, responses: map[string]fleet.MethodResponse{}}
	c.Resume()
	t.Cleanup(c.Stop)
	return c
}

// URL is the server's mqtt:// address (the same across Stop and Resume).
func (c *Controller) URL() string { return "mqtt://" + c.addr }

// DeviceID is the device it serves.
func (c *Controller) DeviceID() string { return c.deviceID }

// Resume serves again after Stop (the device's desired document is there
// again, retained).
func (c *Controller) Resume() {
	srv := mqtt.New(&mqtt.Options{InlineClient: true, Logger: c.log})
	_ = srv.AddHook(&hook{c: c}, nil)
	if err := srv.AddListener(listeners.NewTCP(listeners.Config{ID: "tcp", Address: c.addr})); err != nil {
		c.t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		c.t.Fatal(err)
	}
	c.mu.Lock()
	c.srv = srv
	desired := c.desired
	c.mu.Unlock()
	if desired != nil {
		_ = srv.Publish(fleet.DesiredTopic(c.deviceID), desired, true, 1)
	}
}

// Stop takes the controller away: the device is disconnected and cannot
// connect until Resume.
func (c *Controller) Stop() {
	c.mu.Lock()
	srv := c.srv
	c.srv = nil
	c.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// SetDesired makes doc the device's desired document and sends it.
func (c *Controller) SetDesired(doc fleet.DesiredDocument) {
	b, _ := json.Marshal(doc)
	c.mu.Lock()
	c.desired = b
	srv := c.srv
	c.mu.Unlock()
	if srv != nil {
		if err := srv.Publish(fleet.DesiredTopic(c.deviceID), b, true, 1); err != nil {
			c.t.Fatal(err)
		}
	}
}

// Invoke sends a direct method request.
func (c *Controller) Invoke(req fleet.MethodRequest) {
	b, _ := json.Marshal(req)
	c.mu.Lock()
	srv := c.srv
	c.mu.Unlock()
	if err := srv.Publish(fleet.MethodsTopic(c.deviceID), b, false, 1); err != nil {
		c.t.Fatal(err)
	}
}

// Response returns the answer to a method request, if it came.
func (c *Controller) Response(id string) (fleet.MethodResponse, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.responses[id]
	return r, ok
}

// Upstream returns the upstream messages received, in order of arrival
// (a batch sent again after a lost acknowledgement appears twice).
func (c *Controller) Upstream() []fleet.UpstreamMessage {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]fleet.UpstreamMessage(nil), c.upstream...)
}

// Batches counts the upstream batches received.
func (c *Controller) Batches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.batches
}

// WaitReport returns the newest report that satisfies cond, waiting for it.
func (c *Controller) WaitReport(timeout time.Duration, what string, cond func(fleet.ReportedDocument) bool) fleet.ReportedDocument {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		for i := len(c.reports) - 1; i >= 0; i-- {
			if cond(c.reports[i]) {
				doc := c.reports[i]
				c.mu.Unlock()
				return doc
			}
		}
		n := len(c.reports)
		c.mu.Unlock()
		if time.Now().After(deadline) {
			c.t.Fatalf("timed out waiting for a report with %s (%d reports)", what, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// MessageIDs returns the upstream messages' messageId system properties,
// each message once (by Seq) in Seq order, failing the test if Seq goes
// backwards.
func MessageIDs(t testing.TB, msgs []fleet.UpstreamMessage) []string {
	seen := map[uint64]bool{}
	var ids []string
	var last uint64
	for _, m := range msgs {
		if seen[m.Seq] {
			continue
		}
		seen[m.Seq] = true
		if m.Seq < last {
			t.Errorf("sequence %d after %d: out of order", m.Seq, last)
		}
		last = m.Seq
		for _, p := range m.SystemProperties {
			if p.Name == "messageId" {
				ids = append(ids, p.Value)
			}
		}
	}
	return ids
}

type hook struct {
	mqtt.HookBase
	c *Controller
}

func (h *hook) ID() string { return "testcontroller" }
func (h *hook) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (h *hook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (h *hook) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }

func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	c := h.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch pk.TopicName {
	case fleet.ReportedTopic(c.deviceID):
		var doc fleet.ReportedDocument
		if err := json.Unmarshal(pk.Payload, &doc); err != nil {
			c.t.Errorf("report does not decode: %v", err)
		}
		c.reports = append(c.reports, doc)
	case fleet.UpstreamTopic(c.deviceID):
		b, err := fleet.DecodeUpstreamBatch(pk.Payload)
		if err != nil {
			c.t.Errorf("upstream batch does not decode: %v", err)
			return pk, packets.ErrPayloadFormatInvalid
		}
		for _, m := range b.Messages {
			m.Body = append([]byte(nil), m.Body...)
			c.upstream = append(c.upstream, m)
		}
		c.batches++
	case fleet.MethodResponseTopic(c.deviceID):
		var r fleet.MethodResponse
		if err := json.Unmarshal(pk.Payload, &r); err != nil {
			c.t.Errorf("method response does not decode: %v", err)
		}
		c.responses[r.ID] = r
	}
	return pk, nil
}

// FreeGateway returns a loopback address (any of 127.0.0.0/8 is loopback
// on Linux) whose port 8883, the Azure SDKs' fixed port, nothing listens
// on now: a random one, so that test runs side by side on one machine (the
// same test of two checkouts included) do not take each other's hub port.
func FreeGateway(t testing.TB) string {
	t.Helper()
	for range 100 {
		var b [3]byte
		_, _ = rand.Read(b[:])
		host := fmt.Sprintf("127.%d.%d.%d", 1+int(b[0])%250, b[1], 1+int(b[2])%250)
		ln, err := net.Listen("tcp", net.JoinHostPort(host, "8883"))
		if err == nil {
			ln.Close()
			return host
		}
	}
	t.Fatal("no loopback address with port 8883 free")
	return ""
}
