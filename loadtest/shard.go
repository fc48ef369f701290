package loadtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Device is one device's credentials.
type Device struct{ ID, Key string }

// WriteDevices writes devices as "id key" lines, the format ReadDevices and
// `mqttload --devices-file` read.
func WriteDevices(w io.Writer, devs []Device) error {
	bw := bufio.NewWriter(w)
	for _, d := range devs {
		if _, err := fmt.Fprintf(bw, "%s %s\n", d.ID, d.Key); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// ReadDevices reads "id key" lines, skips the first from and returns at
// most count (all the rest if count is 0 or less).
func ReadDevices(r io.Reader, from, count int) ([]Device, error) {
	var out []Device
	sc := bufio.NewScanner(r)
	for i := 0; sc.Scan(); i++ {
		if i < from {
			continue
		}
		if count > 0 && len(out) == count {
			break
		}
		id, key, ok := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if !ok || id == "" {
			return nil, fmt.Errorf("devices file line %d: want \"id key\"", i+1)
		}
		out = append(out, Device{ID: id, Key: key})
	}
	return out, sc.Err()
}

// Topic expands a topic template: "{id}" becomes the device id.
func Topic(template, id string) string { return strings.ReplaceAll(template, "{id}", id) }

// Event is one JSON line a shard or publisher writes on stdout.
type Event struct {
	// Event is "connected" (the connect phase ended), "watching" (a watch
	// began), "received" (every
	// live connection got a message carrying the watched token, or a
	// "report" command asked), "subscribed", "status", "published" or
	// "closed".
	Event string `json:"event"`
	// Count is what the event counts: connections made, messages received,
	// subscriptions made, messages published and acknowledged.
	Count int `json:"count"`
	// Expected is the count the event waited for (live connections when
	// the watch began).
	Expected int `json:"expected,omitempty"`
	// Failed counts connects or subscribes that failed.
	Failed int `json:"failed,omitempty"`
	// Live and Lost are the connections open now and those that ended
	// after connecting (the broker closed them, or they broke).
	Live int `json:"live"`
	Lost int `json:"lost,omitempty"`
	// Token is the watched token.
	Token string `json:"token,omitempty"`
	// Start and End are Unix nanoseconds: the first and last connect or
	// subscribe (start of the first, end of the last), the first and last
	// receipt, or the first publish and the last acknowledgement.
	Start int64 `json:"start,omitempty"`
	End   int64 `json:"end,omitempty"`
	// Errors holds the first few distinct errors.
	Errors []string `json:"errors,omitempty"`
}

// ShardConfig configures one load process's devices.
type ShardConfig struct {
	// Addr is the broker, host:port.
	Addr string
	// SourceIP pins the connections' local address (e.g. 127.0.0.11), so
	// that shards do not share one address's 28,232 ephemeral ports.
	SourceIP string
	// Devices connect with ClientID = Username = ID and Password = Key.
	Devices []Device
	// TopicTemplate is the topic each device subscribes to, "{id}" being
	// its id (default "appliance/devices/{id}/desired").
	TopicTemplate string
	// QoS of the subscriptions (default 1).
	QoS byte
	// Concurrency is how many connects run at once (default 64); the
	// machine's listen backlog is 4,096 and its SYN backlog 2,048.
	Concurrency int
	// Keepalive is sent in CONNECT; every connection pings at half of it
	// (default 300 s).
	Keepalive time.Duration
	// Timeout bounds each connect and each subscribe (default 30 s).
	Timeout time.Duration
}

func (c ShardConfig) withDefaults() ShardConfig {
	if c.TopicTemplate == "" {
		c.TopicTemplate = "appliance/devices/{id}/desired"
	}
	if c.QoS == 0 {
		c.QoS = 1
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 64
	}
	if c.Keepalive == 0 {
		c.Keepalive = 300 * time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	return c
}

type shardConn struct {
	*Conn
	// seen is the generation of the last watch this connection counted for.
	seen atomic.Uint32
}

type watch struct {
	gen         uint32
	token       []byte
	expected    int64
	count       atomic.Int64
	first, last atomic.Int64
	reported    atomic.Bool
}

type shard struct {
	cfg    ShardConfig
	dialer *net.Dialer

	outMu sync.Mutex
	out   *json.Encoder

	conns []*shardConn // nil where the connect failed
	watch atomic.Pointer[watch]
	gen   uint32
}

// RunShard connects cfg.Devices, subscribes each to its topic, reports a
// "connected" event, then follows commands on cmds, one per line:
//
//	watch TOKEN   count the first message carrying TOKEN on each connection:
//	              "watching" at once, then "received" when every connection
//	              live at the start has one
//	report        report the current watch now ("received", maybe partial)
//	sub TOPIC     subscribe every live connection to TOPIC too; "subscribed"
//	status        report live and lost connections
//	quit          disconnect everything and return (so does the end of cmds)
//
// Events are JSON lines (Event) on events. Every connection pings at half
// its keepalive, so the shard can hold its connections as long as needed.
func RunShard(ctx context.Context, cfg ShardConfig, cmds io.Reader, events io.Writer) error {
	cfg = cfg.withDefaults()
	s := &shard{cfg: cfg, dialer: &net.Dialer{}, out: json.NewEncoder(events)}
	if cfg.SourceIP != "" {
		ip := net.ParseIP(cfg.SourceIP)
		if ip == nil {
			return fmt.Errorf("source address %q is not an IP address", cfg.SourceIP)
		}
		s.dialer.LocalAddr = &net.TCPAddr{IP: ip}
		s.dialer.Control = bindAddressNoPort
	}
	s.connectAll(ctx)
	defer s.closeAll()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.pinger(ctx)

	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(cmds)
		for sc.Scan() {
			select {
			case lines <- strings.TrimSpace(sc.Text()):
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		var line string
		var ok bool
		select {
		case line, ok = <-lines:
		case <-ctx.Done():
			return ctx.Err()
		}
		if !ok || line == "quit" {
			return nil
		}
		cmd, arg, _ := strings.Cut(line, " ")
		switch cmd {
		case "watch":
			s.startWatch(arg)
		case "report":
			if w := s.watch.Load(); w != nil {
				s.reportWatch(w)
			}
		case "sub":
			s.subscribeAll(ctx, arg)
		case "status":
			live, lost, errs := s.liveness()
			s.emit(Event{Event: "status", Count: live, Live: live, Lost: lost, Errors: errs})
		case "":
		default:
			s.emit(Event{Event: "error", Errors: []string{fmt.Sprintf("unknown command %q", line)}})
		}
	}
}

func (s *shard) emit(e Event) {
	s.outMu.Lock()
	defer s.outMu.Unlock()
	_ = s.out.Encode(e)
}

// errorList keeps the first few distinct errors and counts the rest.
type errorList struct {
	mu   sync.Mutex
	errs []string
}

func (l *errorList) add(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	msg := err.Error()
	for _, e := range l.errs {
		if e == msg {
			return
		}
	}
	if len(l.errs) < 5 {
		l.errs = append(l.errs, msg)
	}
}

// forEach runs f on indices 0..n-1 with cfg.Concurrency goroutines.
func (s *shard) forEach(n int, f func(i int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range s.cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				f(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

func (s *shard) connectAll(ctx context.Context) {
	s.conns = make([]*shardConn, len(s.cfg.Devices))
	var failed atomic.Int64
	var errs errorList
	start := time.Now()
	s.forEach(len(s.cfg.Devices), func(i int) {
		d := s.cfg.Devices[i]
		sc := &shardConn{}
		c, err := Dial(ctx, s.dialer, s.cfg.Addr, ConnectOptions{
			ClientID: d.ID, Username: d.ID, Password: d.Key,
			Keepalive: s.cfg.Keepalive, Timeout: s.cfg.Timeout,
		}, func(_ *Conn, _ string, payload []byte, at time.Time) { s.received(sc, payload, at) })
		if err == nil {
			sc.Conn = c
			if err = c.Subscribe(Topic(s.cfg.TopicTemplate, d.ID), s.cfg.QoS, s.cfg.Timeout); err != nil {
				c.Close()
			}
		}
		if err != nil {
			failed.Add(1)
			errs.add(fmt.Errorf("%s: %w", d.ID, err))
			return
		}
		s.conns[i] = sc
	})
	end := time.Now()
	live, lost, lostErrs := s.liveness()
	s.emit(Event{Event: "connected", Count: len(s.cfg.Devices) - int(failed.Load()), Failed: int(failed.Load()),
		Live: live, Lost: lost, Start: start.UnixNano(), End: end.UnixNano(), Errors: append(errs.errs, lostErrs...)})
}

func (s *shard) subscribeAll(ctx context.Context, topic string) {
	var ok, failed atomic.Int64
	var errs errorList
	start := time.Now()
	s.forEach(len(s.conns), func(i int) {
		sc := s.conns[i]
		if sc == nil || sc.Err() != nil || ctx.Err() != nil {
			return
		}
		if err := sc.Subscribe(Topic(topic, s.cfg.Devices[i].ID), s.cfg.QoS, s.cfg.Timeout); err != nil {
			failed.Add(1)
			errs.add(err)
			return
		}
		ok.Add(1)
	})
	live, lost, _ := s.liveness()
	s.emit(Event{Event: "subscribed", Count: int(ok.Load()), Failed: int(failed.Load()), Live: live, Lost: lost,
		Start: start.UnixNano(), End: time.Now().UnixNano(), Errors: errs.errs})
}

// liveness counts open and ended connections and lists a few reasons.
func (s *shard) liveness() (live, lost int, errs []string) {
	var l errorList
	for _, sc := range s.conns {
		if sc == nil {
			continue
		}
		if err := sc.Err(); err != nil {
			lost++
			l.add(err)
			continue
		}
		live++
	}
	return live, lost, l.errs
}

func (s *shard) startWatch(token string) {
	s.gen++
	live, _, _ := s.liveness()
	w := &watch{gen: s.gen, token: []byte(token), expected: int64(live)}
	w.first.Store(-1)
	s.watch.Store(w)
	s.emit(Event{Event: "watching", Token: token, Expected: live, Live: live})
	if live == 0 {
		s.reportWatch(w)
	}
}

// received runs on a connection's read goroutine for every PUBLISH.
func (s *shard) received(sc *shardConn, payload []byte, at time.Time) {
	w := s.watch.Load()
	if w == nil || !bytes.Contains(payload, w.token) || sc.seen.Swap(w.gen) == w.gen {
		return
	}
	ns := at.UnixNano()
	for f := w.first.Load(); (f < 0 || ns < f) && !w.first.CompareAndSwap(f, ns); f = w.first.Load() {
	}
	for l := w.last.Load(); ns > l && !w.last.CompareAndSwap(l, ns); l = w.last.Load() {
	}
	if w.count.Add(1) == w.expected && w.reported.CompareAndSwap(false, true) {
		s.reportWatch(w)
	}
}

func (s *shard) reportWatch(w *watch) {
	live, lost, errs := s.liveness()
	first := w.first.Load()
	if first < 0 {
		first = 0
	}
	s.emit(Event{Event: "received", Token: string(w.token), Count: int(w.count.Load()), Expected: int(w.expected),
		Live: live, Lost: lost, Start: first, End: w.last.Load(), Errors: errs})
}

func (s *shard) pinger(ctx context.Context) {
	t := time.NewTicker(s.cfg.Keepalive / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for _, sc := range s.conns {
				if sc != nil && sc.Err() == nil {
					_ = sc.Ping()
				}
			}
		}
	}
}

func (s *shard) closeAll() {
	s.forEach(len(s.conns), func(i int) {
		if sc := s.conns[i]; sc != nil {
			_ = sc.Close()
		}
	})
	s.emit(Event{Event: "closed"})
}

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT (not in package
// syscall).
const ipBindAddressNoPort = 24

// bindAddressNoPort defers the choice of the source port from bind to
// connect, where the kernel picks one free for this destination. Without
// it, binding a source address searches for a port no socket on that
// address holds (TIME_WAIT ones included), which is slow with ten thousand
// of them: a run right after another spent 1.3 ms of kernel CPU per
// connection there, and the connect rate fell from ~7,300/s to ~1,300/s.
func bindAddressNoPort(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
	})
	return errors.Join(err, serr)
}

// PublisherConfig configures RunPublisher.
type PublisherConfig struct {
	// Addr is the broker, host:port; ClientID, Username and Password the
	// publisher's credentials.
	Addr                         string
	ClientID, Username, Password string
	// Topics get one message each, in order.
	Topics []string
	// QoS of the messages (default 1).
	QoS byte
	// Payload of every message.
	Payload []byte
	// Window is how many QoS 1 messages may await their PUBACK (default
	// 1,000).
	Window int
	// Timeout bounds the connect and each wait for an acknowledgement
	// (default 30 s).
	Timeout time.Duration
}

// RunPublisher connects, publishes one message to each topic with at most
// Window unacknowledged, waits for every PUBACK and reports a "published"
// event from the first publish to the last acknowledgement.
func RunPublisher(ctx context.Context, cfg PublisherConfig, events io.Writer) error {
	if cfg.QoS == 0 {
		cfg.QoS = 1
	}
	if cfg.Window <= 0 {
		cfg.Window = 1000
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	c, err := Dial(ctx, &net.Dialer{}, cfg.Addr, ConnectOptions{
		ClientID: cfg.ClientID, Username: cfg.Username, Password: cfg.Password,
		Keepalive: 300 * time.Second, Timeout: cfg.Timeout, AckBuffer: cfg.Window + 16,
	}, nil)
	if err != nil {
		return fmt.Errorf("publisher connect: %w", err)
	}
	defer c.Close()
	start := time.Now()
	inflight := 0
	for _, topic := range cfg.Topics {
		for cfg.QoS > 0 && inflight >= cfg.Window {
			if _, err := c.NextAck(cfg.Timeout); err != nil {
				return fmt.Errorf("publisher PUBACK: %w", err)
			}
			inflight--
		}
		if _, err := c.Publish(topic, cfg.QoS, cfg.Payload); err != nil {
			return fmt.Errorf("publish %s: %w", topic, err)
		}
		if cfg.QoS > 0 {
			inflight++
		}
	}
	for ; inflight > 0; inflight-- {
		if _, err := c.NextAck(cfg.Timeout); err != nil {
			return fmt.Errorf("publisher PUBACK: %w", err)
		}
	}
	end := time.Now()
	if err := json.NewEncoder(events).Encode(Event{Event: "published", Count: len(cfg.Topics), Live: 1,
		Start: start.UnixNano(), End: end.UnixNano()}); err != nil {
		return err
	}
	return nil
}
