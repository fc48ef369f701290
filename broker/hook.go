package broker

import (
	"bytes"
	"encoding/json"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
)

// deviceHook is the only hook installed in mochi: the ACL, desired state on
// subscribe, and report intake, the events mochi raises while it processes a
// client's packets. Connection admission (client id, will, keepalive,
// authentication) is not a hook: session.go runs it itself. Every method
// runs on the burst of the client concerned (OnACLCheck for delivery and
// OnPublishDropped run on the publisher's goroutine) and returns without
// waiting on anything but the node's local lookups.
type deviceHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *deviceHook) ID() string { return "appliance-device" }

func (h *deviceHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnACLCheck, mqtt.OnSubscribed, mqtt.OnUnsubscribed, mqtt.OnPublish, mqtt.OnPublishDropped:
		return true
	}
	return false
}

// connOf returns our state for a client.
func connOf(cl *mqtt.Client) *trackedConn {
	tc, _ := cl.Net.Conn.(*trackedConn)
	return tc
}

// OnACLCheck is the whole authorisation policy; see allowed. mochi calls it
// for each subscription filter, each publish, and each delivery to a
// subscriber. cl.ID is the authenticated device id: admit refuses any other
// client id and authenticate authenticates the username.
func (h *deviceHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if allowed(cl.ID, topic, write) {
		return true
	}
	h.b.stats.aclDenials.Add(1)
	h.b.log.Debug("acl denied", "device", cl.ID, "topic", topic, "write", write)
	return false
}

// allowed: a device may subscribe to (and be delivered) exactly its own
// desired and methods topics, and publish exactly to its own reported topic
// or under its own messages prefix. Wildcard filters are never allowed: "+"
// and "#" are not valid device ids, so fleet.DeviceIDFromTopic refuses them
// in the id level, and the kind level must match exactly. $share and $SYS
// filters do not start with the device prefix.
func allowed(deviceID, topic string, write bool) bool {
	id, kind, ok := fleet.DeviceIDFromTopic(topic)
	if !ok || id != deviceID {
		return false
	}
	if write {
		return kind == fleet.TopicKindReported || kind == fleet.TopicKindMessages
	}
	return kind == fleet.TopicKindDesired || kind == fleet.TopicKindMethods
}

// OnSubscribed sends the device its current desired document when it has
// just been granted its desired topic. mochi may write the document before
// the SUBACK, which MQTT allows.
func (h *deviceHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if connOf(cl) == nil || !connOf(cl).established.Load() {
		return
	}
	tc := connOf(cl)
	desired := false
	for i, f := range pk.Filters {
		if i >= len(reasonCodes) || reasonCodes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		switch f.Filter {
		case tc.desiredTopic:
			tc.desiredQoS.Store(int32(reasonCodes[i])) // a success code is the granted QoS
			desired = true
		case fleet.MethodsTopic(cl.ID):
			tc.methods.setQoS(int32(reasonCodes[i]))
		}
	}
	if desired {
		h.b.sendCurrentDesired(cl)
	}
}

// OnUnsubscribed stops desired documents to a device that unsubscribed
// from its desired topic.
func (h *deviceHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	tc := connOf(cl)
	if tc == nil {
		return
	}
	for _, f := range pk.Filters {
		switch f.Filter {
		case tc.desiredTopic:
			tc.desiredQoS.Store(notSubscribed)
		case fleet.MethodsTopic(cl.ID):
			tc.methods.setQoS(notSubscribed)
		}
	}
}

// sendCurrentDesired asks the DesiredSource for the device's document and
// writes it, on the device's burst (which holds procMu), before mochi writes
// the SUBACK (MQTT allows either order). Not through the mailbox: a newer
// document PublishDesired may have left there must not be replaced by this
// one (at the device's receive maximum it goes there only if the mailbox
// is empty). If the source fails, the device is disconnected ("server busy") and
// retries by reconnecting, rather than sitting connected without its
// desired state.
func (b *Broker) sendCurrentDesired(cl *mqtt.Client) {
	tc := connOf(cl)
	if tc == nil {
		return
	}
	doc, err := b.desired.Desired(cl.ID)
	if err != nil {
		b.stats.desiredFailed.Add(1)
		b.log.Warn("desired document unavailable; disconnecting device so it retries", "device", cl.ID, "error", err)
		go b.dropConn(tc, packets.ErrServerBusy) // not on the burst: mochi writes SUBACK after this hook
		return
	}
	if doc == nil {
		return // nothing to send: the device keeps what it runs
	}
	if !b.ready(tc) {
		// An MQTT 5 device at its receive maximum (it subscribed again
		// with a document unacknowledged): the document waits for an
		// acknowledgement in the mailbox, unless PublishDesired left one
		// there, which is as new or newer (the source changes before it
		// publishes).
		tc.pending.CompareAndSwap(nil, &doc)
		return
	}
	_ = b.sendDesired(tc, cl, doc)
}

// OnPublish takes reported documents, and counts the device hub's upstream
// batches and method responses. It runs after the ACL allowed the publish,
// so the topic is the device's own. Accepted or not, the message is
// acknowledged and goes no further (nobody may subscribe to reported or
// telemetry topics, and nothing is retained).
func (h *deviceHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	tc := connOf(cl)
	if tc == nil { // not one of our connections: cannot happen; take nothing
		return pk, packets.CodeSuccessIgnore
	}
	switch _, kind, ok := fleet.DeviceIDFromTopic(pk.TopicName); {
	case ok && kind == fleet.TopicKindReported:
		h.b.intakeReport(tc, cl.ID, pk.Payload)
	case pk.TopicName == fleet.UpstreamTopic(cl.ID):
		// The device hub's messages: acknowledged once the sink holds
		// them (hub.go); a refusal is the PUBACK's reason code.
		return pk, h.b.intakeUpstream(tc, cl, pk.Payload)
	case pk.TopicName == fleet.MethodResponseTopic(cl.ID):
		h.b.intakeMethodResponse(tc, cl, pk.Payload)
	}
	return pk, packets.CodeSuccessIgnore
}

// intakeReport checks a reported document and hands it to the sink, or to
// the device's quota (quota.go) first.
func (b *Broker) intakeReport(tc *trackedConn, deviceID string, payload []byte) {
	var why string
	switch {
	case tc.revoked.Load():
		// Its key was replaced or the device disabled: nothing it sends
		// from now on is taken, even before the connection is gone.
		why = "session revoked"
	case tc.overQuota.Load():
		why = "over quota; the device is being disconnected"
	case len(payload) > b.lim.MaxReportSize:
		why = "report too large"
	case !isJSONObject(payload):
		why = "report is not a JSON object"
	case fleet.NestingDepth(payload) > fleet.MaxReportDepth:
		why = fmt.Sprintf("report nested deeper than %d", fleet.MaxReportDepth)
	}
	if why != "" {
		b.dropReport(tc, deviceID, why, len(payload))
		if b.quotas != nil && !tc.overQuota.Load() && b.quotas.refused(tc, deviceID) {
			b.cutOff(tc, deviceID, why)
		}
		return
	}
	report := bytes.Clone(payload)
	if b.quotas != nil {
		switch b.quotas.take(tc, deviceID, report) {
		case reportThrottled:
			return
		case reportOverQuota:
			b.cutOff(tc, deviceID, "reports over quota")
			return
		}
	}
	b.submitReport(tc, deviceID, report)
}

// submitReport hands a report the quotas let through to the sink.
func (b *Broker) submitReport(tc *trackedConn, deviceID string, report []byte) {
	if err := b.reports.SubmitReport(deviceID, report); err != nil {
		b.dropReport(tc, deviceID, "report sink refused: "+err.Error(), len(report))
		return
	}
	b.stats.reportsAccepted.Add(1)
}

// dropReport counts a report not taken and logs it, at most one line per
// connection every ten seconds: a device flooding bad reports must not
// flood the log.
func (b *Broker) dropReport(tc *trackedConn, deviceID, why string, size int) {
	b.stats.reportsDropped.Add(1)
	if n, ok := tc.dropLog.Allow(); ok {
		b.log.Warn("reported document dropped", "device", deviceID, "reason", why, "bytes", size, "suppressed", n)
	}
}

func isJSONObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{' && json.Valid(b)
}

// OnPublishDropped: mochi tried to queue a message to the device. Its queue
// is never used (desired documents are written by send.go, and no device may
// subscribe to anything else), so this cannot happen; if it does, the device
// is disconnected rather than left without a message, and is sent its
// current document when it reconnects. Stop, not a DISCONNECT write: this
// runs on the publisher's goroutine.
func (h *deviceHook) OnPublishDropped(cl *mqtt.Client, _ packets.Packet) {
	h.b.stats.desiredFailed.Add(1)
	h.b.log.Warn("message queued by mochi for a device; disconnecting it", "device", cl.ID)
	cl.Stop(packets.ErrPendingClientWritesExceeded)
}
