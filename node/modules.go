package node

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"appliance/api"
	"appliance/assign"
	"appliance/fleet"
	"appliance/raftstore"
)

// Module reads one module of a device: its desired properties from the
// deployment applied to the device (redacted as every read of a
// deployment is), and its status, hub connection and reported properties
// from the device's last report.
func (b *backend) Module(ctx context.Context, deviceID, moduleID string, consistent bool) (api.ModuleView, error) {
	v := api.ModuleView{DeviceID: deviceID, ModuleID: moduleID, ConnectionState: api.Disconnected,
		Properties: api.ModuleProperties{Desired: json.RawMessage(`{}`), Reported: json.RawMessage(`{}`)}}
	err := b.view(ctx, consistent, func(r *raftstore.Reader) error {
		if _, err := r.Device(deviceID); err != nil {
			return err
		}
		var applied string
		b.assign.Read(func(v assign.View) { applied = v.Applied(deviceID) })
		known := false
		if applied != "" {
			v.Deployment = applied
			if dep, err := r.Deployment(applied); err == nil {
				desired, inDeployment := moduleDesired(dep.Content, moduleID)
				known = inDeployment
				if desired != nil {
					v.Properties.Desired = desired
				}
			}
		}
		stored, err := r.Report(deviceID)
		if err != nil {
			if !known {
				return fmt.Errorf("module %s of device %s: %w", moduleID, deviceID, fleet.ErrNotFound)
			}
			return nil
		}
		var rep fleet.ReportedDocument
		if json.Unmarshal(stored.Document, &rep) != nil {
			return nil
		}
		at := stored.ReceivedTimeUTC
		v.ReportedTimeUTC = &at
		if ms, ok := rep.Modules[moduleID]; ok {
			v.Runtime, known = &ms, true
		} else if ms, ok := rep.SystemModules[strings.TrimPrefix(moduleID, "$")]; ok {
			v.Runtime, known = &ms, true
		}
		if twin, ok := rep.ModuleTwins[moduleID]; ok {
			v.Properties.Reported, known = twin, true
		}
		if rep.Hub != nil {
			if c, ok := rep.Hub.Clients[moduleID]; ok {
				if c.Status == "connected" {
					v.ConnectionState = api.Connected
				}
				v.LastConnectedTimeUTC, v.LastDisconnectedTimeUTC = c.LastConnectedTimeUTC, c.LastDisconnectedTimeUTC
			}
		}
		if !known {
			return fmt.Errorf("module %s of device %s: %w (not in the deployment applied to the device, nor in its last report)", moduleID, deviceID, fleet.ErrNotFound)
		}
		return nil
	})
	return v, err
}

// moduleDesired returns a module's desired properties from a deployment's
// content, redacted, and whether the deployment runs the module: its
// "{module}": {"properties.desired": ...} entry (nil when it has none).
func moduleDesired(content json.RawMessage, module string) (json.RawMessage, bool) {
	var c struct {
		ModulesContent map[string]json.RawMessage `json:"modulesContent"`
	}
	if json.Unmarshal(fleet.RedactContent(content), &c) != nil {
		return nil, false
	}
	var agent struct {
		Desired struct {
			Modules       map[string]json.RawMessage `json:"modules"`
			SystemModules map[string]json.RawMessage `json:"systemModules"`
		} `json:"properties.desired"`
	}
	_ = json.Unmarshal(c.ModulesContent["$edgeAgent"], &agent)
	_, runs := agent.Desired.Modules[module]
	if _, sys := agent.Desired.SystemModules[strings.TrimPrefix(module, "$")]; sys {
		runs = true
	}
	var twin struct {
		Desired json.RawMessage `json:"properties.desired"`
	}
	if raw, ok := c.ModulesContent[module]; ok && json.Unmarshal(raw, &twin) == nil && len(twin.Desired) > 0 {
		return twin.Desired, true
	}
	return nil, runs
}
