package stats

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Process holds the master-level values exported beside the connection
// counters.
type Process struct {
	Workers        int
	WorkerRestarts uint64
	ReloadsOK      uint64
	ReloadsFailed  uint64
	// WorkerActive is each live worker's open connections, by slot.
	WorkerActive []int64
}

// Backend is one pool backend's values for the sniproxy_backend_* metrics:
// its labels (the route's match and the backend's host:port, from the
// config), whether it is up, the connections made to it and open now, and
// how often its state changed.
type Backend struct {
	Route, Backend string
	Up             bool
	Connections    uint64
	Active         int64
	Changes        uint64
}

// Collector exports totals as SPEC's sniproxy_* metrics. It reads them at
// scrape time through its functions, which must be safe for concurrent use.
type Collector struct {
	totals  func() Snapshot
	process func() Process
	// Backends, when not nil, returns the pool backends for the
	// sniproxy_backend_* metrics. Set it before the first scrape.
	Backends func() []Backend

	backendUp, backendConns, backendActive, backendChanges *prometheus.Desc

	active, conns, rejected, bytes, connect *prometheus.Desc
	workers, restarts, reloads, buildInfo   *prometheus.Desc
	workerActive                            *prometheus.Desc
	version, goVersion                      string
}

// NewCollector returns a Collector over totals and process, labelling
// sniproxy_build_info with version and goVersion.
func NewCollector(totals func() Snapshot, process func() Process, version, goVersion string) *Collector {
	return &Collector{
		totals:  totals,
		process: process,
		active: prometheus.NewDesc("sniproxy_connections_active",
			"Client connections currently open, in every worker.", nil, nil),
		conns: prometheus.NewDesc("sniproxy_connections_total",
			"Client connections accepted, by recognised protocol.", []string{"protocol"}, nil),
		rejected: prometheus.NewDesc("sniproxy_connections_rejected_total",
			"Client connections closed without being proxied, by reason.", []string{"reason"}, nil),
		bytes: prometheus.NewDesc("sniproxy_bytes_total",
			"Bytes proxied: in is client to backend (peeked bytes included), out is backend to client.", []string{"direction"}, nil),
		connect: prometheus.NewDesc("sniproxy_backend_connect_seconds",
			"Time to connect to a backend, successful dials only.", nil, nil),
		workers: prometheus.NewDesc("sniproxy_workers",
			"Worker processes alive.", nil, nil),
		restarts: prometheus.NewDesc("sniproxy_worker_restarts_total",
			"Workers restarted after dying.", nil, nil),
		reloads: prometheus.NewDesc("sniproxy_reloads_total",
			"Reloads (upgrades) attempted, by result.", []string{"result"}, nil),
		workerActive: prometheus.NewDesc("sniproxy_worker_connections_active",
			"Client connections open in each worker, by worker slot.", []string{"slot"}, nil),
		buildInfo: prometheus.NewDesc("sniproxy_build_info",
			"Always 1; labels say which build runs.", []string{"version", "goversion"}, nil),
		backendUp: prometheus.NewDesc("sniproxy_backend_up",
			"Whether a pool backend is up (1) or down (0), as every worker sees it.", []string{"route", "backend"}, nil),
		backendConns: prometheus.NewDesc("sniproxy_backend_connections_total",
			"Connections made to a pool backend.", []string{"route", "backend"}, nil),
		backendActive: prometheus.NewDesc("sniproxy_backend_connections_active",
			"Connections open to a pool backend.", []string{"route", "backend"}, nil),
		backendChanges: prometheus.NewDesc("sniproxy_backend_state_changes_total",
			"Times a pool backend went up or down.", []string{"route", "backend"}, nil),
		version:   version,
		goVersion: goVersion,
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.active, c.conns, c.rejected, c.bytes, c.connect, c.workers, c.restarts, c.reloads, c.buildInfo, c.workerActive,
		c.backendUp, c.backendConns, c.backendActive, c.backendChanges} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.totals()
	p := c.process()
	ch <- prometheus.MustNewConstMetric(c.active, prometheus.GaugeValue, float64(max(s.Active, 0)))
	for i := range s.Conns {
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.CounterValue, float64(s.Conns[i]), Protocol(i).String())
	}
	for i := range s.Rejected {
		ch <- prometheus.MustNewConstMetric(c.rejected, prometheus.CounterValue, float64(s.Rejected[i]), Reason(i).String())
	}
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.BytesIn), "in")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.BytesOut), "out")
	buckets := make(map[float64]uint64, len(ConnectBuckets))
	var cum uint64
	for i, ub := range ConnectBuckets {
		cum += s.ConnectBuckets[i]
		buckets[ub] = cum
	}
	ch <- prometheus.MustNewConstHistogram(c.connect, s.ConnectCount, float64(s.ConnectNanos)/1e9, buckets)
	ch <- prometheus.MustNewConstMetric(c.workers, prometheus.GaugeValue, float64(p.Workers))
	ch <- prometheus.MustNewConstMetric(c.restarts, prometheus.CounterValue, float64(p.WorkerRestarts))
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(p.ReloadsOK), "ok")
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(p.ReloadsFailed), "failed")
	for slot, n := range p.WorkerActive {
		ch <- prometheus.MustNewConstMetric(c.workerActive, prometheus.GaugeValue, float64(max(n, 0)), strconv.Itoa(slot))
	}
	ch <- prometheus.MustNewConstMetric(c.buildInfo, prometheus.GaugeValue, 1, c.version, c.goVersion)
	if c.Backends == nil {
		return
	}
	for _, b := range c.Backends() {
		up := 0.0
		if b.Up {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(c.backendUp, prometheus.GaugeValue, up, b.Route, b.Backend)
		ch <- prometheus.MustNewConstMetric(c.backendConns, prometheus.CounterValue, float64(b.Connections), b.Route, b.Backend)
		ch <- prometheus.MustNewConstMetric(c.backendActive, prometheus.GaugeValue, float64(max(b.Active, 0)), b.Route, b.Backend)
		ch <- prometheus.MustNewConstMetric(c.backendChanges, prometheus.CounterValue, float64(b.Changes), b.Route, b.Backend)
	}
}
