package hub

import (
	"crypto/tls"
	"errors"
	"net"
	"time"
)

// listen serves one address until the hub stops. An address that cannot
// be bound (in use, not yet configured on an interface) is tried again
// every RetryBind, and Status says why it is not served meanwhile.
func (h *Hub) listen(addr string) {
	var ln net.Listener
	for warned := false; ; {
		var err error
		ln, err = net.Listen("tcp", addr)
		if err == nil {
			break
		}
		h.mu.Lock()
		h.bindErrs[addr] = err.Error()
		h.mu.Unlock()
		if !warned {
			h.log.Error("device hub cannot listen; modules cannot connect there until it can (retrying)", "addr", addr, "error", err)
			h.changed()
			warned = true
		}
		select {
		case <-h.ctx.Done():
			return
		case <-time.After(h.cfg.RetryBind):
		}
	}
	h.mu.Lock()
	_, hadErr := h.bindErrs[addr]
	delete(h.bindErrs, addr)
	h.bound[addr] = ln.Addr().String()
	h.mu.Unlock()
	if hadErr {
		h.changed()
	}
	h.log.Info("device hub listening", "addr", ln.Addr().String())
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-h.ctx.Done():
			ln.Close()
		case <-stop:
		}
	}()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if h.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			h.log.Warn("accept failed; retrying", "addr", addr, "error", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if h.open.Load() >= int64(h.lim.MaxConnections) {
			h.log.Warn("too many module connections; refusing one", "remote", nc.RemoteAddr().String(), "max", h.lim.MaxConnections)
			nc.Close()
			continue
		}
		h.open.Add(1)
		c := h.newConn(tls.Server(nc, h.cfg.TLS))
		h.wg.Go(func() {
			defer h.open.Add(-1)
			c.serve()
		})
	}
}

// Addrs returns the addresses the hub listens on now (with the ports
// picked for ":0").
func (h *Hub) Addrs() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, a := range h.cfg.Listen {
		if b, ok := h.bound[a]; ok {
			out = append(out, b)
		}
	}
	return out
}
