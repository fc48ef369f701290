package node

import (
	"context"

	"appliance/api"
	"appliance/eventtail"
	"appliance/northbound"
)

// The live tail of upstream messages (appliance events tail) is package
// eventtail's; the node gives it its log and its peers (peerCluster).

func (n *Node) newTailer() *eventtail.Tailer {
	return eventtail.New(eventtail.Config{
		NodeID: n.cfg.NodeID,
		Local:  (*localEvents)(n),
		Peers:  (*peerCluster)(n),
		Ready:  n.servingReads,
		Logger: n.logger.With("component", "eventtail"),
	})
}

// TailEvents implements api.HubBackend.
func (b *backend) TailEvents(ctx context.Context, f api.EventFilter, fn func(api.EventView) error) error {
	return b.tail.Tail(ctx, f, fn)
}

// localEvents is the node's log of upstream messages, opened at Start.
type localEvents Node

var _ eventtail.Local = (*localEvents)(nil)

func (l *localEvents) Tail(ctx context.Context, f northbound.TailFilter, fn func(northbound.Message) error) error {
	return l.northbound.Tail(ctx, f, fn)
}
