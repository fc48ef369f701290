package agent

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"appliance/fleet"
	"appliance/internal/testenv"
)

// The docker tests drive the machine's Docker Engine. There is no image
// registry: TestMain's module binary is built into an image FROM scratch
// through the Engine API. The image is tagged for a registry on a
// 127.0.0.1 port where nothing listens, so that a pull fails at once
// without leaving the machine. Without a daemon the tests skip, except
// with CI=true, where they fail.

var (
	dockerOnce  sync.Once
	dockerCli   *client.Client
	dockerErr   error
	dockerImage string
)

// dockerForTest returns a client and the test image, building it once.
func dockerForTest(t *testing.T) (*client.Client, string) {
	t.Helper()
	dockerOnce.Do(func() {
		cli, err := client.New(client.FromEnv)
		if err != nil {
			dockerErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true}); err != nil {
			cli.Close()
			dockerErr = err
			return
		}
		dockerCli = cli
		dockerImage = fmt.Sprintf("127.0.0.1:%s/appliance-agent-test/module:%s", strings.TrimPrefix(deadServer(t), "mqtt://127.0.0.1:"), randHex(4))
		dockerErr = buildTestImage(cli, dockerImage)
	})
	if dockerCli == nil {
		testenv.Missing(t, "no Docker daemon answers (%v): the docker runtime tests need Docker Engine", dockerErr)
	}
	if dockerErr != nil {
		t.Fatalf("build test image: %v", dockerErr)
	}
	return dockerCli, dockerImage
}

// cleanupDocker removes the test image; TestMain calls it.
func cleanupDocker() {
	if dockerCli == nil || dockerImage == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = dockerCli.ImageRemove(ctx, dockerImage, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	dockerCli.Close()
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// buildTestImage builds FROM scratch with the module binary as entrypoint.
func buildTestImage(cli *client.Client, tag string) error {
	bin, err := os.ReadFile(moduleBin)
	if err != nil {
		return err
	}
	var ctxTar bytes.Buffer
	tw := tar.NewWriter(&ctxTar)
	files := []struct {
		name string
		mode int64
		data []byte
	}{
		{"Dockerfile", 0o644, []byte("FROM scratch\nCOPY module /module\nENTRYPOINT [\"/module\"]\n")},
		{"module", 0o755, bin},
	}
	for _, f := range files {
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
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := cli.ImageBuild(ctx, &ctxTar, client.ImageBuildOptions{Tags: []string{tag}, Remove: true, ForceRemove: true})
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
	_, err = cli.ImageInspect(ctx, tag)
	return err
}

// dockerModule is a docker module of the test image.
func dockerModule(image string, env map[string]string) mod {
	e := map[string]any{}
	for k, v := range env {
		e[k] = map[string]any{"value": v}
	}
	return mod{
		"type":            "docker",
		"status":          "running",
		"restartPolicy":   "always",
		"imagePullPolicy": "never",
		"env":             e,
		"settings":        map[string]any{"image": image},
	}
}

func dockerConfig(t *testing.T) Config {
	cfg := testConfig(t)
	cfg.Runtime = RuntimeDocker
	cfg.DeviceID = "dev-docker-" + randHex(4)
	cfg.ResyncInterval = 500 * time.Millisecond
	return cfg
}

// removeDeviceContainers removes whatever the test device left behind.
func removeDeviceContainers(t *testing.T, cli *client.Client, deviceID string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		res, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("label", labelDevice+"="+deviceID)})
		if err != nil {
			return
		}
		for _, c := range res.Items {
			_, _ = cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	})
}

// foreignContainer starts a container the agent did not create.
func foreignContainer(t *testing.T, cli *client.Client, image, name string) string {
	t.Helper()
	ctx := context.Background()
	res, err := cli.ContainerCreate(ctx, client.ContainerCreateOptions{Name: name, Config: &container.Config{Image: image}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = cli.ContainerRemove(context.Background(), res.ID, client.ContainerRemoveOptions{Force: true})
	})
	if _, err := cli.ContainerStart(ctx, res.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}
	return res.ID
}

func inspectContainer(t *testing.T, cli *client.Client, id string) (container.InspectResponse, bool) {
	t.Helper()
	res, err := cli.ContainerInspect(context.Background(), id, client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return container.InspectResponse{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return res.Container, true
}

func deviceContainers(t *testing.T, cli *client.Client, deviceID string) map[string]string {
	t.Helper()
	res, err := cli.ContainerList(context.Background(), client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("label", labelDevice+"="+deviceID)})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, c := range res.Items {
		out[c.Labels[labelModule]] = c.ID
	}
	return out
}

func TestDockerRuntime_Lifecycle(t *testing.T) {
	cli, image := dockerForTest(t)
	cfg := dockerConfig(t)
	removeDeviceContainers(t, cli, cfg.DeviceID)
	suffix := randHex(3)
	svc, crash, taken := "svc-"+suffix, "crash-"+suffix, "taken-"+suffix
	foreign := foreignContainer(t, cli, image, "appliance-test-foreign-"+suffix)
	squatter := foreignContainer(t, cli, image, taken)

	svcMod := dockerModule(image, map[string]string{"GREETING": "from-manifest"})
	// createOptions split in two chunks, as Azure writes long ones.
	svcMod["settings"] = map[string]any{
		"image":           image,
		"createOptions":   `{"Env":["FROM_CREATE_OPTIONS=yes","GREETING=overridden"],"Host`,
		"createOptions01": `Config":{"RestartPolicy":{"Name":"always"}}}`,
	}
	crashMod := dockerModule(image, map[string]string{"MODULE_EXIT_AFTER": "100ms", "MODULE_EXIT_CODE": "3"}).with("restartPolicy", "on-failure")
	rec := &recordingHandler{}
	cfg.Logger = slogTee(cfg.Logger, rec)
	a := startAgent(t, cfg)
	a.send(t, desired(1, "dep-docker", map[string]mod{svc: svcMod, crash: crashMod}))

	doc := waitReport(t, a.Agent, 60*time.Second, "svc running, crash restarted twice", func(d fleet.ReportedDocument) bool {
		return running(svc)(d) && d.Modules[crash].RestartCount >= 2
	})
	if m := doc.Modules[crash]; m.ExitCode != 3 || m.LastExitTimeUTC == nil || m.Settings.Image != image {
		t.Errorf("crash: %+v", m)
	}
	if doc.LastDesiredStatus.Code != fleet.StatusCodeOK {
		t.Errorf("status %+v", doc.LastDesiredStatus)
	}
	ids := deviceContainers(t, cli, cfg.DeviceID)
	c, ok := inspectContainer(t, cli, ids[svc])
	if !ok {
		t.Fatalf("no container for %s: %v", svc, ids)
	}
	if c.Name != "/"+svc || c.Config.Labels[labelDeployment] != "dep-docker" || c.Config.Labels[labelOwner] != ownerValue {
		t.Errorf("container name %q labels %v", c.Name, c.Config.Labels)
	}
	for _, want := range []string{"FROM_CREATE_OPTIONS=yes", "GREETING=from-manifest", "IOTEDGE_MODULEID=" + svc, "IOTEDGE_DEVICEID=" + cfg.DeviceID} {
		if !slices.Contains(c.Config.Env, want) {
			t.Errorf("env %v lacks %s", c.Config.Env, want)
		}
	}
	if slices.Contains(c.Config.Env, "GREETING=overridden") {
		t.Error("createOptions' env won over the manifest's")
	}
	if c.HostConfig.RestartPolicy.Name != container.RestartPolicyDisabled {
		t.Errorf("docker restart policy %q; the agent restarts modules itself", c.HostConfig.RestartPolicy.Name)
	}

	// Removed behind the agent's back: recreated.
	if _, err := cli.ContainerRemove(context.Background(), ids[svc], client.ContainerRemoveOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "svc recreated", func() bool {
		id := deviceContainers(t, cli, cfg.DeviceID)[svc]
		if id == "" || id == ids[svc] {
			return false
		}
		c, ok := inspectContainer(t, cli, id)
		return ok && c.State.Running
	})

	// Gone from the manifest: removed. A module whose name a foreign
	// container holds fails; that container is left alone.
	a.send(t, desired(2, "dep-docker", map[string]mod{svc: svcMod, taken: dockerModule(image, nil)}))
	doc = waitReport(t, a.Agent, 30*time.Second, "crash removed, taken failed", func(d fleet.ReportedDocument) bool {
		_, has := d.Modules[crash]
		return d.LastDesiredVersion == 2 && !has && d.Modules[taken].RuntimeStatus == fleet.RuntimeFailed
	})
	if _, ok := inspectContainer(t, cli, ids[crash]); ok {
		t.Error("crash's container still exists")
	}
	if !strings.Contains(doc.Modules[taken].StatusDescription, "did not create") || doc.LastDesiredStatus.Code != fleet.StatusCodeFailed {
		t.Errorf("taken: %+v; status %+v", doc.Modules[taken], doc.LastDesiredStatus)
	}
	for _, id := range []string{foreign, squatter} {
		if c, ok := inspectContainer(t, cli, id); !ok || !c.State.Running || c.RestartCount != 0 {
			t.Errorf("a container the agent did not create was touched: %s", id)
		}
	}

	// The agent stops: its containers keep running, and a new agent adopts
	// them without recreating them.
	a.send(t, desired(3, "dep-docker", map[string]mod{svc: svcMod}))
	waitReport(t, a.Agent, 30*time.Second, "version 3", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredVersion == 3 && d.LastDesiredStatus.Code == fleet.StatusCodeOK
	})
	svcID := deviceContainers(t, cli, cfg.DeviceID)[svc]
	a.stop(t)
	if c, ok := inspectContainer(t, cli, svcID); !ok || !c.State.Running {
		t.Fatal("the container stopped with the agent")
	}
	cfg.Logger = testLogger(t)
	a2 := startAgent(t, cfg)
	waitReport(t, a2.Agent, 30*time.Second, "svc adopted", running(svc))
	if got := deviceContainers(t, cli, cfg.DeviceID); len(got) != 1 || got[svc] != svcID {
		t.Errorf("containers after the agent restarted: %v; want only %s", got, svcID)
	}

	// The empty desired state removes every container of the agent, and
	// only those.
	a2.send(t, fleet.DesiredDocument{Version: 4})
	waitFor(t, 30*time.Second, "no agent containers", func() bool { return len(deviceContainers(t, cli, cfg.DeviceID)) == 0 })
	for _, id := range []string{foreign, squatter} {
		if c, ok := inspectContainer(t, cli, id); !ok || !c.State.Running {
			t.Errorf("foreign container %s touched", id)
		}
	}
}

func TestDockerRuntime_PullPolicy(t *testing.T) {
	cli, image := dockerForTest(t)
	cfg := dockerConfig(t)
	removeDeviceContainers(t, cli, cfg.DeviceID)
	rec := &recordingHandler{}
	cfg.Logger = slogTee(cfg.Logger, rec)
	a := startAgent(t, cfg)
	suffix := randHex(3)
	registry := strings.Split(image, "/")[0]
	d := desired(1, "dep", map[string]mod{
		// on-create: the pull fails (the registry does not answer) and the
		// local image is used.
		"local-" + suffix: dockerModule(image, nil).with("imagePullPolicy", "on-create"),
		// never, and the image is not present: a clear failure.
		"absent-" + suffix: dockerModule(registry+"/appliance-agent-test/absent:1", nil),
	})
	d.ModulesContent = bytes.Replace(d.ModulesContent, []byte(`"settings":{}`),
		[]byte(`"settings":{"registryCredentials":{"test":{"username":"puller","password":"pull-pa55word","address":"`+registry+`"}}}`), 1)
	a.send(t, d)
	doc := waitReport(t, a.Agent, 60*time.Second, "local running, absent failed", func(d fleet.ReportedDocument) bool {
		return running("local-"+suffix)(d) && d.Modules["absent-"+suffix].RuntimeStatus == fleet.RuntimeFailed
	})
	if desc := doc.Modules["absent-"+suffix].StatusDescription; !strings.Contains(desc, "not present") {
		t.Errorf("absent: %q", desc)
	}
	if doc.LastDesiredStatus.Code != fleet.StatusCodeFailed {
		t.Errorf("status %+v; want 500", doc.LastDesiredStatus)
	}
	if !rec.has("image pull failed; using the local image") {
		t.Error("the failed pull was not reported")
	}
	if rec.contains("pull-pa55word") {
		t.Error("the registry password was logged")
	}
}

func TestDockerRuntime_ProcessModuleUnsupported(t *testing.T) {
	cli, _ := dockerForTest(t)
	cfg := dockerConfig(t)
	removeDeviceContainers(t, cli, cfg.DeviceID)
	a := startAgent(t, cfg)
	a.send(t, desired(1, "dep", map[string]mod{"native": processModule(t.TempDir(), nil)}))
	doc := waitReport(t, a.Agent, 30*time.Second, "417", func(d fleet.ReportedDocument) bool {
		return d.LastDesiredStatus.Code == fleet.StatusCodeUnsupportedRuntime
	})
	if m := doc.Modules["native"]; m.RuntimeStatus != fleet.RuntimeFailed || !strings.Contains(m.StatusDescription, "docker runtime") {
		t.Errorf("native: %+v", m)
	}
}

func TestDockerRuntime_UnhealthyRestartsOnUnhealthy(t *testing.T) {
	cli, image := dockerForTest(t)
	cfg := dockerConfig(t)
	removeDeviceContainers(t, cli, cfg.DeviceID)
	a := startAgent(t, cfg)
	// The health check runs a program the image does not have: the check
	// fails at once, and the container is unhealthy after its first check.
	// (A check that had to time out, the module binary itself, was flaky on
	// a busy engine: Docker sometimes never reported it.)
	sick := func(policy string) mod {
		return dockerModule(image, nil).with("restartPolicy", policy, "settings", map[string]any{
			"image":         image,
			"createOptions": `{"Healthcheck":{"Test":["CMD","/no-such-health-probe"],"Interval":200000000,"Timeout":1000000000,"Retries":1}}`,
		})
	}
	suffix := randHex(3)
	restarted, left := "unhealthy-"+suffix, "left-"+suffix
	a.send(t, desired(1, "dep", map[string]mod{restarted: sick("on-unhealthy"), left: sick("never")}))
	doc := waitReport(t, a.Agent, 60*time.Second, "restarts of the unhealthy module", func(d fleet.ReportedDocument) bool {
		return d.Modules[restarted].RestartCount >= 2 && d.Modules[left].RuntimeStatus == fleet.RuntimeUnhealthy
	})
	if m := doc.Modules[left]; m.RestartCount != 0 {
		t.Errorf("a never module was restarted for being unhealthy: %+v", m)
	}
	if doc.DeviceHealth != "unhealthy" {
		t.Errorf("deviceHealth %q", doc.DeviceHealth)
	}
}

func TestDockerRuntime_StateLost_AdoptsItsContainers(t *testing.T) {
	cli, image := dockerForTest(t)
	cfg := dockerConfig(t)
	// Without a hub: with one, a lost data dir means new module identities
	// (generation ids, keys, workload sockets), so containers are created
	// again with the new ones rather than adopted.
	cfg.Hub.Disabled = true
	removeDeviceContainers(t, cli, cfg.DeviceID)
	name := "keep-" + randHex(3)
	d := desired(1, "dep", map[string]mod{name: dockerModule(image, nil)})
	a1 := startAgent(t, cfg)
	a1.send(t, d)
	waitReport(t, a1.Agent, 30*time.Second, "running", running(name))
	id := deviceContainers(t, cli, cfg.DeviceID)[name]
	before, _ := inspectContainer(t, cli, id)
	a1.stop(t)

	// A new data dir: the agent has no record of the container, but its
	// labels say it is this device's, created from the same settings.
	cfg.DataDir = t.TempDir()
	cfg.Logger = testLogger(t)
	a2 := startAgent(t, cfg)
	a2.send(t, d)
	waitReport(t, a2.Agent, 30*time.Second, "running", running(name))
	if got := deviceContainers(t, cli, cfg.DeviceID); len(got) != 1 || got[name] != id {
		t.Errorf("containers %v; want the same container %s adopted", got, shortID(id))
	}
	c, _ := inspectContainer(t, cli, id)
	if c.State == nil || !c.State.Running || c.State.StartedAt != before.State.StartedAt {
		t.Errorf("the adopted container was restarted or stopped: %+v", c.State)
	}
}
