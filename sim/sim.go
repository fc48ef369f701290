package sim

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"appliance/fleet"
	"appliance/internal/spread"
)

// Config configures a simulator. Zero values mean defaults, except where a
// field says it is required.
type Config struct {
	// Servers are the controllers' MQTT URLs, mqtt://HOST:PORT (or
	// mqtts://HOST:PORT). Each device orders them by the agent's rule
	// (internal/spread: a stable hash of its id and each server's
	// host:port), so that a fleet spreads evenly over a cluster: it
	// connects to its preferred server, moves to the next of its order
	// when a connection fails or drops, and returns to its preferred
	// server once that answers again (ReturnMin). Required.
	Servers []string
	// Devices is how many devices to simulate. Required.
	Devices int
	// EnrollToken is an enrollment's token: every device derives its own
	// key from it and the controller registers it, with the enrollment's
	// tags, on its first connection. Required.
	EnrollToken string
	// Prefix names the devices Prefix-0001, Prefix-0002, ... (more digits
	// beyond 9,999 devices). Default "sim-" and six random characters, so
	// that two runs never share devices.
	Prefix string
	// FailShare is the fraction of devices (0 to 1) whose modules fail:
	// exactly floor(Devices·FailShare) of them, chosen by index and spread
	// evenly (0.2: devices 5, 10, 15, ...), so a run is reproducible.
	FailShare float64
	// FailImage, when set, makes the failing devices (FailShare) fail only
	// the modules whose image contains it, so that a good and a bad
	// release can run on the same simulated fleet: they run every other
	// module.
	FailImage string
	// Record, when set, gets a JSON line for every desired document a
	// device applies ({"device", "version", "deployment", "time"}): what
	// each device was sent, for checking a rollout afterwards.
	Record io.Writer
	// ConnectRate bounds new connections per second over all devices,
	// reconnections included. Default 500.
	ConnectRate float64
	// ConnectConcurrency bounds connection attempts in progress at once
	// (TCP connect to CONNACK: the part that costs the controller an
	// authentication, or a registration). Default 64.
	ConnectConcurrency int
	// Duration stops the simulator after this long; zero runs until the
	// context ends.
	Duration time.Duration
	// KeepAlive is the MQTT keepalive; a device pings after half of it
	// without traffic and reconnects when the ping goes unanswered.
	// Default 60 s.
	KeepAlive time.Duration
	// ConnectTimeout bounds one connection attempt and every write.
	// Default 10 s.
	ConnectTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the jittered exponential backoff
	// before a device reconnects (a random time between half and all of
	// min·2^(n-1), capped at max). Defaults 1 s and 30 s.
	ReconnectMin, ReconnectMax time.Duration
	// ReturnMin and ReturnMax bound the jittered exponential backoff
	// between a device's checks of its preferred server while it is
	// connected to another one: the n-th check of a run waits a random
	// time between half and all of ReturnMin·2^(n-1), capped at
	// ReturnMax. A check is a full connection (TLS, CONNECT, SUBSCRIBE)
	// made before the current one is left, so a device moves only to a
	// server that admits it. Defaults DefaultReturnMin and
	// DefaultReturnMax, as the agent's.
	ReturnMin, ReturnMax time.Duration
	// TLS is used for mqtts:// servers; nil means the system's roots.
	TLS *tls.Config
	// Progress, when set, gets a line every ProgressInterval in which
	// something changed: connections, and devices reporting the latest
	// deployment.
	Progress io.Writer
	// ProgressInterval defaults to 1 s.
	ProgressInterval time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// TelemetryRate, when above zero, makes each device send that many
	// upstream messages a second, as a device hub sends what its routes
	// put INTO $upstream (telemetry.go). 0: none.
	TelemetryRate float64
}

// Defaults for the zero fields of Config.
const (
	DefaultConnectRate        = 500
	DefaultConnectConcurrency = 64
	DefaultKeepAlive          = 60 * time.Second
	DefaultConnectTimeout     = 10 * time.Second
	DefaultReconnectMin       = time.Second
	DefaultReconnectMax       = 30 * time.Second
	DefaultProgressInterval   = time.Second
	DefaultReturnMin          = time.Minute
	DefaultReturnMax          = 10 * time.Minute
)

// MaxDevices bounds Config.Devices: one process holds a socket per device.
const MaxDevices = 1_000_000

// Sim is a fleet of simulated devices.
type Sim struct {
	cfg   Config
	log   *slog.Logger
	urls  []*url.URL
	hosts []string // urls' host:port, what the spread rule hashes
	// byServer counts the sessions with each of urls.
	byServer []atomic.Int64
	devices  []*device
	pace     pacer
	sem      chan struct{}
	mods     moduleCache
	running  atomic.Bool
	cancel   context.CancelCauseFunc

	recordMu     sync.Mutex
	recordFailed bool

	connected, peak, enrolled, refusals        atomic.Int64
	connects, connectFailures, disconnects     atomic.Int64
	returns, returnChecks                      atomic.Int64
	desiredReceived, reportsSent, reportsAcked atomic.Int64
	telemetrySent, telemetryAcked, batchesSent atomic.Int64
	started, stopped                           atomic.Int64 // UnixNano of Run's start and end
	lastWarn                                   atomic.Int64 // UnixNano of the last connection warning

	mu            sync.Mutex
	byDeployment  map[string]*DeploymentStats
	latestVersion uint64
	latest        string
	haveLatest    bool
	lastErr       string
}

// New checks the configuration and fills in defaults; nothing connects
// until Run.
func New(cfg Config) (*Sim, error) {
	if len(cfg.Servers) == 0 {
		return nil, errors.New("sim: at least one server is required (mqtt://HOST:PORT)")
	}
	var urls []*url.URL
	for _, s := range cfg.Servers {
		u, err := parseServer(s)
		if err != nil {
			return nil, err
		}
		urls = append(urls, u)
	}
	switch {
	case cfg.Devices <= 0:
		return nil, fmt.Errorf("sim: the number of devices must be at least 1; got %d", cfg.Devices)
	case cfg.Devices > MaxDevices:
		return nil, fmt.Errorf("sim: at most %d devices; got %d", MaxDevices, cfg.Devices)
	case cfg.EnrollToken == "":
		return nil, errors.New("sim: an enrollment token is required")
	case math.IsNaN(cfg.FailShare) || cfg.FailShare < 0 || cfg.FailShare > 1:
		return nil, fmt.Errorf("sim: the fail share must be between 0 and 1; got %v", cfg.FailShare)
	case math.IsNaN(cfg.ConnectRate) || cfg.ConnectRate < 0:
		return nil, fmt.Errorf("sim: the connect rate must be positive; got %v", cfg.ConnectRate)
	case math.IsNaN(cfg.TelemetryRate) || cfg.TelemetryRate < 0 || cfg.TelemetryRate > MaxTelemetryRate:
		return nil, fmt.Errorf("sim: the telemetry rate must be from 0 to %d messages a second per device; got %v", MaxTelemetryRate, cfg.TelemetryRate)
	case cfg.ConnectConcurrency < 0, cfg.Duration < 0, cfg.KeepAlive < 0, cfg.ConnectTimeout < 0,
		cfg.ReconnectMin < 0, cfg.ReconnectMax < 0, cfg.ProgressInterval < 0, cfg.ReturnMin < 0, cfg.ReturnMax < 0:
		return nil, errors.New("sim: durations and counts must not be negative")
	}
	if cfg.KeepAlive > 0 && cfg.KeepAlive < 2*time.Second {
		return nil, fmt.Errorf("sim: the keepalive must be at least 2s; got %v", cfg.KeepAlive)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = RandomPrefix()
	}
	width := max(4, len(fmt.Sprint(cfg.Devices)))
	if err := fleet.ValidateDeviceID(deviceID(cfg.Prefix, width, cfg.Devices)); err != nil {
		return nil, fmt.Errorf("sim: prefix %q: %w", cfg.Prefix, err)
	}
	cfg.ConnectRate = orDefault(cfg.ConnectRate, DefaultConnectRate)
	cfg.ConnectConcurrency = orDefault(cfg.ConnectConcurrency, DefaultConnectConcurrency)
	cfg.KeepAlive = orDefault(cfg.KeepAlive, DefaultKeepAlive)
	cfg.ConnectTimeout = orDefault(cfg.ConnectTimeout, DefaultConnectTimeout)
	cfg.ReconnectMin = orDefault(cfg.ReconnectMin, DefaultReconnectMin)
	cfg.ReconnectMax = max(orDefault(cfg.ReconnectMax, DefaultReconnectMax), cfg.ReconnectMin)
	cfg.ProgressInterval = orDefault(cfg.ProgressInterval, DefaultProgressInterval)
	cfg.ReturnMin = orDefault(cfg.ReturnMin, DefaultReturnMin)
	cfg.ReturnMax = max(orDefault(cfg.ReturnMax, DefaultReturnMax), cfg.ReturnMin)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Sim{
		cfg:          cfg,
		log:          cfg.Logger.With("component", "sim"),
		urls:         urls,
		sem:          make(chan struct{}, cfg.ConnectConcurrency),
		pace:         pacer{every: time.Duration(float64(time.Second) / cfg.ConnectRate)},
		byDeployment: map[string]*DeploymentStats{},
	}
	for _, u := range urls {
		s.hosts = append(s.hosts, u.Host)
	}
	s.byServer = make([]atomic.Int64, len(urls))
	s.devices = make([]*device, cfg.Devices)
	for i := range s.devices {
		id := deviceID(cfg.Prefix, width, i+1)
		derived, err := fleet.DeriveDeviceKey(cfg.EnrollToken, id)
		if err != nil {
			return nil, fmt.Errorf("sim: %w", err)
		}
		key := fleet.EnrollmentKey(derived, simOwnKey(cfg.EnrollToken, id))
		s.devices[i] = &device{sim: s, id: id, key: key, order: spread.Order(id, s.hosts), fails: failing(i+1, cfg.FailShare)}
	}
	return s, nil
}

// simOwnKey is a simulated device's own key. A real agent makes a random
// one and keeps it in its state file; the simulator keeps no state, so it
// computes each device's from the token instead, and a restarted
// simulator finds its devices again. Any holder of the token could compute
// these keys too: simulated devices are for demos and load tests, not for
// devices whose identity matters.
func simOwnKey(token, deviceID string) string {
	m := hmac.New(sha256.New, []byte(token))
	m.Write([]byte("appliance sim device key\x00" + deviceID))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

func deviceID(prefix string, width, index int) string {
	return fmt.Sprintf("%s-%0*d", prefix, width, index)
}

// RandomPrefix returns "sim-" and six random lowercase letters and digits.
func RandomPrefix() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	var b [6]byte
	_, _ = rand.Read(b[:])
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "sim-" + string(b[:])
}

func parseServer(s string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("sim: server %q is not a URL like mqtt://HOST:1883", s)
	}
	switch u.Scheme {
	case "mqtt", "tcp":
		if u.Port() == "" {
			u.Host = net.JoinHostPort(u.Hostname(), "1883")
		}
	case "mqtts", "ssl", "tls":
		if u.Port() == "" {
			u.Host = net.JoinHostPort(u.Hostname(), "8883")
		}
	default:
		return nil, fmt.Errorf("sim: server %q: scheme must be mqtt or mqtts", s)
	}
	return u, nil
}

// DeviceIDs lists the simulated devices' ids, in index order.
func (s *Sim) DeviceIDs() []string {
	ids := make([]string, len(s.devices))
	for i, d := range s.devices {
		ids[i] = d.id
	}
	return ids
}

// Prefix is the devices' id prefix (the random one when none was given).
func (s *Sim) Prefix() string { return s.cfg.Prefix }

// Failing tells whether the device with this index (1-based) fails its
// modules.
func (s *Sim) Failing(index int) bool {
	return index >= 1 && index <= len(s.devices) && s.devices[index-1].fails
}

// Run connects every device, at most ConnectRate a second, and keeps them
// connected and reporting until ctx ends or Duration elapses; then it
// disconnects them all and returns nil. It fails early when the controller
// refuses the first devices' keys and has accepted none (a wrong token, or
// a deleted enrollment). A Sim runs once.
func (s *Sim) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("sim: Run was already called")
	}
	s.started.Store(time.Now().UnixNano())
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.cancel = cancel
	if s.cfg.Duration > 0 {
		var stop context.CancelFunc
		ctx, stop = context.WithTimeout(ctx, s.cfg.Duration)
		defer stop()
	}
	var progress sync.WaitGroup
	if s.cfg.Progress != nil {
		progress.Go(func() { s.progressLoop(ctx) })
	}
	var wg sync.WaitGroup
	for _, d := range s.devices {
		wg.Go(func() { d.run(ctx) })
	}
	wg.Wait()
	progress.Wait()
	s.stopped.Store(time.Now().UnixNano())
	if err := context.Cause(ctx); errors.Is(err, ErrRefused) {
		return err
	}
	return nil
}

// Stats is a snapshot of the simulator's counters.
type Stats struct {
	// Devices is how many devices are simulated, named Prefix-0001, ...
	Devices int    `json:"devices"`
	Prefix  string `json:"prefix"`
	// Connected devices hold a session now; PeakConnected is the most
	// that did at once.
	Connected     int `json:"connected"`
	PeakConnected int `json:"peakConnected"`
	// Enrolled devices were accepted by a controller at least once (the
	// first acceptance of a new device registers it).
	Enrolled int `json:"enrolled"`
	// Connects counts accepted connections, reconnections included.
	Connects int64 `json:"connects"`
	// ConnectFailures counts failed attempts (refused, unreachable,
	// timed out); Refusals those the controller refused.
	ConnectFailures int64 `json:"connectFailures"`
	Refusals        int64 `json:"refusals"`
	// Disconnects counts established connections that were lost.
	Disconnects int64 `json:"disconnects"`
	// Returns counts moves back to a device's preferred server, each made
	// once a new connection to it was up (not counted in Disconnects);
	// ReturnChecks the checks of a preferred server that found it still
	// away or refusing.
	Returns      int64 `json:"returns,omitempty"`
	ReturnChecks int64 `json:"returnChecks,omitempty"`
	// ByServer counts the devices connected now to each server, by its
	// host:port.
	ByServer map[string]int `json:"byServer,omitempty"`
	// DesiredReceived counts desired documents received.
	DesiredReceived int64 `json:"desiredReceived"`
	// ReportsSent counts reported documents published, ReportsAcked those
	// the controller acknowledged.
	ReportsSent  int64 `json:"reportsSent"`
	ReportsAcked int64 `json:"reportsAcked"`
	// TelemetrySent counts upstream messages made (each once, whatever
	// the batches sent again), TelemetryAcked those in a batch the
	// controller acknowledged, TelemetryBatches the batches published.
	TelemetrySent    int64 `json:"telemetrySent,omitempty"`
	TelemetryAcked   int64 `json:"telemetryAcked,omitempty"`
	TelemetryBatches int64 `json:"telemetryBatches,omitempty"`
	// FailingDevices acknowledged a report whose code is not 200.
	FailingDevices int `json:"failingDevices"`
	// Latest is the deployment of the newest desired document any device
	// received ("" for the empty desired state).
	Latest string `json:"latestDeployment"`
	// Deployments counts, by deployment id ("" for none), the devices whose
	// last acknowledged report is for it.
	Deployments map[string]DeploymentStats `json:"deployments"`
	// LastError is the last connection error, if any.
	LastError string `json:"lastError,omitempty"`
	// ElapsedSeconds is how long Run has run (or ran).
	ElapsedSeconds float64 `json:"elapsedSeconds"`
}

// DeploymentStats counts the devices reporting one deployment.
type DeploymentStats struct {
	Reporting int `json:"reporting"`
	OK        int `json:"ok"`     // code 200
	Failed    int `json:"failed"` // any other code
}

// Stats returns the current counters.
func (s *Sim) Stats() Stats {
	st := Stats{
		Devices:         len(s.devices),
		Prefix:          s.cfg.Prefix,
		Connected:       int(s.connected.Load()),
		PeakConnected:   int(s.peak.Load()),
		Enrolled:        int(s.enrolled.Load()),
		Connects:        s.connects.Load(),
		ConnectFailures: s.connectFailures.Load(),
		Refusals:        s.refusals.Load(),
		Disconnects:     s.disconnects.Load(),
		Returns:         s.returns.Load(),
		ReturnChecks:    s.returnChecks.Load(),
		ByServer:        map[string]int{},
		DesiredReceived: s.desiredReceived.Load(),
		ReportsSent:     s.reportsSent.Load(),
		ReportsAcked:    s.reportsAcked.Load(),
		Deployments:     map[string]DeploymentStats{},

		TelemetrySent:    s.telemetrySent.Load(),
		TelemetryAcked:   s.telemetryAcked.Load(),
		TelemetryBatches: s.batchesSent.Load(),
	}
	for i, h := range s.hosts {
		if n := int(s.byServer[i].Load()); n > 0 {
			st.ByServer[h] += n
		}
	}
	if t := s.started.Load(); t != 0 {
		end := time.Now()
		if e := s.stopped.Load(); e != 0 {
			end = time.Unix(0, e)
		}
		st.ElapsedSeconds = end.Sub(time.Unix(0, t)).Seconds()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st.Latest, st.LastError = s.latest, s.lastErr
	for id, c := range s.byDeployment {
		st.Deployments[id] = *c
		st.FailingDevices += c.Failed
	}
	return st
}

// Reporting returns the counts of one deployment ("" for none).
func (s *Sim) Reporting(deploymentID string) DeploymentStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.byDeployment[deploymentID]; c != nil {
		return *c
	}
	return DeploymentStats{}
}

// connectionUp counts a new session with a server.
func (s *Sim) connectionUp(server int) {
	s.connects.Add(1)
	s.byServer[server].Add(1)
	n := s.connected.Add(1)
	for {
		p := s.peak.Load()
		if n <= p || s.peak.CompareAndSwap(p, n) {
			return
		}
	}
}

// connectionDown counts a session that ended.
func (s *Sim) connectionDown(server int) {
	s.byServer[server].Add(-1)
	s.connected.Add(-1)
}

// account moves a device to the deployment and code of a report the
// controller acknowledged.
func (s *Sim) account(d *device, deploymentID string, code int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d.counted {
		c := s.byDeployment[d.countedDep]
		c.Reporting--
		if d.countedCode == fleet.StatusCodeOK {
			c.OK--
		} else {
			c.Failed--
		}
		if c.Reporting == 0 {
			delete(s.byDeployment, d.countedDep)
		}
	}
	c := s.byDeployment[deploymentID]
	if c == nil {
		c = &DeploymentStats{}
		s.byDeployment[deploymentID] = c
	}
	c.Reporting++
	if code == fleet.StatusCodeOK {
		c.OK++
	} else {
		c.Failed++
	}
	d.counted, d.countedDep, d.countedCode = true, deploymentID, code
}

// noteDesired remembers the deployment of the newest desired document.
func (s *Sim) noteDesired(version uint64, deploymentID string) {
	s.desiredReceived.Add(1)
	s.mu.Lock()
	if !s.haveLatest || version > s.latestVersion {
		s.haveLatest, s.latestVersion, s.latest = true, version, deploymentID
	}
	s.mu.Unlock()
}

// refusalsBeforeGivingUp: refusals, with no device ever accepted, after
// which Run stops.
func (s *Sim) refusalsBeforeGivingUp() int64 { return int64(max(3, min(len(s.devices), 20))) }

func (s *Sim) connectFailed(d *device, err error) {
	s.connectFailures.Add(1)
	s.mu.Lock()
	s.lastErr = err.Error()
	s.mu.Unlock()
	if errors.Is(err, ErrRefused) && !d.enrolled {
		if n := s.refusals.Add(1); n >= s.refusalsBeforeGivingUp() && s.enrolled.Load() == 0 {
			s.cancel(fmt.Errorf("%w: %d devices refused and none accepted; check the enrollment token (and that its enrollment still exists)", ErrRefused, n))
		}
	}
	// One warning every 10 s at most: a fleet that cannot reach its
	// controller would otherwise log a line per device and attempt.
	now := time.Now().UnixNano()
	if last := s.lastWarn.Load(); now-last > int64(10*time.Second) && s.lastWarn.CompareAndSwap(last, now) {
		s.log.Warn("devices cannot connect; retrying with backoff", "device", d.id, "err", err, "failures", s.connectFailures.Load())
	} else {
		s.log.Debug("connect failed", "device", d.id, "err", err)
	}
}

// progressLoop writes a line every ProgressInterval in which the counters
// changed, until ctx ends.
func (s *Sim) progressLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.ProgressInterval)
	defer t.Stop()
	var last string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if line := ProgressLine(s.Stats()); line != last {
			last = line
			fmt.Fprintf(s.cfg.Progress, "%6.1fs %s\n", time.Since(time.Unix(0, s.started.Load())).Seconds(), line)
		}
	}
}

// ProgressLine renders the counters as one line: connections, and the
// devices reporting the latest deployment.
func ProgressLine(st Stats) string {
	var b strings.Builder
	fmt.Fprintf(&b, "connected %d/%d, enrolled %d, reports %d", st.Connected, st.Devices, st.Enrolled, st.ReportsAcked)
	if st.TelemetrySent > 0 {
		fmt.Fprintf(&b, ", telemetry %d acknowledged of %d", st.TelemetryAcked, st.TelemetrySent)
	}
	if st.ConnectFailures > 0 {
		fmt.Fprintf(&b, ", connect failures %d", st.ConnectFailures)
	}
	if st.Returns > 0 {
		fmt.Fprintf(&b, ", returned to their preferred server %d", st.Returns)
	}
	if st.DesiredReceived > 0 {
		c := st.Deployments[st.Latest]
		fmt.Fprintf(&b, "; %s: %d/%d reporting, %d ok, %d failed", DeploymentName(st.Latest), c.Reporting, st.Devices, c.OK, c.Failed)
		var others []string
		for id, c := range st.Deployments {
			if id != st.Latest {
				others = append(others, fmt.Sprintf("%s %d", DeploymentName(id), c.Reporting))
			}
		}
		if len(others) > 0 {
			sort.Strings(others)
			fmt.Fprintf(&b, " (others: %s)", strings.Join(others, ", "))
		}
	}
	return b.String()
}

// DeploymentName shows "" as "(no deployment)".
func DeploymentName(id string) string {
	if id == "" {
		return "(no deployment)"
	}
	return fmt.Sprintf("deployment %q", id)
}

// pacer spaces events at least every apart, over all callers: a leaky
// bucket without burst.
type pacer struct {
	mu    sync.Mutex
	next  time.Time
	every time.Duration
}

func (p *pacer) wait(ctx context.Context) error {
	return sleep(ctx, time.Until(p.reserve()))
}

// reserve takes the next slot and returns when it is.
func (p *pacer) reserve() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.next.Before(now) {
		p.next = now
	}
	at := p.next
	p.next = at.Add(p.every)
	return at
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// RecordedDocument is one line of Config.Record.
type RecordedDocument struct {
	Device     string    `json:"device"`
	Version    uint64    `json:"version"`
	Deployment string    `json:"deployment"`
	Time       time.Time `json:"time"`
}

// record writes a line to Config.Record, if set.
func (s *Sim) record(deviceID string, doc fleet.DesiredDocument) {
	if s.cfg.Record == nil {
		return
	}
	b, err := json.Marshal(RecordedDocument{Device: deviceID, Version: doc.Version, Deployment: doc.DeploymentID, Time: time.Now().UTC()})
	if err != nil {
		return
	}
	s.recordMu.Lock()
	defer s.recordMu.Unlock()
	if _, err := s.cfg.Record.Write(append(b, '\n')); err != nil && !s.recordFailed {
		s.recordFailed = true
		s.log.Warn("cannot record desired documents", "err", err)
	}
}
