package assign

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testlog"
	"appliance/raftstore"
)

// replica follows a store as a node's observer does.
type replica struct{ a *Assigner }

func (r replica) Applied(changes []raftstore.Change) {
	moved, _ := r.a.Apply(changes)
	r.a.Push(moved)
}

func (r replica) Restored(rd *raftstore.Reader) error { return r.a.Restore(rd) }

func (r replica) Halted(err error) {}

// TestCluster_IdenticalAssignments runs three raft replicas in one process,
// each feeding its own Assigner exactly as a node does, drives random
// device and deployment changes through the leader, and checks that every
// replica reports the same assignments once the same entries have applied.
func TestCluster_IdenticalAssignments(t *testing.T) {
	logger := testlog.New(t, slog.LevelWarn)
	var nodes [3]*Assigner
	var stores [3]*raftstore.Store
	for i := range nodes {
		nodes[i] = New(Config{Logger: logger, View: func(fn func(r *raftstore.Reader) error) error { return stores[i].View(fn) }})
		s, err := raftstore.Open(context.Background(), raftstore.Config{
			Dir: t.TempDir(), NodeID: fmt.Sprintf("n%d", i+1), BindAddr: "127.0.0.1:0",
			Bootstrap: i == 0, Observer: replica{nodes[i]}, Logger: logger,
			// Not a failover test: timeouts that two busy cores under the
			// race detector do not trip (writes still follow a new leader).
			HeartbeatTimeout: 500 * time.Millisecond, ElectionTimeout: 500 * time.Millisecond, LeaderLeaseTimeout: 500 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		stores[i] = s
		t.Cleanup(func() { s.Close() })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := stores[0].WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	for _, s := range stores[1:] {
		if err := stores[0].AddVoter(ctx, s.NodeID(), s.RaftAddr()); err != nil {
			t.Fatal(err)
		}
	}

	var deps []string // deployment ids written so far (some deleted since)
	written := map[raftstore.CommandType]int{}
	rejected, unknown := 0, 0
	rng := rand.New(rand.NewPCG(1, 2))
	envs := []string{"prod", "test", "dev"}
	sites := []string{"westus", "eastus"}
	conds := []string{
		"*", "tags.environment='prod'", "tags.environment='prod' AND tags.site='westus'",
		"tags.environment IN ['test','dev']", "NOT tags.site='eastus'", "tags.line > 2", "deviceId='d07'",
	}
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 300 {
		at = at.Add(time.Second)
		var cmd raftstore.Command
		switch r := rng.IntN(10); {
		case r < 6:
			cmd = raftstore.PutDevice{Time: at, Device: fleet.Device{
				ID:   fmt.Sprintf("d%02d", rng.IntN(40)),
				Tags: map[string]any{"environment": envs[rng.IntN(3)], "site": sites[rng.IntN(2)], "line": float64(rng.IntN(5))},
			}}
		case r < 7:
			cmd = raftstore.DeleteDevice{ID: fmt.Sprintf("d%02d", rng.IntN(40))}
		case r < 8 || len(deps) == 0:
			id := fmt.Sprintf("dep%d-%d", rng.IntN(6), i)
			deps = append(deps, id)
			cmd = raftstore.PutDeployment{Time: at, Deployment: fleet.Deployment{
				ID: id, Content: json.RawMessage(`{}`),
				TargetCondition: conds[rng.IntN(len(conds))], Priority: int64(rng.IntN(3)),
			}}
		case r < 9:
			c := conds[rng.IntN(len(conds))]
			p := int64(rng.IntN(3))
			cmd = raftstore.PatchDeployment{ID: deps[rng.IntN(len(deps))], TargetCondition: &c, Priority: &p, Time: at}
		default:
			cmd = raftstore.DeleteDeployment{ID: deps[rng.IntN(len(deps))]}
		}
		// A rule rejection of an id the random walk picked before it
		// existed (or after it went) is fine: it is an entry too, which
		// every replica must reject alike. So is a write whose outcome a
		// change of leader left unknown: applied or not, it is the same on
		// every replica. Any other error fails the test.
		_, err := applyOnLeader(ctx, stores[:], cmd)
		switch {
		case err == nil:
			written[cmd.Type()]++
		case errors.Is(err, fleet.ErrNotFound):
			rejected++
		case errors.Is(err, raftstore.ErrUnknownOutcome):
			unknown++
		default:
			t.Fatalf("write %d (%s): %v", i, cmd.Type(), err)
		}
	}
	// The walk did what it is meant to: mostly writes that took effect.
	for _, typ := range []raftstore.CommandType{raftstore.CmdPutDevice, raftstore.CmdDeleteDevice, raftstore.CmdPutDeployment, raftstore.CmdPatchDeployment, raftstore.CmdDeleteDeployment} {
		if written[typ] == 0 {
			t.Fatalf("no %s took effect (written %v, %d rejected)", typ, written, rejected)
		}
	}
	var want uint64
	for _, s := range stores {
		want = max(want, s.AppliedIndex())
	}
	for _, s := range stores {
		for s.AppliedIndex() < want {
			if ctx.Err() != nil {
				t.Fatalf("%s stuck at %d < %d", s.NodeID(), s.AppliedIndex(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Each replica's assignments: every device's applied deployment and
	// the deployments targeting it, and how many devices apply one.
	assignments := func(a *Assigner) (string, int) {
		var b strings.Builder
		applying := 0
		a.Read(func(v View) {
			for d := range 40 {
				id := fmt.Sprintf("d%02d", d)
				applied := v.Applied(id)
				if applied != "" {
					applying++
				}
				fmt.Fprintf(&b, "%s applied=%q targeting=%v\n", id, applied, v.Targeting(id))
			}
		})
		return b.String(), applying
	}
	first, applying := assignments(nodes[0])
	// Agreement on nothing would prove nothing.
	if applying < 10 {
		t.Fatalf("only %d of 40 devices apply a deployment; the walk should leave most of them assigned:\n%s", applying, first)
	}
	for i := 1; i < len(nodes); i++ {
		if got, _ := assignments(nodes[i]); got != first {
			t.Fatalf("node %d assignments differ from node 1's:\n%s\nnode 1:\n%s", i+1, got, first)
		}
	}
	t.Logf("writes that took effect: %v; %d rejected, %d of unknown outcome; %d of 40 devices apply a deployment on every replica", written, rejected, unknown, applying)
}

// applyOnLeader applies cmd through whichever store leads, waiting out an
// election: a store that is not the leader has applied nothing.
func applyOnLeader(ctx context.Context, stores []*raftstore.Store, cmd raftstore.Command) (*raftstore.Result, error) {
	for {
		for _, s := range stores {
			if !s.IsLeader() {
				continue
			}
			res, err := s.Apply(ctx, cmd)
			if !errors.Is(err, raftstore.ErrNotLeader) {
				return res, err
			}
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}
