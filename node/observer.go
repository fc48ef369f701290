package node

import (
	"errors"

	"appliance/broker"
	"appliance/raftstore"
)

// observer hands the store's applied changes to the parts of the node that
// follow them: the assignments (package assign), the history, the tokens
// and the broker's sessions. It runs on raft's apply goroutine, so every
// node updates its assignments in log order and agrees with its peers at
// each applied index. Desired documents are pushed to connected devices
// after the assignments' lock is released.
type observer Node

var _ raftstore.Observer = (*observer)(nil)

func (o *observer) Applied(changes []raftstore.Change) {
	n := (*Node)(o)
	moved, events := n.assign.Apply(changes)
	var drop, recheck []string
	var adminToken, joinToken string // rotations
	certsChanged := false
	for _, c := range changes {
		switch c.Kind {
		case raftstore.DevicePut:
			if c.CredentialsChanged {
				recheck = append(recheck, c.ID)
			}
		case raftstore.DeviceDeleted:
			drop = append(drop, c.ID)
		case raftstore.AdminTokenSet:
			adminToken = c.Secret
		case raftstore.JoinTokenSet:
			joinToken = c.Secret
		case raftstore.NodeCertsChanged:
			certsChanged = true
		}
	}
	if adminToken != "" {
		n.adoptAdminToken(adminToken)
	}
	if joinToken != "" {
		n.adoptJoinToken(joinToken)
	}
	if certsChanged && n.mux != nil {
		// A node's certificate was revoked (or bound): connections that
		// presented one the cluster no longer accepts close now, judged by
		// the members as they are now (a removal precedes its revocation).
		n.memberIDs.forget()
		n.vouches.forget()
		n.mux.Recheck()
	}
	if n.broker != nil {
		for _, id := range drop {
			n.broker.Disconnect(id)
		}
		n.auth.RecheckSessions(n.broker, recheck)
	}
	n.assign.Push(moved)
	n.history.Add(events...)
	n.consumersChanged(changes)
}

// Restored rebuilds the derived state from the whole state: at open, and
// after a snapshot install. Any read that fails leaves the assignments
// incomplete, so the error is returned (the store then refuses to open,
// or stops), assign refuses to build documents from then on (decided
// before its lock is released), and the node is marked stopped: no device
// is sent a document computed from part of the state.
func (o *observer) Restored(r *raftstore.Reader) error {
	n := (*Node)(o)
	// Rotations this node learns from a snapshot or its own state.
	if t := r.AdminToken(); t != "" {
		n.adoptAdminToken(t)
	}
	if t := r.JoinToken(); t != "" {
		n.adoptJoinToken(t)
	}
	if n.mux != nil {
		// Revocations the snapshot holds. Not here: the check reads the
		// state, which this call holds open.
		go n.mux.Recheck()
	}
	if err := n.assign.Restore(r); err != nil {
		// assign sends nothing from here on (decided under its lock); the
		// node stops serving devices and reads.
		n.markStopped(err)
		n.refuseDevices()
		return err
	}
	return nil
}

// Halted: the state machine stopped (damaged state, a snapshot that could
// not be installed, or a command this build cannot apply). The store has
// logged why and closes itself; the node stops serving devices and reads
// at once.
func (o *observer) Halted(err error) {
	n := (*Node)(o)
	n.markStopped(err)
	n.refuseDevices()
}

// publisher is the broker as package assign sees it: documents for the
// devices connected to this node.
type publisher Node

func (p *publisher) PublishDesired(deviceID string, doc []byte) error {
	n := (*Node)(p)
	if n.broker == nil {
		return nil
	}
	if err := n.broker.PublishDesired(deviceID, doc); err != nil && !errors.Is(err, broker.ErrNotConnected) {
		return err
	}
	return nil
}

func (p *publisher) Connected() []string {
	n := (*Node)(p)
	if n.broker == nil {
		return nil
	}
	conns := n.broker.Connected()
	ids := make([]string, len(conns))
	for i, c := range conns {
		ids[i] = c.DeviceID
	}
	return ids
}
