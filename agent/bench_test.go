package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/edgeclient"
)

// BenchmarkHubDrain: messages a module sent while the controller was away
// wait on the device's disk; an agent started on that data dir with the
// controller back drains them to the controller's broker (the real broker
// package over TCP, which acknowledges and counts upstream batches). The
// baseline publishes the same messages, as the same batches one at a time,
// from memory with a plain MQTT client: the broker's own ceiling.
//
//	go test -run '^$' -bench BenchmarkHubDrain -benchtime 2x ./agent/
func BenchmarkHubDrain(b *testing.B) {
	const n = 100000
	body := make([]byte, 200)
	b.Run("hub-from-disk", func(b *testing.B) {
		var rate float64
		for b.Loop() {
			rate = drainOnce(b, n, body)
		}
		b.ReportMetric(rate, "msgs/s")
		b.ReportMetric(0, "ns/op")
	})
	b.Run("baseline-from-memory", func(b *testing.B) {
		var rate float64
		for b.Loop() {
			ctl := startController(b, "127.0.0.1:0", "bench-dev", "k")
			c, err := edgeclient.Dial(context.Background(), edgeclient.Config{Addr: ctl.b.Addr(), ClientID: "bench-dev", Username: "bench-dev", Password: "k", CleanSession: true, Version: 5})
			if err != nil {
				b.Fatal(err)
			}
			batches := batchesOf(n, body)
			begin := time.Now()
			for _, batch := range batches {
				if err := c.Publish(context.Background(), fleet.UpstreamTopic("bench-dev"), batch, 1); err != nil {
					b.Fatal(err)
				}
			}
			rate = float64(n) / time.Since(begin).Seconds()
			if got := ctl.b.Stats().UpstreamMessages; got != n {
				b.Fatalf("broker counted %d of %d", got, n)
			}
			c.Close()
		}
		b.ReportMetric(rate, "msgs/s")
		b.ReportMetric(0, "ns/op")
	})
}

// batchesOf encodes n messages as upstream batches of 1,000, as the hub does.
func batchesOf(n int, body []byte) [][]byte {
	var out [][]byte
	for i := 0; i < n; i += 1000 {
		var bt fleet.UpstreamBatch
		for j := i; j < min(n, i+1000); j++ {
			bt.Messages = append(bt.Messages, fleet.UpstreamMessage{Seq: uint64(j + 1), Module: "src", Output: "o", EnqueuedTime: time.Now(), Body: body})
		}
		out = append(out, fleet.EncodeUpstreamBatch(nil, bt))
	}
	return out
}

// drainOnce queues n messages on a device while its controller is away,
// then measures how fast a freshly started agent drains them.
func drainOnce(b *testing.B, n int, body []byte) float64 {
	cfg := mqttConfig(b)
	cfg.DeviceID = "bench-dev"
	cfg.Logger = slog.New(slog.DiscardHandler)
	ctl := startController(b, "127.0.0.1:0", cfg.DeviceID, cfg.DeviceKey)
	addr := ctl.b.Addr()
	cfg.Servers = []string{"mqtt://" + addr}
	d := fleet.DesiredDocument{Version: 1, DeploymentID: "bench", ModulesContent: edgeManifest(
		map[string]mod{"src": processModule(b.TempDir(), nil)},
		map[string]any{"up": "FROM /messages/modules/src/* INTO $upstream"}, nil, 7200)}
	ctl.setDesired(d)
	a := startAgent(b, cfg)
	waitFor(b, 30*time.Second, "the plan", func() bool { return a.edge != nil && len(a.edge.h.Addrs()) == 1 && a.edge.ws.Modules() != nil })
	waitReport(b, a.Agent, 30*time.Second, "src running", running("src"))
	ctl.b.Close() // the controller goes away

	src := connectAsModule(b, a.Agent, "src")
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		if err := src.PublishAsync(src.EventsTopic("o", map[string]string{"i": fmt.Sprint(i)}), body, func(err error) {
			if err != nil {
				b.Error(err)
			}
			wg.Done()
		}); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
	src.Close()
	a.stop(b)

	// The controller is back; a new agent on the same data dir drains the
	// disk.
	ctl2 := startControllerOn(b, addr, nil, cfg.DeviceID, cfg.DeviceKey)
	ctl2.setDesired(d)
	begin := time.Now()
	startAgent(b, cfg)
	waitFor(b, 5*time.Minute, "the queued messages at the controller", func() bool { return ctl2.b.Stats().UpstreamMessages >= uint64(n) })
	return float64(n) / time.Since(begin).Seconds()
}
