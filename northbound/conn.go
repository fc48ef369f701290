package northbound

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/mqttconn"
	"appliance/internal/netlimit"
)

var (
	errShuttingDown  = packets.ErrServerShuttingDown
	errNotAuthorized = packets.ErrNotAuthorized
	errTooLarge      = errors.New("message larger than the consumer's maximum packet size")
	errClosing       = errors.New("connection closing")
)

// conn is one consumer connection: a reader goroutine (serve) that decodes
// packets with mochi's codec and handles them, and the transport's writer
// goroutine (internal/mqttconn, shared with the device hub) that writes
// what the streams and the reader queue, with a deadline per write.
type conn struct {
	s      *Server
	tr     *mqttconn.Conn
	remote string

	// Set by the CONNECT, read-only after.
	version   byte
	consumer  string
	clientID  string
	keepalive time.Duration
	window    int    // QoS 1 messages in flight at most
	maxOut    uint32 // the consumer's maximum packet size (MQTT 5), 0: none
	sess      *session
	revoked   atomic.Bool // its consumer was deleted

	mu       sync.Mutex
	nextPID  uint16
	inflight map[uint16]inflightRef
	reserved int
	streams  []*stream

	done chan struct{} // closed once teardown is over
}

type inflightRef struct {
	st  *stream
	off uint64
}

func newConn(s *Server, nc net.Conn) *conn {
	tr := mqttconn.New(nc, 4<<10, mqttconn.Limits{ConnectTimeout: s.lim.ConnectTimeout, WriteTimeout: s.lim.WriteTimeout})
	return &conn{s: s, tr: tr, remote: tr.Remote(), inflight: map[uint16]inflightRef{}, done: make(chan struct{}), window: s.lim.MaxInflight}
}

// serve runs the connection to its end. A panic in it (mochi's decoders:
// mochi-mqtt/server#501 among them) closes only this connection.
func (c *conn) serve() {
	defer c.teardown()
	defer func() {
		if r := recover(); r != nil {
			c.s.log.Error("recovered panic in a consumer connection; closed only that connection",
				"consumer", c.consumer, "remote", c.remote, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			c.close(packets.ErrUnspecifiedError)
		}
	}()
	if err := c.tr.Handshake(); err != nil {
		c.s.log.Debug("consumer TLS handshake failed", "remote", c.remote, "error", err)
		c.close(nil)
		return
	}
	if !c.connect() {
		return
	}
	c.tr.Connected(c.version, c.keepalive, func(err error) {
		c.s.logClient("consumer connection write failed; closing it (its session keeps its place)", "consumer", c.consumer, "client", c.clientID, "remote", c.remote, "error", err)
	}, c.written)
	for {
		pk, err := c.tr.Next(maxIncomingPacket)
		if err != nil {
			var code packets.Code
			if errors.As(err, &code) {
				c.s.logClient("consumer protocol error; closing its connection", "consumer", c.consumer, "remote", c.remote, "error", err)
				c.close(code)
			} else {
				c.close(nil)
			}
			return
		}
		if !c.handle(pk) {
			return
		}
	}
}

// connect reads the CONNECT and admits the consumer, or refuses it.
func (c *conn) connect() bool {
	pk, code, why, err := c.tr.ReadConnect(maxIncomingPacket, "consumers speak 3.1.1 (4) or 5") // a consumer sends only small packets
	if err != nil {
		c.s.log.Debug("consumer connection ended before CONNECT", "remote", c.remote, "error", err)
		c.close(nil)
		return false
	}
	c.version = pk.ProtocolVersion
	refuse := func(code packets.Code, why string) bool {
		c.s.stats.authFailures.Add(1)
		c.s.logClient("consumer refused", "consumer", string(pk.Connect.Username), "client", pk.Connect.ClientIdentifier, "remote", c.remote, "reason", why)
		c.tr.Refuse(c.version, code)
		return false
	}
	if code != packets.CodeSuccess {
		return refuse(code, why)
	}
	if pk.Connect.WillFlag {
		return refuse(packets.ErrNotAuthorized, "a consumer may publish nothing, a will included")
	}
	name, key := string(pk.Connect.Username), string(pk.Connect.Password)
	if name == "" {
		return refuse(packets.ErrBadUsernameOrPassword, "no username: give the consumer's name and key")
	}
	ctx, cancel := context.WithTimeout(c.s.ctx, c.s.lim.AuthTimeout)
	err = c.s.cfg.Auth.AuthenticateConsumer(ctx, name, key)
	cancel()
	if err != nil {
		return refuse(packets.ErrBadUsernameOrPassword, err.Error())
	}
	netlimit.Release(c.tr.NetConn())
	c.consumer = name
	// MQTT 3.1.1: clean session 0 resumes a session and keeps it after
	// the connection. MQTT 5: clean start 1 discards a kept session, and
	// the session expiry interval alone says whether the new one outlives
	// the connection (clean start 0 with no expiry resumes a session that
	// then ends with this connection).
	clean := pk.Connect.Clean
	persistent := !clean
	expiry := c.s.cfg.Retention.withDefaults().MaxAge
	if c.version == 5 {
		sei := pk.Properties.SessionExpiryInterval
		persistent = sei > 0
		if persistent && sei != 0xFFFFFFFF {
			expiry = min(expiry, time.Duration(sei)*time.Second)
		}
		c.maxOut = pk.Properties.MaximumPacketSize
		if rm := pk.Properties.ReceiveMaximum; rm > 0 {
			c.window = min(c.window, int(rm))
		}
	}
	c.clientID = pk.Connect.ClientIdentifier
	assigned := ""
	if c.clientID == "" {
		if persistent {
			return refuse(packets.ErrClientIdentifierNotValid, "a persistent session needs a client id")
		}
		c.clientID = "auto-" + randomHex(8)
		assigned = c.clientID
	}
	c.keepalive = time.Duration(pk.Connect.Keepalive) * time.Second
	serverKeepalive := false
	if c.keepalive == 0 || c.keepalive > c.s.lim.MaxKeepalive {
		c.keepalive, serverKeepalive = c.s.lim.MaxKeepalive, true
	}
	if c.revoked.Load() {
		return refuse(packets.ErrNotAuthorized, "consumer deleted")
	}
	present, err := c.s.attach(c, clean, persistent, expiry)
	if err != nil {
		return refuse(packets.ErrQuotaExceeded, err.Error())
	}
	c.tr.WriteNow(func(b *bytes.Buffer) error {
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, SessionPresent: present, ProtocolVersion: c.version}
		if c.version == 5 {
			ack.Properties = packets.Properties{
				ReceiveMaximum:       uint16(min(c.s.lim.MaxInflight, 65535)),
				MaximumQos:           1,
				MaximumQosFlag:       true,
				RetainAvailable:      0,
				RetainAvailableFlag:  true,
				MaximumPacketSize:    maxIncomingPacket,
				AssignedClientID:     assigned,
				TopicAliasMaximum:    0,
				WildcardSubAvailable: 1, WildcardSubAvailableFlag: true,
				SubIDAvailable: 0, SubIDAvailableFlag: true,
				SharedSubAvailable: 1, SharedSubAvailableFlag: true,
			}
			if persistent {
				ack.Properties.SessionExpiryInterval = uint32(expiry / time.Second)
				ack.Properties.SessionExpiryIntervalFlag = pk.Properties.SessionExpiryInterval != ack.Properties.SessionExpiryInterval
			}
			if serverKeepalive {
				ack.Properties.ServerKeepAlive, ack.Properties.ServerKeepAliveFlag = uint16(c.keepalive/time.Second), true
			}
		}
		return ack.ConnackEncode(b)
	})
	c.s.log.Info("consumer connected", "consumer", name, "client", c.clientID, "remote", c.remote,
		"mqtt", map[byte]string{4: "3.1.1", 5: "5"}[c.version], "persistent", persistent, "sessionPresent", present)
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// notAuthorized is the SUBACK code of a refused filter.
func (c *conn) notAuthorized() byte {
	if c.version < 5 {
		return packets.ErrUnspecifiedError.Code // 0x80, 3.1.1's only failure
	}
	return packets.ErrNotAuthorized.Code
}

// handle processes one packet; false ends the connection.
func (c *conn) handle(pk packets.Packet) bool {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		return c.refusePublish(pk)
	case packets.Puback:
		c.acknowledged(pk.PacketID)
	case packets.Subscribe:
		if code := pk.SubscribeValidate(); code != packets.CodeSuccess {
			c.close(code)
			return false
		}
		codes := c.s.subscribe(c, pk.Filters)
		c.queue(func(b *bytes.Buffer) error {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}, PacketID: pk.PacketID, ReasonCodes: codes, ProtocolVersion: c.version}
			return ack.SubackEncode(b)
		})
	case packets.Unsubscribe:
		if code := pk.UnsubscribeValidate(); code != packets.CodeSuccess {
			c.close(code)
			return false
		}
		codes := c.s.unsubscribe(c, pk.Filters)
		c.queue(func(b *bytes.Buffer) error {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsuback}, PacketID: pk.PacketID, ReasonCodes: codes, ProtocolVersion: c.version}
			return ack.UnsubackEncode(b)
		})
	case packets.Pingreq:
		c.queue(func(b *bytes.Buffer) error {
			p := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingresp}}
			return p.PingrespEncode(b)
		})
	case packets.Disconnect:
		if c.version == 5 && c.sess != nil && pk.Properties.SessionExpiryIntervalFlag {
			c.s.setExpiry(c, time.Duration(pk.Properties.SessionExpiryInterval)*time.Second)
		}
		c.close(nil)
		return false
	default:
		c.close(packets.ErrProtocolViolation)
		return false
	}
	return true
}

// refusePublish answers a consumer's PUBLISH: consumers are read-only. An
// MQTT 5 consumer gets PUBACK "not authorized" (QoS 1) and stays; an MQTT
// 3.1.1 one, which cannot be told, is disconnected.
func (c *conn) refusePublish(pk packets.Packet) bool {
	c.s.logClient("consumer publish refused: consumers are read-only", "consumer", c.consumer, "client", c.clientID, "topic", mqttconn.Truncate(pk.TopicName, 200))
	if c.version < 5 {
		c.close(nil)
		return false
	}
	if pk.FixedHeader.Qos > 0 {
		c.queue(func(b *bytes.Buffer) error {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID, ReasonCode: packets.ErrNotAuthorized.Code, ProtocolVersion: c.version}
			return ack.PubackEncode(b)
		})
	}
	return true
}

// reserve claims room for one message (a QoS 1 window slot and space in
// the write queue); false when there is none.
func (c *conn) reserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.tr.IsOpen() || len(c.inflight)+c.reserved >= c.window || c.tr.Pending() >= maxQueuedBytes {
		return false
	}
	c.reserved++
	return true
}

func (c *conn) unreserve() {
	c.mu.Lock()
	c.reserved--
	c.mu.Unlock()
}

// publish queues one message (with the reservation taken by reserve) and
// returns its packet id (QoS 1).
func (c *conn) publish(st *stream, m Message, qos byte, dup bool) (uint16, error) {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos, Dup: dup && qos > 0},
		TopicName:       topicOf(m),
		Payload:         m.Body,
		ProtocolVersion: c.version,
		Mods:            packets.Mods{AllowResponseInfo: true},
	}
	if c.version == 5 {
		pk.Properties = messageProperties(m)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reserved--
	if qos > 0 {
		// The window keeps fewer than 65535 in flight.
		pk.PacketID = mqttconn.NextPacketID(&c.nextPID, func(id uint16) bool { _, used := c.inflight[id]; return used })
	}
	_, err := c.tr.Queue(func(b *bytes.Buffer) error {
		start := b.Len()
		if err := pk.PublishEncode(b); err != nil {
			return err
		}
		if c.maxOut > 0 && uint32(b.Len()-start) > c.maxOut {
			return errTooLarge
		}
		return nil
	})
	if errors.Is(err, mqttconn.ErrClosed) {
		return 0, errClosing
	}
	if err != nil {
		return 0, err
	}
	if qos > 0 {
		c.inflight[pk.PacketID] = inflightRef{st: st, off: m.Offset}
	}
	c.s.stats.out.Add(1)
	return pk.PacketID, nil
}

// acknowledged settles a PUBACK (one for an id not in flight is ignored,
// as MQTT lets a server do) and wakes the streams waiting for room.
func (c *conn) acknowledged(pid uint16) {
	c.mu.Lock()
	ref, ok := c.inflight[pid]
	delete(c.inflight, pid)
	streams := slices.Clone(c.streams)
	c.mu.Unlock()
	if !ok {
		return
	}
	ref.st.acked(ref.off, c)
	for _, st := range streams {
		st.poke()
	}
}

// addStream and dropStream keep the streams c is a member of, to wake
// them when c has room again.
func (c *conn) addStream(st *stream) {
	c.mu.Lock()
	if !slices.Contains(c.streams, st) {
		c.streams = append(c.streams, st)
	}
	c.mu.Unlock()
}

func (c *conn) dropStream(st *stream) {
	c.mu.Lock()
	c.streams = slices.DeleteFunc(c.streams, func(s *stream) bool { return s == st })
	c.mu.Unlock()
}

// leaveStreams takes c out of every stream it is a member of.
func (c *conn) leaveStreams() {
	c.mu.Lock()
	streams := c.streams
	c.streams = nil
	c.mu.Unlock()
	for _, st := range streams {
		st.removeMember(c)
	}
}

// queue adds a control packet to the write queue (nothing once closing).
func (c *conn) queue(enc func(*bytes.Buffer) error) { _, _ = c.tr.Queue(enc) }

// written wakes the streams once a write emptied a full queue: there is
// room again.
func (c *conn) written(n int) {
	if n < maxQueuedBytes {
		return
	}
	c.mu.Lock()
	streams := slices.Clone(c.streams)
	c.mu.Unlock()
	for _, st := range streams {
		st.poke()
	}
}

// close ends the connection (MQTT 5 consumers are told why, when code is
// a reason code). It returns at once; teardown runs on the connection's
// goroutine.
func (c *conn) close(code error) { c.tr.Close(code) }

// teardown runs when serve returns: the connection leaves its session.
func (c *conn) teardown() {
	c.close(nil)
	if c.sess != nil {
		c.s.detach(c)
		c.s.log.Info("consumer disconnected", "consumer", c.consumer, "client", c.clientID, "remote", c.remote)
	}
	close(c.done)
}

// setExpiry changes a session's expiry (MQTT 5 DISCONNECT with a session
// expiry interval); 0 ends it with the connection.
func (s *Server) setExpiry(c *conn, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.sess == nil || c.sess.conn != c {
		return
	}
	if d == 0 {
		c.sess.persistent = false
		return
	}
	c.sess.expiry = min(d, s.cfg.Retention.withDefaults().MaxAge)
}

// topicOf is a message's northbound topic.
func topicOf(m Message) string { return fleet.EventsTopic(m.DeviceID, m.Module) }

// messageProperties are a message's MQTT 5 properties: the application
// properties as user properties, in the order sent, then the device's
// and module's ids and the system properties, each named with a leading
// '$' as routing conditions name them; the content type also as MQTT's.
func messageProperties(m Message) packets.Properties {
	p := packets.Properties{User: make([]packets.UserProperty, 0, len(m.Properties)+len(m.SystemProperties)+5)}
	for _, a := range m.Properties {
		p.User = append(p.User, packets.UserProperty{Key: a.Name, Val: a.Value})
	}
	p.User = append(p.User,
		packets.UserProperty{Key: "$connectionDeviceId", Val: m.DeviceID},
		packets.UserProperty{Key: "$connectionModuleId", Val: m.Module},
	)
	if m.Output != "" {
		p.User = append(p.User, packets.UserProperty{Key: "$outputName", Val: m.Output})
	}
	p.User = append(p.User,
		packets.UserProperty{Key: "$sequenceNumber", Val: strconv.FormatUint(m.Seq, 10)},
		packets.UserProperty{Key: "$enqueuedTime", Val: m.EnqueuedTime.UTC().Format(time.RFC3339Nano)},
	)
	for _, sp := range m.SystemProperties {
		p.User = append(p.User, packets.UserProperty{Key: "$" + sp.Name, Val: sp.Value})
		if sp.Name == "contentType" {
			p.ContentType = sp.Value
		}
	}
	return p
}
