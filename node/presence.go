package node

import (
	"context"
	"time"

	"appliance/api"
	"appliance/fleet"
)

// DefaultOfflineAfter is how long a device may be out of contact before it
// counts as offline (serve --offline-after).
const DefaultOfflineAfter = fleet.DefaultOfflineAfter

// Presence: whether a device is in contact with the cluster. A device is
// online while it holds a session with any node; once it has none, it is
// disconnected, and offline when nothing has been heard from it (a
// session's last bytes on any node, its last report) for longer than
// --offline-after. Offline is shown beside a device's health, never
// instead of it: a device whose last report was healthy is not silently
// counted healthy once it is gone, nor turned unhealthy.

// presenceView answers, for one read, where each device stands: the
// sessions of this node and its peers (asked at most once a second) and
// when recently ended sessions last heard from their devices.
type presenceView struct {
	n     *Node
	peers map[string]peerSession
	ended map[string]time.Time
}

// presence gathers what a read needs; it asks the peers (network: call it
// before any lock or transaction).
func (n *Node) presence(ctx context.Context) presenceView {
	peers := n.peerSessions(ctx)
	n.peerConns.mu.Lock()
	ended := n.peerConns.ended
	n.peerConns.mu.Unlock()
	return presenceView{n: n, peers: peers, ended: ended}
}

// contact tells whether a device is connected to some node, and when it
// was last heard from by a session (zero: not since the nodes started).
func (p presenceView) contact(deviceID string) (connected bool, last time.Time) {
	if p.n.broker != nil {
		if c, ok := p.n.broker.Connection(deviceID); ok {
			return true, c.LastActivity.UTC()
		}
		if t, ok := p.n.broker.LastSeen(deviceID); ok {
			last = t.UTC()
		}
	}
	if s, ok := p.peers[deviceID]; ok {
		return true, s.LastActivity
	}
	if t := p.ended[deviceID]; t.After(last) {
		last = t
	}
	return false, last
}

// of is a device's presence (api.PresenceOnline, Disconnected, Offline)
// and its last contact, counting its last report's arrival (zero: none).
func (p presenceView) of(deviceID string, reported time.Time, now time.Time) (string, *time.Time) {
	connected, last := p.contact(deviceID)
	if reported.After(last) {
		last = reported
	}
	var at *time.Time
	if !last.IsZero() {
		l := last.UTC()
		at = &l
	}
	switch {
	case connected:
		return api.PresenceOnline, at
	case last.IsZero() || now.Sub(last) > p.n.cfg.OfflineAfter:
		return api.PresenceOffline, at
	}
	return api.PresenceDisconnected, at
}
