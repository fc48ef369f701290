package node

import (
	"encoding/json"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"appliance/fleet"
	"appliance/raftstore"
)

// hubCollector exposes the northbound side and the device hubs' own
// counters on /metrics, read at scrape time.
type hubCollector struct {
	n *Node

	// The sum of what the devices' hubs last reported, recomputed at most
	// every deviceHubsTTL (it reads every report).
	mu      sync.Mutex
	at      time.Time
	devices deviceHubTotals
}

type deviceHubTotals struct {
	queued, expired, dropped float64
	hubs                     int
}

const deviceHubsTTL = 15 * time.Second

var (
	descEventsIn       = prometheus.NewDesc("appliance_events_messages_in_total", "Upstream messages devices sent to this node and it stored in its retention log (duplicates of a batch sent again not included).", nil, nil)
	descEventsDup      = prometheus.NewDesc("appliance_events_duplicates_total", "Upstream messages received again (a batch resent after a lost acknowledgement) and not stored twice.", nil, nil)
	descEventsBatches  = prometheus.NewDesc("appliance_events_batches_total", "Upstream batches by outcome: stored, or refused (malformed, or not stored: the device sends it again).", []string{"outcome"}, nil)
	descEventsOut      = prometheus.NewDesc("appliance_events_messages_out_total", "Upstream messages written to consumers (a message sent again counts again).", nil, nil)
	descEventsRetained = prometheus.NewDesc("appliance_events_messages_retained", "Upstream messages in this node's retention log now.", nil, nil)
	descEventsBytes    = prometheus.NewDesc("appliance_events_retained_bytes", "Bytes of this node's retention log now.", nil, nil)
	descEventsDropped  = prometheus.NewDesc("appliance_events_messages_dropped_total", "Upstream messages a consumer's session was to get and will not, by reason: retention (deleted before it read them: away or slower than --events-retention-bytes/-age), corrupt (damaged on disk), too_large (over the consumer's maximum packet size).", []string{"reason"}, nil)
	descEventsConns    = prometheus.NewDesc("appliance_events_consumer_connections", "Consumer connections to this node's northbound listener now.", nil, nil)
	descEventsSessions = prometheus.NewDesc("appliance_events_consumer_sessions", "Consumer sessions this node keeps (connected, or persistent and away).", nil, nil)
	descEventsRefused  = prometheus.NewDesc("appliance_events_consumer_refused_total", "Consumer connections refused: bad credentials, or a cap.", []string{"reason"}, nil)
	descMethods        = prometheus.NewDesc("appliance_direct_methods_total", "Direct method requests written to this node's devices, and responses received from them.", []string{"direction"}, nil)
	descDeviceHubs     = prometheus.NewDesc("appliance_device_hub_messages", "The devices' hubs' message counts as last reported, summed over the fleet: queued (waiting in store-and-forward), expired (past their time to live) and dropped (oldest dropped when a device's store was full) since each agent started.", []string{"state"}, nil)
)

func (c *hubCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descEventsIn, descEventsDup, descEventsBatches, descEventsOut, descEventsRetained, descEventsBytes,
		descEventsDropped, descEventsConns, descEventsSessions, descEventsRefused, descMethods, descDeviceHubs} {
		ch <- d
	}
}

func (c *hubCollector) Collect(ch chan<- prometheus.Metric) {
	n := c.n
	if nb := n.northbound; nb != nil {
		st := nb.Stats()
		counter := func(d *prometheus.Desc, v uint64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
		}
		gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
		counter(descEventsIn, st.In)
		counter(descEventsDup, st.Duplicates)
		counter(descEventsBatches, st.BatchesIn, "stored")
		counter(descEventsBatches, st.BatchesRefused, "refused")
		counter(descEventsOut, st.Out)
		gauge(descEventsRetained, float64(st.RetainedMessages))
		gauge(descEventsBytes, float64(st.RetainedBytes))
		counter(descEventsDropped, st.DroppedRetention, "retention")
		counter(descEventsDropped, st.DroppedCorrupt, "corrupt")
		counter(descEventsDropped, st.DroppedTooLarge, "too_large")
		gauge(descEventsConns, float64(st.Connections))
		gauge(descEventsSessions, float64(st.Sessions))
		counter(descEventsRefused, st.AuthFailures, "credentials")
		counter(descEventsRefused, st.Refused, "cap")
	}
	if n.broker != nil {
		st := n.broker.Stats()
		ch <- prometheus.MustNewConstMetric(descMethods, prometheus.CounterValue, float64(st.MethodsSent), "request")
		ch <- prometheus.MustNewConstMetric(descMethods, prometheus.CounterValue, float64(st.MethodResponses), "response")
	}
	if t, ok := c.deviceHubs(); ok {
		ch <- prometheus.MustNewConstMetric(descDeviceHubs, prometheus.GaugeValue, t.queued, "queued")
		ch <- prometheus.MustNewConstMetric(descDeviceHubs, prometheus.GaugeValue, t.expired, "expired")
		ch <- prometheus.MustNewConstMetric(descDeviceHubs, prometheus.GaugeValue, t.dropped, "dropped")
	}
}

// deviceHubs sums the hub counters of every device's last report.
func (c *hubCollector) deviceHubs() (deviceHubTotals, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.at) < deviceHubsTTL {
		return c.devices, c.devices.hubs > 0
	}
	n := c.n
	if n.store == nil || n.servingReads() != nil {
		return deviceHubTotals{}, false
	}
	var t deviceHubTotals
	_ = n.store.View(func(r *raftstore.Reader) error {
		return r.Reports(func(_ string, rep raftstore.StoredReport) bool {
			var doc struct {
				Hub *fleet.HubStatus `json:"hub"`
			}
			if json.Unmarshal(rep.Document, &doc) == nil && doc.Hub != nil {
				t.hubs++
				t.queued += float64(doc.Hub.Queued)
				t.expired += float64(doc.Hub.Expired)
				t.dropped += float64(doc.Hub.Dropped)
			}
			return true
		})
	})
	c.devices, c.at = t, time.Now()
	return t, t.hubs > 0
}
