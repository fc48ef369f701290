package raftstore

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// TestFSM_EnrollmentRotationAndRevocation: a rotation replaces the
// derivation key (not with the same one); with RevokeDevices it clears the
// keys of the listed devices and of those that name the enrollment and
// changed after the list was read, reports them as credential changes, and
// leaves other devices alone; RevokeEnrollmentDevices with
// DeleteEnrollment deletes the enrollment in the same entry.
func TestFSM_EnrollmentRotationAndRevocation(t *testing.T) {
	f := newTestFSM(t)
	obs := &recordingObserver{}
	f.observer = obs
	hashes := func(k string) fleet.Authentication {
		return fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(k), Secondary: fleet.HashKey(k + "2")}}
	}
	index := uint64(0)
	apply := func(c Command) *Result {
		t.Helper()
		index++
		return f.ApplyBatch([]*raft.Log{logOf(t, index, c)})[0].(*Result)
	}
	apply(PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: "line-1", DerivationKey: "k1"}})
	apply(PutDevice{Time: t0, Device: fleet.Device{ID: "listed", Enrollment: "line-1", Authentication: hashes("a")}})
	apply(PutDevice{Time: t0, Device: fleet.Device{ID: "operators", Authentication: hashes("b")}})
	apply(PutDevice{Time: t0, Device: fleet.Device{ID: "other-group", Enrollment: "line-2", Authentication: hashes("c")}})
	asOf := index
	// Enrolled after the proposer read its list: caught by the name.
	apply(PutDevice{Time: t0, Device: fleet.Device{ID: "late", Enrollment: "line-1", Authentication: hashes("d")}})
	// A replacement keeps the enrollment a device came through.
	apply(PutDevice{Time: t0, Device: fleet.Device{ID: "listed", Tags: map[string]any{"x": 1.0}}})

	if res := apply(RotateEnrollment{Name: "line-1", DerivationKey: "k1", Time: t0}); !errors.Is(res.Err, fleet.ErrInvalid) {
		t.Fatalf("rotation to the same key: %v, want invalid", res.Err)
	}
	if res := apply(RotateEnrollment{Name: "nope", DerivationKey: "k2", Time: t0}); !errors.Is(res.Err, fleet.ErrNotFound) {
		t.Fatalf("rotation of a missing enrollment: %v", res.Err)
	}
	obs.changes = nil
	res := apply(RotateEnrollment{Name: "line-1", DerivationKey: "k2", RevokeDevices: true, Time: t0.Add(time.Minute),
		EnrollmentDevices: EnrollmentDevices{Devices: []string{"listed", "gone"}, AsOf: asOf}})
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if want := []string{"late", "listed"}; !slices.Equal(res.Revoked, want) {
		t.Fatalf("revoked %v, want %v", res.Revoked, want)
	}
	var changed []string
	for _, c := range obs.changes {
		if c.Kind == DevicePut && c.CredentialsChanged {
			changed = append(changed, c.ID)
		}
	}
	if !slices.Equal(changed, res.Revoked) {
		t.Fatalf("credential changes %v, want %v", changed, res.Revoked)
	}
	f.view(func(r *Reader) error {
		e, _ := r.Enrollment("line-1")
		if e.DerivationKey != "k2" || e.Etag != etagFor(index) {
			t.Errorf("rotated enrollment %+v", e)
		}
		for _, id := range []string{"listed", "late"} {
			d, _ := r.Device(id)
			if d.Authentication.KeyHashes != nil || d.Enrollment != "line-1" {
				t.Errorf("revoked device %s: %+v", id, d)
			}
		}
		for id, key := range map[string]string{"operators": "b", "other-group": "c"} {
			d, _ := r.Device(id)
			if d.Authentication.KeyHashes == nil || !d.Authentication.KeyHashes.CheckKey(key) {
				t.Errorf("device %s lost its keys", id)
			}
		}
		return nil
	})

	// Without a list (AsOf 0) every device naming the enrollment counts.
	res = apply(RevokeEnrollmentDevices{Name: "line-1", DeleteEnrollment: true, Time: t0})
	if res.Err != nil || !slices.Equal(res.Revoked, []string{"late", "listed"}) {
		t.Fatalf("delete with revocation: %+v", res)
	}
	f.view(func(r *Reader) error {
		if _, err := r.Enrollment("line-1"); !errors.Is(err, fleet.ErrNotFound) {
			t.Errorf("enrollment still there: %v", err)
		}
		return nil
	})
}

type recordingObserver struct{ changes []Change }

func (o *recordingObserver) Applied(changes []Change) { o.changes = append(o.changes, changes...) }
func (o *recordingObserver) Restored(*Reader) error   { return nil }
func (o *recordingObserver) Halted(error)             {}
