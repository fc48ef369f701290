package node

import (
	"context"
	"time"

	"appliance/raftstore"
	"appliance/reportbatch"
)

// The devices' reports reach raft in batches (package reportbatch); the
// node gives the batcher its store and its broker's sessions.

func (n *Node) newReportBatcher() *reportbatch.Batcher {
	return reportbatch.New(reportbatch.Config{
		NodeID: n.cfg.NodeID,
		Propose: func(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
			return n.store.Apply(ctx, cmd)
		},
		SessionStart:  n.sessionStart,
		FlushInterval: n.cfg.ReportFlushInterval,
		Logger:        n.logger.With("component", "reportbatch"),
	})
}

// sessionStart says when a device's session with this node's broker
// started.
func (n *Node) sessionStart(deviceID string) (time.Time, bool) {
	if n.broker == nil {
		return time.Time{}, false
	}
	c, ok := n.broker.Connection(deviceID)
	return c.ConnectedSince, ok
}
