package directmethod

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"appliance/fleet"
	"appliance/history"
)

// Restarts in the device's history. A module restarted through its agent
// (RestartModule answered 200) is an event for the device's history, but
// not one of the raft log's, from which every other event is derived: the
// node that relayed the call records it (at the index it has applied, so
// it sits among the device's other events in order) and passes it to the
// other members (EventPath), so that every node's history shows it. A
// member down at that moment does not get it; nothing goes through raft.

// deviceEvent is a device's event passed to a peer.
type deviceEvent struct {
	Device string             `json:"device"`
	Event  fleet.HistoryEvent `json:"event"`
}

// recordModuleRestart records a successful RestartModule in the device's
// history here and on the other members.
func (m *Relay) recordModuleRestart(deviceID string, payload json.RawMessage) {
	var req fleet.RestartModuleRequest
	_ = json.Unmarshal(payload, &req)
	ev := fleet.HistoryEvent{Time: time.Now().UTC(), Index: m.cfg.AppliedIndex(), Actor: m.cfg.Actor,
		Kind: fleet.HistoryModuleRestarted, What: "module " + req.ID + " restarted by the operator (RestartModule)"}
	m.cfg.History.Add(history.Item{Device: deviceID, Event: ev})
	go m.shareDeviceEvent(deviceEvent{Device: deviceID, Event: ev})
}

// shareDeviceEvent hands a device's event to every other member, each
// tried once.
func (m *Relay) shareDeviceEvent(e deviceEvent) {
	ctx, cancel := context.WithTimeout(m.cfg.Stopping, 10*time.Second)
	defer cancel()
	members, err := m.cfg.Cluster.Members(ctx)
	if err != nil {
		m.cfg.Logger.Warn("a device's history event was not passed to the other nodes", "device", e.Device, "err", err)
		return
	}
	for _, mb := range members {
		if mb.ID == m.cfg.NodeID {
			continue
		}
		if err := m.cfg.Cluster.PostJSON(ctx, mb.Address, EventPath, e, &struct{}{}); err != nil {
			m.cfg.Logger.Warn("a device's history event was not passed to a node; its history lacks it", "device", e.Device, "node", mb.ID, "err", err)
		}
	}
}

// ServeEvent takes a device's event from a peer (EventPath).
func (m *Relay) ServeEvent(w http.ResponseWriter, r *http.Request) {
	var e deviceEvent
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&e); err != nil || fleet.ValidateDeviceID(e.Device) != nil || e.Event.Kind == "" {
		http.Error(w, `{"code":"bad_request","error":"malformed device event"}`, http.StatusBadRequest)
		return
	}
	m.cfg.History.Add(history.Item{Device: e.Device, Event: e.Event})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte("{}"))
}
