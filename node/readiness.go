package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"appliance/api"
)

// Readiness.
//
// A node serves devices, and answers reads from its replica, only from a
// state it has finished loading:
//   - replayed: at open, the store loads the state file and the evaluator
//     is rebuilt from it; raft then replays the entries of its log after
//     the state file's index (all of them when the state file was rebuilt
//     from a snapshot). Until the state machine has applied the log it had
//     at open (raftstore's Replayed), or a read index from the leader has
//     confirmed it caught up, plain reads are refused (503) rather than
//     served from a state that may be far behind, or empty. A node that
//     starts with nothing (new, or joining a cluster) always waits for
//     the read index: its leader alone knows when it has caught up.
//   - not stopped: a state machine that found damaged state stops for good
//     (raftstore's Observer.Halted); so does a node whose derived state
//     could not be rebuilt. It refuses devices and reads from then on.
//   - a leader: as before, devices are admitted only while the node has a
//     cluster leader (watchLeader sheds them after ShedDevicesAfter without
//     one); at start they wait for the first.
//
// /readyz answers 200 only when all of that holds and the broker admits
// devices.

// markStopped records the error that stopped the node (the first one). It
// takes no lock: Restored calls it holding the engine lock, so that no
// device is sent a document from a half-built evaluator.
func (n *Node) markStopped(err error) {
	n.stopped.CompareAndSwap(nil, &err)
}

// stoppedErr is why the node stopped serving, nil while it serves.
func (n *Node) stoppedErr() error {
	if p := n.stopped.Load(); p != nil {
		return *p
	}
	return nil
}

// refuseDevices turns every device away for good once the node stopped.
func (n *Node) refuseDevices() {
	if n.broker == nil {
		return
	}
	n.admitMu.Lock()
	defer n.admitMu.Unlock()
	n.admitting.Store(false)
	n.broker.Refuse()
}

// readyErr is what /readyz reports: nil when the node serves.
func (n *Node) readyErr() error {
	if err := n.stoppedErr(); err != nil {
		return fmt.Errorf("stopped: %v", err)
	}
	if !n.replayed.Load() {
		return fmt.Errorf("replaying the raft log (applied index %d)", n.store.AppliedIndex())
	}
	if addr, _ := n.store.Leader(); addr == "" {
		return errors.New("no raft leader")
	}
	if n.broker != nil && !n.admitting.Load() {
		return errors.New("not admitting devices yet")
	}
	return nil
}

// servingReads refuses a plain read (api.ErrUnavailable, a 503) while the
// node has not replayed its log, or after it stopped.
func (n *Node) servingReads() error {
	if err := n.stoppedErr(); err != nil {
		return fmt.Errorf("%w: this node stopped serving: %v", api.ErrUnavailable, err)
	}
	if !n.replayed.Load() && !n.checkReplayed() {
		return fmt.Errorf("%w: this node is replaying its raft log (applied index %d); retry shortly, or ask another node",
			api.ErrUnavailable, n.store.AppliedIndex())
	}
	return nil
}

// checkReplayed latches replayed once the store has applied the log it had
// at open.
func (n *Node) checkReplayed() bool {
	if n.store.Replayed() {
		n.replayed.Store(true)
		return true
	}
	return false
}

// confirmReplayed tries the other way to be sure the state is current: a
// read barrier (the leader's read index, applied here). It covers a
// follower whose log had entries the cluster never committed, which the
// leader replaces rather than this node ever applying them.
func (n *Node) confirmReplayed(ctx context.Context) bool {
	if n.checkReplayed() {
		return true
	}
	if addr, _ := n.store.Leader(); addr == "" {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := n.readBarrier(ctx); err != nil {
		return false
	}
	n.replayed.Store(true)
	return true
}
