package raftstore

import (
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// StreamLayer carries raft's connections when the plain TCP listener will
// not do (the cluster package multiplexes raft with its RPCs over mutual
// TLS). Accept yields inbound raft connections; Dial opens one to a peer's
// advertised address.
type StreamLayer interface {
	net.Listener
	Dial(address string, timeout time.Duration) (net.Conn, error)
}

// Raft's connection pool and RPC timeout, the same for both transports.
const (
	transportMaxPool = 3
	transportTimeout = 10 * time.Second
)

// streamAdapter gives a StreamLayer raft's signature (raft.ServerAddress is
// a type we keep inside this package) and reports the advertised address,
// which is what raft puts in the configuration for peers to dial.
type streamAdapter struct {
	StreamLayer
	advertise net.Addr
}

var _ raft.StreamLayer = streamAdapter{}

func (a streamAdapter) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return a.StreamLayer.Dial(string(address), timeout)
}

func (a streamAdapter) Addr() net.Addr {
	if a.advertise != nil {
		return a.advertise
	}
	return a.StreamLayer.Addr()
}

// advertisedAddr is an address kept as written: a name in a TLS
// certificate must reach peers unresolved.
type advertisedAddr string

func (a advertisedAddr) Network() string { return "tcp" }
func (a advertisedAddr) String() string  { return string(a) }

func newStreamTransport(stream StreamLayer, advertise string, hlog *hcLogger) *raft.NetworkTransport {
	a := streamAdapter{StreamLayer: stream}
	if advertise != "" {
		a.advertise = advertisedAddr(advertise)
	}
	return raft.NewNetworkTransportWithLogger(a, transportMaxPool, transportTimeout, hlog)
}
