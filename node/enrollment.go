package node

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"

	"appliance/api"
	"appliance/fleet"
	"appliance/raftstore"
)

// PutEnrollment creates an enrollment with a fresh token (returned once),
// or replaces the tags of an existing one.
func (b *backend) PutEnrollment(ctx context.Context, name string, req api.EnrollmentRequest, opts api.WriteOptions) (fleet.Enrollment, bool, error) {
	if err := fleet.ValidateEnrollmentName(name); err != nil {
		return fleet.Enrollment{}, false, err
	}
	if err := fleet.ValidateTags(req.Tags); err != nil {
		return fleet.Enrollment{}, false, err
	}
	token, dk, err := fleet.NewEnrollmentToken(name)
	if err != nil {
		return fleet.Enrollment{}, false, err
	}
	tags := req.Tags
	if tags == nil {
		tags = map[string]any{}
	}
	res, err := b.apply(ctx, raftstore.PutEnrollment{
		Precondition: precondition(opts), Time: now(),
		Enrollment: fleet.Enrollment{Name: name, Tags: tags, DerivationKey: dk},
	})
	if err != nil {
		return fleet.Enrollment{}, false, err
	}
	e := res.Enrollment.Public()
	if res.Created {
		e.Token = token
	}
	return e, res.Created, nil
}

// DeleteEnrollment deletes an enrollment: its token enrolls no device
// from the moment a node applies the entry. With revokeDevices the
// devices it registered lose their keys in the same entry.
func (b *backend) DeleteEnrollment(ctx context.Context, name string, revokeDevices bool, opts api.WriteOptions) ([]string, error) {
	if !revokeDevices {
		_, err := b.apply(ctx, raftstore.DeleteEnrollment{Precondition: precondition(opts), Name: name})
		return nil, err
	}
	devs, err := b.enrollmentDevices(ctx, name)
	if err != nil {
		return nil, err
	}
	res, err := b.apply(ctx, raftstore.RevokeEnrollmentDevices{Precondition: precondition(opts), Name: name,
		DeleteEnrollment: true, Time: now(), EnrollmentDevices: devs})
	if err != nil {
		return nil, err
	}
	b.logger.Info("enrollment deleted and its devices revoked", "enrollment", name, "devices", len(res.Revoked))
	return orEmpty(res.Revoked), nil
}

// RotateEnrollment gives an enrollment a new token: the old one enrolls no
// device from the moment a node applies the entry (devices enrolled with
// it keep their own keys). With RevokeDevices the devices it registered
// lose their keys in the same entry.
func (b *backend) RotateEnrollment(ctx context.Context, name string, req api.RotateEnrollmentRequest, opts api.WriteOptions) (api.EnrollmentRotation, error) {
	if err := fleet.ValidateEnrollmentName(name); err != nil {
		return api.EnrollmentRotation{}, err
	}
	token, dk, err := fleet.NewEnrollmentToken(name)
	if err != nil {
		return api.EnrollmentRotation{}, err
	}
	cmd := raftstore.RotateEnrollment{Precondition: precondition(opts), Name: name, DerivationKey: dk,
		RevokeDevices: req.RevokeDevices, Time: now()}
	if req.RevokeDevices {
		if cmd.EnrollmentDevices, err = b.enrollmentDevices(ctx, name); err != nil {
			return api.EnrollmentRotation{}, err
		}
	}
	res, err := b.apply(ctx, cmd)
	if err != nil {
		return api.EnrollmentRotation{}, err
	}
	e := res.Enrollment.Public()
	e.Token = token
	b.logger.Info("enrollment token rotated; the previous one enrolls nothing", "enrollment", name, "revoked_devices", len(res.Revoked))
	return api.EnrollmentRotation{Enrollment: e, RevokedDevices: orEmpty(res.Revoked)}, nil
}

// enrollmentDevices lists the devices the enrollment registered, as of the
// leader's latest state: those that name it, and those registered before
// devices named their enrollment whose key is still the one its token
// derives for them.
func (b *backend) enrollmentDevices(ctx context.Context, name string) (raftstore.EnrollmentDevices, error) {
	if err := b.node().readBarrier(ctx); err != nil {
		return raftstore.EnrollmentDevices{}, b.unavailable(err)
	}
	var out raftstore.EnrollmentDevices
	err := b.store.View(func(r *raftstore.Reader) error {
		e, err := r.Enrollment(name)
		if err != nil {
			return err
		}
		out.AsOf = r.AppliedIndex()
		return r.Devices("", func(d fleet.Device) bool {
			h := d.Authentication.KeyHashes
			derived := func() bool {
				k := fleet.HashKey(e.DeviceKeyFor(d.ID))
				return h != nil && (h.Primary == k || h.Secondary == k)
			}
			if d.Enrollment == name || d.Enrollment == "" && derived() {
				out.Devices = append(out.Devices, d.ID)
			}
			return true
		})
	})
	return out, err
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (b *backend) Enrollment(ctx context.Context, name string) (fleet.Enrollment, error) {
	var e fleet.Enrollment
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		var err error
		e, err = r.Enrollment(name)
		return err
	})
	return e.Public(), err
}

func (b *backend) Enrollments(ctx context.Context) ([]fleet.Enrollment, error) {
	out := []fleet.Enrollment{}
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		return r.Enrollments(func(e fleet.Enrollment) bool {
			out = append(out, e.Public())
			return true
		})
	})
	return out, err
}

// RegenerateDeviceKey replaces one of a device's two keys, so that keys can
// be rotated one at a time without the device going offline.
func (b *backend) RegenerateDeviceKey(ctx context.Context, id, which string) (fleet.Device, error) {
	if which != "primary" && which != "secondary" {
		return fleet.Device{}, fleet.Invalid("key", "must be primary or secondary; got %q", which)
	}
	var cur fleet.Device
	if err := b.viewBeforeWrite(ctx, func(r *raftstore.Reader) error {
		var err error
		cur, err = r.Device(id)
		return err
	}); err != nil {
		return fleet.Device{}, err
	}
	key, err := fleet.NewKey()
	if err != nil {
		return fleet.Device{}, err
	}
	hashes := fleet.KeyHashes{}
	if cur.Authentication.KeyHashes != nil {
		hashes = *cur.Authentication.KeyHashes
	}
	if which == "primary" {
		hashes.Primary = fleet.HashKey(key)
	} else {
		hashes.Secondary = fleet.HashKey(key)
	}
	// If-Match on the etag we read: a concurrent rotation of the other key
	// must not be undone by this one.
	res, err := b.apply(ctx, raftstore.PatchDevice{Precondition: raftstore.Precondition{IfMatch: cur.Etag}, ID: id, KeyHashes: &hashes, Time: now()})
	if err != nil {
		return fleet.Device{}, err
	}
	d := res.Device.Public()
	sk := &fleet.SymmetricKey{}
	if which == "primary" {
		sk.PrimaryKey = key
	} else {
		sk.SecondaryKey = key
	}
	d.Authentication.SymmetricKey = sk
	return d, nil
}

// enroll registers an unknown device that proves it holds an enrollment's
// token (derived: the key the token derives for its id) with its own key
// (own), which is what it is registered with: the derived key, which every
// holder of the token can compute, opens nothing. It runs on the
// connecting client's goroutine.
func (d *devices) enroll(ctx context.Context, deviceID, derived, own string) error {
	if fleet.ValidateDeviceID(deviceID) != nil {
		return ErrDeviceRefused
	}
	match, err := d.enrollmentOf(deviceID, derived)
	if err != nil {
		return err
	}
	if match == nil {
		return ErrDeviceRefused
	}
	if err := fleet.ValidateOwnKey(own); err != nil {
		d.logger.Warn("enrollment refused: the device's own key is not 32 random bytes", "device", deviceID, "enrollment", match.Name)
		return ErrDeviceRefused
	}
	secondary, err := fleet.NewKey()
	if err != nil {
		return err
	}
	res, err := d.store.Apply(ctx, raftstore.PutDevice{
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
		return d.AuthenticateDevice(ctx, deviceID, fleet.EnrollmentKey(derived, own))
	}
	if err != nil {
		return fmt.Errorf("enroll %s through %s: %w", deviceID, match.Name, err)
	}
	d.logger.Info("device enrolled", "device", deviceID, "enrollment", match.Name, "etag", res.Device.Etag)
	return nil
}

// enrollmentOf finds the enrollment whose token derives key for deviceID,
// comparing in constant time; nil when none does.
func (d *devices) enrollmentOf(deviceID, key string) (*fleet.Enrollment, error) {
	var match *fleet.Enrollment
	err := d.store.View(func(r *raftstore.Reader) error {
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
func (d *devices) adoptOwnKey(ctx context.Context, dev fleet.Device, derived, own string) error {
	if err := fleet.ValidateOwnKey(own); err != nil {
		return ErrDeviceRefused
	}
	match, err := d.enrollmentOf(dev.ID, derived)
	if err != nil {
		return err
	}
	if match == nil {
		// A key of the device's own, not one a token derives: nothing
		// to move away from.
		return ErrDeviceRefused
	}
	name := match.Name
	h := *dev.Authentication.KeyHashes
	if fleet.HashKey(derived) == h.Primary {
		h.Primary = fleet.HashKey(own)
	} else {
		h.Secondary = fleet.HashKey(own)
	}
	_, err = d.store.Apply(ctx, raftstore.PatchDevice{Precondition: raftstore.Precondition{IfMatch: dev.Etag},
		ID: dev.ID, KeyHashes: &h, Enrollment: name, Time: now()})
	if errors.Is(err, fleet.ErrPreconditionFailed) {
		// Changed meanwhile (another connection adopted its key): judge
		// by what is stored now.
		return d.AuthenticateDevice(ctx, dev.ID, fleet.EnrollmentKey(derived, own))
	}
	if err != nil {
		return fmt.Errorf("device %s adopts its own key: %w", dev.ID, err)
	}
	d.logger.Info("device replaced its derived key with its own", "device", dev.ID, "enrollment", name)
	return nil
}

// explainDerivedOnly logs why an unknown device that presents only the key
// an enrollment derives for it is refused: an agent of an older release,
// which enrolled with the derived key alone.
func (n *Node) explainDerivedOnly(deviceID, key string) {
	if m, err := (*devices)(n).enrollmentOf(deviceID, key); err == nil && m != nil {
		n.logger.Warn("enrollment refused: the device presented only the key derived from the enrollment's token, which any device of the group can compute; agents of this release enroll with a key of their own (upgrade the agent)",
			"device", deviceID, "enrollment", m.Name)
	}
}
