// Package stats holds sniproxy's connection counters: lock-free counters a
// worker updates on its hot path, plain snapshots of them that can be
// subtracted (deltas, pushed from workers) and added (totals, owned by
// whoever serves /metrics), and a Prometheus collector over such totals.
//
// Label values are fixed enumerations (protocol, reason, direction): no
// client-chosen string ever becomes a label.
package stats

import (
	"sync/atomic"
	"time"
)

// Reason is why a connection was closed without being proxied. Its String
// is the value of the "reason" label.
type Reason uint8

// The rejection reasons of SPEC's sniproxy_connections_rejected_total. New
// reasons go last: a successor decodes its predecessor's counters (JSON
// arrays over the state socket) by position.
const (
	Limit Reason = iota
	Denied
	NoRoute
	SniffTimeout
	SniffError
	DialError
	// ProxyHeader: a listener with accept_proxy_protocol got no valid PROXY
	// header in time, or a connection from a source not in trusted_proxies.
	ProxyHeader
	// PerIPLimit: over limits.per_ip_connections or limits.per_ip_rate.
	PerIPLimit
	NumReasons
)

var reasonNames = [NumReasons]string{"limit", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error", "proxy_header", "per_ip_limit"}

// String returns the metric label value of r.
func (r Reason) String() string {
	if r < NumReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Protocol is what a connection was recognised as. Its String is the value
// of the "protocol" label. The zero value is ProtoUnknown.
type Protocol uint8

// The protocols of SPEC's sniproxy_connections_total.
const (
	ProtoUnknown Protocol = iota
	ProtoTLS
	ProtoHTTP
	ProtoH2C
	// NumProtocols is the number of protocols counted.
	NumProtocols
)

var protocolNames = [NumProtocols]string{"unknown", "tls", "http", "h2c"}

// String returns the metric label value of p.
func (p Protocol) String() string {
	if p < NumProtocols {
		return protocolNames[p]
	}
	return "unknown"
}

// ConnectBuckets are the upper bounds, in seconds, of the
// sniproxy_backend_connect_seconds histogram.
var ConnectBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// Snapshot is a plain copy of counter values. As a delta or total, Active is
// the change in (or number of) active connections.
type Snapshot struct {
	Active   int64
	Conns    [NumProtocols]uint64
	Rejected [NumReasons]uint64
	BytesIn  uint64
	BytesOut uint64
	// ConnectBuckets counts backend connect durations per bucket (not
	// cumulative); the last element counts those above every bound.
	ConnectBuckets [len(ConnectBuckets) + 1]uint64
	ConnectCount   uint64
	ConnectNanos   uint64
}

// Add adds d to s.
func (s *Snapshot) Add(d Snapshot) {
	s.Active += d.Active
	for i := range s.Conns {
		s.Conns[i] += d.Conns[i]
	}
	for i := range s.Rejected {
		s.Rejected[i] += d.Rejected[i]
	}
	s.BytesIn += d.BytesIn
	s.BytesOut += d.BytesOut
	for i := range s.ConnectBuckets {
		s.ConnectBuckets[i] += d.ConnectBuckets[i]
	}
	s.ConnectCount += d.ConnectCount
	s.ConnectNanos += d.ConnectNanos
}

// Sub returns s - prev: what happened between two snapshots of the same
// counters.
func (s Snapshot) Sub(prev Snapshot) Snapshot {
	d := s
	d.Active -= prev.Active
	for i := range d.Conns {
		d.Conns[i] -= prev.Conns[i]
	}
	for i := range d.Rejected {
		d.Rejected[i] -= prev.Rejected[i]
	}
	d.BytesIn -= prev.BytesIn
	d.BytesOut -= prev.BytesOut
	for i := range d.ConnectBuckets {
		d.ConnectBuckets[i] -= prev.ConnectBuckets[i]
	}
	d.ConnectCount -= prev.ConnectCount
	d.ConnectNanos -= prev.ConnectNanos
	return d
}

// Counters are the live counters of one worker. The zero value is ready;
// every method is safe for concurrent use and does not allocate.
type Counters struct {
	active         atomic.Int64
	conns          [NumProtocols]atomic.Uint64
	rejected       [NumReasons]atomic.Uint64
	bytesIn        atomic.Uint64
	bytesOut       atomic.Uint64
	connectBuckets [len(ConnectBuckets) + 1]atomic.Uint64
	connectCount   atomic.Uint64
	connectNanos   atomic.Uint64
}

// Opened counts a connection that became active.
func (c *Counters) Opened() { c.active.Add(1) }

// Closed counts an active connection that ended.
func (c *Counters) Closed() { c.active.Add(-1) }

// Active returns the number of active connections.
func (c *Counters) Active() int64 { return c.active.Load() }

// Protocol counts a connection recognised as p.
func (c *Counters) Protocol(p Protocol) {
	if p >= NumProtocols {
		p = ProtoUnknown
	}
	c.conns[p].Add(1)
}

// Rejected counts a connection refused for reason r.
func (c *Counters) Rejected(r Reason) {
	if r < NumReasons {
		c.rejected[r].Add(1)
	}
}

// Bytes counts bytes proxied client to backend (in) and back (out).
func (c *Counters) Bytes(in, out int64) {
	if in > 0 {
		c.bytesIn.Add(uint64(in))
	}
	if out > 0 {
		c.bytesOut.Add(uint64(out))
	}
}

// BackendConnect observes how long connecting to a backend took.
func (c *Counters) BackendConnect(d time.Duration) {
	sec := d.Seconds()
	i := 0
	for i < len(ConnectBuckets) && sec > ConnectBuckets[i] {
		i++
	}
	c.connectBuckets[i].Add(1)
	c.connectCount.Add(1)
	if d > 0 {
		c.connectNanos.Add(uint64(d))
	}
}

// Snapshot returns the current values. Fields are read one by one, so a
// snapshot taken while connections run may be off by the events in flight;
// successive snapshots never go backwards.
func (c *Counters) Snapshot() Snapshot {
	var s Snapshot
	s.Active = c.active.Load()
	for i := range s.Conns {
		s.Conns[i] = c.conns[i].Load()
	}
	for i := range s.Rejected {
		s.Rejected[i] = c.rejected[i].Load()
	}
	s.BytesIn = c.bytesIn.Load()
	s.BytesOut = c.bytesOut.Load()
	for i := range s.ConnectBuckets {
		s.ConnectBuckets[i] = c.connectBuckets[i].Load()
	}
	s.ConnectCount = c.connectCount.Load()
	s.ConnectNanos = c.connectNanos.Load()
	return s
}
