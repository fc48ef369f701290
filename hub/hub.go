package hub

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"appliance/fleet"
	"appliance/routing"
)

// Authenticator admits a module: password is the MQTT password of client
// device/module (a SAS token), valid until the time returned: the hub
// ends the connection then, as IoT Hub does (the SDKs reconnect with a
// fresh token before). workload.Service implements it.
type Authenticator interface {
	Authenticate(device, module, password string) (time.Time, error)
}

// Upstream carries $upstream batches to the controller.
type Upstream interface {
	// PublishUpstream sends one batch (fleet.EncodeUpstreamBatch) and
	// returns nil once the controller has acknowledged it; an error leaves
	// the messages queued, to be sent again.
	PublishUpstream(ctx context.Context, batch []byte) error
}

// Defaults of Limits.
const (
	DefaultMaxStoreBytes  = 1 << 30 // 1 GiB of queued messages on disk
	DefaultMaxMemoryBytes = 64 << 20
	DefaultTimeToLive     = 7200 * time.Second // edgeHub's storeAndForwardConfiguration default
	DefaultMaxInflight    = 128                // unacknowledged messages to a module
	DefaultReceiveMaximum = 256                // unacknowledged messages from a module (MQTT 5)
	DefaultMaxKeepalive   = 20 * time.Minute
	DefaultConnectTimeout = 10 * time.Second
	DefaultWriteTimeout   = 30 * time.Second
	DefaultMaxConnections = 512
	DefaultMethodTimeout  = 30 * time.Second
	// maxOutbound caps what may wait to be written to one module before it
	// is disconnected as not reading.
	maxOutbound = 8 << 20
)

// Limits bounds what the hub holds. Zero fields take the defaults.
type Limits struct {
	// MaxStoreBytes caps queued messages on disk; beyond it the oldest
	// messages of any queue are dropped (and counted).
	MaxStoreBytes int64
	// MaxMemoryBytes caps queued messages held in memory; the rest are read
	// from disk when their turn comes.
	MaxMemoryBytes int64
	// MaxInflight caps messages sent to one module and not yet acknowledged.
	MaxInflight int
	// ReceiveMaximum is announced to MQTT 5 modules: how many of their QoS
	// 1 messages may await acknowledgement.
	ReceiveMaximum uint16
	// MaxKeepalive replaces a module's keepalive of 0 or above it.
	MaxKeepalive time.Duration
	// ConnectTimeout bounds the TLS handshake and CONNECT.
	ConnectTimeout time.Duration
	// WriteTimeout bounds one write to a module.
	WriteTimeout time.Duration
	// MaxConnections caps connections, authenticated or not.
	MaxConnections int
}

func (l Limits) withDefaults() Limits {
	def := func(v *int64, d int64) {
		if *v == 0 {
			*v = d
		}
	}
	def(&l.MaxStoreBytes, DefaultMaxStoreBytes)
	def(&l.MaxMemoryBytes, DefaultMaxMemoryBytes)
	if l.MaxInflight == 0 {
		l.MaxInflight = DefaultMaxInflight
	}
	if l.ReceiveMaximum == 0 {
		l.ReceiveMaximum = DefaultReceiveMaximum
	}
	if l.MaxKeepalive == 0 {
		l.MaxKeepalive = DefaultMaxKeepalive
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = DefaultConnectTimeout
	}
	if l.WriteTimeout == 0 {
		l.WriteTimeout = DefaultWriteTimeout
	}
	if l.MaxConnections == 0 {
		l.MaxConnections = DefaultMaxConnections
	}
	return l
}

// Config configures a Hub.
type Config struct {
	// DeviceID is this device's id: modules connect as DeviceID/module.
	DeviceID string
	// Listen are the TCP addresses to serve MQTT over TLS on, e.g.
	// "127.0.0.1:8883" for process modules and the container network's
	// gateway for containers. An address that cannot be bound is tried
	// again every RetryBind while the hub runs (Status says it failed).
	Listen []string
	// TLS is the server configuration (the hub's certificate).
	TLS *tls.Config
	// Auth admits modules.
	Auth Authenticator
	// Dir holds hub.db.
	Dir string
	// Upstream carries $upstream messages; nil keeps them queued.
	Upstream Upstream
	// OnChange is called, without blocking, when something the agent
	// reports changed: a module connected or left, a module's reported
	// properties. May be nil.
	OnChange func()
	// Logger receives the hub's logs, tagged component=hub.
	Logger *slog.Logger
	Limits Limits
	// RetryBind is how often an address that could not be bound is tried
	// again. Default 5 s.
	RetryBind time.Duration
	// SweepInterval is how often expired messages are removed from queues
	// whose sink is away. Default 10 s.
	SweepInterval time.Duration
}

// Configuration is what the running deployment asks of the hub.
type Configuration struct {
	// Routes are $edgeHub's routes, compiled.
	Routes []*routing.Route
	// TimeToLive is storeAndForwardConfiguration.timeToLiveSecs: how long a
	// message is kept for a sink that does not take it, unless its route
	// says otherwise. 0: DefaultTimeToLive.
	TimeToLive time.Duration
	// Modules are the deployment's modules: the only clients admitted.
	Modules []string
	// Twins are the modules' desired properties, by module (a JSON object
	// each; a module without one has {}).
	Twins map[string]json.RawMessage
}

// config is a Configuration ready to route by.
type config struct {
	table   *routing.Table
	routes  int
	ttl     time.Duration
	modules map[string]bool
}

// Hub is the device hub. Build it with New, Start it, Configure it with
// each new deployment, Close it.
type Hub struct {
	cfg   Config
	lim   Limits
	log   *slog.Logger
	store *store
	mem   memory

	conf       atomic.Pointer[config]
	queueCache sync.Map // queueKey → *queue

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	modules  map[string]*module // by name: every module with state (connected or not)
	queues   map[string]*queue  // by bucket name
	upstream []*queue           // $upstream queues, by priority
	conns    map[*conn]struct{} // every open connection
	bindErrs map[string]string  // address → why it is not bound
	bound    map[string]string  // address → the address bound
	open     atomic.Int64       // connections, authenticated or not
	upKick   chan struct{}

	stats counters
}

type counters struct {
	received, routed, unrouted   atomic.Uint64
	delivered, expired           atomic.Uint64
	upstreamSent, upstreamBatch  atomic.Uint64
	refusedAuth, refusedACL      atomic.Uint64
	malformed, tooLarge, panics  atomic.Uint64
	methodCalls, methodTimeouts  atomic.Uint64
	twinGets, twinReportedPatch  atomic.Uint64
	desiredPatches, storeRefused atomic.Uint64
}

// New checks cfg and opens the hub's store. Nothing listens before Start.
func New(cfg Config) (*Hub, error) {
	if cfg.DeviceID == "" || cfg.TLS == nil || cfg.Auth == nil || cfg.Dir == "" {
		return nil, errors.New("hub config: DeviceID, TLS, Auth and Dir are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.RetryBind == 0 {
		cfg.RetryBind = 5 * time.Second
	}
	if cfg.SweepInterval == 0 {
		cfg.SweepInterval = 10 * time.Second
	}
	lim := cfg.Limits.withDefaults()
	h := &Hub{
		cfg:      cfg,
		lim:      lim,
		log:      cfg.Logger.With("component", "hub"),
		modules:  map[string]*module{},
		queues:   map[string]*queue{},
		conns:    map[*conn]struct{}{},
		bindErrs: map[string]string{},
		bound:    map[string]string{},
		upKick:   make(chan struct{}, 1),
	}
	h.mem.max = lim.MaxMemoryBytes
	st, infos, err := openStore(cfg.Dir, lim.MaxStoreBytes, h.log)
	if err != nil {
		return nil, err
	}
	h.store = st
	st.lookup = h.queueByName
	st.onDropped = func(q *queue, seq uint64) { q.forget(seq) }
	for name, qi := range infos {
		sink, prio, ok := parseQueueName(name)
		if !ok {
			h.log.Warn("unknown bucket in the hub store; left alone", "bucket", name)
			continue
		}
		q := h.queueFor(sink, prio)
		if qi.count > 0 {
			q.diskNext, q.last, q.visible = qi.first, qi.last, qi.last
		}
	}
	if err := h.loadState(); err != nil {
		st.close()
		return nil, err
	}
	h.conf.Store(&config{table: routing.NewTable(nil), ttl: DefaultTimeToLive, modules: map[string]bool{}})
	return h, nil
}

// Start starts the store's writer, the listeners and the upstream sender.
// The hub stops when ctx is done or Close is called.
func (h *Hub) Start(ctx context.Context) {
	h.ctx, h.cancel = context.WithCancel(ctx)
	h.store.start()
	for _, addr := range h.cfg.Listen {
		h.wg.Go(func() { h.listen(addr) })
	}
	h.wg.Go(h.sendUpstream)
	h.wg.Go(h.sweep)
	context.AfterFunc(h.ctx, func() { h.closeConns() })
}

// Close stops serving: connections are closed (what modules had sent and
// got acknowledged is on disk), the store is closed.
func (h *Hub) Close() error {
	if h.cancel != nil {
		h.cancel()
		h.closeConns()
		h.wg.Wait()
	}
	return h.store.close()
}

func (h *Hub) closeConns() {
	h.mu.Lock()
	conns := make([]*conn, 0, len(h.conns))
	for c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()
	for _, c := range conns {
		c.close(errShuttingDown)
	}
}

// Configure applies a deployment: its routes, time to live, modules and
// their twins' desired properties. Modules that left the deployment are
// disconnected and forgotten; modules whose desired properties changed get
// a patch (and a new $version).
func (h *Hub) Configure(c Configuration) {
	ttl := c.TimeToLive
	if ttl <= 0 {
		ttl = DefaultTimeToLive
	}
	mods := map[string]bool{}
	for _, m := range c.Modules {
		mods[m] = true
	}
	h.conf.Store(&config{table: routing.NewTable(c.Routes), routes: len(c.Routes), ttl: ttl, modules: mods})
	h.mu.Lock()
	var gone []*module
	for name, m := range h.modules {
		if !mods[name] {
			gone = append(gone, m)
			delete(h.modules, name)
		}
	}
	h.mu.Unlock()
	for _, m := range gone {
		m.leave()
	}
	for _, name := range c.Modules {
		desired := c.Twins[name]
		if len(desired) == 0 {
			desired = json.RawMessage("{}")
		}
		h.module(name).setDesired(desired)
	}
	h.changed()
}

// changed tells the agent something it reports changed.
func (h *Hub) changed() {
	if h.cfg.OnChange != nil {
		h.cfg.OnChange()
	}
}

// queueKey identifies a queue without formatting its name.
type queueKey struct {
	sink routing.Sink
	prio uint32
}

// queueFor returns (creating) the queue of a sink at a priority. Queues
// are never removed, so a found one is cached for every later message.
func (h *Hub) queueFor(sink routing.Sink, prio uint32) *queue {
	k := queueKey{sink, prio}
	if q, ok := h.queueCache.Load(k); ok {
		return q.(*queue)
	}
	q := h.queueForSlow(sink, prio)
	h.queueCache.Store(k, q)
	return q
}

func (h *Hub) queueForSlow(sink routing.Sink, prio uint32) *queue {
	name := queueName(sink, prio)
	h.mu.Lock()
	defer h.mu.Unlock()
	if q, ok := h.queues[name]; ok {
		return q
	}
	q := &queue{name: name, sink: sink, prio: prio, h: h}
	h.queues[name] = q
	if sink.Kind == routing.SinkUpstream {
		h.upstream = append(h.upstream, q)
		slices.SortFunc(h.upstream, func(a, b *queue) int { return cmpQueue(a, b) })
		q.kick = h.kickUpstream
	} else {
		m := h.moduleLocked(sink.Module)
		m.addQueue(q)
	}
	return q
}

func cmpQueue(a, b *queue) int {
	if a.prio != b.prio {
		if a.prio < b.prio {
			return -1
		}
		return 1
	}
	return strings.Compare(a.name, b.name)
}

func (h *Hub) queueByName(name string) *queue {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.queues[name]
}

// module returns (creating) a module's state.
func (h *Hub) module(name string) *module {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.moduleLocked(name)
}

func (h *Hub) moduleLocked(name string) *module {
	m, ok := h.modules[name]
	if !ok {
		m = newModule(h, name)
		h.modules[name] = m
		for _, q := range h.queues {
			if q.sink.Kind == routing.SinkModuleInput && q.sink.Module == name {
				m.addQueue(q)
			}
		}
	}
	return m
}

// lookupModule returns a module's state if the deployment has the module.
func (h *Hub) lookupModule(name string) (*module, bool) {
	if !h.conf.Load().modules[name] {
		return nil, false
	}
	return h.module(name), true
}

// Status is the hub's state for the agent's report.
func (h *Hub) Status() fleet.HubStatus {
	conf := h.conf.Load()
	st := fleet.HubStatus{
		Status:      "running",
		Routes:      conf.routes,
		Queued:      uint64(max(h.store.storedCount.Load(), 0)),
		QueuedBytes: uint64(max(h.store.storedBytes.Load(), 0)),
		Expired:     h.stats.expired.Load(),
		Dropped:     h.store.dropped.Load(),
	}
	h.mu.Lock()
	var failed []string
	for addr, why := range h.bindErrs {
		failed = append(failed, addr+": "+why)
	}
	mods := make([]*module, 0, len(h.modules))
	for _, m := range h.modules {
		mods = append(mods, m)
	}
	h.mu.Unlock()
	if len(failed) > 0 {
		slices.Sort(failed)
		st.Description = "not listening on " + strings.Join(failed, "; ")
		if len(failed) == len(h.cfg.Listen) {
			st.Status = "failed"
		}
	}
	for _, m := range mods {
		if c, ok := m.client(); ok {
			if st.Clients == nil {
				st.Clients = map[string]fleet.HubClient{}
			}
			st.Clients[m.name] = c
		}
	}
	return st
}

// Stats are the hub's counters since New.
type Stats struct {
	Received, Routed, Unrouted   uint64 // messages from modules; routed to at least one sink; to none
	Delivered, Expired, Dropped  uint64 // to module inputs; past their TTL; dropped at the store's cap
	UpstreamSent, UpstreamBatch  uint64 // messages and batches the controller acknowledged
	Queued, QueuedBytes          int64  // messages stored now
	RefusedAuth, RefusedACL      uint64 // connections refused; subscriptions and publishes refused
	Malformed, TooLarge, Panics  uint64 // property bags refused; messages over 256 KiB; recovered panics
	MethodCalls, MethodTimeouts  uint64
	TwinGets, TwinReported       uint64
	DesiredPatches, StoreRefused uint64
	Commits, Corrupt             uint64
}

// Stats returns the counters.
func (h *Hub) Stats() Stats {
	s := &h.stats
	return Stats{
		Received: s.received.Load(), Routed: s.routed.Load(), Unrouted: s.unrouted.Load(),
		Delivered: s.delivered.Load(), Expired: s.expired.Load(), Dropped: h.store.dropped.Load(),
		UpstreamSent: s.upstreamSent.Load(), UpstreamBatch: s.upstreamBatch.Load(),
		Queued: h.store.storedCount.Load(), QueuedBytes: h.store.storedBytes.Load(),
		RefusedAuth: s.refusedAuth.Load(), RefusedACL: s.refusedACL.Load(),
		Malformed: s.malformed.Load(), TooLarge: s.tooLarge.Load(), Panics: s.panics.Load(),
		MethodCalls: s.methodCalls.Load(), MethodTimeouts: s.methodTimeouts.Load(),
		TwinGets: s.twinGets.Load(), TwinReported: s.twinReportedPatch.Load(),
		DesiredPatches: s.desiredPatches.Load(), StoreRefused: s.storeRefused.Load(),
		Commits: h.store.commits.Load(), Corrupt: h.store.corrupt.Load(),
	}
}

// ReportedTwins returns the modules' reported properties for the agent's
// report, capped at fleet.MaxModuleTwinsReport in all: modules are taken
// in name order, and one that does not fit is listed with its $version
// and "$omitted".
func (h *Hub) ReportedTwins() map[string]json.RawMessage {
	h.mu.Lock()
	mods := make([]*module, 0, len(h.modules))
	for _, m := range h.modules {
		mods = append(mods, m)
	}
	h.mu.Unlock()
	slices.SortFunc(mods, func(a, b *module) int { return strings.Compare(a.name, b.name) })
	out := map[string]json.RawMessage{}
	budget := fleet.MaxModuleTwinsReport
	for _, m := range mods {
		doc, version := m.reportedDoc()
		if version == 0 {
			continue
		}
		if len(doc) <= budget {
			out[m.name] = doc
			budget -= len(doc)
			continue
		}
		out[m.name] = json.RawMessage(fmt.Sprintf(`{"$version":%d,"$omitted":"reported properties of %d bytes do not fit in the report"}`, version, len(doc)))
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// kickUpstream wakes the upstream sender: messages were queued, or the
// controller came back (the agent calls UpstreamAvailable).
func (h *Hub) kickUpstream() {
	select {
	case h.upKick <- struct{}{}:
	default:
	}
}

// UpstreamAvailable tells the hub the controller can take batches again
// (the agent's session came up), so that queued messages go at once
// rather than at the next retry.
func (h *Hub) UpstreamAvailable() { h.kickUpstream() }
