package raftstore

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestClaimStateFile is the decision table of statefile.go: whether the
// state file is trusted, set aside, and committed with or without fsync,
// from the open marker a previous run left and the boot id now.
func TestClaimStateFile(t *testing.T) {
	noBootID := func() (string, error) { return "", errors.New("no /proc here") }
	inBoot := func(id string) func() (string, error) { return func() (string, error) { return id, nil } }
	for _, tc := range []struct {
		name       string
		marker     string // the marker a previous run left; "" for none
		bootID     func() (string, error)
		wantNoSync bool
		wantAside  bool   // state.db moved to state.db.unclean
		wantMarker string // the marker after the claim; "" for none
	}{
		{name: "closed cleanly", bootID: inBoot("b1"), wantNoSync: true, wantMarker: "b1\n"},
		{name: "process stopped in this boot", marker: "b1\n", bootID: inBoot("b1"), wantNoSync: true, wantMarker: "b1\n"},
		{name: "machine restarted", marker: "b0\n", bootID: inBoot("b1"), wantNoSync: true, wantAside: true, wantMarker: "b1\n"},
		{name: "empty marker", marker: "\n", bootID: inBoot("b1"), wantNoSync: true, wantAside: true, wantMarker: "b1\n"},
		{name: "no boot id, closed cleanly: fsync every commit", bootID: noBootID},
		{name: "no boot id, left open: cannot tell, set aside", marker: "b0\n", bootID: noBootID, wantAside: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.db")
			if err := os.WriteFile(path, []byte("state"), 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.marker != "" {
				if err := os.WriteFile(path+openMarkerSuffix, []byte(tc.marker), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			noSync, machineDown, err := claimStateFile(path, tc.bootID, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			if noSync != tc.wantNoSync {
				t.Errorf("noSync = %v, want %v", noSync, tc.wantNoSync)
			}
			if machineDown != tc.wantAside {
				t.Errorf("machineDown = %v, want %v (the file is set aside exactly when the machine went down)", machineDown, tc.wantAside)
			}
			_, err = os.Stat(path + uncleanSuffix)
			if aside := err == nil; aside != tc.wantAside {
				t.Errorf("set aside = %v, want %v", aside, tc.wantAside)
			}
			_, err = os.Stat(path)
			if kept := err == nil; kept == tc.wantAside {
				t.Errorf("state file still in place = %v, want %v", kept, !tc.wantAside)
			}
			marker, err := os.ReadFile(path + openMarkerSuffix)
			if errors.Is(err, os.ErrNotExist) {
				marker = nil
			} else if err != nil {
				t.Fatal(err)
			}
			if string(marker) != tc.wantMarker {
				t.Errorf("open marker = %q, want %q", marker, tc.wantMarker)
			}
			if err := releaseStateFile(path); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(path + openMarkerSuffix); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("after release the marker is still there (%v)", err)
			}
		})
	}
}
