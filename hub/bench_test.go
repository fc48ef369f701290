package hub

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"appliance/internal/edgeclient"
	"appliance/internal/testenv"
	"appliance/internal/testutil"
)

// relay is two clients of one broker: a sender publishing at QoS 1 on
// topic and a receiver subscribed to filter.
type relay struct {
	send, recv    *edgeclient.Client
	topic, filter string
}

// result is one run's: messages per second from the first send to the
// last receipt, and per message the latency from send to receipt, the
// time the sender waited for room in its window of unacknowledged
// messages, and the time from the send to its PUBACK.
type result struct {
	rate           float64
	lat, wait, ack []time.Duration
}

// run sends n messages, paced at rate per second (0: as fast as the
// window allows), each carrying its send time.
func (r relay) run(b *testing.B, n int, rate float64) result {
	lat := make([]time.Duration, 0, n)
	wait := make([]time.Duration, n)
	ack := make([]time.Duration, n)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for len(lat) < n {
			m, ok := <-r.recv.Messages()
			if !ok {
				return
			}
			sent := int64(binary.BigEndian.Uint64(m.Payload))
			lat = append(lat, time.Duration(time.Now().UnixNano()-sent))
		}
	}()
	payload := make([]byte, 256)
	var wg sync.WaitGroup
	begin := time.Now()
	for i := range n {
		if rate > 0 {
			if d := time.Until(begin.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		p := slices.Clone(payload)
		sent := time.Now()
		binary.BigEndian.PutUint64(p, uint64(sent.UnixNano()))
		wg.Add(1)
		if err := r.send.PublishAsync(r.topic, p, func(err error) {
			if err != nil {
				b.Error(err)
			}
			ack[i] = time.Since(sent)
			wg.Done()
		}); err != nil {
			b.Fatal(err)
		}
		wait[i] = time.Since(sent)
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		b.Fatalf("received %d of %d", len(lat), n)
	}
	return result{rate: float64(n) / time.Since(begin).Seconds(), lat: lat, wait: wait, ack: ack}
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func report(b *testing.B, r result) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(r.rate, "msgs/s")
	b.ReportMetric(ms(percentile(r.lat, 0.50)), "p50-ms")
	b.ReportMetric(ms(percentile(r.lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(percentile(r.wait, 0.99)), "wait-p99-ms")
	b.ReportMetric(ms(percentile(r.ack, 0.99)), "puback-p99-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkModuleToModule: module A sends to its output, a route delivers
// to module B's input; QoS 1 both ways, every message fsynced to the hub's
// store before A's PUBACK. The baseline relays the same two clients
// through Debian's mosquitto (TLS with the same certificate, no
// persistence). "max" sends as fast as a window of 128 unacknowledged
// messages allows; "paced" at 10,000 messages per second.
//
//	go test -run '^$' -bench BenchmarkModuleToModule -benchtime 3x ./hub/
func BenchmarkModuleToModule(b *testing.B) {
	const n = 30000
	for _, mode := range []struct {
		name string
		rate float64
	}{{"max", 0}, {"paced10k", 10000}} {
		b.Run("hub/"+mode.name, func(b *testing.B) {
			th := startHub(b, b.TempDir(), func(c *Config) { c.Logger = slog.New(slog.DiscardHandler) })
			th.configure(map[string]string{"toB": `FROM /messages/modules/a/outputs/out1 INTO BrokeredEndpoint("/modules/b/inputs/in1")`}, "a", "b")
			recv := th.connect("b", func(c *edgeclient.Config) { c.Window = 1024 })
			if err := recv.SubscribeInputs(context.Background()); err != nil {
				b.Fatal(err)
			}
			send := th.connect("a")
			r := relay{send: send.Client, recv: recv.Client, topic: send.EventsTopic("out1", nil)}
			var res result
			for b.Loop() {
				res = r.run(b, n, mode.rate)
			}
			report(b, res)
		})
		b.Run("mosquitto/"+mode.name, func(b *testing.B) {
			addr, tlsCfg := startMosquitto(b)
			dial := func(id string) *edgeclient.Client {
				c, err := edgeclient.Dial(context.Background(), edgeclient.Config{Addr: addr, TLS: tlsCfg, ClientID: id, CleanSession: true, Window: 128})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { c.Close() })
				return c
			}
			recv, send := dial("b"), dial("a")
			if _, err := recv.Subscribe(context.Background(), "bench/in1"); err != nil {
				b.Fatal(err)
			}
			r := relay{send: send, recv: recv, topic: "bench/in1"}
			var res result
			for b.Loop() {
				res = r.run(b, n, mode.rate)
			}
			report(b, res)
		})
	}
}

// startMosquitto runs Debian's mosquitto on a free port of 127.0.0.1 with
// TLS (the hub's certificate from a device CA) and no persistence.
func startMosquitto(b *testing.B) (string, *tls.Config) {
	bin := "/usr/sbin/mosquitto"
	if _, err := os.Stat(bin); err != nil {
		testenv.Missing(b, "mosquitto is not installed (apt-get install -y mosquitto): the benchmark's baseline")
	}
	dir := b.TempDir()
	th := startHub(b, dir, func(c *Config) { c.Logger = slog.New(slog.DiscardHandler) }) // for its certificate
	th.stop()
	addr := testutil.FreeAddr(b, "127.0.0.1")
	_, port, _ := net.SplitHostPort(addr)
	conf := filepath.Join(dir, "mosquitto.conf")
	w := filepath.Join(dir, "workload")
	// user root: mosquitto started as root otherwise becomes "mosquitto",
	// which cannot read the test's key.
	os.WriteFile(conf, []byte(fmt.Sprintf("user root\nlistener %s 127.0.0.1\ncertfile %s\nkeyfile %s\nallow_anonymous true\npersistence false\nmax_inflight_messages 1024\nmax_queued_messages 100000\n",
		port, filepath.Join(w, "hub.crt"), filepath.Join(w, "hub.key"))), 0o644)
	cmd := exec.Command(bin, "-c", conf)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(filepath.Join(w, "ca.crt"))
	pool.AppendCertsFromPEM(ca)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("mosquitto does not listen on %s:\n%s", addr, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
}
