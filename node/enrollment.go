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

func (b *backend) DeleteEnrollment(ctx context.Context, name string, opts api.WriteOptions) error {
	_, err := b.apply(ctx, raftstore.DeleteEnrollment{Precondition: precondition(opts), Name: name})
	return err
}

func (b *backend) Enrollment(ctx context.Context, name string) (fleet.Enrollment, error) {
	var e fleet.Enrollment
	err := b.store.View(func(r *raftstore.Reader) error {
		var err error
		e, err = r.Enrollment(name)
		return err
	})
	return e.Public(), err
}

func (b *backend) Enrollments(ctx context.Context) ([]fleet.Enrollment, error) {
	out := []fleet.Enrollment{}
	err := b.store.View(func(r *raftstore.Reader) error {
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
	if err := b.store.View(func(r *raftstore.Reader) error {
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

// enroll registers an unknown device that presents a key derived from an
// enrollment's token. It runs on the connecting client's goroutine.
func (d *devices) enroll(ctx context.Context, deviceID, key string) error {
	if fleet.ValidateDeviceID(deviceID) != nil {
		return ErrDeviceRefused
	}
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
		return fmt.Errorf("enroll %s: %w", deviceID, err)
	}
	if match == nil {
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
			ID: deviceID, Tags: match.Tags,
			Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{
				Primary: fleet.HashKey(key), Secondary: fleet.HashKey(secondary),
			}},
		},
	})
	if errors.Is(err, fleet.ErrExists) {
		// Two connections of a new device raced; the other registered it.
		return d.AuthenticateDevice(ctx, deviceID, key)
	}
	if err != nil {
		return fmt.Errorf("enroll %s through %s: %w", deviceID, match.Name, err)
	}
	d.logger.Info("device enrolled", "device", deviceID, "enrollment", match.Name, "etag", res.Device.Etag)
	return nil
}
