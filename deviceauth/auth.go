// Package deviceauth owns how a controller admits a device to its broker:
// a device's key checked against the digests the replica stores, in
// constant time (an unknown, disabled or wrong-keyed device gets the same
// answer, so that a stranger learns nothing about which ids exist); an
// unknown device that proves it holds an enrollment group's token (the
// key the token derives for its id) registered through raft with the
// group's tags and the key it brought of its own, the only one that opens
// it from then on (the derived key, which any holder of the token can
// compute, opens nothing); a device registered before devices brought
// their own key moved to it; and the sessions whose key no longer opens
// their device ended, on every node as it applies the change.
// docs/architecture.md, "Devices joining", has the reasons.
//
// It reads and writes the replicated store through the Store interface it
// declares, and ends sessions through Sessions; the node gives it both.
package deviceauth

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"appliance/broker"
	"appliance/fleet"
	"appliance/raftstore"
)

// ErrRefused is what a device that may not connect is told (unknown,
// disabled, wrong key: the same answer for all, so that a stranger learns
// nothing about which ids exist).
var ErrRefused = errors.New("device refused: unknown device, disabled device, or wrong key")

// Store is the replicated store as the authentication sees it.
type Store interface {
	// View reads the local replica in one read transaction.
	View(fn func(r *raftstore.Reader) error) error
	// Apply proposes a command and waits until it is applied.
	Apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error)
}

// Sessions are the broker's sessions (broker.Broker).
type Sessions interface {
	// DisconnectStale ends the device's sessions whose key stillValid
	// refuses.
	DisconnectStale(deviceID string, stillValid func(keyID string) bool) int
}

// Authenticator admits devices for the broker.
type Authenticator struct {
	store  Store
	logger *slog.Logger
}

var (
	_ broker.Authenticator = (*Authenticator)(nil)
	_ broker.KeyIdentifier = (*Authenticator)(nil)
)

// New returns an Authenticator over store; logger defaults to
// slog.Default().
func New(store Store, logger *slog.Logger) *Authenticator {
	if logger == nil {
		logger = slog.Default()
	}
	return &Authenticator{store: store, logger: logger}
}

// KeyID names the credential a device's key stands for: the digest the
// state stores for it (fleet.HashKey), so that a session can be checked
// against the device's keys after they change.
func (a *Authenticator) KeyID(deviceID, key string) string {
	if _, own, ok := fleet.ParseEnrollmentKey(key); ok {
		return fleet.HashKey(own)
	}
	return fleet.HashKey(key)
}

// KeyStillOpens reports whether a session authenticated with the key
// named keyID may go on: the device exists, is enabled, and still has
// that key. It reads the local replica as it is now, so that checks run
// in any order judge by the newest state.
func (a *Authenticator) KeyStillOpens(deviceID, keyID string) bool {
	var ok bool
	_ = a.store.View(func(r *raftstore.Reader) error {
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

// RecheckSessions ends the sessions whose key no longer opens their
// device, after an applied change of the devices' keys or status (every
// node does it as it applies the change, for its own sessions). A few
// devices are checked at once; many (an enrollment's devices revoked) on
// their own goroutine, so that the apply path does not wait for their
// DISCONNECTs.
func (a *Authenticator) RecheckSessions(s Sessions, ids []string) {
	check := func() {
		for _, id := range ids {
			s.DisconnectStale(id, func(keyID string) bool { return a.KeyStillOpens(id, keyID) })
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
func (a *Authenticator) AuthenticateDevice(ctx context.Context, deviceID, key string) error {
	derived, own, enrolling := fleet.ParseEnrollmentKey(key)
	presented := key
	if enrolling {
		presented = own
	}
	var dev fleet.Device
	err := a.store.View(func(r *raftstore.Reader) error {
		var err error
		dev, err = r.Device(deviceID)
		return err
	})
	if err != nil {
		if !errors.Is(err, fleet.ErrNotFound) {
			return fmt.Errorf("authenticate %s: %w", deviceID, err)
		}
		if !enrolling {
			a.explainDerivedOnly(deviceID, key)
			return ErrRefused
		}
		return a.enroll(ctx, deviceID, derived, own)
	}
	h := dev.Authentication.KeyHashes
	if dev.Status == fleet.DeviceDisabled || h == nil {
		return ErrRefused
	}
	if h.CheckKey(presented) {
		return nil
	}
	if enrolling && h.CheckKey(derived) {
		// Registered before devices brought their own key: its key is
		// the derived one, which its siblings can compute.
		return a.adoptOwnKey(ctx, dev, derived, own)
	}
	return ErrRefused
}

// enroll registers an unknown device that proves it holds an enrollment's
// token (derived: the key the token derives for its id) with its own key
// (own), which is what it is registered with: the derived key, which every
// holder of the token can compute, opens nothing. It runs on the
// connecting client's goroutine.
func (a *Authenticator) enroll(ctx context.Context, deviceID, derived, own string) error {
	if fleet.ValidateDeviceID(deviceID) != nil {
		return ErrRefused
	}
	match, err := a.enrollmentOf(deviceID, derived)
	if err != nil {
		return err
	}
	if match == nil {
		return ErrRefused
	}
	if err := fleet.ValidateOwnKey(own); err != nil {
		a.logger.Warn("enrollment refused: the device's own key is not 32 random bytes", "device", deviceID, "enrollment", match.Name)
		return ErrRefused
	}
	secondary, err := fleet.NewKey()
	if err != nil {
		return err
	}
	res, err := a.store.Apply(ctx, raftstore.PutDevice{
		Precondition: raftstore.Precondition{IfNoneMatch: "*"},
		Time:         now(),
		Device: fleet.Device{
			ID: deviceID, Tags: match.Tags, Enrollment: match.Name,
			Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{
				Primary: fleet.HashKey(own), Secondary: fleet.HashKey(secondary),
			}},
		},
	})
	if errors.Is(err, fleet.ErrExists) {
		// Two connections of a new device raced (an agent retrying after a
		// lost answer): the one registered first decides whose key counts.
		return a.AuthenticateDevice(ctx, deviceID, fleet.EnrollmentKey(derived, own))
	}
	if err != nil {
		return fmt.Errorf("enroll %s through %s: %w", deviceID, match.Name, err)
	}
	a.logger.Info("device enrolled", "device", deviceID, "enrollment", match.Name, "etag", res.Device.Etag)
	return nil
}

// enrollmentOf finds the enrollment whose token derives key for deviceID,
// comparing in constant time; nil when none does.
func (a *Authenticator) enrollmentOf(deviceID, key string) (*fleet.Enrollment, error) {
	var match *fleet.Enrollment
	err := a.store.View(func(r *raftstore.Reader) error {
		return r.Enrollments(func(e fleet.Enrollment) bool {
			if subtle.ConstantTimeCompare([]byte(e.DeviceKeyFor(deviceID)), []byte(key)) == 1 {
				match = &e
				return false
			}
			return true
		})
	})
	if err != nil {
		return nil, fmt.Errorf("enroll %s: %w", deviceID, err)
	}
	return match, nil
}

// adoptOwnKey moves a device registered with its derived key (before
// devices brought their own) to its own key: the key slot holding the
// derived key's digest gets the own key's. It trusts the first device
// that presents the derived key with an own key, as the enrollment itself
// trusted the first device presenting the derived key.
func (a *Authenticator) adoptOwnKey(ctx context.Context, dev fleet.Device, derived, own string) error {
	if err := fleet.ValidateOwnKey(own); err != nil {
		return ErrRefused
	}
	match, err := a.enrollmentOf(dev.ID, derived)
	if err != nil {
		return err
	}
	if match == nil {
		// A key of the device's own, not one a token derives: nothing
		// to move away from.
		return ErrRefused
	}
	name := match.Name
	h := *dev.Authentication.KeyHashes
	if fleet.HashKey(derived) == h.Primary {
		h.Primary = fleet.HashKey(own)
	} else {
		h.Secondary = fleet.HashKey(own)
	}
	_, err = a.store.Apply(ctx, raftstore.PatchDevice{Precondition: raftstore.Precondition{IfMatch: dev.Etag},
		ID: dev.ID, KeyHashes: &h, Enrollment: name, Time: now()})
	if errors.Is(err, fleet.ErrPreconditionFailed) {
		// Changed meanwhile (another connection adopted its key): judge
		// by what is stored now.
		return a.AuthenticateDevice(ctx, dev.ID, fleet.EnrollmentKey(derived, own))
	}
	if err != nil {
		return fmt.Errorf("device %s adopts its own key: %w", dev.ID, err)
	}
	a.logger.Info("device replaced its derived key with its own", "device", dev.ID, "enrollment", name)
	return nil
}

// explainDerivedOnly logs why an unknown device that presents only the key
// an enrollment derives for it is refused: an agent of an older release,
// which enrolled with the derived key alone.
func (a *Authenticator) explainDerivedOnly(deviceID, key string) {
	if m, err := a.enrollmentOf(deviceID, key); err == nil && m != nil {
		a.logger.Warn("enrollment refused: the device presented only the key derived from the enrollment's token, which any device of the group can compute; agents of this release enroll with a key of their own (upgrade the agent)",
			"device", deviceID, "enrollment", m.Name)
	}
}

// now is the time a command carries: UTC, to the microsecond, as every
// other command's.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }
