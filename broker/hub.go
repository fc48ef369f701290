package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
)

// The device hub's traffic over a device's session (fleet/topics.go):
// upstream batches and method responses from the device, method requests
// to it.

// UpstreamSink takes a device's upstream batch (fleet.UpstreamTopic's
// payload, not yet decoded). It runs on the device's burst and may block
// until the batch is stored (the device's PUBACK waits for it, so that the
// device drops the messages only once they are kept); ctx ends with the
// broker. nil means the batch is kept; ErrPayloadFormatInvalid means it
// never can be; any other error that it was not kept now (the device
// sends it again).
type UpstreamSink interface {
	SubmitUpstream(ctx context.Context, deviceID string, batch []byte) error
}

// MethodSink receives a device's answer to a direct method request
// (fleet.MethodResponseTopic's payload). It must not block.
type MethodSink interface {
	MethodResponse(deviceID string, payload []byte)
}

var (
	// ErrPayloadFormatInvalid, from an UpstreamSink: the batch is
	// malformed (PUBACK 0x99).
	ErrPayloadFormatInvalid = errors.New("payload format invalid")
	// ErrMethodsNotSubscribed: the device is connected but does not take
	// direct methods (its agent runs no device hub).
	ErrMethodsNotSubscribed = errors.New("the device does not take direct methods (not subscribed to its methods topic)")
)

// maxQueuedMethods caps the method requests waiting to be written to one
// device.
const maxQueuedMethods = 64

// intakeUpstream hands an upstream batch to the sink and returns what the
// PUBACK says. Without a sink the batch is acknowledged and counted.
func (b *Broker) intakeUpstream(tc *trackedConn, cl *mqtt.Client, payload []byte) error {
	b.stats.upstreamBatches.Add(1)
	if n, ok := fleet.UpstreamBatchCount(payload); ok {
		b.stats.upstreamMessages.Add(uint64(n))
	}
	if b.upstream == nil {
		return packets.CodeSuccessIgnore
	}
	refuse := func(code packets.Code) error {
		b.stats.upstreamRefused.Add(1)
		if cl.Properties.ProtocolVersion < 5 {
			// MQTT 3.1.1 has no refusing PUBACK (mochi would send a
			// success): no acknowledgement at all, and the device sends
			// the batch again.
			return packets.ErrRejectPacket
		}
		return code
	}
	if tc.revoked.Load() {
		// Its key was replaced or the device disabled: nothing it sends
		// is kept; it does not get a success either.
		return refuse(packets.ErrNotAuthorized)
	}
	err := b.upstream.SubmitUpstream(b.ctx, cl.ID, payload)
	switch {
	case err == nil:
		return packets.CodeSuccessIgnore
	case errors.Is(err, ErrPayloadFormatInvalid):
		return refuse(packets.ErrPayloadFormatInvalid)
	default:
		if n, ok := tc.dropLog.Allow(); ok {
			b.log.Warn("upstream batch not stored; the device sends it again", "device", cl.ID, "error", err, "suppressed", n)
		}
		return refuse(packets.ErrUnspecifiedError)
	}
}

// intakeMethodResponse hands a method response to the sink.
func (b *Broker) intakeMethodResponse(tc *trackedConn, cl *mqtt.Client, payload []byte) {
	b.stats.methodResponses.Add(1)
	if b.methods != nil && !tc.revoked.Load() {
		b.methods.MethodResponse(cl.ID, append([]byte(nil), payload...))
	}
}

// methodQueue holds the method requests waiting to be written to a device.
type methodQueue struct {
	mu  sync.Mutex
	q   [][]byte
	qos int32 // QoS granted on the methods topic, or notSubscribed
}

// PublishMethod sends a direct method request (a JSON fleet.MethodRequest)
// to the device's methods topic if the device is connected here and
// subscribed to it. It never blocks: the request is queued and written by
// a sender or the device's own burst, in order. ErrNotConnected: not
// connected to this node; ErrMethodsNotSubscribed: connected, but its
// agent takes no methods; ErrBacklogged: the device has maxQueuedMethods
// requests waiting already.
func (b *Broker) PublishMethod(deviceID string, payload []byte) error {
	if b.closed.Load() {
		return ErrClosed
	}
	tc := b.connFor(deviceID)
	if tc == nil {
		return ErrNotConnected
	}
	if cl := tc.client.Load(); cl == nil || cl.Closed() {
		return ErrNotConnected
	}
	mq := &tc.methods
	mq.mu.Lock()
	switch {
	case mq.qos == notSubscribed:
		mq.mu.Unlock()
		return ErrMethodsNotSubscribed
	case len(mq.q) >= maxQueuedMethods:
		mq.mu.Unlock()
		return fmt.Errorf("%w: %d method requests waiting", ErrBacklogged, len(mq.q))
	}
	mq.q = append(mq.q, payload)
	mq.mu.Unlock()
	if b.ready(tc) {
		b.schedule(tc)
	}
	return nil
}

// MethodsSubscribed tells whether the device is connected here and takes
// direct methods.
func (b *Broker) MethodsSubscribed(deviceID string) bool {
	tc := b.connFor(deviceID)
	if tc == nil {
		return false
	}
	tc.methods.mu.Lock()
	defer tc.methods.mu.Unlock()
	return tc.methods.qos != notSubscribed
}

func (mq *methodQueue) waiting() bool {
	mq.mu.Lock()
	defer mq.mu.Unlock()
	return len(mq.q) > 0
}

func (mq *methodQueue) setQoS(q int32) {
	mq.mu.Lock()
	mq.qos = q
	if q == notSubscribed {
		mq.q = nil // unsubscribed: nobody would answer them
	}
	mq.mu.Unlock()
}

// flushMethodsLocked writes the queued method requests while the device
// can take them. The caller holds tc.procMu.
func (b *Broker) flushMethodsLocked(tc *trackedConn) {
	for b.ready(tc) {
		mq := &tc.methods
		mq.mu.Lock()
		if len(mq.q) == 0 {
			mq.mu.Unlock()
			return
		}
		payload, qos := mq.q[0], mq.qos
		mq.q = mq.q[1:]
		mq.mu.Unlock()
		cl := tc.client.Load()
		if cl == nil || cl.Closed() || qos == notSubscribed {
			return
		}
		if b.backlogged(tc, cl) {
			return
		}
		pk := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: byte(min(qos, 1))},
			TopicName:   fleet.MethodsTopic(cl.ID),
			Payload:     payload,
			Created:     time.Now().Unix(),
		}
		if pk.FixedHeader.Qos > 0 {
			pk.PacketID = tc.track()
		}
		if err := b.writePublish(cl, &pk); err != nil {
			b.log.Log(context.Background(), slog.LevelDebug, "method request not written; closing the connection", "device", cl.ID, "error", err)
			cl.Stop(err)
			return
		}
		b.stats.methodsSent.Add(1)
	}
}
