package node

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"appliance/api"
	"appliance/assign"
)

// metrics is the node's Prometheus registry: counters kept as things
// happen, and a collector that reads the rest (broker, raft, deployments)
// at scrape time, so nothing is computed between scrapes.
type metrics struct {
	registry       *prometheus.Registry
	applySeconds   *prometheus.HistogramVec
	requestSeconds *prometheus.HistogramVec
}

func newMetrics(n *Node) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		applySeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "appliance_raft_apply_seconds",
			Help:    "Time from proposing a command to its being committed and applied on this node (the leader).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"command"}),
		requestSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "appliance_api_request_seconds",
			Help:    "Time to answer an operator API request, by route and status code.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"route", "code"}),
	}
	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.applySeconds,
		m.requestSeconds,
		(*nodeCollector)(n),
		&hubCollector{n: n},
	)
	return m
}

func (m *metrics) observeApply(command string, d time.Duration) {
	m.applySeconds.WithLabelValues(command).Observe(d.Seconds())
}

// observeRequest records an API request; pattern is the route ("" when
// none matched, kept as one label so that stray paths cannot grow the
// label set).
func (m *metrics) observeRequest(pattern string, status int, d time.Duration) {
	if pattern == "" {
		pattern = "unmatched"
	}
	m.requestSeconds.WithLabelValues(pattern, strconv.Itoa(status)).Observe(d.Seconds())
}

// nodeCollector reads the node's state at scrape time.
type nodeCollector Node

var (
	descConnected   = prometheus.NewDesc("appliance_devices_connected", "Devices holding an MQTT session with this node.", nil, nil)
	descAuthFail    = prometheus.NewDesc("appliance_mqtt_auth_failures_total", "MQTT connections refused for bad credentials.", nil, nil)
	descACLDenied   = prometheus.NewDesc("appliance_mqtt_acl_denials_total", "Subscriptions and publishes refused by the device ACL.", nil, nil)
	descReports     = prometheus.NewDesc("appliance_reports_total", "Reported documents by outcome: accepted by the broker, throttled (over the device's quota: the latest is accepted later), dropped (malformed, too large, queue full), committed to raft.", []string{"outcome"}, nil)
	descReportBatch = prometheus.NewDesc("appliance_report_batches_total", "Raft entries that carried reports.", nil, nil)
	descDesired     = prometheus.NewDesc("appliance_desired_documents_sent_total", "Desired documents handed to devices' sessions.", nil, nil)
	descPanics      = prometheus.NewDesc("appliance_mqtt_connection_panics_total", "Panics in one client's connection, each closing only that client.", nil, nil)
	descRefusing    = prometheus.NewDesc("appliance_mqtt_refusing_devices", "1 while this node turns devices away because it has had no cluster leader for --shed-devices-after.", nil, nil)
	descRefused     = prometheus.NewDesc("appliance_mqtt_refused_total", "Device connections refused or ended because the node had no cluster leader.", nil, nil)
	descConnRefused = prometheus.NewDesc("appliance_connections_refused_total", "Connections closed at accept because their source address held the most allowed per source, by listener (api, cluster, mqtt; for mqtt: connections not yet authenticated).", []string{"listener"}, nil)
	descConnOpen    = prometheus.NewDesc("appliance_connections_open", "Connections open now, by listener (api, cluster, mqtt).", []string{"listener"}, nil)
	descNoSession   = prometheus.NewDesc("appliance_mqtt_connects_refused_total", "MQTT connections that ended without a session, besides bad credentials and a node without a leader: no_connect (no CONNECT within the connect timeout, TLS failed), protocol (first packet not a valid CONNECT), busy (the broker's connection cap).", []string{"reason"}, nil)
	descThrottled   = prometheus.NewDesc("appliance_mqtt_devices_throttled", "Devices over their report quota now (a report waiting for their budget, or reports over quota in their session).", nil, nil)
	descQuotaCut    = prometheus.NewDesc("appliance_mqtt_quota_disconnects_total", "Devices disconnected because they went on sending reports over their quota.", nil, nil)
	descRaftState   = prometheus.NewDesc("appliance_raft_state", "1 for this node's raft state.", []string{"state"}, nil)
	descApplied     = prometheus.NewDesc("appliance_raft_applied_index", "Index of the last raft entry applied to the state machine.", nil, nil)
	descDeployments = prometheus.NewDesc("appliance_deployment_devices", "Devices of a deployment by status category (targeted, applied, healthy, unhealthy, soaking, unknown; offline and kept beside them; soak 30 s).", []string{"deployment", "category"}, nil)
	descCustom      = prometheus.NewDesc("appliance_deployment_metric_devices", "Devices a deployment's custom metric query counts (only reports about the document each device is assigned now).", []string{"deployment", "metric"}, nil)
	descHistoryLost = prometheus.NewDesc("appliance_history_events_dropped_total", "History events (deployment and assignment changes, for people) this node never wrote: over a million queued while the writer fell behind, or left when a stop's budget ran out. The fleet state is not affected.", nil, nil)
	descSystem      = prometheus.NewDesc("appliance_deployment_system_metric", "Azure's system metrics of a deployment: targetedCount, appliedCount, reportedSuccessfulCount, reportedFailedCount.", []string{"deployment", "metric"}, nil)
)

func (c *nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnected, descAuthFail, descACLDenied, descReports, descReportBatch, descDesired, descPanics, descRefusing, descRefused, descConnRefused, descConnOpen, descNoSession, descThrottled, descQuotaCut, descRaftState, descApplied, descDeployments, descCustom, descSystem, descHistoryLost} {
		ch <- d
	}
}

func (c *nodeCollector) Collect(ch chan<- prometheus.Metric) {
	n := (*Node)(c)
	if n.broker != nil {
		st := n.broker.Stats()
		ch <- prometheus.MustNewConstMetric(descConnected, prometheus.GaugeValue, float64(st.Connections))
		ch <- prometheus.MustNewConstMetric(descAuthFail, prometheus.CounterValue, float64(st.AuthFailures))
		ch <- prometheus.MustNewConstMetric(descACLDenied, prometheus.CounterValue, float64(st.ACLDenials))
		ch <- prometheus.MustNewConstMetric(descReports, prometheus.CounterValue, float64(st.ReportsAccepted), "accepted")
		ch <- prometheus.MustNewConstMetric(descReports, prometheus.CounterValue, float64(st.ReportsDropped), "dropped")
		ch <- prometheus.MustNewConstMetric(descDesired, prometheus.CounterValue, float64(st.DesiredSent))
		ch <- prometheus.MustNewConstMetric(descPanics, prometheus.CounterValue, float64(st.PanicsRecovered))
		refusing := 0.0
		if st.Refusing {
			refusing = 1
		}
		ch <- prometheus.MustNewConstMetric(descRefusing, prometheus.GaugeValue, refusing)
		ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(st.Refused))
		ch <- prometheus.MustNewConstMetric(descConnRefused, prometheus.CounterValue, float64(st.SourceRefused), "mqtt")
		ch <- prometheus.MustNewConstMetric(descConnOpen, prometheus.GaugeValue, float64(st.OpenConns), "mqtt")
		ch <- prometheus.MustNewConstMetric(descNoSession, prometheus.CounterValue, float64(st.NoConnect), "no_connect")
		ch <- prometheus.MustNewConstMetric(descNoSession, prometheus.CounterValue, float64(st.ProtocolErrors), "protocol")
		ch <- prometheus.MustNewConstMetric(descNoSession, prometheus.CounterValue, float64(st.Busy), "busy")
		ch <- prometheus.MustNewConstMetric(descReports, prometheus.CounterValue, float64(st.ReportsThrottled), "throttled")
		ch <- prometheus.MustNewConstMetric(descThrottled, prometheus.GaugeValue, float64(st.DevicesThrottled))
		ch <- prometheus.MustNewConstMetric(descQuotaCut, prometheus.CounterValue, float64(st.QuotaDisconnects))
	}
	if n.apiLn != nil {
		st := n.apiLn.capped.Stats()
		ch <- prometheus.MustNewConstMetric(descConnRefused, prometheus.CounterValue, float64(st.Refused), "api")
		ch <- prometheus.MustNewConstMetric(descConnOpen, prometheus.GaugeValue, float64(st.Open), "api")
	}
	if n.mux != nil {
		st := n.mux.ConnStats()
		ch <- prometheus.MustNewConstMetric(descConnRefused, prometheus.CounterValue, float64(st.Refused), "cluster")
		ch <- prometheus.MustNewConstMetric(descConnOpen, prometheus.GaugeValue, float64(st.Open), "cluster")
	}
	if n.history != nil {
		ch <- prometheus.MustNewConstMetric(descHistoryLost, prometheus.CounterValue, float64(n.history.Dropped()))
	}
	ch <- prometheus.MustNewConstMetric(descReports, prometheus.CounterValue, float64(n.reports.Stats().Committed), "committed")
	ch <- prometheus.MustNewConstMetric(descReportBatch, prometheus.CounterValue, float64(n.reports.Stats().Batches))
	if n.store != nil {
		state := n.store.State()
		for _, s := range []string{"Leader", "Follower", "Candidate", "Shutdown"} {
			v := 0.0
			if s == state {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descRaftState, prometheus.GaugeValue, v, s)
		}
		ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(n.store.AppliedIndex()))
	}
	var ids []string
	n.assign.Read(func(a assign.View) { ids = a.DeploymentIDs() })
	for _, id := range ids {
		// The same derivation as GET /deployments/{id}/status, one page
		// of ids only: the counts are what a scrape needs.
		st, err := (*backend)(n).DeploymentStatus(context.Background(), id, api.StatusQuery{Limit: 1})
		if err != nil {
			continue
		}
		for cat, v := range map[string]int{
			api.CategoryTargeted: st.Counts.Targeted, api.CategoryApplied: st.Counts.Applied,
			api.CategoryHealthy: st.Counts.Healthy, api.CategoryUnhealthy: st.Counts.Unhealthy,
			api.CategorySoaking: st.Counts.Soaking, api.CategoryUnknown: st.Counts.Unknown,
			api.CategoryOffline: st.Counts.Offline, api.CategoryKept: st.Counts.Kept,
		} {
			ch <- prometheus.MustNewConstMetric(descDeployments, prometheus.GaugeValue, float64(v), id, cat)
		}
		for name, v := range st.Metrics {
			ch <- prometheus.MustNewConstMetric(descCustom, prometheus.GaugeValue, float64(v), id, name)
		}
		for name, v := range st.SystemMetrics {
			ch <- prometheus.MustNewConstMetric(descSystem, prometheus.GaugeValue, float64(v), id, name)
		}
	}
}
