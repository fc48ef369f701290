//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/internal/spread"
	"appliance/sim"
)

// TestCluster_DevicesSpreadAndReturn (issue 19, "the cluster as a whole"):
// a simulated fleet and three real agents, each given all three nodes in
// --server, spread over the nodes as the documented rule says
// (internal/spread: each device's preferred node by a hash of its id), as
// `cluster members` shows; a deployment reaches all of them. A node dies:
// its devices move to the other two, each to its own second choice (so
// both take a share), and a deployment created after the death reaches
// every device. The node comes back: its devices return to it, and the
// spread is the first one again.
func TestCluster_DevicesSpreadAndReturn(t *testing.T) {
	c := startFaultCluster(t)
	leader := c.waitLeader(t, "")
	var servers, hosts []string
	for _, n := range c.nodes {
		u := n.srv.mqttURL()
		servers = append(servers, u)
		hosts = append(hosts, hostOf(t, u))
	}
	dir, ca := c.nodes[0].dataDir, c.nodes[0].srv.caFile()
	token := enrollmentToken(t, dir, "spread", "line=spread")
	// Checks of a preferred node every second or two, instead of minutes.
	returnFlags := []string{"--return-check-min", "1s", "--return-check-max", "2s"}

	const simDevices = 300
	ids := simDeviceIDs(t, token, "sp", simDevices)
	startSim(t, strings.Join(servers, ","), token, "sp", simDevices,
		append([]string{"--ca-file", ca, "--connect-rate", "1000"}, returnFlags...)...)
	// One agent preferring each node.
	agents := map[string]string{} // node id → the agent's device id
	for k, n := range c.nodes {
		id := firstPreferring(hosts, k, "press")
		agents[n.id] = id
		ids = append(ids, id)
		startAgent(t, append([]string{"--server", strings.Join(servers, ","), "--ca-file", ca, "--device-id", id,
			"--enroll-token", token, "--data-dir", t.TempDir(), "--no-hub"}, returnFlags...)...)
	}
	total := len(ids)

	home := spreadCounts(ids, hosts, "")
	for k, n := range home {
		// Evenness itself is the unit test's (internal/spread, 10,000
		// ids); here each node must hold a real share.
		if n < total/5 {
			t.Fatalf("node %s is preferred by %d of %d devices: %v", c.nodes[k].id, n, total, home)
		}
	}
	waitSpread(t, c, "", "every device on its preferred node", home)

	out := t.TempDir()
	manifest := processManifest(t, out, map[string]map[string]any{"alpha": module("running", "always", nil)})
	cli(t, dir, "deployment", "create", "v1", "--content", manifest, "--target-condition", "tags.line='spread'", "--priority", "1").mustSucceed(t)
	waitApplied(t, c.client(0), "v1", total)

	// A follower dies: its devices fall over to their second choices.
	var victim *faultNode
	var survivor int
	for i, n := range c.nodes {
		if n.id != leader && victim == nil {
			victim = n
		} else {
			survivor = i
		}
	}
	victimIdx, _ := c.node(victim.id)
	c.kill(victim.id)
	killed := time.Now()
	after := spreadCounts(ids, hosts, hosts[victimIdx])
	if after[victimIdx] != 0 {
		t.Fatalf("the rule leaves %d devices on the dead node", after[victimIdx])
	}
	for k, n := range after {
		if k != victimIdx && n == home[k] {
			t.Fatalf("none of %s's devices fall over to %s (%v → %v): the test would not see them spread", victim.id, c.nodes[k].id, home, after)
		}
	}
	waitSpread(t, c, victim.id, victim.id+"'s devices on their second choices", after)
	t.Logf("%s killed; its %d devices moved to the other two (%v → %v) within %v", victim.id, home[victimIdx], home, after, time.Since(killed).Round(100*time.Millisecond))
	cli(t, c.nodes[survivor].dataDir, "deployment", "create", "v2", "--content", manifest, "--target-condition", "tags.line='spread'", "--priority", "2").mustSucceed(t)
	waitApplied(t, c.client(survivor), "v2", total)

	// It comes back: its devices return.
	c.restart(t, victim.id)
	restarted := time.Now()
	waitSpread(t, c, "", "the devices back on "+victim.id, home)
	t.Logf("%s restarted; its devices returned within %v", victim.id, time.Since(restarted).Round(100*time.Millisecond))
	if v := deviceView(t, victim.srv, agents[victim.id]); v.ConnectedNode != victim.id {
		t.Fatalf("the agent %s that prefers %s is connected to %q", agents[victim.id], victim.id, v.ConnectedNode)
	}
}

// hostOf is an MQTT URL's host:port, what the spread rule hashes.
func hostOf(t *testing.T, mqttURL string) string {
	t.Helper()
	u, err := url.Parse(mqttURL)
	if err != nil || u.Port() == "" {
		t.Fatalf("MQTT URL %q: %v", mqttURL, err)
	}
	return u.Host
}

// simDeviceIDs are the ids `appliance sim --prefix prefix --devices n`
// gives its devices (sim names them; nothing connects here).
func simDeviceIDs(t *testing.T, token, prefix string, n int) []string {
	t.Helper()
	s, err := sim.New(sim.Config{Servers: []string{"mqtt://127.0.0.1:1"}, Devices: n, EnrollToken: token, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return s.DeviceIDs()
}

// devicePreferring is a device id prefix-N whose preferred server among
// mqttURLs is mqttURLs[k].
func devicePreferring(t *testing.T, mqttURLs []string, k int, prefix string) string {
	t.Helper()
	hosts := make([]string, len(mqttURLs))
	for i, u := range mqttURLs {
		hosts[i] = hostOf(t, u)
	}
	return firstPreferring(hosts, k, prefix)
}

// firstPreferring is the first id prefix-N whose preferred server among
// hosts is hosts[k].
func firstPreferring(hosts []string, k int, prefix string) string {
	for i := 1; ; i++ {
		if id := fmt.Sprintf("%s-%02d", prefix, i); spread.Preferred(id, hosts) == k {
			return id
		}
	}
}

// spreadCounts counts, per server, the devices the rule puts on it when
// the server dead (a host:port, or "") is down: each device on the first
// server of its order that is up.
func spreadCounts(ids, hosts []string, dead string) []int {
	counts := make([]int, len(hosts))
	for _, id := range ids {
		for _, i := range spread.Order(id, hosts) {
			if hosts[i] != dead {
				counts[i]++
				break
			}
		}
	}
	return counts
}

// waitSpread waits until every node but down says it holds as many
// devices as want (by node index), as `cluster members` shows them.
func waitSpread(t *testing.T, c *faultCluster, down, what string, want []int) {
	t.Helper()
	var last []string
	deadline := time.Now().Add(90 * time.Second)
	for {
		vs, err := c.views(down)
		got := make([]int, len(c.nodes))
		last = last[:0]
		if err == nil {
			for i, n := range c.nodes {
				for _, m := range vs[0].Members {
					if m.ID == n.id && m.ConnectedDevices != nil {
						got[i] = *m.ConnectedDevices
						last = append(last, fmt.Sprintf("%s %d", n.id, got[i]))
					}
				}
			}
		}
		if err == nil && slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: want %v devices by node, cluster members says %v (err %v)", what, want, last, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitApplied waits until n devices report the deployment applied.
func waitApplied(t *testing.T, cl *api.Client, deployment string, n int) {
	t.Helper()
	eventually(t, fmt.Sprintf("%d devices reporting %s", n, deployment), 60*time.Second, func() bool {
		st, err := cl.DeploymentStatus(context.Background(), deployment, api.StatusQuery{Limit: 1})
		return err == nil && st.Counts.Applied == n && st.Counts.Unknown == 0
	})
}
