package eventtail

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/northbound"
	"appliance/raftstore"
)

// peers is a cluster of Tailers, each over its own northbound log (real
// files) and serving Path over real HTTP, as the cluster port does (less
// its mutual TLS, which is package cluster's).
type peers struct{ members []raftstore.Member }

func (p *peers) Members(context.Context) ([]raftstore.Member, error) { return p.members, nil }

func (p *peers) Stream(ctx context.Context, addr, path string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return resp.Body, nil
}

type node struct {
	log  *northbound.Server
	tail *Tailer
}

func startCluster(t *testing.T, ids ...string) map[string]node {
	t.Helper()
	ps := &peers{}
	out := map[string]node{}
	for _, id := range ids {
		logger := testlog.New(t, slog.LevelWarn)
		s, err := northbound.Open(northbound.Config{Dir: t.TempDir(), Node: id, Logger: logger})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		tl := New(Config{NodeID: id, Local: s, Peers: ps, Logger: logger})
		mux := http.NewServeMux()
		mux.HandleFunc("GET "+Path, tl.ServePeer)
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		ps.members = append(ps.members, raftstore.Member{ID: id, Address: strings.TrimPrefix(srv.URL, "http://")})
		out[id] = node{log: s, tail: tl}
	}
	return out
}

// send stores one message of a device's module in a node's log, as the
// broker hands a device's batch over (a seq sent before is a duplicate,
// and not stored).
func send(t *testing.T, n node, device, module string, seq uint64, body []byte) {
	t.Helper()
	b := fleet.UpstreamBatch{Messages: []fleet.UpstreamMessage{{Seq: seq, Module: module, Output: "out1", EnqueuedTime: time.UnixMilli(1_700_000_000_000).UTC(),
		Properties:       []fleet.Property{{Name: "n", Value: fmt.Sprint(seq)}},
		SystemProperties: []fleet.Property{{Name: "messageId", Value: fmt.Sprintf("%s-%d", device, seq)}},
		Body:             body}}}
	if err := n.log.Ingest(context.Background(), device, fleet.EncodeUpstreamBatch(nil, b)); err != nil {
		t.Fatal(err)
	}
}

// TestTailer_Tail_ClusterWide: the tail on one node streams what every
// node's devices send, each message saying the node that received it,
// with its properties, a body that is not UTF-8 in base64; the filter
// holds on the peers' streams too.
func TestTailer_Tail_ClusterWide(t *testing.T) {
	ns := startCluster(t, "n1", "n2", "n3")
	ctx, cancel := context.WithCancel(testutil.Context(t))
	defer cancel()
	got := make(chan api.EventView, 16)
	done := make(chan error, 1)
	go func() {
		done <- ns["n1"].tail.Tail(ctx, api.EventFilter{Module: "plc"}, func(ev api.EventView) error { got <- ev; return nil })
	}()
	// The peers' streams start with the tail: send until each node's first
	// message arrives (one sent before a stream began is in the log, and
	// a tail starts at its end).
	want := map[string]api.EventView{}
	deadline := time.After(testutil.WaitTimeout)
	for seq := uint64(1); len(want) < 3; seq++ {
		for _, id := range []string{"n1", "n2", "n3"} {
			if _, ok := want[id]; !ok {
				send(t, ns[id], "dev-"+id, "other", 2*seq, []byte(`{}`)) // filtered out
				send(t, ns[id], "dev-"+id, "plc", 2*seq+1, []byte{0xff, 0x00, byte(seq)})
			}
		}
		select {
		case ev := <-got:
			want[ev.Node] = ev
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatalf("the tail on n1 got messages of %v only", want)
		}
	}
	for id, ev := range want {
		if ev.DeviceID != "dev-"+id || ev.ModuleID != "plc" || ev.BodyEncoding != "base64" || ev.Properties["n"] == "" ||
			ev.SystemProperties["messageId"] != fmt.Sprintf("dev-%s-%s", id, ev.Properties["n"]) {
			t.Fatalf("from %s: %+v", id, ev)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("the tail ended with %v", err)
	}
}

// TestTailer_Tail_NotReady: a node that does not serve reads refuses a
// tail with its reason.
func TestTailer_Tail_NotReady(t *testing.T) {
	notReady := fmt.Errorf("%w: replaying", api.ErrUnavailable)
	tl := New(Config{NodeID: "n1", Ready: func() error { return notReady }})
	if err := tl.Tail(context.Background(), api.EventFilter{}, func(api.EventView) error { return nil }); err != notReady {
		t.Fatalf("tail on a node not ready: %v", err)
	}
}
