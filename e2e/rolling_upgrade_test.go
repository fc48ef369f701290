//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"appliance/api"
	"appliance/raftstore"
)

// buildRelease builds the appliance binary of an earlier commit of this
// repository, from its git history (git archive, then go build with
// modules from the proxy), stamped with the commit as its version. When
// git, the history or the commit is not there (a shallow clone, a source
// tarball), the test is skipped with the reason, and fails when CI is set:
// CI must run it.
func buildRelease(t *testing.T, commit string) string {
	t.Helper()
	unavailable := func(format string, args ...any) {
		t.Helper()
		why := fmt.Sprintf(format, args...)
		if os.Getenv("CI") != "" {
			t.Fatalf("cannot build release %s to upgrade from: %s (CI is set: this test must run; clone with history, e.g. git fetch --unshallow)", commit, why)
		}
		t.Skipf("cannot build release %s to upgrade from: %s", commit, why)
	}
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		unavailable("not in a git work tree (%v)", err)
	}
	root := strings.TrimSpace(string(out))
	if err := exec.Command("git", "-C", root, "cat-file", "-e", commit+"^{commit}").Run(); err != nil {
		unavailable("commit %s is not in the clone's history (shallow clone?)", commit)
	}
	src := t.TempDir()
	archive := exec.Command("sh", "-c", `git -C "$1" archive --format=tar "$2" | tar -x -C "$3"`, "sh", root, commit, src)
	if b, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", commit, err, b)
	}
	bin := filepath.Join(t.TempDir(), "appliance-"+commit)
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+commit, "-o", bin, "./cmd/appliance")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	began := time.Now()
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build release %s: %v\n%s", commit, err, b)
	}
	t.Logf("built release %s in %s", commit, time.Since(began).Round(100*time.Millisecond))
	return bin
}

// binaryVersion is what a binary says its version is.
func binaryVersion(t *testing.T, bin string) string {
	t.Helper()
	out, err := exec.Command(bin, "version", "-o", "json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var v struct{ Version string }
	if err := json.Unmarshal(out, &v); err != nil || v.Version == "" {
		t.Fatalf("version of %s: %q, %v", bin, out, err)
	}
	return v.Version
}

// TestCluster_RollingUpgrade is issue 13's fifth acceptance item. A
// cluster of three nodes of the previous release (raftstore.LegacyRelease,
// built from this repository's history), with an agent of each release
// connected and the fault test's clients writing and reading, is upgraded
// one node at a time: each is stopped (SIGTERM) and started again on its
// data directory with the current build. Throughout:
//   - `cluster members` on an upgraded node shows the mixed versions;
//   - a feature that needs a command the previous release lacks
//     (enrollment rotate) is refused, with one line naming the nodes
//     behind, until the last node is upgraded, and then works;
//   - the agents of both releases keep applying deployments.
//
// Afterwards every acknowledged write is on every node, the state
// machines are identical at the same applied index, the history is
// linearizable (the fault test's checks), and no process, old or new,
// logged an entry it could not apply.
func TestCluster_RollingUpgrade(t *testing.T) {
	old := buildRelease(t, raftstore.LegacyRelease)
	newVersion := binaryVersion(t, binary)
	c := startFaultClusterOf(t, old)
	processes := []*server{}
	for _, n := range c.nodes {
		processes = append(processes, n.srv)
	}
	c.waitLeader(t, "")
	h, stop := c.startLoad(t)

	// An agent of each release, each knowing every node (the old one
	// starts on the first it is given, the new one on its preferred node:
	// the spread rule), running a deployment made on the old cluster.
	r := cli(t, c.nodes[0].dataDir, "enrollment", "create", "line-1", "--tag", "environment=prod", "-o", "json").mustSucceed(t)
	var enr struct{ Token string }
	if err := json.Unmarshal([]byte(r.stdout), &enr); err != nil {
		t.Fatal(err)
	}
	// The old agent enrolls with the group's token; the new one is given
	// its keys (this build's agents enroll with a key of their own, which
	// the previous release's controllers do not know).
	var dev struct {
		Authentication struct{ SymmetricKey struct{ PrimaryKey string } }
	}
	r = cli(t, c.nodes[0].dataDir, "device", "create", "agent-new", "--tag", "environment=prod", "-o", "json").mustSucceed(t)
	if err := json.Unmarshal([]byte(r.stdout), &dev); err != nil || dev.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("device create: %v\n%s", err, r.stdout)
	}
	agents := map[string][]string{
		"agent-old": {old, "--enroll-token", enr.Token},
		"agent-new": {binary, "--hub-addr", "127.0.0.1:0", "--device-key", dev.Authentication.SymmetricKey.PrimaryKey},
	}
	for i, id := range []string{"agent-old", "agent-new"} {
		var servers []string
		for j := range c.nodes {
			servers = append(servers, c.nodes[(i*2+j)%len(c.nodes)].srv.mqttURL())
		}
		startAgentOf(t, agents[id][0], append([]string{"--server", strings.Join(servers, ","), "--ca-file", c.nodes[0].srv.caFile(),
			"--device-id", id, "--data-dir", t.TempDir()}, agents[id][1:]...)...)
	}
	out := t.TempDir()
	deploy := func(name string, via *faultNode) {
		t.Helper()
		const condition = "tags.environment='prod'"
		m := processManifest(t, out, map[string]map[string]any{name + "-mod": module("running", "always", nil)})
		cli(t, via.dataDir, "deployment", "create", name, "--content", m, "--target-condition", condition, "--priority", "1").mustSucceed(t)
		h.created(name, via.id, 1, condition)
		for _, id := range []string{"agent-old", "agent-new"} {
			eventually(t, id+" runs "+name, 60*time.Second, func() bool {
				doc, _ := reported(t, via.dataDir, id)
				return doc.DeploymentID == name && doc.LastDesiredStatus.Code == 200 && doc.Modules[name+"-mod"].RuntimeStatus == "running"
			})
		}
	}
	deploy("before-upgrade", c.nodes[0])
	time.Sleep(2 * time.Second)
	for i, n := range c.nodes {
		h.fault("stopping %s (SIGTERM)", n.id)
		n.srv.stop()
		n.bin = binary
		n.args = append(n.args, faultWorkloadFlags...)
		c.restart(t, n.id)
		processes = append(processes, n.srv)
		h.fault("%s runs the current build", n.id)
		c.waitLeader(t, "")
		// Its raft log moved from the previous release's raft.db to log/
		// (raftstore's TestMigrateBoltLog checks every entry).
		for path, want := range map[string]bool{"raft/raft.db": false, "raft/raft.db.migrated": true, "raft/log": true} {
			if _, err := os.Stat(filepath.Join(n.dataDir, path)); (err == nil) != want {
				t.Errorf("%s after the upgrade: %s there: %v, want %v", n.id, path, err == nil, want)
			}
		}
		upgraded, behind := c.nodes[:i+1], c.nodes[i+1:]

		// cluster members, asked on an upgraded node, shows each node's
		// version: the previous release for those not upgraded yet.
		eventually(t, "cluster members shows "+n.id+" upgraded", 10*time.Second, func() bool {
			return membersShow(t, n.srv, newVersion, upgraded, behind) == ""
		})
		if table := cli(t, n.dataDir, "cluster", "members").mustSucceed(t); len(behind) > 0 &&
			(!strings.Contains(table.stdout, raftstore.LegacyRelease+" (or older)") || !strings.Contains(table.stderr, "different versions")) {
			t.Errorf("cluster members during the upgrade:\n%s%s", table.stdout, table.stderr)
		}

		if len(behind) > 0 {
			// The feature is refused through every upgraded node, naming
			// the nodes behind: "n3 runs db9fcc5 or older", or, when n3
			// did not answer in time (a loaded machine), "n3 did not say
			// what it runs" (the gate fails closed).
			for _, u := range upgraded {
				want := []string{"upgrade"}
				for _, b := range behind {
					want = append(want, b.id+" ")
				}
				r := cli(t, u.dataDir, "enrollment", "rotate", "line-1")
				r.mustFailWithOneLine(t, want...)
				if !strings.Contains(r.stderr, raftstore.LegacyRelease) && !strings.Contains(r.stderr, "did not say") {
					t.Errorf("the refusal does not say what the nodes behind run: %s", r.stderr)
				}
			}
			h.fault("enrollment rotate refused with %d node(s) behind", len(behind))
		}
		time.Sleep(3 * time.Second)
	}
	// Every node runs the current build: the feature works (within the
	// few seconds what a node said of itself is cached).
	var rotated result
	eventually(t, "enrollment rotate works once every node is upgraded", 15*time.Second, func() bool {
		rotated = cli(t, c.nodes[1].dataDir, "enrollment", "rotate", "line-1", "-o", "json")
		return rotated.code == 0
	})
	var rot struct{ Token string }
	if err := json.Unmarshal([]byte(rotated.stdout), &rot); err != nil || rot.Token == "" || rot.Token == enr.Token {
		t.Errorf("enrollment rotate printed %q (%v), want a new token", rotated.stdout, err)
	}
	h.fault("enrollment rotate applied")
	deploy("after-upgrade", c.nodes[2])
	time.Sleep(2 * time.Second)
	stop()
	c.checkHistory(t, h)

	for _, p := range processes {
		for _, bad := range []string{"cannot decode raft entry", "stopped applying the raft log", "panic:"} {
			if strings.Contains(p.logs.String(), bad) {
				t.Errorf("a node logged %q: it could not apply an entry:\n%s", bad, p.logs.String())
			}
		}
	}
}

// membersShow checks `cluster members -o json` on s: the upgraded nodes
// at version, the others of the previous release, every one up. It
// returns what differs ("" when nothing).
func membersShow(t *testing.T, s *server, version string, upgraded, behind []*faultNode) string {
	t.Helper()
	r := cli(t, s.dataDir, "cluster", "members", "-o", "json")
	var v api.ClusterView
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &v) != nil {
		return fmt.Sprintf("cluster members: %s %s", r.stdout, r.stderr)
	}
	byID := map[string]api.ClusterMember{}
	for _, m := range v.Members {
		byID[m.ID] = m
	}
	var diffs []string
	for _, n := range upgraded {
		if m := byID[n.id]; m.Version != version || m.Legacy || m.Status != api.MemberUp {
			diffs = append(diffs, fmt.Sprintf("%s: %+v, want version %s", n.id, m, version))
		}
	}
	for _, n := range behind {
		if m := byID[n.id]; m.Version != raftstore.LegacyRelease || !m.Legacy || m.Status != api.MemberUp {
			diffs = append(diffs, fmt.Sprintf("%s: %+v, want the previous release", n.id, m))
		}
	}
	return strings.Join(diffs, "; ")
}
