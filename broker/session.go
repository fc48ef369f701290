package broker

import (
	"context"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/netlimit"
)

// A session is mochi's client for one connection, driven by our listener
// through mochi's exported API instead of mochi's attachClient. attachClient
// keeps a goroutine per connection in a read loop whose frames alone take
// about 6 KiB, so every idle connection held a 16 KiB stack (32 KiB when the
// node's lookups had run on it); here mochi's code runs in bursts (see
// trackedConn.burst) and an idle connection keeps only a small goroutine
// waiting for the socket to become readable. What attachClient does is done
// here in the same order, with three differences, all within our invariants:
// no session is ever inherited or kept (sessions end with the connection
// anyway: maximum session expiry 0); the admission checks are ours, called
// directly rather than as mochi hooks; and wills are never published (they
// may only target the device's own reported or messages topics, which no
// client can subscribe to and nothing retains, so mochi's publishing of
// them reached no one).

// connectSession reads the CONNECT and admits the client, or refuses it with
// a CONNACK: what mochi's attachClient does up to the read loop. It reports
// whether the session is established.
func (b *Broker) connectSession(tc *trackedConn) bool {
	cl := b.srv.NewClient(tc, listenerID, "", false)
	tc.client.Store(cl)
	// No WriteLoop: mochi's queue to the client is never used (send.go).

	fh := new(packets.FixedHeader)
	if err := cl.ReadFixedHeader(fh); err != nil {
		// Nothing, or not even a TLS handshake, within ConnectTimeout:
		// what a slowloris leaves. Counted; logged at Debug only.
		b.stats.noConnect.Add(1)
		b.log.Debug("connection ended before CONNECT", "remote", cl.Net.Remote, "error", err)
		return false
	}
	if fh.Type != packets.Connect {
		b.stats.protocolErrors.Add(1)
		b.logClient("client protocol error; closing it", "remote", cl.Net.Remote, "error", packets.ErrProtocolViolationRequireFirstConnect)
		return false
	}
	pk, err := cl.ReadPacket(fh)
	if err != nil {
		b.stats.protocolErrors.Add(1)
		b.logClient("client protocol error; closing it", "remote", cl.Net.Remote, "error", err)
		return false
	}
	cl.ParseConnect(listenerID, pk)

	caps := b.srv.Options.Capabilities
	if atomic.LoadInt64(&b.srv.Info.ClientsConnected) >= caps.MaximumClients {
		code := packets.ErrServerBusy
		if cl.Properties.ProtocolVersion < 5 {
			code = packets.ErrServerUnavailable
		}
		b.stats.busy.Add(1)
		b.logClient("device refused", "device", string(pk.Connect.Username), "remote", cl.Net.Remote, "reason", "the broker holds MaxConnections")
		_ = b.srv.SendConnack(cl, code, false, nil)
		return false
	}
	if code := validateConnect(caps, cl, pk); code != packets.CodeSuccess {
		b.stats.protocolErrors.Add(1)
		b.logClient("device refused", "device", string(pk.Connect.Username), "remote", cl.Net.Remote, "reason", code.Reason)
		_ = b.srv.SendConnack(cl, code, false, nil)
		return false
	}
	if b.refuseIfRefusing(cl) { // before the key check: a refused fleet reconnecting costs little
		return false
	}
	if !b.admit(tc, cl, pk) {
		return false
	}
	_ = tc.SetDeadline(keepaliveDeadline(cl))
	if !b.authenticate(tc, cl, pk) {
		_ = b.srv.SendConnack(cl, packets.ErrBadUsernameOrPassword, false, nil)
		return false
	}
	if b.refuseIfRefusing(cl) { // Refuse began during the key check
		return false
	}
	atomic.AddInt64(&b.srv.Info.ClientsConnected, 1)
	tc.counted = true
	// Not added to mochi's client map: only mochi's own delivery, which
	// we do not use, looks clients up there, and its event loop would copy
	// the whole map every second (to expire sessions and inflight
	// messages, neither of which we keep). Our registry (Broker.devices)
	// is the map of connected devices.
	if err := b.srv.SendConnack(cl, packets.CodeSuccess, false, nil); err != nil {
		b.log.Debug("connack not sent", "device", cl.ID, "error", err)
		return false
	}
	tc.established.Store(true)
	if tc.revoked.Load() {
		b.dropConn(tc, packets.ErrAdministrativeAction)
		return false
	}
	if !tc.drained() { // the device sent more right behind its CONNECT
		return b.serveSession(tc)
	}
	return true
}

// validateConnect is mochi's validateConnect (unexported there).
func validateConnect(caps *mqtt.Capabilities, cl *mqtt.Client, pk packets.Packet) packets.Code {
	if code := pk.ConnectValidate(); code != packets.CodeSuccess {
		return code
	}
	switch {
	case cl.Properties.ProtocolVersion < 5 && !pk.Connect.Clean && pk.Connect.ClientIdentifier == "":
		return packets.ErrUnspecifiedError
	case cl.Properties.ProtocolVersion < caps.MinimumProtocolVersion:
		return packets.ErrUnsupportedProtocolVersion
	case cl.Properties.Will.Qos > caps.MaximumQos:
		return packets.ErrQosNotSupported
	case cl.Properties.Will.Retain && caps.RetainAvailable == 0:
		return packets.ErrRetainNotSupported
	}
	return packets.CodeSuccess
}

// keepaliveDeadline is mochi's read deadline: one and a half keepalives.
func keepaliveDeadline(cl *mqtt.Client) time.Time {
	ka := time.Duration(cl.State.Keepalive) * time.Second
	return time.Now().Add(ka + ka/2)
}

// admit runs before authentication. It refuses what no credential can make
// acceptable: a client id other than the username (one session per device,
// and the id is what mochi keys subscriptions on), and a will to a topic the
// device may not publish to. It also gives every connection a keepalive,
// hence a read deadline.
func (b *Broker) admit(tc *trackedConn, cl *mqtt.Client, pk packets.Packet) bool {
	deviceID := string(pk.Connect.Username)
	refuse := func(code packets.Code, why string) bool {
		b.stats.authFailures.Add(1)
		b.logClient("device refused", "device", deviceID, "clientId", pk.Connect.ClientIdentifier, "remote", cl.Net.Remote, "reason", why)
		_ = b.srv.SendConnack(cl, code, false, nil)
		return false
	}
	if pk.Connect.ClientIdentifier != deviceID {
		return refuse(packets.ErrClientIdentifierNotValid, "client id must equal the username (device id)")
	}
	if pk.Connect.WillFlag && !allowed(deviceID, pk.Connect.WillTopic, true) {
		code := packets.ErrNotAuthorized
		if cl.Properties.ProtocolVersion < 5 {
			code = packets.ErrBadUsernameOrPassword // sent as 3.1.1's "not authorized"
		}
		return refuse(code, "will topic is not one the device may publish to")
	}
	if maxKA := uint16(b.lim.MaxKeepalive / time.Second); cl.State.Keepalive == 0 || cl.State.Keepalive > maxKA {
		cl.State.Keepalive = maxKA
		cl.State.ServerKeepalive = true
	}
	return true
}

// authenticate checks username = device id and password = key with the
// node's Authenticator, and then ends the device's older connections.
func (b *Broker) authenticate(tc *trackedConn, cl *mqtt.Client, pk packets.Packet) bool {
	deviceID := string(pk.Connect.Username)
	if fleet.ValidateDeviceID(deviceID) != nil || !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0 {
		b.stats.authFailures.Add(1)
		b.logClient("device refused", "device", deviceID, "remote", cl.Net.Remote, "reason", "missing or malformed credentials")
		return false
	}
	// Registered before the check, so that a Disconnect racing with it (the
	// device was just disabled) marks this connection revoked.
	b.register(deviceID, tc)
	ctx, cancel := context.WithTimeout(b.ctx, b.lim.AuthTimeout)
	err := b.auth.AuthenticateDevice(ctx, deviceID, string(pk.Connect.Password))
	cancel()
	if err == nil {
		b.takeOver(tc)
		// The credential is recorded under the registry's lock, where
		// DisconnectStale reads it: keys changed while this check ran
		// left a recheck, which judges the key by the state now.
		keyID := b.keyID(deviceID, string(pk.Connect.Password))
		b.mu.Lock()
		tc.keyID = keyID
		recheck := tc.recheck
		b.mu.Unlock()
		if recheck != nil && !recheck(keyID) {
			tc.revoked.Store(true)
		}
		if tc.revoked.Load() {
			err = errRevoked
		}
	}
	if err != nil {
		b.stats.authFailures.Add(1)
		b.logClient("device refused", "device", deviceID, "remote", cl.Net.Remote, "reason", err.Error())
		return false
	}
	tc.since.Store(time.Now().UnixNano())
	// A device: its connection no longer counts against its address's
	// cap on unauthenticated ones (Limits.MaxPendingPerSource).
	netlimit.Release(tc.Conn)
	return true
}

// errRevoked: Disconnect was called while the device was authenticating.
var errRevoked = packets.ErrAdministrativeAction

// serveSession reads and processes the client's packets until mochi has
// consumed all it sent (the session goes on: true) or the session ends
// (false): mochi's read loop and receivePacket, one burst at a time.
func (b *Broker) serveSession(tc *trackedConn) bool {
	cl := tc.client.Load()
	for {
		if cl.Closed() {
			return false
		}
		var fh packets.FixedHeader
		err := cl.ReadFixedHeader(&fh)
		var pk packets.Packet
		if err == nil {
			pk, err = cl.ReadPacket(&fh)
		}
		if err != nil { // end of stream, deadline, malformed or oversized packet
			b.log.Debug("client connection ended", "device", cl.ID, "remote", cl.Net.Remote, "error", err)
			cl.Stop(err)
			return false
		}
		tc.beginProcessing()
		if fh.Type == packets.Puback {
			// A desired document acknowledged: ours to settle (send.go).
			tc.acknowledge(pk.PacketID)
		} else {
			err = b.srv.InjectPacket(cl, pk)
		}
		tc.endProcessing()
		if err != nil {
			if code, ok := err.(packets.Code); ok && cl.Properties.ProtocolVersion == 5 && code.Code >= packets.ErrUnspecifiedError.Code {
				_ = b.srv.DisconnectClient(cl, code)
			}
			b.logClient("client protocol error; closing it", "device", cl.ID, "remote", cl.Net.Remote, "error", err)
			cl.Stop(err)
			return false
		}
		if cl.Closed() { // DISCONNECT, or dropped meanwhile
			return false
		}
		tc.extendDeadline(keepaliveDeadline(cl))
		if tc.drained() {
			return true
		}
	}
}

// endSession removes what mochi holds for the connection's client, once its
// connection has ended: what attachClient does after its read loop. The
// device's newer connection, if any, waits for this (takeOver) before it
// subscribes.
func (b *Broker) endSession(tc *trackedConn) {
	cl := tc.client.Load()
	if cl == nil {
		return
	}
	cl.Stop(nil)
	if tc.counted {
		atomic.AddInt64(&b.srv.Info.ClientsConnected, -1)
	}
	b.srv.UnsubscribeClient(cl)
}
