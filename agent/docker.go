package agent

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/registry"
	"github.com/moby/moby/client"

	"appliance/fleet"
	"appliance/workload"
)

// Labels on every container the agent creates. A container is the agent's
// if and only if labelDevice holds its device id; nothing else is touched.
const (
	labelOwner      = "io.appliance.agent.owner" // always "appliance-agent"
	labelDevice     = "io.appliance.agent.device"
	labelModule     = "io.appliance.agent.module"
	labelDeployment = "io.appliance.agent.deployment"
	labelHash       = "io.appliance.agent.config-hash"
	ownerValue      = "appliance-agent"
)

// dockerDriver runs docker modules as containers of the Docker Engine.
// Containers are named after their module, created with the Docker restart
// policy "no" (the agent applies the manifest's restartPolicy itself, with
// its backoff and counts), and keep running when the agent stops.
type dockerDriver struct {
	cli      *client.Client
	log      *slog.Logger
	deviceID string
	notify   func()

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newDockerDriver(cfg Config, notify func()) (driver, error) {
	opts := []client.Opt{client.FromEnv}
	if cfg.DockerHost != "" {
		opts = append(opts, client.WithHost(cfg.DockerHost))
	}
	cli, err := client.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &dockerDriver{cli: cli, log: cfg.Logger, deviceID: cfg.DeviceID, notify: notify, cancel: cancel}
	d.wg.Add(1)
	go d.watchEvents(ctx)
	return d, nil
}

func (d *dockerDriver) Name() string { return RuntimeDocker }

func (d *dockerDriver) Supports(moduleType string) bool { return moduleType == fleet.ModuleTypeDocker }

// watchEvents turns the engine's events about this device's containers
// into notifications, reconnecting with backoff when the stream breaks.
func (d *dockerDriver) watchEvents(ctx context.Context) {
	defer d.wg.Done()
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		f := make(client.Filters).Add("type", "container").Add("label", labelDevice+"="+d.deviceID)
		res := d.cli.Events(ctx, client.EventsListOptions{Filters: f})
		d.notify() // anything may have happened while not watching
	loop:
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-res.Messages:
				backoff = 500 * time.Millisecond
				switch m.Action {
				case "die", "destroy", "stop", "start", "kill", "oom":
					d.notify()
				default:
					if strings.HasPrefix(string(m.Action), "health_status") {
						d.notify()
					}
				}
			case err := <-res.Err:
				if ctx.Err() == nil {
					d.log.Debug("docker event stream ended; reconnecting", "err", err)
				}
				break loop
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

func (d *dockerDriver) Create(ctx context.Context, spec *moduleSpec, creds []registryCredential) (string, error) {
	if spec.Image == "" {
		return "", errors.New("settings.image is empty")
	}
	if err := d.ensureImage(ctx, spec, creds); err != nil {
		return "", err
	}
	req, err := decodeCreateOptions(spec.CreateOptions)
	if err != nil {
		return "", err
	}
	cfg := req.Config
	cfg.Image = spec.Image
	cfg.Env = mergeEnv(cfg.Env, envList(d.deviceID, spec))
	if cfg.Labels == nil {
		cfg.Labels = map[string]string{}
	}
	cfg.Labels[labelOwner] = ownerValue
	cfg.Labels[labelDevice] = d.deviceID
	cfg.Labels[labelModule] = spec.Name
	cfg.Labels[labelDeployment] = spec.Deployment
	cfg.Labels[labelHash] = spec.hash()
	hc := req.HostConfig
	if hc == nil {
		hc = &container.HostConfig{}
	}
	hc.RestartPolicy = container.RestartPolicy{Name: container.RestartPolicyDisabled}
	if e := spec.Edge; e != nil {
		// The module's own workload socket directory, as IoT Edge mounts it,
		// and the hub's name.
		if e.WorkloadDir != "" {
			hc.Binds = append(hc.Binds, e.WorkloadDir+":"+workload.ContainerSocketDir)
		}
		if e.ExtraHost != "" {
			hc.ExtraHosts = append(hc.ExtraHosts, e.ExtraHost)
		}
	}
	opts := client.ContainerCreateOptions{Config: cfg, HostConfig: hc, NetworkingConfig: req.NetworkingConfig, Name: spec.Name}
	res, err := d.cli.ContainerCreate(ctx, opts)
	if cerrdefs.IsConflict(err) {
		// A container has the module's name. If it is ours (an earlier
		// create whose id was never recorded), replace it; never touch
		// anyone else's.
		ins, ierr := d.cli.ContainerInspect(ctx, spec.Name, client.ContainerInspectOptions{})
		if ierr != nil || !d.owns(ins.Container.Config) {
			return "", fmt.Errorf("a container named %q exists that this agent did not create; it is left untouched", spec.Name)
		}
		if err := d.removeAndWait(ctx, ins.Container.ID); err != nil {
			return "", fmt.Errorf("remove stale container %s: %w", shortID(ins.Container.ID), err)
		}
		res, err = d.cli.ContainerCreate(ctx, opts)
	}
	if err != nil {
		return "", fmt.Errorf("create container: %w", err)
	}
	for _, w := range res.Warnings {
		d.log.Warn("docker create warning", "module", spec.Name, "warning", w)
	}
	return res.ID, nil
}

// bridgeGateway is the address of the host on Docker's default bridge
// network: containers on any network reach the host there.
func (d *dockerDriver) bridgeGateway(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := d.cli.NetworkInspect(ctx, "bridge", client.NetworkInspectOptions{})
	if err != nil {
		return "", fmt.Errorf("inspect Docker's bridge network: %w", err)
	}
	for _, c := range res.Network.IPAM.Config {
		switch {
		case c.Gateway.Is4():
			return c.Gateway.String(), nil
		case c.Subnet.Addr().Is4():
			// Engines that do not list the gateway use the subnet's first
			// address for it.
			return c.Subnet.Masked().Addr().Next().String(), nil
		}
	}
	return "", errors.New("Docker's bridge network has no IPv4 subnet")
}

// decodeCreateOptions reads a module's createOptions (the chunks joined)
// as Docker's create request, the way the engine would: encoding/json,
// member names matched without regard to case (fleet.ValidateContent has
// refused any top-level name spelled otherwise than Docker's). Config is
// never nil.
func decodeCreateOptions(opts string) (container.CreateRequest, error) {
	var req container.CreateRequest
	if strings.TrimSpace(opts) != "" {
		if err := json.Unmarshal([]byte(opts), &req); err != nil {
			return req, fmt.Errorf("settings.createOptions: %s", describeJSONError([]byte(opts), err))
		}
	}
	if req.Config == nil {
		req.Config = &container.Config{}
	}
	return req, nil
}

// removeAndWait force-removes a container and waits until the engine has
// let go of it (and of its name).
func (d *dockerDriver) removeAndWait(ctx context.Context, id string) error {
	_, err := d.cli.ContainerRemove(ctx, id, client.ContainerRemoveOptions{Force: true})
	if err != nil && !cerrdefs.IsNotFound(err) && !cerrdefs.IsConflict(err) { // conflict: removal already in progress
		return err
	}
	for i := 0; i < 100; i++ {
		_, err := d.cli.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
		if cerrdefs.IsNotFound(err) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return errors.New("still present 10s after its removal")
}

func (d *dockerDriver) owns(cfg *container.Config) bool {
	return cfg != nil && cfg.Labels[labelDevice] == d.deviceID && cfg.Labels[labelOwner] == ownerValue
}

// ensureImage honours imagePullPolicy. on-create pulls; if the pull fails
// and the image is present, the local image is used (an air-gapped device
// keeps working), with a warning. never requires the image to be present.
func (d *dockerDriver) ensureImage(ctx context.Context, spec *moduleSpec, creds []registryCredential) error {
	_, ierr := d.cli.ImageInspect(ctx, spec.Image)
	present := ierr == nil
	if spec.ImagePullPolicy == pullNever {
		if !present {
			return fmt.Errorf("image %s is not present and imagePullPolicy is never", spec.Image)
		}
		return nil
	}
	perr := d.pull(ctx, spec.Image, creds)
	if perr == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if present {
		d.log.Warn("image pull failed; using the local image", "module", spec.Name, "image", spec.Image, "err", perr)
		return nil
	}
	return fmt.Errorf("pull %s: %w", spec.Image, perr)
}

func (d *dockerDriver) pull(ctx context.Context, image string, creds []registryCredential) error {
	ref, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return fmt.Errorf("image reference: %w", err)
	}
	var opts client.ImagePullOptions
	if c, ok := credentialFor(reference.Domain(ref), creds); ok {
		auth, err := encodeAuth(c)
		if err != nil {
			return err
		}
		opts.RegistryAuth = auth
	}
	resp, err := d.cli.ImagePull(ctx, image, opts)
	if err != nil {
		return err
	}
	defer resp.Close()
	return resp.Wait(ctx)
}

// credentialFor finds the credential whose address is the image's registry.
func credentialFor(domain string, creds []registryCredential) (registryCredential, bool) {
	norm := func(s string) string {
		s = strings.ToLower(strings.TrimSpace(s))
		s = strings.TrimPrefix(strings.TrimPrefix(s, "https://"), "http://")
		s, _, _ = strings.Cut(s, "/")
		switch s {
		case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
			s = "docker.io"
		}
		return s
	}
	want := norm(domain)
	for _, c := range creds {
		if norm(c.Address) == want {
			return c, true
		}
	}
	return registryCredential{}, false
}

func encodeAuth(c registryCredential) (string, error) {
	b, err := json.Marshal(registry.AuthConfig{Username: c.Username, Password: c.Password, ServerAddress: c.Address})
	if err != nil {
		return "", err
	}
	return base64.URLEncoding.EncodeToString(b), nil
}

// mergeEnv appends the module's variables to createOptions' Env; the
// manifest's env wins over createOptions for the same name.
func mergeEnv(base, module []string) []string {
	names := map[string]bool{}
	for _, kv := range module {
		k, _, _ := strings.Cut(kv, "=")
		names[k] = true
	}
	var out []string
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !names[k] {
			out = append(out, kv)
		}
	}
	return append(out, module...)
}

func (d *dockerDriver) Start(ctx context.Context, h string) error {
	_, err := d.cli.ContainerStart(ctx, h, client.ContainerStartOptions{})
	if cerrdefs.IsNotFound(err) {
		return errGone
	}
	if err != nil {
		// Removed (or being removed) behind the agent's back: gone.
		if st, ierr := d.Inspect(ctx, h); errors.Is(ierr, errGone) || st.removing {
			return errGone
		}
		return fmt.Errorf("start container: %w", err)
	}
	return nil
}

func (d *dockerDriver) Stop(ctx context.Context, h string, timeout time.Duration) error {
	secs := int((timeout + time.Second - 1) / time.Second)
	_, err := d.cli.ContainerStop(ctx, h, client.ContainerStopOptions{Timeout: &secs})
	if cerrdefs.IsNotFound(err) {
		return errGone
	}
	if err != nil {
		return fmt.Errorf("stop container: %w", err)
	}
	return nil
}

func (d *dockerDriver) Remove(ctx context.Context, h string) error {
	_, err := d.cli.ContainerRemove(ctx, h, client.ContainerRemoveOptions{Force: true})
	if err != nil && !cerrdefs.IsNotFound(err) {
		return fmt.Errorf("remove container: %w", err)
	}
	return nil
}

func (d *dockerDriver) Inspect(ctx context.Context, h string) (instanceState, error) {
	res, err := d.cli.ContainerInspect(ctx, h, client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return instanceState{}, errGone
	}
	if err != nil {
		return instanceState{}, fmt.Errorf("inspect container: %w", err)
	}
	c := res.Container
	if !d.owns(c.Config) {
		// The id is not one of ours (never expected): treat it as gone so
		// that the agent creates its own and leaves this one alone.
		return instanceState{}, errGone
	}
	var st instanceState
	if s := c.State; s != nil {
		st.Running = s.Running || s.Restarting
		st.ExitCode = s.ExitCode
		st.Error = s.Error
		st.StartedAt = dockerTime(s.StartedAt)
		st.FinishedAt = dockerTime(s.FinishedAt)
		if s.Health != nil {
			st.Health = string(s.Health.Status)
		}
		if s.Status == container.StateRemoving || s.Status == container.StateDead {
			st.Running = false
			st.removing = true
		}
	}
	return st, nil
}

// dockerTime parses the engine's timestamps; its zero time is
// "0001-01-01T00:00:00Z".
func dockerTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil || t.Year() <= 1 {
		return time.Time{}
	}
	return t
}

func (d *dockerDriver) Owned(ctx context.Context) ([]ownedInstance, error) {
	f := make(client.Filters).Add("label", labelDevice+"="+d.deviceID)
	res, err := d.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: f})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	var out []ownedInstance
	for _, c := range res.Items {
		if c.Labels[labelOwner] == ownerValue && c.Labels[labelDevice] == d.deviceID {
			out = append(out, ownedInstance{Handle: c.ID, Module: c.Labels[labelModule], Hash: c.Labels[labelHash]})
		}
	}
	return out, nil
}

func (d *dockerDriver) Close() error {
	d.cancel()
	d.wg.Wait()
	return d.cli.Close()
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
