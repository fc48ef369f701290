package raftstore

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestOpen_StreamLayer runs a cluster whose raft traffic goes through a
// caller-supplied StreamLayer (plain TCP here; TLS in the cluster package):
// the leader dials through it, the advertised address is used verbatim (a name,
// not resolved), and writes replicate.
func TestOpen_StreamLayer(t *testing.T) {
	var streams []tcpStream
	stores := newTestCluster(t, 3, func(cfg *Config) {
		st := newTCPStream(t, "127.0.0.1:0")
		streams = append(streams, st)
		cfg.Stream = st
		cfg.BindAddr = "ignored:1" // must not be used when Stream is set
		if cfg.NodeID == "n3" {
			_, port, _ := net.SplitHostPort(st.Addr().String())
			cfg.AdvertiseAddr = "localhost:" + port
		}
	})
	for i, s := range stores {
		want := streams[i].Addr().String()
		if s.NodeID() == "n3" {
			want = "localhost:" + strings.Split(want, ":")[1]
		}
		if s.RaftAddr() != want {
			t.Errorf("%s RaftAddr = %q, want %q", s.NodeID(), s.RaftAddr(), want)
		}
	}
	for i := range 5 {
		putDevice(t, stores[0], fmt.Sprintf("d%d", i), nil)
	}
	for _, s := range stores[1:] {
		waitFor(t, s.NodeID()+" has the writes", func() bool { return s.AppliedIndex() >= stores[0].AppliedIndex() })
		if got := deviceIDs(t, s); len(got) != 5 {
			t.Fatalf("%s has devices %v", s.NodeID(), got)
		}
	}
	// The leader dials its followers; they only answer.
	if streams[0].dials.Load() == 0 {
		t.Error("the leader never dialled through its stream")
	}
	members, err := stores[0].Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := members[2].Address; !strings.HasPrefix(got, "localhost:") {
		t.Errorf("n3 is in the configuration at %q, want its advertised name", got)
	}
	// Close closes the stream.
	stores[2].Close()
	if _, err := net.DialTimeout("tcp", streams[2].Addr().String(), time.Second); err == nil {
		t.Error("stream still accepting after Close")
	}
}

// TestRaftConfig_Timeouts checks the defaults, the lease clamp for short
// heartbeats, HashicorpDefaults, and a lease raft would refuse.
func TestRaftConfig_Timeouts(t *testing.T) {
	base := Config{Dir: "x", NodeID: "n1"}
	for _, tc := range []struct {
		name                       string
		cfg                        Config
		heartbeat, election, lease time.Duration
		wantErr                    string
	}{
		{name: "defaults", cfg: base, heartbeat: 300 * time.Millisecond, election: 300 * time.Millisecond, lease: 300 * time.Millisecond},
		{name: "hashicorp defaults", cfg: base.HashicorpDefaults(), heartbeat: time.Second, election: time.Second, lease: 500 * time.Millisecond},
		{
			name:      "short heartbeat caps the lease",
			cfg:       Config{NodeID: "n1", HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond},
			heartbeat: 100 * time.Millisecond, election: 100 * time.Millisecond, lease: 100 * time.Millisecond,
		},
		{
			name:      "explicit lease",
			cfg:       Config{NodeID: "n1", LeaderLeaseTimeout: 200 * time.Millisecond},
			heartbeat: 300 * time.Millisecond, election: 300 * time.Millisecond, lease: 200 * time.Millisecond,
		},
		{name: "lease longer than heartbeat", cfg: Config{NodeID: "n1", LeaderLeaseTimeout: time.Second}, wantErr: "exceeds HeartbeatTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc, err := raftConfig(tc.cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rc.HeartbeatTimeout != tc.heartbeat || rc.ElectionTimeout != tc.election || rc.LeaderLeaseTimeout != tc.lease {
				t.Fatalf("timeouts = %s/%s/%s, want %s/%s/%s", rc.HeartbeatTimeout, rc.ElectionTimeout, rc.LeaderLeaseTimeout, tc.heartbeat, tc.election, tc.lease)
			}
			if rc.CommitTimeout != 5*time.Millisecond {
				t.Fatalf("CommitTimeout = %s", rc.CommitTimeout)
			}
		})
	}
}

// TestStore_Failover_DefaultTimeouts stops the leader of a cluster running
// the default timeouts: the survivors elect a new one, which takes writes
// and holds the one acknowledged before. How long that takes is measured
// by BenchmarkFailover (docs/benchmarks.md), never asserted here.
func TestStore_Failover_DefaultTimeouts(t *testing.T) {
	stores := newTestCluster(t, 3, func(cfg *Config) {
		cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = 0, 0, 0 // the defaults
	})
	putDevice(t, stores[0], "before", nil)
	stores[0].Close()
	leader := leaderOf(t, stores[1:])
	putDevice(t, leader, "after", nil)
	if got := deviceIDs(t, leader); !slices.Equal(got, []string{"after", "before"}) {
		t.Fatalf("new leader %s holds devices %v, want [after before]", leader.NodeID(), got)
	}
}

// TestOpen_StreamClosedOnFailure: the store owns its stream, also when
// Open fails.
func TestOpen_StreamClosedOnFailure(t *testing.T) {
	st := newTCPStream(t, "127.0.0.1:0")
	cfg := testConfig(t, t.TempDir(), "n1")
	cfg.Stream = st
	cfg.LeaderLeaseTimeout = time.Hour // refused: longer than the heartbeat
	if _, err := Open(context.Background(), cfg); err == nil {
		t.Fatal("Open succeeded")
	}
	if _, err := st.Accept(); err == nil {
		t.Fatal("stream still open after a failed Open")
	}
}
