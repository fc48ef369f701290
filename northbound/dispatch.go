package northbound

import (
	"bufio"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"slices"
)

// run is a stream's dispatcher: while the stream has a connected member it
// sends the messages its subscriptions match, each to a member with room
// (QoS 1 messages not yet acknowledged below the connection's window, and
// its write queue not full), messages a departed member left unacknowledged
// first. It waits, holding nothing, while no member has room: a slow
// consumer slows its own streams only, and what it has not read stays in
// the log (until retention deletes it: counted in Stats.DroppedRetention).
func (st *stream) run() {
	s := st.s
	defer s.wg.Done()
	reader := s.rlog.NewReader(st.readPos.Load())
	defer reader.Close()
	seeker := s.rlog.NewReader(0) // for messages sent again
	defer seeker.Close()
	for {
		st.mu.Lock()
		if st.deleted || len(st.members) == 0 || s.ctx.Err() != nil {
			st.running = false
			st.mu.Unlock()
			return
		}
		target := st.pickLocked()
		st.mu.Unlock()
		if target == nil {
			st.wait(nil) // a member with room, or a change of members
			continue
		}
		// The log's change signal is taken before looking: an append
		// committed after the look closes it, none is missed.
		more := s.rlog.changed()
		m, qos, dup, ok := st.next(reader, seeker)
		if !ok {
			target.unreserve()
			st.wait(more)
			continue
		}
		st.send(target, m, qos, dup)
	}
}

// wait blocks until the stream is poked, the log grows (more, when not
// nil) or the server stops.
func (st *stream) wait(more <-chan struct{}) {
	select {
	case <-st.wake:
	case <-more:
	case <-st.s.ctx.Done():
	}
}

// pickLocked returns a member with room for one more message, reserved,
// taking turns among the members of a shared stream. st.mu held.
func (st *stream) pickLocked() *conn {
	n := len(st.members)
	for i := 0; i < n; i++ {
		c := st.members[(st.rr+i)%n]
		if c.reserve() {
			st.rr = (st.rr + i + 1) % n
			return c
		}
	}
	return nil
}

// next returns the next message to send, and the QoS and DUP flag it goes
// out with: one to send again, else the next one in the log the
// subscriptions match. ok is false when there is none now.
func (st *stream) next(reader, seeker *Reader) (m Message, qos byte, dup, ok bool) {
	s := st.s
	for {
		st.mu.Lock()
		if len(st.redeliver) > 0 {
			off := st.redeliver[0]
			st.redeliver = st.redeliver[1:]
			st.inHand, st.hasInHand = off, true
			st.mu.Unlock()
			seeker.Seek(off)
			got, p, found, err := seeker.Poll()
			if err != nil || !found || got != off {
				// Deleted for retention meanwhile (or damaged): it
				// matched, and it is lost.
				st.dropInHand(1, err)
				continue
			}
			msg, err := decodeRecord(off, p)
			st.mu.Lock()
			q, match := st.matchQoSLocked(msg.DeviceID, msg.Module)
			st.mu.Unlock()
			if err != nil || !match {
				st.dropInHand(0, nil)
				continue
			}
			return msg, q, true, true
		}
		st.mu.Unlock()

		st.readMu.Lock()
		if reader.Offset() < st.skipTo {
			reader.Seek(st.skipTo)
		}
		off, p, found, err := reader.Poll()
		var te *TrimmedError
		if errors.As(err, &te) {
			// Only damage gets here: segments deleted for retention are
			// counted and skipped by trimmed, before they go.
			st.readPos.Store(reader.Offset())
			st.readMu.Unlock()
			if !te.Corrupt {
				s.stats.droppedRetention.Add(te.Next - te.From)
			}
			continue
		}
		if err != nil || !found {
			st.readMu.Unlock()
			if err != nil && !errors.Is(err, ErrLogClosed) {
				s.log.Error("consumer stream cannot read the retention log", "error", err)
			}
			return Message{}, 0, false, false
		}
		h, herr := recordHeader(p)
		st.mu.Lock()
		q, match := st.matchQoSLocked(h.device, h.module)
		if herr == nil && match {
			st.inHand, st.hasInHand = off, true
		}
		st.mu.Unlock()
		st.readPos.Store(off + 1)
		if herr != nil || !match {
			st.readMu.Unlock()
			continue
		}
		msg, err := decodeRecord(off, p)
		if err != nil {
			st.readMu.Unlock()
			s.log.Error("a record of the retention log does not decode; skipped", "offset", off, "error", err)
			st.dropInHand(0, nil)
			continue
		}
		msg.Body = slices.Clone(msg.Body) // p is the reader's buffer
		st.readMu.Unlock()
		return msg, q, false, true
	}
}

// dropInHand lets go of the message in hand, counting n lost.
func (st *stream) dropInHand(n uint64, cause error) {
	st.mu.Lock()
	st.hasInHand = false
	st.mu.Unlock()
	if n > 0 {
		var te *TrimmedError
		if errors.As(cause, &te) && te.Corrupt {
			return // counted by the log
		}
		st.s.stats.droppedRetention.Add(n)
	}
}

// send writes the message in hand to c (reserved): at QoS 1 it is in
// flight until c acknowledges it; at QoS 0 it is done once written.
func (st *stream) send(c *conn, m Message, qos byte, dup bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.hasInHand = false
	if st.deleted {
		c.unreserve()
		return
	}
	pid, err := c.publish(st, m, qos, dup)
	switch {
	case errors.Is(err, errTooLarge):
		st.s.stats.droppedTooLarge.Add(1)
		st.s.logClient("message larger than the consumer's maximum packet size; not sent", "consumer", c.consumer, "client", c.clientID, "offset", m.Offset)
	case err != nil:
		// The connection is closing: the member leaves, and the message
		// goes to the next one (or to the session when it is back).
		i, _ := slices.BinarySearch(st.redeliver, m.Offset)
		st.redeliver = slices.Insert(st.redeliver, i, m.Offset)
	case qos > 0:
		st.inflight[m.Offset] = delivery{c: c, pid: pid}
	}
}

// trimmed is told by the log that the segment [from, to) is about to be
// deleted: every stream that has not read all of it counts the messages
// its subscriptions match in what it has not read, and moves past it.
// Messages read and waiting to be sent again are lost too.
func (s *Server) trimmed(from, to uint64, path string) {
	s.mu.Lock()
	streams := make([]*stream, 0, len(s.streams))
	for _, st := range s.streams {
		streams = append(streams, st)
	}
	s.mu.Unlock()
	for _, st := range streams {
		st.readMu.Lock()
		pos := st.readPos.Load()
		var lost uint64
		if pos < to {
			st.mu.Lock()
			subs := slices.Clone(st.subs)
			st.mu.Unlock()
			lost = countMatching(path, from, max(pos, from), to, subs)
			st.skipTo = to
			st.readPos.Store(to)
		}
		st.mu.Lock()
		for len(st.redeliver) > 0 && st.redeliver[0] < to {
			st.redeliver = st.redeliver[1:]
			lost++
		}
		st.mu.Unlock()
		st.readMu.Unlock()
		if lost > 0 {
			s.stats.droppedRetention.Add(lost)
			s.log.Warn("consumer stream lost messages deleted for retention before it read them (its consumer was away or slower than the retention; flags --events-retention-bytes, --events-retention-age)",
				"stream", streamName(st.id), "messages", lost)
		}
	}
}

// countMatching counts the messages from offset at up to to in a segment
// whose first offset is base that one of subs matches.
func countMatching(path string, base, at, to uint64, subs []subscription) uint64 {
	f, err := os.Open(path)
	if err != nil {
		return to - at // cannot tell which matched: all of them
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 256<<10)
	var hdr [frameHeader]byte
	var p []byte
	var n uint64
	for off := base; off < to; off++ {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return n + (to - max(off, at))
		}
		size := binary.BigEndian.Uint32(hdr[:4])
		if size > maxFrame {
			return n + (to - max(off, at))
		}
		p = slices.Grow(p[:0], int(size))[:size]
		if _, err := io.ReadFull(br, p); err != nil || crc32.Checksum(p, crcTable) != binary.BigEndian.Uint32(hdr[4:]) {
			return n + (to - max(off, at))
		}
		if off < at {
			continue
		}
		h, err := recordHeader(p)
		if err != nil {
			continue
		}
		for _, sub := range subs {
			if sub.filter.matches(h.device, h.module) {
				n++
				break
			}
		}
	}
	return n
}

// streamName is a stream's id for a log line.
func streamName(id string) string {
	b := []byte(id)
	for i := range b {
		if b[i] == 0 {
			b[i] = '/'
		}
	}
	return string(b)
}
