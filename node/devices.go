package node

import (
	"context"
	"errors"
	"fmt"

	"appliance/broker"
	"appliance/fleet"
	"appliance/raftstore"
)

// ErrDeviceRefused is what a device that may not connect is told (unknown,
// disabled, wrong key: the same answer for all, so that a stranger learns
// nothing about which ids exist).
var ErrDeviceRefused = errors.New("device refused: unknown device, disabled device, or wrong key")

// devices is the node's side of the device protocol: it authenticates
// devices for the broker, builds their desired documents from the local
// replica and the evaluator, and keeps the version of each device's
// desired document.
type devices Node

var (
	_ broker.Authenticator = (*devices)(nil)
	_ broker.KeyIdentifier = (*devices)(nil)
	_ broker.DesiredSource = (*devices)(nil)
)

// KeyID names the credential a device's key stands for: the digest the
// state stores for it (fleet.HashKey), so that a session can be checked
// against the device's keys after they change.
func (d *devices) KeyID(deviceID, key string) string {
	if _, own, ok := fleet.ParseEnrollmentKey(key); ok {
		return fleet.HashKey(own)
	}
	return fleet.HashKey(key)
}

// keyStillOpens reports whether a session authenticated with the key
// named keyID may go on: the device exists, is enabled, and still has
// that key. It reads the local replica as it is now, so that checks run
// in any order judge by the newest state.
func (n *Node) keyStillOpens(deviceID, keyID string) bool {
	var ok bool
	_ = n.store.View(func(r *raftstore.Reader) error {
		dev, err := r.Device(deviceID)
		if err != nil {
			return err
		}
		h := dev.Authentication.KeyHashes
		ok = dev.Status != fleet.DeviceDisabled && h != nil && keyID != "" && (keyID == h.Primary || keyID == h.Secondary)
		return nil
	})
	return ok
}

// recheckSessions ends the sessions whose key no longer opens their
// device, after an applied change of the devices' keys or status (every
// node does it as it applies the change, for its own sessions). A few
// devices are checked at once; many (an enrollment's devices revoked) on
// their own goroutine, so that the apply path does not wait for their
// DISCONNECTs.
func (n *Node) recheckSessions(ids []string) {
	check := func() {
		for _, id := range ids {
			n.broker.DisconnectStale(id, func(keyID string) bool { return n.keyStillOpens(id, keyID) })
		}
	}
	if len(ids) <= 8 {
		check()
		return
	}
	go check()
}

// AuthenticateDevice checks a device's key against the stored hashes in
// constant time, from the local replica. The key is a device key, or an
// enrolling device's EnrollmentKey (proof from the group's token, and its
// own key): an unknown device enrolls with it; a registered one is checked
// on its own key alone.
func (d *devices) AuthenticateDevice(ctx context.Context, deviceID, key string) error {
	derived, own, enrolling := fleet.ParseEnrollmentKey(key)
	presented := key
	if enrolling {
		presented = own
	}
	var dev fleet.Device
	err := d.store.View(func(r *raftstore.Reader) error {
		var err error
		dev, err = r.Device(deviceID)
		return err
	})
	if err != nil {
		if !errors.Is(err, fleet.ErrNotFound) {
			return fmt.Errorf("authenticate %s: %w", deviceID, err)
		}
		if !enrolling {
			(*Node)(d).explainDerivedOnly(deviceID, key)
			return ErrDeviceRefused
		}
		return d.enroll(ctx, deviceID, derived, own)
	}
	h := dev.Authentication.KeyHashes
	if dev.Status == fleet.DeviceDisabled || h == nil {
		return ErrDeviceRefused
	}
	if h.CheckKey(presented) {
		return nil
	}
	if enrolling && h.CheckKey(derived) {
		// Registered before devices brought their own key: its key is
		// the derived one, which its siblings can compute.
		return d.adoptOwnKey(ctx, dev, derived, own)
	}
	return ErrDeviceRefused
}

// Desired returns the device's current desired document.
func (d *devices) Desired(deviceID string) ([]byte, error) {
	return d.assign.Desired(deviceID)
}
