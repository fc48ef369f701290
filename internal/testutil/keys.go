package testutil

import (
	"testing"

	"appliance/fleet"
)

// NewKey is a new device key (fleet.NewKey), failing t when the system's
// randomness fails.
func NewKey(t testing.TB) string {
	t.Helper()
	k, err := fleet.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
