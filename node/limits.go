package node

import (
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"time"

	"appliance/cluster"
	"appliance/internal/netlimit"
	"appliance/internal/ratelog"
)

// ListenerLimits bound what clients can hold of the operator API and the
// cluster port. Zero fields take the defaults below; the device broker's
// limits (its CONNECT timeout, its cap per source, the report quotas) are
// Config.DeviceLimits. Every listener has a timeout for each phase a
// client could stall in, and a cap per source address, so that a few
// thousand idle or trickling sockets cannot lock devices or operators out
// (docs/architecture.md, "Bounded listeners").
type ListenerLimits struct {
	// HandshakeTimeout bounds a new connection's TLS handshake and then
	// its first request header (API), or its first byte and request
	// header (cluster port). Default 10 s.
	HandshakeTimeout time.Duration
	// ReadTimeout bounds reading one whole request, body included (API
	// and cluster RPCs). Default 60 s: a 4 MiB manifest at 70 KB/s.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing one API response (a backup download
	// renews it for each chunk that goes out). Default 60 s.
	WriteTimeout time.Duration
	// IdleTimeout closes an API connection kept alive with no request for
	// this long. Default 2 min.
	IdleTimeout time.Duration
	// ClusterIdleTimeout is the cluster RPCs' (cluster.Limits.IdleTimeout;
	// default 3 min). Use the same on every node.
	ClusterIdleTimeout time.Duration
	// APIMaxConnsPerSource caps the API connections of one source address
	// (default 128; negative: no cap, for a TLS-terminating proxy in front,
	// which makes every client one address).
	APIMaxConnsPerSource int
	// ClusterMaxConnsPerSource caps the cluster-port connections of one
	// source address that are not (yet) known to be nodes of the cluster;
	// a node's connections stop counting once its certificate is checked
	// (default cluster.DefaultMaxConnsPerSource, 64; negative: no cap).
	ClusterMaxConnsPerSource int
}

// Defaults of ListenerLimits.
const (
	DefaultHandshakeTimeout     = 10 * time.Second
	DefaultReadTimeout          = 60 * time.Second
	DefaultWriteTimeout         = 60 * time.Second
	DefaultIdleTimeout          = 2 * time.Minute
	DefaultAPIMaxConnsPerSource = 128
	// DefaultClusterMaxConnsPerSource is the cluster port's.
	DefaultClusterMaxConnsPerSource = cluster.DefaultMaxConnsPerSource
)

func (l ListenerLimits) withDefaults() ListenerLimits {
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if l.ReadTimeout <= 0 {
		l.ReadTimeout = DefaultReadTimeout
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = DefaultWriteTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = DefaultIdleTimeout
	}
	if l.ClusterIdleTimeout <= 0 {
		l.ClusterIdleTimeout = cluster.DefaultIdleTimeout
	}
	if l.APIMaxConnsPerSource == 0 {
		l.APIMaxConnsPerSource = DefaultAPIMaxConnsPerSource
	}
	if l.ClusterMaxConnsPerSource == 0 {
		l.ClusterMaxConnsPerSource = DefaultClusterMaxConnsPerSource
	}
	return l
}

// cluster is the cluster port's share of the limits.
func (l ListenerLimits) cluster() cluster.Limits {
	return cluster.Limits{
		MaxConnsPerSource: l.ClusterMaxConnsPerSource,
		HandshakeTimeout:  l.HandshakeTimeout,
		ReadTimeout:       l.ReadTimeout,
		IdleTimeout:       l.ClusterIdleTimeout,
	}
}

// apiListener is the API's listener: capped per source address, then TLS
// unless the API is plain.
type apiListener struct {
	capped *netlimit.Listener
	net.Listener
}

// listenAPI wraps the bound API socket with the per-source cap (its
// refusals logged at most once every ten seconds) and TLS.
func (n *Node) listenAPI(raw net.Listener, tlsConf *tls.Config) *apiListener {
	lim := n.cfg.Limits
	var refusedLog ratelog.Limiter
	logger := n.logger.With("component", "api")
	capped := netlimit.Wrap(raw, lim.APIMaxConnsPerSource, func(remote net.Addr) {
		if s, ok := refusedLog.Allow(); ok {
			logger.Warn("refused an API connection: its address holds the most connections allowed per source (flag --http-max-conns-per-source)",
				"remote", remote.String(), "max_per_source", lim.APIMaxConnsPerSource, "suppressed", s)
		}
	})
	l := &apiListener{capped: capped, Listener: capped}
	if tlsConf != nil {
		l.Listener = tls.NewListener(capped, tlsConf)
	}
	return l
}

// newAPIServer is the API's http.Server with every phase bounded. net/http
// bounds the TLS handshake by the smallest of its read-header, read and
// write timeouts: HandshakeTimeout. Its own error log (TLS handshake
// failures, one per idle socket a slowloris leaves) goes to Debug.
func (n *Node) newAPIServer(h http.Handler) *http.Server {
	lim := n.cfg.Limits
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.HandshakeTimeout,
		ReadTimeout:       lim.ReadTimeout,
		WriteTimeout:      lim.WriteTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(n.logger.With("component", "api").Handler(), slog.LevelDebug),
	}
}
