package node

import (
	"context"
	"net/http"
	"sync"
	"time"

	"encoding/json"

	"appliance/raftstore"
)

// Devices connect to any node's broker; an operator reading a device on
// another node should still see it connected. Each node answers, on the
// cluster port, which devices hold a session with it; a node serving a
// device read asks its peers, at most once per peerConnectionsTTL.
const (
	peerConnectionsTTL     = time.Second
	peerConnectionsTimeout = time.Second
	connectionsPath        = "/cluster/v1/connections"
)

// peerSession is a device's session on another node.
type peerSession struct {
	Node         string    `json:"node"`
	LastActivity time.Time `json:"lastActivity"`
}

// connectionsReply is what a node says about its own sessions.
type connectionsReply struct {
	Node     string                 `json:"node"`
	Sessions map[string]peerSession `json:"sessions"`
}

// peerConnections caches the sessions held by the other nodes.
type peerConnections struct {
	mu        sync.Mutex
	fetchedAt time.Time
	sessions  map[string]peerSession
}

// serveConnections lists the devices connected to this node.
func (n *Node) serveConnections(w http.ResponseWriter, r *http.Request) {
	reply := connectionsReply{Node: n.cfg.NodeID, Sessions: map[string]peerSession{}}
	for _, c := range n.broker.Connections() {
		reply.Sessions[c.DeviceID] = peerSession{Node: n.cfg.NodeID, LastActivity: c.LastActivity.UTC()}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(reply)
}

// peerSessions returns the other nodes' sessions, refreshing them when
// older than the TTL. Unreachable peers contribute nothing: their devices
// show as disconnected, which is what an operator should suspect anyway.
func (n *Node) peerSessions(ctx context.Context) map[string]peerSession {
	pc := &n.peerConns
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if time.Since(pc.fetchedAt) < peerConnectionsTTL && pc.sessions != nil {
		return pc.sessions
	}
	members, err := n.store.Members(ctx)
	if err != nil {
		return pc.sessions
	}
	ctx, cancel := context.WithTimeout(ctx, peerConnectionsTimeout)
	defer cancel()
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		all = map[string]peerSession{}
	)
	for _, m := range members {
		if m.ID == n.cfg.NodeID {
			continue
		}
		wg.Add(1)
		go func(m raftstore.Member) {
			defer wg.Done()
			var reply connectionsReply
			if err := n.peers.GetJSON(ctx, m.Address, connectionsPath, &reply); err != nil {
				n.logger.Debug("cannot list a peer's device sessions", "peer", m.ID, "err", err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for id, s := range reply.Sessions {
				if cur, ok := all[id]; !ok || s.LastActivity.After(cur.LastActivity) {
					all[id] = s
				}
			}
		}(m)
	}
	wg.Wait()
	pc.sessions, pc.fetchedAt = all, time.Now()
	return all
}
