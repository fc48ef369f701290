package node

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"appliance/api"
	"appliance/broker"
	"appliance/fleet"
	"appliance/internal/fsutil"
	"appliance/northbound"
	"appliance/raftstore"
)

// The controller's side of the device hub: the devices' upstream messages
// kept and served to the factory's consumers (package northbound), the
// consumers' credentials, module twins and direct methods (package
// directmethod, wired in methods.go).

// EventsConfig configures the northbound side of a node.
type EventsConfig struct {
	// Addr is the consumers' MQTT listener; "" serves none (the CLI's
	// default is DefaultEventsAddr). A listener that cannot bind is tried
	// again every few seconds: the node serves everything else meanwhile.
	Addr string
	// Plain serves it without TLS (by default it speaks TLS like the
	// device broker: the node's certificate, or --mqtt-tls-cert's).
	Plain bool
	// Retention bounds the node-local log of upstream messages (defaults:
	// northbound.DefaultRetentionBytes, DefaultRetentionAge).
	RetentionBytes int64
	RetentionAge   time.Duration
	// Limits bound the consumers (zero fields are defaults).
	Limits northbound.Limits
}

// DefaultEventsAddr is the consumers' listener of `appliance serve`.
const DefaultEventsAddr = ":1884"

// EventsAddrFile holds the consumers' listener URL, for local tools.
const EventsAddrFile = "events-url"

// eventsRetryBind is how often a listener that cannot bind is tried again.
const eventsRetryBind = 5 * time.Second

// openNorthbound opens the retention log and the consumers' sessions in
// <data-dir>/events. Nothing listens until startNorthbound.
func (n *Node) openNorthbound(tlsConf *tls.Config) error {
	ec := n.cfg.Events
	cfg := northbound.Config{
		Dir:       filepath.Join(n.cfg.DataDir, "events"),
		Addr:      ec.Addr,
		Auth:      (*consumerAuth)(n),
		Retention: northbound.LogOptions{MaxBytes: ec.RetentionBytes, MaxAge: ec.RetentionAge},
		Limits:    ec.Limits,
		Logger:    n.cfg.Logger.With("node", n.cfg.NodeID),
		Node:      n.cfg.NodeID,
	}
	if !ec.Plain {
		cfg.TLSConfig = tlsConf
	}
	s, err := northbound.Open(cfg)
	if err != nil {
		return err
	}
	n.northbound = s
	return nil
}

// startNorthbound starts the consumers' listener, retrying in the
// background while its address cannot be bound.
func (n *Node) startNorthbound() {
	if n.cfg.Events.Addr == "" {
		return
	}
	try := func() bool {
		if err := n.northbound.Start(); err != nil {
			return false
		}
		url := "mqtts://" + n.northbound.Addr()
		if n.cfg.Events.Plain {
			url = "mqtt://" + n.northbound.Addr()
		}
		if err := fsutil.WriteFileAtomic(filepath.Join(n.cfg.DataDir, EventsAddrFile), []byte(url+"\n"), 0o600); err != nil {
			n.logger.Warn("cannot record the consumers' listener address", "err", err)
		}
		return true
	}
	if try() {
		return
	}
	n.logger.Error("cannot listen for consumers; upstream messages are still kept, and the listener is tried again every 5 s (flag --events-addr)",
		"addr", n.cfg.Events.Addr)
	n.bgDone.Add(1)
	go func() {
		defer n.bgDone.Done()
		for {
			select {
			case <-n.stopCtx.Done():
				return
			case <-time.After(eventsRetryBind):
			}
			if try() {
				n.logger.Info("listening for consumers now", "addr", n.northbound.Addr())
				return
			}
		}
	}()
}

// upstreamSink hands the broker's upstream batches to the northbound
// server.
type upstreamSink Node

var _ broker.UpstreamSink = (*upstreamSink)(nil)

func (u *upstreamSink) SubmitUpstream(ctx context.Context, deviceID string, batch []byte) error {
	err := (*Node)(u).northbound.Ingest(ctx, deviceID, batch)
	if errors.Is(err, northbound.ErrMalformed) {
		return fmt.Errorf("%w: %v", broker.ErrPayloadFormatInvalid, err)
	}
	return err
}

// consumerAuth checks consumers' keys against the replicated digests.
type consumerAuth Node

var errConsumerRefused = errors.New("consumer refused: unknown consumer or wrong key")

func (a *consumerAuth) AuthenticateConsumer(_ context.Context, name, key string) error {
	n := (*Node)(a)
	if n.store == nil || n.servingReads() != nil {
		return errors.New("consumer refused: the node is not ready")
	}
	var want string
	_ = n.store.View(func(r *raftstore.Reader) error {
		if c, err := r.Consumer(name); err == nil {
			want = c.KeyHash
		}
		return nil
	})
	got := fleet.HashKey(key)
	if want == "" || subtle.ConstantTimeCompare([]byte(got), []byte(want)) != 1 {
		return errConsumerRefused
	}
	return nil
}

// consumersChanged ends the connections of deleted consumers, on every
// node as it applies the deletion.
func (n *Node) consumersChanged(changes []raftstore.Change) {
	if n.northbound == nil {
		return
	}
	for _, c := range changes {
		switch c.Kind {
		case raftstore.ConsumerDeleted:
			go n.northbound.DisconnectConsumer(c.ID)
		case raftstore.DeviceDeleted:
			n.northbound.ForgetDevice(c.ID)
		}
	}
}

// CreateConsumer creates a consumer with a fresh key; only the digest
// enters raft, the key is in this answer only.
func (b *backend) CreateConsumer(ctx context.Context, name string) (fleet.Consumer, error) {
	if err := fleet.ValidateConsumerName(name); err != nil {
		return fleet.Consumer{}, err
	}
	key, err := fleet.NewKey()
	if err != nil {
		return fleet.Consumer{}, err
	}
	res, err := b.apply(ctx, raftstore.PutConsumer{Time: now(), Consumer: fleet.Consumer{Name: name, KeyHash: fleet.HashKey(key)}})
	if err != nil {
		return fleet.Consumer{}, err
	}
	c := res.Consumer.Public()
	c.Key = key
	return c, nil
}

func (b *backend) Consumer(ctx context.Context, name string) (fleet.Consumer, error) {
	var c fleet.Consumer
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		var err error
		c, err = r.Consumer(name)
		return err
	})
	return c.Public(), err
}

func (b *backend) Consumers(ctx context.Context) ([]fleet.Consumer, error) {
	out := []fleet.Consumer{}
	err := b.view(ctx, false, func(r *raftstore.Reader) error {
		return r.Consumers(func(c fleet.Consumer) bool {
			out = append(out, c.Public())
			return true
		})
	})
	return out, err
}

func (b *backend) DeleteConsumer(ctx context.Context, name string, opts api.WriteOptions) error {
	_, err := b.apply(ctx, raftstore.DeleteConsumer{Precondition: precondition(opts), Name: name})
	return err
}
