package northbound

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/internal/mqttconn"
)

// Sessions and streams.
//
// A session is a consumer's MQTT session: its client id (scoped to the
// consumer: two consumers may use the same one), its subscriptions, and
// whether it outlives its connection (persistent: MQTT 3.1.1 clean
// session 0, or MQTT 5 clean start 0 with a session expiry interval).
//
// A stream is a place in the retention log and the subscriptions it
// delivers. A session's plain subscriptions share one stream, its own: the
// messages they match reach the session once each, in log order, at the
// highest QoS among the subscriptions that match. Each shared subscription
// ($share/{group}/{filter}) of a consumer is one stream, whose members are
// the connected sessions holding it: each message goes to one of them. A
// stream reads the log from its place on while it has a connected member,
// and keeps its place while it has none; the place it resumes from is the
// oldest message it has not finished with (read, or sent at QoS 1 and not
// acknowledged).

type sessionKey struct{ consumer, clientID string }

type subscription struct {
	filter subFilter
	group  string
	qos    byte
}

type session struct {
	key        sessionKey
	persistent bool
	expiry     time.Duration
	subs       map[string]subscription // plain ones, by filter
	shared     map[string]subscription // by the group's stream id
	private    *stream                 // nil without plain subscriptions
	conn       *conn
	// disconnected is when its last connection ended (persistent ones).
	disconnected time.Time
}

func (se *session) record() sessionRecord {
	rec := sessionRecord{Consumer: se.key.consumer, ClientID: se.key.clientID, ExpirySecs: uint32(se.expiry / time.Second), Disconnected: se.disconnected}
	for _, sub := range se.subs {
		rec.Subs = append(rec.Subs, subRecord{Filter: sub.filter.text, QoS: sub.qos})
	}
	for _, sub := range se.shared {
		rec.Subs = append(rec.Subs, subRecord{Filter: sub.filter.text, Group: sub.group, QoS: sub.qos})
	}
	slices.SortFunc(rec.Subs, func(a, b subRecord) int {
		return strings.Compare(a.Group+"\x00"+a.Filter, b.Group+"\x00"+b.Filter)
	})
	return rec
}

func privateStreamID(k sessionKey) string { return "p\x00" + k.consumer + "\x00" + k.clientID }

func sharedStreamID(consumer, group, filter string) string {
	return "g\x00" + consumer + "\x00" + group + "\x00" + filter
}

type delivery struct {
	c   *conn
	pid uint16
}

type stream struct {
	s      *Server
	id     string
	shared bool

	mu        sync.Mutex
	subs      []subscription
	members   []*conn
	rr        int
	refs      int // sessions holding it (shared streams)
	inflight  map[uint64]delivery
	redeliver []uint64 // sorted: offsets read and sent, whose member left before acknowledging
	running   bool
	wake      chan struct{}
	persisted uint64
	deleted   bool
	// inHand is the message the dispatcher has read and not yet sent.
	inHand    uint64
	hasInHand bool

	// readMu orders the dispatcher's reads against trimmed (the log
	// deleting a segment): readPos is the next offset the stream has not
	// read (written under readMu, read by anyone); skipTo moves it past a
	// deleted segment. Lock order: readMu before mu.
	readMu  sync.Mutex
	readPos atomic.Uint64
	skipTo  uint64
}

func newStream(s *Server, id string, shared bool, pos uint64) *stream {
	st := &stream{s: s, id: id, shared: shared, inflight: map[uint64]delivery{}, wake: make(chan struct{}, 1), persisted: pos}
	st.readPos.Store(pos)
	return st
}

func (st *stream) poke() {
	select {
	case st.wake <- struct{}{}:
	default:
	}
}

// floor is where the stream resumes after a restart: the oldest message
// not finished with. st.mu held.
func (st *stream) floorLocked() uint64 {
	f := st.readPos.Load()
	for off := range st.inflight {
		f = min(f, off)
	}
	if len(st.redeliver) > 0 {
		f = min(f, st.redeliver[0])
	}
	if st.hasInHand {
		f = min(f, st.inHand)
	}
	return f
}

// addMember makes c a member and starts the dispatcher if it is not
// running. st.mu not held.
func (st *stream) addMember(c *conn) {
	st.mu.Lock()
	if !slices.Contains(st.members, c) {
		st.members = append(st.members, c)
	}
	start := !st.running && !st.deleted
	st.running = st.running || start
	st.mu.Unlock()
	c.addStream(st)
	if start {
		st.s.wg.Add(1)
		go st.run()
	}
	st.poke()
}

// removeMember takes c out; what it had not acknowledged is sent again
// (to the next member, or to the session when it comes back).
func (st *stream) removeMember(c *conn) {
	st.mu.Lock()
	st.members = slices.DeleteFunc(st.members, func(m *conn) bool { return m == c })
	for off, d := range st.inflight {
		if d.c == c {
			delete(st.inflight, off)
			i, _ := slices.BinarySearch(st.redeliver, off)
			st.redeliver = slices.Insert(st.redeliver, i, off)
		}
	}
	st.mu.Unlock()
	st.poke()
}

// acked settles a QoS 1 message.
func (st *stream) acked(off uint64, c *conn) {
	st.mu.Lock()
	if d, ok := st.inflight[off]; ok && d.c == c {
		delete(st.inflight, off)
	}
	st.mu.Unlock()
}

// matchQoS is the QoS a message of device/module goes out at, and whether
// any subscription matches. st.mu held.
func (st *stream) matchQoSLocked(device, module string) (byte, bool) {
	var qos byte
	found := false
	for _, sub := range st.subs {
		if sub.filter.matches(device, module) {
			found = true
			qos = max(qos, sub.qos)
		}
	}
	return min(qos, 1), found
}

// errSessionLimit: the node keeps Limits.MaxSessions sessions already.
var errSessionLimit = errors.New("too many consumer sessions on this node")

// attach gives c its session: the one it resumes (present true) or a new
// one. A connection of the same session still open is ended first.
func (s *Server) attach(c *conn, clean, persistent bool, expiry time.Duration) (present bool, err error) {
	k := sessionKey{c.consumer, c.clientID}
	for {
		s.mu.Lock()
		se := s.sessions[k]
		if se == nil || se.conn == nil {
			break
		}
		old := se.conn
		s.mu.Unlock()
		old.close(packets.ErrSessionTakenOver)
		<-old.done
	}
	// s.mu held from here.
	if clean && s.sessions[k] != nil {
		s.mu.Unlock()
		s.endSession(k)
		s.mu.Lock()
	}
	se := s.sessions[k]
	present = se != nil
	if se == nil {
		if len(s.sessions) >= s.lim.MaxSessions {
			s.mu.Unlock()
			return false, errSessionLimit
		}
		se = &session{key: k, subs: map[string]subscription{}, shared: map[string]subscription{}}
		s.sessions[k] = se
	}
	se.persistent, se.expiry, se.conn, se.disconnected = persistent, expiry, c, time.Time{}
	c.sess = se
	var streams []*stream
	if se.private != nil {
		streams = append(streams, se.private)
	}
	for id := range se.shared {
		if st := s.streams[id]; st != nil {
			streams = append(streams, st)
		}
	}
	rec := se.record()
	s.mu.Unlock()
	if persistent {
		if err := s.state.putSession(k, rec); err != nil {
			s.log.Error("consumer session not stored; it will not survive a restart of the node", "consumer", k.consumer, "client", k.clientID, "error", err)
		}
	} else if present {
		// It was persistent and is not any more.
		_ = s.state.deleteSession(k, nil)
	}
	for _, st := range streams {
		st.addMember(c)
	}
	return present, nil
}

// detach ends c's part in its session: a persistent session keeps its
// subscriptions and places, any other ends.
func (s *Server) detach(c *conn) {
	s.mu.Lock()
	se := c.sess
	if se == nil || se.conn != c {
		s.mu.Unlock()
		c.leaveStreams()
		return
	}
	se.conn = nil
	se.disconnected = time.Now()
	persistent := se.persistent && !c.revoked.Load()
	rec := se.record()
	s.mu.Unlock()
	c.leaveStreams()
	if !persistent {
		s.endSession(se.key)
		return
	}
	if err := s.state.putSession(se.key, rec); err != nil {
		s.log.Error("consumer session not stored", "consumer", se.key.consumer, "client", se.key.clientID, "error", err)
	}
}

// endSession forgets a session, its own stream and its part in shared
// ones.
func (s *Server) endSession(k sessionKey) {
	s.mu.Lock()
	se := s.sessions[k]
	if se == nil {
		s.mu.Unlock()
		return
	}
	delete(s.sessions, k)
	var gone []string
	if se.private != nil {
		gone = append(gone, se.private.id)
		s.dropStreamLocked(se.private)
		se.private = nil
	}
	for id := range se.shared {
		if st := s.streams[id]; st != nil && s.releaseSharedLocked(st) {
			gone = append(gone, id)
		}
	}
	s.mu.Unlock()
	if err := s.state.deleteSession(k, gone); err != nil {
		s.log.Error("consumer session not deleted from disk", "consumer", k.consumer, "client", k.clientID, "error", err)
	}
}

// dropStreamLocked forgets a stream; its dispatcher ends. s.mu held.
func (s *Server) dropStreamLocked(st *stream) {
	delete(s.streams, st.id)
	st.mu.Lock()
	st.deleted = true
	st.mu.Unlock()
	st.poke()
}

// releaseSharedLocked drops one session's hold on a shared stream; it
// reports whether the stream is gone. s.mu held.
func (s *Server) releaseSharedLocked(st *stream) bool {
	st.mu.Lock()
	st.refs--
	last := st.refs <= 0
	st.mu.Unlock()
	if last {
		s.dropStreamLocked(st)
	}
	return last
}

// subscribe applies a SUBSCRIBE: a reason code per filter.
func (s *Server) subscribe(c *conn, filters []packets.Subscription) []byte {
	codes := make([]byte, len(filters))
	s.mu.Lock()
	se := c.sess
	var join []*stream
	for i, f := range filters {
		group, sf, err := parseSubscription(f.Filter)
		if err != nil {
			codes[i] = c.notAuthorized()
			s.logClient("consumer subscription refused", "consumer", c.consumer, "client", c.clientID, "filter", mqttconn.Truncate(f.Filter, 200), "reason", err.Error())
			continue
		}
		if len(se.subs)+len(se.shared) >= s.lim.MaxSubscriptions && !se.has(group, sf) {
			codes[i] = packets.ErrQuotaExceeded.Code
			if c.version < 5 {
				codes[i] = packets.ErrUnspecifiedError.Code
			}
			s.logClient("consumer subscription refused", "consumer", c.consumer, "client", c.clientID, "filter", mqttconn.Truncate(f.Filter, 200),
				"reason", fmt.Sprintf("a session holds at most %d subscriptions", s.lim.MaxSubscriptions))
			continue
		}
		qos := min(f.Qos, 1)
		codes[i] = qos
		sub := subscription{filter: sf, group: group, qos: qos}
		if group == "" {
			se.subs[sf.text] = sub
			if se.private == nil {
				id := privateStreamID(se.key)
				se.private = newStream(s, id, false, s.rlog.End())
				s.streams[id] = se.private
			}
			se.private.setSubs(se.plainSubs())
			join = append(join, se.private)
			continue
		}
		id := sharedStreamID(c.consumer, group, sf.text)
		st := s.streams[id]
		if st == nil {
			st = newStream(s, id, true, s.rlog.End())
			s.streams[id] = st
		}
		if _, held := se.shared[id]; !held {
			st.mu.Lock()
			st.refs++
			st.mu.Unlock()
		}
		se.shared[id] = sub
		st.setSubs([]subscription{sub})
		join = append(join, st)
	}
	rec, persistent := se.record(), se.persistent
	s.mu.Unlock()
	if persistent {
		if err := s.state.putSession(se.key, rec); err != nil {
			s.log.Error("consumer subscriptions not stored; they will not survive a restart of the node", "consumer", c.consumer, "error", err)
		}
	}
	for _, st := range join {
		st.addMember(c)
	}
	return codes
}

// unsubscribe applies an UNSUBSCRIBE: a reason code per filter.
func (s *Server) unsubscribe(c *conn, filters []packets.Subscription) []byte {
	codes := make([]byte, len(filters))
	s.mu.Lock()
	se := c.sess
	var leave []*stream
	var gone []string
	for i, f := range filters {
		group, sf, err := parseSubscription(f.Filter)
		if err != nil {
			codes[i] = packets.CodeNoSubscriptionExisted.Code
			continue
		}
		if group == "" {
			if _, ok := se.subs[sf.text]; !ok {
				codes[i] = packets.CodeNoSubscriptionExisted.Code
				continue
			}
			delete(se.subs, sf.text)
			if len(se.subs) == 0 {
				gone = append(gone, se.private.id)
				leave = append(leave, se.private)
				s.dropStreamLocked(se.private)
				se.private = nil
			} else {
				se.private.setSubs(se.plainSubs())
			}
			continue
		}
		id := sharedStreamID(c.consumer, group, sf.text)
		if _, ok := se.shared[id]; !ok {
			codes[i] = packets.CodeNoSubscriptionExisted.Code
			continue
		}
		delete(se.shared, id)
		if st := s.streams[id]; st != nil {
			leave = append(leave, st)
			if s.releaseSharedLocked(st) {
				gone = append(gone, id)
			}
		}
	}
	rec, persistent := se.record(), se.persistent
	s.mu.Unlock()
	if c.version < 5 {
		codes = nil // MQTT 3.1.1's UNSUBACK has no reason codes
	}
	for _, st := range leave {
		st.removeMember(c)
		c.dropStream(st)
	}
	if persistent {
		_ = s.state.putSession(se.key, rec)
	}
	if err := s.state.deleteStreams(gone); err != nil {
		s.log.Error("consumer stream not deleted from disk", "error", err)
	}
	return codes
}

func (se *session) has(group string, f subFilter) bool {
	if group == "" {
		_, ok := se.subs[f.text]
		return ok
	}
	_, ok := se.shared[sharedStreamID(se.key.consumer, group, f.text)]
	return ok
}

func (se *session) plainSubs() []subscription {
	out := make([]subscription, 0, len(se.subs))
	for _, sub := range se.subs {
		out = append(out, sub)
	}
	return out
}

func (st *stream) setSubs(subs []subscription) {
	st.mu.Lock()
	st.subs = subs
	st.mu.Unlock()
	st.poke()
}

// expireSessions ends persistent sessions disconnected for longer than
// their expiry.
func (s *Server) expireSessions(now time.Time) {
	s.mu.Lock()
	var gone []sessionKey
	for k, se := range s.sessions {
		if se.conn == nil && !se.disconnected.IsZero() && now.Sub(se.disconnected) > se.expiry {
			gone = append(gone, k)
		}
	}
	s.mu.Unlock()
	for _, k := range gone {
		s.log.Info("consumer session expired", "consumer", k.consumer, "client", k.clientID)
		s.endSession(k)
	}
}

// persistCursors stores every stream's place that moved.
func (s *Server) persistCursors() {
	s.mu.Lock()
	streams := make([]*stream, 0, len(s.streams))
	for _, st := range s.streams {
		streams = append(streams, st)
	}
	s.mu.Unlock()
	moved := map[string]uint64{}
	for _, st := range streams {
		st.mu.Lock()
		if f := st.floorLocked(); f != st.persisted && !st.deleted {
			moved[st.id] = f
		}
		st.mu.Unlock()
	}
	if err := s.state.putCursors(moved); err != nil {
		s.log.Error("consumer streams' places not stored; after a restart they resume further back", "error", err)
		return
	}
	for _, st := range streams {
		st.mu.Lock()
		if f, ok := moved[st.id]; ok {
			st.persisted = f
		}
		st.mu.Unlock()
	}
}

// restore rebuilds the persistent sessions and their streams at open.
func (s *Server) restore() error {
	recs, cursors, err := s.state.load()
	if err != nil {
		return err
	}
	first, end := s.rlog.First(), s.rlog.End()
	place := func(id string) uint64 {
		c, ok := cursors[id]
		if !ok || c > end {
			return end
		}
		return max(c, first) // behind the log: what is gone was counted when it went
	}
	now := time.Now()
	keep := map[string]bool{}
	for _, rec := range recs {
		k := sessionKey{rec.Consumer, rec.ClientID}
		se := &session{key: k, persistent: true, expiry: time.Duration(rec.ExpirySecs) * time.Second,
			subs: map[string]subscription{}, shared: map[string]subscription{}, disconnected: rec.Disconnected}
		if se.disconnected.IsZero() {
			se.disconnected = now // connected when the node stopped
		}
		for _, sr := range rec.Subs {
			group, sf, err := parseSubscription(sharedPrefix(sr.Group) + sr.Filter)
			if err != nil {
				continue
			}
			sub := subscription{filter: sf, group: group, qos: min(sr.QoS, 1)}
			if group == "" {
				se.subs[sf.text] = sub
				continue
			}
			id := sharedStreamID(k.consumer, group, sf.text)
			se.shared[id] = sub
			st := s.streams[id]
			if st == nil {
				st = newStream(s, id, true, place(id))
				st.subs = []subscription{sub}
				s.streams[id] = st
				keep[id] = true
			}
			st.refs++
		}
		if len(se.subs) > 0 {
			id := privateStreamID(k)
			se.private = newStream(s, id, false, place(id))
			se.private.subs = se.plainSubs()
			s.streams[id] = se.private
			keep[id] = true
		}
		s.sessions[k] = se
	}
	var stale []string
	for id := range cursors {
		if !keep[id] {
			stale = append(stale, id)
		}
	}
	if err := s.state.deleteStreams(stale); err != nil {
		return fmt.Errorf("northbound: %w", err)
	}
	if len(recs) > 0 {
		s.log.Info("consumer sessions restored", "sessions", len(recs), "streams", len(s.streams))
	}
	return nil
}

func sharedPrefix(group string) string {
	if group == "" {
		return ""
	}
	return sharePrefix + group + "/"
}

func (s *Server) logClient(msg string, args ...any) {
	if n, ok := s.clientLog.Allow(); ok {
		s.log.Info(msg, append(args, "suppressed", n)...)
	}
}
