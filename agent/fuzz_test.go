package agent

import (
	"errors"
	"testing"
)

// FuzzDesiredDocument feeds arbitrary payloads, as a controller (or
// anything on the wire) could send them, through the agent's decoder and
// planner: they must never panic, and every refusal must be a
// *desiredError, which becomes a 400-class report rather than a crash.
func FuzzDesiredDocument(f *testing.F) {
	seeds := []string{
		`{"version":1,"deploymentId":"","modulesContent":{}}`,
		`{"version":2,"deploymentId":"d","modulesContent":{"$edgeAgent":{"properties.desired":{"schemaVersion":"1.1","runtime":{"type":"docker","settings":{}},"systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"a"}},"edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"h"}}},"modules":{"m":{"type":"process","status":"running","restartPolicy":"on-failure","env":{"A":{"value":1}},"settings":{"command":["/bin/true"]}}}}},"$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{}}}}}`,
		`{"version":3,"deploymentId":"d","modulesContent":{"$edgeAgent":{"properties.desired":{"modules":{"m":{"restartPolicy":"sometimes"}}}}}}`,
		`{"version":"x"}`,
		`{"version":1}{"version":2}`,
		`[]`,
		``,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
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
