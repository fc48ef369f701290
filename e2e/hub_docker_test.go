//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/client"

	"appliance/fleet"
	"appliance/internal/testcontroller"
)

// buildEdgeModule compiles testdata/edgemodule (our own small IoT Edge
// module) as a static binary.
func buildEdgeModule(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "edgemodule")
	cmd := exec.Command("go", "build", "-o", out, "./testdata/edgemodule")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build testdata/edgemodule: %v\n%s", err, b)
	}
	return out
}

// buildModuleImage builds an image FROM scratch holding only bin as its
// entrypoint, and removes it when the test ends.
func buildModuleImage(t *testing.T, cli *client.Client, bin, tag string) {
	t.Helper()
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct {
		name string
		mode int64
		data []byte
	}{
		{"Dockerfile", 0o644, []byte("FROM scratch\nCOPY edgemodule /edgemodule\nENTRYPOINT [\"/edgemodule\"]\n")},
		{"edgemodule", 0o755, data},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.data))}); err != nil {
			t.Fatal(err)
		}
		tw.Write(f.data)
	}
	tw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := cli.ImageBuild(ctx, &buf, client.ImageBuildOptions{Tags: []string{tag}, Remove: true, ForceRemove: true})
	if err != nil {
		t.Fatalf("build the module image: %v", err)
	}
	dec := json.NewDecoder(res.Body)
	for {
		var m struct{ Error string }
		if err := dec.Decode(&m); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if m.Error != "" {
			t.Fatalf("build the module image: %s", m.Error)
		}
	}
	res.Body.Close()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = cli.ImageRemove(ctx, tag, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	})
}

// removeDeviceContainers removes the containers an agent created for a
// device (its label), when the test ends.
func removeDeviceContainers(t *testing.T, cli *client.Client, deviceID string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		list, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("label", "io.appliance.agent.device="+deviceID)})
		if err != nil {
			return
		}
		for _, c := range list.Items {
			_, _ = cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	})
}

// A docker-runtime agent: a module container built FROM scratch (our own
// small client) reaches the hub by its host name, verifies TLS from the
// trust bundle, and exchanges messages through routes with a process
// module of the same agent.
func TestHub_DockerModuleTalksToProcessModule(t *testing.T) {
	cli := dockerForCluster(t)
	bin := buildEdgeModule(t)
	var rnd [4]byte
	rand.Read(rnd[:])
	run := hex.EncodeToString(rnd[:])
	tag := "appliance-e2e-edgemodule:" + run
	buildModuleImage(t, cli, bin, tag)
	device := "hub-docker-" + run
	removeDeviceContainers(t, cli, device)
	ctr, proc := "edgectr"+run, "edgeproc"+run

	ctl := testcontroller.Start(t, device, slog.New(slog.NewTextHandler(io.Discard, nil)))
	modules := map[string]any{
		ctr: map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
			"env": map[string]any{"SEND_COUNT": map[string]any{"value": "3"}}, "settings": map[string]any{"image": tag}},
		proc: map[string]any{"type": "process", "status": "running", "restartPolicy": "always",
			"env": map[string]any{"SEND_COUNT": map[string]any{"value": "3"}}, "settings": map[string]any{"command": []string{bin}}},
	}
	to := func(m, input string) string {
		return fmt.Sprintf(`BrokeredEndpoint("/modules/%s/inputs/%s")`, m, input)
	}
	routes := map[string]any{
		"ctrToProc":  fmt.Sprintf("FROM /messages/modules/%s/outputs/out1 INTO %s", ctr, to(proc, "in1")),
		"procToCtr":  fmt.Sprintf("FROM /messages/modules/%s/outputs/out1 INTO %s", proc, to(ctr, "in1")),
		"ctrEchoes":  fmt.Sprintf("FROM /messages/modules/%s/outputs/echo INTO %s", ctr, to(proc, "echoes")),
		"procEchoes": fmt.Sprintf("FROM /messages/modules/%s/outputs/echo INTO %s", proc, to(ctr, "echoes")),
	}
	ctl.SetDesired(fleet.DesiredDocument{Version: 1, DeploymentID: "d1", ModulesContent: hubManifest(modules, routes)})
	agentDir := t.TempDir()
	startAgent(t, "--server", ctl.URL(), "--device-id", device, "--device-key", "k", "--data-dir", agentDir,
		"--runtime", "docker+process", "--hub-addr", testcontroller.FreeGateway(t)+":8883", "--hub-docker-addr", "auto", "--log-format", "json")

	// The process module's output says what it received: the container's
	// messages on in1, and its own messages echoed by the container.
	eventually(t, "the process module to hear from the container", 120*time.Second, func() bool {
		got := map[string]bool{}
		for _, l := range moduleOutput(agentDir, proc, "input") {
			props, _ := l["props"].(map[string]any)
			switch {
			case l["input"] == "in1" && props["$.cmid"] == ctr:
				got["from "+l["body"].(string)] = true
			case l["input"] == "echoes" && props["echoed-by"] == ctr && props["$.cmid"] == ctr:
				got["echo "+l["body"].(string)] = true
			}
		}
		for n := range 3 {
			if !got[fmt.Sprintf("from hello-%s-%d", ctr, n)] || !got[fmt.Sprintf("echo hello-%s-%d", proc, n)] {
				return false
			}
		}
		return true
	})
	doc := ctl.WaitReport(30*time.Second, "both modules connected to the hub", func(d fleet.ReportedDocument) bool {
		return d.Hub != nil && d.Hub.Clients[ctr].Status == "connected" && d.Hub.Clients[proc].Status == "connected"
	})
	if m := doc.Modules[ctr]; m.RuntimeStatus != fleet.RuntimeRunning || !strings.Contains(m.Settings.Image, "edgemodule") {
		t.Errorf("container module: %+v", m)
	}
}
