package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
)

// deviceHook is the only hook installed in mochi: device authentication, the
// ACL, desired state on subscribe, and report intake. Every method runs on
// the goroutine of the client concerned (OnACLCheck for delivery and
// OnPublishDropped run on the publisher's) and returns without waiting on
// anything but the node's local lookups.
type deviceHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *deviceHook) ID() string { return "appliance-device" }

func (h *deviceHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPacketRead,
		mqtt.OnSessionEstablished, mqtt.OnSubscribed, mqtt.OnPublish, mqtt.OnPublishDropped:
		return true
	}
	return false
}

// connOf returns our state for a client; nil for the broker's inline client.
func connOf(cl *mqtt.Client) *trackedConn {
	tc, _ := cl.Net.Conn.(*trackedConn)
	return tc
}

// OnConnect runs before authentication. It refuses what no credential can
// make acceptable: a client id other than the username (one session per
// device, and the id is what mochi keys subscriptions and takeovers on), and a
// will message to a topic the device may not publish to (mochi publishes wills
// without an ACL check). It also gives every connection a keepalive, hence a
// read deadline.
func (h *deviceHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	tc := connOf(cl)
	if tc == nil {
		return packets.ErrImplementationSpecificError
	}
	tc.client.Store(cl)
	deviceID := string(pk.Connect.Username)
	refuse := func(code packets.Code, why string) error {
		h.b.stats.authFailures.Add(1)
		h.b.log.Info("device refused", "device", deviceID, "clientId", pk.Connect.ClientIdentifier, "remote", cl.Net.Remote, "reason", why)
		_ = h.b.srv.SendConnack(cl, code, false, nil)
		return code
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
	if maxKA := uint16(h.b.lim.MaxKeepalive / time.Second); cl.State.Keepalive == 0 || cl.State.Keepalive > maxKA {
		cl.State.Keepalive = maxKA
		cl.State.ServerKeepalive = true
	}
	return nil
}

// OnPacketRead marks the start of processing a packet (see trackedConn.procMu).
func (h *deviceHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if tc := connOf(cl); tc != nil {
		tc.beginProcessing()
	}
	return pk, nil
}

// OnConnectAuthenticate checks username = device id and password = key with
// the node's Authenticator.
func (h *deviceHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	tc := connOf(cl)
	deviceID := string(pk.Connect.Username)
	if tc == nil || fleet.ValidateDeviceID(deviceID) != nil || !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0 {
		h.b.stats.authFailures.Add(1)
		h.b.log.Info("device refused", "device", deviceID, "remote", cl.Net.Remote, "reason", "missing or malformed credentials")
		return false
	}
	// Registered before the check, so that a Disconnect racing with it (the
	// device was just disabled) marks this connection revoked.
	h.b.register(deviceID, tc)
	ctx, cancel := context.WithTimeout(h.b.ctx, h.b.lim.AuthTimeout)
	err := h.b.auth.AuthenticateDevice(ctx, deviceID, string(pk.Connect.Password))
	cancel()
	if err == nil {
		h.b.takeOver(tc)
		if tc.revoked.Load() {
			err = errRevoked
		}
	}
	if err != nil {
		h.b.stats.authFailures.Add(1)
		h.b.log.Info("device refused", "device", deviceID, "remote", cl.Net.Remote, "reason", err.Error())
		return false
	}
	tc.since.Store(time.Now().UnixNano())
	return true
}

// errRevoked: Disconnect was called while the device was authenticating.
var errRevoked = packets.ErrAdministrativeAction

// OnSessionEstablished runs after CONNACK. The session may have inherited a
// subscription to the desired topic (an MQTT 3.1.1 clean=false reconnect
// within a second, before mochi expires the old session): then no SUBSCRIBE
// will come, so send the desired document now.
func (h *deviceHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	tc := connOf(cl)
	if tc == nil {
		return
	}
	tc.established.Store(true)
	if tc.revoked.Load() {
		h.b.dropConn(tc, packets.ErrAdministrativeAction)
		return
	}
	topic := fleet.DesiredTopic(cl.ID)
	if _, ok := cl.State.Subscriptions.Get(topic); ok {
		h.b.sendCurrentDesired(cl, topic)
	}
}

// OnACLCheck is the whole authorisation policy; see allowed. mochi calls it
// for each subscription filter, each publish, and each delivery to a
// subscriber. cl.ID is the authenticated device id: OnConnect refuses any
// other client id and OnConnectAuthenticate authenticates the username.
func (h *deviceHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if allowed(cl.ID, topic, write) {
		return true
	}
	h.b.stats.aclDenials.Add(1)
	h.b.log.Debug("acl denied", "device", cl.ID, "topic", topic, "write", write)
	return false
}

// allowed: a device may subscribe to (and be delivered) exactly its own
// desired topic, and publish exactly to its own reported topic or under its
// own messages prefix. Wildcard filters are never allowed: "+" and "#" are not
// valid device ids, so fleet.DeviceIDFromTopic refuses them in the id level,
// and the kind level must match exactly. $share and $SYS filters do not start
// with the device prefix.
func allowed(deviceID, topic string, write bool) bool {
	id, kind, ok := fleet.DeviceIDFromTopic(topic)
	if !ok || id != deviceID {
		return false
	}
	if write {
		return kind == fleet.TopicKindReported || kind == fleet.TopicKindMessages
	}
	return kind == fleet.TopicKindDesired
}

// OnSubscribed sends the device its current desired document when it has
// just been granted its desired topic. mochi may write the document before
// the SUBACK, which MQTT allows.
func (h *deviceHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if connOf(cl) == nil {
		return
	}
	topic := fleet.DesiredTopic(cl.ID)
	for i, f := range pk.Filters {
		if i < len(reasonCodes) && reasonCodes[i] < packets.ErrUnspecifiedError.Code && f.Filter == topic {
			h.b.sendCurrentDesired(cl, topic)
			return
		}
	}
}

// sendCurrentDesired asks the DesiredSource for the device's document and
// sends it. If the source fails, the device is disconnected ("server busy")
// and retries by reconnecting, rather than sitting connected without its
// desired state.
func (b *Broker) sendCurrentDesired(cl *mqtt.Client, topic string) {
	doc, err := b.desired.Desired(cl.ID)
	if err != nil {
		b.stats.desiredFailed.Add(1)
		b.log.Warn("desired document unavailable; disconnecting device so it retries", "device", cl.ID, "error", err)
		if tc := connOf(cl); tc != nil {
			go b.dropConn(tc, packets.ErrServerBusy) // not on cl's own goroutine: mochi writes SUBACK after this hook
		}
		return
	}
	_ = b.sendDesired(cl, topic, doc)
}

// OnPublish takes reported documents. It runs after the ACL allowed the
// publish, so the topic is the device's own. Accepted or not, the message is
// acknowledged and goes no further (nobody may subscribe to reported or
// telemetry topics, and nothing is retained).
func (h *deviceHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	tc := connOf(cl)
	if tc == nil { // a desired document, published through the broker's inline client
		return pk, nil
	}
	if _, kind, ok := fleet.DeviceIDFromTopic(pk.TopicName); ok && kind == fleet.TopicKindReported {
		h.b.intakeReport(tc, cl.ID, pk.Payload)
	}
	return pk, packets.CodeSuccessIgnore
}

// intakeReport checks a reported document and hands it to the sink.
func (b *Broker) intakeReport(tc *trackedConn, deviceID string, payload []byte) {
	var why string
	switch {
	case len(payload) > b.lim.MaxReportSize:
		why = "report too large"
	case !isJSONObject(payload):
		why = "report is not a JSON object"
	default:
		if err := b.reports.SubmitReport(deviceID, bytes.Clone(payload)); err != nil {
			why = "report sink refused: " + err.Error()
		}
	}
	if why == "" {
		b.stats.reportsAccepted.Add(1)
		return
	}
	b.stats.reportsDropped.Add(1)
	// At most one line per connection every reportLogInterval: a device
	// flooding bad reports must not flood the log.
	now := time.Now().UnixNano()
	if last := tc.dropLogAt.Load(); now-last < int64(reportLogInterval) || !tc.dropLogAt.CompareAndSwap(last, now) {
		tc.dropsUnlogged.Add(1)
		return
	}
	b.log.Warn("reported document dropped", "device", deviceID, "reason", why, "bytes", len(payload), "droppedUnlogged", tc.dropsUnlogged.Swap(0))
}

const reportLogInterval = 10 * time.Second

func isJSONObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{' && json.Valid(b)
}

// OnPublishDropped: a desired document did not fit the client's write queue
// (MaxQueuedMessages). mochi would only count it; disconnect the device so
// that it reconnects and is sent its current document. Stop, not a DISCONNECT
// write: the connection is backed up, and this runs on the publisher's
// goroutine.
func (h *deviceHook) OnPublishDropped(cl *mqtt.Client, _ packets.Packet) {
	h.b.stats.desiredFailed.Add(1)
	h.b.log.Warn("device write queue full; disconnecting it", "device", cl.ID)
	cl.Stop(packets.ErrPendingClientWritesExceeded)
}
