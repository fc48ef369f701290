package sim

import (
	"fmt"
	"time"

	"appliance/fleet"
)

// Telemetry: a simulated device sends Config.TelemetryRate upstream
// messages a second, as an agent's device hub sends what its routes put
// INTO $upstream: binary batches on fleet.UpstreamTopic, one batch in
// flight at a time, the messages that fell due meanwhile in the next one,
// a batch not acknowledged sent again (the same sequence numbers) on the
// next connection. Sequence numbers count up from the device's start time
// in microseconds.

// MaxTelemetryRate bounds Config.TelemetryRate.
const MaxTelemetryRate = 10_000

// maxTelemetryBatch caps the messages of one batch.
const maxTelemetryBatch = 500

// TelemetryModule is the module the simulated messages come from.
const TelemetryModule = "sim"

type telemetry struct {
	next     time.Time // when the next message falls due
	made     uint64    // messages made so far (the last sequence number)
	sentUpTo uint64    // sequence numbers up to this are acknowledged or in flight
	inFlight uint16    // the batch awaiting its PUBACK; 0 when none
	from, to uint64    // its sequence numbers
}

// period is the time between two messages of a device.
func (d *device) period() time.Duration {
	return time.Duration(float64(time.Second) / d.sim.cfg.TelemetryRate)
}

// telemetryDeadline is when the read loop must wake: the next message due,
// or idle.
func (d *device) telemetryDeadline(idle time.Time) time.Time {
	if d.sim.cfg.TelemetryRate <= 0 || d.tel.next.IsZero() || d.tel.next.After(idle) {
		return idle
	}
	return d.tel.next
}

// telemetryUp starts (or resumes) sending on a new connection: a batch
// that was in flight when the last one ended goes again.
func (d *device) telemetryUp(c *conn) error {
	if d.sim.cfg.TelemetryRate <= 0 {
		return nil
	}
	if d.tel.next.IsZero() {
		d.tel.next = time.Now().Add(d.period())
		// Sequence numbers go on from the time, so that a simulator
		// started again never repeats them (an agent keeps its own).
		d.tel.made = uint64(time.Now().UnixMicro())
		d.tel.sentUpTo = d.tel.made
	}
	if d.tel.inFlight != 0 {
		d.tel.inFlight = 0
		d.tel.sentUpTo = d.tel.from - 1
	}
	return d.telemetryTick(c)
}

// telemetryTick makes the messages that fell due and, with no batch in
// flight, sends the next one.
func (d *device) telemetryTick(c *conn) error {
	if d.sim.cfg.TelemetryRate <= 0 {
		return nil
	}
	now := time.Now()
	for !d.tel.next.After(now) {
		d.tel.made++
		d.sim.telemetrySent.Add(1)
		d.tel.next = d.tel.next.Add(d.period())
	}
	if d.tel.inFlight != 0 || d.tel.sentUpTo == d.tel.made {
		return nil
	}
	from, to := d.tel.sentUpTo+1, min(d.tel.made, d.tel.sentUpTo+maxTelemetryBatch)
	b := fleet.UpstreamBatch{Messages: make([]fleet.UpstreamMessage, 0, to-from+1)}
	for seq := from; seq <= to; seq++ {
		b.Messages = append(b.Messages, fleet.UpstreamMessage{
			Seq: seq, Module: TelemetryModule, Output: "telemetry", EnqueuedTime: now.Truncate(time.Millisecond),
			SystemProperties: []fleet.Property{{Name: "messageId", Value: fmt.Sprintf("%s-%d", d.id, seq)}, {Name: "contentType", Value: "application/json"}},
			Body:             fmt.Appendf(nil, `{"device":%q,"seq":%d,"temperature":%.1f}`, d.id, seq, 20+float64(seq%100)/10),
		})
	}
	d.nextID++
	if d.nextID <= subscribeID {
		d.nextID = subscribeID + 1
	}
	if err := d.write(c, publishPacket(d.nextID, fleet.UpstreamTopic(d.id), fleet.EncodeUpstreamBatch(nil, b))); err != nil {
		return err
	}
	d.tel.inFlight, d.tel.from, d.tel.to, d.tel.sentUpTo = d.nextID, from, to, to
	d.sim.batchesSent.Add(1)
	return nil
}

// telemetryAcked settles the batch in flight if id is its packet id.
func (d *device) telemetryAcked(c *conn, id uint16) bool {
	if d.tel.inFlight == 0 || id != d.tel.inFlight {
		return false
	}
	d.sim.telemetryAcked.Add(int64(d.tel.to - d.tel.from + 1))
	d.tel.inFlight = 0
	return true
}
