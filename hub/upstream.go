package hub

import (
	"encoding/binary"
	"time"

	"appliance/fleet"
)

// Upstream batches: as many queued messages as fit in
// fleet.MaxUpstreamBatchSize, at most upstreamBatchMessages.
const upstreamBatchMessages = 1000

// sendUpstream feeds the $upstream queues to the controller, in batches,
// highest route priority first and in order within a queue. A batch is
// removed from the queues only once the controller acknowledged it; a
// batch that fails is sent again (after a backoff of 100 ms doubling to
// 5 s, or at once when the agent's session comes back), minus what expired
// meanwhile.
func (h *Hub) sendUpstream() {
	var batch []*entry
	retry := 100 * time.Millisecond
	for {
		if h.ctx.Err() != nil {
			return
		}
		batch = h.dropExpired(batch)
		if len(batch) == 0 {
			batch = h.takeUpstream()
		}
		if len(batch) == 0 || h.cfg.Upstream == nil {
			select {
			case <-h.ctx.Done():
				return
			case <-h.upKick:
			}
			continue
		}
		payload := fleet.UpstreamBatchHeader(make([]byte, 0, batchSize(batch)), len(batch))
		for _, e := range batch {
			payload = binary.AppendUvarint(payload, e.seq)
			payload = append(payload, e.val[8:]...)
		}
		if err := h.cfg.Upstream.PublishUpstream(h.ctx, payload); err != nil {
			if h.ctx.Err() != nil {
				return
			}
			h.log.Debug("upstream batch not sent; retrying", "messages", len(batch), "error", err, "retry", retry)
			select {
			case <-h.ctx.Done():
				return
			case <-h.upKick:
			case <-time.After(retry):
			}
			retry = min(2*retry, 5*time.Second)
			continue
		}
		retry = 100 * time.Millisecond
		for _, e := range batch {
			e.q.ack(e)
		}
		h.stats.upstreamSent.Add(uint64(len(batch)))
		h.stats.upstreamBatch.Add(1)
		batch = nil
	}
}

// batchSize is the encoded size of entries in a batch, about.
func batchSize(es []*entry) int {
	n := 16
	for _, e := range es {
		n += len(e.val) + 2
	}
	return n
}

// takeUpstream takes the next batch from the $upstream queues, by
// priority, dropping expired messages on the way.
func (h *Hub) takeUpstream() []*entry {
	h.mu.Lock()
	qs := append([]*queue(nil), h.upstream...)
	h.mu.Unlock()
	var out []*entry
	size := 16
	now := time.Now().UnixNano()
	for _, q := range qs {
		q.cmu.Lock()
		for len(out) < upstreamBatchMessages {
			e := q.take()
			if e == nil {
				break
			}
			if e.expired(now) {
				q.expire(e)
				continue
			}
			if size+len(e.val)+10 > fleet.MaxUpstreamBatchSize && len(out) > 0 {
				q.putBack([]*entry{e})
				break
			}
			out = append(out, e)
			size += len(e.val) + 10
		}
		q.cmu.Unlock()
		if len(out) >= upstreamBatchMessages || size >= fleet.MaxUpstreamBatchSize-1024 {
			break
		}
	}
	return out
}

// dropExpired removes expired messages from a batch waiting to be sent.
func (h *Hub) dropExpired(batch []*entry) []*entry {
	now := time.Now().UnixNano()
	kept := batch[:0]
	for _, e := range batch {
		if e.expired(now) {
			e.q.expire(e)
			continue
		}
		kept = append(kept, e)
	}
	return kept
}

// sweep removes expired messages from the heads of every queue every
// SweepInterval, so that a sink that never comes back (a module removed
// from the deployment, a controller gone for days) does not keep them on
// disk past their time to live.
func (h *Hub) sweep() {
	t := time.NewTicker(h.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-h.ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		qs := make([]*queue, 0, len(h.queues))
		for _, q := range h.queues {
			qs = append(qs, q)
		}
		h.mu.Unlock()
		now := time.Now().UnixNano()
		for _, q := range qs {
			q.sweep(now)
		}
	}
}

// sweep expires the queue's leading messages that are past their time.
func (q *queue) sweep(now int64) {
	q.cmu.Lock()
	defer q.cmu.Unlock()
	for {
		e := q.take()
		if e == nil {
			return
		}
		if !e.expired(now) {
			q.putBack([]*entry{e})
			return
		}
		q.expire(e)
	}
}
