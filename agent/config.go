package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"appliance/fleet"
	"appliance/linelog"
)

// Runtimes an agent can drive (Config.Runtime).
const (
	// RuntimeDocker runs modules of type "docker" as containers of the local
	// Docker Engine (DOCKER_HOST or the default socket).
	RuntimeDocker = "docker"
	// RuntimeProcess runs modules of type "process" as child processes of
	// the agent.
	RuntimeProcess = "process"
	// RuntimeDockerProcess runs both: docker modules as containers, process
	// modules as children (a device with Docker that also runs programs).
	RuntimeDockerProcess = "docker+process"
)

// Defaults for the zero fields of Config and RestartConfig. The restart
// values are edgeAgent's (appsettings_agent.json and RestartPolicyManager).
const (
	DefaultCoolOff        = 10 * time.Second
	DefaultMaxCoolOff     = 5 * time.Minute
	DefaultMaxRestarts    = 20
	DefaultHealthyReset   = 10 * time.Minute
	DefaultReportInterval = 200 * time.Millisecond
	DefaultResyncInterval = 10 * time.Second
	DefaultStopTimeout    = 10 * time.Second
	DefaultReconnectMin   = time.Second
	DefaultReconnectMax   = 15 * time.Second
	DefaultConnectTimeout = 10 * time.Second
	DefaultReturnMin      = time.Minute
	DefaultReturnMax      = 10 * time.Minute
	// DefaultKeepAlive: a controller cut off by the network is noticed
	// within about two keepalives (no ping answer), then the next is tried.
	DefaultKeepAlive         = 15 * time.Second
	DefaultOperationTimeout  = 5 * time.Minute
	defaultDockerStopSeconds = 10
)

// Errors returned by New and Run.
var (
	// ErrConfig: the configuration is unusable; the message says which field.
	ErrConfig = errors.New("agent config")
	// ErrDataDirLocked: another agent holds the data directory's state file.
	ErrDataDirLocked = errors.New("agent data dir in use by another agent")
	// ErrAlreadyRunning: Run was called twice.
	ErrAlreadyRunning = errors.New("agent already running")
)

// Config configures an Agent. Zero fields take the defaults above; DeviceID,
// DeviceKey, Servers and DataDir are required.
type Config struct {
	// Servers are the controller nodes' MQTT endpoints:
	// "mqtts://host:port" (TLS, port 8883 if omitted) or "mqtt://host:port"
	// (plain TCP, port 1883 if omitted: only on a network where the device
	// key may travel in clear); "tls://", "ssl://" and "tcp://" are
	// accepted as aliases. A bare "host:port" means mqtts:// when CAFile or
	// TLSConfig is set and is refused otherwise: the agent never picks
	// plaintext for a server whose scheme was left out.
	//
	// The agent tries them in an order of its own, the same on every
	// start and whatever the order of the list (internal/spread: a stable
	// hash of the device id and each host:port), so that devices given
	// the same list spread evenly over the nodes: it connects to the first
	// (its preferred server), moves to the next one after a connection
	// fails or drops, and returns to its preferred server once that
	// admits it again (ReturnMin, ReturnMax).
	Servers []string
	// DeviceID is the MQTT username and client id.
	DeviceID string
	// DeviceKey is the MQTT password. It is never logged.
	DeviceKey string
	// EnrollToken, instead of DeviceKey, enrolls the device through an
	// enrollment group: the agent makes a key of its own (32 random bytes,
	// stored in its state before it is first sent) and presents it with
	// the proof derived from the token (fleet.EnrollmentKey). The
	// controller registers the device with that key only, so the token
	// alone, which every device of the group holds, opens no device.
	EnrollToken string
	// DataDir holds the agent's state (agent.db), the default working
	// directories of process modules and their pid records. Created 0700.
	DataDir string
	// Runtime is RuntimeDocker (default), RuntimeProcess or
	// RuntimeDockerProcess.
	Runtime string
	// CAFile is a PEM bundle that verifies mqtts servers; "" uses the
	// system roots.
	CAFile string
	// TLSConfig, when set, is used for mqtts servers as it is (CAFile is
	// then ignored). For tests and embedding.
	TLSConfig *tls.Config
	// Logger receives the agent's logs, tagged component=agent. The agent
	// also keeps them in <DataDir>/logs/edgeAgent.log (Logs), for the
	// GetModuleLogs direct method and the support bundle. Module output
	// never goes to it: a process module's stdout and stderr are kept in
	// <DataDir>/logs/modules/<name>.log. nil: slog.Default().
	Logger *slog.Logger
	// Version is the agent's build, reported as "version".
	Version string
	// DockerHost overrides DOCKER_HOST for the docker runtime, e.g.
	// "unix:///var/run/docker.sock".
	DockerHost string

	// Hub configures the device hub (routes, store-and-forward, module
	// twins, direct methods) and the modules' identity service.
	Hub HubConfig

	// Restart tunes restart policies and their backoff.
	Restart RestartConfig
	// Logs bounds the log files the agent keeps on the device: its own,
	// and each process module's output. Default: rotated at 10 MiB, 3
	// files kept (linelog.DefaultMaxFileBytes, DefaultMaxFiles), so at
	// most about 30 MiB per log. A docker module's output is the Docker
	// Engine's (its log driver's limits apply).
	Logs linelog.Config
	// ReportInterval is the least time between two reported documents;
	// changes within it are coalesced into one. Default 200 ms.
	ReportInterval time.Duration
	// ResyncInterval is how often the agent re-inspects its modules and
	// retries failed operations when nothing else wakes it. Default 10 s.
	ResyncInterval time.Duration
	// StopTimeout is how long a module gets to exit after SIGTERM (docker
	// stop's timeout) before it is killed. Default 10 s.
	StopTimeout time.Duration
	// OperationTimeout bounds one runtime operation (a pull, a create).
	// Default 5 min.
	OperationTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the jittered exponential backoff
	// between rounds of connection attempts. Defaults 1 s and 15 s.
	ReconnectMin, ReconnectMax time.Duration
	// ConnectTimeout bounds one connection attempt (TCP, TLS, CONNECT).
	// Default 10 s.
	ConnectTimeout time.Duration
	// ReturnMin and ReturnMax bound the jittered exponential backoff
	// between checks of the preferred server while the agent is connected
	// to another one: the n-th check in a row that finds it away waits a
	// random time between half and all of ReturnMin·2^(n-1), capped at
	// ReturnMax. A check is a connection of its own (TLS, CONNECT,
	// DISCONNECT); only once the preferred server admits the device does
	// the agent leave the server it is on. Defaults 1 min and 10 min: a
	// node back after a short outage gets its devices back within about a
	// minute, spread over that minute, never all at once.
	ReturnMin, ReturnMax time.Duration
	// KeepAlive is the MQTT keepalive. Default 15 s.
	KeepAlive time.Duration

	// runtime replaces the runtime driver (tests only).
	runtime driver
}

// Defaults of HubConfig.
const (
	// DefaultHubAddr is where process modules reach the hub: port 8883 (the
	// Azure SDKs' fixed port) on the loopback address.
	DefaultHubAddr = "127.0.0.1:8883"
	// DefaultHubHostname is the name containers reach the hub by (the agent
	// adds it to each container's /etc/hosts) and the IoT hub host name
	// modules are given (IOTEDGE_IOTHUBHOSTNAME).
	DefaultHubHostname = "appliance-hub"
	// HubDockerAuto: the hub listens for containers on the Docker bridge
	// network's gateway address, port 8883.
	HubDockerAuto = "auto"
	// HubOff: the hub does not listen for containers (HubConfig.DockerAddr).
	HubOff = "off"
)

// HubConfig configures the device hub.
type HubConfig struct {
	// Disabled runs no hub: modules get no IOTEDGE_* environment beyond
	// their device and module ids.
	Disabled bool
	// Addr is the hub's address for process modules, host:port; the host
	// is their IOTEDGE_GATEWAYHOSTNAME. Default DefaultHubAddr. Modules of
	// the Azure SDKs connect to port 8883 only: several agents on one
	// machine use distinct 127.0.0.x addresses.
	Addr string
	// DockerAddr is where the hub listens for containers, host:port:
	// HubDockerAuto ("" too) asks Docker for its bridge network's gateway
	// (containers reach the host there, on any network); HubOff listens
	// for none. Only with the docker runtime.
	DockerAddr string
	// Hostname is what containers call the hub (IOTEDGE_GATEWAYHOSTNAME,
	// mapped to DockerAddr's host in their /etc/hosts) and the IoT hub name
	// every module is given. Default DefaultHubHostname.
	Hostname string
	// MaxStoreBytes caps the messages queued on disk for sinks that do not
	// take them; beyond it the oldest are dropped and counted. Default
	// hub.DefaultMaxStoreBytes (1 GiB).
	MaxStoreBytes int64
}

// RestartConfig tunes restart policies. Defaults are edgeAgent's: a module
// that must be restarted waits CoolOff·2^restartCount (at most MaxCoolOff)
// after it exited; after MaxRestarts restarts it is left "dead"; a module
// that has run HealthyReset without exiting has its restart count cleared.
type RestartConfig struct {
	CoolOff      time.Duration
	MaxCoolOff   time.Duration
	MaxRestarts  int
	HealthyReset time.Duration
}

func (r RestartConfig) withDefaults() RestartConfig {
	if r.CoolOff == 0 {
		r.CoolOff = DefaultCoolOff
	}
	if r.MaxCoolOff == 0 {
		r.MaxCoolOff = DefaultMaxCoolOff
	}
	if r.MaxRestarts == 0 {
		r.MaxRestarts = DefaultMaxRestarts
	}
	if r.HealthyReset == 0 {
		r.HealthyReset = DefaultHealthyReset
	}
	return r
}

// coolOff is the wait before restart number restartCount+1.
func (r RestartConfig) coolOff(restartCount int) time.Duration {
	d := r.CoolOff
	for i := 0; i < restartCount && d < r.MaxCoolOff; i++ {
		d *= 2
	}
	return min(d, r.MaxCoolOff)
}

func (c Config) withDefaults() Config {
	if c.Runtime == "" {
		c.Runtime = RuntimeDocker
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.Restart = c.Restart.withDefaults()
	if c.ReportInterval == 0 {
		c.ReportInterval = DefaultReportInterval
	}
	if c.ResyncInterval == 0 {
		c.ResyncInterval = DefaultResyncInterval
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.OperationTimeout == 0 {
		c.OperationTimeout = DefaultOperationTimeout
	}
	if c.ReconnectMin == 0 {
		c.ReconnectMin = DefaultReconnectMin
	}
	if c.ReconnectMax == 0 {
		c.ReconnectMax = DefaultReconnectMax
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.KeepAlive == 0 {
		c.KeepAlive = DefaultKeepAlive
	}
	if c.ReturnMin == 0 {
		c.ReturnMin = DefaultReturnMin
	}
	if c.ReturnMax == 0 {
		c.ReturnMax = max(DefaultReturnMax, c.ReturnMin)
	}
	if c.Hub.Addr == "" {
		c.Hub.Addr = DefaultHubAddr
	}
	if c.Hub.DockerAddr == "" {
		c.Hub.DockerAddr = HubDockerAuto
	}
	if c.Hub.Hostname == "" {
		c.Hub.Hostname = DefaultHubHostname
	}
	return c
}

func configErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, args...))
}

func (c Config) validate() error {
	if err := fleet.ValidateDeviceID(c.DeviceID); err != nil {
		return configErr("DeviceID: %v", err)
	}
	switch {
	case c.DeviceKey != "" && c.EnrollToken != "":
		return configErr("give DeviceKey or EnrollToken, not both")
	case c.DeviceKey == "" && c.EnrollToken == "":
		return configErr("DeviceKey or EnrollToken is required")
	case c.EnrollToken != "":
		if _, err := fleet.DeriveDeviceKey(c.EnrollToken, c.DeviceID); err != nil {
			return configErr("EnrollToken: %v", err)
		}
	}
	if c.DataDir == "" {
		return configErr("DataDir is required")
	}
	if len(c.Servers) == 0 {
		return configErr("Servers: at least one server is required")
	}
	if c.Runtime != RuntimeDocker && c.Runtime != RuntimeProcess && c.Runtime != RuntimeDockerProcess {
		return configErr("Runtime %q: must be %q, %q or %q", c.Runtime, RuntimeDocker, RuntimeProcess, RuntimeDockerProcess)
	}
	r := c.Restart
	switch {
	case r.CoolOff < 0, r.MaxCoolOff < 0, r.HealthyReset < 0:
		return configErr("Restart: durations must not be negative")
	case r.MaxRestarts < 0:
		return configErr("Restart.MaxRestarts %d is negative", r.MaxRestarts)
	case c.ReportInterval < 0, c.ResyncInterval <= 0, c.StopTimeout < 0, c.OperationTimeout <= 0,
		c.ReconnectMin < 0, c.ReconnectMax < c.ReconnectMin, c.ConnectTimeout <= 0,
		c.ReturnMin < 0, c.ReturnMax < c.ReturnMin:
		return configErr("intervals and timeouts must be positive (ReconnectMax ≥ ReconnectMin, ReturnMax ≥ ReturnMin)")
	case c.KeepAlive < time.Second || c.KeepAlive > 65535*time.Second:
		return configErr("KeepAlive %s is outside 1s..65535s", c.KeepAlive)
	case c.Hub.MaxStoreBytes < 0:
		return configErr("Hub.MaxStoreBytes %d is negative", c.Hub.MaxStoreBytes)
	case c.Logs.MaxFileBytes < 0 || c.Logs.MaxFiles < 0:
		return configErr("Logs: MaxFileBytes and MaxFiles must not be negative")
	case c.Logs.MaxFileBytes > 0 && c.Logs.MaxFileBytes < minLogFileBytes:
		return configErr("Logs.MaxFileBytes %d is below %d", c.Logs.MaxFileBytes, minLogFileBytes)
	}
	if c.Hub.Disabled {
		return nil
	}
	if _, _, err := net.SplitHostPort(c.Hub.Addr); err != nil {
		return configErr("Hub.Addr %q: %v (give host:port, e.g. 127.0.0.2:8883)", c.Hub.Addr, err)
	}
	if d := c.Hub.DockerAddr; d != HubDockerAuto && d != HubOff {
		if _, _, err := net.SplitHostPort(d); err != nil {
			return configErr("Hub.DockerAddr %q: %v (give host:port, %q or %q)", d, err, HubDockerAuto, HubOff)
		}
	}
	if strings.ContainsAny(c.Hub.Hostname, "/: ") {
		return configErr("Hub.Hostname %q is not a host name", c.Hub.Hostname)
	}
	return nil
}

// ServerError is a Config.Servers entry the agent cannot use. It matches
// ErrConfig.
type ServerError struct {
	Server string // as given
	Reason string
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("%v: server %q: %s", ErrConfig, e.Server, e.Reason)
}

func (e *ServerError) Is(target error) bool { return target == ErrConfig }

// parseServers turns Config.Servers into URLs with explicit ports and the
// schemes autopaho knows ("mqtt" or "mqtts"). tlsConfigured (a CA file or
// a TLS configuration is given) makes a server without a scheme mqtts;
// without it such a server is refused.
func parseServers(servers []string, tlsConfigured bool) ([]*url.URL, error) {
	var out []*url.URL
	for _, given := range servers {
		s := strings.TrimSpace(given)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "://") {
			if !tlsConfigured {
				return nil, &ServerError{given, "no scheme: write mqtts://" + s + " (TLS, verified with a CA file) or mqtt://" + s + " (plaintext: the device key would cross the network in clear)"}
			}
			s = "mqtts://" + s
		}
		u, err := url.Parse(s)
		if err != nil {
			return nil, &ServerError{given, err.Error()}
		}
		var port string
		switch strings.ToLower(u.Scheme) {
		case "mqtt", "tcp":
			u.Scheme, port = "mqtt", "1883"
		case "mqtts", "tls", "ssl":
			u.Scheme, port = "mqtts", "8883"
		default:
			return nil, &ServerError{given, "scheme must be mqtts:// or mqtt://"}
		}
		if u.Hostname() == "" {
			return nil, &ServerError{given, "no host"}
		}
		if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return nil, &ServerError{given, "give only scheme://host:port"}
		}
		if u.Port() == "" {
			u.Host = net.JoinHostPort(u.Hostname(), port)
		}
		u.Path = ""
		out = append(out, u)
	}
	if len(out) == 0 {
		return nil, configErr("Servers: at least one server is required")
	}
	return out, nil
}

// tlsConfig builds the client TLS configuration for mqtts servers.
func (c Config) tlsConfig() (*tls.Config, error) {
	if c.TLSConfig != nil {
		return c.TLSConfig.Clone(), nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, configErr("CAFile: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, configErr("CAFile %s: no PEM certificates", c.CAFile)
	}
	cfg.RootCAs = pool
	return cfg, nil
}

// dbPath is the state file in the data dir.
func (c Config) dbPath() string { return filepath.Join(c.DataDir, "agent.db") }

// minLogFileBytes is the smallest Logs.MaxFileBytes: a file must hold a
// few records of the longest kind.
const minLogFileBytes = 64 << 10

// agentLogPath is the agent's own log; moduleLogPath a process module's
// output.
func (c Config) agentLogPath() string {
	return filepath.Join(c.DataDir, "logs", fleet.AgentLogModule+".log")
}

func (c Config) moduleLogPath(module string) string {
	return filepath.Join(c.DataDir, "logs", "modules", module+".log")
}
