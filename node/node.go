package node

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"appliance/api"
	"appliance/assign"
	"appliance/broker"
	"appliance/cluster"
	"appliance/deploylimits"
	"appliance/deviceauth"
	"appliance/deviceimport"
	"appliance/directmethod"
	"appliance/eventtail"
	"appliance/history"
	"appliance/internal/fsutil"
	"appliance/northbound"
	"appliance/pki"
	"appliance/raftstore"
	"appliance/reportbatch"
	"appliance/ui"
)

// Config configures a controller node. Zero values mean defaults.
type Config struct {
	// DataDir holds the raft log, the state machine, snapshots and the admin
	// token. Required.
	DataDir string
	// NodeID names the node in the cluster; defaults to the host name.
	NodeID string
	// HTTPAddr is the operator API listener (default 127.0.0.1:7480; port 0
	// picks a free port).
	HTTPAddr string
	// RaftAddr is the raft listener (default 127.0.0.1:7481).
	RaftAddr string
	// RaftAdvertise is the raft address peers dial, when it differs.
	RaftAdvertise string
	// MQTTAddr is the device broker's listener (default :1883, every
	// interface: devices are on the plant network; they must authenticate).
	MQTTAddr string
	// MQTTTLSCert and MQTTTLSKey, when both set, make the broker present
	// this certificate instead of the node's own (issued by the cluster
	// CA).
	MQTTTLSCert, MQTTTLSKey string
	// PlainHTTP and PlainMQTT serve the API or the broker without TLS.
	// By default both speak TLS with the node's certificate from the
	// cluster CA; plain listeners exist only when asked for (a lab, a
	// load test, a TLS-terminating proxy in front).
	PlainHTTP, PlainMQTT bool
	// ReportFlushInterval is how often reported documents are committed to
	// raft as one batch (default 100 ms).
	ReportFlushInterval time.Duration
	// HistoryRetention drops history events older than this (default 30
	// days); HistoryPerKey keeps at most this many events per deployment
	// or device (default 1000).
	HistoryRetention time.Duration
	HistoryPerKey    int
	// Version is reported by /healthz.
	Version string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// RaftHeartbeatTimeout, RaftElectionTimeout and RaftLeaderLeaseTimeout
	// tune raft; zero means the raftstore defaults (tuned for a LAN).
	RaftHeartbeatTimeout   time.Duration
	RaftElectionTimeout    time.Duration
	RaftLeaderLeaseTimeout time.Duration
	// Join is the cluster port of a node of the cluster to join
	// (https://host:port); empty starts (or resumes) a cluster. JoinToken is
	// that cluster's join token.
	Join, JoinToken string
	// TLSHosts are extra names or addresses the node's certificate is valid
	// for (what devices and operators dial, besides the listen addresses).
	TLSHosts []string
	// ShedDevicesAfter is how long the node may be without a cluster
	// leader before it turns its devices away so that they move to a node
	// that has one (watchLeader). Zero means DefaultShedDevicesAfter;
	// negative never sheds.
	ShedDevicesAfter time.Duration
	// Limits bound the API's and the cluster port's connections (timeouts,
	// caps per source address); zero fields are defaults.
	Limits ListenerLimits
	// OfflineAfter is how long a device may be out of contact before it
	// counts as offline (DefaultOfflineAfter when zero).
	OfflineAfter time.Duration
	// DeploymentLimits bound manifests and how many deployments and
	// layers reach one device (zero fields are defaults).
	DeploymentLimits deploylimits.Limits
	// DeviceLimits bound what devices can make the broker hold and commit:
	// the CONNECT timeout, the cap on unauthenticated connections per
	// source address, report sizes and the per-device report quotas
	// (broker.Limits; zero fields are defaults).
	DeviceLimits broker.Limits
	// Events configures the northbound side of the device hub: the
	// retention of the devices' upstream messages and the consumers'
	// listener (hub.go).
	Events EventsConfig
}

// Defaults of the history's retention (flags --history-retention and
// --history-per-key).
const (
	DefaultHistoryRetention = history.DefaultRetention
	DefaultHistoryPerKey    = history.DefaultPerKey
)

// Default listener addresses.
const (
	DefaultHTTPAddr = "127.0.0.1:7480"
	DefaultRaftAddr = "127.0.0.1:7481"
	DefaultMQTTAddr = ":1883"
)

// Files a node keeps in its data directory besides raft's own.
const (
	// TokenFile holds the admin bearer token (mode 0600).
	TokenFile = "admin-token"
	// AddrFile holds the URL the API listens on, so that the CLI on the
	// same machine finds a node started with a random port.
	AddrFile = "http-url"
	// MQTTAddrFile holds the broker's URL, for local agents and scripts.
	MQTTAddrFile = "mqtt-url"
)

// Node is a running controller.
type Node struct {
	cfg    Config
	logger *slog.Logger

	store   *raftstore.Store
	assign  *assign.Assigner       // who runs what, fed by observer
	imports *deviceimport.Importer // bulk import and export of devices
	limits  *deploylimits.Checker  // the deployment limits' checks of writes
	token   atomic.Pointer[string] // the admin token (adoptAdminToken replaces it)
	apiSrv  atomic.Pointer[api.Server]

	// Cluster: credentials, the cluster port and calls to peers.
	bundle    *pki.Bundle
	joinToken atomic.Pointer[string] // the cluster's join token (adoptJoinToken replaces it)
	mux       *cluster.Mux
	peers     *cluster.Client
	rpc       *cluster.Server
	peerConns peerConnections
	memberIDs memberCache // for the checks of peers' certificates (nodecerts.go)
	vouches   vouchCache

	broker  *broker.Broker
	metrics *metrics
	// northbound keeps the devices' upstream messages and serves them to
	// consumers; methods relays the direct method calls (methods.go);
	// tail streams the cluster's upstream messages (events.go).
	northbound *northbound.Server
	methods    *directmethod.Relay
	tail       *eventtail.Tailer
	auth       *deviceauth.Authenticator // admits devices to the broker
	history    *history.History
	reports    *reportbatch.Batcher
	bgCancel   context.CancelFunc
	// stopCtx ends when the node stops: work that outlives Start (a
	// restarted member's join) watches it.
	stopCtx    context.Context
	stopCancel context.CancelFunc
	bgDone     sync.WaitGroup

	httpLn  net.Listener
	apiLn   *apiListener // httpLn capped per source (and TLS)
	httpSrv *http.Server

	// Readiness (readiness.go): stopped holds why the node stopped serving
	// (damaged state); replayed latches once the log is replayed;
	// admitting says the broker admits devices, changed under admitMu.
	stopped   atomic.Pointer[error]
	replayed  atomic.Bool
	admitting atomic.Bool
	admitMu   sync.Mutex

	stopOnce sync.Once
	// failed is closed when the node must stop (Failed); failErr says why.
	failed  chan struct{}
	failErr atomic.Pointer[error]
}

// New checks the configuration and fills in defaults. Nothing is opened
// until Start.
func New(cfg Config) (*Node, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("node: a data directory is required")
	}
	if cfg.NodeID == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "node1"
		}
		cfg.NodeID = h
	}
	if cfg.HTTPAddr == "" {
		cfg.HTTPAddr = DefaultHTTPAddr
	}
	if cfg.RaftAddr == "" {
		cfg.RaftAddr = DefaultRaftAddr
	}
	if cfg.MQTTAddr == "" {
		cfg.MQTTAddr = DefaultMQTTAddr
	}
	if (cfg.MQTTTLSCert == "") != (cfg.MQTTTLSKey == "") {
		return nil, errors.New("node: give both --mqtt-tls-cert and --mqtt-tls-key, or neither")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	if cfg.ShedDevicesAfter == 0 {
		cfg.ShedDevicesAfter = DefaultShedDevicesAfter
	}
	if cfg.OfflineAfter <= 0 {
		cfg.OfflineAfter = DefaultOfflineAfter
	}
	cfg.DeploymentLimits = cfg.DeploymentLimits.WithDefaults()
	cfg.Limits = cfg.Limits.withDefaults()
	n := &Node{cfg: cfg, logger: cfg.Logger.With("node", cfg.NodeID), failed: make(chan struct{})}
	n.assign = assign.New(assign.Config{
		View:      func(fn func(r *raftstore.Reader) error) error { return n.store.View(fn) },
		Publisher: (*publisher)(n),
		Stopped:   n.stoppedErr,
		Logger:    n.logger.With("component", "assign"),
	})
	n.limits = &deploylimits.Checker{
		Limits:      cfg.DeploymentLimits,
		Assignments: func() deploylimits.Assignments { return n.assign.Loose() },
		View:        func(fn func(r *raftstore.Reader) error) error { return n.store.View(fn) },
	}
	n.imports = deviceimport.New(deviceimport.Config{
		Store:     (*importStore)(n),
		TagLimits: n.limits.TagCheck,
		Actor:     operatorActor,
		Logger:    n.logger.With("component", "deviceimport"),
	})
	n.stopCtx, n.stopCancel = context.WithCancel(context.Background())
	n.methods = n.newRelay()
	n.auth = n.newDeviceAuth()
	n.tail = n.newTailer()
	n.reports = n.newReportBatcher()
	n.metrics = newMetrics(n)
	return n, nil
}

// Start opens the store (bootstrapping a new single-node cluster when the
// data directory is empty), loads or creates the admin token and starts
// serving the API. It returns once the API listens.
func (n *Node) Start(ctx context.Context) error {
	if err := os.MkdirAll(n.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir %s: %w", n.cfg.DataDir, err)
	}
	resumed := raftstore.HasLog(filepath.Join(n.cfg.DataDir, "raft"))
	// Credentials first: a joiner gets the cluster's admin token with them.
	bundle, joinToken, err := n.credentials(ctx)
	if err != nil {
		return err
	}
	n.bundle = bundle
	n.joinToken.Store(&joinToken)
	token, created, err := loadOrCreateToken(filepath.Join(n.cfg.DataDir, TokenFile))
	if err != nil {
		return err
	}
	n.token.Store(&token)
	if created {
		n.logger.Info("generated the admin token", "path", filepath.Join(n.cfg.DataDir, TokenFile))
	}

	// The broker exists before the store opens, so the store's observer
	// can always reach it; it listens only once the state is loaded.
	var tlsConf *tls.Config
	switch {
	case n.cfg.MQTTTLSCert != "":
		cert, err := tls.LoadX509KeyPair(n.cfg.MQTTTLSCert, n.cfg.MQTTTLSKey)
		if err != nil {
			return fmt.Errorf("flags --mqtt-tls-cert/--mqtt-tls-key: %w", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	case !n.cfg.PlainMQTT:
		tlsConf = n.publicTLS()
	}
	hist, err := history.Open(filepath.Join(n.cfg.DataDir, "history.db"), raftstore.MachineWentDown(filepath.Join(n.cfg.DataDir, "raft")),
		n.cfg.HistoryRetention, n.cfg.HistoryPerKey, n.logger.With("component", "history"))
	if err != nil {
		return err
	}
	n.history = hist
	if err := n.openNorthbound(tlsConf); err != nil {
		n.history.Close()
		return err
	}

	b, err := broker.New(broker.Config{
		Addr: n.cfg.MQTTAddr, TLSConfig: tlsConf,
		Auth: n.auth, Desired: (*devices)(n), Reports: n.reports,
		Upstream: (*upstreamSink)(n), Methods: n.methods,
		Logger: n.cfg.Logger, Limits: n.cfg.DeviceLimits,
	})
	if err != nil {
		n.northbound.Close()
		n.history.Close()
		return err
	}
	n.broker = b
	// No device until the node is ready (watchLeader admits them).
	b.Refuse()

	mux, err := cluster.ListenWith(n.cfg.RaftAddr, n.cfg.RaftAdvertise, bundle, n.cfg.Limits.cluster(), n.cfg.Logger)
	if err != nil {
		n.northbound.Close()
		n.history.Close()
		return err
	}
	n.mux = mux
	n.peers = cluster.NewClient(mux)

	store, err := raftstore.Open(ctx, raftstore.Config{
		Dir:                filepath.Join(n.cfg.DataDir, "raft"),
		NodeID:             n.cfg.NodeID,
		Stream:             mux.RaftLayer(),
		AdvertiseAddr:      mux.Advertise(),
		Bootstrap:          n.cfg.Join == "",
		Observer:           (*observer)(n),
		Logger:             n.cfg.Logger,
		HeartbeatTimeout:   n.cfg.RaftHeartbeatTimeout,
		ElectionTimeout:    n.cfg.RaftElectionTimeout,
		LeaderLeaseTimeout: n.cfg.RaftLeaderLeaseTimeout,
		Forward:            n.forward,
		Version:            n.cfg.Version,
		PeerInfo:           n.peerInfo,
	})
	if err != nil {
		n.mux.Close()
		n.northbound.Close()
		n.history.Close()
		return err
	}
	n.store = store
	// From here the replicated state judges every peer's certificate.
	n.mux.SetAuthorizer((*peerAuthorizer)(n))
	go n.bindSelf(n.stopCtx)
	go n.watchHalt()
	n.rpc = cluster.NewServer((*clusterStore)(n), n.clusterSecrets, n.cfg.Logger)
	n.rpc.HandleNode("GET "+connectionsPath, n.serveConnections)
	n.rpc.HandleNode("GET "+nodeCertPath+"{id}", n.serveNodeCert)
	n.rpc.HandleNode("POST "+directmethod.CallPath, n.methods.ServeCall)
	n.rpc.HandleNode("POST "+directmethod.EventPath, n.methods.ServeEvent)
	n.rpc.HandleNode("GET "+eventtail.Path, n.tail.ServePeer)
	go func() {
		if err := n.rpc.Serve(n.mux); err != nil {
			n.logger.Error("cluster RPC server stopped", "err", err)
		}
	}()
	if n.cfg.Join != "" {
		if resumed {
			// A restarted member resumes from its log; asking again is
			// harmless and repairs a join that was cut short.
			go func() {
				if err := n.addSelf(n.stopCtx); err != nil && n.stopCtx.Err() == nil {
					n.logger.Error("join", "err", err)
				}
			}()
		} else if err := n.addSelf(ctx); err != nil {
			n.stopBackground()
			return err
		}
	}

	if err := n.broker.Start(context.WithoutCancel(ctx)); err != nil {
		n.stopBackground()
		return fmt.Errorf("start the device broker on %s (flag --mqtt-addr): %w", n.cfg.MQTTAddr, err)
	}
	n.startNorthbound()
	bgCtx, cancel := context.WithCancel(context.Background())
	n.bgCancel = cancel
	n.bgDone.Add(3)
	go func() {
		defer n.bgDone.Done()
		n.reports.Run(bgCtx)
	}()
	go func() {
		defer n.bgDone.Done()
		n.watchLeader(bgCtx)
	}()
	go func() {
		defer n.bgDone.Done()
		n.history.Run(bgCtx)
	}()
	n.bgDone.Add(1)
	go func() {
		defer n.bgDone.Done()
		n.leadRollouts(bgCtx)
	}()

	srv, err := api.NewServer(api.ServerConfig{Backend: (*backend)(n), Token: n.Token(), Logger: n.cfg.Logger.With("component", "api"),
		ObserveRequest: n.metrics.observeRequest})
	if err != nil {
		n.stopBackground()
		return err
	}
	n.apiSrv.Store(srv)
	srv.SetToken(n.Token()) // a rotation applied since NewServer
	srv.HandleWithToken("GET /metrics", promhttp.HandlerFor(n.metrics.registry, promhttp.HandlerOpts{}))
	// The dashboard's files hold no secrets; every API call it makes
	// carries the token the operator logs in with.
	srv.Handle(ui.Prefix, ui.Handler())
	ln, err := net.Listen("tcp", n.cfg.HTTPAddr)
	if err != nil {
		n.stopBackground()
		return fmt.Errorf("listen for the API on %s (flag --http-addr): %w", n.cfg.HTTPAddr, err)
	}
	n.httpLn = ln
	var apiTLS *tls.Config
	if !n.cfg.PlainHTTP {
		apiTLS = n.publicTLS()
	}
	n.apiLn = n.listenAPI(ln, apiTLS)
	n.httpSrv = n.newAPIServer(srv)
	go func() {
		if err := n.httpSrv.Serve(n.apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.logger.Error("API server stopped", "err", err)
		}
	}()
	if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, MQTTAddrFile), []byte(n.MQTTURL()+"\n"), 0o600); err != nil {
		n.logger.Warn("cannot record the broker address", "err", err)
	}
	// Written last: its presence tells a script the node is serving.
	if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, AddrFile), []byte(n.URL()+"\n"), 0o600); err != nil {
		n.logger.Warn("cannot record the API address", "err", err)
	}
	n.logger.Info("node started", "api", n.URL(), "raft", n.store.RaftAddr(), "mqtt", n.broker.Addr(), "data_dir", n.cfg.DataDir,
		"admin_token_file", filepath.Join(n.cfg.DataDir, TokenFile), "version", n.cfg.Version)
	return nil
}

// Run starts the node and serves until ctx ends or the node fails (Failed),
// then shuts down. A failure is returned.
func (n *Node) Run(ctx context.Context) error {
	if err := n.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return n.Stop()
	case <-n.failed:
		return errors.Join(n.Err(), n.Stop())
	}
}

// Failed is closed when the node can no longer serve and must stop: its
// replica met a raft entry this build cannot apply (written by a newer
// release), so it must be upgraded. Err says why. The caller stops the
// node (Stop) and exits non-zero.
func (n *Node) Failed() <-chan struct{} { return n.failed }

// Err is why the node failed, nil while it has not.
func (n *Node) Err() error {
	if e := n.failErr.Load(); e != nil {
		return *e
	}
	return nil
}

// watchHalt turns the store's halt into the node's failure.
func (n *Node) watchHalt() {
	select {
	case <-n.store.Halted():
		err := fmt.Errorf("node %s stopped: %w", n.cfg.NodeID, n.store.HaltError())
		n.failErr.Store(&err)
		close(n.failed)
	case <-n.stopCtx.Done():
	}
}

// URL is the base URL of the operator API.
func (n *Node) URL() string {
	if n.cfg.PlainHTTP {
		return "http://" + n.httpLn.Addr().String()
	}
	return "https://" + n.httpLn.Addr().String()
}

// MQTTURL is the broker's URL: mqtts:// unless the broker is plain.
func (n *Node) MQTTURL() string {
	if n.cfg.PlainMQTT && n.cfg.MQTTTLSCert == "" {
		return "mqtt://" + n.broker.Addr()
	}
	return "mqtts://" + n.broker.Addr()
}

// CACertPEM is the cluster CA's certificate: what clients of the API and
// devices verify this node with (it is public).
func (n *Node) CACertPEM() []byte { return n.bundle.CA.CertPEM() }

// publicTLS is the API's and the broker's TLS: the node's certificate
// from the cluster CA, presented with the CA so clients can pin it; no
// client certificate asked (operators hold a token, devices a key).
func (n *Node) publicTLS() *tls.Config {
	srv := n.bundle.ServerTLS()
	return &tls.Config{Certificates: srv.Certificates, MinVersion: tls.VersionTLS12}
}

// ID is the node's id in the cluster.
func (n *Node) ID() string { return n.cfg.NodeID }

// Token is the admin token.
func (n *Node) Token() string { return *n.token.Load() }

// adoptAdminToken makes token the node's admin token: a rotation applied
// from the log (or found in the state at start).
func (n *Node) adoptAdminToken(token string) {
	if n.adoptToken(&n.token, TokenFile, "admin token", token) {
		if srv := n.apiSrv.Load(); srv != nil {
			srv.SetToken(token)
		}
	}
}

// JoinToken is the cluster's join token.
func (n *Node) JoinToken() string { return *n.joinToken.Load() }

// adoptJoinToken makes token the cluster's join token on this node, the
// same way; the join check reads it for every request.
func (n *Node) adoptJoinToken(token string) {
	n.adoptToken(&n.joinToken, JoinTokenFile, "join token", token)
}

// adoptToken replaces a cluster-wide token held in cur and in the data
// directory's file, the file first, so that the CLI on this machine
// follows. It reports whether the token changed.
func (n *Node) adoptToken(cur *atomic.Pointer[string], file, what, token string) bool {
	if old := cur.Load(); old != nil && *old == token {
		return false
	}
	path := filepath.Join(n.cfg.DataDir, file)
	if err := fsutil.WriteFileAtomic(path, []byte(token+"\n"), 0o600); err != nil {
		n.logger.Error("cannot write the rotated "+what+"; the node takes it anyway", "path", path, "err", err)
	}
	cur.Store(&token)
	n.logger.Info(what+" replaced through the cluster; the previous one no longer works", "path", path)
	return true
}

// newAdminToken is a random token: 32 bytes, base64url.
func newAdminToken() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate admin token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// MQTTAddr is the bound broker address.
func (n *Node) MQTTAddr() string { return n.broker.Addr() }

// RaftAddr is the bound raft address.
func (n *Node) RaftAddr() string { return n.store.RaftAddr() }

// Stop shuts down in order: stop taking requests, finish those under way,
// then stop raft and close the files. It is idempotent.
func (n *Node) Stop() error {
	var errs []error
	n.stopOnce.Do(func() {
		if n.httpSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := n.httpSrv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("shutdown API: %w", err))
			}
			cancel()
		}
		if err := n.stopBackground(); err != nil {
			errs = append(errs, err)
		}
		n.logger.Info("node stopped")
	})
	return errors.Join(errs...)
}

// stopBackground closes the broker (devices reconnect elsewhere), flushes
// the reports already taken, then closes raft and the files.
func (n *Node) stopBackground() error {
	var errs []error
	n.stopCancel()
	if n.broker != nil {
		if err := n.broker.Close(); err != nil && !errors.Is(err, broker.ErrClosed) {
			errs = append(errs, fmt.Errorf("close broker: %w", err))
		}
	}
	if n.northbound != nil {
		// After the broker: no device is still sending.
		if err := n.northbound.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close the northbound server: %w", err))
		}
	}
	if n.bgCancel != nil {
		n.bgCancel()
	}
	n.bgDone.Wait()
	if n.store != nil && n.store.IsLeader() {
		// Hand leadership over rather than make the others wait out an
		// election timeout.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := n.store.LeadershipTransfer(ctx); err == nil {
			n.logger.Info("handed leadership to another node")
		}
		cancel()
	}
	if n.rpc != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = n.rpc.Shutdown(ctx)
		cancel()
	}
	if n.peers != nil {
		n.peers.Close()
	}
	if n.store != nil {
		if err := n.store.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if n.mux != nil {
		if err := n.mux.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("close cluster listener: %w", err))
		}
	}
	if n.history != nil {
		// Events of entries applied while raft shut down, then close.
		n.history.FlushWithin(history.StopBudget)
		if err := n.history.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close history: %w", err))
		}
	}
	return errors.Join(errs...)
}

// loadOrCreateToken reads the admin token, creating a random one with mode
// 0600 the first time.
func loadOrCreateToken(path string) (token string, created bool, err error) {
	data, err := os.ReadFile(path)
	if err == nil {
		t := strings.TrimSpace(string(data))
		if t == "" {
			return "", false, fmt.Errorf("admin token file %s is empty; delete it to generate a new token", path)
		}
		return t, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", false, fmt.Errorf("read admin token %s: %w", path, err)
	}
	t, err := newAdminToken()
	if err != nil {
		return "", false, err
	}
	if err := fsutil.WriteFileAtomic(path, []byte(t+"\n"), 0o600); err != nil {
		return "", false, fmt.Errorf("write admin token %s: %w", path, err)
	}
	return t, true, nil
}
