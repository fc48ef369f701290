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

// watchLeader admits devices once the node is ready and sheds them while
// it has no raft leader. At start the broker refuses every device until the
// node has replayed its log (readiness.go) and knows a leader. After that,
// a node cut off from the rest of its cluster (a network partition, or
// peers down) can neither commit its devices' reports nor learn of new
// desired state, yet its devices would stay connected to it for as long as
// it is reachable. After ShedDevicesAfter without a leader the broker
// refuses them (Broker.Refuse) and they try the next node they know, one
// with a leader if the rest of the cluster is up; once a leader is back,
// devices are admitted again. Without a reachable majority every node
// refuses, and agents keep running their last manifest until one comes
// back. A node that stopped (damaged state) refuses for good.
func (n *Node) watchLeader(ctx context.Context) {
	if n.broker == nil {
		n.watchReplay(ctx)
		return
	}
	after := n.cfg.ShedDevicesAfter
	stale := after
	if after < 0 {
		stale = DefaultShedDevicesAfter
	}
	// Quick until devices are first admitted (a node is usually ready
	// within an election), then as before.
	steady := max(min(stale/4, 500*time.Millisecond), 10*time.Millisecond)
	const starting = 20 * time.Millisecond
	timer := time.NewTimer(starting)
	defer timer.Stop()
	seen := time.Now() // when this node last had a leader (or started)
	everAdmitted, shedding := false, false
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		if everAdmitted {
			timer.Reset(steady)
		} else {
			timer.Reset(starting)
		}
		if n.stoppedErr() != nil {
			n.refuseDevices() // every tick: one that slipped in is caught
			continue
		}
		if !n.replayed.Load() && !n.confirmReplayed(ctx) {
			continue
		}
		if n.hasLeader(stale) {
			seen = time.Now()
			if n.admit() {
				switch {
				case !everAdmitted:
					n.logger.Info("node ready: state loaded and log replayed; admitting devices", "applied_index", n.store.AppliedIndex())
				case shedding:
					n.logger.Info("cluster leader known again: admitting devices")
				}
				everAdmitted, shedding = true, false
			}
			continue
		}
		if !everAdmitted || after < 0 || time.Since(seen) < after {
			continue
		}
		// Every tick while shedding: a device whose key check was under
		// way when Refuse began is caught here.
		n.admitMu.Lock()
		n.admitting.Store(false)
		dropped := n.broker.Refuse()
		n.admitMu.Unlock()
		if !shedding {
			shedding = true
			n.logger.Warn("no cluster leader: turning devices away so that they connect to a node that has one",
				"without_leader", time.Since(seen).Round(time.Millisecond), "disconnected", dropped, "flag", "--shed-devices-after")
		}
	}
}

// admit lets devices in unless the node stopped meanwhile; it reports
// whether the broker was refusing before.
func (n *Node) admit() bool {
	n.admitMu.Lock()
	defer n.admitMu.Unlock()
	if n.stoppedErr() != nil || n.admitting.Load() {
		return false
	}
	n.broker.Admit()
	n.admitting.Store(true)
	return true
}

// watchReplay marks a node without a broker replayed (tests).
func (n *Node) watchReplay(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !n.replayed.Load() && !n.confirmReplayed(ctx) {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
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
