//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/pki"
)

// clusterNode is one controller of a test cluster and the address its
// peers dial.
type clusterNode struct {
	*server
	id, raftAddr string
	args         []string
}

// restart starts the node again on its data directory with the same
// flags (the old process must have ended); waitReady waits for it.
func (n *clusterNode) restart(t *testing.T) {
	t.Helper()
	n.server = launchServer(t, n.dataDir, n.args...)
}

// apiStatus is the HTTP status of a device list on the node's API with
// token: 200 for a token it takes, 401 for one it refuses, 0 when the
// request failed.
func (n *clusterNode) apiStatus(token string) int {
	req, _ := http.NewRequest(http.MethodGet, n.url+"/api/v1/devices", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := n.httpClient().Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// startCluster starts n nodes as processes of the built binary, each on
// its own raft port, the first bootstrapping and the others joining it
// with its join token.
func startCluster(t *testing.T, n int, extra ...string) []*clusterNode {
	t.Helper()
	nodes := make([]*clusterNode, 0, n)
	for i := range n {
		id := fmt.Sprintf("n%d", i+1)
		raft := freePort(t)
		args := append([]string{"--node-id", id, "--raft-addr", raft}, extra...)
		if i > 0 {
			args = append(args, "--join", "https://"+nodes[0].raftAddr, "--join-token", joinToken(t, nodes[0].dataDir))
		}
		s := startServer(t, t.TempDir(), args...)
		nodes = append(nodes, &clusterNode{server: s, id: id, raftAddr: raft, args: args})
	}
	return nodes
}

func joinToken(t *testing.T, dataDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "join-token"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// members runs `appliance cluster members -o json` against one node.
func members(t *testing.T, s *server) api.ClusterView {
	t.Helper()
	r := cli(t, s.dataDir, "cluster", "members", "-o", "json").mustSucceed(t)
	var v api.ClusterView
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("cluster members output: %v\n%s", err, r.stdout)
	}
	return v
}

// TestCluster_JoinMembersAndWritesOnAnyNode is issue 7's first acceptance
// item: three processes joined with the token agree on the members and the
// leader, and a write sent to any node is readable on every node.
func TestCluster_JoinMembersAndWritesOnAnyNode(t *testing.T) {
	nodes := startCluster(t, 3)

	// Every node lists the same three voters and the same leader.
	var leader string
	eventually(t, "all nodes agree on 3 voters and a leader", 20*time.Second, func() bool {
		leader = ""
		for _, n := range nodes {
			v := members(t, n.server)
			if len(v.Members) != 3 || v.Leader == "" || (leader != "" && v.Leader != leader) {
				return false
			}
			leader = v.Leader
			for _, m := range v.Members {
				if !m.Voter {
					return false
				}
			}
		}
		return true
	})
	v := members(t, nodes[1].server)
	for _, n := range nodes {
		found := false
		for _, m := range v.Members {
			found = found || (m.ID == n.id && m.Address == n.raftAddr)
		}
		if !found {
			t.Errorf("members %+v lack %s at %s", v.Members, n.id, n.raftAddr)
		}
	}
	// The human table names the leader too.
	table := cli(t, nodes[2].dataDir, "cluster", "members").mustSucceed(t).stdout
	if !strings.Contains(table, "leader") || !strings.Contains(table, leader) {
		t.Errorf("cluster members table does not show the leader %s:\n%s", leader, table)
	}

	// The operator token is the cluster's: the same on every node.
	for _, n := range nodes[1:] {
		if n.token != nodes[0].token {
			t.Fatalf("node %s has another admin token than n1", n.id)
		}
	}

	// A write on each node (the followers forward it to the leader)...
	for i, n := range nodes {
		id := fmt.Sprintf("written-on-%s", n.id)
		cli(t, n.dataDir, "device", "create", id, "--tag", fmt.Sprintf("line=%d", i)).mustSucceed(t)
		cli(t, n.dataDir, "deployment", "create", "dep-"+n.id, "--target-condition", fmt.Sprintf("tags.line=%d", i),
			"--priority", "1", "--content", writeManifest(t)).mustSucceed(t)
	}
	// ...is readable on every node: at once with --consistent, and by a
	// plain local read once replicated.
	ctx := context.Background()
	for _, reader := range nodes {
		c := reader.client()
		for _, writer := range nodes {
			id := "written-on-" + writer.id
			if _, err := c.Device(ctx, id, true); err != nil {
				t.Errorf("consistent read of %s on %s: %v", id, reader.id, err)
			}
			eventually(t, "local read of "+id+" on "+reader.id, 10*time.Second, func() bool {
				_, err := c.Device(ctx, id, false)
				return err == nil
			})
			if d, err := c.Deployment(ctx, "dep-"+writer.id, true); err != nil || d.Deployment.Priority != 1 {
				t.Errorf("deployment dep-%s on %s: %+v, %v", writer.id, reader.id, d, err)
			}
		}
		r := cli(t, reader.dataDir, "device", "show", "written-on-n2", "--consistent", "-o", "json").mustSucceed(t)
		if !strings.Contains(r.stdout, `"line": 1`) && !strings.Contains(r.stdout, `"line":1`) {
			t.Errorf("device show on %s: %s", reader.id, r.stdout)
		}
	}
	// A rule error from the leader keeps its class through forwarding: a
	// second create of the same device on a follower is a conflict.
	follower := nodes[0]
	for _, n := range nodes {
		if n.id != leader {
			follower = n
		}
	}
	r := cli(t, follower.dataDir, "device", "create", "written-on-n1")
	r.mustFailWithOneLine(t, "written-on-n1")
	if _, err := follower.client().PutDevice(ctx, "written-on-n1", api.DeviceRequest{}, api.WriteOptions{IfNoneMatch: "*"}); !isErr(err, fleet.ErrExists) {
		t.Errorf("create of an existing device through follower %s: %v, want a conflict", follower.id, err)
	}

	// Every member says what it runs; a dead one is listed as down (it
	// used to be listed as a plain follower), on the leader and on the
	// other follower alike.
	for _, m := range members(t, nodes[0].server).Members {
		if m.Status != api.MemberUp || m.Version == "" || m.Legacy || len(m.Commands) == 0 {
			t.Errorf("member %+v: want up, with its version and commands", m)
		}
	}
	follower.kill()
	for _, n := range nodes {
		if n == follower {
			continue
		}
		eventually(t, n.id+" lists "+follower.id+" as down", 10*time.Second, func() bool {
			for _, m := range members(t, n.server).Members {
				if m.ID == follower.id {
					return m.Status == api.MemberDown && m.State == "" && m.Error != ""
				}
			}
			return false
		})
		r := cli(t, n.dataDir, "cluster", "members").mustSucceed(t)
		for _, line := range strings.Split(r.stdout, "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[0] == follower.id && (!strings.Contains(line, "down") || strings.Contains(line, "follower")) {
				t.Errorf("the table on %s lists the dead %s as %q", n.id, follower.id, line)
			}
		}
		if !strings.Contains(r.stderr, follower.id+" is down") {
			t.Errorf("the table on %s does not say %s is down: %s", n.id, follower.id, r.stderr)
		}
	}
}

func isErr(err, target error) bool {
	type iser interface{ Is(error) bool }
	if e, ok := err.(iser); ok {
		return e.Is(target)
	}
	return false
}

// TestCluster_JoinRefusals is issue 7's third acceptance item: a joiner
// with a wrong token, or a token of another cluster, is refused before it
// has any state, and a raft connection without a cluster certificate is
// refused.
func TestCluster_JoinRefusals(t *testing.T) {
	nodes := startCluster(t, 1)
	n1 := nodes[0]
	other := startServer(t, t.TempDir(), "--node-id", "x1", "--raft-addr", freePort(t))

	good := joinToken(t, n1.dataDir)
	fp, _, err := pki.ParseJoinToken(good)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, token string
		want        []string
	}{
		{"wrong secret", pki.FormatJoinToken(fp, "not-the-secret"), []string{"wrong join token secret"}},
		{"another cluster's token", joinToken(t, other.dataDir), []string{"does not match the join token"}},
		{"malformed token", "K10abc::xyz", []string{"--join-token", "APL1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			r := runBinary(ctx, t, "serve", "--data-dir", dir, "--node-id", "intruder", "--http-addr", "127.0.0.1:0",
				"--raft-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--join", "https://"+n1.raftAddr, "--join-token", tc.token)
			if ctx.Err() != nil {
				t.Fatalf("serve with a bad token did not give up: %s", r.stderr)
			}
			// serve logs as it starts; its last line is the error.
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			last := lines[len(lines)-1]
			if r.code == 0 || !strings.HasPrefix(last, "error: ") {
				t.Fatalf("exit %d, last line %q; want an error line", r.code, last)
			}
			for _, w := range tc.want {
				if !strings.Contains(last, w) {
					t.Errorf("error line %q does not mention %q", last, w)
				}
			}
			if strings.Contains(r.stderr, "retrying") {
				t.Errorf("a refused join was retried:\n%s", r.stderr)
			}
			for _, f := range []string{"tls", "raft", "admin-token"} {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("refused joiner has %s in its data directory", f)
				}
			}
		})
	}
	if v := members(t, n1.server); len(v.Members) != 1 {
		t.Errorf("members after refused joins: %+v", v.Members)
	}
	// The secret of n1's token never went to the other cluster's node, and
	// n1 logged the wrong secret.
	if !strings.Contains(n1.logs.String(), "refused a join with a wrong secret") {
		t.Errorf("n1 did not log the refused join")
	}

	// Raft without a certificate of this cluster: a TLS client with no
	// certificate sending a raft RequestVote byte is cut off unanswered...
	conn, err := tls.Dial("tcp", n1.raftAddr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte{1, 0x80})
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := conn.Read(make([]byte, 16)); err == nil || n > 0 {
		t.Errorf("raft connection without a certificate got %d bytes, err %v; want it closed", n, err)
	}
	conn.Close()
	eventually(t, "n1 logs the refused raft connection", 5*time.Second, func() bool {
		return strings.Contains(n1.logs.String(), "refused a raft connection without a node certificate")
	})
	// ...and a node certificate of another cluster fails the handshake.
	otherBundle, err := pki.LoadBundle(filepath.Join(other.dataDir, "tls"))
	if err != nil {
		t.Fatal(err)
	}
	if c, err := tls.Dial("tcp", n1.raftAddr, otherBundle.PeerClientTLS()); err == nil {
		c.Write([]byte{1})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("a node of another cluster got an answer on n1's raft port")
		}
		c.Close()
	}
	// Plain TCP is not TLS: nothing comes back.
	if c, err := net.DialTimeout("tcp", n1.raftAddr, 5*time.Second); err == nil {
		c.Write([]byte{0, 1, 2, 3})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		if n > 0 && buf[0] != 0x15 { // 0x15: a TLS alert record
			t.Errorf("plain TCP to the raft port got %x", buf[:n])
		}
		c.Close()
	}
}

// runBinary runs the built binary to its end (or ctx's).
func runBinary(ctx context.Context, t *testing.T, args ...string) result {
	t.Helper()
	return cliContext(ctx, t, "", args...)
}

// TestCluster_RotateTokens: rotating the admin token on one node replaces
// it on every node, in memory and in each data directory's admin-token
// file (which the CLI on that machine reads); the old token is refused
// everywhere, and a node restarted afterwards keeps the new one. Rotating
// the join token likewise: a node with the old one is refused, a node with
// the new one joins.
func TestCluster_RotateTokens(t *testing.T) {
	nodes := startCluster(t, 3)
	eventually(t, "3 voters and a leader", 20*time.Second, func() bool {
		v := members(t, nodes[0].server)
		return len(v.Members) == 3 && v.Leader != ""
	})
	old := nodes[0].token
	r := cli(t, nodes[1].dataDir, "cluster", "rotate-admin-token", "-o", "json").mustSucceed(t)
	var reply api.AdminTokenReply
	if err := json.Unmarshal([]byte(r.stdout), &reply); err != nil || len(reply.AdminToken) < 32 || reply.AdminToken == old {
		t.Fatalf("rotate-admin-token printed %q (%v)", r.stdout, err)
	}
	for _, n := range nodes {
		eventually(t, n.id+" takes the new token and refuses the old one", 10*time.Second, func() bool {
			b, _ := os.ReadFile(filepath.Join(n.dataDir, "admin-token"))
			return strings.TrimSpace(string(b)) == reply.AdminToken &&
				n.apiStatus(reply.AdminToken) == http.StatusOK && n.apiStatus(old) == http.StatusUnauthorized
		})
	}
	// The CLI on another node's machine reads the new token from its file.
	cli(t, nodes[2].dataDir, "device", "list").mustSucceed(t)

	nodes[2].kill()
	nodes[2].restart(t)
	nodes[2].waitReady()
	eventually(t, nodes[2].id+", restarted, takes the new token and refuses the old one", 10*time.Second, func() bool {
		return nodes[2].apiStatus(reply.AdminToken) == http.StatusOK && nodes[2].apiStatus(old) == http.StatusUnauthorized
	})

	oldJoin := joinToken(t, nodes[0].dataDir)
	r = cli(t, nodes[2].dataDir, "cluster", "rotate-join-token", "-o", "json").mustSucceed(t)
	var joinReply api.JoinTokenReply
	if err := json.Unmarshal([]byte(r.stdout), &joinReply); err != nil || joinReply.JoinToken == oldJoin {
		t.Fatalf("rotate-join-token printed %q (%v)", r.stdout, err)
	}
	for _, n := range nodes {
		eventually(t, n.id+" holds the new join token", 10*time.Second, func() bool {
			return joinToken(t, n.dataDir) == joinReply.JoinToken
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	refused := runBinary(ctx, t, "serve", "--data-dir", t.TempDir(), "--node-id", "n4", "--http-addr", "127.0.0.1:0",
		"--raft-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--join", "https://"+nodes[0].raftAddr, "--join-token", oldJoin)
	if refused.code == 0 || !strings.Contains(refused.stderr, "wrong join token secret") {
		t.Fatalf("a node with the old join token: exit %d\n%s", refused.code, refused.stderr)
	}
	startServer(t, t.TempDir(), "--node-id", "n4", "--raft-addr", freePort(t),
		"--join", "https://"+nodes[1].raftAddr, "--join-token", joinReply.JoinToken)
	eventually(t, "n4 a member with the new join token", 20*time.Second, func() bool {
		return len(members(t, nodes[0].server).Members) == 4
	})
}
