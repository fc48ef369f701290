package broker

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/ratelog"
)

// Authenticator checks a device's MQTT credentials: deviceID is the MQTT
// username, key the password, which must be one of the device's two keys.
// It returns nil to allow the connection; unknown and disabled devices must be
// refused. Comparing against the stored hashes in constant time is the
// implementer's job. It runs on the connecting client's goroutine, bounded by
// Limits.AuthTimeout through ctx, so it should answer from local state.
type Authenticator interface {
	AuthenticateDevice(ctx context.Context, deviceID, key string) error
}

// KeyIdentifier is implemented by an Authenticator that can name the
// credential a key stands for (the node: the stored digest of the key), so
// that DisconnectStale can tell which connections used a key that has since
// been replaced. Without it the broker names a key by its SHA-256.
type KeyIdentifier interface {
	KeyID(deviceID, key string) string
}

// DesiredSource returns the current desired document (JSON) of a device. The
// broker calls it when a device subscribes to its desired topic, on that
// client's goroutine, so it should answer from local state. The source
// decides the bytes for a device with no applied deployment: an explicit
// empty desired state, or nil (nothing is sent: the device keeps what it
// runs). An error disconnects the device (it retries by reconnecting), so
// that a device never sits connected without its desired state.
type DesiredSource interface {
	Desired(deviceID string) ([]byte, error)
}

// ReportSink receives a device's reported document, already checked to be a
// JSON object no larger than Limits.MaxReportSize. The slice is the sink's to
// keep. SubmitReport must not block (the node batches reports into raft); an
// error means the report was not taken and is counted as dropped.
type ReportSink interface {
	SubmitReport(deviceID string, report []byte) error
}

// Errors returned by Broker methods.
var (
	// ErrNotConnected: the device has no connection to this broker.
	ErrNotConnected = errors.New("device not connected")
	// ErrBacklogged: the device does not acknowledge what it is sent, so it
	// was disconnected instead of being sent more; it gets its current
	// desired document when it reconnects and subscribes.
	ErrBacklogged = errors.New("device backlogged; disconnected")
	// ErrClosed: the broker is closed.
	ErrClosed = errors.New("broker closed")
)

// Defaults of Limits, used for every zero field.
const (
	DefaultMaxPacketSize  = fleet.MaxUpstreamBatchSize + 4<<10 // bytes; a device hub's upstream batch holding one message of Azure IoT Hub's largest size (256 KiB), with its topic
	DefaultMaxReportSize  = 64 << 10                           // bytes
	DefaultMaxInflight    = 32                                 // QoS 1 messages per client and direction
	DefaultMaxKeepalive   = 20 * time.Minute
	DefaultConnectTimeout = 10 * time.Second
	DefaultAuthTimeout    = 5 * time.Second
	DefaultReadBufferSize = 2 << 10 // bytes, per connection while it has bytes to process

	DefaultMaxPendingPerSource = 256 // connections not yet authenticated, per source address

	// Report quotas per device: see Limits.
	DefaultReportRate       = 2.0       // reports a second, sustained
	DefaultReportBurst      = 30        // reports at once
	DefaultReportBytesRate  = 16 << 10  // bytes a second, sustained
	DefaultReportBytesBurst = 256 << 10 // bytes at once (at least MaxReportSize)
	DefaultReportOverruns   = 30        // reports over quota in one session before a disconnect
)

// mochiReadBufferSize sizes the bufio.Reader mochi keeps for each client. It
// reads from our own read buffer (see trackedConn.Read), which a connection
// holds only while it has bytes to process, so mochi's can be tiny: a
// PUBACK or PINGREQ fits, and larger packets are read past it, straight
// into the packet.
const mochiReadBufferSize = 64

// Limits caps what one client can make the broker hold. Zero fields take the
// Default* values above.
type Limits struct {
	// MaxPacketSize caps one MQTT packet a client sends, fixed header
	// included; a larger one disconnects the client before it is read.
	MaxPacketSize uint32
	// MaxReportSize caps a reported document; a larger one is dropped and
	// counted.
	MaxReportSize int
	// MaxInflight caps unacknowledged QoS 1 messages per client in each
	// direction: desired documents to it (the broker's own count, send.go)
	// and its publishes (mochi's ReceiveMaximum). A desired document for a
	// client already at the cap is not sent: the client is disconnected
	// instead (see ErrBacklogged).
	MaxInflight uint16
	// MaxKeepalive replaces a client's keepalive when it asks for none (0) or
	// for a longer one, so that every connection has a read deadline. MQTT 5
	// clients are told through the Server Keep Alive property. At most 65535 s.
	MaxKeepalive time.Duration
	// ConnectTimeout bounds the TCP and TLS handshakes plus the CONNECT packet.
	ConnectTimeout time.Duration
	// AuthTimeout bounds one Authenticator call.
	AuthTimeout time.Duration
	// MaxConnections caps the clients connected at once; more are refused with
	// "server busy" (MQTT 5) or "server unavailable" (3.1.1). 0: no cap other
	// than the process's open-file limit.
	MaxConnections int64
	// ReadBufferSize sizes the read buffer a connection borrows from a
	// shared pool while it has bytes to process; an idle connection holds
	// none. Larger packets are still read whole (up to MaxPacketSize).
	ReadBufferSize int
	// MaxPendingPerSource caps the connections of one source address that
	// have not authenticated yet (TCP accepted, TLS and CONNECT under way,
	// within ConnectTimeout); more are closed at accept, before TLS.
	// Authenticated devices do not count, so any number of devices may
	// share one address (a NAT gateway): the cap bounds what one host
	// without a device key can hold. Negative: no cap.
	MaxPendingPerSource int

	// Report quotas, per device (kept across its reconnections to this
	// node): reports beyond ReportBurst at once or ReportRate a second
	// sustained, or beyond ReportBytesBurst bytes at once or
	// ReportBytesRate a second, are throttled: not committed now, the
	// latest one kept and committed as soon as the device's budget allows
	// (nothing it reported is lost, later reports supersede earlier ones).
	// A device that sends ReportOverruns reports over its quota (or too
	// large, or malformed) in one session, each sooner after the one
	// before than its budget takes to refill from empty (15-16 s by
	// default), is disconnected. So one device grows the replicated log
	// by at most ReportBytesBurst plus ReportBytesRate a second, whatever
	// it sends. ReportRate < 0 turns the quotas off.
	ReportRate       float64
	ReportBurst      int
	ReportBytesRate  int
	ReportBytesBurst int
	ReportOverruns   int
}

func (l Limits) withDefaults() Limits {
	if l.MaxPacketSize == 0 {
		l.MaxPacketSize = DefaultMaxPacketSize
	}
	if l.MaxReportSize == 0 {
		l.MaxReportSize = DefaultMaxReportSize
	}
	if l.MaxInflight == 0 {
		l.MaxInflight = DefaultMaxInflight
	}
	if l.MaxKeepalive == 0 {
		l.MaxKeepalive = DefaultMaxKeepalive
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = DefaultConnectTimeout
	}
	if l.AuthTimeout == 0 {
		l.AuthTimeout = DefaultAuthTimeout
	}
	if l.ReadBufferSize == 0 {
		l.ReadBufferSize = DefaultReadBufferSize
	}
	if l.MaxPendingPerSource == 0 {
		l.MaxPendingPerSource = DefaultMaxPendingPerSource
	}
	if l.ReportRate == 0 {
		l.ReportRate = DefaultReportRate
	}
	if l.ReportBurst == 0 {
		l.ReportBurst = DefaultReportBurst
	}
	if l.ReportBytesRate == 0 {
		l.ReportBytesRate = DefaultReportBytesRate
	}
	if l.ReportBytesBurst == 0 {
		l.ReportBytesBurst = max(DefaultReportBytesBurst, l.MaxReportSize)
	}
	if l.ReportOverruns == 0 {
		l.ReportOverruns = DefaultReportOverruns
	}
	return l
}

// quotasOn tells whether report quotas apply.
func (l Limits) quotasOn() bool { return l.ReportRate > 0 }

func (l Limits) validate() error {
	switch {
	case l.MaxReportSize < 0:
		return fmt.Errorf("limits: MaxReportSize %d is negative", l.MaxReportSize)
	case l.MaxKeepalive < time.Second || l.MaxKeepalive > math.MaxUint16*time.Second:
		return fmt.Errorf("limits: MaxKeepalive %s is outside 1s..65535s", l.MaxKeepalive)
	case l.ConnectTimeout < 0, l.AuthTimeout < 0:
		return errors.New("limits: timeouts must not be negative")
	case l.MaxConnections < 0:
		return fmt.Errorf("limits: MaxConnections %d is negative", l.MaxConnections)
	case l.ReadBufferSize < 0:
		return errors.New("limits: ReadBufferSize must not be negative")
	case math.IsNaN(l.ReportRate):
		return errors.New("limits: ReportRate is not a number")
	case l.quotasOn() && (math.IsInf(l.ReportRate, 0) || l.ReportBurst < 1 || l.ReportBytesRate < 1 || l.ReportOverruns < 1):
		return fmt.Errorf("limits: report quotas need a finite rate, a burst of at least 1, a byte rate of at least 1 and at least 1 overrun; got rate %v, burst %d, bytes %d/s, overruns %d",
			l.ReportRate, l.ReportBurst, l.ReportBytesRate, l.ReportOverruns)
	case l.quotasOn() && l.ReportBytesBurst < l.MaxReportSize:
		return fmt.Errorf("limits: ReportBytesBurst %d is below MaxReportSize %d: a report of the largest size could never be committed", l.ReportBytesBurst, l.MaxReportSize)
	}
	return nil
}

// Config configures a Broker. Auth, Desired and Reports are required.
type Config struct {
	// Addr is the TCP address to listen on. "": ":1883", or ":8883" with TLS.
	// Port 0 picks a free port; Addr() tells which.
	Addr string
	// TLSConfig, when set, makes the listener speak MQTT over TLS only.
	TLSConfig *tls.Config
	// Auth checks device credentials.
	Auth Authenticator
	// Desired supplies a device's desired document when it subscribes.
	Desired DesiredSource
	// Reports receives reported documents.
	Reports ReportSink
	// Upstream takes the device hubs' upstream batches and Methods their
	// method responses (hub.go); nil: they are acknowledged and counted.
	Upstream UpstreamSink
	Methods  MethodSink
	// Logger receives the broker's logs, tagged component=broker. nil:
	// slog.Default(). mochi's own logs go to it too, filtered by
	// mochiLogHandler: never its debug logs, which print whole packets,
	// desired documents (with registry credentials) included.
	Logger *slog.Logger
	// Limits caps client-provided sizes; zero fields take the defaults.
	Limits Limits
}

// ConnInfo describes one connected device.
type ConnInfo struct {
	DeviceID        string
	ConnectedSince  time.Time // when its CONNECT was authenticated
	LastActivity    time.Time // when it last sent any bytes
	RemoteAddr      string
	ProtocolVersion byte // 4 for MQTT 3.1.1, 5 for MQTT 5
	TLS             bool
}

// Stats are counters since New, plus the current number of connections.
type Stats struct {
	Connections     int    // devices connected now
	AuthFailures    uint64 // CONNECTs refused: bad credentials, client id not the device id, will topic not the device's own
	ACLDenials      uint64 // subscriptions and publishes refused
	ReportsAccepted uint64 // reported documents handed to the ReportSink
	// UpstreamBatches and UpstreamMessages count the device hubs' batches
	// received on fleet.UpstreamTopic and the messages they announce;
	// UpstreamRefused the batches the UpstreamSink did not keep (the device
	// sends them again); MethodResponses the answers received on
	// fleet.MethodResponseTopic; MethodsSent the requests written to
	// devices.
	UpstreamBatches  uint64
	UpstreamMessages uint64
	UpstreamRefused  uint64
	MethodResponses  uint64
	MethodsSent      uint64
	ReportsDropped   uint64 // reported documents malformed, too large, or refused by the sink
	DesiredSent      uint64 // desired documents handed to mochi for delivery
	DesiredFailed    uint64 // DesiredSource errors, and desired documents not sent because the client was backlogged
	PanicsRecovered  uint64 // panics in a client's connection, each closing only that client
	Refusing         bool   // Refuse is in effect
	Refused          uint64 // connections turned away or ended because of Refuse

	// Connections that ended without a session, besides AuthFailures
	// and Refused.
	NoConnect      uint64 // ended before a CONNECT arrived: ConnectTimeout, TLS failure, closed by the client
	ProtocolErrors uint64 // first packet not a CONNECT, or a malformed or invalid one
	Busy           uint64 // refused at MaxConnections
	// Connections closed at accept because their source address held
	// MaxPendingPerSource unauthenticated ones; OpenConns: every
	// connection open now, authenticated or not.
	SourceRefused uint64
	OpenConns     int64

	// Report quotas: reports over a device's budget (the latest of them
	// is committed later, then counted in ReportsAccepted), devices
	// disconnected for going on, devices over budget now.
	ReportsThrottled uint64
	QuotaDisconnects uint64
	DevicesThrottled int
}

type counters struct {
	authFailures, aclDenials                atomic.Uint64
	reportsAccepted, reportsDropped         atomic.Uint64
	upstreamBatches, upstreamMessages       atomic.Uint64
	upstreamRefused                         atomic.Uint64
	methodResponses, methodsSent            atomic.Uint64
	desiredSent, desiredFailed, panicsSaved atomic.Uint64
	refused                                 atomic.Uint64
	noConnect, protocolErrors, busy         atomic.Uint64
}

// Broker is the embedded MQTT broker. Create it with New, then Start it.
type Broker struct {
	lim     Limits
	auth    Authenticator
	desired DesiredSource
	reports ReportSink
	// upstream and methods are optional (hub.go).
	upstream UpstreamSink
	methods  MethodSink
	log      *slog.Logger

	srv      *mqtt.Server
	ln       *guardedListener
	readBufs sync.Pool // of *[]byte, Limits.ReadBufferSize each
	senders  *senders  // write desired documents (send.go)

	idleWorkers chan burstJob // unbuffered: to a worker waiting for a burst (listener.go)
	// connectSession and serveSession as func values, made once: a method
	// value made per burst is an allocation per packet.
	connectFn, serveFn func(*trackedConn) bool

	ctx    context.Context // cancelled by Close; parent of Authenticator calls
	cancel context.CancelFunc

	stateMu sync.Mutex
	started bool
	closed  atomic.Bool

	mu      sync.RWMutex
	devices map[string][]*trackedConn // device id → its connections (usually one; two during a takeover)
	// lastSeen is, per device whose connection here ended, when it last
	// sent anything on it (for LastSeen).
	lastSeen map[string]time.Time

	refusing atomic.Bool // Refuse: devices are turned away

	quotas *reportQuotas // per-device report budgets; nil when off (quota.go)

	// Rate limits of the log lines a client can cause at will: refused
	// CONNECTs and protocol errors (clientLog), connections over the cap
	// per source (sourceLog), recovered panics, quota disconnects.
	clientLog, sourceLog, panicLog, quotaLog ratelog.Limiter

	stats counters
}

// New checks cfg and builds a broker; nothing listens until Start.
func New(cfg Config) (*Broker, error) {
	if cfg.Auth == nil || cfg.Desired == nil || cfg.Reports == nil {
		return nil, errors.New("broker config: Auth, Desired and Reports are required")
	}
	lim := cfg.Limits.withDefaults()
	if err := lim.validate(); err != nil {
		return nil, fmt.Errorf("broker config: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "broker")
	addr := cfg.Addr
	if addr == "" {
		addr = ":1883"
		if cfg.TLSConfig != nil {
			addr = ":8883"
		}
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = lim.MaxPacketSize
	caps.MaximumInflight = lim.MaxInflight
	caps.ReceiveMaximum = lim.MaxInflight
	// mochi's queue of messages to a client is never used: desired documents
	// are written by the broker (send.go), and nothing else can reach a
	// device. Unbuffered, and no WriteLoop reading it: anything mochi would
	// queue is dropped, and OnPublishDropped disconnects the device.
	caps.MaximumClientWritesPending = 0
	if lim.MaxConnections > 0 {
		caps.MaximumClients = lim.MaxConnections
	}
	// No message expiry: mochi's inflight store, the only thing it would
	// expire, is not used (acknowledgements of desired documents are the
	// broker's own, send.go). A device that stops acknowledging is
	// disconnected at MaxInflight instead.
	caps.MaximumMessageExpiryInterval = 0
	// Sessions end with the connection: a device re-subscribes and is sent
	// its current desired document, so nothing needs to outlive it.
	caps.MaximumSessionExpiryInterval = 0
	// Inbound topic aliases are a per-client map of up to 65535 topic names,
	// and mochi resolves them after the ACL check: refuse them.
	caps.TopicAliasMaximum = 0
	caps.RetainAvailable = 0    // the broker stores nothing
	caps.SharedSubAvailable = 0 // the ACL refuses $share anyway
	caps.MaximumQos = 1         // desired state and reports need no QoS 2 state machine
	caps.MinimumProtocolVersion = 4

	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{
		lim:     lim,
		auth:    cfg.Auth,
		desired: cfg.Desired,
		reports: cfg.Reports,
		log:     logger,

		upstream: cfg.Upstream,
		methods:  cfg.Methods,
		ctx:      ctx,
		cancel:   cancel,
		devices:  make(map[string][]*trackedConn),
		senders:  newSenders(),

		idleWorkers: make(chan burstJob),
	}
	b.connectFn, b.serveFn = b.connectSession, b.serveSession
	if lim.quotasOn() {
		b.quotas = newReportQuotas(b, lim)
	}
	b.clientLog.Burst = clientLogBurst
	b.readBufs.New = func() any {
		buf := make([]byte, lim.ReadBufferSize)
		return &buf
	}
	b.srv = mqtt.New(&mqtt.Options{
		Capabilities:            caps,
		ClientNetReadBufferSize: mochiReadBufferSize,
		Logger:                  slog.New(mochiLogHandler{h: logger.Handler()}),
		// $SYS topics are refused to devices; publishing them calls
		// runtime.ReadMemStats (stop-the-world), so do it rarely.
		SysTopicResendInterval: 3600,
	})
	// Ours is the only hook. mochi OR-s OnACLCheck across hooks, so any
	// other hook (its auth ledger, AllowHook) could only widen access.
	// Authentication is not a hook: the listener runs it (session.go).
	if err := b.srv.AddHook(&deviceHook{b: b}, nil); err != nil {
		cancel()
		return nil, fmt.Errorf("add device hook: %w", err)
	}
	b.ln = newGuardedListener(b, addr, cfg.TLSConfig)
	return b, nil
}

// Start binds the listener and starts serving. The broker closes itself when
// ctx is done; Close may also be called directly.
func (b *Broker) Start(ctx context.Context) error {
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	if b.closed.Load() {
		return ErrClosed
	}
	if b.started {
		return errors.New("broker already started")
	}
	if err := b.srv.AddListener(b.ln); err != nil {
		return fmt.Errorf("listen mqtt %s: %w", b.ln.address, err)
	}
	if err := b.srv.Serve(); err != nil {
		b.ln.Close(nil)
		return fmt.Errorf("serve mqtt: %w", err)
	}
	b.started = true
	context.AfterFunc(ctx, func() { _ = b.Close() })
	b.log.Info("mqtt broker listening", "addr", b.ln.Address(), "tls", b.ln.tlsConfig != nil)
	return nil
}

// Addr returns the bound listen address once started (the configured one
// before).
func (b *Broker) Addr() string { return b.ln.Address() }

// PublishDesired sends doc at QoS 1 to the device's desired topic if the
// device is connected to this broker. Only that device can be subscribed to
// the topic, so nothing reaches another device, and nothing is retained.
//
// It never blocks: doc goes into the device's one-slot mailbox (replacing a
// document not yet written: only the latest desired state matters), which a
// sender or the device's own connection writes (send.go); so doc must not be
// modified after the call. A device that is connected but has not
// subscribed yet gets nil here and its desired document from the
// DesiredSource when it subscribes, so the node must make the source return
// the new document before calling PublishDesired. Devices connected to
// other nodes give ErrNotConnected, which callers fanning out to a fleet can
// ignore. Documents can overtake each other (a subscribe-time send and a
// PublishDesired racing); the agent keeps the highest version.
func (b *Broker) PublishDesired(deviceID string, doc []byte) error {
	if b.closed.Load() {
		return ErrClosed
	}
	tc := b.connFor(deviceID)
	if tc == nil {
		return ErrNotConnected
	}
	cl := tc.client.Load()
	if cl == nil || cl.Closed() {
		return ErrNotConnected
	}
	if tc.desiredQoS.Load() == notSubscribed {
		return nil // it will be sent on subscribe
	}
	if b.backlogged(tc, cl) {
		return ErrBacklogged
	}
	tc.pending.Store(&doc)
	if b.ready(tc) {
		b.schedule(tc)
	}
	return nil
}

// Disconnect drops every connection of the device at once, for example
// because it was disabled or deleted; a connection still authenticating is
// refused. The device can reconnect if the Authenticator lets it. MQTT 5
// clients are sent DISCONNECT "administrative action" first (3.1.1 has no
// server DISCONNECT); that write is bounded by disconnectGrace.
func (b *Broker) Disconnect(deviceID string) {
	b.mu.Lock()
	conns := slices.Clone(b.devices[deviceID])
	for _, tc := range conns {
		tc.revoked.Store(true)
	}
	b.mu.Unlock()
	for _, tc := range conns {
		b.dropConn(tc, packets.ErrAdministrativeAction)
	}
	if len(conns) > 0 {
		b.log.Info("device disconnected by the node", "device", deviceID, "connections", len(conns))
	}
}

// DisconnectStale drops the device's connections whose credential no
// longer opens it: stillValid is asked about each authenticated
// connection's KeyID; a connection whose key check is still running asks
// it when the check returns, and is refused if the answer is no (the
// check may have read the keys from before the change). stillValid must
// judge by the state at the time it is called, since that can be later.
// The node calls it when it applies a change of the device's keys or
// status, on every node, so a replaced key loses its sessions everywhere
// at once. It returns how many connections it ended.
func (b *Broker) DisconnectStale(deviceID string, stillValid func(keyID string) bool) int {
	type keyed struct {
		tc    *trackedConn
		keyID string
	}
	var check []keyed
	b.mu.Lock()
	for _, tc := range b.devices[deviceID] {
		if tc.revoked.Load() {
			continue
		}
		if tc.keyID == "" {
			tc.recheck = stillValid
			continue
		}
		check = append(check, keyed{tc, tc.keyID}) // set once, never changed
	}
	b.mu.Unlock()
	// Asked outside the registry's lock: stillValid reads the node's state.
	var stale []*trackedConn
	for _, k := range check {
		if !stillValid(k.keyID) && k.tc.revoked.CompareAndSwap(false, true) {
			stale = append(stale, k.tc)
		}
	}
	for _, tc := range stale {
		b.dropConn(tc, packets.ErrNotAuthorized)
	}
	if len(stale) > 0 {
		b.log.Info("device disconnected: its key or status changed", "device", deviceID, "connections", len(stale))
	}
	return len(stale)
}

// keyID names the credential key stands for (KeyIdentifier).
func (b *Broker) keyID(deviceID, key string) string {
	if ki, ok := b.auth.(KeyIdentifier); ok {
		return ki.KeyID(deviceID, key)
	}
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// Refuse turns devices away from this node, for a node that cannot serve
// them (it has lost its cluster's leader, so it can neither commit their
// reports nor learn of new desired state): a new connection is answered
// "server unavailable", and every device connected now is disconnected
// ("use another server" for MQTT 5), so that it tries the next node it
// knows. It returns how many connections it ended; calling it again ends
// any that slipped in since. Admit undoes it.
func (b *Broker) Refuse() int {
	b.refusing.Store(true)
	b.mu.RLock()
	var conns []*trackedConn
	for _, cs := range b.devices {
		for _, tc := range cs {
			if tc.live() && tc.shed.CompareAndSwap(false, true) {
				conns = append(conns, tc)
			}
		}
	}
	b.mu.RUnlock()
	// Every deadline first: the DISCONNECTs to devices that stopped
	// reading then all give up within one disconnectGrace, not one each.
	for _, tc := range conns {
		tc.capDeadline(time.Now().Add(disconnectGrace))
	}
	for _, tc := range conns {
		b.dropConn(tc, packets.ErrUseAnotherServer)
	}
	b.stats.refused.Add(uint64(len(conns)))
	return len(conns)
}

// Admit lets devices connect again after Refuse.
func (b *Broker) Admit() { b.refusing.Store(false) }

// refuseIfRefusing answers a connecting client "server unavailable" while
// Refuse is in effect.
func (b *Broker) refuseIfRefusing(cl *mqtt.Client) bool {
	if !b.refusing.Load() {
		return false
	}
	if tc := connOf(cl); tc == nil || tc.shed.CompareAndSwap(false, true) {
		b.stats.refused.Add(1) // once per connection, whether here or in Refuse
	}
	b.log.Debug("device turned away: this node has no cluster leader", "device", string(cl.Properties.Username), "remote", cl.Net.Remote)
	_ = b.srv.SendConnack(cl, packets.ErrServerUnavailable, false, nil)
	return true
}

// disconnectGrace bounds writing a DISCONNECT to a client being dropped.
const disconnectGrace = 250 * time.Millisecond

func (b *Broker) dropConn(tc *trackedConn, code packets.Code) {
	tc.capDeadline(time.Now().Add(disconnectGrace))
	cl := tc.client.Load()
	switch {
	case cl == nil:
		_ = tc.Close()
	case tc.established.Load() && cl.Properties.ProtocolVersion >= 5:
		_ = b.srv.DisconnectClient(cl, code)
	default:
		// MQTT 3.1.1 has no server DISCONNECT; before CONNACK neither has 5.
		cl.Stop(code)
	}
}

// Connected lists the devices connected now, sorted by device id.
func (b *Broker) Connected() []ConnInfo {
	b.mu.RLock()
	out := make([]ConnInfo, 0, len(b.devices))
	for _, conns := range b.devices {
		for _, tc := range conns {
			if info, ok := tc.info(); ok {
				out = append(out, info)
			}
		}
	}
	b.mu.RUnlock()
	slices.SortFunc(out, func(a, c ConnInfo) int { return strings.Compare(a.DeviceID, c.DeviceID) })
	return out
}

// Connection tells whether the device is connected here, and how.
func (b *Broker) Connection(deviceID string) (ConnInfo, bool) {
	if tc := b.connFor(deviceID); tc != nil {
		return tc.info()
	}
	return ConnInfo{}, false
}

// LastSeen tells when a device that was connected to this node, and is
// not now, last sent anything (since the node started).
func (b *Broker) LastSeen(deviceID string) (time.Time, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	t, ok := b.lastSeen[deviceID]
	return t, ok
}

// Ended lists the devices whose connection here ended and that last sent
// anything after since (and are not connected here now), with when.
func (b *Broker) Ended(since time.Time) map[string]time.Time {
	b.mu.RLock()
	defer b.mu.RUnlock()
	out := map[string]time.Time{}
	for id, t := range b.lastSeen {
		if t.After(since) && len(b.devices[id]) == 0 {
			out[id] = t.UTC()
		}
	}
	return out
}

// Stats returns the counters.
func (b *Broker) Stats() Stats {
	n := 0
	b.mu.RLock()
	for _, conns := range b.devices {
		for _, tc := range conns {
			if tc.live() {
				n++
			}
		}
	}
	b.mu.RUnlock()
	cs := b.ln.connStats()
	st := Stats{
		Connections:      n,
		AuthFailures:     b.stats.authFailures.Load(),
		ACLDenials:       b.stats.aclDenials.Load(),
		ReportsAccepted:  b.stats.reportsAccepted.Load(),
		UpstreamBatches:  b.stats.upstreamBatches.Load(),
		UpstreamMessages: b.stats.upstreamMessages.Load(),
		MethodResponses:  b.stats.methodResponses.Load(),
		UpstreamRefused:  b.stats.upstreamRefused.Load(),
		MethodsSent:      b.stats.methodsSent.Load(),
		ReportsDropped:   b.stats.reportsDropped.Load(),
		DesiredSent:      b.stats.desiredSent.Load(),
		DesiredFailed:    b.stats.desiredFailed.Load(),
		PanicsRecovered:  b.stats.panicsSaved.Load(),
		Refusing:         b.refusing.Load(),
		Refused:          b.stats.refused.Load(),
		NoConnect:        b.stats.noConnect.Load(),
		ProtocolErrors:   b.stats.protocolErrors.Load(),
		Busy:             b.stats.busy.Load(),
		SourceRefused:    cs.Refused,
		OpenConns:        cs.Open,
	}
	if b.quotas != nil {
		st.ReportsThrottled = b.quotas.throttled.Load()
		st.QuotaDisconnects = b.quotas.disconnects.Load()
		st.DevicesThrottled = b.quotas.throttledDevices()
	}
	return st
}

// clientLogBurst is how many lines about refused connections and protocol
// errors go out every ten seconds; the others are counted in the next one.
const clientLogBurst = 5

// logClient logs a line a client caused (a refused CONNECT, a protocol
// error) at Info, rate-limited across clients.
func (b *Broker) logClient(msg string, args ...any) {
	if n, ok := b.clientLog.Allow(); ok {
		b.log.Info(msg, append(args, "suppressed", n)...)
	}
}

// logSourceRefused logs a connection closed at accept for the cap per
// source, rate-limited.
func (b *Broker) logSourceRefused(remote net.Addr) {
	if n, ok := b.sourceLog.Allow(); ok {
		b.log.Warn("refused a connection: its address holds the most unauthenticated connections allowed per source (flag --mqtt-max-pending-per-source)",
			"remote", remote.String(), "max_per_source", b.lim.MaxPendingPerSource, "suppressed", n)
	}
}

// closeTimeout bounds waiting for connection goroutines in Close.
const closeTimeout = 5 * time.Second

// Close stops listening, disconnects every client (MQTT 5 clients are told
// "server shutting down") and waits, for at most closeTimeout, for their
// goroutines. It is idempotent.
func (b *Broker) Close() error {
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	if b.closed.Swap(true) {
		return nil
	}
	b.cancel()
	if b.quotas != nil {
		b.quotas.close()
	}
	// mochi's Close closes the listener, which disconnects every connection
	// (capping its deadline first, so a client that stopped reading cannot
	// stall it) and waits, at most closeTimeout, for their goroutines.
	_ = b.srv.Close()
	if !b.started {
		return nil
	}
	b.log.Info("mqtt broker closed")
	return nil
}

// connFor returns the device's live, authenticated connection, if any.
func (b *Broker) connFor(deviceID string) *trackedConn {
	b.mu.RLock()
	defer b.mu.RUnlock()
	var found *trackedConn
	for _, tc := range b.devices[deviceID] {
		if tc.established.Load() && !tc.revoked.Load() {
			found = tc // the newest wins during a takeover
		}
	}
	return found
}

// register records tc as a connection of deviceID, before it is authenticated,
// so that a Disconnect racing with the authentication refuses it.
func (b *Broker) register(deviceID string, tc *trackedConn) {
	b.mu.Lock()
	tc.deviceID, tc.desiredTopic = deviceID, fleet.DesiredTopic(deviceID)
	b.devices[deviceID] = append(b.devices[deviceID], tc)
	b.mu.Unlock()
}

// takeOver ends the device's older connections, and waits for their
// goroutines, before mochi sees the new one. mochi's own session takeover
// races: the old connection's goroutine, if it has not yet seen itself taken
// over, deletes the client id from mochi's client map after the new client was
// added under the same id, leaving a connected device that nothing can reach.
// With no old client left, mochi never takes over. Called once tc is
// authenticated, so a connection with a wrong key cannot drop a device.
func (b *Broker) takeOver(tc *trackedConn) {
	b.mu.RLock()
	var older []*trackedConn
	for _, c := range b.devices[tc.deviceID] {
		if c == tc {
			break
		}
		older = append(older, c)
	}
	b.mu.RUnlock()
	if len(older) == 0 {
		return
	}
	for _, c := range older {
		b.dropConn(c, packets.ErrSessionTakenOver)
	}
	// An old connection still in the Authenticator ends when that returns.
	timeout := time.After(b.lim.AuthTimeout + disconnectGrace)
	for _, c := range older {
		select {
		case <-c.done:
		case <-timeout:
			b.log.Warn("older connection of the device did not end in time; mochi takes it over", "device", tc.deviceID)
			return
		}
	}
}

// forget drops tc from the registry; called when its goroutine ends.
func (b *Broker) forget(tc *trackedConn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if tc.deviceID == "" {
		return
	}
	if n := tc.lastRead.Load(); tc.established.Load() && n > 0 {
		if b.lastSeen == nil {
			b.lastSeen = map[string]time.Time{}
		}
		if last := time.Unix(0, n); last.After(b.lastSeen[tc.deviceID]) {
			b.lastSeen[tc.deviceID] = last
		}
	}
	conns := slices.DeleteFunc(b.devices[tc.deviceID], func(c *trackedConn) bool { return c == tc })
	if len(conns) == 0 {
		delete(b.devices, tc.deviceID)
	} else {
		b.devices[tc.deviceID] = conns
	}
}

// mochiLogHandler tames mochi's logs before they reach ours. Its debug
// records print whole packets, desired documents (with registry credentials)
// included: dropped. Its warning about short keepalives is per connection
// and client-caused: dropped. (Protocol errors are logged by session.go, at
// Info and without the packet, since a device can send as many as it likes.)
type mochiLogHandler struct{ h slog.Handler }

func (m mochiLogHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo && m.h.Enabled(ctx, l)
}

func (m mochiLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == mqtt.ErrMinimumKeepalive.Error() {
		return nil
	}
	return m.h.Handle(ctx, r)
}

func (m mochiLogHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return mochiLogHandler{h: m.h.WithAttrs(a)}
}
func (m mochiLogHandler) WithGroup(n string) slog.Handler {
	return mochiLogHandler{h: m.h.WithGroup(n)}
}
