package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"appliance/api"
	"appliance/backup"
	"appliance/fleet"
	"appliance/pki"
	"appliance/raftstore"
)

// Cluster lists the raft members as this node sees them, each with what
// it runs and whether it is reachable: every member is asked (in
// parallel, about a second at most for one that is down).
func (b *backend) Cluster(ctx context.Context) (api.ClusterView, error) {
	statuses, err := b.store.MemberStatuses(ctx)
	if err != nil {
		return api.ClusterView{}, b.unavailable(err)
	}
	_, leader := b.store.Leader()
	v := api.ClusterView{
		Self: b.cfg.NodeID, State: b.store.State(), Leader: leader,
		AppliedIndex: b.store.AppliedIndex(), CommitIndex: b.store.CommitIndex(),
	}
	if t, err := strconv.ParseUint(b.store.Stats()["term"], 10, 64); err == nil {
		v.Term = t
	}
	self := b.node().info()
	for _, st := range statuses {
		v.Members = append(v.Members, clusterMember(st, leader, self))
	}
	return v, nil
}

// clusterMember is one member's row: up when it answered and the
// leader's heartbeats to it do not fail, down otherwise.
func clusterMember(st raftstore.MemberStatus, leader string, self raftstore.NodeInfo) api.ClusterMember {
	m := api.ClusterMember{ID: st.ID, Address: st.Address, Voter: st.Voter, Leader: st.ID == leader, Status: api.MemberUp}
	info := st.Info
	if st.ID == self.ID {
		info = self
	}
	seconds := func(ms int64) *float64 { s := float64(ms) / 1000; return &s }
	switch {
	case !st.Answered:
		m.Status = api.MemberDown
		m.Error = fmt.Sprintf("did not answer %s: %v", self.ID, st.Err)
		if st.Heartbeat != nil && st.Heartbeat.Failing && st.Heartbeat.SinceMs >= 0 {
			m.LastContactSeconds = seconds(st.Heartbeat.SinceMs)
		} else if !st.LastAnswer.IsZero() {
			m.LastContactSeconds = seconds(time.Since(st.LastAnswer).Milliseconds())
		}
		// What it ran when it last answered.
		m.Version, m.Commit, m.Legacy = info.Version, info.Commit, info.Legacy
		return m
	case st.Heartbeat != nil && st.Heartbeat.Failing:
		m.Status = api.MemberDown
		m.Error = "the leader's heartbeats to it fail (cut off from the leader)"
		if st.Heartbeat.SinceMs >= 0 {
			m.LastContactSeconds = seconds(st.Heartbeat.SinceMs)
		}
	case info.State != "Leader" && info.LastContactMs >= 0:
		m.LastContactSeconds = seconds(info.LastContactMs)
	}
	m.State, m.Version, m.Commit, m.Legacy, m.DocumentSchema = info.State, info.Version, info.Commit, info.Legacy, info.DocumentSchema
	m.ConnectedDevices = info.ConnectedDevices
	for _, c := range info.Commands {
		m.Commands = append(m.Commands, int(c))
	}
	return m
}

// RotateAdminToken makes a new admin token and sets it on every node
// through the log; each node replaces its file and its API's token when it
// applies the entry.
func (b *backend) RotateAdminToken(ctx context.Context) (string, error) {
	t, err := newAdminToken()
	if err != nil {
		return "", err
	}
	if _, err := b.apply(ctx, raftstore.SetAdminToken{Token: t}); err != nil {
		return "", err
	}
	return t, nil
}

// RotateJoinToken makes a new join token (the same CA pin, a new secret)
// and sets it on every node through the log; the old one stops admitting
// nodes once a node has applied the entry.
func (b *backend) RotateJoinToken(ctx context.Context) (string, error) {
	secret, err := pki.NewSecret()
	if err != nil {
		return "", err
	}
	t := pki.FormatJoinToken(b.bundle.CA.Fingerprint(), secret)
	if _, err := b.apply(ctx, raftstore.SetJoinToken{Token: t}); err != nil {
		return "", err
	}
	return t, nil
}

// RemoveClusterMember removes a node for good, on the leader (asked
// through the cluster port when this node is a follower), then takes away
// everything the removed node held: the join token and the admin token are
// rotated (its copies stop working; every other node adopts the new ones
// as it applies them, files included), and its certificate is revoked on
// every node, which closes its connections and refuses its handshakes from
// then on. Removing a node whose revocation did not finish (the leader
// changed midway) completes it.
func (b *backend) RemoveClusterMember(ctx context.Context, id string) (api.MemberRemoval, error) {
	out := api.MemberRemoval{Removed: id}
	if id == b.cfg.NodeID {
		return out, selfRemoval(id)
	}
	members, err := b.store.Members(ctx)
	if err != nil {
		return out, b.unavailable(err)
	}
	found := false
	for _, m := range members {
		found = found || m.ID == id
	}
	switch {
	case !found && !b.wasRemoved(id):
		return out, fmt.Errorf("cluster member %q: %w", id, fleet.ErrNotFound)
	case found && len(members) == 1:
		return out, fleet.Invalid("id", "%s is the only member: removing it would leave no cluster (stop the node instead)", id)
	case found:
		if b.store.IsLeader() {
			err = b.store.RemoveServer(ctx, id)
		} else if addr, _ := b.store.Leader(); addr == "" {
			err = fmt.Errorf("no raft leader known: %w", raftstore.ErrNotLeader)
		} else {
			err = b.peers.RemoveMember(ctx, addr, id)
		}
		if errors.Is(err, raftstore.ErrNotLeader) {
			return out, b.unavailable(err)
		}
		if err != nil {
			return out, err
		}
		b.logger.Info("removed a node from the cluster", "removed", id)
	}
	// The removed node knows both tokens: new ones, before its
	// certificate goes, so that nothing it holds works afterwards.
	if out.JoinToken, err = b.RotateJoinToken(ctx); err != nil {
		return out, fmt.Errorf("node %s removed, but rotating the join token failed (run the removal again): %w", id, err)
	}
	if out.AdminToken, err = b.RotateAdminToken(ctx); err != nil {
		return out, fmt.Errorf("node %s removed, but rotating the admin token failed (run the removal again): %w", id, err)
	}
	cert, err := b.revokeRemoved(ctx, id)
	switch {
	case errors.Is(err, raftstore.ErrClusterBehind):
		// A member runs a release without revocation: the removed node,
		// no member any more, is refused raft and the node-only RPCs all
		// the same; its certificate goes on the list once all are upgraded.
		out.Warning = "the certificate was not put on the deny list: " + err.Error() + "; run the removal again once every member is upgraded"
	case err != nil:
		return out, fmt.Errorf("node %s removed and the tokens rotated, but revoking its certificate failed (run the removal again): %w", id, err)
	default:
		out.CertificateRevoked = cert.Fingerprint != ""
		out.Fingerprint = cert.Fingerprint
	}
	b.logger.Info("the removed node's credentials were revoked", "removed", id, "certificate", shortFingerprint(cert.Fingerprint))
	return out, nil
}

// Backup writes a consistent archive to a temporary file in the data
// directory (same disk as the state, so no surprise of a small /tmp) and
// opens it; closing the reader removes it.
func (b *backend) Backup(ctx context.Context) (io.ReadCloser, int64, error) {
	if err := b.node().readBarrier(ctx); err != nil {
		return nil, 0, b.unavailable(err)
	}
	state, err := os.CreateTemp(b.cfg.DataDir, ".backup-state-*")
	if err != nil {
		return nil, 0, fmt.Errorf("backup: %w", err)
	}
	defer os.Remove(state.Name())
	defer state.Close()
	index, err := b.store.Backup(ctx, state)
	if err != nil {
		return nil, 0, fmt.Errorf("backup: %w", err)
	}
	archive, err := os.CreateTemp(b.cfg.DataDir, ".backup-*.tar")
	if err != nil {
		return nil, 0, fmt.Errorf("backup: %w", err)
	}
	keyPEM, err := b.bundle.CA.KeyPEM()
	if err == nil {
		err = backup.Write(archive, backup.Manifest{
			CreatedAt: time.Now().UTC(), NodeID: b.cfg.NodeID, AppliedIndex: index, CAFingerprint: b.bundle.CA.Fingerprint(),
		}, state, backup.Credentials{CACert: b.bundle.CA.CertPEM(), CAKey: keyPEM, JoinToken: b.node().JoinToken(), AdminToken: b.node().Token()})
	}
	if err == nil {
		err = archive.Sync()
	}
	var size int64
	if err == nil {
		size, err = archive.Seek(0, io.SeekEnd)
	}
	if err == nil {
		_, err = archive.Seek(0, io.SeekStart)
	}
	if err != nil {
		archive.Close()
		os.Remove(archive.Name())
		return nil, 0, fmt.Errorf("backup: %w", err)
	}
	b.logger.Info("backup made", "applied_index", index, "bytes", size)
	return &removeOnClose{File: archive}, size, nil
}

type removeOnClose struct{ *os.File }

func (r *removeOnClose) Close() error {
	err := r.File.Close()
	os.Remove(r.File.Name())
	return err
}

// RestoreLayout is where a restore puts the files a node reads.
func RestoreLayout() backup.Layout {
	return backup.Layout{RaftDir: "raft", TLSDir: TLSDir, JoinTokenFile: JoinTokenFile, AdminTokenFile: TokenFile}
}
