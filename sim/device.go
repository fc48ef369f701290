package sim

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"appliance/fleet"
	"appliance/internal/spread"
)

// device is one simulated device. Everything below the first block is
// touched only by the device's own goroutine (and the counted fields also
// under Sim.mu, by account).
type device struct {
	sim   *Sim
	id    string
	key   string
	fails bool

	order    []int // the servers' indexes in the order this device tries them (spread.Order)
	pos      int   // the position in order of the server tried next, or connected to
	enrolled bool  // a controller accepted the device at least once
	seen     bool  // a desired document was applied
	version  uint64

	report     []byte // the current reported document; nil before the first
	reportDep  string
	reportCode int
	sentOnConn bool // report was published on the current connection

	nextID      uint16
	pendingID   uint16 // the report awaiting its PUBACK; 0 when none
	pendingDep  string
	pendingCode int

	counted     bool // Sim.byDeployment counts this device under countedDep
	countedDep  string
	countedCode int

	tel telemetry // upstream messages (telemetry.go)
}

// subscribeID is the packet id of the one SUBSCRIBE of a connection;
// reports use the others.
const subscribeID = 1

// conn is one MQTT connection of a device.
type conn struct {
	nc net.Conn
	br *bufio.Reader
}

// run connects and reconnects, with jittered exponential backoff, until
// ctx ends.
func (d *device) run(ctx context.Context) {
	s := d.sim
	attempt := 0
	for {
		if sleep(ctx, spread.Backoff(s.cfg.ReconnectMin, s.cfg.ReconnectMax, attempt)) != nil {
			return
		}
		if s.pace.wait(ctx) != nil {
			return
		}
		c, err := d.connect(ctx, d.order[d.pos])
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.connectFailed(d, err)
			d.pos = (d.pos + 1) % len(d.order)
			attempt++
			continue
		}
		err = d.serveAll(ctx, c)
		if ctx.Err() != nil {
			return
		}
		s.disconnects.Add(1)
		s.log.Debug("connection lost; reconnecting", "device", d.id, "err", err)
		d.pos = (d.pos + 1) % len(d.order)
		// A dropped connection waits a little before the next attempt, so
		// that a controller restart is not met by the whole fleet at once.
		attempt = 1
	}
}

// serveAll serves c and, when the device returns to its preferred server,
// the connection that replaced it, until one is lost or ctx ends.
func (d *device) serveAll(ctx context.Context, c *conn) error {
	for {
		next, err := d.serve(ctx, c)
		c.nc.Close()
		if next == nil {
			return err
		}
		c, d.pos = next, 0
		d.sim.returns.Add(1)
	}
}

// connect dials, sends CONNECT, waits for the CONNACK and sends the
// SUBSCRIBE to the desired topic.
func (d *device) connect(ctx context.Context, server int) (*conn, error) {
	s := d.sim
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-s.sem }()
	u := s.urls[server]
	dctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	var nc net.Conn
	var err error
	if u.Scheme == "mqtt" || u.Scheme == "tcp" {
		var dl net.Dialer
		nc, err = dl.DialContext(dctx, "tcp", u.Host)
	} else {
		cfg := &tls.Config{}
		if s.cfg.TLS != nil {
			cfg = s.cfg.TLS.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		nc, err = (&tls.Dialer{Config: cfg}).DialContext(dctx, "tcp", u.Host)
	}
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", u.Host, err)
	}
	c := &conn{nc: nc, br: bufio.NewReaderSize(nc, 512)}
	err = d.handshake(ctx, c)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s: %w", u.Host, err)
	}
	return c, nil
}

func (d *device) handshake(ctx context.Context, c *conn) error {
	s := d.sim
	stop := context.AfterFunc(ctx, func() { c.nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c.nc.SetDeadline(time.Now().Add(s.cfg.ConnectTimeout))
	if _, err := c.nc.Write(connectPacket(d.id, d.id, d.key, uint16(s.cfg.KeepAlive/time.Second))); err != nil {
		return fmt.Errorf("send connect: %w", err)
	}
	first, err := c.br.ReadByte()
	if err != nil {
		return fmt.Errorf("read connack: %w", err)
	}
	p, err := readPacket(c.br, first)
	if err != nil {
		return fmt.Errorf("read connack: %w", err)
	}
	if err := parseConnack(p); err != nil {
		return err
	}
	if _, err := c.nc.Write(subscribePacket(subscribeID, fleet.DesiredTopic(d.id), 1)); err != nil {
		return fmt.Errorf("send subscribe: %w", err)
	}
	return ctx.Err()
}

// serve reads packets until the connection fails or ctx ends (then it
// sends DISCONNECT). It pings after KeepAlive/2 without traffic and gives
// up after another KeepAlive/2 without an answer. Connected to another
// server than its preferred one, it checks that one now and then
// (returnCheck); when a connection to it is up, it leaves c and returns
// that connection.
func (d *device) serve(ctx context.Context, c *conn) (*conn, error) {
	s := d.sim
	s.connectionUp(d.order[d.pos])
	defer s.connectionDown(d.order[d.pos])
	if !d.enrolled {
		d.enrolled = true
		s.enrolled.Add(1)
	}
	// Ends a blocked read when ctx ends. The loop sets each deadline
	// before it checks ctx, so the poke cannot be overwritten unseen.
	stop := context.AfterFunc(ctx, func() { c.nc.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	d.pendingID, d.sentOnConn = 0, false
	if err := d.telemetryUp(c); err != nil {
		return nil, err
	}
	var ret returnCheck
	if d.pos != 0 {
		ret.schedule(s, time.Now())
	}
	pinged := false
	for {
		idle := time.Now().Add(s.cfg.KeepAlive / 2)
		c.nc.SetReadDeadline(ret.before(d.telemetryDeadline(idle)))
		if ctx.Err() != nil {
			d.goodbye(c)
			return nil, nil
		}
		first, err := c.br.ReadByte()
		if err != nil {
			if ctx.Err() != nil {
				d.goodbye(c)
				return nil, nil
			}
			var ne net.Error
			timeout := errors.As(err, &ne) && ne.Timeout()
			now := time.Now()
			if timeout && ret.due(now) {
				if next := d.checkPreferred(ctx, &ret, now); next != nil {
					d.goodbye(c)
					return next, nil
				}
				continue
			}
			if timeout && now.Before(idle) {
				// A telemetry tick, not an idle connection.
				if err := d.telemetryTick(c); err != nil {
					return nil, err
				}
				continue
			}
			if timeout && !pinged {
				pinged = true
				if err := d.write(c, pingreqPacket); err != nil {
					return nil, err
				}
				continue
			}
			return nil, fmt.Errorf("read: %w", err)
		}
		pinged = false
		c.nc.SetReadDeadline(time.Now().Add(s.cfg.ConnectTimeout))
		p, err := readPacket(c.br, first)
		if err != nil {
			return nil, err
		}
		if err := d.handle(c, p); err != nil {
			return nil, err
		}
	}
}

// returnCheck schedules a device's checks of its preferred server while
// it is connected to another one.
type returnCheck struct {
	at       time.Time // when the next check is due; zero: none
	checks   int       // checks of this run that found the server away
	reserved bool      // at is a slot of the connection pacer
}

func (r *returnCheck) schedule(s *Sim, now time.Time) {
	r.at, r.reserved = now.Add(spread.Backoff(s.cfg.ReturnMin, s.cfg.ReturnMax, r.checks+1)), false
}

func (r *returnCheck) due(now time.Time) bool { return !r.at.IsZero() && !now.Before(r.at) }

// before is the earlier of t and the next check.
func (r *returnCheck) before(t time.Time) time.Time {
	if !r.at.IsZero() && r.at.Before(t) {
		return r.at
	}
	return t
}

// checkPreferred connects to the device's preferred server when its check
// is due. The attempt takes a slot of the connection pacer like any other
// connection (a returning server is not met by every device at once): the
// first call reserves it and waits for it in the read loop. It returns the
// new connection, or nil and the next check scheduled.
func (d *device) checkPreferred(ctx context.Context, r *returnCheck, now time.Time) *conn {
	s := d.sim
	if !r.reserved {
		if at := s.pace.reserve(); at.After(now) {
			r.at, r.reserved = at, true
			return nil
		}
	}
	next, err := d.connect(ctx, d.order[0])
	if err == nil {
		return next
	}
	s.returnChecks.Add(1)
	s.log.Debug("preferred server not back yet", "device", d.id, "server", s.urls[d.order[0]].Host, "err", err)
	r.checks++
	r.schedule(s, time.Now())
	return nil
}

func (d *device) handle(c *conn, p packet) error {
	switch p.kind {
	case pktSuback:
		if len(p.body) < 3 || p.body[2] >= 0x80 {
			return errors.New("the controller refused the subscription to the desired topic")
		}
		// Report again on every connection, as the agent does: the last
		// report may not have reached the controller. (The desired
		// document may arrive before the SUBACK, its report with it.)
		if d.report != nil && !d.sentOnConn {
			return d.publish(c)
		}
	case pktPublish:
		topic, id, payload, err := parsePublish(p)
		if err != nil {
			return err
		}
		if id != 0 {
			if err := d.write(c, pubackPacket(id)); err != nil {
				return err
			}
		}
		if topic == fleet.DesiredTopic(d.id) {
			return d.onDesired(c, payload)
		}
	case pktPuback:
		id, err := packetID(p)
		if err != nil {
			return err
		}
		if d.telemetryAcked(c, id) {
			return d.telemetryTick(c)
		}
		d.sim.reportsAcked.Add(1)
		if id == d.pendingID {
			d.pendingID = 0
			d.sim.account(d, d.pendingDep, d.pendingCode)
		}
	case pktPingresp:
	default:
		return fmt.Errorf("unexpected packet type %d", p.kind)
	}
	return nil
}

// onDesired applies a desired document with the fake runtime and reports.
// A version not higher than the one applied is ignored (the controller
// sends the current document again on every subscription).
func (d *device) onDesired(c *conn, payload []byte) error {
	s := d.sim
	var doc fleet.DesiredDocument
	if err := json.Unmarshal(payload, &doc); err != nil {
		s.log.Warn("unreadable desired document; ignored", "device", d.id, "err", err)
		return nil
	}
	s.noteDesired(doc.Version, doc.DeploymentID)
	if d.seen && doc.Version <= d.version {
		return nil
	}
	d.seen, d.version = true, doc.Version
	s.record(d.id, doc)
	mods, perr := s.mods.get(doc.ModulesContent)
	rep := buildReport(doc, mods, perr, d.failing(), time.Now())
	b, err := json.Marshal(rep)
	if err != nil {
		return fmt.Errorf("render report: %w", err)
	}
	d.report, d.reportDep, d.reportCode = b, rep.DeploymentID, rep.LastDesiredStatus.Code
	return d.publish(c)
}

// publish sends the current report at QoS 1; its PUBACK moves the device
// in the counts. A newer report supersedes one still awaiting its PUBACK.
func (d *device) publish(c *conn) error {
	d.nextID++
	if d.nextID <= subscribeID {
		d.nextID = subscribeID + 1
	}
	if err := d.write(c, publishPacket(d.nextID, fleet.ReportedTopic(d.id), d.report)); err != nil {
		return err
	}
	d.pendingID, d.pendingDep, d.pendingCode = d.nextID, d.reportDep, d.reportCode
	d.sentOnConn = true
	d.sim.reportsSent.Add(1)
	return nil
}

func (d *device) write(c *conn, b []byte) error {
	c.nc.SetWriteDeadline(time.Now().Add(d.sim.cfg.ConnectTimeout))
	if _, err := c.nc.Write(b); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// goodbye ends the session politely, without waiting long.
func (d *device) goodbye(c *conn) {
	c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.nc.Write(disconnectPacket)
}

// failing tells, per module image, whether the device fails it.
func (d *device) failing() func(image string) bool {
	return func(image string) bool {
		return d.fails && (d.sim.cfg.FailImage == "" || strings.Contains(image, d.sim.cfg.FailImage))
	}
}
