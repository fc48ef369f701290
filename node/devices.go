package node

import (
	"context"

	"appliance/broker"
	"appliance/deviceauth"
	"appliance/raftstore"
)

// Devices are admitted by package deviceauth (their keys, enrollment,
// sessions ended when a key stops opening its device); the node gives it
// its store, and answers the broker for their desired documents.

func (n *Node) newDeviceAuth() *deviceauth.Authenticator {
	return deviceauth.New((*storeRef)(n), n.logger.With("component", "deviceauth"))
}

// devices gives the broker the devices' desired documents.
type devices Node

var _ broker.DesiredSource = (*devices)(nil)

// Desired returns the device's current desired document.
func (d *devices) Desired(deviceID string) ([]byte, error) {
	return d.assign.Desired(deviceID)
}

// storeRef is the node's replicated store, opened at Start, for the
// packages given it before (deviceauth).
type storeRef Node

var _ deviceauth.Store = (*storeRef)(nil)

func (s *storeRef) View(fn func(r *raftstore.Reader) error) error { return s.store.View(fn) }

func (s *storeRef) Apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
	return s.store.Apply(ctx, cmd)
}
