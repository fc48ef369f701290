package broker

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Desired documents are written by the broker itself, not through mochi's
// per-client queue and WriteLoop goroutine: that goroutine's stack (8 KiB
// once it has written one packet) was the largest per-connection cost. A
// document for a device goes into the device's one-slot mailbox
// (trackedConn.pending: only the latest document matters) and is written
// either by the device's own burst, when it has finished a packet, or by a
// small pool of senders shared by all connections.

// senderStall: when every sender has been stuck this long (a device that
// does not read, until its write deadline), another sender starts, so that
// no device can hold up the others' documents for long.
const senderStall = 100 * time.Millisecond

// senders is the pool: a queue of connections with a document in their
// mailbox, each queued at most once (trackedConn.queued), and the goroutines
// draining it. They exist only while there is work.
type senders struct {
	mu       sync.Mutex
	queue    []*trackedConn
	head     int
	running  int
	max      int  // senders normally allowed to run at once
	watching bool // a stall check is armed
	progress atomic.Int64
}

func newSenders() *senders {
	return &senders{max: max(4, 2*runtime.GOMAXPROCS(0))}
}

// schedule makes sure tc's mailbox is written soon. It never blocks.
func (b *Broker) schedule(tc *trackedConn) {
	if !tc.queued.CompareAndSwap(false, true) {
		return // queued already; the sender takes whatever is in the mailbox then
	}
	s := b.senders
	s.mu.Lock()
	s.queue = append(s.queue, tc)
	start := s.running < s.max || s.stalledLocked()
	if start {
		s.running++
	} else if !s.watching {
		s.watching = true
		time.AfterFunc(senderStall, func() { b.checkStall() })
	}
	s.mu.Unlock()
	if start {
		b.startSender()
	}
}

// startSender starts one more sender, counted in s.running by the caller.
func (b *Broker) startSender() {
	b.senders.progress.Store(time.Now().UnixNano())
	go b.sender()
}

func (s *senders) stalledLocked() bool {
	return time.Since(time.Unix(0, s.progress.Load())) > senderStall
}

// checkStall starts one more sender if work is waiting and none has
// finished a document for senderStall; it re-arms while work waits.
func (b *Broker) checkStall() {
	s := b.senders
	s.mu.Lock()
	s.watching = false
	waiting := s.head < len(s.queue)
	start := waiting && s.stalledLocked()
	if start {
		s.running++
	}
	if waiting {
		s.watching = true
		time.AfterFunc(senderStall, func() { b.checkStall() })
	}
	s.mu.Unlock()
	if start {
		b.startSender()
	}
}

// sender writes queued mailboxes until the queue is empty.
func (b *Broker) sender() {
	s := b.senders
	for {
		s.mu.Lock()
		if s.head == len(s.queue) {
			s.queue, s.head = s.queue[:0], 0 // the capacity stays for the next fan-out
			s.running--
			s.mu.Unlock()
			return
		}
		tc := s.queue[s.head]
		s.queue[s.head] = nil
		s.head++
		s.mu.Unlock()
		b.sendGuarded(tc)
		s.progress.Store(time.Now().UnixNano())
	}
}

// sendGuarded is sendPending with the guard every burst has: a panic (in
// mochi's encoding, say) closes only that client.
func (b *Broker) sendGuarded(tc *trackedConn) {
	defer func() {
		if r := recover(); r != nil {
			b.recovered(tc, r, debug.Stack())
		}
	}()
	b.sendPending(tc)
}

// sendPending writes tc's mailbox unless its burst is processing a packet;
// the burst then writes it when it has finished (endProcessing).
func (b *Broker) sendPending(tc *trackedConn) {
	// Unqueued before trying the lock: a document stored from now on is
	// queued again, or found by whoever holds the lock when it unlocks.
	tc.queued.Store(false)
	if !tc.procMu.TryLock() {
		return
	}
	defer b.unlockConn(tc)
	b.flushLocked(tc)
}

// unlockConn releases procMu and queues a document that arrived meanwhile.
func (b *Broker) unlockConn(tc *trackedConn) {
	tc.procMu.Unlock()
	if (tc.pending.Load() != nil || tc.methods.waiting()) && b.ready(tc) {
		b.schedule(tc)
	}
}

// flushLocked writes the document in tc's mailbox, if any and if the device
// can take one now. The caller holds tc.procMu.
func (b *Broker) flushLocked(tc *trackedConn) {
	defer b.flushMethodsLocked(tc)
	if tc.pending.Load() == nil || !b.ready(tc) {
		return // a device at its receive maximum gets it when it acknowledges
	}
	if d := tc.pending.Swap(nil); d != nil {
		if cl := tc.client.Load(); !cl.Closed() {
			_ = b.sendDesired(tc, cl, *d)
		}
	}
}

// ready tells whether a document can go to the device now: its receive
// maximum (MQTT 5) leaves room for one more unacknowledged message, or it is
// backlogged beyond Limits.MaxInflight (sendDesired then disconnects it).
// Otherwise the document waits in the mailbox for the device's next
// acknowledgement, as mochi's own queue would make it wait.
func (b *Broker) ready(tc *trackedConn) bool {
	cl := tc.client.Load()
	if cl == nil {
		return false
	}
	n := int(tc.inflight.Load())
	rm := int(cl.Properties.Props.ReceiveMaximum)
	return rm == 0 || n < rm || n >= int(b.lim.MaxInflight)
}

// backlogged disconnects a device that has Limits.MaxInflight desired
// documents unacknowledged: a device that has stopped acknowledging is better
// reconnected, which resends.
func (b *Broker) backlogged(tc *trackedConn, cl *mqtt.Client) bool {
	n := int(tc.inflight.Load())
	if n < int(b.lim.MaxInflight) {
		return false
	}
	b.stats.desiredFailed.Add(1)
	b.log.Warn("device not acknowledging desired documents; disconnecting it", "device", cl.ID, "inflight", n)
	cl.Stop(packets.ErrReceiveMaximum)
	return true
}

// sendDesired writes doc to the device's desired topic, at QoS 1 (or its
// subscription's QoS if lower), its packet id kept in tc.unacked until the
// device's PUBACK (acknowledge). The caller holds tc.procMu (a burst holds
// it while it processes a packet). The write waits for the device (up to
// the connection's deadline), so it never runs on a caller of
// PublishDesired.
func (b *Broker) sendDesired(tc *trackedConn, cl *mqtt.Client, doc []byte) error {
	if b.backlogged(tc, cl) {
		return ErrBacklogged
	}
	qos := tc.desiredQoS.Load()
	if qos == notSubscribed {
		return nil // unsubscribed: it is sent again on subscribe
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: byte(min(qos, 1))},
		TopicName:   tc.desiredTopic,
		Payload:     doc,
		Created:     time.Now().Unix(),
	}
	if pk.FixedHeader.Qos > 0 {
		pk.PacketID = tc.track()
	}
	if err := b.writePublish(cl, &pk); err != nil {
		b.stats.desiredFailed.Add(1)
		level := slog.LevelDebug // the connection failed or timed out
		if errors.Is(err, packets.ErrPacketTooLarge) {
			level = slog.LevelWarn // the device will never take it: say so
		}
		b.log.Log(context.Background(), level, "desired document not written; closing the connection", "device", cl.ID, "bytes", len(doc), "error", err)
		cl.Stop(err)
		return err
	}
	b.stats.desiredSent.Add(1)
	return nil
}

// writePublish is mochi's Client.WritePacket for the PUBLISH packets
// sendDesired builds (no expiry, no topic alias, no hook that rewrites
// packets), encoding into a pooled buffer rather than a new one grown per
// packet. It writes under the client's lock, as WritePacket does, so it
// never interleaves with mochi's own writes to the client.
func (b *Broker) writePublish(cl *mqtt.Client, pk *packets.Packet) error {
	if cl.Closed() {
		return mqtt.ErrConnectionClosed
	}
	pk.ProtocolVersion = cl.Properties.ProtocolVersion
	pk.Mods.MaxSize = cl.Properties.Props.MaximumPacketSize
	if cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0 {
		pk.Mods.DisallowProblemInfo = true
	}
	buf := encodeBufs.Get().(*bytes.Buffer)
	defer func() {
		if buf.Cap() <= maxPooledEncodeBuffer {
			buf.Reset()
			encodeBufs.Put(buf)
		}
	}()
	if err := pk.PublishEncode(buf); err != nil {
		return err
	}
	if pk.Mods.MaxSize > 0 && uint32(buf.Len()) > pk.Mods.MaxSize {
		return packets.ErrPacketTooLarge // the device's own maximum packet size
	}
	cl.Lock()
	n, err := cl.Net.Conn.Write(buf.Bytes())
	cl.Unlock()
	atomic.AddInt64(&b.srv.Info.BytesSent, int64(n))
	atomic.AddInt64(&b.srv.Info.PacketsSent, 1)
	atomic.AddInt64(&b.srv.Info.MessagesSent, 1)
	return err
}

// encodeBufs holds buffers for writePublish; larger ones are not kept.
var encodeBufs = sync.Pool{New: func() any { return new(bytes.Buffer) }}

const maxPooledEncodeBuffer = 64 << 10

// Acknowledgements of desired documents are the broker's own business, not
// mochi's: mochi keeps each unacknowledged message as a whole packet in a
// per-client map (an allocation of about 700 bytes per document, a fifth of
// the garbage of a fan-out) and looks it up under its locks on every
// acknowledgement. Nothing else in the node sends QoS 1 (retained messages
// are off and mochi's routing has no subscriber to deliver to), so the
// packet ids of desired documents are all the ids there are.

// track gives the next packet id not in use and records it unacknowledged.
// The caller holds procMu. An id is always free: a device with
// Limits.MaxInflight (at most 65,535) unacknowledged documents is
// disconnected before another is written (backlogged).
func (tc *trackedConn) track() uint16 {
	for {
		tc.lastID++
		if tc.lastID == 0 {
			tc.lastID = 1 // 0 is not a packet id
		}
		if !slices.Contains(tc.unacked, tc.lastID) {
			break
		}
	}
	tc.unacked = append(tc.unacked, tc.lastID)
	tc.inflight.Store(int32(len(tc.unacked)))
	return tc.lastID
}

// acknowledge settles the document with packet id id, if it is one the
// device has not acknowledged yet (a PUBACK for anything else is ignored,
// as MQTT lets a server do). The caller holds procMu.
func (tc *trackedConn) acknowledge(id uint16) {
	i := slices.Index(tc.unacked, id)
	if i < 0 {
		return
	}
	last := len(tc.unacked) - 1
	tc.unacked[i] = tc.unacked[last]
	tc.unacked = tc.unacked[:last]
	tc.inflight.Store(int32(last))
}
