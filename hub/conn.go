package hub

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/mqttconn"
)

// maxPacketSize is the largest packet a module may send: a message of
// fleet.MaxMessageSize (body and property bag) with its topic's fixed part,
// packet id and MQTT 5 properties. Larger ones are refused from their fixed
// header, before they are read.
const maxPacketSize = fleet.MaxMessageSize + 8<<10

var (
	errShuttingDown = packets.ErrServerShuttingDown
	errNotReading   = errors.New("the module does not read what it is sent")
)

// conn is one module's MQTT connection: a reader goroutine (serve) that
// decodes packets with mochi's codec and handles them, the transport's
// writer goroutine (internal/mqttconn, shared with the controller's events
// listener) that writes what is queued in batches, and while the module
// is subscribed to its inputs a deliverer (module.deliver).
type conn struct {
	h  *Hub
	tr *mqttconn.Conn

	// Set by the CONNECT, read-only after.
	version    byte
	mod        *module
	keepalive  time.Duration
	maxOut     uint32 // the module's maximum packet size (MQTT 5), 0: none
	receiveMax int    // the module's receive maximum (MQTT 5), else 65535

	// acks are the PUBACKs to write in the order of the PUBLISHes; only
	// touched by what the transport's Queue runs, under its lock.
	acks []pendingAck
	done chan struct{} // closed once the connection is fully torn down
	wg   sync.WaitGroup

	inMu       sync.Mutex
	nextID     uint16
	inflight   map[uint16]*entry // outbound QoS 1 by packet id; nil entry: not a delivery
	deliveries int               // entries in inflight
	delivering atomic.Bool
}

// pendingAck is the PUBACK of one QoS 1 PUBLISH, written once ready and
// after every earlier one (MQTT requires PUBACKs in order).
type pendingAck struct {
	id     uint16
	ready  bool
	code   byte
	reason string
}

func (h *Hub) newConn(nc net.Conn) *conn {
	tr := mqttconn.New(nc, 16<<10, mqttconn.Limits{ConnectTimeout: h.lim.ConnectTimeout, WriteTimeout: h.lim.WriteTimeout, MaxOutbound: maxOutbound})
	return &conn{h: h, tr: tr, done: make(chan struct{}), inflight: map[uint16]*entry{}, receiveMax: 65535}
}

// serve runs the connection to its end. A panic in it (mochi's decoders,
// mochi-mqtt/server#501 among them, or the hub's own code) closes only
// this connection.
func (c *conn) serve() {
	defer c.teardown()
	defer func() {
		if r := recover(); r != nil {
			c.h.stats.panics.Add(1)
			c.h.log.Error("recovered panic in a module connection; closed only that connection",
				"module", c.moduleName(), "remote", c.tr.Remote(), "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			c.close(packets.ErrUnspecifiedError)
		}
	}()
	if err := c.tr.Handshake(); err != nil {
		c.h.log.Debug("TLS handshake failed", "remote", c.tr.Remote(), "error", err)
		c.close(nil)
		return
	}
	if !c.connect() {
		return
	}
	for {
		pk, err := c.readPacket()
		if err != nil {
			c.endWith(err)
			return
		}
		if !c.handle(pk) {
			return
		}
	}
}

func (c *conn) moduleName() string {
	if c.mod != nil {
		return c.mod.name
	}
	return ""
}

// endWith closes the connection after a read error, saying why when it is
// the module's fault.
func (c *conn) endWith(err error) {
	var code packets.Code
	switch {
	case errors.As(err, &code):
		c.h.log.Info("module protocol error; closing its connection", "module", c.moduleName(), "remote", c.tr.Remote(), "error", err)
		c.close(code)
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		c.close(nil)
	default:
		c.h.log.Debug("module connection ended", "module", c.moduleName(), "remote", c.tr.Remote(), "error", err)
		c.close(nil)
	}
}

// readPacket reads and decodes the module's next packet. Only the
// packets a client sends are taken (handle refuses the others).
func (c *conn) readPacket() (packets.Packet, error) {
	pk, err := c.tr.Next(maxPacketSize)
	if errors.Is(err, packets.ErrPacketTooLarge) {
		c.h.stats.tooLarge.Add(1)
		c.h.log.Info("module sent a packet over the limit; closing its connection", "module", c.moduleName(), "limit", maxPacketSize)
	}
	return pk, err
}

// connect reads the CONNECT and admits the module, or refuses it.
func (c *conn) connect() bool {
	pk, code, why, err := c.tr.ReadConnect(maxPacketSize, "the hub speaks 3.1.1 (4) and 5")
	switch {
	case errors.Is(err, packets.ErrProtocolViolationRequireFirstConnect):
		c.h.log.Info("module protocol error; closing its connection", "remote", c.tr.Remote(), "error", err)
		c.close(nil)
		return false
	case err != nil:
		if errors.Is(err, packets.ErrPacketTooLarge) {
			c.h.stats.tooLarge.Add(1)
		}
		c.h.log.Debug("connection ended before CONNECT", "remote", c.tr.Remote(), "error", err)
		c.close(nil)
		return false
	}
	c.version = pk.ProtocolVersion
	refuse := func(code packets.Code, why string) bool {
		c.h.stats.refusedAuth.Add(1)
		c.h.log.Info("module refused", "clientId", pk.Connect.ClientIdentifier, "remote", c.tr.Remote(), "reason", why)
		c.tr.Refuse(c.version, code)
		return false
	}
	if code != packets.CodeSuccess {
		return refuse(code, why)
	}
	device, module, ok := strings.Cut(pk.Connect.ClientIdentifier, "/")
	if !ok || device != c.h.cfg.DeviceID || module == "" || strings.ContainsAny(module, "/+#") {
		return refuse(packets.ErrClientIdentifierNotValid, fmt.Sprintf("client id %q: a module connects as %s/<module>", pk.Connect.ClientIdentifier, c.h.cfg.DeviceID))
	}
	// IoT Hub's username: {host}/{device}/{module}/?api-version=...
	user := strings.Split(string(pk.Connect.Username), "/")
	if len(user) < 3 || user[1] != device || user[2] != module {
		return refuse(packets.ErrBadUsernameOrPassword, "username is not {hub}/{device}/{module}/?api-version=...")
	}
	m, ok := c.h.lookupModule(module)
	if !ok {
		return refuse(packets.ErrNotAuthorized, fmt.Sprintf("module %q is not in the running deployment", module))
	}
	expires, err := c.h.cfg.Auth.Authenticate(device, module, string(pk.Connect.Password))
	if err != nil {
		return refuse(packets.ErrNotAuthorized, err.Error())
	}
	c.keepalive = time.Duration(pk.Connect.Keepalive) * time.Second
	serverKeepalive := false
	if c.keepalive == 0 || c.keepalive > c.h.lim.MaxKeepalive {
		c.keepalive, serverKeepalive = c.h.lim.MaxKeepalive, true
	}
	persistent := !pk.Connect.Clean
	if c.version == 5 {
		persistent = !pk.Connect.Clean && pk.Properties.SessionExpiryInterval > 0
		c.maxOut = pk.Properties.MaximumPacketSize
		if rm := pk.Properties.ReceiveMaximum; rm > 0 {
			c.receiveMax = int(rm)
		}
	}
	c.mod = m
	c.h.mu.Lock()
	c.h.conns[c] = struct{}{}
	c.h.mu.Unlock()
	resumed := m.attach(c, pk.Connect.Clean, persistent)
	c.tr.Connected(c.version, c.keepalive, func(err error) {
		c.h.log.Debug("write to module failed", "module", module, "error", err)
	}, nil)
	if !expires.IsZero() {
		// The token's end is the session's, as in IoT Hub.
		t := time.AfterFunc(time.Until(expires), func() {
			c.h.log.Info("module token expired; closing its connection", "module", module)
			c.close(packets.ErrNotAuthorized)
		})
		c.wg.Go(func() {
			<-c.tr.Closing()
			t.Stop()
		})
	}
	c.writeConnackOK(resumed, serverKeepalive)
	if resumed {
		m.startDelivery(c) // after the CONNACK: nothing may precede it
	}
	c.h.log.Info("module connected", "module", module, "remote", c.tr.Remote(), "mqtt", map[byte]string{4: "3.1.1", 5: "5"}[c.version], "sessionPresent", resumed)
	return true
}

// handle processes one packet; false ends the connection.
func (c *conn) handle(pk packets.Packet) bool {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		return c.handlePublish(pk)
	case packets.Puback:
		c.acknowledged(pk.PacketID)
	case packets.Subscribe:
		c.handleSubscribe(pk)
	case packets.Unsubscribe:
		c.handleUnsubscribe(pk)
	case packets.Pingreq:
		c.write(func(b *bytes.Buffer) error {
			p := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingresp}}
			return p.PingrespEncode(b)
		})
	case packets.Disconnect:
		c.close(nil)
		return false
	case packets.Connect:
		c.close(packets.ErrProtocolViolationSecondConnect)
		return false
	default:
		c.close(packets.ErrProtocolViolation)
		return false
	}
	return true
}

// refusePublish answers a PUBLISH the hub will not take: an MQTT 5 module
// gets a PUBACK with the reason (QoS 1; nothing for QoS 0) and stays
// connected; an MQTT 3.1.1 module, which has no way to hear why, is
// disconnected, as IoT Hub does.
func (c *conn) refusePublish(pk packets.Packet, code packets.Code, why string) bool {
	// At most one line per module every 10 s: a module whose SDK sends a
	// refused message again after every reconnect must not flood the log.
	if now, m := time.Now().UnixNano(), c.mod; now-m.refusedLogAt.Load() >= int64(10*time.Second) {
		m.refusedLogAt.Store(now)
		c.h.log.Info("module publish refused", "module", m.name, "topic", mqttconn.Truncate(pk.TopicName, 200), "reason", why, "unlogged", m.refusedUnlogged.Swap(0))
	} else {
		m.refusedUnlogged.Add(1)
	}
	if c.version < 5 {
		c.close(code)
		return false
	}
	if pk.FixedHeader.Qos == 1 {
		c.queueAck(pk.PacketID, true, code.Code, why)
	}
	return true
}

func (c *conn) handlePublish(pk packets.Packet) bool {
	switch {
	case pk.FixedHeader.Qos > 1:
		c.close(packets.ErrQosNotSupported)
		return false
	case pk.FixedHeader.Retain && c.version == 5:
		c.close(packets.ErrRetainNotSupported)
		return false
	}
	if code := pk.PublishValidate(0); code != packets.CodeSuccess {
		c.close(code)
		return false
	}
	device, module := c.h.cfg.DeviceID, c.mod.name
	msg, ok, err := parseTelemetryTopic(pk.TopicName, device, module)
	switch {
	case ok && err != nil:
		c.h.stats.malformed.Add(1)
		return c.refusePublish(pk, packets.ErrTopicNameInvalid, err.Error())
	case ok:
		bag := len(pk.TopicName) - len(moduleBase(device, module)+"/messages/events")
		if size := len(pk.Payload) + bag; size > fleet.MaxMessageSize {
			c.h.stats.tooLarge.Add(1)
			c.h.log.Info("module message over the size limit; closing its connection", "module", module, "bytes", size, "limit", fleet.MaxMessageSize)
			c.close(packets.ErrPacketTooLarge)
			return false
		}
		msg.Body = pk.Payload
		c.h.intake(c, pk, msg)
		return true
	case strings.HasPrefix(pk.TopicName, topicTwinGet):
		c.ackNow(pk)
		c.twinGet(pk)
		return true
	case strings.HasPrefix(pk.TopicName, topicTwinReported):
		c.ackNow(pk)
		c.twinReported(pk)
		return true
	case strings.HasPrefix(pk.TopicName, topicMethodResponse):
		c.ackNow(pk)
		c.methodResponse(pk)
		return true
	}
	c.h.stats.refusedACL.Add(1)
	return c.refusePublish(pk, packets.ErrNotAuthorized, "a module may publish only to its own events, twin and method topics")
}

// intake routes a module's message and queues it for each sink: the
// PUBACK (QoS 1) follows once it is on disk.
func (h *Hub) intake(c *conn, pk packets.Packet, msg *fleet.UpstreamMessage) {
	h.stats.received.Add(1)
	now := time.Now()
	msg.EnqueuedTime = now.Truncate(time.Millisecond)
	conf := h.conf.Load()
	deliveries := conf.table.Route(routingMessage(h.cfg.DeviceID, msg))
	qos1 := pk.FixedHeader.Qos == 1
	if qos1 {
		c.queueAck(pk.PacketID, false, 0, "")
	}
	if len(deliveries) == 0 {
		h.stats.unrouted.Add(1)
		if qos1 {
			c.ackReady(pk.PacketID, 0, "")
		}
		return
	}
	entries := make([]*entry, len(deliveries))
	var lastExp int64
	var lastVal []byte
	for i, d := range deliveries {
		ttl := d.Route.TimeToLive
		if ttl == 0 {
			ttl = conf.ttl
		}
		exp := now.Add(ttl).UnixNano()
		if lastVal == nil || exp != lastExp {
			lastExp, lastVal = exp, encodeEntry(exp, msg)
		}
		entries[i] = &entry{q: h.queueFor(d.Sink, d.Route.Priority), expires: exp, val: lastVal, msg: msg}
	}
	id := pk.PacketID
	h.store.append(entries, func(err error) {
		if err != nil {
			h.stats.storeRefused.Add(1)
			if qos1 {
				c.ackReady(id, packets.ErrUnspecifiedError.Code, "the device's message store refused the message: "+err.Error())
			}
			if c.version < 5 {
				c.close(nil) // 3.1.1 cannot say why; it sends again after reconnecting
			}
			return
		}
		h.stats.routed.Add(1)
		if qos1 {
			c.ackReady(id, 0, "")
		}
	})
}

// handleSubscribe grants the IoT Hub protocol's four filters, each only
// for the module's own topics, QoS 0 or 1; anything else is refused
// (0x80, or MQTT 5's 0x87 not authorized). The SUBACK follows once a
// persistent session's subscriptions are on disk.
func (c *conn) handleSubscribe(pk packets.Packet) {
	if code := pk.SubscribeValidate(); code != packets.CodeSuccess {
		c.close(code)
		return
	}
	codes := make([]byte, len(pk.Filters))
	device, module := c.h.cfg.DeviceID, c.mod.name
	var grants []func(*subscriptions)
	for i, f := range pk.Filters {
		qos := min(f.Qos, 1)
		codes[i] = qos
		switch f.Filter {
		case inputsFilter(device, module):
			grants = append(grants, func(s *subscriptions) { s.Inputs = int(qos) })
		case filterTwinResponses:
			grants = append(grants, func(s *subscriptions) { s.TwinRes = true })
		case filterTwinPatches:
			grants = append(grants, func(s *subscriptions) { s.TwinPatch = true })
		case filterMethods:
			grants = append(grants, func(s *subscriptions) { s.Methods = true })
		default:
			c.h.stats.refusedACL.Add(1)
			c.h.log.Info("module subscription refused", "module", module, "filter", mqttconn.Truncate(f.Filter, 200))
			codes[i] = 0x80
			if c.version == 5 {
				codes[i] = packets.ErrNotAuthorized.Code
			}
		}
	}
	id := pk.PacketID
	c.mod.subscribe(c, func(s *subscriptions) {
		for _, g := range grants {
			g(s)
		}
	}, func(err error) {
		if err != nil {
			for i := range codes {
				codes[i] = packets.ErrUnspecifiedError.Code
			}
		}
		c.write(func(b *bytes.Buffer) error {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}, PacketID: id, ReasonCodes: codes, ProtocolVersion: c.version}
			return ack.SubackEncode(b)
		})
		if err == nil {
			c.mod.methodsReady()
		}
	})
}

func (c *conn) handleUnsubscribe(pk packets.Packet) {
	if code := pk.UnsubscribeValidate(); code != packets.CodeSuccess {
		c.close(code)
		return
	}
	device, module := c.h.cfg.DeviceID, c.mod.name
	codes := make([]byte, len(pk.Filters))
	id := pk.PacketID
	c.mod.subscribe(c, func(s *subscriptions) {
		for i, f := range pk.Filters {
			switch f.Filter {
			case inputsFilter(device, module):
				s.Inputs = -1
			case filterTwinResponses:
				s.TwinRes = false
			case filterTwinPatches:
				s.TwinPatch = false
			case filterMethods:
				s.Methods = false
			default:
				codes[i] = packets.CodeNoSubscriptionExisted.Code
			}
		}
	}, func(error) {
		c.write(func(b *bytes.Buffer) error {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsuback}, PacketID: id, ReasonCodes: codes, ProtocolVersion: c.version}
			return ack.UnsubackEncode(b)
		})
	})
}

// ackNow acknowledges a QoS 1 PUBLISH handled at once (twin and method
// topics), in order behind earlier ones.
func (c *conn) ackNow(pk packets.Packet) {
	if pk.FixedHeader.Qos == 1 {
		c.queueAck(pk.PacketID, true, 0, "")
	}
}

// queueAck appends a PUBACK to the ordered list; ready ones at its head
// are written.
func (c *conn) queueAck(id uint16, ready bool, code byte, reason string) {
	c.write(func(b *bytes.Buffer) error {
		c.acks = append(c.acks, pendingAck{id: id, ready: ready, code: code, reason: reason})
		return c.encodeReadyAcks(b)
	})
}

// ackReady marks a PUBACK ready (its message is on disk).
func (c *conn) ackReady(id uint16, code byte, reason string) {
	c.write(func(b *bytes.Buffer) error {
		for i := range c.acks {
			if a := &c.acks[i]; a.id == id && !a.ready {
				a.ready, a.code, a.reason = true, code, reason
				break
			}
		}
		return c.encodeReadyAcks(b)
	})
}

// encodeReadyAcks writes the ready PUBACKs at the head of the list; under
// the transport's queue lock.
func (c *conn) encodeReadyAcks(b *bytes.Buffer) error {
	n := 0
	for n < len(c.acks) && c.acks[n].ready {
		a := c.acks[n]
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: a.id, ProtocolVersion: c.version, ReasonCode: a.code}
		if a.reason != "" && c.version == 5 {
			pk.Properties.ReasonString = mqttconn.Truncate(a.reason, 200)
		}
		_ = pk.PubackEncode(b)
		n++
	}
	if n > 0 {
		c.acks = append(c.acks[:0], c.acks[n:]...)
	}
	return nil
}

// writeConnackOK accepts the module, saying what the hub supports (MQTT 5).
func (c *conn) writeConnackOK(present, serverKeepalive bool) {
	c.write(func(b *bytes.Buffer) error {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, SessionPresent: present, ProtocolVersion: c.version}
		if c.version == 5 {
			p := &pk.Properties
			p.ReceiveMaximum = c.h.lim.ReceiveMaximum
			p.MaximumPacketSize = maxPacketSize
			p.MaximumQos, p.MaximumQosFlag = 1, true
			p.RetainAvailable, p.RetainAvailableFlag = 0, true
			p.SharedSubAvailable, p.SharedSubAvailableFlag = 0, true
			p.SubIDAvailable, p.SubIDAvailableFlag = 0, true
			p.TopicAliasMaximum = 0
			if serverKeepalive {
				p.ServerKeepAlive, p.ServerKeepAliveFlag = uint16(c.keepalive/time.Second), true
			}
		}
		return pk.ConnackEncode(b)
	})
}

// write queues an encoded packet for the writer; false if it was not
// queued, or the module has left more than maxOutbound unread (it is
// disconnected).
func (c *conn) write(encode func(*bytes.Buffer) error) bool {
	return c.queue(encode) == nil
}

func (c *conn) queue(encode func(*bytes.Buffer) error) error {
	_, err := c.tr.Queue(encode)
	switch {
	case errors.Is(err, mqttconn.ErrNotReading):
		c.close(errNotReading)
	case err != nil && !errors.Is(err, mqttconn.ErrClosed) && !errors.Is(err, packets.ErrPacketTooLarge):
		c.h.log.Warn("encode a packet for a module", "module", c.moduleName(), "error", err)
	}
	return err
}

// publish queues a PUBLISH to the module: QoS 1 ones get a packet id,
// tracked with e (nil for twin and method messages) until the PUBACK.
func (c *conn) publish(topic string, payload []byte, qos byte, e *entry) error {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:       topic,
		Payload:         payload,
		ProtocolVersion: c.version,
	}
	if qos > 0 {
		pk.PacketID = c.track(e)
	}
	err := c.queue(func(b *bytes.Buffer) error {
		start := b.Len()
		if err := pk.PublishEncode(b); err != nil {
			return err
		}
		if c.maxOut > 0 && uint32(b.Len()-start) > c.maxOut {
			return packets.ErrPacketTooLarge
		}
		return nil
	})
	if err != nil && qos > 0 {
		c.untrack(pk.PacketID)
	}
	return err
}

// deliver sends an input message; a QoS 0 subscription's message is done
// once written.
func (c *conn) deliver(topic string, e *entry, qos byte) error {
	if err := c.publish(topic, e.msg.Body, qos, e); err != nil {
		if errors.Is(err, packets.ErrPacketTooLarge) && c.tr.IsOpen() {
			// The module's own maximum packet size: it will never take
			// this message.
			c.h.stats.tooLarge.Add(1)
			c.h.log.Warn("message larger than the module's maximum packet size; dropped", "module", c.mod.name, "bytes", len(e.msg.Body))
			e.q.ack(e)
			return nil
		}
		return err
	}
	if qos == 0 {
		c.h.stats.delivered.Add(1)
		e.q.ack(e)
	}
	return nil
}

func (c *conn) track(e *entry) uint16 {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	id := mqttconn.NextPacketID(&c.nextID, func(id uint16) bool { _, used := c.inflight[id]; return used })
	c.inflight[id] = e
	if e != nil {
		c.deliveries++
	}
	return id
}

func (c *conn) untrack(id uint16) {
	c.inMu.Lock()
	if e, ok := c.inflight[id]; ok {
		delete(c.inflight, id)
		if e != nil {
			c.deliveries--
		}
	}
	c.inMu.Unlock()
}

// acknowledged settles a PUBACK from the module.
func (c *conn) acknowledged(id uint16) {
	c.inMu.Lock()
	e, ok := c.inflight[id]
	if ok {
		delete(c.inflight, id)
		if e != nil {
			c.deliveries--
		}
	}
	c.inMu.Unlock()
	if ok && e != nil {
		c.h.stats.delivered.Add(1)
		e.q.ack(e)
		c.mod.poke()
	}
}

func (c *conn) inflightDeliveries() int {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	return c.deliveries
}

func (c *conn) window() int { return min(c.h.lim.MaxInflight, c.receiveMax) }

// close ends the connection once: an MQTT 5 module is told why (a reason
// code of 0x80 or more) in a DISCONNECT, then the writer closes the socket.
func (c *conn) close(reason error) { c.tr.Close(reason) }

// teardown runs when the reader ends: it waits for the writer and the
// deliverer, gives back what was sent but not acknowledged, and forgets
// the connection.
func (c *conn) teardown() {
	c.close(nil)
	<-c.tr.Done() // the writer flushes what is queued (a DISCONNECT) and closes the socket
	c.wg.Wait()   // the deliverer and the token's timer
	c.inMu.Lock()
	byQueue := map[*queue][]*entry{}
	for id, e := range c.inflight {
		if e != nil {
			byQueue[e.q] = append(byQueue[e.q], e)
		}
		delete(c.inflight, id)
	}
	c.deliveries = 0
	c.inMu.Unlock()
	for q, es := range byQueue {
		sortBySeq(es)
		q.putBack(es)
	}
	if c.mod != nil {
		c.mod.detach(c)
		c.mod.poke()
		c.h.log.Info("module disconnected", "module", c.mod.name, "remote", c.tr.Remote())
	}
	c.h.mu.Lock()
	delete(c.h.conns, c)
	c.h.mu.Unlock()
	close(c.done)
}

func sortBySeq(es []*entry) {
	for i := 1; i < len(es); i++ {
		for j := i; j > 0 && es[j].seq < es[j-1].seq; j-- {
			es[j], es[j-1] = es[j-1], es[j]
		}
	}
}
