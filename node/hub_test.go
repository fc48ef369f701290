package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testenv"
)

// The controller side of the device hub, with a stand-in for the device:
// a real MQTT client speaking the agent's wire format (fleet upstream
// batches, method requests and responses), because these tests are about
// the controller; the agent's own hub is tested with the real agent and
// the Azure SDK in the agent and e2e packages.

// startHubNode starts a node whose consumers' listener is on a free port
// of 127.0.0.1, without TLS.
func startHubNode(t *testing.T, configure ...func(*Config)) *Node {
	t.Helper()
	return startNodeWith(t, t.TempDir(), func(c *Config) {
		c.Events = EventsConfig{Addr: "127.0.0.1:0", Plain: true}
		for _, f := range configure {
			f(c)
		}
	})
}

// sendUpstream publishes one upstream batch as a device's agent does and
// returns the PUBACK's reason code.
func sendUpstream(t *testing.T, d *mqttDevice, msgs ...fleet.UpstreamMessage) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.UpstreamTopic(d.id), QoS: 1, Payload: fleet.EncodeUpstreamBatch(nil, fleet.UpstreamBatch{Messages: msgs})})
	if res == nil {
		t.Fatalf("%s: upstream batch: %v", d.id, err)
	}
	return res.ReasonCode
}

func upstreamMsg(seq uint64, module, body string) fleet.UpstreamMessage {
	return fleet.UpstreamMessage{Seq: seq, Module: module, Output: "out", EnqueuedTime: time.Now().UTC().Truncate(time.Millisecond),
		Properties:       []fleet.Property{{Name: "line", Value: "7"}},
		SystemProperties: []fleet.Property{{Name: "messageId", Value: "m-" + strconv.FormatUint(seq, 10)}},
		Body:             []byte(body)}
}

// mosquittoSub runs mosquitto_sub until it has count messages (or fails),
// and returns its output and error.
func mosquittoSub(t *testing.T, ctx context.Context, addr string, args ...string) (string, error) {
	t.Helper()
	sub := testenv.LookPath(t, "mosquitto_sub", "apt-get install mosquitto-clients")
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.CommandContext(ctx, sub, append([]string{"-h", host, "-p", port}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// TestHub_UpstreamReachesConsumers: a device's upstream batch, once its
// PUBACK is back, reaches a consumer subscribed with mosquitto_sub and its
// consumer credential (MQTT 5: the body as sent, the properties as user
// properties) and an MQTT 5 client; the credential reads nothing else, and
// opens nothing on the device broker; a deleted consumer is cut off.
func TestHub_UpstreamReachesConsumers(t *testing.T) {
	n := startHubNode(t)
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "press-01", nil)
	con, err := c.CreateConsumer(ctx, "mes")
	if err != nil || con.Key == "" || con.KeyHash != "" {
		t.Fatalf("create consumer: %+v %v", con, err)
	}
	if _, err := c.CreateConsumer(ctx, "mes"); !errors.Is(err, fleet.ErrExists) {
		t.Fatalf("create it again: %v", err)
	}
	if got, err := c.Consumer(ctx, "mes"); err != nil || got.Key != "" || got.KeyHash != "" {
		t.Fatalf("read consumer: %+v %v", got, err)
	}
	addr := n.northbound.Addr()

	subCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	type result struct {
		out string
		err error
	}
	subbed := make(chan result, 1)
	go func() {
		out, err := mosquittoSub(t, subCtx, addr, "-u", "mes", "-P", con.Key, "-V", "mqttv5", "-i", "mes-1", "-q", "1",
			"-t", "appliance/events/#", "-C", "2", "-F", "%t|%p|%P")
		subbed <- result{out, err}
	}()
	waitFor(t, "mosquitto_sub to subscribe", func() bool { return n.northbound.Stats().Streams == 1 })

	d, err := connectDevice(t, n.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	if code := sendUpstream(t, d, upstreamMsg(1, "plc", `{"t":21.5}`), upstreamMsg(2, "plc", `{"t":21.7}`)); code != 0 {
		t.Fatalf("PUBACK reason %#x", code)
	}
	r := <-subbed
	if r.err != nil {
		t.Fatalf("mosquitto_sub: %v\n%s", r.err, r.out)
	}
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], `appliance/events/press-01/plc|{"t":21.5}|line:7 $connectionDeviceId:press-01 $connectionModuleId:plc $outputName:out $sequenceNumber:1`) ||
		!strings.HasPrefix(lines[1], `appliance/events/press-01/plc|{"t":21.7}|`) {
		t.Fatalf("mosquitto_sub printed:\n%s", r.out)
	}

	// The consumer credential reads no device topic, publishes nothing,
	// and is no device.
	short, cancel2 := context.WithTimeout(ctx, 10*time.Second)
	defer cancel2()
	for _, topic := range []string{fleet.DesiredTopic("press-01"), fleet.ReportedTopic("press-01"), "#", "appliance/+/press-01/methods"} {
		// mosquitto_sub 2.0 says so and exits (with 0).
		out, err := mosquittoSub(t, short, addr, "-u", "mes", "-P", con.Key, "-V", "mqttv5", "-t", topic, "-C", "1", "-W", "5")
		if strings.TrimSpace(out) != "All subscription requests were denied." {
			t.Errorf("subscribing to %s with the consumer credential: %v: %q", topic, err, out)
		}
	}
	out, err := mosquittoSub(t, short, n.MQTTAddr(), "-u", "mes", "-P", con.Key, "-i", "mes", "-t", fleet.DesiredTopic("press-01"), "-C", "1", "-W", "5")
	if err == nil {
		t.Errorf("the consumer credential opened the device broker: %s", out)
	}
	pub := exec.CommandContext(short, testenv.LookPath(t, "mosquitto_pub", "apt-get install mosquitto-clients"), "-h", "127.0.0.1", "-p", strings.Split(addr, ":")[1], "-u", "mes", "-P", con.Key,
		"-V", "mqttv5", "-q", "1", "-t", "appliance/events/press-01/plc", "-m", "forged")
	pubOut, pubErr := pub.CombinedOutput()
	if pubErr == nil && !strings.Contains(string(pubOut), "not authorized") && !strings.Contains(string(pubOut), "Not authorized") {
		t.Errorf("mosquitto_pub with the consumer credential: %v %s", pubErr, pubOut)
	}
	t.Logf("mosquitto_pub: %v %s", pubErr, pubOut)
	if st := n.northbound.Stats(); st.In != 2 {
		t.Errorf("the node holds %d messages; a consumer's publish must add none", st.In)
	}

	// A paho consumer connected now; the consumer is deleted: it is
	// disconnected, and its key opens nothing any more.
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	gone := make(chan *paho.Disconnect, 1)
	pc := paho.NewClient(paho.ClientConfig{Conn: nc, OnServerDisconnect: func(d *paho.Disconnect) { gone <- d }})
	if _, err := pc.Connect(ctx, &paho.Connect{ClientID: "p", Username: "mes", UsernameFlag: true, Password: []byte(con.Key), PasswordFlag: true, CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteConsumer(ctx, "mes", api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case dc := <-gone:
		if dc.ReasonCode != 0x87 {
			t.Errorf("disconnected with %#x, want 0x87", dc.ReasonCode)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the deleted consumer's connection was not ended")
	}
	if out, err := mosquittoSub(t, short, addr, "-u", "mes", "-P", con.Key, "-t", "appliance/events/#", "-C", "1", "-W", "5"); err == nil {
		t.Errorf("a deleted consumer connected: %s", out)
	}

	// /metrics counts them.
	metrics := scrapeMetrics(t, n)
	for name, want := range map[string]float64{
		"appliance_events_messages_in_total":                          2,
		"appliance_events_messages_retained":                          2,
		"appliance_events_messages_out_total":                         2,
		`appliance_events_messages_dropped_total{reason="retention"}`: 0,
	} {
		if got := metricValue(t, metrics, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// TestHub_UpstreamRefusals: a malformed batch is refused with "payload
// format invalid" and nothing is kept; a batch sent again after a lost
// acknowledgement is acknowledged and kept once.
func TestHub_UpstreamRefusals(t *testing.T) {
	n := startHubNode(t)
	c := clientFor(n)
	key := createDevice(t, c, "press-01", nil)
	d, err := connectDevice(t, n.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, _ := d.c.Publish(ctx, &paho.Publish{Topic: fleet.UpstreamTopic("press-01"), QoS: 1, Payload: []byte("APUB\x01\x09garbage")})
	if res == nil || res.ReasonCode != 0x99 {
		t.Fatalf("malformed batch: %+v", res)
	}
	m := upstreamMsg(1, "plc", "x")
	for range 2 {
		if code := sendUpstream(t, d, m); code != 0 {
			t.Fatalf("PUBACK %#x", code)
		}
	}
	if st := n.northbound.Stats(); st.In != 1 || st.Duplicates != 1 || st.BatchesRefused != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// methodDevice answers direct method requests on its session as an
// agent's hub does: answer decides the response to each request.
func methodDevice(t *testing.T, n *Node, id, key string, answer func(fleet.MethodRequest) fleet.MethodResponse) *mqttDevice {
	t.Helper()
	d, err := connectDevice(t, n.MQTTAddr(), id, key)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: fleet.MethodsTopic(id), QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for m := range d.msgs {
			if m.Topic != fleet.MethodsTopic(id) {
				continue
			}
			var req fleet.MethodRequest
			if err := json.Unmarshal(m.Payload, &req); err != nil {
				t.Errorf("method request %s: %v", m.Payload, err)
				continue
			}
			resp := answer(req)
			resp.ID = req.ID
			b, _ := json.Marshal(resp)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _ = d.c.Publish(ctx, &paho.Publish{Topic: fleet.MethodResponseTopic(id), QoS: 1, Payload: b})
			cancel()
		}
	}()
	return d
}

// TestHub_DirectMethods: a call reaches the device's session on whichever
// node holds it (here the other node of a two-node cluster) with the
// module, method, payload and timeouts asked, and the module's status and
// payload come back; what the hub answers for a module (not connected,
// no answer) becomes 404 and 504; a device that is offline, or whose
// agent takes no methods, is 404, an unknown one not_found.
func TestHub_DirectMethods(t *testing.T) {
	n1 := startHubNode(t)
	n2 := startHubNode(t, func(c *Config) { c.NodeID, c.Join, c.JoinToken = "n2", "https://"+n1.RaftAddr(), n1.JoinToken() })
	c1 := clientFor(n1)
	ctx := context.Background()
	key := createDevice(t, c1, "press-01", nil)
	key2 := createDevice(t, c1, "press-02", nil)
	createDevice(t, c1, "press-03", nil)
	waitFor(t, "n2 to hold the devices", func() bool {
		_, err := clientFor(n2).Device(ctx, "press-02", false)
		return err == nil
	})
	methodDevice(t, n2, "press-01", key, func(req fleet.MethodRequest) fleet.MethodResponse {
		switch req.Module {
		case "filter":
			return fleet.MethodResponse{Status: 200, Payload: json.RawMessage(fmt.Sprintf(`{"method":%q,"got":%s,"timeout":%d}`, req.Method, req.Payload, req.ResponseTimeoutSeconds))}
		case "asleep":
			return fleet.MethodResponse{Status: fleet.MethodStatusTimeout, Error: "the module did not answer within 5 s"}
		}
		return fleet.MethodResponse{Status: fleet.MethodStatusNotConnected, Error: "module " + req.Module + " is not connected"}
	})
	if _, err := connectDevice(t, n2.MQTTAddr(), "press-02", key2); err != nil { // no hub: no methods subscription
		t.Fatal(err)
	}
	waitFor(t, "n1 to see the sessions on n2", func() bool {
		d, err := c1.Device(ctx, "press-01", false)
		return err == nil && d.ConnectedNode == "n2"
	})

	res, err := c1.InvokeMethod(ctx, "press-01", "filter", "reset", api.MethodRequest{Payload: json.RawMessage(`{"level":3}`), ResponseTimeoutSeconds: 7})
	var payload bytes.Buffer
	_ = json.Compact(&payload, res.Payload)
	if err != nil || res.Status != 200 || payload.String() != `{"method":"reset","got":{"level":3},"timeout":7}` {
		t.Fatalf("invoke through n1: %+v %v", res, err)
	}
	for _, tc := range []struct {
		device, module string
		status         int
		code           string
	}{
		{"press-01", "sleeper", 404, "not_connected"},
		{"press-01", "asleep", 504, "timeout"},
		{"press-02", "filter", 404, "not_connected"},
		{"press-03", "filter", 404, "not_connected"},
		{"press-99", "filter", 404, "not_found"},
	} {
		_, err := c1.InvokeMethod(ctx, tc.device, tc.module, "reset", api.MethodRequest{})
		var ae *api.Error
		if !errors.As(err, &ae) || ae.StatusCode != tc.status || ae.Code != tc.code {
			t.Errorf("%s/%s: %v, want %d %s", tc.device, tc.module, err, tc.status, tc.code)
		}
	}
}

// TestHub_ModuleRestartInEveryHistory: a RestartModule the agent answers
// 200, called through one node for a device on the other, is in the
// device's history on both; one it refuses is in neither.
func TestHub_ModuleRestartInEveryHistory(t *testing.T) {
	n1 := startHubNode(t)
	n2 := startHubNode(t, func(c *Config) { c.NodeID, c.Join, c.JoinToken = "n2", "https://"+n1.RaftAddr(), n1.JoinToken() })
	c1, c2 := clientFor(n1), clientFor(n2)
	ctx := context.Background()
	key := createDevice(t, c1, "press-01", nil)
	waitFor(t, "n2 to hold the device", func() bool {
		_, err := c2.Device(ctx, "press-01", false)
		return err == nil
	})
	methodDevice(t, n2, "press-01", key, func(req fleet.MethodRequest) fleet.MethodResponse {
		var r fleet.RestartModuleRequest
		_ = json.Unmarshal(req.Payload, &r)
		if req.Module == fleet.EdgeAgentModule && req.Method == fleet.MethodRestartModule && r.ID == "filter" {
			return fleet.MethodResponse{Status: 200}
		}
		return fleet.MethodResponse{Status: 404, Payload: json.RawMessage(`{"message":"Module ` + r.ID + ` not found in the current environment"}`)}
	})
	waitFor(t, "n1 to see the session on n2", func() bool {
		d, err := c1.Device(ctx, "press-01", false)
		return err == nil && d.ConnectedNode == "n2"
	})
	for _, m := range []string{"ghost", "filter"} {
		res, err := c1.InvokeMethod(ctx, "press-01", fleet.EdgeAgentModule, fleet.MethodRestartModule, api.MethodRequest{Payload: json.RawMessage(`{"schemaVersion":"1.0","id":"` + m + `"}`)})
		if err != nil {
			t.Fatalf("restart %s: %v", m, err)
		}
		t.Logf("restart %s: %d %s", m, res.Status, res.Payload)
	}
	for _, c := range []*api.Client{c1, c2} {
		var hist api.HistoryPage
		waitFor(t, "the restart in "+c.BaseURL+"'s history", func() bool {
			hist, _ = c.DeviceHistory(ctx, "press-01", 0)
			return len(hist.Items) > 0 && hist.Items[0].Kind == fleet.HistoryModuleRestarted
		})
		restarts := 0
		for _, e := range hist.Items {
			if e.Kind == fleet.HistoryModuleRestarted {
				restarts++
				if e.Actor != "admin" || !strings.Contains(e.What, "module filter restarted") || e.Index == 0 {
					t.Errorf("%s: %+v", c.BaseURL, e)
				}
			}
		}
		if restarts != 1 {
			t.Errorf("%s: history %+v, want one restart", c.BaseURL, hist.Items)
		}
	}
}

// TestHub_EventsTailIsClusterWide: the tail on one node streams what the
// other node's devices send, with the node that received it.
func TestHub_EventsTailIsClusterWide(t *testing.T) {
	n1 := startHubNode(t)
	n2 := startHubNode(t, func(c *Config) { c.NodeID, c.Join, c.JoinToken = "n2", "https://"+n1.RaftAddr(), n1.JoinToken() })
	c1 := clientFor(n1)
	key := createDevice(t, c1, "press-01", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitFor(t, "n2 to hold the device", func() bool {
		_, err := clientFor(n2).Device(ctx, "press-01", false)
		return err == nil
	})
	got := make(chan api.EventView, 10)
	go func() {
		_ = c1.TailEvents(ctx, api.EventFilter{Module: "plc"}, func(ev api.EventView) error { got <- ev; return nil })
	}()
	d, err := connectDevice(t, n2.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	// Until the tail is in place on n2, what is sent is not shown: send
	// until one arrives.
	var ev api.EventView
	for seq := uint64(1); ; seq++ {
		sendUpstream(t, d, upstreamMsg(seq, "other", "no"), upstreamMsg(seq+1000, "plc", "yes"))
		select {
		case ev = <-got:
		case <-time.After(500 * time.Millisecond):
			continue
		}
		break
	}
	if ev.Node != "n2" || ev.DeviceID != "press-01" || ev.ModuleID != "plc" || ev.Body != "yes" || ev.Properties["line"] != "7" || ev.SystemProperties["messageId"] == "" {
		t.Fatalf("tail got %+v", ev)
	}
}

// twinManifest runs module "filter" with desired properties.
const twinManifest = `{"modulesContent":{
 "$edgeAgent":{"properties.desired":{"schemaVersion":"1.1","runtime":{"type":"docker","settings":{}},
   "systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"agent:1"}},"edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"hub:1"}}},
   "modules":{"filter":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"filter:1"}}}}},
 "$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{"up":"FROM /messages/* INTO $upstream"}}},
 "filter":{"properties.desired":{"threshold":30,"db":{"password":"hunter2"}}}}}`

// TestHub_ModuleTwins: the reported properties a module patched reach the
// controller in the device's report: GET .../modules/{m} shows them with
// the desired properties of the applied deployment (as a read of that
// deployment shows them: its secrets redacted), the module's runtime and
// its hub connection; a module-level custom metric counts the device.
func TestHub_ModuleTwins(t *testing.T) {
	n := startHubNode(t)
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "press-01", nil)
	createDevice(t, c, "press-02", nil)
	metrics := fleet.Metrics{Queries: map[string]string{
		"filterOk":   "SELECT deviceId FROM devices.modules WHERE moduleId = 'filter' AND properties.reported.state = 'ok'",
		"hubExpired": "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeHub' AND properties.reported.expired > 0",
		"applied":    "SELECT deviceId FROM devices WHERE properties.reported.lastDesiredStatus.code = 200",
	}}
	dep, err := c.PutDeployment(ctx, "twins", api.DeploymentRequest{Content: json.RawMessage(twinManifest), TargetCondition: "*", Metrics: metrics}, api.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutDeployment(ctx, "bad", api.DeploymentRequest{Content: json.RawMessage(twinManifest), TargetCondition: "*",
		Metrics: fleet.Metrics{Queries: map[string]string{"m": "SELECT deviceId FROM devices WHERE moduleId = 'filter'"}}}, api.WriteOptions{}); !errors.Is(err, fleet.ErrInvalid) || !strings.Contains(err.Error(), "metrics.queries.m") {
		t.Fatalf("moduleId in a device-level query: %v", err)
	}
	d, err := connectDevice(t, n.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	d.subscribeDesired(t)
	doc := d.nextDesired(t)
	since := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	report := fmt.Sprintf(`{"schemaVersion":"1.1","lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"deploymentId":"twins",
		"runtime":{"platform":{"os":"linux","architecture":"amd64"}},
		"modules":{"filter":{"runtimeStatus":"running","status":"running","exitCode":0,"restartCount":0,"settings":{"image":"filter:1"}}},
		"hub":{"status":"running","routes":1,"clients":{"filter":{"status":"connected","lastConnectedTimeUtc":%q}},"queued":4,"queuedBytes":400,"expired":2,"dropped":0},
		"moduleTwins":{"filter":{"$version":3,"state":"ok","temperature":21.5}}}`, doc.Version, since.Format(time.RFC3339))
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := d.c.Publish(pctx, &paho.Publish{Topic: fleet.ReportedTopic("press-01"), QoS: 1, Payload: []byte(report)}); err != nil {
		t.Fatal(err)
	}
	var m api.ModuleView
	waitFor(t, "the module's reported properties", func() bool {
		m, err = c.Module(ctx, "press-01", "filter", false)
		return err == nil && strings.Contains(string(m.Properties.Reported), `"state": "ok"`)
	})
	var wantDesired struct {
		ModulesContent map[string]struct {
			Desired json.RawMessage `json:"properties.desired"`
		} `json:"modulesContent"`
	}
	if err := json.Unmarshal(dep.Content, &wantDesired); err != nil {
		t.Fatal(err)
	}
	if m.Deployment != "twins" || m.Runtime == nil || m.Runtime.RuntimeStatus != "running" || m.ConnectionState != api.Connected ||
		m.LastConnectedTimeUTC == nil || !m.LastConnectedTimeUTC.Equal(since) ||
		!sameJSON(m.Properties.Desired, string(wantDesired.ModulesContent["filter"].Desired)) ||
		!sameJSON(m.Properties.Reported, `{"$version":3,"state":"ok","temperature":21.5}`) {
		t.Fatalf("module view %+v\ndesired %s reported %s", m, m.Properties.Desired, m.Properties.Reported)
	}
	// The twin's secret (a member named like one) is redacted, as in
	// every read of the deployment; the other properties are shown.
	if strings.Contains(string(m.Properties.Desired), "hunter2") || !strings.Contains(string(m.Properties.Desired), fleet.Redacted) ||
		!strings.Contains(string(m.Properties.Desired), `"threshold": 30`) {
		t.Fatalf("desired properties as read: %s", m.Properties.Desired)
	}
	if _, err := c.Module(ctx, "press-01", "nope", false); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("a module the device does not run: %v", err)
	}
	if m2, err := c.Module(ctx, "press-02", "filter", false); err != nil || m2.ConnectionState != api.Disconnected || string(m2.Properties.Reported) != "{}" {
		t.Fatalf("a module of a device that never reported: %+v %v", m2, err)
	}
	var st api.DeploymentStatus
	waitFor(t, "the metrics to count press-01", func() bool {
		st, err = c.DeploymentStatus(ctx, "twins", api.StatusQuery{})
		return err == nil && st.Metrics["applied"] == 1
	})
	if st.Metrics["filterOk"] != 1 || st.Metrics["hubExpired"] != 1 {
		t.Fatalf("metrics %v", st.Metrics)
	}
}
