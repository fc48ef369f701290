package raftstore

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"appliance/fleet"
)

// BenchmarkReplicatedWrites measures acknowledged writes per second on a
// single node: every write is committed to the raft log (fsynced) and
// applied to the bbolt state machine before Apply returns.
//
//   - one-at-a-time: a single client, so every write is its own raft entry,
//     log fsync and bbolt transaction;
//   - batched-N: N concurrent clients; raft groups their entries into one
//     log append and the state machine applies the group in one bbolt
//     transaction (BatchingFSM).
//
// Each runs twice: through the proposer (groups, as the node writes) and,
// as the baseline, with raft.Apply per write (propose-each, the write path
// before proposer.go).
func BenchmarkReplicatedWrites(b *testing.B) {
	for _, clients := range []int{1, 16, 64} {
		for _, proposeEach := range []bool{true, false} {
			name := "one-at-a-time"
			if clients > 1 {
				name = fmt.Sprintf("batched-%d", clients)
			}
			if proposeEach {
				name += ",propose-each"
			} else {
				name += ",groups"
			}
			b.Run(name, func(b *testing.B) { benchReplicatedWrites(b, clients, proposeEach, false) })
		}
	}
}

// BenchmarkLogStoreWrites is BenchmarkReplicatedWrites' node path (the
// proposer's groups) with each log store in the same run: raft-boltdb
// (two fdatasyncs per commit: bbolt's data pages, then its meta page, the
// release before) and raftlog (one fdatasync of the segment per append).
func BenchmarkLogStoreWrites(b *testing.B) {
	for _, clients := range []int{1, 64} {
		for _, store := range logStores {
			name := fmt.Sprintf("clients-%d,%s", clients, store.name)
			b.Run(name, func(b *testing.B) { benchReplicatedWrites(b, clients, false, store.bolt) })
		}
	}
}

// logStores are the log stores the benchmarks compare.
var logStores = []struct {
	name string
	bolt bool
}{{"boltdb", true}, {"raftlog", false}}

func benchReplicatedWrites(b *testing.B, clients int, proposeEach, boltLog bool) {
	cfg := testConfig(b, b.TempDir(), "bench")
	cfg.Bootstrap, cfg.proposeEach, cfg.boltLog = true, proposeEach, boltLog
	s := openConfig(b, cfg)
	if err := s.WaitLeader(testContext(b)); err != nil {
		b.Fatal(err)
	}
	var n atomic.Int64
	b.ResetTimer()
	start := time.Now()
	if clients == 1 {
		for i := 0; i < b.N; i++ {
			benchWrite(b, s, n.Add(1))
		}
	} else {
		// RunParallel runs GOMAXPROCS*parallelism goroutines.
		b.SetParallelism(max(1, clients/2))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchWrite(b, s, n.Add(1))
			}
		})
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "writes/s")
}

func benchWrite(b *testing.B, s *Store, i int64) {
	_, err := s.Apply(context.Background(), PutDevice{Time: time.Unix(0, i).UTC(), Device: fleet.Device{
		ID: fmt.Sprintf("device-%08d", i), Tags: map[string]any{"environment": "prod", "line": float64(i % 40)},
	}})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkFailover stops the leader of a three-node cluster and measures
// the time until the survivors have elected a new one, with our timeouts
// and with hashicorp/raft's defaults.
func BenchmarkFailover(b *testing.B) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
	}{
		{"tuned", func(c *Config) { c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout = 0, 0, 0 }},
		{"hashicorp-defaults", func(c *Config) { *c = c.HashicorpDefaults() }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var total time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				stores := newTestCluster(b, 3, tc.edit)
				b.StartTimer()
				start := time.Now()
				stores[0].Close()
				leaderOf(b, stores[1:])
				total += time.Since(start)
				b.StopTimer()
				for _, s := range stores {
					s.Close()
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/failover")
		})
	}
}

// BenchmarkPacedWrites measures the latency of acknowledged writes on a
// single node under a steady stream: b.N writes issued at 1,000/s (at most
// 32 in flight), each timed from proposal to the answer. It compares, in
// one run, the write path before and after three changes: an fsynced state
// file (sync-state) against one committed without fsync (statefile.go),
// raft.Apply per write (propose-each) against the proposer's groups
// (proposer.go), and the log in raft-boltdb (two fdatasyncs per commit)
// against raftlog (one). Run it with a fixed count, e.g.
// -benchtime=10000x.
func BenchmarkPacedWrites(b *testing.B) {
	for _, tc := range []struct {
		name                            string
		syncState, proposeEach, boltLog bool
	}{
		{"sync-state,propose-each,boltdb", true, true, true},
		{"nosync-state,propose-each,boltdb", false, true, true},
		{"nosync-state,groups,boltdb", false, false, true},
		{"nosync-state,groups,raftlog", false, false, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := testConfig(b, b.TempDir(), "bench")
			cfg.Bootstrap, cfg.syncState, cfg.proposeEach, cfg.boltLog = true, tc.syncState, tc.proposeEach, tc.boltLog
			cfg.Logger = testLogger(b)
			s := openConfig(b, cfg)
			if err := s.WaitLeader(testContext(b)); err != nil {
				b.Fatal(err)
			}
			lat := make([]time.Duration, b.N)
			inFlight := make(chan struct{}, 32)
			var wg sync.WaitGroup
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			b.ResetTimer()
			start := time.Now()
			for i := range b.N {
				<-tick.C
				inFlight <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					t0 := time.Now()
					benchWrite(b, s, int64(i+1))
					lat[i] = time.Since(t0)
					<-inFlight
				}()
			}
			wg.Wait()
			b.StopTimer()
			slices.Sort(lat)
			at := func(q float64) time.Duration { return lat[int(q*float64(len(lat)-1))] }
			b.ReportMetric(float64(at(0.5).Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(at(0.9).Microseconds())/1000, "p90-ms")
			b.ReportMetric(float64(at(0.99).Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(at(0.999).Microseconds())/1000, "p999-ms")
			b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "writes/s")
		})
	}
}
