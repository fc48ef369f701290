//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/pysdk"
	"appliance/internal/testcontroller"
)

// The device hub with a real controller: `appliance serve`, `appliance
// agent` running process modules written with the Azure IoT Python SDK
// (agent/testdata/pymodules), the CLI, and consumers reading the
// northbound listener (mosquitto_sub, and a paho client for the
// persistent session across the controller's restart). Issue 15,
// acceptance 1 (c), (d), (e), (g), (h).

// hubNode is a controller on fixed ports (so that the agent and the
// consumers find it again after a restart).
type hubNode struct {
	dir, mqtt, events string
	srv               *server
}

func startHubNode(t *testing.T) *hubNode {
	t.Helper()
	h := &hubNode{dir: t.TempDir(), mqtt: freePort(t), events: freePort(t)}
	h.start(t)
	return h
}

func (h *hubNode) start(t *testing.T) {
	t.Helper()
	h.srv = startServer(t, h.dir, "--mqtt-addr", h.mqtt, "--events-addr", h.events)
}

// createDevice registers a device and returns its key.
func (h *hubNode) createDevice(t *testing.T, id string) string {
	t.Helper()
	r := cli(t, h.dir, "device", "create", id, "-o", "json").mustSucceed(t)
	var d fleet.Device
	if err := json.Unmarshal([]byte(r.stdout), &d); err != nil {
		t.Fatal(err)
	}
	return d.Authentication.SymmetricKey.PrimaryKey
}

// createConsumer makes a consumer with the CLI and returns its key.
func (h *hubNode) createConsumer(t *testing.T, name string) string {
	t.Helper()
	r := cli(t, h.dir, "consumer", "create", name, "-o", "json").mustSucceed(t)
	var c fleet.Consumer
	if err := json.Unmarshal([]byte(r.stdout), &c); err != nil || c.Key == "" {
		t.Fatalf("consumer create: %s %v", r.stdout, err)
	}
	return c.Key
}

// startHubAgent runs the device's agent with its hub on a free loopback
// address (the SDK's port 8883 is fixed).
func (h *hubNode) startHubAgent(t *testing.T, id, key string) *agentProc {
	t.Helper()
	// A short data directory: the modules' workload sockets live below it,
	// and a unix socket's path holds at most 107 bytes.
	dataDir, err := os.MkdirTemp("", "hub")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dataDir) })
	ag := startAgent(t, "--server", "mqtts://"+h.mqtt, "--ca-file", h.srv.caFile(), "--device-id", id, "--device-key", key,
		"--data-dir", dataDir, "--hub-addr", testcontroller.FreeGateway(t)+":8883", "--log-format", "json")
	ag.dataDir = dataDir
	return ag
}

// deploy creates a deployment for every device from modules, routes and
// module twins' desired properties, with custom metrics.
func (h *hubNode) deploy(t *testing.T, id string, modules, routes map[string]any, twins map[string]any, metrics ...string) {
	t.Helper()
	var mc map[string]any
	if err := json.Unmarshal(hubManifest(modules, routes), &mc); err != nil {
		t.Fatal(err)
	}
	for m, desired := range twins {
		mc[m] = map[string]any{"properties.desired": desired}
	}
	b, _ := json.Marshal(map[string]any{"modulesContent": mc})
	path := filepath.Join(t.TempDir(), "deployment.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"deployment", "create", id, "--content", path, "--target-condition", "*", "--priority", "1"}
	for _, m := range metrics {
		args = append(args, "--metric", m)
	}
	cli(t, h.dir, args...).mustSucceed(t)
}

// sentIDs is what a sender.py module printed it sent, in order, read from
// the module's output log below the agent's data directory.
func sentIDs(dataDir, module string) []string {
	var ids []string
	for _, l := range moduleOutput(dataDir, module, "sent") {
		ids = append(ids, l["sent"].(string))
	}
	return ids
}

// (c), (d), (h): messages routed INTO $upstream reach a consumer subscribed
// with mosquitto_sub and a consumer credential, over TLS, with their
// properties; B's reported properties appear in `device show` and `module
// show` and are counted by a module-level custom metric; a direct method
// invoked with the CLI returns B's response, and Azure's 404 and 504 when
// there is none.
func TestHubController_UpstreamTwinsMethods(t *testing.T) {
	pysdk.Find(t)
	sub, _ := mosquittoTools(t)
	h := startHubNode(t)
	key := h.createDevice(t, "hub-01")
	conKey := h.createConsumer(t, "mes")

	// The consumer is subscribed before anything is sent.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	host, port, _ := net.SplitHostPort(h.events)
	subCmd := exec.CommandContext(ctx, sub, "-h", host, "-p", port, "--cafile", h.srv.caFile(), "-u", "mes", "-P", conKey,
		"-V", "mqttv5", "-q", "1", "-i", "mes-e2e", "-t", "appliance/events/hub-01/#", "-C", "20", "-F", "%t|%p|%P")
	var subOut syncBuffer
	subCmd.Stdout, subCmd.Stderr = &subOut, &subOut
	if err := subCmd.Start(); err != nil {
		t.Fatal(err)
	}
	subDone := make(chan error, 1)
	go func() { subDone <- subCmd.Wait() }()
	eventually(t, "mosquitto_sub connected", 30*time.Second, func() bool {
		return regexpMatch(`msg="consumer connected" .*client=mes-e2e`, h.srv.logs.String())
	})

	ag := h.startHubAgent(t, "hub-01", key)
	modules := map[string]any{
		"a": pyProcessModule(t, "sender.py", map[string]string{"SEND_COUNT": "20", "SEND_INTERVAL": "0.05"}),
		"b": pyProcessModule(t, "receiver.py", nil),
	}
	routes := map[string]any{"up": `FROM /messages/modules/a/outputs/out1 INTO $upstream`}
	h.deploy(t, "hub-v1", modules, routes, map[string]any{"b": map[string]any{"interval": 5}},
		`started=SELECT deviceId FROM devices.modules WHERE moduleId = 'b' AND properties.reported.started = true`,
		`hubRunning=SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeHub' AND properties.reported.status = 'running'`)

	// (d)
	select {
	case err := <-subDone:
		if err != nil {
			t.Fatalf("mosquitto_sub: %v\n%s", err, subOut.String())
		}
	case <-time.After(3 * time.Minute):
		t.Fatalf("mosquitto_sub got %q in 3 minutes", subOut.String())
	}
	// The module logs a message as sent once its SDK call returned (after
	// the hub's PUBACK): the message may reach the consumer first.
	var sent []string
	eventually(t, "module a to log its 20 messages as sent", time.Minute, func() bool {
		sent = sentIDs(ag.dataDir, "a")
		return len(sent) >= 20
	})
	lines := strings.Split(strings.TrimSpace(subOut.String()), "\n")
	if len(lines) != 20 || len(sent) < 20 {
		t.Fatalf("mosquitto_sub printed %d lines, the module sent %d:\n%s", len(lines), len(sent), subOut.String())
	}
	for i, l := range lines {
		topic, rest, _ := strings.Cut(l, "|")
		body, props, _ := strings.Cut(rest, "|")
		var msg struct{ N int }
		if topic != "appliance/events/hub-01/a" || json.Unmarshal([]byte(body), &msg) != nil || msg.N != i ||
			!strings.Contains(props, "n:"+strconv.Itoa(i)) || !strings.Contains(props, "$messageId:"+sent[i]) ||
			!strings.Contains(props, "$connectionModuleId:a") || !strings.Contains(props, "$outputName:out1") {
			t.Fatalf("message %d: %q (sent %s)", i, l, sent[i])
		}
	}

	// (c)
	eventually(t, "b's reported properties at the controller", time.Minute, func() bool {
		r := cli(t, h.dir, "module", "show", "hub-01", "b", "-o", "json")
		var m api.ModuleView
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &m) == nil && strings.Contains(string(compact(m.Properties.Reported)), `"started":true`) &&
			strings.Contains(string(compact(m.Properties.Desired)), `"interval":5`) && m.ConnectionState == api.Connected
	})
	show := cli(t, h.dir, "device", "show", "hub-01").mustSucceed(t)
	if !regexpMatch(`(?m)^b\s+\{.*"started":true.*\}$`, show.stdout) || !regexpMatch(`(?m)^device hub: running, 1 routes, 2 of 2 modules connected`, show.stdout) {
		t.Fatalf("device show:\n%s", show.stdout)
	}
	eventually(t, "the module-level metrics to count hub-01", time.Minute, func() bool {
		r := cli(t, h.dir, "deployment", "status", "hub-v1", "-o", "json")
		var st api.DeploymentStatus
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &st) == nil && st.Metrics["started"] == 1 && st.Metrics["hubRunning"] == 1
	})

	// (h)
	r := cli(t, h.dir, "module", "invoke", "hub-01", "b", "reset", "--payload", `{"level":3}`).mustSucceed(t)
	if !regexpMatch(`(?m)^status:\s+200$`, r.stdout) || !regexpMatch(`(?m)^payload:\s+\{("method":"reset","echo":\{"level":3\}|"echo":\{"level":3\},"method":"reset")\}$`, r.stdout) {
		t.Fatalf("module invoke printed:\n%s", r.stdout)
	}
	r = cli(t, h.dir, "module", "invoke", "hub-01", "b", "sleep", "--timeout", "5s")
	if r.code == 0 || !strings.Contains(r.stderr, "status 504") {
		t.Fatalf("a method the module does not answer: exit %d %s", r.code, r.stderr)
	}
	r = cli(t, h.dir, "module", "invoke", "hub-01", "nobody", "reset")
	if r.code == 0 || !strings.Contains(r.stderr, "status 404") {
		t.Fatalf("a module that is not connected: exit %d %s", r.code, r.stderr)
	}
	ag.kill()
	eventually(t, "hub-01 disconnected", time.Minute, func() bool {
		r := cli(t, h.dir, "module", "invoke", "hub-01", "b", "reset")
		return r.code != 0 && strings.Contains(r.stderr, "not connected to any node") && strings.Contains(r.stderr, "status 404")
	})
}

// (e), (g): the controller is away while module A keeps sending. Route
// "kept" (A's output out1, the default time to live) loses nothing: after
// the controller returns, a consumer's persistent session gets every
// message A sent, each once, in order. Route "short" (A's output out2, a
// time to live of 5 s) keeps only what is younger than 5 s: the rest the
// device drops and counts, `device show` and /metrics show it, and the
// consumer gets exactly the others, in order.
func TestHubController_ControllerOutage(t *testing.T) {
	pysdk.Find(t)
	for _, tc := range []struct {
		name   string
		output string
		ttl    bool
		outage time.Duration
		count  int // messages a sends, one every 0.2 s: longer than the outage
	}{
		{"e", "out1", false, 60 * time.Second, 400}, // 60 s away, nothing lost
		{"g", "out2", true, 10 * time.Second, 150},  // 10 s away, 5 s time to live
	} {
		t.Run(tc.name, func(t *testing.T) { controllerOutage(t, tc.output, tc.ttl, tc.outage, tc.count) })
	}
}

func controllerOutage(t *testing.T, output string, ttl bool, outage time.Duration, count int) {
	h := startHubNode(t)
	key := h.createDevice(t, "hub-02")
	conKey := h.createConsumer(t, "historian")
	con := dialHistorian(t, h, conKey)
	con.subscribe(t, "appliance/events/hub-02/a")

	ag := h.startHubAgent(t, "hub-02", key)
	const interval = 0.2
	modules := map[string]any{"a": pyProcessModule(t, "sender.py", map[string]string{
		"SEND_COUNT": strconv.Itoa(count), "SEND_INTERVAL": fmt.Sprint(interval), "SEND_OUTPUT": output})}
	route := any(`FROM /messages/modules/a/outputs/` + output + ` INTO $upstream`)
	if ttl {
		route = map[string]any{"route": route, "priority": 0, "timeToLiveSecs": 5}
	}
	h.deploy(t, "outage", modules, map[string]any{"up": route}, nil)
	eventually(t, "the first messages at the consumer", 2*time.Minute, func() bool { return con.count() >= 5 })

	h.srv.stop()
	stopped := time.Now()
	con.disconnected(t)
	sentBefore := len(sentIDs(ag.dataDir, "a"))
	time.Sleep(outage)
	sentDuring := len(sentIDs(ag.dataDir, "a")) - sentBefore
	t.Logf("the controller was away %s; module a sent %d messages meanwhile", time.Since(stopped).Round(time.Second), sentDuring)
	if sentDuring < int(outage.Seconds()/interval)/2 {
		t.Fatalf("module a sent only %d messages while the controller was away", sentDuring)
	}
	before := con.count()
	h.start(t)
	returned := time.Now()
	con.reconnect(t)
	// How long the agent took to come back (its reconnect backoff grows to
	// a jittered minute during a long outage): logged, not asserted.
	eventually(t, "a message sent during the outage at the consumer", 3*time.Minute, func() bool { return con.count() > before })
	t.Logf("the first message queued during the outage reached the consumer %s after the controller returned", time.Since(returned).Round(100*time.Millisecond))

	eventually(t, "module a to finish", 3*time.Minute, func() bool { return len(moduleOutput(ag.dataDir, "a", "done")) == 1 })
	sent := sentIDs(ag.dataDir, "a")
	if len(sent) != count {
		t.Fatalf("module a sent %d", len(sent))
	}
	var expired uint64
	if ttl {
		eventually(t, "the device to report the expired messages", time.Minute, func() bool {
			doc, _ := reported(t, h.dir, "hub-02")
			expired = 0
			if doc.Hub != nil {
				expired = doc.Hub.Expired
			}
			return expired > 0 && doc.Hub.Queued == 0
		})
	}
	eventually(t, "every message not expired at the consumer", 3*time.Minute, func() bool { return con.count() >= count-int(expired) })
	time.Sleep(2 * time.Second) // nothing more, nothing twice
	got := con.ids()
	if ttl {
		// What arrived is what was sent less what expired, in order.
		if len(got)+int(expired) != count {
			t.Fatalf("the consumer got %d, the device expired %d, module a sent %d", len(got), expired, count)
		}
		if !isSubsequence(got, sent) {
			t.Fatalf("the consumer's messages are not in the order sent:\n%v", got)
		}
		show := cli(t, h.dir, "device", "show", "hub-02").mustSucceed(t)
		if !regexpMatch(fmt.Sprintf(`expired %d, dropped 0`, expired), show.stdout) {
			t.Fatalf("device show does not show the %d expired:\n%s", expired, show.stdout)
		}
		eventually(t, "/metrics to count the expired", time.Minute, func() bool {
			return metricOf(t, h.srv, `appliance_device_hub_messages{state="expired"}`) == float64(expired)
		})
		t.Logf("%d of %d messages expired on the device during the 10 s outage; the consumer got the other %d in order", expired, count, len(got))
		return
	}
	if !slices.Equal(got, sent) {
		t.Fatalf("the consumer got %d messages, module a sent %d; first difference at %d", len(got), len(sent), firstDiff(got, sent))
	}
	// The node's log (kept across its restart) holds each message once.
	if v := metricOf(t, h.srv, "appliance_events_messages_retained"); v != float64(count) {
		t.Errorf("appliance_events_messages_retained = %v, want %d", v, count)
	}
	t.Logf("all %d messages reached the consumer in order, %d of them sent while the controller was away", count, sentDuring)
}

// historian is a consumer with a persistent session (paho, MQTT 5, over
// TLS with the cluster CA), reconnected by the test.
type historian struct {
	h   *hubNode
	key string

	mu   sync.Mutex
	c    *paho.Client
	msgs []string // message ids, in arrival order
	gone chan struct{}
}

func dialHistorian(t *testing.T, h *hubNode, key string) *historian {
	hc := &historian{h: h, key: key}
	hc.connect(t, true)
	t.Cleanup(func() {
		hc.mu.Lock()
		c := hc.c
		hc.mu.Unlock()
		_ = c.Disconnect(&paho.Disconnect{})
	})
	return hc
}

func (hc *historian) connect(t *testing.T, clean bool) {
	t.Helper()
	pem, err := os.ReadFile(hc.h.srv.caFile())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	host, _, _ := net.SplitHostPort(hc.h.events)
	nc, err := tls.Dial("tcp", hc.h.events, &tls.Config{RootCAs: pool, ServerName: host})
	if err != nil {
		t.Fatal(err)
	}
	gone := make(chan struct{})
	c := paho.NewClient(paho.ClientConfig{
		Conn: packets.NewThreadSafeConn(nc),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			hc.mu.Lock()
			hc.msgs = append(hc.msgs, pr.Packet.Properties.User.Get("$messageId"))
			hc.mu.Unlock()
			return true, nil
		}},
		OnClientError:      func(error) { closeOnce(gone) },
		OnServerDisconnect: func(*paho.Disconnect) { closeOnce(gone) },
	})
	expiry := uint32(3600)
	rm := uint16(100)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: "historian-1", Username: "historian", UsernameFlag: true, Password: []byte(hc.key), PasswordFlag: true,
		KeepAlive: 30, CleanStart: clean, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry, ReceiveMaximum: &rm}})
	if err != nil {
		t.Fatalf("connect the historian: %v", err)
	}
	if !clean && !ca.SessionPresent {
		t.Fatal("the node did not keep the historian's session across its restart")
	}
	hc.mu.Lock()
	hc.c, hc.gone = c, gone
	hc.mu.Unlock()
}

func closeOnce(ch chan struct{}) {
	select {
	case <-ch:
	default:
		close(ch)
	}
}

func (hc *historian) subscribe(t *testing.T, filter string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := hc.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
}

// disconnected waits for the connection to end (the node stopped).
func (hc *historian) disconnected(t *testing.T) {
	t.Helper()
	select {
	case <-hc.gone:
	case <-time.After(30 * time.Second):
		t.Fatal("the historian's connection did not end with the node")
	}
}

// reconnect resumes the session (clean start 0).
func (hc *historian) reconnect(t *testing.T) { hc.connect(t, false) }

func (hc *historian) count() int {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return len(hc.msgs)
}

// ids are the message ids received, each once (a message sent again
// after a lost acknowledgement is at-least-once), in arrival order.
func (hc *historian) ids() []string {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, id := range hc.msgs {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

// isSubsequence tells whether sub appears in seq in the same order.
func isSubsequence(sub, seq []string) bool {
	i := 0
	for _, s := range seq {
		if i < len(sub) && sub[i] == s {
			i++
		}
	}
	return i == len(sub)
}

func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// metricOf reads one series from a node's /metrics (-1 when absent).
func metricOf(t *testing.T, s *server, series string) float64 {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+s.token)
	resp, err := s.httpClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f
		}
	}
	return -1
}

func compact(b []byte) []byte {
	var out bytes.Buffer
	if json.Compact(&out, b) != nil {
		return b
	}
	return out.Bytes()
}

func regexpMatch(pattern, s string) bool { return regexp.MustCompile(pattern).MatchString(s) }
