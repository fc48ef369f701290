package assign

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/raftstore"
)

// TestBreakdown_FollowsEveryNewReport: a deployment's status judges each
// device by the report stored last, however many times it was read
// before (the memo of reports is keyed by the entry that stored them),
// and a device deleted and created again under its id starts with no
// report.
func TestBreakdown_FollowsEveryNewReport(t *testing.T) {
	rig := newRolloutRig(t)
	content, _ := moduleContent("m:1")
	rig.apply(t, raftstore.PutDeployment{Time: rig.clock(), Deployment: fleet.Deployment{ID: "d", TargetCondition: "*", Priority: 1, Content: content}})
	devs := []string{"a", "b", "c"}
	for _, id := range devs {
		rig.apply(t, raftstore.PutDevice{Time: rig.clock(), Device: fleet.Device{ID: id}})
	}
	status := func() fleet.StatusCounts {
		t.Helper()
		var counts fleet.StatusCounts
		err := rig.store.View(func(r *raftstore.Reader) error {
			dep, err := r.Deployment("d")
			if err != nil {
				return err
			}
			counts = rig.a.Breakdown(r, dep, StatusOptions{Soak: time.Minute, Now: rig.clock()}).Counts
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return counts
	}
	put := func(healthy map[string]bool) {
		t.Helper()
		var reps []raftstore.Report
		for id, h := range healthy {
			reps = append(reps, raftstore.Report{DeviceID: id, Document: report("d", h, rig.clock().Add(-time.Hour)), Time: rig.clock()})
		}
		rig.apply(t, raftstore.PutReports{Reports: reps})
	}
	want := func(step string, healthy, unhealthy, unknown int) {
		t.Helper()
		for range 2 { // the second read is served by the memo
			if c := status(); c.Healthy != healthy || c.Unhealthy != unhealthy || c.Unknown != unknown {
				t.Fatalf("%s: healthy %d, unhealthy %d, unknown %d; want %d, %d, %d", step, c.Healthy, c.Unhealthy, c.Unknown, healthy, unhealthy, unknown)
			}
		}
	}
	want("no reports", 0, 0, 3)
	put(map[string]bool{"a": true, "b": true, "c": true})
	want("all healthy", 3, 0, 0)
	put(map[string]bool{"b": false})
	want("b failed", 2, 1, 0)
	put(map[string]bool{"b": true, "c": false})
	want("b healthy again, c failed", 2, 1, 0)
	rig.apply(t, raftstore.PutReports{Reports: []raftstore.Report{{DeviceID: "a", Document: json.RawMessage(`{"lastDesiredVersion":"not a number"}`), Time: rig.clock()}}})
	want("a's report does not decode", 1, 1, 1)
	rig.apply(t, raftstore.DeleteDevice{ID: "c"})
	rig.apply(t, raftstore.PutDevice{Time: rig.clock(), Device: fleet.Device{ID: "c"}})
	want("c created again", 1, 0, 2)
	if n := len(rig.a.reports.byDevice); n > 3 {
		t.Fatalf("the memo holds %d devices, more than exist", n)
	}
}

// TestCapDescription: an agent's refusal text is kept whole up to
// maxDescription bytes, and cut at a character's start beyond, marked.
func TestCapDescription(t *testing.T) {
	long := strings.Repeat("é", maxDescription) // two bytes each
	for _, tc := range []struct{ in, want string }{
		{"pull failed", "pull failed"},
		{strings.Repeat("x", maxDescription), strings.Repeat("x", maxDescription)},
		{strings.Repeat("x", maxDescription+1), strings.Repeat("x", maxDescription) + "…"},
		{"x" + long, "x" + strings.Repeat("é", (maxDescription-1)/2) + "…"},
	} {
		if got := capDescription(tc.in); got != tc.want {
			t.Errorf("capDescription(%.20q… %d bytes) = %d bytes %.20q…, want %d bytes", tc.in, len(tc.in), len(got), got, len(tc.want))
		}
	}
	rep := &fleet.ReportedDocument{LastDesiredDeploymentID: "d", LastDesiredStatus: fleet.DesiredStatus{Code: 500, Description: strings.Repeat("y", 5000)}}
	if _, why := ClassifyDevice(rep, Subject{Base: "d", AnyLayers: true}, time.Now(), time.Minute); !strings.HasSuffix(why, "…") || len(why) > maxDescription+20 {
		t.Fatalf("a 5,000-byte refusal gives the reason %.40q… (%d bytes)", why, len(why))
	}
}
