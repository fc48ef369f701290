package agent

import (
	"errors"
	"testing"
)

// FuzzDesiredDocument feeds arbitrary payloads, as a controller (or
// anything on the wire) could send them, through the agent's decoder and
// planner: they must never panic, and every refusal must be a
// *desiredError, which becomes a 400-class report rather than a crash. The
// seed corpus is committed in testdata/fuzz/FuzzDesiredDocument: the
// documents of real Azure manifests, and the refusals.
func FuzzDesiredDocument(f *testing.F) {
	f.Fuzz(func(t *testing.T, payload []byte) {
		doc, err := parseDesired(payload)
		if err != nil {
			var de *desiredError
			if !errors.As(err, &de) {
				t.Fatalf("parseDesired refused with %T, not a desiredError: %v", err, err)
			}
			return
		}
		if _, err := buildPlan(doc); err != nil {
			var de *desiredError
			if !errors.As(err, &de) {
				t.Fatalf("buildPlan refused with %T, not a desiredError: %v", err, err)
			}
		}
	})
}
