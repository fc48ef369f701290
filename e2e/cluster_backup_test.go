//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"appliance/api"
)

// stop sends SIGTERM and waits for the process: a graceful shutdown.
func (s *server) stop() {
	select {
	case <-s.exited:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		s.t.Errorf("node did not stop within 30 s of SIGTERM; killing it")
		s.kill()
	}
}

// TestCluster_RestartBackupRestore: a cluster of three that is stopped and
// started again keeps everything; `appliance backup` taken online from a
// follower restores, with `appliance restore`, into a new cluster that holds
// exactly that state, keeps the CA and the admin token, and takes a new
// member with the old join token.
func TestCluster_RestartBackupRestore(t *testing.T) {
	nodes := startCluster(t, 3)
	ctx := context.Background()
	var ids []string
	for i := range 30 {
		n := nodes[i%3]
		id := fmt.Sprintf("press-%02d", i)
		if _, err := n.client().PutDevice(ctx, id, api.DeviceRequest{Tags: map[string]any{"line": float64(i % 4)}}, api.WriteOptions{}); err != nil {
			t.Fatalf("create %s on %s: %v", id, n.id, err)
		}
		ids = append(ids, id)
	}
	cli(t, nodes[1].dataDir, "deployment", "create", "lines", "--content", writeManifest(t),
		"--target-condition", "tags.line=1", "--priority", "3").mustSucceed(t)

	// Online backup through a follower, while the cluster serves.
	leader := members(t, nodes[0].server).Leader
	var follower *clusterNode
	for _, n := range nodes {
		if n.id != leader {
			follower = n
		}
	}
	archive := filepath.Join(t.TempDir(), "cluster.backup")
	r := cli(t, follower.dataDir, "backup", "--out", archive).mustSucceed(t)
	t.Logf("backup: %s", strings.TrimSpace(r.stdout))
	if st, err := os.Stat(archive); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v, mode %v; want 0600", err, st.Mode())
	}

	// The whole cluster stops and starts again: nothing is lost.
	for _, n := range nodes {
		n.stop()
	}
	for _, n := range nodes {
		n.restart(t)
	}
	for _, n := range nodes {
		n.waitReady()
	}
	for _, n := range nodes {
		c := n.client()
		eventually(t, "all devices on restarted "+n.id, 30*time.Second, func() bool {
			page, err := c.Devices(ctx, api.DeviceQuery{Limit: 100, Consistent: true})
			return err == nil && len(page.Items) == len(ids)
		})
		if d, err := c.Deployment(ctx, "lines", true); err != nil || d.Deployment.Priority != 3 {
			t.Fatalf("deployment on restarted %s: %+v, %v", n.id, d, err)
		}
	}

	// Disaster: every node is gone. Restore the backup into a new node.
	for _, n := range nodes {
		n.kill()
	}
	dir := filepath.Join(t.TempDir(), "restored")
	raft := freePort(t)
	r = cliContext(ctx, t, "", "restore", archive, "--data-dir", dir, "--node-id", "r1", "--raft-addr", raft)
	r.mustSucceed(t)
	t.Logf("restore: %s", strings.TrimSpace(r.stdout))
	// Restoring over it again is refused: nothing is overwritten.
	cliContext(ctx, t, "", "restore", archive, "--data-dir", dir, "--node-id", "r1", "--raft-addr", raft).mustFailWithOneLine(t, "not empty")

	r1 := &clusterNode{server: startServer(t, dir, "--node-id", "r1", "--raft-addr", raft), id: "r1", raftAddr: raft}
	if r1.token != nodes[0].token {
		t.Errorf("the restored cluster has another admin token")
	}
	old, _ := os.ReadFile(nodes[0].caFile())
	restored, _ := os.ReadFile(r1.caFile())
	if string(old) != string(restored) {
		t.Errorf("the restored cluster has another CA: agents would not trust it")
	}
	c := r1.client()
	page, err := c.Devices(ctx, api.DeviceQuery{Limit: 100, Consistent: true})
	if err != nil || len(page.Items) != len(ids) {
		t.Fatalf("restored devices: %d, %v; want %d", len(page.Items), err, len(ids))
	}
	if d, err := c.Deployment(ctx, "lines", true); err != nil || d.Deployment.Priority != 3 {
		t.Fatalf("restored deployment: %+v, %v", d, err)
	}
	// The restored cluster takes writes and a new member with its token.
	if _, err := c.PutDevice(ctx, "after-restore", api.DeviceRequest{}, api.WriteOptions{}); err != nil {
		t.Fatalf("write on the restored cluster: %v", err)
	}
	r2raft := freePort(t)
	r2 := startServer(t, t.TempDir(), "--node-id", "r2", "--raft-addr", r2raft,
		"--join", "https://"+raft, "--join-token", joinToken(t, dir))
	eventually(t, "r2 has the restored state", 30*time.Second, func() bool {
		_, err := r2.client().Device(ctx, "press-29", false)
		_, err2 := r2.client().Device(ctx, "after-restore", false)
		return err == nil && err2 == nil
	})
	if v := members(t, r2); len(v.Members) != 2 {
		t.Errorf("members after the join: %+v", v.Members)
	}
}
