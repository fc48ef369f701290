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

// Cluster lists the raft members as this node sees them.
func (b *backend) Cluster(ctx context.Context) (api.ClusterView, error) {
	members, err := b.store.Members(ctx)
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
	for _, m := range members {
		v.Members = append(v.Members, api.ClusterMember{ID: m.ID, Address: m.Address, Voter: m.Voter, Leader: m.ID == leader})
	}
	return v, nil
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

// RemoveClusterMember removes a node, on the leader (asked through the
// cluster port when this node is a follower).
func (b *backend) RemoveClusterMember(ctx context.Context, id string) error {
	members, err := b.store.Members(ctx)
	if err != nil {
		return b.unavailable(err)
	}
	found := false
	for _, m := range members {
		found = found || m.ID == id
	}
	if !found {
		return fmt.Errorf("cluster member %q: %w", id, fleet.ErrNotFound)
	}
	if len(members) == 1 {
		return fleet.Invalid("id", "%s is the only member: removing it would leave no cluster (stop the node instead)", id)
	}
	if b.store.IsLeader() {
		err = b.store.RemoveServer(ctx, id)
	} else if addr, _ := b.store.Leader(); addr == "" {
		err = fmt.Errorf("no raft leader known: %w", raftstore.ErrNotLeader)
	} else {
		err = b.peers.RemoveMember(ctx, addr, id)
	}
	if errors.Is(err, raftstore.ErrNotLeader) {
		return b.unavailable(err)
	}
	if err == nil {
		b.logger.Info("removed a node from the cluster", "removed", id)
	}
	return err
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
