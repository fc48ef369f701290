package node

import (
	"context"

	"appliance/api"
	"appliance/directmethod"
	"appliance/history"
	"appliance/raftstore"
)

// Direct methods (api.HubBackend's InvokeMethod, the broker's MethodSink,
// the cluster port's calls and device events) are package
// directmethod's; the node gives it its broker, its peers and its
// history, each read when used: they exist only once the node started.

func (n *Node) newRelay() *directmethod.Relay {
	return directmethod.New(directmethod.Config{
		NodeID:  n.cfg.NodeID,
		Broker:  (*methodBroker)(n),
		Cluster: (*peerCluster)(n),
		Lookup: func(ctx context.Context, deviceID string) error {
			return (*backend)(n).viewBeforeWrite(ctx, func(r *raftstore.Reader) error {
				_, err := r.Device(deviceID)
				return err
			})
		},
		History:      (*methodHistory)(n),
		AppliedIndex: func() uint64 { return n.store.AppliedIndex() },
		Actor:        operatorActor,
		Stopping:     n.stopCtx,
		Logger:       n.logger.With("component", "directmethod"),
	})
}

// InvokeMethod implements api.HubBackend.
func (b *backend) InvokeMethod(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	return b.methods.Invoke(ctx, deviceID, moduleID, method, req)
}

// methodBroker is the node's broker as a call sees it.
type methodBroker Node

var _ directmethod.Broker = (*methodBroker)(nil)

func (b *methodBroker) Connected(deviceID string) bool {
	_, ok := b.broker.Connection(deviceID)
	return ok
}

func (b *methodBroker) PublishMethod(deviceID string, payload []byte) error {
	return b.broker.PublishMethod(deviceID, payload)
}

// methodHistory is the node's history, opened at Start.
type methodHistory Node

func (h *methodHistory) Add(items ...history.Item) { h.history.Add(items...) }
