//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testenv"
)

// The Docker cluster test drives the machine's Docker Engine. There is no
// image registry and no internet: the image is built FROM scratch, through
// the Engine API, from a static build of the binary and the static test
// module. Everything the test creates carries dockerLabelRun (its run) and
// dockerLabelOwner (host and pid of the test process), so that what a
// killed run left behind is removed by the next one, and a run going on at
// the same time on the same daemon is left alone.
const (
	dockerLabelRun   = "io.appliance.e2e.docker-cluster"
	dockerLabelOwner = "io.appliance.e2e.owner"

	// Ports inside the containers; only the API's is published, on
	// 127.0.0.1 at a port the daemon picks.
	dockerAPIPort  = "7480"
	dockerRaftPort = "7481"
	dockerMQTTPort = "1883"

	dockerAgents  = 3
	dockerWriters = 4 // at most faultClients: checkLinearizable numbers its reads after them

	// dockerIsolationMin is the least time the controller stays cut off.
	dockerIsolationMin = 10 * time.Second
	// dockerMoveBound bounds the wait, from the disconnection, for every
	// agent to run v2 through a connected controller. A controller cut off
	// from the network sends no reset: the agent gives its session up only
	// when its MQTT keepalive (30 s, not configurable) fails, a PINGREQ sent
	// a keepalive after the last packet it received going unanswered for
	// another keepalive. That is about 60 s (its reports' PUBACKs time out
	// after 10 s, which does not end the session); then it reconnects and
	// applies v2 within a few seconds.
	dockerMoveBound = 100 * time.Second
)

// TestDockerCluster is issue 7's sixth acceptance item, on this machine's
// Docker Engine. Three controllers and three agents run as containers of
// an image FROM scratch on a private network; the agents run the test
// module as process modules. Once the cluster agrees and every agent runs
// deployment v1, clients write device tags, create deployments and read
// consistently through random controllers (the fault-injection test's
// clients and history), while the test disconnects the leader from the
// network. While it is cut off, v2 is created through a connected
// controller, and every agent, those connected to the isolated controller
// included, must run it through a connected one. Then the controller is
// reconnected. Afterwards, as in the fault-injection test: every node has
// the same devices and deployments at the same applied index, read locally
// (the reconnected node caught up), every acknowledged deployment is there,
// the history of tag writes and consistent reads is linearizable, and every
// agent reports v2 with code 200 on every node.
//
// Without a Docker daemon the test skips, except where CI is set.
func TestDockerCluster(t *testing.T) {
	cli := dockerForCluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	began := time.Now()
	c := newDockerCluster(ctx, t, cli)

	// Three controllers: c1 bootstraps, c2 and c3 join it with its token.
	c.startController(ctx, t, "c1")
	join := []string{"--join", "https://c1:" + dockerRaftPort, "--join-token", c.joinToken}
	c.startController(ctx, t, "c2", join...)
	c.startController(ctx, t, "c3", join...)
	leader := c.waitAgreed(t, "", 60*time.Second)
	c.checkVoters(t)
	t.Logf("three controllers up in %s, leader %s", time.Since(began).Round(time.Millisecond), leader)

	// Agents enroll with a token; the first two prefer the leader (device
	// ids the spread rule puts there), so that it is the leader they are
	// connected to when it is cut off; the third prefers a follower.
	enr, err := c.fc.client(0).PutEnrollment(ctx, "docker-line", api.EnrollmentRequest{Tags: map[string]any{"line": "docker"}}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil || enr.Token == "" {
		t.Fatalf("create the enrollment: %+v, %v", enr, err)
	}
	order := c.names()
	li := slices.Index(order, leader)
	var agents []string
	for i := range dockerAgents {
		first := li
		if i == dockerAgents-1 {
			first = (li + 1) % len(order)
		}
		hosts := make([]string, len(order))
		for j, name := range order {
			hosts[j] = name + ":" + dockerMQTTPort
		}
		dev := firstPreferring(hosts, first, fmt.Sprintf("dev%d", i+1))
		c.startAgent(ctx, t, dev, order, enr.Token)
		agents = append(agents, dev)
	}
	const condition = "tags.line='docker'"
	v1 := api.DeploymentRequest{Content: dockerManifest("alpha"), TargetCondition: condition, Priority: 1}
	opCtx, opCancel := context.WithTimeout(ctx, faultOpTimeout)
	_, err = c.fc.client(1).PutDeployment(opCtx, "v1", v1, api.WriteOptions{IfNoneMatch: "*"})
	opCancel()
	if err != nil {
		t.Fatalf("create v1: %v", err)
	}
	c.waitAgentsRun(t, agents, "v1", "alpha", 90*time.Second)
	t.Logf("%d agents enrolled and run v1 (%s since the start)", len(agents), time.Since(began).Round(time.Millisecond))

	// The registers of the history, with tag v = 0, its initial state.
	for k := range faultKeys {
		id := faultKey(k)
		eventually(t, "create "+id, 30*time.Second, func() bool {
			octx, cancel := context.WithTimeout(ctx, faultOpTimeout)
			defer cancel()
			_, err := c.fc.client(k%3).PutDevice(octx, id, api.DeviceRequest{Tags: map[string]any{"group": "fault", "v": 0}}, api.WriteOptions{})
			return err == nil
		})
	}

	h := newFaultHistory()
	load, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var seq atomic.Int64
	for i := range dockerWriters {
		wg.Go(func() { h.runClient(load, i, c.fc, &seq) })
	}
	t.Cleanup(func() { stop(); wg.Wait() })
	time.Sleep(3 * time.Second)

	// Cut the leader off, with the agents it holds.
	victim := c.waitAgreed(t, "", 30*time.Second)
	// The leader knows its own sessions at once.
	var held, where []string
	for _, dev := range agents {
		on := c.holder(ctx, victim, dev)
		if on == victim {
			held = append(held, dev)
		}
		where = append(where, dev+" on "+on)
	}
	t.Logf("sessions before the disconnection, as %s sees them: %s", victim, strings.Join(where, ", "))
	if len(held) == 0 {
		t.Fatalf("no agent is connected to the leader %s (it led when they started: %s); nothing would have to move", victim, leader)
	}
	c.disconnect(ctx, t, victim)
	cutAt := time.Now()
	h.fault("disconnect the leader %s from the network (it holds %s)", victim, strings.Join(held, ", "))
	t.Logf("disconnected the leader %s from the network", victim)

	survivors := slices.DeleteFunc(c.names(), func(n string) bool { return n == victim })
	next := c.waitAgreed(t, victim, 30*time.Second)
	h.fault("%s elected by %s", next, strings.Join(survivors, " and "))
	t.Logf("%s elected by %s %s after the disconnection", next, strings.Join(survivors, " and "), time.Since(cutAt).Round(time.Millisecond))

	// v2, created through a connected controller while the leader is cut off.
	v2 := api.DeploymentRequest{Content: dockerManifest("beta"), TargetCondition: condition, Priority: 2}
	eventually(t, "v2 created through "+survivors[0], 30*time.Second, func() bool {
		octx, cancel := context.WithTimeout(ctx, faultOpTimeout)
		defer cancel()
		_, err := c.fc.client(c.index(survivors[0])).PutDeployment(octx, "v2", v2, api.WriteOptions{IfNoneMatch: "*"})
		if err != nil {
			t.Logf("create v2 through %s: %v", survivors[0], err)
		}
		// An earlier attempt whose answer was lost may have created it.
		return err == nil || errors.Is(err, fleet.ErrExists) || errors.Is(err, fleet.ErrPreconditionFailed)
	})
	h.fault("v2 created through %s", survivors[0])

	// Every agent must run v2 through a connected controller while the
	// leader is still cut off.
	c.waitAgentsMoved(ctx, t, h, agents, survivors, cutAt)

	c.reconnect(ctx, t, victim)
	h.fault("reconnect %s after %s", victim, time.Since(cutAt).Round(time.Millisecond))
	t.Logf("reconnected %s after %s", victim, time.Since(cutAt).Round(time.Millisecond))
	c.waitAgreed(t, "", 30*time.Second)
	h.fault("%s agrees with the others on the leader again", victim)
	// The reconnected controller holds no stale session: every controller
	// names the same holder, a controller that stayed connected.
	eventually(t, "every controller to name the same survivor as each agent's holder", 20*time.Second, func() bool {
		for _, dev := range agents {
			on := c.holder(ctx, survivors[0], dev)
			for _, n := range c.names() {
				if got := c.holder(ctx, n, dev); got != on || !slices.Contains(survivors, got) {
					return false
				}
			}
		}
		return true
	})
	time.Sleep(5 * time.Second)
	stop()
	wg.Wait()
	h.fault("clients stopped")
	h.logSummary(t, nil)

	for _, u := range h.unexpected {
		t.Errorf("unexpected answer: %s", u)
	}
	states := c.fc.converge(t)
	t.Logf("%s caught up: all three nodes at applied index %d", victim, states[0].applied)
	checkSameState(t, c.fc, withoutSessions(states))
	checkDeployments(t, c.fc, h, writersDeployments(states))
	checkLinearizable(t, c.fc, h, states)
	checkAgentDeployments(t, states, agents, v1, v2)
	t.Logf("done in %s", time.Since(began).Round(time.Millisecond))
}

// dockerForCluster returns a client of the machine's Docker Engine, or
// skips the test when no daemon answers (fails it where CI is set).
func dockerForCluster(t *testing.T) *client.Client {
	t.Helper()
	cli, err := client.New(client.FromEnv)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true})
		cancel()
		if err != nil {
			cli.Close()
		}
	}
	if err != nil {
		testenv.Missing(t, "no Docker daemon answers (%v): the Docker cluster test needs Docker Engine", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// dockerCluster is the containers of one run and the clients the test
// reaches the controllers' APIs with. fc is the fault-injection test's view
// of a cluster (node ids and one API client per node, which a reconnection
// replaces) so that its clients and checks run unchanged; it has no fault
// net.
type dockerCluster struct {
	cli     *client.Client
	run     string // unique per run: names the image, the network and the containers
	labels  map[string]string
	image   string
	network string
	caPEM   []byte

	adminToken, joinToken string
	fc                    *faultCluster

	mu         sync.Mutex
	containers map[string]string // container id by name (c1, dev-1, ...)
	started    []string          // names, in start order
}

// newDockerCluster removes what earlier runs left, builds the image and
// creates the network. Everything is removed when the test ends, whatever
// its outcome; on a failure every container's log is dumped first.
func newDockerCluster(ctx context.Context, t *testing.T, cli *client.Client) *dockerCluster {
	t.Helper()
	host, _ := os.Hostname()
	run := "apl-e2e-" + randomHex(4)
	c := &dockerCluster{
		cli: cli, run: run,
		labels:     map[string]string{dockerLabelRun: run, dockerLabelOwner: fmt.Sprintf("%s/%d", host, os.Getpid())},
		image:      "appliance-e2e-cluster:" + run,
		network:    run,
		fc:         &faultCluster{},
		containers: map[string]string{},
	}
	c.removeLeftovers(ctx, t)

	appliance := staticBinary(t)
	if err := checkStatic(moduleBinary); err != nil {
		t.Fatalf("the test module: %v", err)
	}
	began := time.Now()
	if err := c.buildImage(ctx, appliance, moduleBinary); err != nil {
		t.Fatalf("build the image FROM scratch: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := cli.ImageRemove(ctx, c.image, client.ImageRemoveOptions{Force: true, PruneChildren: true}); err != nil {
			t.Logf("remove the image %s: %v", c.image, err)
		}
	})
	t.Logf("built the image %s FROM scratch from %s in %s", c.image, appliance, time.Since(began).Round(time.Millisecond))

	if _, err := cli.NetworkCreate(ctx, c.network, client.NetworkCreateOptions{Driver: "bridge", Labels: c.labels}); err != nil {
		t.Fatalf("create the network %s: %v", c.network, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := cli.NetworkRemove(ctx, c.network, client.NetworkRemoveOptions{}); err != nil {
			t.Logf("remove the network %s: %v", c.network, err)
		}
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.mu.Lock()
		defer c.mu.Unlock()
		for name, id := range c.containers {
			if _, err := cli.ContainerRemove(ctx, id, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true}); err != nil {
				t.Logf("remove the container %s: %v", name, err)
			}
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs(t)
		}
	})
	return c
}

// removeLeftovers removes the containers, networks and images of earlier
// runs whose test process is gone: on this host, its pid no longer runs;
// from another host sharing the daemon, it is over an hour old.
func (c *dockerCluster) removeLeftovers(ctx context.Context, t *testing.T) {
	t.Helper()
	host, _ := os.Hostname()
	stale := func(labels map[string]string, created time.Time) bool {
		if labels[dockerLabelRun] == c.run {
			return false
		}
		h, pid, ok := strings.Cut(labels[dockerLabelOwner], "/")
		if n, err := strconv.Atoi(pid); ok && err == nil && h == host {
			return !processAlive(n) || n == os.Getpid()
		}
		return time.Since(created) > time.Hour
	}
	f := make(client.Filters).Add("label", dockerLabelRun)
	var removed []string
	if res, err := c.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: f}); err == nil {
		for _, ct := range res.Items {
			if stale(ct.Labels, time.Unix(ct.Created, 0)) {
				if _, err := c.cli.ContainerRemove(ctx, ct.ID, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true}); err == nil {
					removed = append(removed, "container "+strings.Join(ct.Names, ","))
				}
			}
		}
	}
	if res, err := c.cli.NetworkList(ctx, client.NetworkListOptions{Filters: f}); err == nil {
		for _, n := range res.Items {
			if stale(n.Labels, n.Created) {
				if _, err := c.cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err == nil {
					removed = append(removed, "network "+n.Name)
				}
			}
		}
	}
	if res, err := c.cli.ImageList(ctx, client.ImageListOptions{Filters: f}); err == nil {
		for _, im := range res.Items {
			if stale(im.Labels, time.Unix(im.Created, 0)) {
				if _, err := c.cli.ImageRemove(ctx, im.ID, client.ImageRemoveOptions{Force: true, PruneChildren: true}); err == nil {
					removed = append(removed, "image "+strings.Join(im.RepoTags, ","))
				}
			}
		}
	}
	if len(removed) > 0 {
		t.Logf("removed what earlier runs left: %s", strings.Join(removed, "; "))
	}
}

// staticBinary returns a statically linked appliance: the binary under
// test when it is one (make e2e builds it with CGO_ENABLED=0), else a
// CGO_ENABLED=0 build of the tree. An image FROM scratch has no dynamic
// loader and no libc.
func staticBinary(t *testing.T) string {
	t.Helper()
	err := checkStatic(binary)
	if err == nil {
		return binary
	}
	t.Logf("%v: building a static one for the image", err)
	out := filepath.Join(t.TempDir(), "appliance")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "../cmd/appliance")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/appliance: %v\n%s", err, b)
	}
	if err := checkStatic(out); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkStatic: an ELF executable that asks for no program interpreter.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", path)
		}
	}
	return nil
}

// buildImage builds the run's image FROM scratch: /appliance (the
// entrypoint), /module, and the directories the controllers, the agents
// and the modules write to.
func (c *dockerCluster) buildImage(ctx context.Context, appliance, module string) error {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []struct {
		name string
		mode int64
	}{{"rootfs/", 0o755}, {"rootfs/data/", 0o700}, {"rootfs/agent/", 0o700}, {"rootfs/out/", 0o755}, {"rootfs/tmp/", 0o1777}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode}); err != nil {
			return err
		}
	}
	files := []struct {
		name string
		mode int64
		path string
		data []byte
	}{
		{name: "Dockerfile", mode: 0o644, data: []byte("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/appliance\"]\n")},
		{name: "rootfs/appliance", mode: 0o755, path: appliance},
		{name: "rootfs/module", mode: 0o755, path: module},
	}
	for _, f := range files {
		if f.path != "" {
			b, err := os.ReadFile(f.path)
			if err != nil {
				return err
			}
			f.data = b
		}
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.data))}); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	res, err := c.cli.ImageBuild(ctx, &buf, client.ImageBuildOptions{Tags: []string{c.image}, Labels: c.labels, Remove: true, ForceRemove: true})
	if err != nil {
		return err
	}
	defer res.Body.Close()
	dec := json.NewDecoder(res.Body)
	for {
		var m struct {
			Error string `json:"error"`
		}
		if err := dec.Decode(&m); err == io.EOF {
			break
		} else if err != nil {
			return err
		}
		if m.Error != "" {
			return errors.New(m.Error)
		}
	}
	_, err = c.cli.ImageInspect(ctx, c.image)
	return err
}

// start creates and starts a container named after the run and name, with
// host name name and the network alias name, and files copied to / before
// it starts. A controller's API port is published on 127.0.0.1.
func (c *dockerCluster) start(ctx context.Context, t *testing.T, name string, cmd []string, publishAPI bool, files map[string][]byte) string {
	t.Helper()
	cfg := &container.Config{Image: c.image, Hostname: name, Cmd: cmd, Labels: c.labels}
	hc := &container.HostConfig{}
	if publishAPI {
		p := network.MustParsePort(dockerAPIPort + "/tcp")
		cfg.ExposedPorts = network.PortSet{p: {}}
		hc.PortBindings = network.PortMap{p: {{HostIP: netip.MustParseAddr("127.0.0.1")}}}
	}
	nc := &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{c.network: {Aliases: []string{name}}}}
	res, err := c.cli.ContainerCreate(ctx, client.ContainerCreateOptions{Config: cfg, HostConfig: hc, NetworkingConfig: nc, Name: c.run + "-" + name})
	if err != nil {
		t.Fatalf("create the container %s: %v", name, err)
	}
	c.mu.Lock()
	c.containers[name] = res.ID
	c.started = append(c.started, name)
	c.mu.Unlock()
	if len(files) > 0 {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for n, data := range files {
			tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(data))})
			tw.Write(data)
		}
		tw.Close()
		if _, err := c.cli.CopyToContainer(ctx, res.ID, client.CopyToContainerOptions{DestinationPath: "/", Content: &buf}); err != nil {
			t.Fatalf("copy files into %s: %v", name, err)
		}
	}
	if _, err := c.cli.ContainerStart(ctx, res.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatalf("start the container %s: %v", name, err)
	}
	return res.ID
}

func (c *dockerCluster) id(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.containers[name]
}

// names are the controllers' names, in fc's order.
func (c *dockerCluster) names() []string {
	var out []string
	for _, n := range c.fc.nodes {
		out = append(out, n.id)
	}
	return out
}

func (c *dockerCluster) index(name string) int {
	i, _ := c.fc.node(name)
	return i
}

// startController starts `appliance serve` as the container name and waits
// until its API answers ready on the published port. The first one's
// tokens and CA are the cluster's.
func (c *dockerCluster) startController(ctx context.Context, t *testing.T, name string, extra ...string) {
	t.Helper()
	cmd := append([]string{"serve", "--data-dir", "/data", "--node-id", name,
		"--http-addr", "0.0.0.0:" + dockerAPIPort, "--raft-addr", "0.0.0.0:" + dockerRaftPort,
		"--raft-advertise", name + ":" + dockerRaftPort, "--mqtt-addr", "0.0.0.0:" + dockerMQTTPort, "--tls-san", name}, append(slices.Clone(faultWorkloadFlags), extra...)...)
	startedAt := time.Now()
	id := c.start(ctx, t, name, cmd, true, nil)

	deadline := time.Now().Add(60 * time.Second)
	for ; ; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("controller %s did not become ready within 60 s", name)
		}
		c.mustRun(ctx, t, name)
		if _, err := c.readFile(ctx, id, "/data/http-url"); err != nil {
			continue
		}
		if c.fc.http == nil {
			if err := c.readClusterSecrets(ctx, id); err != nil {
				t.Logf("read the tokens and the CA of %s: %v", name, err)
				continue
			}
		}
		url, err := c.apiURL(ctx, id)
		if err != nil {
			continue
		}
		if ready(ctx, c.fc.http, url) {
			c.fc.mu.Lock()
			c.fc.nodes = append(c.fc.nodes, &faultNode{id: name})
			c.fc.clients = append(c.fc.clients, &api.Client{BaseURL: url, Token: c.adminToken, HTTP: c.fc.http})
			c.fc.mu.Unlock()
			t.Logf("controller %s ready at %s (%s after its start)", name, url, time.Since(startedAt).Round(time.Millisecond))
			return
		}
	}
}

// readClusterSecrets reads the admin and join tokens and the CA out of the
// bootstrap node, and makes the clients' HTTP client trust that CA.
func (c *dockerCluster) readClusterSecrets(ctx context.Context, id string) error {
	read := func(path string) ([]byte, error) {
		b, err := c.readFile(ctx, id, path)
		if err == nil && len(bytes.TrimSpace(b)) == 0 {
			err = fmt.Errorf("%s is empty", path)
		}
		return b, err
	}
	admin, err := read("/data/admin-token")
	if err != nil {
		return err
	}
	jt, err := read("/data/join-token")
	if err != nil {
		return err
	}
	ca, err := read("/data/tls/ca.crt")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return errors.New("no certificate in /data/tls/ca.crt")
	}
	c.adminToken, c.joinToken = strings.TrimSpace(string(admin)), strings.TrimSpace(string(jt))
	c.caPEM = ca
	tr := &http.Transport{MaxIdleConnsPerHost: 2 * dockerWriters, IdleConnTimeout: 30 * time.Second, TLSClientConfig: &tls.Config{RootCAs: pool}}
	c.fc.http = &http.Client{Timeout: faultOpTimeout + 2*time.Second, Transport: tr}
	return nil
}

// readFile reads one file out of a container.
func (c *dockerCluster) readFile(ctx context.Context, id, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := c.cli.CopyFromContainer(ctx, id, client.CopyFromContainerOptions{SourcePath: path})
	if err != nil {
		return nil, err
	}
	defer res.Content.Close()
	tr := tar.NewReader(res.Content)
	if _, err := tr.Next(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return io.ReadAll(tr)
}

// apiURL is where the host reaches a controller's API: the port the daemon
// published it on, which a reconnection changes.
func (c *dockerCluster) apiURL(ctx context.Context, id string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := c.cli.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return "", err
	}
	if ns := res.Container.NetworkSettings; ns != nil {
		for _, b := range ns.Ports[network.MustParsePort(dockerAPIPort+"/tcp")] {
			if b.HostPort != "" {
				return "https://127.0.0.1:" + b.HostPort, nil
			}
		}
	}
	return "", errors.New("the API port is not published")
}

func ready(ctx context.Context, hc *http.Client, url string) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := hc.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// mustRun fails the test at once when the container has exited.
func (c *dockerCluster) mustRun(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := c.cli.ContainerInspect(ctx, c.id(name), client.ContainerInspectOptions{})
	if err != nil {
		t.Fatalf("inspect %s: %v", name, err)
	}
	if st := res.Container.State; st != nil && !st.Running {
		t.Fatalf("container %s is %s (exit code %d)", name, st.Status, st.ExitCode)
	}
}

// startAgent starts `appliance agent` as the container dev, enrolling with
// token and knowing the controllers given (it tries them in its own order:
// the spread rule).
func (c *dockerCluster) startAgent(ctx context.Context, t *testing.T, dev string, servers []string, token string) {
	t.Helper()
	var urls []string
	for _, s := range servers {
		urls = append(urls, "mqtts://"+s+":"+dockerMQTTPort)
	}
	cmd := []string{"agent", "--server", strings.Join(urls, ","), "--ca-file", "/ca.crt", "--runtime", "process",
		"--device-id", dev, "--enroll-token", token, "--data-dir", "/agent", "--restart-cool-off", "300ms"}
	c.start(ctx, t, dev, cmd, false, map[string][]byte{"ca.crt": c.caPEM})
	t.Logf("agent %s started with --server %s", dev, strings.Join(urls, ","))
}

// waitAgreed waits until every controller but skip names the same leader,
// one of them, that says it leads, with three voters, and returns it.
func (c *dockerCluster) waitAgreed(t *testing.T, skip string, bound time.Duration) string {
	t.Helper()
	var last any
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		vs, err := c.fc.views(skip)
		if err == nil && agreeOnLeader(vs) && vs[0].Leader != skip {
			return vs[0].Leader
		}
		last = vs
		if err != nil {
			last = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	what := "the three controllers"
	if skip != "" {
		what = "the controllers connected while " + skip + " is cut off"
	}
	t.Fatalf("%s did not agree on a leader among them within %s; last views: %+v", what, bound, last)
	return ""
}

// checkVoters: every controller lists the three as voters.
func (c *dockerCluster) checkVoters(t *testing.T) {
	t.Helper()
	vs, err := c.fc.views("")
	if err != nil {
		t.Fatal(err)
	}
	want := c.names()
	slices.Sort(want)
	for _, v := range vs {
		var got []string
		for _, m := range v.Members {
			if m.Voter {
				got = append(got, m.ID)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Fatalf("%s lists the voters %v, want %v: %+v", v.Self, got, want, v.Members)
		}
	}
}

// holder names the controller that holds the device's MQTT session as
// the controller asked sees it (its own sessions at once, its peers' as
// they last answered), or "".
func (c *dockerCluster) holder(ctx context.Context, asked, dev string) string {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	d, err := c.fc.client(c.index(asked)).Device(ctx, dev, false)
	if err != nil || d.ConnectionState != api.Connected {
		return ""
	}
	return d.ConnectedNode
}

// runs tells whether the device, as node sees it, reported dep applied
// (code 200) with module running.
func (c *dockerCluster) runs(ctx context.Context, node, dev, dep, module string) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	d, err := c.fc.client(c.index(node)).Device(ctx, dev, false)
	return err == nil && runsDeployment(d, dep, module) == ""
}

// runsDeployment says what is wrong, or "" when the device reported dep
// applied with module running.
func runsDeployment(d api.DeviceView, dep, module string) string {
	if d.Reported == nil {
		return "no reported document"
	}
	var doc fleet.ReportedDocument
	if err := json.Unmarshal(d.Reported.Document, &doc); err != nil {
		return fmt.Sprintf("reported document: %v", err)
	}
	if doc.DeploymentID != dep || doc.LastDesiredStatus.Code != 200 || doc.Modules[module].RuntimeStatus != fleet.RuntimeRunning {
		return fmt.Sprintf("reports deployment %q, code %d, module %s %q; want %s, 200, running",
			doc.DeploymentID, doc.LastDesiredStatus.Code, module, doc.Modules[module].RuntimeStatus, dep)
	}
	return ""
}

// waitAgentsRun waits until every controller sees every agent report dep
// with module running.
func (c *dockerCluster) waitAgentsRun(t *testing.T, agents []string, dep, module string, bound time.Duration) {
	t.Helper()
	var why string
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		why = ""
		for _, n := range c.names() {
			for _, dev := range agents {
				if why == "" && !c.runs(context.Background(), n, dev, dep, module) {
					why = fmt.Sprintf("%s on %s", dev, n)
				}
			}
		}
		if why == "" {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("the agents did not all report %s running %s within %s; first missing: %s", dep, module, bound, why)
}

// waitAgentsMoved keeps the cut-off controller off the network for at
// least dockerIsolationMin, and until every agent runs v2 through one of
// the survivors, which must hold its session (dockerMoveBound at most).
func (c *dockerCluster) waitAgentsMoved(ctx context.Context, t *testing.T, h *faultHistory, agents, survivors []string, cutAt time.Time) {
	t.Helper()
	moved := map[string]bool{}
	deadline := cutAt.Add(dockerMoveBound)
	for len(moved) < len(agents) || time.Since(cutAt) < dockerIsolationMin {
		if time.Now().After(deadline) {
			var missing []string
			for _, dev := range agents {
				if !moved[dev] {
					missing = append(missing, dev)
				}
			}
			t.Fatalf("%s did not run v2 through %s within %s of the disconnection",
				strings.Join(missing, ", "), strings.Join(survivors, " or "), dockerMoveBound)
		}
		for _, dev := range agents {
			if moved[dev] {
				continue
			}
			on := c.holder(ctx, survivors[0], dev)
			if slices.Contains(survivors, on) && c.runs(ctx, on, dev, "v2", "beta") {
				moved[dev] = true
				t.Logf("%s runs v2 through %s, %s after the disconnection", dev, on, time.Since(cutAt).Round(time.Millisecond))
				h.fault("%s runs v2 through %s", dev, on)
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// disconnect cuts a controller off the network.
func (c *dockerCluster) disconnect(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := c.cli.NetworkDisconnect(ctx, c.network, client.NetworkDisconnectOptions{Container: c.id(name)}); err != nil {
		t.Fatalf("disconnect %s: %v", name, err)
	}
}

// reconnect puts a controller back on the network under its alias. The
// daemon publishes its API on a new port: the test's client follows it.
func (c *dockerCluster) reconnect(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	id := c.id(name)
	if _, err := c.cli.NetworkConnect(octx, c.network, client.NetworkConnectOptions{
		Container: id, EndpointConfig: &network.EndpointSettings{Aliases: []string{name}},
	}); err != nil {
		t.Fatalf("reconnect %s: %v", name, err)
	}
	var url string
	eventually(t, name+"'s API published again", 30*time.Second, func() bool {
		u, err := c.apiURL(ctx, id)
		url = u
		return err == nil && ready(ctx, c.fc.http, u)
	})
	c.fc.mu.Lock()
	c.fc.clients[c.index(name)] = &api.Client{BaseURL: url, Token: c.adminToken, HTTP: c.fc.http}
	c.fc.mu.Unlock()
}

// dumpLogs logs the end of every container's output.
func (c *dockerCluster) dumpLogs(t *testing.T) {
	c.mu.Lock()
	names := slices.Clone(c.started)
	c.mu.Unlock()
	for _, name := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var out bytes.Buffer
		logs, err := c.cli.ContainerLogs(ctx, c.id(name), client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Tail: "2000"})
		if err == nil {
			_, err = stdcopy.StdCopy(&out, &out, logs)
			logs.Close()
		}
		cancel()
		if err != nil {
			t.Logf("logs of %s: %v", name, err)
			continue
		}
		t.Logf("log of %s (its last 2000 lines):\n%s", name, out.String())
	}
}

// dockerManifest is a deployment of process modules that run the test
// module of the image, writing into /out of the agent's container.
func dockerManifest(modules ...string) json.RawMessage {
	mods := map[string]any{}
	for _, name := range modules {
		mods[name] = map[string]any{
			"type": "process", "status": "running", "restartPolicy": "always",
			"env":      map[string]any{"MODULE_OUT": map[string]any{"value": "/out"}},
			"settings": map[string]any{"command": []string{"/module"}},
		}
	}
	return edgeManifest(mods)
}

// withoutSessions clears which controller holds each device's session: a
// view each controller puts together from its peers' answers when it is
// read, not replicated state (replicated() clears the rest of it).
func withoutSessions(states []faultState) []faultState {
	out := make([]faultState, len(states))
	for i, s := range states {
		s.devices = maps.Clone(s.devices)
		for id, d := range s.devices {
			d.ConnectedNode = ""
			s.devices[id] = d
		}
		out[i] = s
	}
	return out
}

// writersDeployments drops the test's own deployments (v1, v2) from the
// states, leaving those of the clients, which checkDeployments checks
// against their history.
func writersDeployments(states []faultState) []faultState {
	out := make([]faultState, len(states))
	for i, s := range states {
		s.deployments = maps.Clone(s.deployments)
		delete(s.deployments, "v1")
		delete(s.deployments, "v2")
		out[i] = s
	}
	return out
}

// checkAgentDeployments: on every node, v1 and v2 are as created and every
// agent reports v2 applied with its module running.
func checkAgentDeployments(t *testing.T, states []faultState, agents []string, v1, v2 api.DeploymentRequest) {
	t.Helper()
	for _, s := range states {
		for id, want := range map[string]api.DeploymentRequest{"v1": v1, "v2": v2} {
			d, ok := s.deployments[id]
			if !ok || d.Priority != want.Priority || d.TargetCondition != want.TargetCondition {
				t.Errorf("deployment %s on %s: %+v (present %t); want priority %d, condition %q", id, s.node, d.Deployment, ok, want.Priority, want.TargetCondition)
			}
		}
		for _, dev := range agents {
			d, ok := s.devices[dev]
			if !ok {
				t.Errorf("agent %s is not a device on %s", dev, s.node)
				continue
			}
			if why := runsDeployment(d, "v2", "beta"); why != "" {
				t.Errorf("agent %s on %s: %s", dev, s.node, why)
			}
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
