package cli

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/agent"
	"appliance/fleet"
	"appliance/linelog"
)

// agentEnv is the prefix of the agent's environment fallbacks, one per flag:
// APPLIANCE_AGENT_SERVER, _DEVICE_ID, _DEVICE_KEY (or _DEVICE_KEY_FILE),
// _ENROLL_TOKEN (or _ENROLL_TOKEN_FILE), _RUNTIME, _DATA_DIR, _CA_FILE,
// _HUB_ADDR, _HUB_DOCKER_ADDR, _HUB_HOSTNAME.
const agentEnv = "APPLIANCE_AGENT_"

func (a *app) agentCommand() *cobra.Command {
	var (
		servers, deviceID, runtime, dataDir, caFile string
		logFormat, logLevel                         string
		coolOff, keepAlive, returnMin, returnMax    time.Duration
		maxRestarts                                 int
		hubAddr, hubDockerAddr, hubHostname         string
		hubStoreMax, logFileMaxBytes                int64
		logFiles                                    int
		noHub                                       bool
	)
	deviceKeyFlag := secretFlag{name: "device-key", env: agentEnv + "DEVICE_KEY"}
	enrollTokenFlag := secretFlag{name: "enroll-token", env: agentEnv + "ENROLL_TOKEN"}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the device agent: apply the desired modules and report their status",
		Long: `Run on a device. The agent connects to any listed controller (failing over to
the next), runs the modules of the deployment that applies to the device, keeps
them running by their restart policies, reports their status, and keeps running
its last manifest while every controller is unreachable.

The agent is also the device's IoT Edge runtime: a device hub (MQTT over TLS
on port 8883 of --hub-addr, and of --hub-docker-addr for containers) applies
the deployment's routes, keeps messages on disk until their sink takes them
(store-and-forward), serves module twins and direct methods, and sends
$upstream messages to the controller; each module gets the IOTEDGE_*
environment and workload socket that modules built with the Azure IoT SDKs
expect (IoTHubModuleClient.create_from_edge_environment()).

The agent keeps each process module's stdout and stderr, and its own log, in
bounded, rotated files under <data-dir>/logs (--log-file-max-bytes, --log-files),
which operators read remotely: appliance device logs, restart-module, ping and
support-bundle call the agent's own direct methods over this connection.

A device authenticates with one of its keys (--device-key-file), or enrolls
itself with an enrollment group's token (--enroll-token-file): it then makes a
key of its own (kept in its data directory), proves it holds the token with
the key the token derives for its id, and is registered with its own key and
the group's tags on first connect. The token alone opens no device, so the
devices of a group cannot impersonate each other. Tags are the operator's: a
device cannot choose its own, or it could put itself in any deployment's
audience. Give secrets in files (or the environment), not as flag values,
which every user of the machine can read in the process list.

Servers are mqtts://HOST:PORT (TLS, verified with --ca-file) or, on a network
where the key may travel in clear, mqtt://HOST:PORT. A server without a scheme
is taken as TLS when --ca-file is given and refused otherwise: the agent never
falls back to plaintext.

List every node of the cluster in --server, on every device: each device
prefers one node, chosen by a stable hash of its id and the nodes' host:port
(so a fleet spreads evenly whatever the order of the list), falls over to the
others in an order also drawn from its id (a failed node's devices spread
over the rest), and returns to its preferred node once that admits it again,
checking after a random wait (--return-check-min, doubling up to
--return-check-max) so that a returning node is not met by every device at
once.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			logger, err := newLogger(a.stderr, logFormat, logLevel)
			if err != nil {
				return err
			}
			env := func(name, flag string) string { return envDefault(flag, a.getenv(agentEnv+name)) }
			servers, deviceID = env("SERVER", servers), env("DEVICE_ID", deviceID)
			deviceKey, err := deviceKeyFlag.resolve(a.getenv)
			if err != nil {
				return err
			}
			enrollToken, err := enrollTokenFlag.resolve(a.getenv)
			if err != nil {
				return err
			}
			if servers == "" {
				return fmt.Errorf("flag --server is required (mqtts://HOST:1883[,mqtts://HOST2:1883...]; env %sSERVER)", agentEnv)
			}
			if deviceID == "" {
				return fmt.Errorf("flag --device-id is required (env %sDEVICE_ID)", agentEnv)
			}
			if err := fleet.ValidateDeviceID(deviceID); err != nil {
				return fmt.Errorf("flag --device-id: %w", err)
			}
			switch {
			case deviceKey != "" && enrollToken != "":
				return fmt.Errorf("give a device key (--device-key-file) or an enrollment token (--enroll-token-file), not both")
			case deviceKey == "" && enrollToken == "":
				return fmt.Errorf("flag --device-key-file or --enroll-token-file is required (or --device-key, --enroll-token; env %sDEVICE_KEY[_FILE] or %sENROLL_TOKEN[_FILE])", agentEnv, agentEnv)
			case enrollToken != "":
				if _, err := fleet.DeriveDeviceKey(enrollToken, deviceID); err != nil {
					return fmt.Errorf("flag --enroll-token: %w", err)
				}
			}
			dir := env("DATA_DIR", dataDir)
			if dir == "" {
				dir = filepath.Join(DefaultDataDir(a.getenv), "agent")
			}
			ag, err := agent.New(agent.Config{
				Servers:     strings.Split(servers, ","),
				DeviceID:    deviceID,
				DeviceKey:   deviceKey,
				EnrollToken: enrollToken,
				DataDir:     dir,
				Runtime:     env("RUNTIME", runtime),
				CAFile:      env("CA_FILE", caFile),
				Logger:      logger,
				Version:     a.version,
				Restart:     agent.RestartConfig{CoolOff: coolOff, MaxRestarts: maxRestarts},
				KeepAlive:   keepAlive,
				ReturnMin:   returnMin,
				ReturnMax:   returnMax,
				Logs:        linelog.Config{MaxFileBytes: logFileMaxBytes, MaxFiles: logFiles},
				Hub: agent.HubConfig{
					Disabled:      noHub,
					Addr:          env("HUB_ADDR", hubAddr),
					DockerAddr:    env("HUB_DOCKER_ADDR", hubDockerAddr),
					Hostname:      env("HUB_HOSTNAME", hubHostname),
					MaxStoreBytes: hubStoreMax,
				},
			})
			var serverErr *agent.ServerError
			if errors.As(err, &serverErr) {
				return fmt.Errorf("flag --server: %q: %s", serverErr.Server, serverErr.Reason)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "appliance %s: agent for device %s, state in %s\n", a.version, deviceID, dir)
			start := time.Now()
			err = ag.Run(cmd.Context())
			logger.Info("agent stopped", "ran_for", time.Since(start).Round(time.Second))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&servers, "server", "", "controllers' MQTT URLs, comma-separated: mqtts://HOST:1883 (TLS) or mqtt://HOST:1883 (plaintext); without a scheme, TLS if --ca-file is given, else refused (env APPLIANCE_AGENT_SERVER)")
	f.StringVar(&deviceID, "device-id", "", "this device's id (env APPLIANCE_AGENT_DEVICE_ID)")
	deviceKeyFlag.register(f, "device key (one of the device's two keys)", "")
	enrollTokenFlag.register(f, "enrollment group's token, to register this device", "")
	f.StringVar(&runtime, "runtime", "", "module runtime: docker (default), process, or docker+process (containers and child processes) (env APPLIANCE_AGENT_RUNTIME)")
	f.StringVar(&dataDir, "data-dir", "", "the agent's state directory (env APPLIANCE_AGENT_DATA_DIR; default <data dir>/agent)")
	f.StringVar(&caFile, "ca-file", "", "PEM CA bundle to verify mqtts:// controllers (env APPLIANCE_AGENT_CA_FILE)")
	f.DurationVar(&keepAlive, "keepalive", agent.DefaultKeepAlive, "MQTT keepalive: a controller that stops answering is left after about two of these")
	f.DurationVar(&returnMin, "return-check-min", agent.DefaultReturnMin, "connected to another server than its preferred one, the agent checks that one after a random wait of half to all of this, doubling while it stays away")
	f.DurationVar(&returnMax, "return-check-max", agent.DefaultReturnMax, "the longest wait between two checks of the preferred server")
	f.DurationVar(&coolOff, "restart-cool-off", agent.DefaultCoolOff, "wait before the first restart of a failed module; doubles each time (edgeAgent's default)")
	f.IntVar(&maxRestarts, "max-restarts", agent.DefaultMaxRestarts, "restarts before a failing module is left dead (until a new deployment)")
	f.StringVar(&hubAddr, "hub-addr", agent.DefaultHubAddr, "device hub address for process modules, host:port (their IOTEDGE_GATEWAYHOSTNAME is the host; the Azure SDKs use port 8883, so agents sharing a machine take distinct 127.0.0.x) (env APPLIANCE_AGENT_HUB_ADDR)")
	f.StringVar(&hubDockerAddr, "hub-docker-addr", agent.HubDockerAuto, "device hub address for containers: auto (Docker's bridge gateway, port 8883), off, or host:port (env APPLIANCE_AGENT_HUB_DOCKER_ADDR)")
	f.StringVar(&hubHostname, "hub-hostname", agent.DefaultHubHostname, "the hub's name in containers' /etc/hosts, and the IoT hub name modules are given (env APPLIANCE_AGENT_HUB_HOSTNAME)")
	f.Int64Var(&hubStoreMax, "hub-store-max", 1<<30, "bytes of messages the hub keeps on disk for sinks that do not take them; beyond, the oldest are dropped and counted")
	f.BoolVar(&noHub, "no-hub", false, "run no device hub: modules get no IoT Edge environment, routes are not applied")
	f.Int64Var(&logFileMaxBytes, "log-file-max-bytes", linelog.DefaultMaxFileBytes, "the log files the agent keeps in <data-dir>/logs (its own, and each process module's stdout and stderr) are rotated at this size")
	f.IntVar(&logFiles, "log-files", linelog.DefaultMaxFiles, "files kept per log, the current one included (so at most about log-files × log-file-max-bytes per log)")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}
