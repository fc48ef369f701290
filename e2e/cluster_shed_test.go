//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"appliance/api"
)

// TestCluster_CutOffNodeShedsDevices: a node cut off from the rest of its
// cluster turns its devices away, and they move to the majority. An agent
// connected to a follower keeps its session while the follower's raft
// links are cut (its broker is still reachable), until the follower has
// been without a leader for --shed-devices-after; then the agent is
// disconnected, reconnects to another node and applies a deployment
// created during the partition. The cut-off node refuses devices until
// the partition heals, then admits them again.
func TestCluster_CutOffNodeShedsDevices(t *testing.T) {
	c := startFaultCluster(t, "--shed-devices-after", "2s")
	leader := c.waitLeader(t, "")
	var cut *faultNode
	var majority []*faultNode
	for _, n := range c.nodes {
		if cut == nil && n.id != leader {
			cut = n
		} else {
			majority = append(majority, n)
		}
	}
	// The agent prefers the follower (a device id the spread rule puts
	// there), then the others.
	servers := []string{cut.srv.mqttURL()}
	for _, n := range majority {
		servers = append(servers, n.srv.mqttURL())
	}
	r := cli(t, majority[0].dataDir, "enrollment", "create", "line-1", "--tag", "environment=prod", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	if err := json.Unmarshal([]byte(r.stdout), &enr); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	dev := devicePreferring(t, servers, 0, "press")
	startAgent(t, "--server", strings.Join(servers, ","), "--ca-file", cut.srv.caFile(),
		"--device-id", dev, "--enroll-token", enr.Token, "--data-dir", t.TempDir())
	v1 := processManifest(t, out, map[string]map[string]any{"alpha": module("running", "always", nil)})
	cli(t, majority[0].dataDir, "deployment", "create", "v1", "--content", v1, "--target-condition", "tags.environment='prod'", "--priority", "1").mustSucceed(t)
	eventually(t, "v1 applied and reported", 30*time.Second, func() bool {
		doc, _ := reported(t, majority[0].dataDir, dev)
		return doc.DeploymentID == "v1" && doc.LastDesiredStatus.Code == 200
	})
	// (A node asks its peers for their sessions at most once a second.)
	eventually(t, dev+" connected to "+cut.id+" (the agent's preferred server)", 10*time.Second, func() bool {
		return deviceView(t, majority[0].srv, dev).ConnectedNode == cut.id
	})
	if refusing(t, cut.srv) {
		t.Fatalf("%s refuses devices while it has a leader", cut.id)
	}

	logMark := len(cut.srv.logs.String())
	others := c.net.isolate(cut.id)
	cutAt := time.Now()
	t.Logf("cut %s off from %s; the agent is connected to it", cut.id, strings.Join(others, " and "))
	eventually(t, dev+" connected to a node of the majority", 30*time.Second, func() bool {
		v := deviceView(t, majority[0].srv, dev)
		return v.ConnectionState == api.Connected && v.ConnectedNode != cut.id && v.ConnectedNode != ""
	})
	t.Logf("the agent moved to the majority %v after the cut", time.Since(cutAt).Round(100*time.Millisecond))
	// It moved because the cut-off node turned it away (its broker stayed
	// reachable, so nothing else would have moved it): the node says so
	// once, having disconnected the one device it held.
	if shed := logLines(cut.srv, logMark, "no cluster leader: turning devices away"); len(shed) != 1 || !strings.Contains(shed[0], "disconnected=1") {
		t.Fatalf("%s logged %q; want one line saying it turned away the device it held (disconnected=1)", cut.id, shed)
	}
	if !refusing(t, cut.srv) {
		t.Fatalf("%s, cut off, does not say it refuses devices", cut.id)
	}

	v2 := processManifest(t, out, map[string]map[string]any{"beta": module("running", "always", nil)})
	cli(t, majority[1].dataDir, "deployment", "create", "v2", "--content", v2, "--target-condition", "tags.environment='prod'", "--priority", "2").mustSucceed(t)
	waitAgentRuns(t, majority[0].dataDir, dev, "v2", out, "beta")

	c.net.healAll()
	eventually(t, cut.id+" admits devices again once it has a leader", 30*time.Second, func() bool {
		return !refusing(t, cut.srv)
	})
}

// refusing reads a node's appliance_mqtt_refusing_devices metric.
func refusing(t *testing.T, s *server) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	resp, err := s.httpClient().Do(req)
	if err != nil {
		t.Fatalf("metrics of %s: %v", s.dataDir, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "appliance_mqtt_refusing_devices "); ok {
			return strings.TrimSpace(v) == "1"
		}
	}
	t.Fatalf("metrics of %s: no appliance_mqtt_refusing_devices", s.dataDir)
	return false
}

// logLines returns the lines of a server's log, from byte offset since
// on, that contain substr.
func logLines(s *server, since int, substr string) []string {
	var out []string
	for _, line := range strings.Split(s.logs.String()[since:], "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return out
}
