package node

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// TestCluster_IdenticalAssignments runs three raft replicas in one process,
// each feeding its own evaluator exactly as a node does, drives random
// device and deployment changes through the leader, and checks that every
// replica reports the same assignments once the same entries have applied.
func TestCluster_IdenticalAssignments(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	var nodes [3]*Node
	var stores [3]*raftstore.Store
	for i := range nodes {
		nodes[i] = &Node{logger: logger, engine: evaluator.NewEngine()}
		s, err := raftstore.Open(context.Background(), raftstore.Config{
			Dir: t.TempDir(), NodeID: fmt.Sprintf("n%d", i+1), BindAddr: "127.0.0.1:0",
			Bootstrap: i == 0, Observer: (*observer)(nodes[i]), Logger: logger,
			HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		stores[i] = s
		nodes[i].store = s
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
		case r < 9:
			cmd = raftstore.PutDeployment{Time: at, Deployment: fleet.Deployment{
				ID: fmt.Sprintf("dep%d-%d", rng.IntN(6), i), Content: json.RawMessage(`{}`),
				TargetCondition: conds[rng.IntN(len(conds))], Priority: int64(rng.IntN(3)),
			}}
		default:
			c := conds[rng.IntN(len(conds))]
			p := int64(rng.IntN(3))
			cmd = raftstore.PatchDeployment{ID: fmt.Sprintf("dep%d-%d", rng.IntN(6), rng.IntN(i+1)), TargetCondition: &c, Priority: &p, Time: at}
		}
		// Rule rejections (a missing id) are fine: they are entries too.
		if _, err := stores[0].Apply(ctx, cmd); err != nil && ctx.Err() != nil {
			t.Fatal(err)
		}
	}
	want := stores[0].AppliedIndex()
	for _, s := range stores {
		for s.AppliedIndex() < want {
			if ctx.Err() != nil {
				t.Fatalf("%s stuck at %d < %d", s.NodeID(), s.AppliedIndex(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	snapshot := func(n *Node) string {
		n.engineMu.RLock()
		defer n.engineMu.RUnlock()
		out := ""
		for d := range 40 {
			id := fmt.Sprintf("d%02d", d)
			out += fmt.Sprintf("%s applied=%q targeting=%v\n", id, n.engine.Applied(id), n.engine.Targeting(id))
		}
		return out
	}
	leader := snapshot(nodes[0])
	if leader == "" {
		t.Fatal("empty assignments")
	}
	for i := 1; i < 3; i++ {
		if got := snapshot(nodes[i]); got != leader {
			t.Fatalf("node %d assignments differ from the leader's:\n%s\nleader:\n%s", i+1, got, leader)
		}
	}
}
