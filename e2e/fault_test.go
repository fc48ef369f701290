//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testutil"
)

// The shape of the fault-injection run. The load runs for about 50 s
// around three faults; with the cluster's start and the checks the test
// takes about a minute.
const (
	faultClients = 6
	// faultKeys devices are the registers of the linearizability check.
	faultKeys = 4
	// faultOpTimeout bounds one client call; a write cut off by it has an
	// unknown outcome.
	faultOpTimeout = 6 * time.Second
	// faultSettle is how long the load runs between faults.
	faultSettle = 7 * time.Second
	// faultPartition is how long a partition lasts.
	faultPartition = 8 * time.Second
)

// faultManifest is the content of every deployment the clients create: a
// valid manifest with no secrets, so what a node returns is what it stores.
var faultManifest = json.RawMessage(`{"modulesContent":{
 "$edgeAgent":{"properties.desired":{"schemaVersion":"1.1",
   "runtime":{"type":"docker","settings":{}},
   "systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"agent:1"}},
     "edgeHub":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"hub:1"}}},
   "modules":{"fault":{"type":"docker","status":"running","restartPolicy":"always","settings":{"image":"fault:1"}}}}},
 "$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{}}}}}`)

// TestCluster_FaultInjection is issue 7's second acceptance item. Three
// processes of the built binary, their raft and cluster traffic routed
// through proxies the test can cut (faultproxy_test.go), take writes of
// device tags and deployments and consistent reads on random nodes while
// the test SIGKILLs the leader and restarts it, isolates the leader, then a
// follower. Afterwards, faults healed and the clients stopped:
//   - every node holds the same devices and deployments;
//   - every acknowledged deployment exists everywhere, and none exists
//     that no client tried to create;
//   - the history of tag writes and consistent reads, with the final
//     state of every node read as the last reads, is linearizable
//     (porcupine, one register per device): an acknowledged write that was
//     lost, or a consistent read that returned a stale value, fails it.
//
// A write whose outcome the client cannot know (5xx, timeout, broken
// connection) counts as possibly applied; one refused with a 4xx or whose
// connection was refused was certainly not.
func TestCluster_FaultInjection(t *testing.T) {
	c := startFaultCluster(t)
	leader := c.waitLeader(t, "")
	t.Logf("cluster up, leader %s", leader)

	h, stop := c.startLoad(t)

	// The faults, one after the other, with load between them.
	time.Sleep(faultSettle)
	leader = c.waitLeader(t, "")
	c.kill(leader)
	h.fault("SIGKILL the leader %s", leader)
	h.fault("%s elected by the survivors", c.waitLeader(t, leader))
	time.Sleep(faultSettle)
	h.fault("restarting %s on its data directory and addresses", leader)
	c.restart(t, leader)
	h.fault("%s is ready again", leader)

	time.Sleep(faultSettle)
	leader = c.waitLeader(t, "")
	others := c.net.isolate(leader)
	h.fault("isolate the leader %s from %s", leader, strings.Join(others, " and "))
	time.Sleep(faultPartition)
	c.net.healAll()
	h.fault("heal: every link restored")

	time.Sleep(faultSettle)
	leader = c.waitLeader(t, "")
	follower := c.nodes[rand.IntN(len(c.nodes))].id
	for follower == leader {
		follower = c.nodes[rand.IntN(len(c.nodes))].id
	}
	others = c.net.isolate(follower)
	h.fault("isolate the follower %s from %s (leader %s)", follower, strings.Join(others, " and "), leader)
	time.Sleep(faultPartition)
	c.net.healAll()
	h.fault("heal: every link restored")

	time.Sleep(faultSettle)
	stop()
	c.checkHistory(t, h)
}

// startLoad creates the registers (devices that exist before the history
// starts, with tag v = 0, the model's initial state) and starts the
// clients on random nodes. stop stops them and waits; it also runs when
// the test ends early (before the nodes are killed).
func (c *faultCluster) startLoad(t *testing.T) (h *faultHistory, stop func()) {
	t.Helper()
	ctx := context.Background()
	for k := range faultKeys {
		id := faultKey(k)
		eventually(t, "create "+id, 30*time.Second, func() bool {
			_, err := c.client(0).PutDevice(ctx, id, api.DeviceRequest{Tags: map[string]any{"group": "fault", "v": 0}}, api.WriteOptions{})
			return err == nil
		})
	}
	h = newFaultHistory()
	// A test stopped by a fault the cluster did not survive still says
	// what happened up to then (after the clients have stopped: cleanups
	// run last registered first).
	t.Cleanup(func() {
		h.mu.Lock()
		done := h.summarized
		h.mu.Unlock()
		if !done {
			h.logSummary(t, c.net.stats())
		}
	})
	load, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var seq atomic.Int64
	for i := range faultClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.runClient(load, i, c, &seq)
		}()
	}
	stop = func() { cancel(); wg.Wait() }
	t.Cleanup(stop)
	return h, stop
}

// checkHistory, once the clients have stopped, checks what they saw and
// every node's state: no answer a node must not give, every node's state
// the same, every acknowledged deployment there, and the register history
// linearizable.
func (c *faultCluster) checkHistory(t *testing.T, h *faultHistory) {
	t.Helper()
	h.fault("clients stopped")
	h.logSummary(t, c.net.stats())

	// Every client call that a node certainly refused with a 4xx is a bug:
	// the devices exist and every deployment id is new. A 409 on a new
	// deployment means a write was applied twice.
	for _, u := range h.unexpected {
		t.Errorf("unexpected answer: %s", u)
	}

	states := c.converge(t)
	checkSameState(t, c, states)
	checkDeployments(t, c, h, states)
	checkLinearizable(t, c, h, states)
}

func faultKey(k int) string { return fmt.Sprintf("fi-reg-%d", k) }

// faultNode is one controller of the fault-injection cluster.
type faultNode struct {
	id      string
	dataDir string
	// args are its serve flags, the same at every start: a restart keeps
	// the data directory and every address.
	args []string
	// bin is the binary it runs.
	bin string
	srv *server
}

// faultCluster is three nodes behind a faultNet.
type faultCluster struct {
	net   *faultNet
	nodes []*faultNode
	http  *http.Client

	mu      sync.Mutex
	clients []*api.Client // by node index; replaced by a restart
}

// startFaultCluster starts n1 (bootstrap), n2 and n3 (joining n1 with its
// token). Node i's cluster port binds 127.0.0.i, so its outgoing
// connections come from there and the proxies can tell the nodes apart;
// each node advertises its proxy. The API and the broker listen directly,
// on ports fixed for the test so that a restart keeps them. extra are
// more serve flags for every node.
func startFaultCluster(t *testing.T, extra ...string) *faultCluster {
	t.Helper()
	return startFaultClusterOf(t, binary, append(append([]string(nil), faultWorkloadFlags...), extra...)...)
}

// faultWorkloadFlags are serve flags of this build that the workload
// needs: every deployment it creates targets every register device, a few
// a second, and the default limit of deployments per device (50) would
// refuse them after seconds. The limit itself is tested in node/
// (TestLayers_WritesAndLimits, TestLimits_LoweredLimitKeepsDevicesEditable).
var faultWorkloadFlags = []string{"--max-deployments-per-device", "100000"}

// startFaultClusterOf is startFaultCluster with every node running the
// binary bin (another release; restart keeps it, upgrade replaces it).
func startFaultClusterOf(t *testing.T, bin string, extra ...string) *faultCluster {
	t.Helper()
	// The ports are fixed, outside the range the proxies' ":0" draws from
	// (testutil.FreeAddr).
	var specs []faultNetNode
	var apiAddrs, mqttAddrs []string
	for i := range 3 {
		ip := fmt.Sprintf("127.0.0.%d", i+1)
		specs = append(specs, faultNetNode{id: fmt.Sprintf("n%d", i+1), ip: ip, target: testutil.FreeAddr(t, ip)})
		apiAddrs = append(apiAddrs, testutil.FreeAddr(t, "127.0.0.1"))
		mqttAddrs = append(mqttAddrs, testutil.FreeAddr(t, "127.0.0.1"))
	}
	c := &faultCluster{net: newFaultNet(t, specs)}
	for i, s := range specs {
		n := &faultNode{id: s.id, dataDir: t.TempDir(), bin: bin}
		n.args = []string{"--node-id", s.id, "--raft-addr", s.target, "--raft-advertise", c.net.addr(s.id),
			"--http-addr", apiAddrs[i], "--mqtt-addr", mqttAddrs[i]}
		n.args = append(n.args, extra...)
		if i > 0 {
			n.args = append(n.args, "--join", "https://"+c.net.addr("n1"), "--join-token", joinToken(t, c.nodes[0].dataDir))
		}
		n.srv = startServerOf(t, n.bin, n.dataDir, n.args...)
		if i == 0 {
			c.http = apiHTTPClient(t, n.dataDir)
		}
		c.nodes = append(c.nodes, n)
		c.clients = append(c.clients, c.newClient(n.srv))
	}
	return c
}

// apiHTTPClient is the clients' HTTP client, shared so that connections
// are reused. It trusts the cluster CA of the node in dataDir when the API
// serves TLS (the CA is the same on every node).
func apiHTTPClient(t *testing.T, dataDir string) *http.Client {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: 2 * faultClients, IdleConnTimeout: 30 * time.Second}
	if pem, err := os.ReadFile(filepath.Join(dataDir, "tls", "ca.crt")); err == nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			t.Fatalf("no certificate in %s/tls/ca.crt", dataDir)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	return &http.Client{Timeout: faultOpTimeout + 2*time.Second, Transport: tr}
}

func (c *faultCluster) newClient(s *server) *api.Client {
	return &api.Client{BaseURL: s.url, Token: s.token, HTTP: c.http}
}

func (c *faultCluster) client(i int) *api.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.clients[i]
}

func (c *faultCluster) node(id string) (int, *faultNode) {
	for i, n := range c.nodes {
		if n.id == id {
			return i, n
		}
	}
	panic("no node " + id)
}

func (c *faultCluster) kill(id string) {
	_, n := c.node(id)
	n.srv.kill()
}

// restart starts a killed node again with the same flags and waits until
// it knows a leader.
func (c *faultCluster) restart(t *testing.T, id string) {
	t.Helper()
	i, n := c.node(id)
	n.srv = startServerOf(t, n.bin, n.dataDir, n.args...)
	c.mu.Lock()
	c.clients[i] = c.newClient(n.srv)
	c.mu.Unlock()
}

// views asks every node but skip how it sees the cluster.
func (c *faultCluster) views(skip string) ([]api.ClusterView, error) {
	ids := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		ids[i] = n.id
	}
	return clusterViews(ids, skip, c.client)
}

// clusterViews asks each node (ids, with client(i) for the i-th) but skip
// how it sees the cluster.
func clusterViews(ids []string, skip string, client func(i int) *api.Client) ([]api.ClusterView, error) {
	var out []api.ClusterView
	for i, id := range ids {
		if id == skip {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		v, err := client(i).Cluster(ctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// waitLeader waits until every node but down (a node killed, or "") names
// the same leader, one of them, and that node says it leads. A cluster
// that never gets there has not recovered from the last fault: the bound
// is far above the second or so an election takes.
func (c *faultCluster) waitLeader(t *testing.T, down string) string {
	t.Helper()
	var last any
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		vs, err := c.views(down)
		if err == nil && agreeOnLeader(vs) {
			return vs[0].Leader
		}
		last = vs
		if err != nil {
			last = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	what := "the three nodes"
	if down != "" {
		what = "the nodes left after " + down + " was killed"
	}
	t.Fatalf("%s did not agree on a leader among them within 30 s; last views: %+v", what, last)
	return ""
}

// agreeOnLeader: the views name one leader, whose own view is among them
// and says it leads, and three voting members.
func agreeOnLeader(vs []api.ClusterView) bool {
	leader := vs[0].Leader
	if leader == "" {
		return false
	}
	found := false
	for _, v := range vs {
		if v.Leader != leader || len(v.Members) != 3 {
			return false
		}
		for _, m := range v.Members {
			if !m.Voter {
				return false
			}
		}
		if v.Self == leader {
			found = v.State == "Leader"
		}
	}
	return found
}

// faultState is one node's replicated state, read locally.
type faultState struct {
	node        string
	applied     uint64
	devices     map[string]api.DeviceView
	deployments map[string]api.DeploymentView
}

// converge waits, faults healed and clients stopped, until every node has
// applied everything the leader has (a consistent read on each), and then
// reads every node's state locally, retrying until the three applied
// indexes are equal and did not move while the states were read.
func (c *faultCluster) converge(t *testing.T) []faultState {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		states, why := c.tryConverged()
		if why == "" {
			return states
		}
		last = why
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("the cluster did not converge within 60 s of the last fault healing: %s", last)
	return nil
}

func (c *faultCluster) tryConverged() ([]faultState, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range c.nodes {
		if _, err := c.client(i).Device(ctx, faultKey(0), true); err != nil {
			return nil, fmt.Sprintf("consistent read on %s: %v", c.nodes[i].id, err)
		}
	}
	before, err := c.views("")
	if err != nil {
		return nil, err.Error()
	}
	if !agreeOnLeader(before) {
		return nil, fmt.Sprintf("no agreed leader: %+v", before)
	}
	for _, v := range before[1:] {
		if v.AppliedIndex != before[0].AppliedIndex {
			return nil, fmt.Sprintf("applied indexes differ: %+v", before)
		}
	}
	var states []faultState
	for i, n := range c.nodes {
		s, err := readState(ctx, c.client(i))
		if err != nil {
			return nil, fmt.Sprintf("read the state of %s: %v", n.id, err)
		}
		s.node, s.applied = n.id, before[i].AppliedIndex
		states = append(states, s)
	}
	after, err := c.views("")
	if err != nil {
		return nil, err.Error()
	}
	for i := range after {
		if after[i].AppliedIndex != before[i].AppliedIndex {
			return nil, fmt.Sprintf("applied indexes moved while reading: %+v then %+v", before, after)
		}
	}
	return states, ""
}

// readState pages through a node's devices and deployments, locally.
func readState(ctx context.Context, cl *api.Client) (faultState, error) {
	s := faultState{devices: map[string]api.DeviceView{}, deployments: map[string]api.DeploymentView{}}
	after := ""
	for {
		p, err := cl.Devices(ctx, api.DeviceQuery{After: after, Limit: api.MaxPageSize})
		if err != nil {
			return s, err
		}
		for _, d := range p.Items {
			s.devices[d.ID] = d
		}
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	after = ""
	for {
		p, err := cl.Deployments(ctx, api.DeploymentQuery{After: after, Limit: api.MaxPageSize})
		if err != nil {
			return s, err
		}
		for _, d := range p.Items {
			s.deployments[d.ID] = d
		}
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	return s, nil
}

// replicated is the part of a device view every node must agree on: the
// connection to this node, its last activity there and the desired
// version (counted from the index this node loaded its state at) are the
// node's own.
func replicated(d api.DeviceView) api.DeviceView {
	d.ConnectionState, d.ConnectedNode, d.LastActivityTime, d.DesiredVersion = "", "", nil, 0
	return d
}

// checkSameState compares every node's devices and deployments with n1's.
func checkSameState(t *testing.T, c *faultCluster, states []faultState) {
	t.Helper()
	ref := states[0]
	t.Logf("converged at applied index %d: %d devices, %d deployments", ref.applied, len(ref.devices), len(ref.deployments))
	for _, s := range states[1:] {
		var diffs []string
		for id, d := range ref.devices {
			o, ok := s.devices[id]
			if !ok {
				diffs = append(diffs, "device "+id+" missing")
			} else if a, b := jsonOf(replicated(d)), jsonOf(replicated(o)); a != b {
				diffs = append(diffs, fmt.Sprintf("device %s:\n  %s: %s\n  %s: %s", id, ref.node, a, s.node, b))
			}
		}
		for id := range s.devices {
			if _, ok := ref.devices[id]; !ok {
				diffs = append(diffs, "extra device "+id)
			}
		}
		for id, d := range ref.deployments {
			o, ok := s.deployments[id]
			if !ok {
				diffs = append(diffs, "deployment "+id+" missing")
			} else if a, b := jsonOf(d), jsonOf(o); a != b {
				diffs = append(diffs, fmt.Sprintf("deployment %s:\n  %s: %s\n  %s: %s", id, ref.node, a, s.node, b))
			}
		}
		for id := range s.deployments {
			if _, ok := ref.deployments[id]; !ok {
				diffs = append(diffs, "extra deployment "+id)
			}
		}
		if len(diffs) > 0 {
			sort.Strings(diffs)
			t.Errorf("the state machines of %s and %s differ at the same applied index %d (%d differences; first ones):\n%s",
				ref.node, s.node, ref.applied, len(diffs), strings.Join(diffs[:min(len(diffs), 10)], "\n"))
		}
	}
}

func jsonOf(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// checkDeployments: every acknowledged create is on every node as it was
// asked for; every deployment there was tried.
func checkDeployments(t *testing.T, c *faultCluster, h *faultHistory, states []faultState) {
	t.Helper()
	for _, s := range states {
		missing, stray := 0, 0
		for id, a := range h.deps {
			d, ok := s.deployments[id]
			switch {
			case a.outcome == outcomeAcked && !ok:
				missing++
				if missing <= 5 {
					t.Errorf("acknowledged deployment %s (acknowledged through %s) is missing on %s", id, a.via, s.node)
				}
			case ok && (d.Priority != a.priority || d.TargetCondition != a.condition):
				t.Errorf("deployment %s on %s has priority %d, condition %q; created with %d, %q", id, s.node, d.Priority, d.TargetCondition, a.priority, a.condition)
			}
		}
		for id := range s.deployments {
			if a, ok := h.deps[id]; !ok || !a.outcome.possiblyApplied() {
				stray++
				if stray <= 5 {
					t.Errorf("deployment %s exists on %s but no client's create of it can have been applied (%+v)", id, s.node, a)
				}
			}
		}
		if missing > 5 || stray > 5 {
			t.Errorf("%s: %d acknowledged deployments missing, %d never applied present", s.node, missing, stray)
		}
	}
}

// regOp is the input of one register operation: a write of Value to the
// device Key's tag v, or a consistent read of it.
type regOp struct {
	Key   string
	Write bool
	Value int
}

// regAbsent is what a read that found no device (or no tag v) returns:
// never a state of the register, so such a read always fails the check.
const regAbsent = -1

var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(regOp).Key
			byKey[k] = append(byKey[k], op)
		}
		keys := make([]string, 0, len(byKey))
		for k := range byKey {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		out := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return 0 },
	Step: func(state, input, output any) (bool, any) {
		in := input.(regOp)
		if in.Write {
			return true, in.Value
		}
		return output.(int) == state.(int), state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(regOp)
		if in.Write {
			if output == nil {
				return fmt.Sprintf("%s := %d (outcome unknown)", in.Key, in.Value)
			}
			return fmt.Sprintf("%s := %d", in.Key, in.Value)
		}
		return fmt.Sprintf("%s -> %d", in.Key, output.(int))
	},
	DescribeState: func(state any) string { return fmt.Sprint(state) },
	DescribeOperationMetadata: func(info any) string {
		if info == nil {
			return ""
		}
		return fmt.Sprint(info)
	},
}

// checkLinearizable adds every node's final value of each register to the
// history, as reads after everything else, and checks it.
func checkLinearizable(t *testing.T, c *faultCluster, h *faultHistory, states []faultState) {
	t.Helper()
	ops := h.operations()
	end := h.now()
	for i, s := range states {
		for k := range faultKeys {
			key := faultKey(k)
			v := regAbsent
			if d, ok := s.devices[key]; ok {
				v = tagValue(d.Tags)
			}
			ops = append(ops, porcupine.Operation{
				ClientId: faultClients + i, Input: regOp{Key: key}, Output: v,
				Call: end, Return: end + 1, Metadata: "final local read on " + s.node,
			})
		}
	}
	reads, writes, unknown := 0, 0, 0
	for _, op := range ops {
		switch in := op.Input.(regOp); {
		case !in.Write:
			reads++
		case op.Return == math.MaxInt64:
			unknown++
		default:
			writes++
		}
	}
	began := time.Now()
	res, info := porcupine.CheckOperationsVerbose(registerModel, ops, 2*time.Minute)
	t.Logf("linearizability of %d operations on %d registers (%d reads, %d acknowledged writes, %d writes of unknown outcome): %s in %s",
		len(ops), faultKeys, reads, writes, unknown, res, time.Since(began).Round(time.Millisecond))
	if res == porcupine.Ok {
		return
	}
	info.AddAnnotations(h.annotations())
	path := visualizePath(t)
	if err := porcupine.VisualizePath(registerModel, info, path); err != nil {
		t.Errorf("write the visualization: %v", err)
	} else {
		t.Logf("porcupine's visualization of the history: %s", path)
	}
	if res == porcupine.Illegal {
		t.Errorf("the history of tag writes and consistent reads is not linearizable: an acknowledged write was lost or a read was stale\n%s",
			explainViolation(info, ops))
	} else {
		t.Errorf("the linearizability checker did not finish in 2 minutes (%s): no verdict", res)
	}
}

// explainViolation says, for each register without a linearization, where
// the longest partial linearization stops: the earliest operation it could
// not place, and the operations around that one (times on the history
// clock; "-" for a write of unknown outcome, which never returned).
func explainViolation(info porcupine.LinearizationInfo, ops []porcupine.Operation) string {
	type opKey struct {
		client int
		call   int64
	}
	at := func(ns int64) string {
		if ns == math.MaxInt64 {
			return "-"
		}
		return fmt.Sprintf("%.6fs", time.Duration(ns).Seconds())
	}
	describe := func(op porcupine.Operation) string {
		return fmt.Sprintf("[%s, %s] client %d: %s (%v)", at(op.Call), at(op.Return), op.ClientId,
			registerModel.DescribeOperation(op.Input, op.Output), op.Metadata)
	}
	var b strings.Builder
	partials := info.PartialLinearizationsOperations()
	for pi, part := range registerModel.Partition(ops) {
		if pi >= len(partials) {
			break
		}
		var longest []porcupine.Operation
		for _, l := range partials[pi] {
			if len(l) > len(longest) {
				longest = l
			}
		}
		if len(longest) == len(part) {
			continue
		}
		placed := map[opKey]bool{}
		state := registerModel.Init()
		for _, op := range longest {
			placed[opKey{op.ClientId, op.Call}] = true
			_, state = registerModel.Step(state, op.Input, op.Output)
		}
		sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
		var first porcupine.Operation
		for _, op := range part {
			if !placed[opKey{op.ClientId, op.Call}] {
				first = op
				break
			}
		}
		fmt.Fprintf(&b, "register %s: linearizable up to %d of %d operations, the value then %v; the earliest operation left out:\n  %s\noperations within 100 ms of it:\n",
			first.Input.(regOp).Key, len(longest), len(part), state, describe(first))
		window := int64(100 * time.Millisecond)
		for _, op := range part {
			if op.Call <= first.Call+window && op.Return >= first.Call-window {
				fmt.Fprintf(&b, "  %s\n", describe(op))
			}
		}
	}
	return b.String()
}

func visualizePath(t *testing.T) string {
	dir := t.TempDir()
	if err := os.MkdirAll(artifactsDir, 0o755); err == nil {
		if abs, err := filepath.Abs(artifactsDir); err == nil {
			dir = abs
		}
	}
	return filepath.Join(dir, fmt.Sprintf("fault-injection-%s.html", time.Now().Format("20060102-150405")))
}

// tagValue is a device's tag v, or regAbsent.
func tagValue(tags map[string]any) int {
	switch v := tags["v"].(type) {
	case float64:
		return int(v)
	case json.Number:
		n, err := v.Int64()
		if err == nil {
			return int(n)
		}
	}
	return regAbsent
}

// outcome is what a client knows about a write.
type outcome int

const (
	outcomeAcked    outcome = iota + 1
	outcomeUnknown          // a 5xx, a timeout, a broken connection: possibly applied
	outcomeRefused          // the connection was refused: nothing was sent
	outcomeRejected         // a 4xx: the node refused it
)

func (o outcome) possiblyApplied() bool { return o == outcomeAcked || o == outcomeUnknown }

func (o outcome) String() string {
	return map[outcome]string{outcomeAcked: "acknowledged", outcomeUnknown: "unknown", outcomeRefused: "refused", outcomeRejected: "rejected"}[o]
}

func classify(err error) outcome {
	var ae *api.Error
	switch {
	case err == nil:
		return outcomeAcked
	case errors.As(err, &ae) && ae.StatusCode >= 400 && ae.StatusCode < 500:
		return outcomeRejected
	case errors.Is(err, syscall.ECONNREFUSED):
		return outcomeRefused
	}
	return outcomeUnknown
}

// errClass names an error for the summary.
func errClass(err error) string {
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return fmt.Sprintf("HTTP %d", ae.StatusCode)
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, context.DeadlineExceeded), strings.Contains(err.Error(), "Client.Timeout"):
		return "timeout"
	}
	return "transport error"
}

// depAttempt is one deployment create and what came of it.
type depAttempt struct {
	via       string
	priority  int64
	condition string
	outcome   outcome
	acked     int64 // when acknowledged (history clock)
}

// opCounts counts one kind of operation's outcomes.
type opCounts struct {
	acked, unknown, failed int
	errors                 map[string]int // by errClass
}

// faultHistory records what the clients did and the faults, on one clock.
type faultHistory struct {
	start time.Time

	mu         sync.Mutex
	ops        []porcupine.Operation
	deps       map[string]depAttempt
	ackedDeps  []string // in acknowledgement order
	counts     map[string]*opCounts
	faults     []faultEvent
	unexpected []string
	summarized bool
}

type faultEvent struct {
	at   time.Duration
	what string
}

func newFaultHistory() *faultHistory {
	return &faultHistory{start: time.Now(), deps: map[string]depAttempt{}, counts: map[string]*opCounts{}}
}

// now is the history clock: monotonic nanoseconds since the start.
func (h *faultHistory) now() int64 { return int64(time.Since(h.start)) }

func (h *faultHistory) fault(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.faults = append(h.faults, faultEvent{at: time.Since(h.start), what: fmt.Sprintf(format, args...)})
}

func (h *faultHistory) count(kind string, o outcome, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.counts[kind]
	if c == nil {
		c = &opCounts{errors: map[string]int{}}
		h.counts[kind] = c
	}
	switch o {
	case outcomeAcked:
		c.acked++
	case outcomeUnknown:
		c.unknown++
	default:
		c.failed++
	}
	if err != nil {
		c.errors[errClass(err)]++
	}
}

func (h *faultHistory) add(op porcupine.Operation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ops = append(h.ops, op)
}

// created records a deployment a test made outside the clients (through
// node via, acknowledged), so that the checks expect it.
func (h *faultHistory) created(id, via string, priority int64, condition string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.deps[id] = depAttempt{via: via, priority: priority, condition: condition, outcome: outcomeAcked, acked: h.now()}
}

func (h *faultHistory) unexpectedf(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.unexpected = append(h.unexpected, fmt.Sprintf(format, args...))
}

func (h *faultHistory) operations() []porcupine.Operation {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]porcupine.Operation(nil), h.ops...)
}

// runClient issues operations on random nodes until ctx ends: consistent
// reads and tag writes of the registers, deployment creates, and
// consistent reads of deployments already acknowledged.
func (h *faultHistory) runClient(ctx context.Context, id int, c *faultCluster, seq *atomic.Int64) {
	rng := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	for n := 0; ctx.Err() == nil; n++ {
		i := rng.IntN(len(c.nodes))
		node, cl := c.nodes[i].id, c.client(i)
		// Not derived from ctx: stopping the load lets calls in flight end.
		octx, cancel := context.WithTimeout(context.Background(), faultOpTimeout)
		switch r := rng.IntN(100); {
		case r < 40:
			h.readRegister(octx, id, node, cl, faultKey(rng.IntN(faultKeys)))
		case r < 75:
			h.writeRegister(octx, id, node, cl, faultKey(rng.IntN(faultKeys)), int(seq.Add(1)))
		case r < 90:
			h.createDeployment(octx, node, cl, fmt.Sprintf("fi-dep-%d-%d", id, n), rng.Int64N(100))
		default:
			h.readDeployment(octx, node, cl, rng)
		}
		cancel()
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(5+rng.IntN(20)) * time.Millisecond):
		}
	}
}

func (h *faultHistory) readRegister(ctx context.Context, client int, node string, cl *api.Client, key string) {
	call := h.now()
	d, err := cl.Device(ctx, key, true)
	ret := h.now()
	v := regAbsent
	switch {
	case err == nil:
		v = tagValue(d.Tags)
	case errors.Is(err, fleet.ErrNotFound):
		// The device exists from before the history: not finding it is a
		// stale read, which the checker will refuse.
		h.unexpectedf("consistent read of %s on %s: %v", key, node, err)
	default:
		h.count("consistent read (tags)", outcomeRefused, err)
		return // a failed read says nothing
	}
	h.count("consistent read (tags)", outcomeAcked, nil)
	h.add(porcupine.Operation{ClientId: client, Input: regOp{Key: key}, Output: v, Call: call, Return: ret, Metadata: "consistent read on " + node})
}

func (h *faultHistory) writeRegister(ctx context.Context, client int, node string, cl *api.Client, key string, value int) {
	call := h.now()
	_, err := cl.PatchDevice(ctx, key, api.DevicePatch{Tags: map[string]any{"v": value}}, api.WriteOptions{})
	ret := h.now()
	o := classify(err)
	h.count("tag write", o, err)
	op := porcupine.Operation{ClientId: client, Input: regOp{Key: key, Write: true, Value: value}, Call: call, Metadata: "written through " + node}
	switch o {
	case outcomeAcked:
		op.Output, op.Return = value, ret
	case outcomeUnknown:
		// Possibly applied, at any time from now on.
		op.Return = math.MaxInt64
		op.Metadata = fmt.Sprintf("written through %s: %v", node, err)
	case outcomeRejected:
		h.unexpectedf("tag write %s := %d through %s: %v", key, value, node, err)
		return
	default:
		return
	}
	h.add(op)
}

func (h *faultHistory) createDeployment(ctx context.Context, node string, cl *api.Client, id string, priority int64) {
	const condition = "tags.group='fault'"
	// Recorded before the call: once sent, it may exist.
	h.mu.Lock()
	h.deps[id] = depAttempt{via: node, priority: priority, condition: condition, outcome: outcomeUnknown}
	h.mu.Unlock()
	_, err := cl.PutDeployment(ctx, id, api.DeploymentRequest{
		Content: faultManifest, TargetCondition: condition, Priority: priority, Labels: map[string]string{"test": "fault"},
	}, api.WriteOptions{IfNoneMatch: "*"})
	ret := h.now()
	o := classify(err)
	h.count("deployment create", o, err)
	if o == outcomeRejected {
		h.unexpectedf("create of the new deployment %s through %s: %v", id, node, err)
	}
	h.mu.Lock()
	a := h.deps[id]
	a.outcome, a.acked = o, ret
	h.deps[id] = a
	if o == outcomeAcked {
		h.ackedDeps = append(h.ackedDeps, id)
	}
	h.mu.Unlock()
}

// readDeployment reads, consistently, a deployment acknowledged before the
// read began: it must be there.
func (h *faultHistory) readDeployment(ctx context.Context, node string, cl *api.Client, rng *rand.Rand) {
	h.mu.Lock()
	if len(h.ackedDeps) == 0 {
		h.mu.Unlock()
		return
	}
	id := h.ackedDeps[rng.IntN(len(h.ackedDeps))]
	acked := h.deps[id].acked
	h.mu.Unlock()
	call := h.now()
	_, err := cl.Deployment(ctx, id, true)
	switch {
	case err == nil:
		h.count("consistent read (deployments)", outcomeAcked, nil)
	case errors.Is(err, fleet.ErrNotFound):
		h.count("consistent read (deployments)", outcomeAcked, nil)
		h.unexpectedf("stale consistent read: deployment %s, acknowledged at %s, not found on %s at %s",
			id, time.Duration(acked), node, time.Duration(call))
	default:
		h.count("consistent read (deployments)", outcomeRefused, err)
	}
}

// annotations mark the faults on porcupine's visualization.
func (h *faultHistory) annotations() []porcupine.Annotation {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []porcupine.Annotation
	for _, f := range h.faults {
		out = append(out, porcupine.Annotation{Tag: "faults", Start: int64(f.at), End: int64(f.at), Description: f.what})
	}
	return out
}

func (h *faultHistory) logSummary(t *testing.T, proxies map[string]proxyStats) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.summarized = true
	var b strings.Builder
	b.WriteString("faults:\n")
	for _, f := range h.faults {
		fmt.Fprintf(&b, "  %8s  %s\n", f.at.Round(time.Millisecond), f.what)
	}
	b.WriteString("operations (failed: certainly not applied, or a read that answered nothing):\n")
	kinds := make([]string, 0, len(h.counts))
	for k := range h.counts {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		c := h.counts[k]
		fmt.Fprintf(&b, "  %-30s acknowledged %5d  unknown %4d  failed %4d", k, c.acked, c.unknown, c.failed)
		if len(c.errors) > 0 {
			fmt.Fprintf(&b, "  errors %v", c.errors)
		}
		b.WriteString("\n")
	}
	ids := make([]string, 0, len(proxies))
	for id := range proxies {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	b.WriteString("proxies (connections accepted / refused / severed):\n")
	for _, id := range ids {
		s := proxies[id]
		fmt.Fprintf(&b, "  to %s: %d / %d / %d\n", id, s.accepted, s.refused, s.severed)
	}
	t.Logf("fault injection summary\n%s", b.String())
}
