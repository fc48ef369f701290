package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"appliance/fleet"
	"appliance/internal/spread"
)

// session is the agent's MQTT connection to the controller: MQTT 5 through
// autopaho, username = device id = client id, password = device key. It
// subscribes to the device's desired topic on every connection (the broker
// keeps no session and sends the current desired document on subscribe)
// and publishes reported documents at QoS 1.
//
// Failover: the servers are in the device's own order (internal/spread:
// its preferred server first). autopaho tries every server in a round,
// then backs off (jittered and exponential) before the next round.
// AttemptConnection rotates the list so that after a connection drops, the
// next round starts with the server after the one that was lost.
//
// Return: while connected to another server than its preferred one, the
// session checks now and then (Config.ReturnMin, ReturnMax) whether the
// preferred one admits the device again, with a connection of its own
// (TLS, CONNECT, CONNACK, DISCONNECT); when it does, it drops the current
// connection and the next round starts with the preferred server.
type session struct {
	log      *slog.Logger
	urls     []*url.URL
	tlsCfg   *tls.Config
	deviceID string
	key      string
	cfg      Config

	onDesired func([]byte) // must not block
	onUp      func()       // must not block
	// onMethod takes a direct method request; it must not block (nil:
	// requests are not subscribed to).
	onMethod func([]byte)

	cm *autopaho.ConnectionManager

	mu    sync.Mutex
	start int // the server a round of attempts starts with
	// returning: the connection is dropped to move back to urls[0]; the
	// next round starts there.
	returning bool
	dialed    int      // the server last dialled
	current   int      // the server connected to, -1 when none
	conn      net.Conn // the connection last dialled, to drop a silent one
	up        atomic.Bool
	// failures counts failed attempts since the last connection: the first
	// of an outage is a warning, the rest debug, so that a device offline
	// for days does not fill its log.
	failures atomic.Int64
}

// newSession puts urls in the device's order (spread.Order).
func newSession(cfg Config, urls []*url.URL, tlsCfg *tls.Config, onDesired func([]byte), onUp func()) *session {
	hosts := make([]string, len(urls))
	for i, u := range urls {
		hosts[i] = u.Host
	}
	ordered := make([]*url.URL, 0, len(urls))
	for _, i := range spread.Order(cfg.DeviceID, hosts) {
		ordered = append(ordered, urls[i])
	}
	return &session{
		log:       cfg.Logger,
		urls:      ordered,
		tlsCfg:    tlsCfg,
		deviceID:  cfg.DeviceID,
		key:       cfg.DeviceKey,
		cfg:       cfg,
		onDesired: onDesired,
		onUp:      onUp,
		current:   -1,
	}
}

// run starts connecting in the background; it returns at once.
func (s *session) run(ctx context.Context) error {
	desiredTopic := fleet.DesiredTopic(s.deviceID)
	methodsTopic := fleet.MethodsTopic(s.deviceID)
	cc := autopaho.ClientConfig{
		ServerUrls:     s.urls,
		TlsCfg:         s.tlsCfg,
		KeepAlive:      uint16(s.cfg.KeepAlive / time.Second),
		ConnectTimeout: s.cfg.ConnectTimeout,
		ReconnectBackoff: func(attempt int) time.Duration {
			return spread.Backoff(s.cfg.ReconnectMin, s.cfg.ReconnectMax, attempt)
		},
		ConnectUsername: s.deviceID,
		ConnectPassword: []byte(s.key),
		// The broker keeps no session: start clean every time and
		// subscribe again.
		ConnectPacketBuilder: func(cp *paho.Connect, _ *url.URL) (*paho.Connect, error) {
			cp.CleanStart = true
			return cp, nil
		},
		AttemptConnection: s.dial,
		OnConnectionUp: func(cm *autopaho.ConnectionManager, _ *paho.Connack) {
			s.mu.Lock()
			s.current = s.dialed
			server := s.urls[s.current].Host
			s.mu.Unlock()
			s.up.Store(true)
			s.log.Info("connected to controller", "server", server, "failedAttempts", s.failures.Swap(0))
			go s.subscribe(ctx, cm, desiredTopic)
			if s.onMethod != nil {
				go s.subscribe(ctx, cm, methodsTopic)
			}
			s.onUp()
		},
		OnConnectionDown: func() bool {
			s.up.Store(false)
			s.mu.Lock()
			lost, returning := s.current, s.returning
			switch {
			case returning:
				s.start, s.returning = 0, false
			case lost >= 0:
				s.start = (lost + 1) % len(s.urls)
			}
			s.current = -1
			s.mu.Unlock()
			if ctx.Err() == nil && lost >= 0 && !returning {
				s.log.Warn("connection to controller lost; reconnecting", "server", s.urls[lost].Host)
			}
			return true
		},
		OnConnectError: func(err error) {
			if ctx.Err() != nil {
				return
			}
			if n := s.failures.Add(1); n == 1 {
				s.log.Warn("cannot connect to controller; retrying with backoff", "err", err)
			} else {
				s.log.Debug("cannot connect to controller", "err", err, "attempt", n)
			}
		},
		ClientConfig: paho.ClientConfig{
			ClientID: s.deviceID,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){
				func(pr paho.PublishReceived) (bool, error) {
					switch {
					case pr.Packet.Topic == desiredTopic:
						s.onDesired(append([]byte(nil), pr.Packet.Payload...))
					case pr.Packet.Topic == methodsTopic && s.onMethod != nil:
						s.onMethod(append([]byte(nil), pr.Packet.Payload...))
					default:
						return false, nil
					}
					return true, nil
				},
			},
		},
	}
	cm, err := autopaho.NewConnection(ctx, cc)
	if err != nil {
		return fmt.Errorf("mqtt session: %w", err)
	}
	s.cm = cm
	if len(s.urls) > 1 {
		go s.returnLoop(ctx)
	}
	return nil
}

// returnLoop moves the session back to its preferred server (urls[0])
// once that admits the device again. Checks wait a jittered, doubling
// time (ReturnMin, doubling up to ReturnMax) while the preferred server
// stays away, so that a fleet that fell over at one moment returns spread
// out, not all at once.
func (s *session) returnLoop(ctx context.Context) {
	checks := 0
	for {
		t := time.NewTimer(spread.Backoff(s.cfg.ReturnMin, s.cfg.ReturnMax, checks+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		s.mu.Lock()
		away := s.current > 0
		s.mu.Unlock()
		if !away {
			checks = 0
			continue
		}
		if err := s.check(ctx, s.urls[0]); err != nil {
			checks++
			s.log.Debug("preferred controller not back yet", "server", s.urls[0].Host, "err", err, "checks", checks)
			continue
		}
		checks = 0
		s.mu.Lock()
		cur, c := s.current, s.conn
		if cur > 0 && c != nil {
			s.returning = true
		}
		s.mu.Unlock()
		if cur > 0 && c != nil {
			s.log.Info("preferred controller admits the device again; moving back to it", "server", s.urls[0].Host, "from", s.urls[cur].Host)
			c.Close()
		}
	}
}

// check connects to u as the session does and disconnects at once: nil
// when the server admitted the device.
func (s *session) check(ctx context.Context, u *url.URL) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	conn, err := s.dialURL(ctx, u)
	if err != nil {
		return err
	}
	defer conn.Close()
	c := paho.NewClient(paho.ClientConfig{ClientID: s.deviceID, Conn: conn})
	ack, err := c.Connect(ctx, &paho.Connect{
		ClientID: s.deviceID, CleanStart: true, KeepAlive: uint16(s.cfg.KeepAlive / time.Second),
		UsernameFlag: true, Username: s.deviceID, PasswordFlag: true, Password: []byte(s.key),
	})
	if err != nil {
		return fmt.Errorf("connect %s: %w", u.Host, err)
	}
	if ack.ReasonCode >= 0x80 {
		return fmt.Errorf("connect %s: refused, reason %#x", u.Host, ack.ReasonCode)
	}
	_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	return nil
}

// dial connects to the server that takes u's place in the rotated list.
func (s *session) dial(ctx context.Context, _ autopaho.ClientConfig, u *url.URL) (net.Conn, error) {
	i := 0
	for j, v := range s.urls {
		if v == u {
			i = j
		}
	}
	s.mu.Lock()
	idx := (s.start + i) % len(s.urls)
	s.dialed = idx
	s.mu.Unlock()
	target := s.urls[idx]
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	conn, err := s.dialURL(ctx, target)
	if err != nil {
		return nil, err
	}
	s.setConn(conn)
	if target.Scheme == "mqtts" {
		return packets.NewThreadSafeConn(conn), nil
	}
	return conn, nil
}

// dialURL opens a TCP connection to u, with TLS for mqtts.
func (s *session) dialURL(ctx context.Context, u *url.URL) (net.Conn, error) {
	if u.Scheme == "mqtts" {
		cfg := s.tlsCfg.Clone()
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", u.Host, err)
		}
		return conn, nil
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", u.Host, err)
	}
	return conn, nil
}

func (s *session) setConn(c net.Conn) {
	s.mu.Lock()
	s.conn = c
	s.mu.Unlock()
}

// dropSilent closes the current connection when the controller stopped
// answering: a controller cut off by the network sends no reset, and the
// MQTT keepalive would take up to 1.5 keepalives to notice, while the
// device could already be talking to another node.
func (s *session) dropSilent(reason string) {
	s.mu.Lock()
	c, cur := s.conn, s.current
	s.mu.Unlock()
	if c == nil || cur < 0 {
		return
	}
	s.log.Warn("controller stopped answering; trying the next one", "server", s.urls[cur].Host, "reason", reason)
	c.Close()
}

func (s *session) subscribe(ctx context.Context, cm *autopaho.ConnectionManager, topic string) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	suback, err := cm.Subscribe(ctx, &paho.Subscribe{
		Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}},
	})
	if err != nil {
		s.log.Warn("subscribe to desired topic", "err", err)
		return
	}
	if len(suback.Reasons) > 0 && suback.Reasons[0] >= 0x80 {
		s.log.Error("controller refused a subscription", "topic", topic, "reason", suback.Reasons[0])
	}
}

// connected tells whether a connection is up.
func (s *session) connected() bool { return s.up.Load() }

// publish sends a reported document at QoS 1 and waits for its PUBACK.
func (s *session) publish(parent context.Context, payload []byte) error {
	return s.publishTo(parent, fleet.ReportedTopic(s.deviceID), payload)
}

// errControllerDown: no connection to a controller now.
var errControllerDown = autopaho.ConnectionDownError

// publishTo sends payload on topic at QoS 1 and waits for its PUBACK.
func (s *session) publishTo(parent context.Context, topic string, payload []byte) error {
	if s.cm == nil {
		return errControllerDown
	}
	ctx, cancel := context.WithTimeout(parent, s.cfg.ConnectTimeout)
	defer cancel()
	res, err := s.cm.Publish(ctx, &paho.Publish{QoS: 1, Topic: topic, Payload: payload})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && parent.Err() == nil && s.connected() {
			s.dropSilent(fmt.Sprintf("no acknowledgement within %s", s.cfg.ConnectTimeout))
		}
		return err
	}
	if res != nil && res.ReasonCode >= 0x80 {
		return fmt.Errorf("controller refused the message on %s: reason %#x", topic, res.ReasonCode)
	}
	return nil
}

// close disconnects and waits for the connection manager to finish.
func (s *session) close(ctx context.Context) {
	if s.cm == nil {
		return
	}
	_ = s.cm.Disconnect(ctx)
}
