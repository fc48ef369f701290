package sim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/fleet"
)

// FailExitCode is the exit code a failing simulated module reports.
const FailExitCode = 1

// AgentVersion is the agent version every simulated device reports.
const AgentVersion = "sim"

// failing tells whether device index (1-based) is one of the share that
// fails: exactly floor(n·share) of devices 1..n, spread evenly (with share
// 0.2, devices 5, 10, 15, ...). The epsilon keeps 0.29·100 from rounding
// down to 28.
func failing(index int, share float64) bool {
	if share <= 0 {
		return false
	}
	at := func(i int) int { return int(math.Floor(float64(i)*share + 1e-9)) }
	return at(index) > at(index-1)
}

// desiredModule is what the fake runtime needs of a module: its name, its
// desired status, its image.
type desiredModule struct {
	name, status, image string
}

// parseModules reads the modules of a desired document's modulesContent
// ($edgeAgent["properties.desired"].modules), sorted by name. Empty
// content is the explicit empty desired state: no modules.
func parseModules(content json.RawMessage) ([]desiredModule, error) {
	content = bytes.TrimSpace(content)
	if len(content) == 0 || bytes.Equal(content, []byte("null")) {
		return nil, nil
	}
	var mc struct {
		EdgeAgent struct {
			Desired struct {
				Modules map[string]struct {
					Status   string `json:"status"`
					Settings struct {
						Image string `json:"image"`
					} `json:"settings"`
				} `json:"modules"`
			} `json:"properties.desired"`
		} `json:"$edgeAgent"`
	}
	if err := json.Unmarshal(content, &mc); err != nil {
		return nil, fleet.Invalid("modulesContent", "%v", err)
	}
	out := make([]desiredModule, 0, len(mc.EdgeAgent.Desired.Modules))
	for name, m := range mc.EdgeAgent.Desired.Modules {
		status := m.Status
		if status == "" {
			status = fleet.RuntimeRunning
		}
		out = append(out, desiredModule{name: name, status: status, image: m.Settings.Image})
	}
	slices.SortFunc(out, func(a, b desiredModule) int { return strings.Compare(a.name, b.name) })
	return out, nil
}

// moduleCache shares parsed module lists between devices: a deployment
// fans out the same content to every device it applies to.
type moduleCache struct {
	mu sync.Mutex
	m  map[string]moduleCacheEntry
}

type moduleCacheEntry struct {
	mods []desiredModule
	err  error
}

const moduleCacheSize = 64

func (c *moduleCache) get(content json.RawMessage) ([]desiredModule, error) {
	c.mu.Lock()
	e, ok := c.m[string(content)]
	c.mu.Unlock()
	if ok {
		return e.mods, e.err
	}
	mods, err := parseModules(content)
	c.mu.Lock()
	if c.m == nil || len(c.m) >= moduleCacheSize {
		c.m = map[string]moduleCacheEntry{}
	}
	c.m[string(content)] = moduleCacheEntry{mods, err}
	c.mu.Unlock()
	return mods, err
}

// buildReport is what the fake runtime reports after applying doc at now:
// every module whose desired status is running runs (or, when fail says
// the device fails its image, has exited with FailExitCode and the status
// is 500); stopped
// modules are stopped. A document whose content cannot be read is refused
// with 400, as the real agent does.
func buildReport(doc fleet.DesiredDocument, mods []desiredModule, parseErr error, fail func(image string) bool, now time.Time) fleet.ReportedDocument {
	now = now.UTC().Round(time.Millisecond)
	r := fleet.ReportedDocument{
		SchemaVersion:      fleet.DocumentSchema,
		LastDesiredVersion: doc.Version,
		LastDesiredStatus:  fleet.DesiredStatus{Code: fleet.StatusCodeOK},
		DeviceHealth:       "healthy",
		Version:            AgentVersion,
		Runtime:            fleet.ReportedRuntime{Platform: fleet.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}},
		Modules:            map[string]fleet.ModuleStatus{},
		DeploymentID:       doc.DeploymentID,
		Layers:             doc.Layers,
		// What the status is about, refused or not (the agent's fields).
		LastDesiredDeploymentID: doc.DeploymentID,
		LastDesiredLayers:       doc.Layers,
	}
	if parseErr != nil {
		r.LastDesiredStatus = fleet.DesiredStatus{Code: fleet.StatusCodeInvalid, Description: parseErr.Error()}
		return r
	}
	if len(mods) == 0 {
		// The explicit empty desired state (or a deployment without
		// modules): nothing runs.
		if len(bytes.TrimSpace(doc.ModulesContent)) == 0 {
			r.DeploymentID = ""
		}
		return r
	}
	var failed []string
	for _, m := range mods {
		st := fleet.ModuleStatus{Status: m.status, Settings: fleet.ModuleSettings{Image: m.image}}
		switch {
		case m.status != fleet.RuntimeRunning:
			st.RuntimeStatus = fleet.RuntimeStopped
		case fail != nil && fail(m.image):
			st.RuntimeStatus = fleet.RuntimeFailed
			st.ExitCode = FailExitCode
			st.StatusDescription = fmt.Sprintf("exited with code %d (simulated failure)", FailExitCode)
			st.LastStartTimeUTC, st.LastExitTimeUTC = &now, &now
			failed = append(failed, fmt.Sprintf("module %s: exited with code %d", m.name, FailExitCode))
		default:
			st.RuntimeStatus = fleet.RuntimeRunning
			st.LastStartTimeUTC = &now
		}
		r.Modules[m.name] = st
	}
	if len(failed) > 0 {
		r.DeviceHealth = "unhealthy"
		r.LastDesiredStatus = fleet.DesiredStatus{Code: fleet.StatusCodeFailed, Description: strings.Join(failed, "; ")}
	}
	return r
}
