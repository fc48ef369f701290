package node

import (
	"context"
	"time"
)

// DefaultShedDevicesAfter is how long a node may be without a cluster
// leader before it turns its devices away. Elections take well under a
// second here (docs/benchmarks.md, "Controller failover"), split votes a
// few; five seconds rides them out and still moves a cut-off node's
// devices within seconds.
const DefaultShedDevicesAfter = 5 * time.Second

// watchLeader sheds the node's devices while it has no raft leader. A node
// cut off from the rest of its cluster (a network partition, or peers
// down) can neither commit its devices' reports nor learn of new desired
// state, yet its devices would stay connected to it for as long as it is
// reachable. After ShedDevicesAfter without a leader the broker refuses
// them (Broker.Refuse) and they try the next node they know, one with a
// leader if the rest of the cluster is up; once a leader is back, devices
// are admitted again. Without a reachable majority every node refuses, and
// agents keep running their last manifest until one comes back.
func (n *Node) watchLeader(ctx context.Context) {
	after := n.cfg.ShedDevicesAfter
	if after < 0 || n.broker == nil {
		return
	}
	tick := time.NewTicker(max(min(after/4, 500*time.Millisecond), 10*time.Millisecond))
	defer tick.Stop()
	seen := time.Now() // when this node last had a leader (or started)
	shedding := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if n.hasLeader(after) {
			seen = time.Now()
			if shedding {
				shedding = false
				n.broker.Admit()
				n.logger.Info("cluster leader known again: admitting devices")
			}
			continue
		}
		if time.Since(seen) < after {
			continue
		}
		// Every tick while shedding: a device whose key check was under
		// way when Refuse began is caught here.
		dropped := n.broker.Refuse()
		if !shedding {
			shedding = true
			n.logger.Warn("no cluster leader: turning devices away so that they connect to a node that has one",
				"without_leader", time.Since(seen).Round(time.Millisecond), "disconnected", dropped, "flag", "--shed-devices-after")
		}
	}
}

// hasLeader tells whether the node leads or follows a leader it has heard
// from within the last stale.
func (n *Node) hasLeader(stale time.Duration) bool {
	if n.store.IsLeader() {
		return true
	}
	if _, id := n.store.Leader(); id == "" {
		return false
	}
	last := n.store.LastContact()
	return last >= 0 && last < stale
}
