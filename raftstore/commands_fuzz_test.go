package raftstore

import (
	"reflect"
	"testing"
	"time"

	"appliance/fleet"
)

// FuzzDecode: forwarded log entries come from peers over the network and
// are decoded before they are proposed (ApplyEncoded); Decode never
// panics, and what it accepts encodes to an entry that is a fixed point:
// decoding and encoding it again gives the same bytes and the same command
// (an entry from Encode is one already; a hand-made one may first lose
// what JSON omits, such as empty tags). The seeds are one entry of every
// command type, and the corpus in testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, c := range []Command{
		PutDevice{Time: at, Device: fleet.Device{ID: "d1", Tags: map[string]any{"site": "a"}}},
		PatchDevice{ID: "d1", Tags: map[string]any{"site": nil}, Status: "disabled", Time: at},
		DeleteDevice{ID: "d1"},
		PutDeployment{Time: at, Deployment: fleet.Deployment{ID: "dep", TargetCondition: "*", Priority: 3}},
		DeleteDeployment{ID: "dep"},
		PutEnrollment{Enrollment: fleet.Enrollment{Name: "line"}, Time: at},
		DeleteEnrollment{Name: "line"},
		SetAdminToken{Token: "0123456789abcdef0123456789abcdef"},
		SetJoinToken{Token: "APL1aaaaaaaaaaaaaaaa::0123456789abcdef0123456789abcdef"},
		RotateEnrollment{Name: "line", DerivationKey: "k2", RevokeDevices: true, Time: at,
			EnrollmentDevices: EnrollmentDevices{Devices: []string{"d1"}, AsOf: 7}},
		RevokeEnrollmentDevices{Name: "line", DeleteEnrollment: true, Time: at},
		RevokeNode{NodeID: "n3", Fingerprint: "ab12", Serial: "7f", Time: at},
		BindNode{NodeID: "n2", Fingerprint: "cd34", Serial: "01", Time: at, IfUnbound: true},
	} {
		b, err := Encode(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{byte(CmdSetAdminToken)})
	f.Add([]byte{0xff, '{', '}'})
	f.Fuzz(func(t *testing.T, entry []byte) {
		c, err := Decode(entry)
		if err != nil {
			return
		}
		once, c1 := reencode(t, c)
		twice, c2 := reencode(t, c1)
		if string(once) != string(twice) || !reflect.DeepEqual(c1, c2) {
			t.Fatalf("encoding is not stable:\n%s\n%s", once, twice)
		}
	})
}

// reencode encodes c and decodes the entry again; both must succeed.
func reencode(t *testing.T, c Command) ([]byte, Command) {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatalf("Encode of %T: %v", c, err)
	}
	back, err := Decode(b)
	if err != nil {
		t.Fatalf("re-encoded %T does not decode: %v", c, err)
	}
	return b, back
}
