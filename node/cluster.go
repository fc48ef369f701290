package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"appliance/cluster"
	"appliance/fleet"
	"appliance/internal/fsutil"
	"appliance/pki"
	"appliance/raftstore"
)

// Files of the cluster's credentials in the data directory.
const (
	// TLSDir holds the cluster CA (with its key: every server can admit a
	// joiner) and this node's certificate.
	TLSDir = "tls"
	// JoinTokenFile holds the token another node joins with (mode 0600).
	JoinTokenFile = "join-token"
)

// credentials loads this node's cluster credentials, or makes them: a new
// cluster CA when the node starts a cluster, or the ones a cluster hands a
// joiner that knows its join token.
func (n *Node) credentials(ctx context.Context) (*pki.Bundle, string, error) {
	dir := filepath.Join(n.cfg.DataDir, TLSDir)
	b, err := pki.LoadBundle(dir)
	switch {
	case err == nil:
		if b.NodeID != n.cfg.NodeID {
			return nil, "", fmt.Errorf("the certificate in %s is for node %q, not %q (flag --node-id): a data directory belongs to one node", dir, b.NodeID, n.cfg.NodeID)
		}
		tok, err := readSecretFile(filepath.Join(n.cfg.DataDir, JoinTokenFile))
		if err != nil {
			return nil, "", err
		}
		if err := n.checkCredentials(b, tok); err != nil {
			return nil, "", err
		}
		return b, tok, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, "", fmt.Errorf("load cluster credentials: %w; %s", err, n.credentialsHint())
	}
	if n.cfg.Join != "" {
		return n.joinCredentials(ctx, dir)
	}
	if certPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt")); err == nil {
		// A restored data directory: the cluster's CA and tokens, no
		// certificate for this node yet.
		return n.restoredCredentials(dir, certPEM)
	}
	ca, err := pki.NewCA(n.cfg.NodeID, time.Now())
	if err != nil {
		return nil, "", err
	}
	b, err = pki.NewBundle(ca, n.cfg.NodeID, n.certHosts(), time.Now())
	if err != nil {
		return nil, "", err
	}
	secret, err := pki.NewSecret()
	if err != nil {
		return nil, "", err
	}
	tok := pki.FormatJoinToken(ca.Fingerprint(), secret)
	// The token first: a bundle without it would be a node nobody can join.
	if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, JoinTokenFile), []byte(tok+"\n"), 0o600); err != nil {
		return nil, "", fmt.Errorf("write join token: %w", err)
	}
	if err := b.Save(dir); err != nil {
		return nil, "", err
	}
	n.logger.Info("created the cluster CA and this node's certificate", "dir", dir,
		"join_token_file", filepath.Join(n.cfg.DataDir, JoinTokenFile))
	return b, tok, nil
}

// checkCredentials catches what parsing the files cannot: a CA
// certificate changed where its key is not (its own signature), and a CA
// or join token that no longer agree (the token pins the CA's SHA-256).
// The node certificate's signature and key are checked by pki.
func (n *Node) checkCredentials(b *pki.Bundle, joinToken string) error {
	caPath := filepath.Join(n.cfg.DataDir, TLSDir, "ca.crt")
	tokenPath := filepath.Join(n.cfg.DataDir, JoinTokenFile)
	if err := b.CA.Cert.CheckSignatureFrom(b.CA.Cert); err != nil {
		return fmt.Errorf("%s: the CA certificate is damaged (its own signature does not verify: %v); %s", caPath, err, n.credentialsHint())
	}
	pin, _, err := pki.ParseJoinToken(joinToken)
	if err != nil {
		return fmt.Errorf("%s: the join token is damaged: %w; %s", tokenPath, err, n.credentialsHint())
	}
	if pin != b.CA.Fingerprint() {
		return fmt.Errorf("%s and %s do not agree (the token pins another CA): one of them is damaged; %s", tokenPath, caPath, n.credentialsHint())
	}
	return nil
}

// credentialsHint says how to recover damaged credential files.
func (n *Node) credentialsHint() string {
	return fmt.Sprintf("this node will not start on them. To recover: restore a backup (appliance restore), or, on a cluster, copy ca.crt and join-token from another node, or remove %s and %s and rejoin (appliance serve --join)",
		filepath.Join(n.cfg.DataDir, TLSDir), filepath.Join(n.cfg.DataDir, "raft"))
}

func (n *Node) restoredCredentials(dir string, certPEM []byte) (*pki.Bundle, string, error) {
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		return nil, "", fmt.Errorf("restored data directory: %w", err)
	}
	ca, err := pki.ParseCA(certPEM, keyPEM)
	if err != nil {
		return nil, "", fmt.Errorf("restored data directory: %w", err)
	}
	tok, err := readSecretFile(filepath.Join(n.cfg.DataDir, JoinTokenFile))
	if err != nil {
		return nil, "", err
	}
	b, err := pki.NewBundle(ca, n.cfg.NodeID, n.certHosts(), time.Now())
	if err != nil {
		return nil, "", err
	}
	if err := b.Save(dir); err != nil {
		return nil, "", err
	}
	n.logger.Info("issued this node's certificate from the restored cluster CA", "dir", dir)
	return b, tok, nil
}

// joinCredentials asks the --join node for credentials, retrying until it
// answers or ctx ends; a wrong token is final.
func (n *Node) joinCredentials(ctx context.Context, dir string) (*pki.Bundle, string, error) {
	if n.cfg.JoinToken == "" {
		return nil, "", errors.New("flag --join-token-file is required with --join: a copy of the first node's <data-dir>/join-token, mode 0600 (or --join-token, env APPLIANCE_JOIN_TOKEN or APPLIANCE_JOIN_TOKEN_FILE)")
	}
	if _, _, err := pki.ParseJoinToken(n.cfg.JoinToken); err != nil {
		return nil, "", fmt.Errorf("the join token (flag --join-token-file or --join-token, env APPLIANCE_JOIN_TOKEN or APPLIANCE_JOIN_TOKEN_FILE): %w", err)
	}
	var resp *cluster.JoinResponse
	for attempt := 0; ; attempt++ {
		var err error
		resp, err = cluster.Join(ctx, n.cfg.Join, n.cfg.JoinToken, n.cfg.NodeID, n.certHosts())
		if err == nil {
			break
		}
		if permanentJoinError(err) {
			return nil, "", err
		}
		n.logger.Warn("join: the cluster did not answer yet, retrying", "join", n.cfg.Join, "attempt", attempt+1, "err", err)
		select {
		case <-ctx.Done():
			return nil, "", fmt.Errorf("join %s: %w (last error: %v)", n.cfg.Join, ctx.Err(), err)
		case <-time.After(backoff(attempt)):
		}
	}
	b, err := pki.BundleFromPEM([]byte(resp.CACert), []byte(resp.CAKey), []byte(resp.NodeCert), []byte(resp.NodeKey))
	if err != nil {
		return nil, "", fmt.Errorf("join: credentials from %s: %w", n.cfg.Join, err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, TokenFile), []byte(resp.AdminToken+"\n"), 0o600); err != nil {
		return nil, "", fmt.Errorf("write admin token: %w", err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, JoinTokenFile), []byte(resp.JoinToken+"\n"), 0o600); err != nil {
		return nil, "", fmt.Errorf("write join token: %w", err)
	}
	// The bundle last: its presence says the node has joined.
	if err := b.Save(dir); err != nil {
		return nil, "", err
	}
	n.logger.Info("received this node's certificate from the cluster", "join", n.cfg.Join)
	return b, resp.JoinToken, nil
}

// permanentJoinError: retrying cannot help (wrong token, wrong cluster,
// a request the cluster refuses).
func permanentJoinError(err error) bool { return errors.Is(err, cluster.ErrRefused) }

func backoff(attempt int) time.Duration {
	d := 200 * time.Millisecond << min(attempt, 5)
	return min(d, 5*time.Second)
}

// certHosts are the names and addresses this node's certificate is valid
// for: what devices and operators may dial.
func (n *Node) certHosts() []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h, err := os.Hostname(); err == nil && h != "" {
		hosts = append(hosts, h)
	}
	for _, a := range []string{n.cfg.RaftAddr, n.cfg.RaftAdvertise, n.cfg.HTTPAddr, n.cfg.MQTTAddr} {
		if host, _, err := net.SplitHostPort(a); err == nil && host != "" {
			if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
				continue
			}
			hosts = append(hosts, host)
		}
	}
	hosts = append(hosts, n.cfg.TLSHosts...)
	seen := map[string]bool{}
	out := hosts[:0]
	for _, h := range hosts {
		if !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

func readSecretFile(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}

// addSelf makes this node a voter through the --join node (or, when that
// one is down, any peer raft knows), retrying until it succeeds or ctx
// ends. Idempotent: a voter at the same address is left as it is.
func (n *Node) addSelf(ctx context.Context) error {
	first, err := cluster.JoinAddress(n.cfg.Join)
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		targets := []string{first}
		if members, err := n.store.Members(ctx); err == nil {
			for _, m := range members {
				if m.ID != n.cfg.NodeID && m.Address != first {
					targets = append(targets, m.Address)
				}
			}
		}
		var lastErr error
		for _, t := range targets {
			actx, cancel := context.WithTimeout(ctx, 15*time.Second)
			lastErr = n.peers.AddSelf(actx, t, n.mux.Advertise(), n.JoinToken())
			cancel()
			if lastErr == nil {
				n.logger.Info("this node is a voter of the cluster", "via", t)
				return nil
			}
		}
		n.logger.Warn("join: could not become a voter yet, retrying", "attempt", attempt+1, "err", lastErr)
		select {
		case <-ctx.Done():
			return fmt.Errorf("become a voter via %s: %w (last error: %v)", n.cfg.Join, ctx.Err(), lastErr)
		case <-time.After(backoff(attempt)):
		}
	}
}

// forward sends a write to the leader (raftstore calls it on a follower).
func (n *Node) forward(ctx context.Context, leaderAddr, _ string, entry []byte) (*raftstore.Result, error) {
	return n.peers.Apply(ctx, leaderAddr, entry)
}

// readBarrier makes the local replica current for a linearizable read:
// the leader confirms its leadership; a follower asks the leader for its
// commit index and waits until it has applied that far.
func (n *Node) readBarrier(ctx context.Context) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		if n.store.IsLeader() {
			lastErr = n.store.VerifyLeader(ctx)
		} else if addr, _ := n.store.Leader(); addr == "" {
			lastErr = fmt.Errorf("no raft leader known: %w", raftstore.ErrNotLeader)
		} else {
			var idx uint64
			idx, lastErr = n.peers.ReadIndex(ctx, addr)
			if lastErr == nil {
				return n.store.WaitApplied(ctx, idx)
			}
		}
		if lastErr == nil || !errors.Is(lastErr, raftstore.ErrNotLeader) {
			return lastErr
		}
		select {
		case <-ctx.Done():
			return lastErr
		case <-time.After(100 * time.Millisecond):
		}
	}
	return lastErr
}

// clusterStore adapts the node's store to the cluster RPCs; it exists
// before the store opens so the mux can be created first.
type clusterStore Node

func (c *clusterStore) ApplyEncoded(ctx context.Context, entry []byte) (*raftstore.Result, error) {
	return c.store.ApplyEncoded(ctx, entry)
}
func (c *clusterStore) ReadIndex(ctx context.Context) (uint64, error) { return c.store.ReadIndex(ctx) }
func (c *clusterStore) AddVoter(ctx context.Context, id, addr string) error {
	return c.store.AddVoter(ctx, id, addr)
}
func (c *clusterStore) RemoveServer(ctx context.Context, id string) error {
	return c.store.RemoveServer(ctx, id)
}
func (c *clusterStore) Leader() (string, string) { return c.store.Leader() }
func (c *clusterStore) IsMember(ctx context.Context, id string) (bool, error) {
	return c.store.IsMember(ctx, id)
}
func (c *clusterStore) BindNode(ctx context.Context, id, fingerprint, serial string, replace bool) error {
	return c.store.BindNode(ctx, id, fingerprint, serial, replace)
}
func (c *clusterStore) Info() raftstore.NodeInfo { return (*Node)(c).info() }

// info is what this node runs: its store's NodeInfo with the build's
// commit and the documents' schema.
func (n *Node) info() raftstore.NodeInfo {
	info := n.store.Info()
	info.Commit = buildCommit()
	info.DocumentSchema = fleet.DocumentSchema
	if n.broker != nil {
		c := n.broker.Stats().Connections
		info.ConnectedDevices = &c
	}
	return info
}

// peerInfo asks a peer what it runs (raftstore's Config.PeerInfo).
func (n *Node) peerInfo(ctx context.Context, _, addr string) (raftstore.NodeInfo, error) {
	return n.peers.NodeInfo(ctx, addr)
}

// buildCommit is the VCS revision the binary was built from ("" when the
// build did not record it), "-dirty" appended for a modified tree.
func buildCommit() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev != "" && modified == "true" {
		rev += "-dirty"
	}
	return rev
}

func (n *Node) clusterSecrets() cluster.Secrets {
	return cluster.Secrets{Bundle: n.bundle, JoinToken: n.JoinToken(), AdminToken: n.Token()}
}
