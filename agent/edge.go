package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sync"

	"appliance/fleet"
	"appliance/hub"
	"appliance/workload"
)

// edge is the agent's IoT Edge runtime beside the modules: the identity
// service (workload) and the device hub. It is absent when Config.Hub is
// disabled.
type edge struct {
	a  *Agent
	ws *workload.Service
	h  *hub.Hub
	// gateway is process modules' IOTEDGE_GATEWAYHOSTNAME; dockerIP the
	// address containers reach the hub at ("" when they do not).
	gateway  string
	dockerIP string

	mu      sync.Mutex
	session *session // set once the session exists
}

// openEdge opens the identity service and the hub's store. The hub
// listens once start is called.
func (a *Agent) openEdge(ctx context.Context) (*edge, error) {
	hc := a.cfg.Hub
	host, _, _ := net.SplitHostPort(hc.Addr)
	e := &edge{a: a, gateway: host}
	listen := []string{hc.Addr}
	names := []string{host, hc.Hostname, "localhost"}
	if gw, ok := a.drv.(interface {
		bridgeGateway(context.Context) (string, error)
	}); ok && hc.DockerAddr != HubOff {
		addr := hc.DockerAddr
		if addr == HubDockerAuto {
			ip, err := gw.bridgeGateway(ctx)
			if err != nil {
				a.log.Error("the device hub cannot listen for containers: Docker's bridge gateway is unknown (give --hub-docker-addr)", "err", err)
			} else {
				addr = net.JoinHostPort(ip, "8883")
			}
		}
		if addr != HubDockerAuto {
			ip, _, _ := net.SplitHostPort(addr)
			e.dockerIP = ip
			names = append(names, ip)
			if addr != hc.Addr {
				listen = append(listen, addr)
			}
		}
	}
	ws, err := workload.Open(workload.Config{
		Dir: filepath.Join(a.cfg.DataDir, "workload"), DeviceID: a.cfg.DeviceID, HubName: hc.Hostname,
		ServerNames: names, Logger: a.baseLog, PeerCheck: a.peerCheck,
	})
	var long *workload.SocketPathError
	if errors.As(err, &long) {
		return nil, fmt.Errorf("--data-dir %s is too long for the modules' workload sockets: give a shorter one (%w)", a.cfg.DataDir, err)
	}
	if err != nil {
		return nil, fmt.Errorf("module identities: %w", err)
	}
	h, err := hub.New(hub.Config{
		DeviceID: a.cfg.DeviceID, Listen: listen, TLS: ws.TLSConfig(), Auth: ws, Dir: a.cfg.DataDir,
		Upstream: e, OnChange: a.hubChanged, Logger: a.baseLog,
		Limits: hub.Limits{MaxStoreBytes: hc.MaxStoreBytes},
	})
	if err != nil {
		ws.Close()
		return nil, fmt.Errorf("device hub: %w", err)
	}
	e.ws, e.h = ws, h
	return e, nil
}

// start serves the workload API and the hub until ctx is done.
func (e *edge) start(ctx context.Context) error {
	if err := e.ws.Serve(ctx); err != nil {
		return err
	}
	e.h.Start(ctx)
	return nil
}

func (e *edge) close() {
	e.h.Close()
	e.ws.Close()
}

// apply gives the hub and the identity service a new plan: identities for
// exactly its modules, its routes and twins; and gives each module spec
// its IoT Edge environment (before the reconciler creates anything).
func (e *edge) apply(p *plan) error {
	names := make([]string, 0, len(p.modules))
	for n := range p.modules {
		names = append(names, n)
	}
	slices.Sort(names)
	if _, err := e.ws.Sync(names); err != nil {
		return err
	}
	e.h.Configure(hub.Configuration{Routes: p.routes, TimeToLive: p.ttl, Modules: names, Twins: p.twins})
	hc := e.a.cfg.Hub
	for _, s := range p.modules {
		id, ok := e.ws.Identity(s.Name)
		if !ok {
			continue
		}
		env := map[string]string{
			"IOTEDGE_IOTHUBHOSTNAME":     hc.Hostname,
			"IOTEDGE_MODULEGENERATIONID": id.GenerationID,
			"IOTEDGE_APIVERSION":         workload.APIVersion,
			"IOTEDGE_AUTHSCHEME":         workload.AuthScheme,
		}
		sock := e.ws.SocketDir(s.Name)
		s.Edge = &edgeSpec{Env: env}
		switch s.Type {
		case fleet.ModuleTypeProcess:
			env["IOTEDGE_GATEWAYHOSTNAME"] = e.gateway
			env["IOTEDGE_WORKLOADURI"] = "unix://" + filepath.Join(sock, workload.SocketName)
		default:
			env["IOTEDGE_GATEWAYHOSTNAME"] = hc.Hostname
			env["IOTEDGE_WORKLOADURI"] = "unix://" + workload.ContainerSocketDir + "/" + workload.SocketName
			s.Edge.WorkloadDir = sock
			if e.dockerIP != "" {
				s.Edge.ExtraHost = hc.Hostname + ":" + e.dockerIP
			}
		}
	}
	return nil
}

// PublishUpstream sends a batch over the controller session (hub.Upstream).
func (e *edge) PublishUpstream(ctx context.Context, batch []byte) error {
	e.mu.Lock()
	s := e.session
	e.mu.Unlock()
	if s == nil || !s.connected() {
		return errControllerDown
	}
	return s.publishTo(ctx, fleet.UpstreamTopic(e.a.cfg.DeviceID), batch)
}

func (e *edge) setSession(s *session) {
	e.mu.Lock()
	e.session = s
	e.mu.Unlock()
}
