package agent

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/broker"
	"appliance/fleet"
	"appliance/internal/spread"
	"appliance/internal/testutil"
)

// The MQTT tests run the agent against the real broker package over TCP on
// 127.0.0.1, with fakes for what the node supplies: device keys, desired
// documents, and a sink for reports.

type controller struct {
	t        testing.TB
	b        *broker.Broker
	deviceID string
	key      string
	// auth, when set, replaces the check of key (set it before an agent
	// connects).
	auth func(deviceID, key string) error

	mu      sync.Mutex
	desired []byte
	reports chan []byte
}

type fakeAuth func(ctx context.Context, deviceID, key string) error

func (f fakeAuth) AuthenticateDevice(ctx context.Context, deviceID, key string) error {
	return f(ctx, deviceID, key)
}

type fakeDesired func(deviceID string) ([]byte, error)

func (f fakeDesired) Desired(deviceID string) ([]byte, error) { return f(deviceID) }

type fakeReports func(deviceID string, report []byte) error

func (f fakeReports) SubmitReport(deviceID string, report []byte) error { return f(deviceID, report) }

// startController starts a broker on addr ("127.0.0.1:0" for any port)
// serving one device.
func startController(t testing.TB, addr, deviceID, key string) *controller {
	t.Helper()
	return startControllerOn(t, addr, nil, deviceID, key)
}

// startControllerTLS starts a broker that speaks MQTT over TLS only.
func startControllerTLS(t testing.TB, tlsCfg *tls.Config, deviceID, key string) *controller {
	t.Helper()
	return startControllerOn(t, "127.0.0.1:0", tlsCfg, deviceID, key)
}

func startControllerOn(t testing.TB, addr string, tlsCfg *tls.Config, deviceID, key string) *controller {
	t.Helper()
	c := &controller{t: t, deviceID: deviceID, key: key, reports: make(chan []byte, 256),
		desired: []byte(`{"version":0,"deploymentId":""}`)}
	b, err := broker.New(broker.Config{
		Addr:      addr,
		TLSConfig: tlsCfg,
		Logger:    testLogger(t),
		Auth: fakeAuth(func(_ context.Context, id, k string) error {
			if c.auth != nil {
				return c.auth(id, k)
			}
			c.mu.Lock()
			want := c.deviceID
			c.mu.Unlock()
			if id != want || k != c.key {
				return errors.New("unknown device or wrong key")
			}
			return nil
		}),
		Desired: fakeDesired(func(string) ([]byte, error) {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.desired, nil
		}),
		Reports: fakeReports(func(_ string, r []byte) error {
			select {
			case c.reports <- r:
				return nil
			default:
				return errors.New("full")
			}
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.b = b
	t.Cleanup(func() { _ = b.Close() })
	return c
}

func (c *controller) url() string { return "mqtt://" + c.b.Addr() }

// setDesired makes doc the device's desired document and pushes it.
func (c *controller) setDesired(doc fleet.DesiredDocument) {
	b := mustJSON(doc)
	c.mu.Lock()
	c.desired = b
	id := c.deviceID
	c.mu.Unlock()
	if err := c.b.PublishDesired(id, b); err != nil && !errors.Is(err, broker.ErrNotConnected) {
		c.t.Errorf("PublishDesired: %v", err)
	}
}

// waitReport waits for a report that satisfies cond; every report must
// decode strictly as a fleet.ReportedDocument.
func (c *controller) waitReport(timeout time.Duration, what string, cond func(fleet.ReportedDocument) bool) fleet.ReportedDocument {
	c.t.Helper()
	timeout = testutil.Bound(timeout)
	deadline := time.After(timeout)
	var last []byte
	for {
		select {
		case r := <-c.reports:
			last = r
			var doc fleet.ReportedDocument
			dec := json.NewDecoder(bytes.NewReader(r))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&doc); err != nil {
				c.t.Fatalf("report does not decode as fleet.ReportedDocument: %v\n%s", err, r)
			}
			if cond(doc) {
				return doc
			}
		case <-deadline:
			c.t.Fatalf("timed out after %s waiting for a report with %s; last report: %s", timeout, what, last)
		}
	}
}

func mqttConfig(t testing.TB, servers ...string) Config {
	cfg := testConfig(t)
	cfg.Servers = servers
	cfg.DeviceKey = "s3cret-device-key"
	return cfg
}

func TestAgent_MQTT_DesiredInReportOut(t *testing.T) {
	out := t.TempDir()
	cfg := mqttConfig(t)
	rec := &recordingHandler{}
	cfg.Logger = slogTee(cfg.Logger, rec)
	ctl := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	cfg.Servers = []string{ctl.url()}

	d := desired(3, "dep-mqtt", map[string]mod{"alpha": processModule(out, nil), "beta": processModule(out, nil)})
	// Registry credentials travel in the manifest: they must never be logged.
	d.ModulesContent = bytes.Replace(d.ModulesContent, []byte(`"settings":{}`),
		[]byte(`"settings":{"registryCredentials":{"r":{"username":"u","password":"registry-pa55word","address":"r.example"}}}`), 1)
	ctl.setDesired(d)
	startAgent(t, cfg)

	doc := ctl.waitReport(waitLong, "version 3, 200, both running", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 3 && d.LastDesiredStatus.Code == fleet.StatusCodeOK && running("alpha", "beta")(d)
	})
	if doc.DeploymentID != "dep-mqtt" || doc.DeviceHealth != "healthy" {
		t.Errorf("report: %+v", doc)
	}
	waitFor(t, waitLong, "both processes", func() bool { return alive(readPid(out, "alpha")) && alive(readPid(out, "beta")) })

	// A new desired document pushed while connected.
	ctl.setDesired(desired(4, "dep-mqtt-2", map[string]mod{"alpha": processModule(out, nil)}))
	doc = ctl.waitReport(waitLong, "version 4 without beta", func(d fleet.ReportedDocument) bool {
		_, beta := d.Modules["beta"]
		return d.LastDesiredVersion == 4 && !beta && running("alpha")(d)
	})
	if doc.DeploymentID != "dep-mqtt-2" {
		t.Errorf("deploymentId %q", doc.DeploymentID)
	}
	for _, secret := range []string{cfg.DeviceKey, "registry-pa55word"} {
		if rec.contains(secret) {
			t.Errorf("a secret was logged: %q", secret)
		}
	}
}

// TestAgent_MQTT_CoalescesReports: while modules change state all the
// time, the agent sends no report until ReportInterval has passed since
// the last one (here it never does: the test counts what the controller
// received, never how far apart it arrived); what it sends then is the
// latest state, read when it sends (agent.reporter).
func TestAgent_MQTT_CoalescesReports(t *testing.T) {
	out := t.TempDir()
	cfg := mqttConfig(t)
	cfg.ReportInterval = time.Hour
	ctl := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	cfg.Servers = []string{ctl.url()}
	ra := startAgent(t, cfg)
	// The first report goes out at once: none was sent before.
	ctl.waitReport(waitLong, "the first report", func(fleet.ReportedDocument) bool { return true })
	// Ten modules crashing and restarting change the state all the time.
	mods := map[string]mod{}
	for _, n := range []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"} {
		mods[n] = processModule(out, map[string]string{"MODULE_EXIT_AFTER": "10ms", "MODULE_EXIT_CODE": "1"})
	}
	ctl.setDesired(desired(1, "dep", mods))
	// Dozens of changes on the device (every module restarted three
	// times, each restart a change of its report)...
	waitReport(t, ra.Agent, waitLong, "every module restarted three times", func(d fleet.ReportedDocument) bool {
		if d.LastDesiredVersion != 1 || len(d.Modules) != len(mods) {
			return false
		}
		for _, m := range d.Modules {
			if m.RestartCount < 3 {
				return false
			}
		}
		return true
	})
	// ...and none of them sent within the interval.
	if n := len(ctl.reports); n != 0 {
		t.Fatalf("%d reports sent within the report interval, want none", n)
	}
}

func TestAgent_MQTT_FailsOverToNextServer(t *testing.T) {
	cfg := mqttConfig(t)
	first := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	second := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	for _, c := range []*controller{first, second} {
		c.setDesired(desired(2, "dep", map[string]mod{}))
	}
	// A dead server first in the device's order: the agent connects to
	// the next one.
	cfg.Servers = []string{deadServer(t), first.url(), second.url()}
	inOrder(t, &cfg, first, second)
	startAgent(t, cfg)
	first.waitReport(waitLong, "a report on the first live server", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 2
	})
	// That server dies: the agent fails over to the next and reports there
	// at once, although nothing changed.
	_ = first.b.Close()
	doc := second.waitReport(waitLong, "a report after failover", func(fleet.ReportedDocument) bool { return true })
	if doc.LastDesiredVersion != 2 || doc.LastDesiredStatus.Code != fleet.StatusCodeOK {
		t.Errorf("report after failover: %+v", doc)
	}
}

// TestAgent_MQTT_ControllerDownAgentRestarts is the offline acceptance
// scenario: the controller dies, modules keep running; the agent restarts
// while the controller is still down and restarts its modules from local
// state; the controller comes back and the agent reconnects and reports.
func TestAgent_MQTT_ControllerDownAgentRestarts(t *testing.T) {
	out := t.TempDir()
	cfg := mqttConfig(t)
	ctl := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	addr := ctl.b.Addr()
	cfg.Servers = []string{ctl.url()}
	ctl.setDesired(desired(9, "dep", map[string]mod{"alpha": processModule(out, nil), "beta": processModule(out, nil)}))
	a1 := startAgent(t, cfg)
	ctl.waitReport(waitLong, "both running", running("alpha", "beta"))
	var pid int
	waitFor(t, waitLong, "alpha's pid", func() bool { pid = readPid(out, "alpha"); return alive(pid) })

	// The controller dies: modules keep running.
	_ = ctl.b.Close()
	time.Sleep(300 * time.Millisecond)
	if readPid(out, "alpha") != pid || !alive(pid) {
		t.Fatal("alpha did not keep running when the controller went away")
	}

	// The agent restarts while the controller is down.
	a1.stop(t)
	cfg.Logger = testLogger(t)
	a2 := startAgent(t, cfg)
	waitReport(t, a2.Agent, waitLong, "modules restarted from local state", running("alpha", "beta"))
	waitFor(t, waitLong, "a new alpha process", func() bool { p := readPid(out, "alpha"); return p != pid && alive(p) })

	// The controller comes back on the same address.
	ctl2 := startController(t, addr, cfg.DeviceID, cfg.DeviceKey)
	ctl2.setDesired(desired(9, "dep", map[string]mod{"alpha": processModule(out, nil), "beta": processModule(out, nil)}))
	doc := ctl2.waitReport(waitLong, "a report after the controller returned", running("alpha", "beta"))
	if doc.LastDesiredVersion != 9 || doc.LastDesiredStatus.Code != fleet.StatusCodeOK {
		t.Errorf("report: %+v", doc)
	}
}

func TestAgent_MQTT_WrongKeyIsRefused(t *testing.T) {
	cfg := mqttConfig(t)
	ctl := startController(t, "127.0.0.1:0", cfg.DeviceID, "the-right-key")
	cfg.Servers = []string{ctl.url()}
	startAgent(t, cfg)
	waitFor(t, waitLong, "an authentication failure", func() bool { return ctl.b.Stats().AuthFailures > 0 })
	select {
	case r := <-ctl.reports:
		t.Errorf("report accepted from a device with a wrong key: %s", r)
	case <-time.After(200 * time.Millisecond):
	}
}

// testCA makes a CA and a server certificate for 127.0.0.1; it returns the
// server's TLS config and the CA's PEM file.
func testCA(t *testing.T) (*tls.Config, string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "appliance test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}}}, caFile
}

func TestAgent_MQTT_TLSWithCAFile(t *testing.T) {
	srvTLS, caFile := testCA(t)
	cfg := mqttConfig(t)
	ctl := startControllerTLS(t, srvTLS, cfg.DeviceID, cfg.DeviceKey)
	ctl.setDesired(desired(1, "dep", map[string]mod{}))
	cfg.Servers = []string{"mqtts://" + ctl.b.Addr()}
	cfg.CAFile = caFile
	startAgent(t, cfg)
	ctl.waitReport(waitLong, "a report over TLS", func(d fleet.ReportedDocument) bool { return d.LastDesiredVersion == 1 })

	// Without the CA the server is not trusted: no connection.
	other := mqttConfig(t)
	ctl2 := startControllerTLS(t, srvTLS, other.DeviceID, other.DeviceKey)
	ctl2.setDesired(desired(1, "dep", map[string]mod{}))
	other.Servers = []string{"mqtts://" + ctl2.b.Addr()}
	startAgent(t, other)
	select {
	case r := <-ctl2.reports:
		t.Errorf("an agent without the CA connected: %s", r)
	case <-time.After(500 * time.Millisecond):
	}
}

// TestAgent_MQTT_LeavesASilentServer: a controller cut off by the network
// sends no reset; the agent must still notice (keepalive) and move to the
// next server. A proxy that stops forwarding without closing stands in for
// the cut network (a real partition cannot be made between two sockets of
// one process).
func TestAgent_MQTT_LeavesASilentServer(t *testing.T) {
	cfg := mqttConfig(t)
	cfg.KeepAlive = time.Second
	first := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	second := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	for _, c := range []*controller{first, second} {
		c.setDesired(desired(3, "dep", map[string]mod{}))
	}
	px := testutil.StartProxy(t, first.b.Addr())
	cfg.Servers = []string{"mqtt://" + px.Addr, second.url()}
	inOrder(t, &cfg, first, second)
	startAgent(t, cfg)
	first.waitReport(waitLong, "a report through the proxy", func(d fleet.ReportedDocument) bool { return d.LastDesiredVersion == 3 })
	px.Silence()
	doc := second.waitReport(waitLong, "a report on the second server after the first went silent", func(fleet.ReportedDocument) bool { return true })
	if doc.LastDesiredVersion != 3 {
		t.Errorf("report after moving: %+v", doc)
	}
}

// inOrder gives cfg a device id whose order of cfg.Servers (the spread
// rule) is the order of the list, and makes it the controllers' device.
func inOrder(t *testing.T, cfg *Config, ctls ...*controller) {
	t.Helper()
	urls, err := parseServers(cfg.Servers, false)
	if err != nil {
		t.Fatal(err)
	}
	hosts := make([]string, len(urls))
	for i, u := range urls {
		hosts[i] = u.Host
	}
	for i := 0; ; i++ {
		id := fmt.Sprintf("%s-%d", cfg.DeviceID, i)
		if slices.IsSorted(spread.Order(id, hosts)) { // a permutation: sorted is the list's order
			cfg.DeviceID = id
			break
		}
	}
	for _, c := range ctls {
		c.mu.Lock()
		c.deviceID = cfg.DeviceID
		c.mu.Unlock()
	}
}

// TestAgent_MQTT_ReturnsToPreferredServer: an agent whose preferred
// server is down connects to the next one; once the preferred server is
// back it moves to it (checking it first with a connection of its own),
// and reports there.
func TestAgent_MQTT_ReturnsToPreferredServer(t *testing.T) {
	cfg := mqttConfig(t)
	cfg.ReturnMin, cfg.ReturnMax = 50*time.Millisecond, 200*time.Millisecond
	preferred := deadServer(t)
	other := startController(t, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	// The device's order: the preferred (dead) server first.
	cfg.Servers = []string{preferred, other.url()}
	inOrder(t, &cfg, other)
	cfg.Servers = []string{other.url(), preferred} // the list's order does not matter
	other.setDesired(desired(4, "dep", map[string]mod{}))
	startAgent(t, cfg)
	other.waitReport(waitLong, "a report on the other server while the preferred one is down", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 4
	})
	back := startController(t, strings.TrimPrefix(preferred, "mqtt://"), cfg.DeviceID, cfg.DeviceKey)
	back.setDesired(desired(4, "dep", map[string]mod{}))
	back.waitReport(waitLong, "a report on the preferred server once it is back", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 4
	})
	waitFor(t, waitLong, "the agent gone from the other server", func() bool {
		_, ok := other.b.Connection(cfg.DeviceID)
		return !ok
	})
	if _, ok := back.b.Connection(cfg.DeviceID); !ok {
		t.Fatal("the agent is not connected to its preferred server")
	}
}

// TestAgent_EnrollsWithItsOwnKey: an agent given an enrollment token makes
// a key of its own, stores it, and connects with the token's proof and
// that key; restarted on the same data directory it presents the same
// key, so the key the controller registered stays the one it holds.
func TestAgent_EnrollsWithItsOwnKey(t *testing.T) {
	cfg := testConfig(t)
	const token = "line-1.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"
	c := startController(t, "127.0.0.1:0", cfg.DeviceID, "")
	passwords := map[string]chan string{cfg.DeviceID: make(chan string, 64), "sibling": make(chan string, 64)}
	c.auth = func(id, k string) error {
		ch, ok := passwords[id]
		if !ok {
			return errors.New("unknown device")
		}
		select {
		case ch <- k:
		default:
		}
		return nil
	}
	cfg.Servers, cfg.DeviceKey, cfg.EnrollToken = []string{c.url()}, "", token
	next := func(id string) string {
		t.Helper()
		select {
		case p := <-passwords[id]:
			return p
		case <-time.After(testutil.WaitTimeout):
			t.Fatalf("%s did not connect", id)
			return ""
		}
	}
	ra := startAgent(t, cfg)
	first := next(cfg.DeviceID)
	ra.stop(t)
	derived, own, ok := fleet.ParseEnrollmentKey(first)
	want, _ := fleet.DeriveDeviceKey(token, cfg.DeviceID)
	if !ok || derived != want || fleet.ValidateOwnKey(own) != nil {
		t.Fatalf("the agent connected with %q; want the token's proof and a key of its own", first)
	}
	for len(passwords[cfg.DeviceID]) > 0 {
		<-passwords[cfg.DeviceID]
	}
	startAgent(t, cfg)
	if again := next(cfg.DeviceID); again != first {
		t.Fatalf("restarted, the agent presented %q; want %q", again, first)
	}
	// A sibling of the group makes its own key: nothing it holds gives
	// it the first one's.
	sibling := cfg
	sibling.DeviceID, sibling.DataDir = "sibling", t.TempDir()
	startAgent(t, sibling)
	if _, o, _ := fleet.ParseEnrollmentKey(next("sibling")); o == own {
		t.Fatal("two agents made the same own key")
	}
}
