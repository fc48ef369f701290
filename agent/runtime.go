package agent

import (
	"context"
	"errors"
	"time"
)

// errGone: the instance no longer exists in the runtime (a container
// removed behind the agent's back, a process instance of an earlier agent
// run). The reconciler creates a new one.
var errGone = errors.New("instance gone")

// driver is what the reconciler needs of a runtime. Handles are opaque
// strings the agent persists (a container id; a process instance id).
// Every method may be called from several goroutines at once, for
// different handles. A driver reports that something happened to an
// instance (it exited, was removed, changed health) by calling the notify
// function it was built with, which never blocks; the reconciler then
// inspects.
type driver interface {
	// Name is RuntimeDocker or RuntimeProcess.
	Name() string
	// Supports tells whether the driver can run modules of the type.
	Supports(moduleType string) bool
	// Create makes a new, stopped instance of the module (pulling its image
	// first if its pull policy says so).
	Create(ctx context.Context, spec *moduleSpec, creds []registryCredential) (handle string, err error)
	// Start starts an instance that is not running: the first time, or
	// again after it exited or was stopped.
	Start(ctx context.Context, handle string) error
	// Stop asks the instance to exit (SIGTERM) and kills it after timeout.
	// Stopping an instance that is not running is not an error.
	Stop(ctx context.Context, handle string, timeout time.Duration) error
	// Remove stops the instance if needed and deletes it. Removing an
	// instance that is gone is not an error.
	Remove(ctx context.Context, handle string) error
	// Inspect returns the instance's state, or errGone.
	Inspect(ctx context.Context, handle string) (instanceState, error)
	// Owned lists the instances this agent created that the runtime can
	// find without the agent's records (containers labelled with the
	// device id). The process driver returns none.
	Owned(ctx context.Context) ([]ownedInstance, error)
	// Close releases the driver. Docker containers keep running; process
	// modules are expected to have been stopped.
	Close() error
}

// ownedInstance is an instance the runtime knows to be this agent's, with
// the module and spec hash it was created for.
type ownedInstance struct {
	Handle, Module, Hash string
}

// instanceState is an instance as the runtime sees it.
type instanceState struct {
	Running bool
	// Health is "unhealthy" when the runtime's health check fails; other
	// values are informational.
	Health     string
	ExitCode   int
	StartedAt  time.Time // zero if it never started
	FinishedAt time.Time // zero if it never exited
	Error      string    // the runtime's error for the last start, if any
	removing   bool      // docker: being removed (by someone else)
}

// newDriver builds the configured runtime driver.
func newDriver(cfg Config, notify func()) (driver, error) {
	if cfg.runtime != nil {
		return cfg.runtime, nil
	}
	switch cfg.Runtime {
	case RuntimeProcess:
		return newProcessDriver(cfg, notify)
	case RuntimeDocker:
		return newDockerDriver(cfg, notify)
	case RuntimeDockerProcess:
		d, err := newDockerDriver(cfg, notify)
		if err != nil {
			return nil, err
		}
		p, err := newProcessDriver(cfg, notify)
		if err != nil {
			d.Close()
			return nil, err
		}
		return &bothDriver{docker: d, process: p}, nil
	}
	return nil, configErr("Runtime %q unknown", cfg.Runtime)
}

// bothDriver runs docker modules as containers and process modules as the
// agent's children (RuntimeDockerProcess). A handle belongs to the docker
// driver if it is a container id (64 hex digits), else to the process
// driver (whose handles are <module>.<run>.<n>).
type bothDriver struct {
	docker, process driver
}

func isContainerID(h string) bool {
	if len(h) != 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (b *bothDriver) of(handle string) driver {
	if isContainerID(handle) {
		return b.docker
	}
	return b.process
}

func (b *bothDriver) Name() string { return RuntimeDockerProcess }

func (b *bothDriver) Supports(t string) bool { return b.docker.Supports(t) || b.process.Supports(t) }

func (b *bothDriver) Create(ctx context.Context, spec *moduleSpec, creds []registryCredential) (string, error) {
	if b.process.Supports(spec.Type) {
		return b.process.Create(ctx, spec, creds)
	}
	return b.docker.Create(ctx, spec, creds)
}

func (b *bothDriver) Start(ctx context.Context, h string) error { return b.of(h).Start(ctx, h) }
func (b *bothDriver) Stop(ctx context.Context, h string, timeout time.Duration) error {
	return b.of(h).Stop(ctx, h, timeout)
}
func (b *bothDriver) Remove(ctx context.Context, h string) error { return b.of(h).Remove(ctx, h) }
func (b *bothDriver) Inspect(ctx context.Context, h string) (instanceState, error) {
	return b.of(h).Inspect(ctx, h)
}
func (b *bothDriver) Owned(ctx context.Context) ([]ownedInstance, error) { return b.docker.Owned(ctx) }

func (b *bothDriver) Close() error {
	err := b.process.Close()
	if e := b.docker.Close(); err == nil {
		err = e
	}
	return err
}

// bridgeGateway and checkPeer are the docker and process drivers'.
func (b *bothDriver) bridgeGateway(ctx context.Context) (string, error) {
	if g, ok := b.docker.(interface {
		bridgeGateway(context.Context) (string, error)
	}); ok {
		return g.bridgeGateway(ctx)
	}
	return "", errors.New("no Docker driver")
}

func (b *bothDriver) checkPeer(module string, pid int) error {
	if c, ok := b.process.(interface{ checkPeer(string, int) error }); ok {
		return c.checkPeer(module, pid)
	}
	return nil
}

// childHandle tells whether an instance is the agent's child process,
// stopped when the agent stops (containers keep running).
func childHandle(drv driver, h string) bool {
	switch drv.Name() {
	case RuntimeProcess:
		return true
	case RuntimeDockerProcess:
		return !isContainerID(h)
	}
	return false
}
