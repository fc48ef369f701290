package hub

import (
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
)

// subscriptions are what a module subscribed to, of the four filters the
// IoT Hub protocol has. Persistent ones (a session that is not clean) are
// kept in hub.db and given back when the module reconnects without a clean
// session, as IoT Hub does: azure-iot-device connects with clean session 0
// and does not subscribe again after a reconnect.
type subscriptions struct {
	Inputs     int  `json:"inputs"` // granted QoS, -1 when not subscribed
	TwinRes    bool `json:"twinRes"`
	TwinPatch  bool `json:"twinPatch"`
	Methods    bool `json:"methods"`
	Persistent bool `json:"-"`
}

func noSubscriptions() subscriptions { return subscriptions{Inputs: -1} }

// module is a module's state in the hub: its connection (if any), its
// subscriptions, its input queues, its twin and its pending method calls.
type module struct {
	h    *Hub
	name string
	kick chan struct{} // wakes the deliverer: a message, an acknowledgement, a subscription

	mu               sync.Mutex
	conn             *conn
	subs             subscriptions
	queues           []*queue // its inputs' queues, by priority then name
	lastConnected    time.Time
	lastDisconnected time.Time
	twin             twinState
	methods          map[string]chan methodAnswer // by $rid
	methodWaiters    []chan struct{}              // InvokeMethods waiting for a connection
	gone             bool                         // left the deployment

	// refusedLogAt and refusedUnlogged rate-limit the "publish refused" log.
	refusedLogAt, refusedUnlogged atomic.Int64
}

func newModule(h *Hub, name string) *module {
	return &module{h: h, name: name, kick: make(chan struct{}, 1), subs: noSubscriptions(),
		twin: twinState{Desired: json.RawMessage("{}"), Reported: json.RawMessage("{}")}}
}

func (m *module) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// addQueue adds one of the module's input queues. h.mu is held.
func (m *module) addQueue(q *queue) {
	m.mu.Lock()
	m.queues = append(m.queues, q)
	slices.SortFunc(m.queues, cmpQueue)
	m.mu.Unlock()
	q.setConsumer(m.poke)
	m.poke()
}

// client is the module's connection state for the report; false if it
// never connected.
func (m *module) client() (fleet.HubClient, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lastConnected.IsZero() {
		return fleet.HubClient{}, false
	}
	c := fleet.HubClient{Status: "disconnected"}
	if m.conn != nil {
		c.Status = "connected"
	}
	t := m.lastConnected.UTC()
	c.LastConnectedTimeUTC = &t
	if !m.lastDisconnected.IsZero() {
		d := m.lastDisconnected.UTC()
		c.LastDisconnectedTimeUTC = &d
	}
	return c, true
}

// attach makes c the module's connection, ending the one before it
// (session taken over), and returns whether a persistent session was
// resumed (the caller starts its delivery once the CONNACK is queued).
func (m *module) attach(c *conn, clean, persistent bool) bool {
	m.mu.Lock()
	old := m.conn
	m.conn = c
	m.lastConnected = time.Now()
	resumed := false
	switch {
	case clean || !persistent:
		if m.subs.Persistent {
			m.h.store.do(func(tx *bolt.Tx) error { return tx.Bucket(bucketSessions).Delete([]byte(m.name)) }, nil)
		}
		m.subs = noSubscriptions()
		m.subs.Persistent = persistent
	case m.subs.Persistent:
		resumed = true
	default:
		m.subs = noSubscriptions()
		m.subs.Persistent = true
	}
	waiters := m.methodWaiters
	m.methodWaiters = nil
	m.mu.Unlock()
	if old != nil {
		old.close(packets.ErrSessionTakenOver)
		<-old.done
	}
	for _, w := range waiters {
		close(w)
	}
	m.h.changed()
	return resumed
}

// detach forgets c when it closes (if it is still the module's).
func (m *module) detach(c *conn) {
	m.mu.Lock()
	if m.conn != c {
		m.mu.Unlock()
		return
	}
	m.conn = nil
	m.lastDisconnected = time.Now()
	if !m.subs.Persistent {
		m.subs = noSubscriptions()
	}
	pending := m.methods
	m.methods = nil
	m.mu.Unlock()
	for _, ch := range pending {
		select {
		case ch <- methodAnswer{status: fleet.MethodStatusNotConnected, err: "the module disconnected before answering"}:
		default:
		}
	}
	m.h.changed()
}

// leave drops a module that left the deployment: its connection ends, its
// persistent session and twin are forgotten.
func (m *module) leave() {
	m.mu.Lock()
	c := m.conn
	m.gone = true
	m.mu.Unlock()
	if c != nil {
		c.close(packets.ErrNotAuthorized)
	}
	name := []byte(m.name)
	m.h.store.do(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketSessions).Delete(name); err != nil {
			return err
		}
		return tx.Bucket(bucketTwins).Delete(name)
	}, nil)
}

// subscribe records what a SUBSCRIBE granted (persisted if the session
// is), then runs after once it is durable.
func (m *module) subscribe(c *conn, update func(*subscriptions), after func(error)) {
	m.mu.Lock()
	if m.conn != c {
		m.mu.Unlock()
		after(errors.New("connection replaced"))
		return
	}
	update(&m.subs)
	subs := m.subs
	m.mu.Unlock()
	if subs.Inputs >= 0 {
		m.startDelivery(c)
	}
	if !subs.Persistent {
		after(nil)
		return
	}
	data, _ := json.Marshal(subs)
	m.h.store.do(func(tx *bolt.Tx) error { return tx.Bucket(bucketSessions).Put([]byte(m.name), data) }, after)
}

func (m *module) subscriptions(c *conn) (subscriptions, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.subs, m.conn == c
}

// startDelivery starts the deliverer for c, once per connection.
func (m *module) startDelivery(c *conn) {
	if !c.delivering.CompareAndSwap(false, true) {
		m.poke()
		return
	}
	c.wg.Go(func() { m.deliver(c) })
}

// deliver sends the module its queued input messages over c, highest
// route priority first and in order within a queue, keeping at most
// MaxInflight (and the module's receive maximum) unacknowledged. It ends
// with the connection; what was sent but not acknowledged goes back to the
// front of its queue.
func (m *module) deliver(c *conn) {
	m.poke()
	for {
		select {
		case <-c.tr.Closing():
			return
		case <-m.kick:
		}
		subs, current := m.subscriptions(c)
		if !current || subs.Inputs < 0 {
			continue
		}
		for c.inflightDeliveries() < c.window() {
			e := m.next()
			if e == nil {
				break
			}
			if e.expired(time.Now().UnixNano()) {
				e.q.expire(e)
				continue
			}
			topic := inputTopic(m.h.cfg.DeviceID, m.name, e.q.sink.Input, e.msg)
			if err := c.deliver(topic, e, byte(subs.Inputs)); err != nil {
				e.q.putBack([]*entry{e})
				return
			}
		}
	}
}

// next takes the next entry of the module's queues, by priority.
func (m *module) next() *entry {
	m.mu.Lock()
	qs := slices.Clone(m.queues)
	m.mu.Unlock()
	for _, q := range qs {
		q.cmu.Lock()
		e := q.take()
		q.cmu.Unlock()
		if e != nil {
			return e
		}
	}
	return nil
}

// loadState reads the modules' twins and persistent sessions from hub.db.
func (h *Hub) loadState() error {
	return h.store.db.View(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketTwins).ForEach(func(k, v []byte) error {
			var ts twinState
			if err := json.Unmarshal(v, &ts); err != nil {
				h.log.Error("corrupt module twin in the hub store; the module starts with an empty twin", "module", string(k), "error", err)
				return nil
			}
			m := h.moduleLocked(string(k))
			m.twin = ts
			return nil
		}); err != nil {
			return err
		}
		return tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			var s subscriptions
			if err := json.Unmarshal(v, &s); err != nil {
				h.log.Error("corrupt module session in the hub store; the module must subscribe again", "module", string(k), "error", err)
				return nil
			}
			s.Persistent = true
			m := h.moduleLocked(string(k))
			m.subs = s
			return nil
		})
	})
}
