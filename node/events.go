package node

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"sync"
	"time"
	"unicode/utf8"

	"appliance/api"
	"appliance/northbound"
	"appliance/raftstore"
)

// The live tail of upstream messages (appliance events tail): each node
// keeps what its own devices sent, so the node answering streams its own
// and asks every peer for theirs over the cluster port (eventsTailPath),
// merged as they come.

const eventsTailPath = "/cluster/v1/events"

// peerTailRetry is how often a peer whose stream failed is asked again.
const peerTailRetry = 5 * time.Second

func (b *backend) TailEvents(ctx context.Context, f api.EventFilter, fn func(api.EventView) error) error {
	n := b.node()
	if err := n.servingReads(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan api.EventView, 256)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = n.northbound.Tail(ctx, northbound.TailFilter{Device: f.Device, Module: f.Module}, func(m northbound.Message) error {
			select {
			case events <- eventView(n.cfg.NodeID, m):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	if members, err := n.store.Members(ctx); err == nil {
		for _, m := range members {
			if m.ID == n.cfg.NodeID {
				continue
			}
			wg.Add(1)
			go func(m raftstore.Member) {
				defer wg.Done()
				n.tailPeer(ctx, m, f, events)
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
func (n *Node) tailPeer(ctx context.Context, m raftstore.Member, f api.EventFilter, events chan<- api.EventView) {
	q := url.Values{}
	if f.Device != "" {
		q.Set("device", f.Device)
	}
	if f.Module != "" {
		q.Set("module", f.Module)
	}
	path := eventsTailPath + "?" + q.Encode()
	for ctx.Err() == nil {
		body, err := n.peers.Stream(ctx, m.Address, path)
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
		n.logger.Debug("a peer's event tail ended; asking again", "peer", m.ID, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(peerTailRetry):
		}
	}
}

// serveEventsTail streams this node's upstream messages to a peer's tail.
func (n *Node) serveEventsTail(w http.ResponseWriter, r *http.Request) {
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	_ = ctl.Flush()
	f := northbound.TailFilter{Device: r.URL.Query().Get("device"), Module: r.URL.Query().Get("module")}
	_ = n.northbound.Tail(r.Context(), f, func(m northbound.Message) error {
		b, err := json.Marshal(eventView(n.cfg.NodeID, m))
		if err != nil {
			return err
		}
		if _, err := w.Write(append(b, '\n')); err != nil {
			return err
		}
		return ctl.Flush()
	})
}

// eventView is an upstream message as the API shows it.
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
