package cli

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/broker"
	"appliance/deploylimits"
	"appliance/node"
)

func (a *app) serveCommand() *cobra.Command {
	var (
		nodeID, httpAddr, raftAddr, raftAdvertise, mqttAddr string
		mqttCert, mqttKey, logFormat, logLevel              string
		join                                                string
		plainHTTP, plainMQTT                                bool
		tlsSANs                                             []string
		historyRetention                                    time.Duration
		historyPerKey                                       int
		heartbeat, election, lease                          time.Duration
		shedAfter                                           time.Duration
		listenerLimits                                      node.ListenerLimits
		deviceLimits                                        broker.Limits
		mqttConnectTimeout                                  time.Duration
		events                                              node.EventsConfig
		eventsRetentionBytes                                string
		offlineAfter                                        time.Duration
		deploymentLimits                                    deploylimits.Limits
	)
	joinTokenFlag := secretFlag{name: "join-token", env: "APPLIANCE_JOIN_TOKEN"}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run a controller node (bootstraps a single-node cluster in an empty data directory)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			logger, err := newLogger(a.stderr, logFormat, logLevel)
			if err != nil {
				return err
			}
			if shedAfter < 0 {
				return fmt.Errorf("flag --shed-devices-after: %v is negative; give a duration, or 0 never to shed", shedAfter)
			}
			if shedAfter == 0 {
				shedAfter = -1 // the flag's 0 is "never"; the node's is "default"
			}
			if err := checkLimits(listenerLimits, deviceLimits, mqttConnectTimeout); err != nil {
				return err
			}
			if err := checkDeploymentLimits(deploymentLimits, offlineAfter); err != nil {
				return err
			}
			deviceLimits.ConnectTimeout = mqttConnectTimeout
			noCap(&listenerLimits.APIMaxConnsPerSource)
			noCap(&listenerLimits.ClusterMaxConnsPerSource)
			noCap(&deviceLimits.MaxPendingPerSource)
			if deviceLimits.ReportRate == 0 {
				deviceLimits.ReportRate = -1
			}
			joinToken, err := joinTokenFlag.resolve(a.getenv)
			if err != nil {
				return err
			}
			if events.RetentionBytes, err = parseBytes(eventsRetentionBytes); err != nil {
				return fmt.Errorf("flag --events-retention-bytes: %v", err)
			}
			if events.RetentionAge <= 0 {
				return fmt.Errorf("flag --events-retention-age: %v is not a positive duration", events.RetentionAge)
			}
			if env := a.getenv("APPLIANCE_EVENTS_ADDR"); env != "" && !cmd.Flags().Changed("events-addr") {
				events.Addr = env
			}
			dataDir := a.resolvedDataDir()
			n, err := node.New(node.Config{
				DataDir:          dataDir,
				NodeID:           envDefault(nodeID, a.getenv("APPLIANCE_NODE_ID")),
				HTTPAddr:         envDefault(httpAddr, a.getenv("APPLIANCE_HTTP_ADDR")),
				RaftAddr:         envDefault(raftAddr, a.getenv("APPLIANCE_RAFT_ADDR")),
				RaftAdvertise:    envDefault(raftAdvertise, a.getenv("APPLIANCE_RAFT_ADVERTISE")),
				MQTTAddr:         envDefault(mqttAddr, a.getenv("APPLIANCE_MQTT_ADDR")),
				MQTTTLSCert:      envDefault(mqttCert, a.getenv("APPLIANCE_MQTT_TLS_CERT")),
				MQTTTLSKey:       envDefault(mqttKey, a.getenv("APPLIANCE_MQTT_TLS_KEY")),
				HistoryRetention: historyRetention,
				HistoryPerKey:    historyPerKey,
				Version:          a.version,
				Logger:           logger,
				Join:             envDefault(join, a.getenv("APPLIANCE_JOIN")),
				JoinToken:        joinToken,
				TLSHosts:         tlsSANs,
				PlainHTTP:        plainHTTP,
				PlainMQTT:        plainMQTT,

				RaftHeartbeatTimeout:   heartbeat,
				RaftElectionTimeout:    election,
				RaftLeaderLeaseTimeout: lease,
				ShedDevicesAfter:       shedAfter,
				Limits:                 listenerLimits,
				DeviceLimits:           deviceLimits,
				Events:                 events,
				OfflineAfter:           offlineAfter,
				DeploymentLimits:       deploymentLimits,
			})
			if err != nil {
				return err
			}
			if err := n.Start(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "appliance %s: node %s serving the API at %s and devices at %s\nadmin token: %s\ncluster CA (clients and devices verify the node with it): %s\n",
				a.version, n.ID(), n.URL(), n.MQTTURL(), filepath.Join(dataDir, node.TokenFile), filepath.Join(dataDir, node.TLSDir, "ca.crt"))
			fmt.Fprintf(a.stderr, "add a node to this cluster with: appliance serve --join https://%s --join-token-file <a copy of %s>\n",
				n.RaftAddr(), filepath.Join(dataDir, node.JoinTokenFile))
			select {
			case <-cmd.Context().Done():
				fmt.Fprintln(a.stderr, "shutting down (press Ctrl-C again to exit at once)")
				return n.Stop()
			case <-n.Failed():
				// The node cannot go on (its log holds what this build
				// cannot apply): stop it and exit non-zero with why.
				if err := n.Stop(); err != nil {
					logger.Error("stop after failure", "err", err)
				}
				return n.Err()
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&nodeID, "node-id", "", "this node's id in the cluster (env APPLIANCE_NODE_ID; default the host name)")
	f.StringVar(&httpAddr, "http-addr", "", "operator API listen address (env APPLIANCE_HTTP_ADDR; default "+node.DefaultHTTPAddr+")")
	f.StringVar(&raftAddr, "raft-addr", "", "raft listen address (env APPLIANCE_RAFT_ADDR; default "+node.DefaultRaftAddr+")")
	f.StringVar(&raftAdvertise, "raft-advertise", "", "raft address peers dial, if not --raft-addr (env APPLIANCE_RAFT_ADVERTISE)")
	f.StringVar(&mqttAddr, "mqtt-addr", "", "device MQTT listen address (env APPLIANCE_MQTT_ADDR; default "+node.DefaultMQTTAddr+")")
	f.BoolVar(&plainHTTP, "http-plain", false, "serve the API without TLS (default: TLS with the node's certificate from the cluster CA)")
	f.BoolVar(&plainMQTT, "mqtt-plain", false, "serve MQTT without TLS (default: TLS with the node's certificate from the cluster CA)")
	f.StringVar(&mqttCert, "mqtt-tls-cert", "", "PEM certificate the broker presents instead of the node's own (env APPLIANCE_MQTT_TLS_CERT)")
	f.StringVar(&mqttKey, "mqtt-tls-key", "", "PEM key for --mqtt-tls-cert (env APPLIANCE_MQTT_TLS_KEY)")
	f.StringVar(&join, "join", "", "join the cluster of this node's cluster port, https://HOST:RAFT-PORT (env APPLIANCE_JOIN)")
	joinTokenFlag.register(f, "cluster's join token, from <data-dir>/join-token of a member", "")
	f.StringArrayVar(&tlsSANs, "tls-san", nil, "extra host name or IP this node's certificate is valid for (repeatable)")
	f.DurationVar(&heartbeat, "raft-heartbeat-timeout", 0, "raft heartbeat timeout (default 300ms, tuned for a LAN)")
	f.DurationVar(&election, "raft-election-timeout", 0, "raft election timeout (default 300ms)")
	f.DurationVar(&lease, "raft-leader-lease-timeout", 0, "raft leader lease timeout (default 300ms)")
	f.DurationVar(&shedAfter, "shed-devices-after", node.DefaultShedDevicesAfter,
		"without a cluster leader for this long, disconnect devices and refuse them until a leader is back, so that they move to a node that has one (0: never)")
	f.DurationVar(&historyRetention, "history-retention", node.DefaultHistoryRetention, "drop history events older than this")
	f.DurationVar(&offlineAfter, "offline-after", node.DefaultOfflineAfter,
		"a device not connected to any node, and not heard from for this long, shows as offline beside its health")
	// Deployment limits (README, "Limits"): writes over them get a 400
	// naming the limit and its flag.
	f.IntVar(&deploymentLimits.MaxManifestBytes, "max-manifest-bytes", deploylimits.DefaultMaxManifestBytes,
		"largest deployment content, and largest merged document of a device (base and layers), as compact JSON")
	f.IntVar(&deploymentLimits.MaxModuleDesiredBytes, "max-module-desired-bytes", deploylimits.DefaultMaxModuleDesiredBytes,
		"largest desired properties of one module twin in a deployment")
	f.IntVar(&deploymentLimits.MaxModules, "max-modules", deploylimits.DefaultMaxModules, "most modules in a deployment, and in a device's merged document")
	f.IntVar(&deploymentLimits.MaxDeploymentsPerDevice, "max-deployments-per-device", deploylimits.DefaultMaxDeploymentsPerDevice,
		"most deployments (bases and layers) that may target one device")
	f.IntVar(&deploymentLimits.MaxLayersPerDevice, "max-layers-per-device", deploylimits.DefaultMaxLayersPerDevice,
		"most layered deployments that may target one device")
	f.IntVar(&historyPerKey, "history-per-key", node.DefaultHistoryPerKey, "keep at most this many history events per deployment or device")
	// Bounds on clients (docs/architecture.md, "Bounded listeners"). The
	// caps count per source address (an IPv6 /64); 0 turns a cap off.
	f.DurationVar(&listenerLimits.HandshakeTimeout, "handshake-timeout", node.DefaultHandshakeTimeout,
		"a new API or cluster-port connection must finish TLS and send its request header (API) or first byte (cluster port) within this")
	f.DurationVar(&mqttConnectTimeout, "mqtt-connect-timeout", broker.DefaultConnectTimeout,
		"a new device connection must finish TCP and TLS and send its MQTT CONNECT within this")
	f.DurationVar(&listenerLimits.IdleTimeout, "http-idle-timeout", node.DefaultIdleTimeout, "close an API connection kept alive with no request for this long")
	f.IntVar(&listenerLimits.APIMaxConnsPerSource, "http-max-conns-per-source", node.DefaultAPIMaxConnsPerSource,
		"most API connections one source address may hold (0: no cap, e.g. behind a TLS-terminating proxy)")
	f.IntVar(&listenerLimits.ClusterMaxConnsPerSource, "raft-max-conns-per-source", node.DefaultClusterMaxConnsPerSource,
		"most cluster-port connections one source address may hold before they show a node certificate of this cluster (0: no cap)")
	f.IntVar(&deviceLimits.MaxPendingPerSource, "mqtt-max-pending-per-source", broker.DefaultMaxPendingPerSource,
		"most device connections one source address may hold before they authenticate; authenticated devices do not count, so any number may share a NAT gateway (0: no cap)")
	f.IntVar(&deviceLimits.MaxReportSize, "device-report-max-bytes", broker.DefaultMaxReportSize, "largest reported document a device may send; larger ones are dropped")
	f.Float64Var(&deviceLimits.ReportRate, "device-report-rate", broker.DefaultReportRate,
		"reports a second a device may send, sustained; more are throttled (the latest is committed when its budget allows) (0: no report quotas)")
	f.IntVar(&deviceLimits.ReportBurst, "device-report-burst", broker.DefaultReportBurst, "reports a device may send at once above --device-report-rate")
	f.IntVar(&deviceLimits.ReportBytesRate, "device-report-bytes-per-second", broker.DefaultReportBytesRate,
		"report bytes a second a device may send, sustained (bursts up to 256 KiB or --device-report-max-bytes, the larger); more are throttled")
	f.IntVar(&deviceLimits.ReportOverruns, "device-report-overruns", broker.DefaultReportOverruns,
		"reports over quota (or too large, or malformed) a device may send in one session before it is disconnected")
	f.StringVar(&events.Addr, "events-addr", node.DefaultEventsAddr,
		"MQTT listener for consumers of the devices' upstream messages (appliance consumer create); \"\" for none (env APPLIANCE_EVENTS_ADDR)")
	f.BoolVar(&events.Plain, "events-plain", false, "serve the consumers' listener without TLS (default: TLS like the device broker)")
	f.StringVar(&eventsRetentionBytes, "events-retention-bytes", "1GiB",
		"disk this node gives its log of upstream messages, which lets a consumer that reconnects resume; the oldest go first (e.g. 512MiB, 10GiB)")
	f.DurationVar(&events.RetentionAge, "events-retention-age", 24*time.Hour, "upstream messages older than this leave the node's log")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

// checkLimits refuses negative limits, naming the flag.
func checkLimits(l node.ListenerLimits, d broker.Limits, mqttConnect time.Duration) error {
	for _, f := range []struct {
		name string
		neg  bool
		v    any
	}{
		{"--handshake-timeout", l.HandshakeTimeout < 0, l.HandshakeTimeout},
		{"--mqtt-connect-timeout", mqttConnect < 0, mqttConnect},
		{"--http-idle-timeout", l.IdleTimeout < 0, l.IdleTimeout},
		{"--http-max-conns-per-source", l.APIMaxConnsPerSource < 0, l.APIMaxConnsPerSource},
		{"--raft-max-conns-per-source", l.ClusterMaxConnsPerSource < 0, l.ClusterMaxConnsPerSource},
		{"--mqtt-max-pending-per-source", d.MaxPendingPerSource < 0, d.MaxPendingPerSource},
		{"--device-report-max-bytes", d.MaxReportSize < 0, d.MaxReportSize},
		{"--device-report-rate", !(d.ReportRate >= 0), d.ReportRate},
		{"--device-report-burst", d.ReportBurst < 0, d.ReportBurst},
		{"--device-report-bytes-per-second", d.ReportBytesRate < 0, d.ReportBytesRate},
		{"--device-report-overruns", d.ReportOverruns < 0, d.ReportOverruns},
	} {
		if f.neg {
			return fmt.Errorf("flag %s: %v is negative", f.name, f.v)
		}
	}
	return nil
}

// checkDeploymentLimits refuses limits that are not positive.
func checkDeploymentLimits(l deploylimits.Limits, offlineAfter time.Duration) error {
	for _, f := range []struct {
		name string
		v    int
	}{
		{"--max-manifest-bytes", l.MaxManifestBytes},
		{"--max-module-desired-bytes", l.MaxModuleDesiredBytes},
		{"--max-modules", l.MaxModules},
		{"--max-deployments-per-device", l.MaxDeploymentsPerDevice},
		{"--max-layers-per-device", l.MaxLayersPerDevice},
	} {
		if f.v <= 0 {
			return fmt.Errorf("flag %s: %d; give a positive number", f.name, f.v)
		}
	}
	if offlineAfter <= 0 {
		return fmt.Errorf("flag --offline-after: %v; give a positive duration", offlineAfter)
	}
	return nil
}

// noCap turns a flag's 0 ("none") into the libraries' negative.
func noCap(v *int) {
	if *v == 0 {
		*v = -1
	}
}

func envDefault(flag, env string) string {
	if flag != "" {
		return flag
	}
	return env
}

func newLogger(w interface{ Write([]byte) (int, error) }, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("flag --log-level must be debug, info, warn or error; got %q", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("flag --log-format must be text or json; got %q", format)
}

// parseBytes reads a size: a number of bytes, or one with a KiB, MiB,
// GiB or TiB suffix (KB, MB, GB, TB mean the same powers of 1024).
func parseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffixes []string
		mult     int64
	}{{[]string{"TiB", "TB", "T"}, 1 << 40}, {[]string{"GiB", "GB", "G"}, 1 << 30}, {[]string{"MiB", "MB", "M"}, 1 << 20}, {[]string{"KiB", "KB", "K"}, 1 << 10}, {[]string{"B"}, 1}} {
		found := false
		for _, suf := range u.suffixes {
			if rest, ok := strings.CutSuffix(t, suf); ok {
				t, mult, found = strings.TrimSpace(rest), u.mult, true
				break
			}
		}
		if found {
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a positive size such as 1073741824, 512MiB or 10GiB", s)
	}
	return n * mult, nil
}
