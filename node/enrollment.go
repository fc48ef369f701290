package node

import (
	"context"

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
