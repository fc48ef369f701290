package northbound

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"appliance/internal/netlimit"
	"appliance/internal/ratelog"
)

// Authenticator checks a consumer's MQTT credentials: the username is the
// consumer's name, the password its key. nil allows the connection; an
// unknown consumer or a wrong key must be refused. It runs on the
// connecting client's goroutine, bounded by Limits.AuthTimeout, so it
// should answer from local state.
type Authenticator interface {
	AuthenticateConsumer(ctx context.Context, name, key string) error
}

// Defaults of Limits.
const (
	DefaultMaxConnections      = 256
	DefaultMaxPendingPerSource = 64
	DefaultMaxSessions         = 1024
	DefaultMaxSubscriptions    = 32
	DefaultMaxInflight         = 64
	DefaultConnectTimeout      = 10 * time.Second
	DefaultAuthTimeout         = 5 * time.Second
	DefaultWriteTimeout        = 30 * time.Second
	DefaultMaxKeepalive        = 20 * time.Minute
	DefaultAppendTimeout       = 10 * time.Second
	maxIncomingPacket          = 64 << 10 // consumers send CONNECT, SUBSCRIBE, PUBACK...: small
	maxQueuedBytes             = 1 << 20  // written-but-not-sent bytes per connection before it counts as full
)

// Limits bound what consumers can make a node hold. Zero fields take the
// defaults.
type Limits struct {
	// MaxConnections caps the consumer connections open at once.
	MaxConnections int
	// MaxPendingPerSource caps the connections of one source address not
	// yet authenticated (negative: no cap).
	MaxPendingPerSource int
	// MaxSessions caps the sessions kept (connected or persistent).
	MaxSessions int
	// MaxSubscriptions caps one session's subscriptions.
	MaxSubscriptions int
	// MaxInflight caps the QoS 1 messages sent to one connection and not
	// yet acknowledged (or its MQTT 5 receive maximum if lower).
	MaxInflight int
	// ConnectTimeout bounds TLS and the CONNECT; AuthTimeout one
	// Authenticator call; WriteTimeout one write to a consumer (one that
	// does not read is disconnected; its session keeps its place).
	ConnectTimeout, AuthTimeout, WriteTimeout time.Duration
	// MaxKeepalive replaces a keepalive of 0 or above it.
	MaxKeepalive time.Duration
	// AppendTimeout bounds a device's wait for its batch to be on disk.
	AppendTimeout time.Duration
}

func (l Limits) withDefaults() Limits {
	set := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setD := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	set(&l.MaxConnections, DefaultMaxConnections)
	set(&l.MaxPendingPerSource, DefaultMaxPendingPerSource)
	set(&l.MaxSessions, DefaultMaxSessions)
	set(&l.MaxSubscriptions, DefaultMaxSubscriptions)
	set(&l.MaxInflight, DefaultMaxInflight)
	setD(&l.ConnectTimeout, DefaultConnectTimeout)
	setD(&l.AuthTimeout, DefaultAuthTimeout)
	setD(&l.WriteTimeout, DefaultWriteTimeout)
	setD(&l.MaxKeepalive, DefaultMaxKeepalive)
	setD(&l.AppendTimeout, DefaultAppendTimeout)
	l.MaxInflight = min(l.MaxInflight, 65535)
	return l
}

// Config configures a Server.
type Config struct {
	// Dir holds the retention log and the consumers' sessions.
	Dir string
	// Addr is the consumers' MQTT listener ("" : no listener; upstream
	// messages are still kept and tailed).
	Addr string
	// TLSConfig, when set, makes the listener speak MQTT over TLS only.
	TLSConfig *tls.Config
	// Auth checks consumer credentials. Required with Addr.
	Auth      Authenticator
	Retention LogOptions
	Limits    Limits
	// Logger receives the logs, tagged component=northbound.
	Logger *slog.Logger
	// Node names this node in what the server tells consumers.
	Node string
}

// Stats are counters since Open, and the state now.
type Stats struct {
	// Messages taken from devices (In), duplicates of messages already
	// taken (a batch sent again after a lost acknowledgement), batches
	// refused (malformed, or not stored: the device sends them again).
	In, Duplicates, BatchesIn, BatchesRefused uint64
	// Out: messages written to consumers (a message redelivered counts
	// again).
	Out uint64
	// Dropped: messages a consumer's session was to get and never will:
	// deleted for retention before its stream read them (a consumer away
	// or slower than the retention), damaged on disk, larger than the
	// consumer's maximum packet size.
	DroppedRetention, DroppedCorrupt, DroppedTooLarge uint64
	// Retained: what the retention log holds now.
	RetainedMessages uint64
	RetainedBytes    int64
	// Connections, sessions and streams now; refused connections
	// (credentials, caps) since Open.
	Connections, Sessions, Streams int
	AuthFailures, Refused          uint64
}

type counters struct {
	in, duplicates, batchesIn, batchesRefused atomic.Uint64
	out                                       atomic.Uint64
	droppedRetention, droppedTooLarge         atomic.Uint64
	authFailures, refused                     atomic.Uint64
}

// Server keeps a node's upstream messages and serves them to consumers.
type Server struct {
	cfg   Config
	lim   Limits
	log   *slog.Logger
	rlog  *Log
	state *stateStore
	ln    *netlimit.Listener

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	sessions map[sessionKey]*session
	streams  map[string]*stream
	conns    map[*conn]struct{}

	dedupe dedupe
	stats  counters
	// Rate limits of lines clients cause at will.
	clientLog, refuseLog ratelog.Limiter
}

// Open opens the retention log and the sessions in cfg.Dir; Start
// listens.
func Open(cfg Config) (*Server, error) {
	if cfg.Dir == "" {
		return nil, errors.New("northbound: a directory is required")
	}
	if cfg.Addr != "" && cfg.Auth == nil {
		return nil, errors.New("northbound: an Authenticator is required to listen")
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "northbound")
	rlog, err := OpenLog(filepath.Join(cfg.Dir, "log"), cfg.Retention, logger)
	if err != nil {
		return nil, err
	}
	st, err := openState(filepath.Join(cfg.Dir, "sessions.json"))
	if err != nil {
		rlog.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, lim: cfg.Limits.withDefaults(), log: logger, rlog: rlog, state: st,
		ctx: ctx, cancel: cancel,
		sessions: map[sessionKey]*session{}, streams: map[string]*stream{}, conns: map[*conn]struct{}{}}
	s.clientLog.Burst = 5
	if err := s.restore(); err != nil {
		cancel()
		st.close()
		rlog.Close()
		return nil, err
	}
	rlog.onTrim = s.trimmed
	s.wg.Add(1)
	go s.housekeeping()
	return s, nil
}

// Start listens for consumers (if Config.Addr is set).
func (s *Server) Start() error {
	if s.cfg.Addr == "" {
		return nil
	}
	raw, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen for consumers on %s: %w", s.cfg.Addr, err)
	}
	s.ln = netlimit.Wrap(raw, s.lim.MaxPendingPerSource, func(remote net.Addr) {
		s.stats.refused.Add(1)
		if n, ok := s.refuseLog.Allow(); ok {
			s.log.Warn("refused a consumer connection: its address holds the most unauthenticated connections allowed", "remote", remote.String(), "suppressed", n)
		}
	})
	s.wg.Add(1)
	go s.accept()
	s.log.Info("northbound listener for consumers", "addr", s.ln.Addr().String(), "tls", s.cfg.TLSConfig != nil)
	return nil
}

// Addr is the listener's address ("" when not listening).
func (s *Server) Addr() string {
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

func (s *Server) accept() {
	defer s.wg.Done()
	var backoff time.Duration
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "error", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.mu.Lock()
		full := len(s.conns) >= s.lim.MaxConnections
		s.mu.Unlock()
		if full {
			s.stats.refused.Add(1)
			if n, ok := s.refuseLog.Allow(); ok {
				s.log.Warn("refused a consumer connection: too many open", "remote", nc.RemoteAddr().String(), "max", s.lim.MaxConnections, "suppressed", n)
			}
			nc.Close()
			continue
		}
		if s.cfg.TLSConfig != nil {
			nc = tls.Server(nc, s.cfg.TLSConfig)
		}
		c := newConn(s, nc)
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// housekeeping trims the log, persists cursors and expires sessions.
func (s *Server) housekeeping() {
	defer s.wg.Done()
	persist := time.NewTicker(time.Second)
	defer persist.Stop()
	trim := time.NewTicker(10 * time.Second)
	defer trim.Stop()
	s.rlog.Trim(time.Now())
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-persist.C:
			s.persistCursors()
		case <-trim.C:
			s.rlog.Trim(time.Now())
			s.expireSessions(time.Now())
		}
	}
}

// Close disconnects every consumer, persists the sessions' places and
// closes the files.
func (s *Server) Close() error {
	if s.ctx.Err() != nil {
		return nil
	}
	s.cancel()
	if s.ln != nil {
		s.ln.Close()
	}
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(errShuttingDown)
	}
	s.wg.Wait()
	s.persistCursors()
	return errors.Join(s.rlog.Close(), s.state.close())
}

// DisconnectConsumer ends every connection of a consumer (deleted) and
// forgets its sessions.
func (s *Server) DisconnectConsumer(name string) {
	s.mu.Lock()
	var conns []*conn
	for c := range s.conns {
		if c.consumer == name {
			conns = append(conns, c)
		}
	}
	var keys []sessionKey
	for k := range s.sessions {
		if k.consumer == name {
			keys = append(keys, k)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.revoked.Store(true)
		c.close(errNotAuthorized)
		<-c.done
	}
	for _, k := range keys {
		s.endSession(k)
	}
	if len(conns)+len(keys) > 0 {
		s.log.Info("consumer deleted: its connections and sessions ended", "consumer", name, "connections", len(conns), "sessions", len(keys))
	}
}

// Stats returns the counters and the state now.
func (s *Server) Stats() Stats {
	ls := s.rlog.Stats()
	s.mu.Lock()
	st := Stats{Connections: len(s.conns), Sessions: len(s.sessions), Streams: len(s.streams)}
	s.mu.Unlock()
	st.In, st.Duplicates = s.stats.in.Load(), s.stats.duplicates.Load()
	st.BatchesIn, st.BatchesRefused = s.stats.batchesIn.Load(), s.stats.batchesRefused.Load()
	st.Out = s.stats.out.Load()
	st.DroppedRetention, st.DroppedTooLarge, st.DroppedCorrupt = s.stats.droppedRetention.Load(), s.stats.droppedTooLarge.Load(), ls.Corrupt
	st.RetainedMessages, st.RetainedBytes = ls.End-ls.First, ls.Bytes
	st.AuthFailures, st.Refused = s.stats.authFailures.Load(), s.stats.refused.Load()
	return st
}

// LogStats describes the retention log.
func (s *Server) LogStats() LogStats { return s.rlog.Stats() }
