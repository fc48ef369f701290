// Package eventtail owns the cluster-wide live tail of the devices'
// upstream messages (`appliance events tail`, GET /api/v1/events): each
// node keeps only what its own devices sent (package northbound), so the
// node that answers streams its own and asks every other member for
// theirs over the cluster port (Path), merged as they come; a peer's
// stream that fails (the peer restarting, a partition) is asked again
// every 5 s. It also serves that stream to a peer, and owns how an
// upstream message looks in the API (api.EventView, with the node that
// received it).
//
// It reaches the node's log and its peers through the interfaces it
// declares (Local, Peers); the node implements them. No raft.
package eventtail

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"
	"unicode/utf8"

	"appliance/api"
	"appliance/northbound"
	"appliance/raftstore"
)

// Path is the cluster port's stream of a node's upstream messages (node
// certificates only).
const Path = "/cluster/v1/events"

// peerRetry is how often a peer whose stream failed is asked again.
const peerRetry = 5 * time.Second

// Local is this node's log of upstream messages (northbound.Server).
type Local interface {
	Tail(ctx context.Context, f northbound.TailFilter, fn func(northbound.Message) error) error
}

// Peers is the other members as a tail sees them.
type Peers interface {
	// Members lists the cluster's members and their cluster-port
	// addresses.
	Members(ctx context.Context) ([]raftstore.Member, error)
	// Stream opens a GET of path on a member's cluster port.
	Stream(ctx context.Context, addr, path string) (io.ReadCloser, error)
}

// Config is what a Tailer works with.
type Config struct {
	// NodeID is this node's id: its own messages say it, and it is not
	// asked as a peer.
	NodeID string
	Local  Local
	Peers  Peers
	// Ready is nil while the node serves reads, or why it does not (an
	// api error class); nil means always.
	Ready func() error
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Tailer streams the cluster's upstream messages.
type Tailer struct{ cfg Config }

// New returns a Tailer.
func New(cfg Config) *Tailer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Ready == nil {
		cfg.Ready = func() error { return nil }
	}
	return &Tailer{cfg: cfg}
}

// Tail hands fn every upstream message the filter matches, this node's
// and its peers', as they come, until ctx ends or fn fails
// (api.HubBackend's TailEvents).
func (t *Tailer) Tail(ctx context.Context, f api.EventFilter, fn func(api.EventView) error) error {
	if err := t.cfg.Ready(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan api.EventView, 256)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = t.cfg.Local.Tail(ctx, northbound.TailFilter{Device: f.Device, Module: f.Module}, func(m northbound.Message) error {
			select {
			case events <- eventView(t.cfg.NodeID, m):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	if members, err := t.cfg.Peers.Members(ctx); err == nil {
		for _, m := range members {
			if m.ID == t.cfg.NodeID {
				continue
			}
			wg.Add(1)
			go func(m raftstore.Member) {
				defer wg.Done()
				t.tailPeer(ctx, m, f, events)
			}(m)
		}
	}
	defer wg.Wait()
	for {
		select {
		case ev := <-events:
			if err := fn(ev); err != nil {
				return err
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// tailPeer streams a peer's messages into events until ctx ends, asking
// again after a failure (the peer restarting, a partition).
func (t *Tailer) tailPeer(ctx context.Context, m raftstore.Member, f api.EventFilter, events chan<- api.EventView) {
	q := url.Values{}
	if f.Device != "" {
		q.Set("device", f.Device)
	}
	if f.Module != "" {
		q.Set("module", f.Module)
	}
	path := Path + "?" + q.Encode()
	for ctx.Err() == nil {
		body, err := t.cfg.Peers.Stream(ctx, m.Address, path)
		if err == nil {
			sc := bufio.NewScanner(body)
			sc.Buffer(make([]byte, 64<<10), 4<<20)
			for sc.Scan() {
				var ev api.EventView
				if len(sc.Bytes()) == 0 || json.Unmarshal(sc.Bytes(), &ev) != nil {
					continue
				}
				select {
				case events <- ev:
				case <-ctx.Done():
				}
			}
			body.Close()
		}
		if ctx.Err() != nil {
			return
		}
		t.cfg.Logger.Debug("a peer's event tail ended; asking again", "peer", m.ID, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(peerRetry):
		}
	}
}

// ServePeer streams this node's upstream messages to a peer's tail
// (Path), one JSON object a line.
func (t *Tailer) ServePeer(w http.ResponseWriter, r *http.Request) {
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	_ = ctl.Flush()
	f := northbound.TailFilter{Device: r.URL.Query().Get("device"), Module: r.URL.Query().Get("module")}
	_ = t.cfg.Local.Tail(r.Context(), f, func(m northbound.Message) error {
		b, err := json.Marshal(eventView(t.cfg.NodeID, m))
		if err != nil {
			return err
		}
		if _, err := w.Write(append(b, '\n')); err != nil {
			return err
		}
		return ctl.Flush()
	})
}

// eventView is an upstream message as the API shows it, received by node: a
// body that is not UTF-8 is sent in base64, and says so.
func eventView(node string, m northbound.Message) api.EventView {
	ev := api.EventView{Node: node, Offset: m.Offset, ReceivedTimeUTC: m.Received, DeviceID: m.DeviceID, ModuleID: m.Module,
		OutputName: m.Output, SequenceNumber: m.Seq, EnqueuedTimeUTC: m.EnqueuedTime}
	if len(m.Properties) > 0 {
		ev.Properties = map[string]string{}
		for _, p := range m.Properties {
			ev.Properties[p.Name] = p.Value
		}
	}
	if len(m.SystemProperties) > 0 {
		ev.SystemProperties = map[string]string{}
		for _, p := range m.SystemProperties {
			ev.SystemProperties[p.Name] = p.Value
		}
	}
	if utf8.Valid(m.Body) {
		ev.Body = string(m.Body)
	} else {
		ev.Body, ev.BodyEncoding = base64.StdEncoding.EncodeToString(m.Body), "base64"
	}
	return ev
}
