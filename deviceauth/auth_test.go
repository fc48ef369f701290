package deviceauth

import (
	"errors"
	"log/slog"
	"sync"
	"testing"

	"appliance/fleet"
	"appliance/internal/storetest"
	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

func newAuth(t *testing.T) (*Authenticator, *raftstore.Store) {
	t.Helper()
	s := storetest.Open(t, nil, slog.LevelWarn)
	return New(s, testlog.New(t, slog.LevelWarn)), s
}

func apply(t *testing.T, s *raftstore.Store, cmd raftstore.Command) *raftstore.Result {
	t.Helper()
	res, err := s.Apply(testutil.Context(t), cmd)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func device(t *testing.T, s *raftstore.Store, id string) (fleet.Device, bool) {
	t.Helper()
	var d fleet.Device
	var err error
	_ = s.View(func(r *raftstore.Reader) error { d, err = r.Device(id); return nil })
	return d, err == nil
}

// enrollment creates an enrollment group with tags and returns its token.
func enrollment(t *testing.T, s *raftstore.Store, name string, tags map[string]any) string {
	t.Helper()
	token, dk, err := fleet.NewEnrollmentToken(name)
	if err != nil {
		t.Fatal(err)
	}
	apply(t, s, raftstore.PutEnrollment{Enrollment: fleet.Enrollment{Name: name, Tags: tags, DerivationKey: dk}})
	return token
}

func derived(t *testing.T, token, id string) string {
	t.Helper()
	k, err := fleet.DeriveDeviceKey(token, id)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestAuthenticateDevice_Keys: a registered device opens with either of
// its keys; a wrong key, a disabled device and an unknown one get the
// same refusal.
func TestAuthenticateDevice_Keys(t *testing.T) {
	a, s := newAuth(t)
	ctx := testutil.Context(t)
	p, sec := testutil.NewKey(t), testutil.NewKey(t)
	apply(t, s, raftstore.PutDevice{Device: fleet.Device{ID: "press-01", Authentication: fleet.Authentication{Type: "sas",
		KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(p), Secondary: fleet.HashKey(sec)}}}})
	apply(t, s, raftstore.PutDevice{Device: fleet.Device{ID: "press-02", Status: fleet.DeviceDisabled, Authentication: fleet.Authentication{Type: "sas",
		KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(p), Secondary: fleet.HashKey(sec)}}}})
	for _, tc := range []struct {
		device, key string
		want        error
	}{
		{"press-01", p, nil},
		{"press-01", sec, nil},
		{"press-01", testutil.NewKey(t), ErrRefused},
		{"press-02", p, ErrRefused},
		{"press-99", p, ErrRefused},
	} {
		if err := a.AuthenticateDevice(ctx, tc.device, tc.key); !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
			t.Errorf("%s: %v, want %v", tc.device, err, tc.want)
		}
	}
}

// TestAuthenticateDevice_Enrollment: an unknown device with an
// enrollment's derived key and a key of its own is registered with the
// group's tags and its own key; from then on its own key opens it, the
// derived key alone opens nothing, and a sibling that can compute the
// derived key but brings another own key is refused; a device without a
// valid derived key, or with an own key that is not 32 random bytes, is
// not registered.
func TestAuthenticateDevice_Enrollment(t *testing.T) {
	a, s := newAuth(t)
	ctx := testutil.Context(t)
	token := enrollment(t, s, "line-3", map[string]any{"line": 3.0})
	own := testutil.NewKey(t)
	dk := derived(t, token, "cam-01")
	if err := a.AuthenticateDevice(ctx, "cam-01", fleet.EnrollmentKey(dk, own)); err != nil {
		t.Fatalf("enrollment: %v", err)
	}
	d, ok := device(t, s, "cam-01")
	if !ok || d.Enrollment != "line-3" || d.Tags["line"] != 3.0 || d.Authentication.KeyHashes.Primary != fleet.HashKey(own) {
		t.Fatalf("cam-01 as registered: %+v", d)
	}
	for _, tc := range []struct {
		name, device, key string
		opens             bool
	}{
		{"its own key", "cam-01", own, true},
		{"its enrollment key again", "cam-01", fleet.EnrollmentKey(dk, own), true},
		{"the derived key alone", "cam-01", dk, false},
		{"a sibling's own key", "cam-01", fleet.EnrollmentKey(dk, testutil.NewKey(t)), false},
		{"another group's derived key", "cam-02", fleet.EnrollmentKey(derived(t, "other.secret", "cam-02"), testutil.NewKey(t)), false},
		{"an own key that is not a key", "cam-03", fleet.EnrollmentKey(derived(t, token, "cam-03"), "short"), false},
		{"a derived key alone, unknown device", "cam-04", derived(t, token, "cam-04"), false},
	} {
		err := a.AuthenticateDevice(ctx, tc.device, tc.key)
		if (err == nil) != tc.opens || (err != nil && !errors.Is(err, ErrRefused)) {
			t.Errorf("%s: %v, opens %v", tc.name, err, tc.opens)
		}
	}
	for _, id := range []string{"cam-02", "cam-03", "cam-04"} {
		if _, ok := device(t, s, id); ok {
			t.Errorf("%s was registered", id)
		}
	}
}

// TestAuthenticateDevice_AdoptsOwnKey: a device registered with the key
// its enrollment derives (before devices brought their own) moves to its
// own key the first time it presents one; the derived key then opens
// nothing.
func TestAuthenticateDevice_AdoptsOwnKey(t *testing.T) {
	a, s := newAuth(t)
	ctx := testutil.Context(t)
	token := enrollment(t, s, "line-3", nil)
	dk := derived(t, token, "cam-01")
	apply(t, s, raftstore.PutDevice{Device: fleet.Device{ID: "cam-01", Enrollment: "line-3", Authentication: fleet.Authentication{Type: "sas",
		KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(dk), Secondary: fleet.HashKey(testutil.NewKey(t))}}}})
	own := testutil.NewKey(t)
	if err := a.AuthenticateDevice(ctx, "cam-01", fleet.EnrollmentKey(dk, own)); err != nil {
		t.Fatalf("adoption: %v", err)
	}
	if d, _ := device(t, s, "cam-01"); d.Authentication.KeyHashes.Primary != fleet.HashKey(own) {
		t.Fatalf("cam-01's keys after the adoption: %+v", d.Authentication.KeyHashes)
	}
	if err := a.AuthenticateDevice(ctx, "cam-01", dk); !errors.Is(err, ErrRefused) {
		t.Fatalf("the derived key after the adoption: %v", err)
	}
}

// sessions records which sessions RecheckSessions would end: each device
// has one session, opened with the key named.
type sessions struct {
	mu     sync.Mutex
	keyIDs map[string]string
	ended  []string
}

func (s *sessions) DisconnectStale(id string, stillValid func(keyID string) bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, ok := s.keyIDs[id]; ok && !stillValid(k) {
		s.ended = append(s.ended, id)
		delete(s.keyIDs, id)
		return 1
	}
	return 0
}

// TestRecheckSessions: after a device's key is replaced or the device is
// disabled, the session opened with the old key ends; one whose key
// still opens its device goes on.
func TestRecheckSessions(t *testing.T) {
	a, s := newAuth(t)
	keys := map[string]string{"d1": testutil.NewKey(t), "d2": testutil.NewKey(t), "d3": testutil.NewKey(t)}
	sess := &sessions{keyIDs: map[string]string{}}
	for id, k := range keys {
		apply(t, s, raftstore.PutDevice{Device: fleet.Device{ID: id, Authentication: fleet.Authentication{Type: "sas",
			KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(k), Secondary: fleet.HashKey(testutil.NewKey(t))}}}})
		sess.keyIDs[id] = a.KeyID(id, k)
	}
	d1, _ := device(t, s, "d1")
	apply(t, s, raftstore.PatchDevice{ID: "d1", KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(testutil.NewKey(t)), Secondary: d1.Authentication.KeyHashes.Secondary}})
	apply(t, s, raftstore.PatchDevice{ID: "d2", Status: fleet.DeviceDisabled})
	a.RecheckSessions(sess, []string{"d1", "d2", "d3"})
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if len(sess.ended) != 2 || sess.keyIDs["d3"] == "" {
		t.Fatalf("sessions ended %v, left %v", sess.ended, sess.keyIDs)
	}
}
