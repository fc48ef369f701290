package broker

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// reportQuotas keeps each device's report budget: two token buckets, one
// of reports and one of bytes (Limits.ReportRate, ReportBurst,
// ReportBytesRate, ReportBytesBurst). Every report the sink takes spends
// from both, so what one device adds to the replicated log is bounded by
// its bursts plus its rates, whatever it sends.
//
// A report over budget is throttled, not lost: it is kept (the latest
// one; it supersedes earlier ones, as the node's batcher would anyway) and
// handed to the sink as soon as the budget allows, so a device that bursts
// once ends with its last state committed. A device that keeps sending over
// budget (Limits.ReportOverruns reports over quota in one session, each
// sooner after the one before than the budget takes to refill from empty)
// is disconnected.
//
// Budgets are per device id, not per connection, so that reconnecting does
// not refill them; a device's entry is dropped once its budget is full
// again and nothing is kept for it, so the map holds only devices that
// reported in the last few seconds.
type reportQuotas struct {
	b   *Broker
	lim Limits
	// calm is how long a device's budget takes to refill from empty: an
	// overrun that long after the last one starts a new count.
	calm time.Duration

	mu      sync.Mutex
	devices map[string]*deviceBudget
	sweepAt time.Time

	throttled   atomic.Uint64 // reports that went over budget
	disconnects atomic.Uint64 // devices disconnected for going on
}

type deviceBudget struct {
	reports, bytes float64
	at             time.Time // when reports and bytes were last refilled

	// overruns counts the reports over quota (or refused as too large or
	// malformed) of session, each within calm of the one before.
	overruns    int
	session     *trackedConn
	lastOverrun time.Time

	// deferred is the latest throttled report, from conn; a timer hands it
	// to the sink when the budget allows.
	deferred []byte
	conn     *trackedConn
	timer    *time.Timer
}

// quotaSweepEvery is how often full budgets are dropped from the map.
const quotaSweepEvery = 10 * time.Second

func newReportQuotas(b *Broker, lim Limits) *reportQuotas {
	refill := max(float64(lim.ReportBurst)/lim.ReportRate, float64(lim.ReportBytesBurst)/float64(lim.ReportBytesRate))
	return &reportQuotas{b: b, lim: lim, calm: time.Duration(refill * float64(time.Second)), devices: map[string]*deviceBudget{}}
}

// verdict is what the quotas decide about one report.
type verdict int

const (
	reportAdmitted  verdict = iota // hand it to the sink now
	reportThrottled                // kept; handed over when the budget allows
	reportOverQuota                // kept, and the device has gone on too long: disconnect it
)

// take decides about a well-formed report of deviceID on tc.
func (q *reportQuotas) take(tc *trackedConn, deviceID string, report []byte) verdict {
	now := time.Now()
	size := float64(len(report))
	q.mu.Lock()
	defer q.mu.Unlock()
	q.sweepLocked(now)
	d := q.budgetLocked(deviceID, now)
	if d.reports >= 1 && d.bytes >= size {
		d.reports--
		d.bytes -= size
		d.deferred, d.conn = nil, nil // superseded; its timer finds nothing
		return reportAdmitted
	}
	q.throttled.Add(1)
	d.deferred, d.conn = report, tc // supersedes one kept before
	q.scheduleLocked(deviceID, d, now)
	if q.overrunLocked(d, tc, now) {
		return reportOverQuota
	}
	return reportThrottled
}

// refused counts a report refused outright (too large, malformed) as an
// overrun; it reports whether the device has now gone on too long.
func (q *reportQuotas) refused(tc *trackedConn, deviceID string) bool {
	now := time.Now()
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.budgetLocked(deviceID, now)
	return q.overrunLocked(d, tc, now)
}

func (q *reportQuotas) overrunLocked(d *deviceBudget, tc *trackedConn, now time.Time) bool {
	if d.session != tc || now.Sub(d.lastOverrun) >= q.calm {
		d.session, d.overruns = tc, 0
	}
	d.overruns++
	d.lastOverrun = now
	if d.overruns < q.lim.ReportOverruns {
		return false
	}
	d.overruns = 0 // counted once: the connection is being dropped
	return true
}

// budgetLocked returns deviceID's budget, refilled up to now.
func (q *reportQuotas) budgetLocked(deviceID string, now time.Time) *deviceBudget {
	d := q.devices[deviceID]
	if d == nil {
		d = &deviceBudget{reports: float64(q.lim.ReportBurst), bytes: float64(q.lim.ReportBytesBurst), at: now}
		q.devices[deviceID] = d
		return d
	}
	q.refillLocked(d, now)
	return d
}

func (q *reportQuotas) refillLocked(d *deviceBudget, now time.Time) {
	if dt := now.Sub(d.at).Seconds(); dt > 0 {
		d.reports = min(float64(q.lim.ReportBurst), d.reports+dt*q.lim.ReportRate)
		d.bytes = min(float64(q.lim.ReportBytesBurst), d.bytes+dt*float64(q.lim.ReportBytesRate))
		d.at = now
	}
}

func (q *reportQuotas) fullLocked(d *deviceBudget) bool {
	return d.reports >= float64(q.lim.ReportBurst) && d.bytes >= float64(q.lim.ReportBytesBurst)
}

// scheduleLocked arms the timer that hands d's deferred report over once
// the budget covers it.
func (q *reportQuotas) scheduleLocked(deviceID string, d *deviceBudget, now time.Time) {
	if d.timer != nil {
		return // armed; it reschedules itself if the report grew
	}
	wait := max((1-d.reports)/q.lim.ReportRate, (float64(len(d.deferred))-d.bytes)/float64(q.lim.ReportBytesRate), 0)
	d.timer = time.AfterFunc(time.Duration(wait*float64(time.Second))+time.Millisecond, func() { q.release(deviceID) })
}

// release hands deviceID's deferred report to the sink if its budget now
// covers it, or waits again.
func (q *reportQuotas) release(deviceID string) {
	now := time.Now()
	q.mu.Lock()
	d := q.devices[deviceID]
	if d == nil {
		q.mu.Unlock()
		return
	}
	d.timer = nil
	if d.deferred == nil || q.b.closed.Load() {
		d.deferred, d.conn = nil, nil
		q.mu.Unlock()
		return
	}
	q.refillLocked(d, now)
	size := float64(len(d.deferred))
	if d.reports < 1 || d.bytes < size {
		q.scheduleLocked(deviceID, d, now)
		q.mu.Unlock()
		return
	}
	report, tc := d.deferred, d.conn
	d.deferred, d.conn = nil, nil
	if tc.revoked.Load() {
		// Its session was revoked meanwhile: nothing of it is taken.
		q.mu.Unlock()
		return
	}
	d.reports--
	d.bytes -= size
	q.mu.Unlock()
	q.b.submitReport(tc, deviceID, report)
}

// sweepLocked drops the budgets that are full again with nothing kept.
func (q *reportQuotas) sweepLocked(now time.Time) {
	if now.Before(q.sweepAt) {
		return
	}
	q.sweepAt = now.Add(quotaSweepEvery)
	for id, d := range q.devices {
		q.refillLocked(d, now)
		if d.deferred == nil && d.timer == nil && q.fullLocked(d) && now.Sub(d.lastOverrun) >= q.calm {
			delete(q.devices, id)
		}
	}
}

// throttledDevices counts the devices over budget now: with a report
// waiting, or with an overrun less than calm ago.
func (q *reportQuotas) throttledDevices() int {
	now := time.Now()
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, d := range q.devices {
		if d.deferred != nil || (d.overruns > 0 && now.Sub(d.lastOverrun) < q.calm) {
			n++
		}
	}
	return n
}

// close stops the timers; deferred reports are dropped with the broker.
func (q *reportQuotas) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, d := range q.devices {
		if d.timer != nil {
			d.timer.Stop()
		}
		d.deferred, d.conn = nil, nil
	}
}

// cutOff disconnects a device that went on sending over its quota: once,
// with MQTT 5's "message rate too high", and one log line (rate-limited
// across devices). Reports that arrive on the connection until it is gone
// are not taken.
func (b *Broker) cutOff(tc *trackedConn, deviceID string, why string) {
	if !tc.overQuota.CompareAndSwap(false, true) {
		return
	}
	b.quotas.disconnects.Add(1)
	if n, ok := b.quotaLog.Allow(); ok {
		b.log.Warn("device disconnected: it went on sending reports over its quota",
			"device", deviceID, "remote", tc.RemoteAddr().String(), "reason", why,
			"overruns", b.lim.ReportOverruns, "suppressed", n)
	}
	// Not on the burst: mochi writes the PUBACK after this hook.
	go b.dropConn(tc, packets.ErrMessageRateTooHigh)
}
