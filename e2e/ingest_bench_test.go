//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
	"appliance/sim"
)

// TestIngestBenchmark is issue 15's upstream ingest benchmark (acceptance
// 4, third bullet): N simulated devices (`appliance sim --telemetry-rate`)
// send upstream batches to one node for a minute, and a consumer reads
// every message from the node's northbound listener. Nothing may be lost:
// every message a device got a PUBACK for is in the node's log and reaches
// the consumer, each device's in sequence order. The node's CPU is stated.
// The baseline, in the same run: the same simulator against Debian's
// mosquitto broker relaying the same batches (in memory, no disk, no
// per-message work) to one subscriber.
//
//	APPLIANCE_INGEST_BENCH_DEVICES=1000 APPLIANCE_BIN=$PWD/bin/appliance \
//	  go test -count=1 -tags e2e -run 'TestIngestBenchmark$' -v -timeout 20m ./e2e/
func TestIngestBenchmark(t *testing.T) {
	env := os.Getenv("APPLIANCE_INGEST_BENCH_DEVICES")
	if env == "" {
		t.Skip("set APPLIANCE_INGEST_BENCH_DEVICES (e.g. 1000) to run the upstream ingest benchmark")
	}
	devices, err := strconv.Atoi(env)
	if err != nil || devices < 1 {
		t.Fatalf("APPLIANCE_INGEST_BENCH_DEVICES=%q: want a positive number", env)
	}
	rate, duration := 10.0, 60*time.Second
	if v := os.Getenv("APPLIANCE_INGEST_BENCH_SECONDS"); v != "" {
		s, err := strconv.Atoi(v)
		if err != nil || s < 5 {
			t.Fatalf("APPLIANCE_INGEST_BENCH_SECONDS=%q: want at least 5", v)
		}
		duration = time.Duration(s) * time.Second
	}
	t.Logf("machine at the start: %s", readMachineLoad())

	// The node: plain MQTT on both listeners, as the baseline's.
	dir := t.TempDir()
	srv := startServer(t, dir, "--mqtt-plain", "--events-plain")
	r := cli(t, dir, "enrollment", "create", "ingest", "-o", "json").mustSucceed(t)
	var enr fleet.Enrollment
	json.Unmarshal([]byte(r.stdout), &enr)
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(enr.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	conKey := func() string {
		r := cli(t, dir, "consumer", "create", "bench", "-o", "json").mustSucceed(t)
		var c fleet.Consumer
		json.Unmarshal([]byte(r.stdout), &c)
		return c.Key
	}()
	eventsAddr := strings.TrimPrefix(readTrim(t, filepath.Join(dir, "events-url")), "mqtt://")
	counter := newIngestCounter()
	consumer := counter.dial(t, eventsAddr, "bench", conKey, "appliance/events/#", func(p *paho.Publish) []ingestMsg {
		seq, _ := strconv.ParseUint(p.Properties.User.Get("$sequenceNumber"), 10, 64)
		return []ingestMsg{{device: p.Properties.User.Get("$connectionDeviceId"), seq: seq}}
	})
	defer consumer.Disconnect(&paho.Disconnect{})
	// Every message a device got a PUBACK for is stored (a few more may
	// be: stored, their PUBACK still on its way when the simulator
	// stopped), and the consumer gets every stored one.
	stored := func() int64 { return int64(metricOf(t, srv, "appliance_events_messages_in_total")) }
	node := runIngest(t, "node", srv.cmd.Process.Pid, "mqtt://"+strings.TrimPrefix(srv.mqttURL(), "mqtt://"), tokenFile, devices, rate, duration, counter, stored)
	if s := stored(); s < node.acked || s > node.made {
		t.Errorf("lost: the node stored %d messages; the devices made %d and got %d acknowledged", s, node.made, node.acked)
	}
	batches := metricOf(t, srv, `appliance_events_batches_total{outcome="stored"}`)
	t.Logf("node: %d messages in %v batches (%.1f a batch), duplicates %v, dropped %v", node.acked, batches, float64(node.acked)/batches,
		metricOf(t, srv, "appliance_events_duplicates_total"), metricOf(t, srv, `appliance_events_messages_dropped_total{reason="retention"}`))

	// The baseline: mosquitto relaying the same batches.
	mosq := os.Getenv("LOADTEST_MOSQUITTO")
	if mosq == "" {
		mosq, _ = exec.LookPath("mosquitto")
	}
	if mosq == "" {
		if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
			mosq = "/usr/sbin/mosquitto"
		}
	}
	if mosq == "" || mosq == "off" {
		t.Logf("mosquitto not found (apt-get install mosquitto): no baseline in this run")
		return
	}
	addr := freePort(t)
	host, port, _ := net.SplitHostPort(addr)
	conf := filepath.Join(t.TempDir(), "mosquitto.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("listener %s %s\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 100\npersistence false\n", port, host)), 0o600); err != nil {
		t.Fatal(err)
	}
	mq := exec.Command(mosq, "-c", conf)
	var mqLog bytes.Buffer
	mq.Stdout, mq.Stderr = &mqLog, &mqLog
	if err := mq.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { mq.Process.Kill(); mq.Wait() }()
	eventually(t, "mosquitto listening", 10*time.Second, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	base := newIngestCounter()
	bc := base.dial(t, addr, "", "", "appliance/devices/+/messages/upstream", func(p *paho.Publish) []ingestMsg {
		b, err := fleet.DecodeUpstreamBatch(p.Payload)
		if err != nil {
			return nil
		}
		device := strings.Split(p.Topic, "/")[2]
		out := make([]ingestMsg, len(b.Messages))
		for i, m := range b.Messages {
			out[i] = ingestMsg{device: device, seq: m.Seq}
		}
		return out
	})
	defer bc.Disconnect(&paho.Disconnect{})
	mosquitto := runIngest(t, "mosquitto", mq.Process.Pid, "mqtt://"+addr, tokenFile, devices, rate, duration, base, nil)

	t.Logf("RESULT | %d devices × %.0f msgs/s, %v | messages acknowledged | received by the consumer, in order | lost | server CPU (s) | server CPU (%% of a core) | sim CPU (s) |", devices, rate, duration)
	for _, res := range []ingestResult{node, mosquitto} {
		t.Logf("RESULT | %s | %d | %d | %d | %.1f | %.0f %% | %.1f |", res.name, res.acked, res.received, res.lost, res.serverCPU, 100*res.serverCPU/res.wall.Seconds(), res.simCPU)
	}
	t.Logf("machine at the end: %s", readMachineLoad())
}

type ingestMsg struct {
	device string
	seq    uint64
}

type ingestResult struct {
	name                string
	made, acked         int64
	received            int64
	lost                int64
	serverCPU, simCPU   float64
	wall                time.Duration
	outOfOrder, repeats int64
}

// ingestCounter is a consumer's tally: per device, the sequence numbers
// seen (in order, duplicates counted apart).
type ingestCounter struct {
	mu         sync.Mutex
	last       map[string]uint64
	received   int64
	repeats    int64
	outOfOrder int64
}

func newIngestCounter() *ingestCounter { return &ingestCounter{last: map[string]uint64{}} }

func (c *ingestCounter) add(msgs []ingestMsg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range msgs {
		prev, ok := c.last[m.device]
		switch {
		case ok && m.seq <= prev:
			c.repeats++
		case ok && m.seq != prev+1:
			c.outOfOrder++
			c.received++
			c.last[m.device] = m.seq
		default:
			c.received++
			c.last[m.device] = m.seq
		}
	}
}

func (c *ingestCounter) snapshot() (received, repeats, outOfOrder int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.received, c.repeats, c.outOfOrder
}

// dial connects a consumer (MQTT 5, persistent, a wide window) and
// subscribes it to filter.
func (c *ingestCounter) dial(t *testing.T, addr, user, key, filter string, decode func(*paho.Publish) []ingestMsg) *paho.Client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	pc := paho.NewClient(paho.ClientConfig{Conn: nc, OnPublishReceived: []func(paho.PublishReceived) (bool, error){
		func(pr paho.PublishReceived) (bool, error) {
			c.add(decode(pr.Packet))
			return true, nil
		}}})
	expiry, rm := uint32(600), uint16(1000)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := &paho.Connect{ClientID: "bench-consumer", KeepAlive: 60, CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry, ReceiveMaximum: &rm}}
	if user != "" {
		conn.Username, conn.UsernameFlag, conn.Password, conn.PasswordFlag = user, true, []byte(key), true
	}
	if _, err := pc.Connect(ctx, conn); err != nil {
		t.Fatalf("consumer connect to %s: %v", addr, err)
	}
	if _, err := pc.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	return pc
}

// runIngest runs the simulator against server for duration, then waits
// for the consumer to have every acknowledged message, or every stored
// one when stored says how many the server holds.
func runIngest(t *testing.T, name string, serverPid int, url, tokenFile string, devices int, rate float64, duration time.Duration, counter *ingestCounter, stored func() int64) ingestResult {
	t.Helper()
	res := ingestResult{name: name}
	cpu0 := procCPU(t, serverPid)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), duration+5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "sim", "--server", url, "--devices", strconv.Itoa(devices), "--enroll-token-file", tokenFile,
		"--prefix", "ingest", "--telemetry-rate", fmt.Sprint(rate), "--duration", duration.String(), "--connect-rate", "500", "-o", "json")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: sim: %v\n%s", name, err, errb.String())
	}
	res.wall = time.Since(start)
	res.serverCPU = procCPU(t, serverPid) - cpu0
	res.simCPU = (cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()).Seconds()
	var st sim.Stats
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("%s: sim summary %q: %v", name, out.String(), err)
	}
	res.made, res.acked = st.TelemetrySent, st.TelemetryAcked
	want := res.acked
	if stored != nil {
		want = max(want, stored())
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got, _, _ := counter.snapshot()
		if got >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	res.received, res.repeats, res.outOfOrder = counter.snapshot()
	res.lost = max(0, want-res.received)
	t.Logf("%s: %d devices connected at most, %d messages made, %d acknowledged in %d batches; the consumer got %d (%d again, %d out of order); server CPU %.1f s over %v (%.0f %% of a core), sim CPU %.1f s",
		name, st.PeakConnected, st.TelemetrySent, st.TelemetryAcked, st.TelemetryBatches, res.received, res.repeats, res.outOfOrder,
		res.serverCPU, res.wall.Round(100*time.Millisecond), 100*res.serverCPU/res.wall.Seconds(), res.simCPU)
	if res.lost > 0 || res.outOfOrder > 0 {
		t.Errorf("%s: %d acknowledged messages never reached the consumer, %d out of order", name, res.lost, res.outOfOrder)
	}
	return res
}

// procCPU is a process's user plus system CPU time, in seconds.
func procCPU(t *testing.T, pid int) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command (which may hold spaces) start after ')'.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // clock ticks: 100 a second on Linux
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
