package raftstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Rolling upgrades. Every node advertises what it can apply (NodeInfo,
// served by the cluster package's info RPC); the store asks its peers
// before it proposes a command outside LegacyCommands and refuses one that
// some member cannot apply (checkCommand), and a state machine that still
// meets an unknown command halts rather than skip it (fsm.go).

var (
	// ErrNoNodeInfo: the peer answered that it serves no NodeInfo: it runs
	// LegacyRelease or older, and applies LegacyCommands.
	ErrNoNodeInfo = errors.New("the node does not report what it runs")
	// ErrClusterBehind: a member cannot apply the command (it runs an
	// older release, or did not say what it runs); nothing was proposed.
	ErrClusterBehind = errors.New("not every member of the cluster can apply this command yet")
)

// Cache lifetimes of what a peer said about itself. An answer is kept a
// little while, so that a burst of gated writes does not ask every peer
// each time; a restart of that peer (the leader sees its heartbeats fail)
// or a membership change forgets it at once. A failed question is kept
// shorter: the peer may be back any moment.
const (
	peerInfoTTL      = 2 * time.Second
	peerInfoErrorTTL = 500 * time.Millisecond
	// peerInfoTimeout bounds one question; a peer that did not answer the
	// last one gets peerDownTimeout.
	peerInfoTimeout = time.Second
	peerDownTimeout = 300 * time.Millisecond
)

// NodeInfo is what a node says about itself to its peers.
type NodeInfo struct {
	ID string `json:"id"`
	// Version is the build's version (the release tag or commit); Commit
	// the VCS revision it was built from, when known.
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"`
	// Commands are the command types it can apply, ascending.
	Commands []CommandType `json:"commands"`
	// DocumentSchema is the schema version of the desired and reported
	// documents its broker and agents speak (fleet.DocumentSchema).
	DocumentSchema string `json:"documentSchema,omitempty"`
	// Legacy: it serves no NodeInfo (ErrNoNodeInfo), so it runs
	// LegacyRelease or older. Set by the asker; Version is then
	// LegacyRelease and Commands LegacyCommands.
	Legacy bool `json:"legacy,omitempty"`

	// Its raft state when it answered: Leader, Follower, Candidate.
	State        string `json:"state,omitempty"`
	AppliedIndex uint64 `json:"appliedIndex,omitempty"`
	// LastContactMs is how long ago it last heard from the leader, in
	// milliseconds: 0 on the leader, -1 never.
	LastContactMs int64 `json:"lastContactMs"`
	// Peers is, on the leader, how its heartbeats to each follower fare.
	Peers map[string]PeerContact `json:"peers,omitempty"`
	// ConnectedDevices is how many devices held a session with it when
	// it answered, set by the node (nil: a release before it said so).
	ConnectedDevices *int `json:"connectedDevices,omitempty"`
}

// CanApply reports whether the node can apply commands of type t.
func (i NodeInfo) CanApply(t CommandType) bool { return slices.Contains(i.Commands, t) }

// describe is the node's version for a message: "db9fcc5 (commands 1-11)".
func (i NodeInfo) describe() string {
	v := i.Version
	if i.Legacy {
		v += " or older"
	}
	return fmt.Sprintf("%s (commands %s)", v, commandRanges(i.Commands))
}

// LegacyNodeInfo is what a peer that serves no NodeInfo runs.
func LegacyNodeInfo(id string) NodeInfo {
	return NodeInfo{ID: id, Version: LegacyRelease, Commands: LegacyCommands(), Legacy: true, LastContactMs: -1}
}

// PeerContact is the leader's view of its heartbeats to one follower.
type PeerContact struct {
	// Failing: the last heartbeat failed (the follower is down or cut off).
	Failing bool `json:"failing"`
	// SinceMs is, for a failing follower, how long ago the leader last
	// heard from it in milliseconds (-1: never since this node leads).
	SinceMs int64 `json:"sinceMs,omitempty"`
}

// Info is what this node says about itself.
func (s *Store) Info() NodeInfo {
	info := NodeInfo{
		ID: s.cfg.NodeID, Version: s.cfg.Version, Commands: Commands(),
		State: s.State(), AppliedIndex: s.AppliedIndex(), LastContactMs: -1,
	}
	if c := s.LastContact(); c >= 0 {
		info.LastContactMs = c.Milliseconds()
	}
	if s.IsLeader() {
		if servers, err := s.servers(); err == nil {
			ids := make([]string, 0, len(servers))
			for _, srv := range servers {
				if string(srv.ID) != s.cfg.NodeID {
					ids = append(ids, string(srv.ID))
				}
			}
			info.Peers = s.peers.contacts(ids)
		}
	}
	return info
}

// ClusterBehindError is checkCommand's refusal: the command's type and,
// for each member that cannot apply it, why.
type ClusterBehindError struct {
	Command CommandType
	// Behind says, per member that cannot apply Command, what it runs or
	// that it did not answer, sorted by member id.
	Behind []string
	// Version is this node's.
	Version string
}

func (e *ClusterBehindError) Error() string {
	return fmt.Sprintf("%s (command %d) needs every member of the cluster at a release that can apply it, like this node's %s; behind: %s: upgrade them (one at a time), then retry",
		e.Command, byte(e.Command), e.Version, strings.Join(e.Behind, "; "))
}

func (e *ClusterBehindError) Unwrap() error { return ErrClusterBehind }

// CheckCommand reports whether every member of the cluster can apply
// commands of type t (nil), or which cannot (an error wrapping
// ErrClusterBehind): for a feature that changes what existing commands
// mean, gated on the command type its release introduced.
func (s *Store) CheckCommand(ctx context.Context, t CommandType) error {
	return s.checkCommand(ctx, t)
}

// checkCommand is the upgrade gate, run before a command is proposed or
// forwarded: a command outside LegacyCommands goes ahead only when every
// other member of the configuration said it can apply it. A member that
// does not answer counts as unable (fail closed): it may run an older
// release; unless the state already holds a command of this type
// (committedType): the gate let that one through, so every member could
// apply the type then, and a member that is down must not stop a feature
// the cluster already uses (a leader failover mid-rollout, with the old
// leader dead). Every member replicates and applies the log, voter or not, so
// all of them are asked. The commands of LegacyCommands every release
// applies, so they are never held up by a peer that is down.
func (s *Store) checkCommand(ctx context.Context, t CommandType) error {
	if isLegacyCommand(t) {
		return nil
	}
	servers, err := s.servers()
	if err != nil {
		return fmt.Errorf("check that every member can apply %s: %w", t, err)
	}
	committed := false
	_ = s.fsm.view(func(r *Reader) error {
		committed = r.committedType(t)
		return nil
	})
	var (
		mu     sync.Mutex
		behind []string
		wg     sync.WaitGroup
	)
	for _, srv := range servers {
		id, addr := string(srv.ID), string(srv.Address)
		if id == s.cfg.NodeID {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			info, err := s.peers.info(ctx, id, addr, false)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil && committed:
				// Silent, but the cluster already committed a command of
				// this type: every member then could apply it, and none
				// can unlearn it (a downgraded node halts at the entry,
				// loudly). A member that is down must not stop the
				// commands the cluster already runs on.
			case err != nil:
				behind = append(behind, fmt.Sprintf("%s did not say what it runs (%v)", id, err))
			case !info.CanApply(t):
				behind = append(behind, fmt.Sprintf("%s runs %s", id, info.describe()))
			}
		}()
	}
	wg.Wait()
	if len(behind) == 0 {
		return nil
	}
	sort.Strings(behind)
	return &ClusterBehindError{Command: t, Behind: behind, Version: s.cfg.Version}
}

// MemberStatus is one member of the configuration as this node sees it
// now: what it answered about itself, or why it did not.
type MemberStatus struct {
	Member
	// Answered: it told this node what it runs just now (Info); this node
	// always answers itself. When it did not, Info is what it said last
	// (zero if it never did).
	Answered bool
	Info     NodeInfo
	// Err is why it did not answer.
	Err error
	// LastAnswer is when it last answered this node (zero: never).
	LastAnswer time.Time
	// Heartbeat is the leader's view of its heartbeats to this member:
	// this node's own when it leads, else from the leader's answer; nil
	// when neither is known (or for the leader itself).
	Heartbeat *PeerContact
}

// MemberStatuses asks every member of the configuration, in parallel, what
// it runs (bounded by peerInfoTimeout each), for `cluster members`.
func (s *Store) MemberStatuses(ctx context.Context) ([]MemberStatus, error) {
	members, err := s.Members(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]MemberStatus, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		out[i].Member = m
		if m.ID == s.cfg.NodeID {
			out[i].Answered, out[i].Info, out[i].LastAnswer = true, s.Info(), time.Now()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.peers.info(ctx, m.ID, m.Address, true)
			out[i].Answered, out[i].Err = err == nil, err
			out[i].Info, out[i].LastAnswer = s.peers.lastAnswer(m.ID)
		}()
	}
	wg.Wait()
	// The leader's view of its heartbeats.
	var contacts map[string]PeerContact
	for _, st := range out {
		if st.Leader && st.Answered {
			contacts = st.Info.Peers
		}
	}
	for i := range out {
		if c, ok := contacts[out[i].ID]; ok && !out[i].Leader {
			out[i].Heartbeat = &c
		}
	}
	return out, nil
}

// peerTracker caches what peers said about themselves and follows the
// leader's heartbeats to them (raft's observations).
type peerTracker struct {
	ask func(ctx context.Context, id, addr string) (NodeInfo, error)

	mu    sync.Mutex
	infos map[string]peerInfo
	beats map[string]heartbeat
}

type peerInfo struct {
	addr string
	info NodeInfo
	err  error
	at   time.Time
	// The last answer and when it came, kept across failures.
	known    NodeInfo
	answered time.Time
}

type heartbeat struct {
	failing     bool
	lastContact time.Time
}

func newPeerTracker(ask func(ctx context.Context, id, addr string) (NodeInfo, error)) *peerTracker {
	return &peerTracker{ask: ask, infos: map[string]peerInfo{}, beats: map[string]heartbeat{}}
}

// info returns what the peer id at addr runs: from the cache unless fresh
// is set or the entry is stale, else by asking it. A peer that serves no
// NodeInfo runs LegacyRelease (no error).
func (p *peerTracker) info(ctx context.Context, id, addr string, fresh bool) (NodeInfo, error) {
	p.mu.Lock()
	cached, ok := p.infos[id]
	p.mu.Unlock()
	if ok && cached.addr == addr && !fresh {
		ttl := peerInfoTTL
		if cached.err != nil {
			ttl = peerInfoErrorTTL
		}
		if time.Since(cached.at) < ttl {
			return cached.info, cached.err
		}
	}
	if p.ask == nil {
		return NodeInfo{}, errors.New("this node cannot ask its peers")
	}
	timeout := peerInfoTimeout
	if ok && cached.err != nil {
		timeout = peerDownTimeout
	}
	actx, cancel := context.WithTimeout(ctx, timeout)
	info, err := p.ask(actx, id, addr)
	cancel()
	if errors.Is(err, ErrNoNodeInfo) {
		info, err = LegacyNodeInfo(id), nil
	}
	now := time.Now()
	entry := peerInfo{addr: addr, info: info, err: err, at: now}
	if err == nil {
		entry.known, entry.answered = info, now
	} else if ok {
		entry.known, entry.answered = cached.known, cached.answered
	}
	p.mu.Lock()
	p.infos[id] = entry
	p.mu.Unlock()
	return info, err
}

// lastAnswer is what the peer last said about itself, and when.
func (p *peerTracker) lastAnswer(id string) (NodeInfo, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.infos[id]
	return e.known, e.answered
}

// contacts is the leader's heartbeat view of the followers ids: failing
// since raft reported a failed heartbeat, until it reports them resumed.
func (p *peerTracker) contacts(ids []string) map[string]PeerContact {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]PeerContact, len(ids))
	for _, id := range ids {
		b := p.beats[id]
		c := PeerContact{Failing: b.failing}
		if b.failing {
			c.SinceMs = -1
			if !b.lastContact.IsZero() {
				c.SinceMs = time.Since(b.lastContact).Milliseconds()
			}
		}
		out[id] = c
	}
	return out
}

func (p *peerTracker) observe(o raft.Observation) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch d := o.Data.(type) {
	case raft.FailedHeartbeatObservation:
		p.beats[string(d.PeerID)] = heartbeat{failing: true, lastContact: d.LastContact}
		p.expireLocked(string(d.PeerID))
	case raft.ResumedHeartbeatObservation:
		// Back after failing: perhaps restarted with another release.
		p.beats[string(d.PeerID)] = heartbeat{}
		p.expireLocked(string(d.PeerID))
	case raft.PeerObservation:
		delete(p.beats, string(d.Peer.ID))
		p.expireLocked(string(d.Peer.ID))
	case raft.LeaderObservation:
		// Another term: heartbeats are counted afresh by whoever leads.
		clear(p.beats)
	}
}

func (p *peerTracker) expireLocked(id string) {
	if e, ok := p.infos[id]; ok {
		e.at = time.Time{}
		p.infos[id] = e
	}
}

// observePeers follows raft's heartbeat, membership and leader
// observations until the store closes.
func (s *Store) observePeers() {
	ch := make(chan raft.Observation, 64)
	s.observer = raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation, raft.PeerObservation, raft.LeaderObservation:
			return true
		}
		return false
	})
	s.raft.RegisterObserver(s.observer)
	done := s.closing
	go func() {
		for {
			select {
			case o := <-ch:
				s.peers.observe(o)
			case <-done:
				return
			}
		}
	}()
}

// commandRanges writes command types compactly: "1-11, 13".
func commandRanges(ts []CommandType) string {
	var parts []string
	for i := 0; i < len(ts); {
		j := i
		for j+1 < len(ts) && ts[j+1] == ts[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, fmt.Sprintf("%d-%d", ts[i], ts[j]))
		} else {
			parts = append(parts, fmt.Sprintf("%d", ts[i]))
		}
		i = j + 1
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// keyCommandTypes is meta's bitmap of the command types outside
// LegacyCommands the state has applied (256 bits). Written only by the
// commands it records, so a state file of an older release never has it.
var keyCommandTypes = []byte("commandTypes")

// noteCommandType records that the state applied a command of type t.
func (w *writer) noteCommandType(t CommandType) {
	if isLegacyCommand(t) {
		return
	}
	var bits [32]byte
	copy(bits[:], w.tx.Bucket(bucketMeta).Get(keyCommandTypes))
	if bits[t/8]&(1<<(t%8)) != 0 {
		return
	}
	bits[t/8] |= 1 << (t % 8)
	w.put(bucketMeta, keyCommandTypes, bits[:])
}

// committedType tells whether the state applied a command of type t (one
// outside LegacyCommands; those every release applies anyway).
func (r *Reader) committedType(t CommandType) bool {
	if isLegacyCommand(t) {
		return true
	}
	v := r.tx.Bucket(bucketMeta).Get(keyCommandTypes)
	return len(v) == 32 && v[t/8]&(1<<(t%8)) != 0
}
