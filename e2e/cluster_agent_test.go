//go:build e2e

package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
)

// TestCluster_AgentFailsOver is issue 7's fourth acceptance item: an
// agent connected to the node that dies (here the leader, the harder case)
// reconnects to another node and receives a deployment created after the
// failure.
func TestCluster_AgentFailsOver(t *testing.T) {
	nodes := startCluster(t, 3)
	var leader string
	eventually(t, "a leader known to all", 20*time.Second, func() bool {
		v := members(t, nodes[0].server)
		leader = v.Leader
		return leader != "" && len(v.Members) == 3
	})
	var victim *clusterNode
	var survivors []*clusterNode
	for _, n := range nodes {
		if n.id == leader {
			victim = n
		} else {
			survivors = append(survivors, n)
		}
	}
	// The agent knows every node and prefers the victim (a device id the
	// spread rule puts there).
	servers := []string{victim.mqttURL()}
	for _, n := range survivors {
		servers = append(servers, n.mqttURL())
	}
	r := cli(t, survivors[0].dataDir, "enrollment", "create", "line-1", "--tag", "environment=prod", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	json.Unmarshal([]byte(r.stdout), &enr)
	out := t.TempDir()
	dev := devicePreferring(t, servers, 0, "press")
	startAgent(t, "--server", strings.Join(servers, ","), "--ca-file", victim.caFile(),
		"--device-id", dev, "--enroll-token", enr.Token, "--data-dir", t.TempDir())

	v1 := processManifest(t, out, map[string]map[string]any{"alpha": module("running", "always", nil)})
	cli(t, victim.dataDir, "deployment", "create", "v1", "--content", v1, "--target-condition", "tags.environment='prod'", "--priority", "1").mustSucceed(t)
	eventually(t, "v1 applied and reported", 30*time.Second, func() bool {
		doc, _ := reported(t, survivors[0].dataDir, dev)
		return doc.DeploymentID == "v1" && doc.LastDesiredStatus.Code == 200
	})
	// It is the victim's broker that holds the device's session, and every
	// node says so (a node asks its peers at most once a second).
	for _, n := range nodes {
		eventually(t, dev+" read on "+n.id+" as connected to "+victim.id, 10*time.Second, func() bool {
			v := deviceView(t, n.server, dev)
			return v.ConnectionState == api.Connected && v.ConnectedNode == victim.id
		})
	}

	victim.kill()
	t.Logf("killed the leader %s, which held the agent's connection", victim.id)

	// A deployment created after the failure, on a survivor (forwarded to
	// whichever node leads now).
	v2 := processManifest(t, out, map[string]map[string]any{"beta": module("running", "always", nil)})
	eventually(t, "v2 created on a survivor", 30*time.Second, func() bool {
		r := cli(t, survivors[1].dataDir, "deployment", "create", "v2", "--content", v2,
			"--target-condition", "tags.environment='prod'", "--priority", "2")
		if r.code != 0 {
			t.Logf("create v2 on %s: %s", survivors[1].id, strings.TrimSpace(r.stderr))
		}
		return r.code == 0 || cli(t, survivors[1].dataDir, "deployment", "show", "v2").code == 0
	})
	waitAgentRuns(t, survivors[0].dataDir, dev, "v2", out, "beta")
	// Both survivors agree where the device is now.
	var connectedTo string
	eventually(t, "both survivors see "+dev+" connected to the same survivor", 10*time.Second, func() bool {
		a, b := deviceView(t, survivors[0].server, dev), deviceView(t, survivors[1].server, dev)
		connectedTo = a.ConnectedNode
		return a.ConnectionState == api.Connected && b.ConnectionState == api.Connected &&
			a.ConnectedNode == b.ConnectedNode && a.ConnectedNode != victim.id
	})
	t.Logf("the agent moved to %s and applied v2", connectedTo)
}

func deviceView(t *testing.T, s *server, id string) api.DeviceView {
	t.Helper()
	r := cli(t, s.dataDir, "device", "show", id, "-o", "json").mustSucceed(t)
	var v api.DeviceView
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("device show: %v\n%s", err, r.stdout)
	}
	return v
}

// waitAgentRuns waits until the agent whose process modules write their
// pid files to out runs module, and the node of dataDir has its report of
// deployment applied (200) with module running.
func waitAgentRuns(t *testing.T, dataDir, deviceID, deployment, out, module string) {
	t.Helper()
	eventually(t, "the agent runs "+deployment+"'s module "+module, 60*time.Second, func() bool {
		_, ok := alivePid(out, module)
		return ok
	})
	eventually(t, deployment+" reported by "+deviceID, 30*time.Second, func() bool {
		doc, _ := reported(t, dataDir, deviceID)
		return doc.DeploymentID == deployment && doc.LastDesiredStatus.Code == 200 &&
			doc.Modules[module].RuntimeStatus == fleet.RuntimeRunning
	})
}
