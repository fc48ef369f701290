package node

import (
	"context"
	"io"
	"net/http"
	"sync"
	"time"

	"encoding/json"

	"appliance/directmethod"
	"appliance/eventtail"
	"appliance/raftstore"
)

// Devices connect to any node's broker; an operator reading a device on
// another node should still see it connected. Each node answers, on the
// cluster port, which devices hold a session with it; a node serving a
// device read asks its peers, at most once per peerConnectionsTTL.
const (
	peerConnectionsTTL     = time.Second
	peerConnectionsTimeout = time.Second
	// A peer that did not answer the last time (down, or cut off) is given
	// only peerDownTimeout, so that during a partition every device read
	// does not wait a full peerConnectionsTimeout for it.
	peerDownTimeout = 200 * time.Millisecond
	connectionsPath = "/cluster/v1/connections"
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
	// Ended are the devices whose session with it ended within its
	// --offline-after, with when each last sent anything: for the other
	// nodes' offline judgement (nodes before this field send none).
	Ended map[string]time.Time `json:"ended,omitempty"`
}

// peerConnections caches the sessions held by the other nodes.
type peerConnections struct {
	mu        sync.Mutex
	fetchedAt time.Time
	sessions  map[string]peerSession
	ended     map[string]time.Time // sessions that ended on a peer lately
	// refreshing is closed when the refresh in flight ends: readers that
	// find the cache stale share it instead of each asking every peer.
	refreshing chan struct{}
	down       map[string]bool // peers that did not answer the last refresh
}

// serveConnections lists the devices connected to this node.
func (n *Node) serveConnections(w http.ResponseWriter, r *http.Request) {
	reply := connectionsReply{Node: n.cfg.NodeID, Sessions: map[string]peerSession{}}
	for _, c := range n.broker.Connections() {
		reply.Sessions[c.DeviceID] = peerSession{Node: n.cfg.NodeID, LastActivity: c.LastActivity.UTC()}
	}
	reply.Ended = n.broker.Ended(time.Now().Add(-n.cfg.OfflineAfter))
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(reply)
}

// peerSessions returns the other nodes' sessions, refreshing them when
// older than the TTL. Unreachable peers contribute nothing: their devices
// show as disconnected, which is what an operator should suspect anyway.
func (n *Node) peerSessions(ctx context.Context) map[string]peerSession {
	pc := &n.peerConns
	pc.mu.Lock()
	if time.Since(pc.fetchedAt) < peerConnectionsTTL && pc.sessions != nil {
		defer pc.mu.Unlock()
		return pc.sessions
	}
	done := pc.refreshing
	if done == nil {
		done = make(chan struct{})
		pc.refreshing = done
		go n.refreshPeerSessions(done)
	}
	pc.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.sessions
}

// refreshPeerSessions asks every peer for its sessions, then closes done.
// It runs on its own, not on a reader's context: a reader that gives up
// does not cancel the others' refresh.
func (n *Node) refreshPeerSessions(done chan struct{}) {
	pc := &n.peerConns
	defer func() {
		pc.mu.Lock()
		pc.refreshing = nil
		pc.mu.Unlock()
		close(done)
	}()
	ctx, cancel := context.WithTimeout(n.stopCtx, peerConnectionsTimeout)
	defer cancel()
	members, err := n.store.Members(ctx)
	if err != nil {
		return
	}
	pc.mu.Lock()
	wasDown := pc.down
	pc.mu.Unlock()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		all   = map[string]peerSession{}
		ended = map[string]time.Time{}
		down  = map[string]bool{}
	)
	for _, m := range members {
		if m.ID == n.cfg.NodeID {
			continue
		}
		wg.Add(1)
		go func(m raftstore.Member) {
			defer wg.Done()
			ctx := ctx
			if wasDown[m.ID] {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, peerDownTimeout)
				defer cancel()
			}
			var reply connectionsReply
			err := n.peers.GetJSON(ctx, m.Address, connectionsPath, &reply)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				down[m.ID] = true
				n.logger.Debug("cannot list a peer's device sessions", "peer", m.ID, "err", err)
				return
			}
			for id, s := range reply.Sessions {
				if cur, ok := all[id]; !ok || s.LastActivity.After(cur.LastActivity) {
					all[id] = s
				}
			}
			for id, t := range reply.Ended {
				if t.After(ended[id]) {
					ended[id] = t
				}
			}
		}(m)
	}
	wg.Wait()
	pc.mu.Lock()
	pc.sessions, pc.ended, pc.fetchedAt, pc.down = all, ended, time.Now(), down
	pc.mu.Unlock()
}

// peerCluster is the other members as the packages that call them see
// them (directmethod, eventtail): the members' addresses, the cluster
// port's calls, and which peer holds a device's session.
type peerCluster Node

var (
	_ directmethod.Cluster = (*peerCluster)(nil)
	_ eventtail.Peers      = (*peerCluster)(nil)
)

func (c *peerCluster) SessionNode(ctx context.Context, deviceID string) (string, bool) {
	s, ok := (*Node)(c).peerSessions(ctx)[deviceID]
	return s.Node, ok
}

func (c *peerCluster) Members(ctx context.Context) ([]raftstore.Member, error) {
	return c.store.Members(ctx)
}

func (c *peerCluster) PostJSON(ctx context.Context, addr, path string, in, out any) error {
	return c.peers.PostJSON(ctx, addr, path, in, out)
}

func (c *peerCluster) Stream(ctx context.Context, addr, path string) (io.ReadCloser, error) {
	return c.peers.Stream(ctx, addr, path)
}
