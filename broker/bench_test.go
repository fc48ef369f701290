package broker

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
)

// BenchmarkFanout measures desired-state fan-out: each iteration is one
// change delivered to every one of N connected devices (real paho MQTT 5
// clients over loopback TCP, in this process), at QoS 1, and waits until all
// N have received it. msgs/s counts deliveries. The clients share the two
// cores with the broker, so this is a lower bound on the broker's rate.
// Results and the command are in docs/benchmarks.md.
func BenchmarkFanout(b *testing.B) {
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) { benchmarkFanout(b, n) })
	}
}

func benchmarkFanout(b *testing.B, n int) {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("dev-%05d", i)
	}
	fl := newTestFleet(ids...)
	br := startBroker(b, fl, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil)) })

	var round atomic.Pointer[sync.WaitGroup]
	initial := new(sync.WaitGroup)
	initial.Add(n)
	round.Store(initial)
	for _, id := range ids {
		d, _, err := dialDeviceWith(b, br.Addr(), id, "key-"+id, nil, func(*paho.Publish) { round.Load().Done() })
		if err != nil {
			b.Fatalf("connect %s: %v", id, err)
		}
		d.subscribe(b, fleet.DesiredTopic(id))
	}
	if !waitTimeout(initial, 30*time.Second) {
		b.Fatal("initial desired documents not all delivered")
	}

	doc := []byte(`{"deploymentId":"presses-v2","version":2,"modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"temp":{"settings":{"image":"registry.local/temp:2.0"}}}}}}}`)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		wg := new(sync.WaitGroup)
		wg.Add(n)
		round.Store(wg)
		for _, id := range ids {
			if err := br.PublishDesired(id, doc); err != nil {
				b.Fatalf("PublishDesired %s: %v", id, err)
			}
		}
		if !waitTimeout(wg, 30*time.Second) {
			b.Fatal("fan-out round not delivered within 30s")
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(n*b.N)/elapsed.Seconds(), "msgs/s")
	if s := br.Stats(); s.DesiredFailed != 0 {
		b.Fatalf("DesiredFailed = %d", s.DesiredFailed)
	}
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}
