package node

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/broker"
	"appliance/fleet"
)

// TestReportQuota_FloodingDeviceIsBoundedAndDisconnected: a device with a
// valid key floods its reported topic with large reports as fast as MQTT
// lets it. With the default quotas, what it adds to the replicated log is
// bounded by its byte budget (burst plus rate over the time it flooded),
// not by how much it sends; it is disconnected with "message rate too
// high"; and the other devices' reports go on being committed meanwhile.
// Without quotas the node's batcher commits the flooder's latest report
// every flush (about 320 KB/s of 32 KiB reports), which this test reports
// as the bound being passed.
func TestReportQuota_FloodingDeviceIsBoundedAndDisconnected(t *testing.T) {
	if testing.Short() {
		t.Skip("floods the broker: not in -short")
	}
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	floodKey := createDevice(t, c, "flood", nil)
	var bystanders []*mqttDevice
	for i := range 3 {
		id := fmt.Sprintf("bystander-%d", i)
		d, err := connectDevice(t, n.MQTTAddr(), id, createDevice(t, c, id, nil))
		if err != nil {
			t.Fatal(err)
		}
		bystanders = append(bystanders, d)
	}

	const reportSize = 32 << 10
	report := func(i int) []byte {
		head := fmt.Sprintf(`{"lastDesiredVersion":%d,"pad":"`, i)
		return []byte(head + strings.Repeat("x", reportSize-len(head)-2) + `"}`)
	}
	// The bound on what the flooder may get committed: its byte budget
	// over the time it has flooded, plus the one throttled report that is
	// kept and committed later.
	start := time.Now()
	bound := func() int {
		bytes := float64(broker.DefaultReportBytesBurst) + float64(broker.DefaultReportBytesRate)*time.Since(start).Seconds()
		return int(bytes/reportSize) + 1
	}
	committedBefore := n.reports.Stats().Committed
	var bystanderReports atomic.Int64
	floodCommits := func() int {
		return int(n.reports.Stats().Committed-committedBefore) - int(bystanderReports.Load())
	}

	flooder, disconnected := connectFlooder(t, n.MQTTAddr(), "flood", floodKey)
	var sent atomic.Int64
	floodDone := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			if _, err := flooder.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic("flood"), QoS: 1, Payload: report(i)}); err != nil {
				floodDone <- err
				return
			}
			sent.Add(1)
		}
	}()

	// Meanwhile each bystander reports, one report at a time, each
	// waited for until it is committed (so none is coalesced with
	// another and bystanderReports counts exactly the commits).
	for round := range 3 {
		for _, d := range bystanders {
			doc := fmt.Sprintf(`{"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, round)
			if _, err := d.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic(d.id), QoS: 1, Payload: []byte(doc)}); err != nil {
				t.Fatalf("%s: %v", d.id, err)
			}
			waitReported(t, c, d.id, doc)
			bystanderReports.Add(1)
			if got, max := floodCommits(), bound(); got > max {
				t.Fatalf("the flooder got %d reports of %d KiB committed (%d sent); its quota allows %d", got, reportSize>>10, sent.Load(), max)
			}
		}
	}

	select {
	case dc := <-disconnected:
		if dc.ReasonCode != 0x96 {
			t.Fatalf("the flooder was disconnected with reason 0x%x, want 0x96 (message rate too high)", dc.ReasonCode)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the flooder was never disconnected: %d reports sent, %d committed, quota bound %d", sent.Load(), floodCommits(), bound())
	}
	<-floodDone
	if got, max := floodCommits(), bound(); got > max {
		t.Fatalf("the flooder got %d reports committed (%d sent); its quota allows %d", got, sent.Load(), max)
	}
	t.Logf("the flooder sent %d reports of %d KiB; %d were committed", sent.Load(), reportSize>>10, floodCommits())

	metrics := scrapeMetrics(t, n)
	for _, want := range []string{"appliance_mqtt_quota_disconnects_total 1"} {
		if !strings.Contains(metrics, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	if !strings.Contains(metrics, `appliance_reports_total{outcome="throttled"}`) || strings.Contains(metrics, `appliance_reports_total{outcome="throttled"} 0`+"\n") {
		t.Errorf("metrics count no throttled report")
	}
	// The bystanders were never disconnected.
	for _, d := range bystanders {
		if _, ok := n.broker.Connection(d.id); !ok {
			t.Errorf("%s was disconnected", d.id)
		}
	}
}

// connectFlooder connects a real MQTT 5 client and reports the DISCONNECT
// the broker sends it.
func connectFlooder(t *testing.T, addr, id, key string) (*paho.Client, chan *paho.Disconnect) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	disconnected := make(chan *paho.Disconnect, 1)
	c := paho.NewClient(paho.ClientConfig{
		Conn:               conn,
		OnServerDisconnect: func(d *paho.Disconnect) { disconnected <- d },
		PacketTimeout:      10 * time.Second,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, Username: id, UsernameFlag: true, Password: []byte(key), PasswordFlag: true, KeepAlive: 60, CleanStart: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Disconnect(&paho.Disconnect{}) })
	return c, disconnected
}

// scrapeMetrics returns the node's /metrics text (over TLS, trusting the
// node's CA, unless its API is plain).
func scrapeMetrics(t *testing.T, n *Node) string {
	t.Helper()
	hc := http.DefaultClient
	if !n.cfg.PlainHTTP {
		hc = tlsClient(t, n).HTTP
	}
	req, err := http.NewRequest("GET", n.URL()+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+n.Token())
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d %s", resp.StatusCode, body)
	}
	return string(body)
}
