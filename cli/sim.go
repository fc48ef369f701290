package cli

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/sim"
)

// simEnv is the prefix of the simulator's environment fallbacks, one per
// flag: APPLIANCE_SIM_SERVER, _DEVICES, _ENROLL_TOKEN (or
// _ENROLL_TOKEN_FILE), _PREFIX, _FAIL_SHARE, _CONNECT_RATE, _DURATION,
// _CA_FILE.
const simEnv = "APPLIANCE_SIM_"

func (a *app) simCommand() *cobra.Command {
	var (
		servers, prefix, caFile           string
		logFormat, logLevel               string
		failImage, recordFile             string
		tags                              []string
		devices                           int
		failShare, connectRate, telemetry float64
		duration, progressInterval        time.Duration
		returnMin, returnMax              time.Duration
	)
	enrollTokenFlag := secretFlag{name: "enroll-token", env: simEnv + "ENROLL_TOKEN"}
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Simulate a fleet: N devices in one process, each with its own MQTT session",
		Long: `Run N simulated devices against a controller, for demos and load tests. Each
device enrolls with the enrollment token (ids PREFIX-0001, PREFIX-0002, ...),
receives its desired document, "runs" its modules with a fake runtime and
reports them like the agent. --fail-share makes that fraction of the devices
(chosen by index, so runs repeat) report their modules failed, code 500;
with --fail-image they fail only modules whose image contains that text, so
a good and a bad release can run on the same fleet. --record-desired writes
a JSON line for every desired document a device applies.
--telemetry-rate makes each device send that many upstream messages a second,
as an agent's device hub sends what its routes put INTO $upstream (consumers
read them from the nodes' northbound listener; appliance events tail shows
them).

With several --server, devices spread over them as agents do: each prefers
the server a stable hash of its id picks, falls over to the others, and
returns to its preferred one once that admits it again (--return-check-min,
--return-check-max).

Tags come from the enrollment, never from a device: create the enrollment with
them (appliance enrollment create NAME --tag k=v) and pass its token here.

Progress goes to stderr; a summary is printed at the end (-o json for JSON).
Runs until interrupted or --duration elapses.`,
		Example: `  appliance enrollment create sim-line --tag environment=prod
  appliance sim --server mqtt://127.0.0.1:1883 --devices 5000 --enroll-token-file TOKEN-FILE --fail-share 0.1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(tags) > 0 {
				return fmt.Errorf("flag --tag: a device cannot choose its tags (it could put itself in any deployment's audience); put them on the enrollment: appliance enrollment create NAME --tag %s, and pass its token with --enroll-token", tags[0])
			}
			f := cmd.Flags()
			for _, name := range []string{"server", "devices", "prefix", "fail-share", "fail-image", "connect-rate", "duration", "ca-file", "telemetry-rate"} {
				env := simEnv + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
				if v := a.getenv(env); v != "" && !f.Changed(name) {
					if err := f.Set(name, v); err != nil {
						return fmt.Errorf("%s=%q: %w", env, v, err)
					}
				}
			}
			if servers == "" {
				return fmt.Errorf("flag --server is required (mqtt://HOST:1883[,mqtt://HOST2:1883...]; env %sSERVER)", simEnv)
			}
			if devices <= 0 {
				return fmt.Errorf("flag --devices is required: how many devices to simulate (env %sDEVICES)", simEnv)
			}
			enrollToken, err := enrollTokenFlag.resolve(a.getenv)
			if err != nil {
				return err
			}
			if enrollToken == "" {
				return fmt.Errorf("flag --enroll-token-file is required: a file holding an enrollment's token, from appliance enrollment create (or --enroll-token; env %sENROLL_TOKEN[_FILE])", simEnv)
			}
			logger, err := newLogger(a.stderr, logFormat, logLevel)
			if err != nil {
				return err
			}
			var tlsCfg *tls.Config
			if caFile != "" {
				pem, err := os.ReadFile(caFile)
				if err != nil {
					return fmt.Errorf("flag --ca-file: %w", err)
				}
				pool := x509.NewCertPool()
				if !pool.AppendCertsFromPEM(pem) {
					return fmt.Errorf("flag --ca-file: no PEM certificate in %s", caFile)
				}
				tlsCfg = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
			}
			var record io.Writer
			if recordFile != "" {
				f, err := os.OpenFile(recordFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
				if err != nil {
					return fmt.Errorf("flag --record-desired: %w", err)
				}
				defer f.Close()
				record = f
			}
			s, err := sim.New(sim.Config{
				Servers:          strings.Split(servers, ","),
				Devices:          devices,
				EnrollToken:      enrollToken,
				Prefix:           prefix,
				FailShare:        failShare,
				FailImage:        failImage,
				Record:           record,
				ConnectRate:      connectRate,
				Duration:         duration,
				TLS:              tlsCfg,
				Progress:         a.stderr,
				ProgressInterval: progressInterval,
				Logger:           logger,
				TelemetryRate:    telemetry,
				ReturnMin:        returnMin,
				ReturnMax:        returnMax,
			})
			if err != nil {
				return err
			}
			ids := s.DeviceIDs()
			enrollment, _, _ := strings.Cut(enrollToken, ".")
			fmt.Fprintf(a.stderr, "appliance %s: simulating %d devices %s..%s through enrollment %q at %s\n",
				a.version, devices, ids[0], ids[len(ids)-1], enrollment, servers)
			runErr := s.Run(cmd.Context())
			st := s.Stats()
			if a.output == "json" {
				if err := a.printJSON(st); err != nil {
					return err
				}
			} else {
				a.simSummary(st)
			}
			return runErr
		},
	}
	f := cmd.Flags()
	f.StringVar(&servers, "server", "", "controllers' MQTT URLs, comma-separated: mqtt://HOST:1883 or mqtts://HOST:8883 (env APPLIANCE_SIM_SERVER)")
	f.IntVar(&devices, "devices", 0, "how many devices to simulate (env APPLIANCE_SIM_DEVICES)")
	enrollTokenFlag.register(f, "enrollment's token every device enrolls with", "")
	f.StringVar(&prefix, "prefix", "", "device id prefix: PREFIX-0001, ... (env APPLIANCE_SIM_PREFIX; default sim-<random>, so runs never collide)")
	f.Float64Var(&failShare, "fail-share", 0, "fraction of devices (0-1) whose modules fail (env APPLIANCE_SIM_FAIL_SHARE)")
	f.StringVar(&failImage, "fail-image", "", "with --fail-share: fail only modules whose image contains this text, e.g. :v2 (env APPLIANCE_SIM_FAIL_IMAGE)")
	f.StringVar(&recordFile, "record-desired", "", "append a JSON line per desired document a device applies to this file")
	f.Float64Var(&connectRate, "connect-rate", sim.DefaultConnectRate, "new connections per second, reconnections included (env APPLIANCE_SIM_CONNECT_RATE)")
	f.Float64Var(&telemetry, "telemetry-rate", 0, "upstream messages a second each device sends, as a device hub does for $upstream (env APPLIANCE_SIM_TELEMETRY_RATE; 0: none)")
	f.DurationVar(&duration, "duration", 0, "stop after this long, e.g. 10m (env APPLIANCE_SIM_DURATION; default: until interrupted)")
	f.StringVar(&caFile, "ca-file", "", "PEM CA bundle to verify mqtts:// controllers (env APPLIANCE_SIM_CA_FILE)")
	f.DurationVar(&returnMin, "return-check-min", sim.DefaultReturnMin, "a device connected to another server than its preferred one checks that one after a random wait of half to all of this, doubling while it stays away (the agent's rule)")
	f.DurationVar(&returnMax, "return-check-max", sim.DefaultReturnMax, "the longest wait between two checks of a device's preferred server")
	f.DurationVar(&progressInterval, "progress-interval", sim.DefaultProgressInterval, "how often to print progress when something changed")
	f.StringArrayVar(&tags, "tag", nil, "not accepted: tags come from the enrollment (appliance enrollment create NAME --tag k=v)")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "warn", "log level: debug, info, warn or error")
	return cmd
}

func (a *app) simSummary(st sim.Stats) {
	rows := [][]string{
		{"devices", fmt.Sprintf("%d (%s-...)", st.Devices, st.Prefix)},
		{"ran for", (time.Duration(st.ElapsedSeconds * float64(time.Second))).Round(100 * time.Millisecond).String()},
		{"connected", fmt.Sprintf("%d at most, %d connections, %d failed attempts (%d refused), %d dropped", st.PeakConnected, st.Connects, st.ConnectFailures, st.Refusals, st.Disconnects)},
		{"enrolled", fmt.Sprint(st.Enrolled)},
		{"desired received", fmt.Sprint(st.DesiredReceived)},
		{"reports", fmt.Sprintf("%d sent, %d acknowledged", st.ReportsSent, st.ReportsAcked)},
		{"failing devices", fmt.Sprint(st.FailingDevices)},
	}
	if len(st.ByServer) > 1 || st.Returns > 0 {
		var on []string
		for _, h := range slices.Sorted(maps.Keys(st.ByServer)) {
			on = append(on, fmt.Sprintf("%s %d", h, st.ByServer[h]))
		}
		rows = append(rows, []string{"connected to", strings.Join(on, ", ")},
			[]string{"returned to their preferred server", fmt.Sprintf("%d (%d checks found it away)", st.Returns, st.ReturnChecks)})
	}
	if st.TelemetrySent > 0 {
		rows = append(rows, []string{"telemetry", fmt.Sprintf("%d messages made, %d acknowledged, in %d batches", st.TelemetrySent, st.TelemetryAcked, st.TelemetryBatches)})
	}
	for _, id := range slices.Sorted(maps.Keys(st.Deployments)) {
		c := st.Deployments[id]
		rows = append(rows, []string{sim.DeploymentName(id), fmt.Sprintf("%d reporting, %d ok, %d failed", c.Reporting, c.OK, c.Failed)})
	}
	if st.LastError != "" {
		rows = append(rows, []string{"last error", st.LastError})
	}
	a.keyValues(rows)
}
