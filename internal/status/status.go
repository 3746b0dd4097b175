// Package status is the data model of a running master's status: what the
// control socket's GET /status and the metrics address's GET /status.json
// answer, what `sniproxy status` prints and what the status page shows. It
// holds plain values and a History of counter samples from which rates are
// computed; it does no I/O.
package status

import (
	"maps"
	"time"
)

// Status is a master's view of itself and its workers at one moment.
type Status struct {
	PID           int       `json:"pid"`
	Generation    int       `json:"generation"`
	Version       string    `json:"version"`
	GoVersion     string    `json:"go_version,omitempty"`
	Config        string    `json:"config"`
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	// Stopping is true from the moment a stop began.
	Stopping bool     `json:"stopping,omitempty"`
	Workers  []Worker `json:"workers"`
	// Restarts counts worker restarts, across reloads.
	Restarts uint64 `json:"worker_restarts"`
	Totals   Totals `json:"totals"`
	// Rates are per-second rates over the last minute (or since start).
	Rates  Rates  `json:"rates"`
	Limits Limits `json:"limits"`
	// Reloads are the most recent reloads, newest first.
	Reloads []Reload `json:"reloads"`
	// Backends are the backends of routes with pools, in config order.
	Backends []Backend `json:"backends"`
	// History is a sample of the counters every SampleInterval, oldest
	// first, for charts.
	History []Sample `json:"history"`
}

// Worker describes one worker slot.
type Worker struct {
	Slot     int       `json:"slot"`
	PID      int       `json:"pid"`
	Ready    bool      `json:"ready"`
	Active   int64     `json:"active"`
	Restarts uint64    `json:"restarts"`
	Started  time.Time `json:"started"`
}

// Totals are the cumulative counters.
type Totals struct {
	Active      int64  `json:"active"`
	Connections uint64 `json:"connections"`
	// Protocols counts connections by protocol label (tls, http, h2c,
	// unknown).
	Protocols map[string]uint64 `json:"protocols"`
	// Rejected counts refused connections by reason label.
	Rejected map[string]uint64 `json:"rejected"`
	BytesIn  uint64            `json:"bytes_in"`
	BytesOut uint64            `json:"bytes_out"`
}

// Rates are per-second rates of the cumulative counters.
type Rates struct {
	// WindowSeconds is the time the rates are averaged over; 0 when there
	// is not yet a second sample.
	WindowSeconds float64            `json:"window_seconds"`
	Connections   float64            `json:"connections"`
	Protocols     map[string]float64 `json:"protocols"`
	Rejected      map[string]float64 `json:"rejected"`
	BytesIn       float64            `json:"bytes_in"`
	BytesOut      float64            `json:"bytes_out"`
}

// Limits are the effective limits and timeouts of the running config.
type Limits struct {
	MaxConnections     int     `json:"max_connections"`
	Workers            int     `json:"workers"`
	PerIPConnections   int     `json:"per_ip_connections"`
	PerIPRate          float64 `json:"per_ip_rate"`
	ClientHelloSeconds float64 `json:"client_hello_timeout_seconds"`
	ConnectSeconds     float64 `json:"connect_timeout_seconds"`
	IdleSeconds        float64 `json:"idle_timeout_seconds"`
	ShutdownSeconds    float64 `json:"shutdown_timeout_seconds"`
}

// Reload is the outcome of one reload.
type Reload struct {
	Time            time.Time `json:"time"`
	Result          string    `json:"result"` // "ok" or "failed", as the metric label
	DurationSeconds float64   `json:"duration_seconds"`
	// Generation is the new generation of a successful reload.
	Generation int    `json:"generation,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Backend is one backend of a route's pool.
type Backend struct {
	Route       string    `json:"route"`
	Address     string    `json:"address"`
	Backup      bool      `json:"backup,omitempty"`
	Up          bool      `json:"up"`
	Since       time.Time `json:"since"`
	LastError   string    `json:"last_error,omitempty"`
	Active      int64     `json:"active"`
	Connections uint64    `json:"connections"`
}

// Sample is the cumulative counters at one moment.
type Sample struct {
	Time        time.Time         `json:"time"`
	Active      int64             `json:"active"`
	Connections uint64            `json:"connections"`
	Protocols   map[string]uint64 `json:"protocols"`
	Rejected    map[string]uint64 `json:"rejected"`
	BytesIn     uint64            `json:"bytes_in"`
	BytesOut    uint64            `json:"bytes_out"`
}

// SampleOf returns the sample of t taken at now. Its maps are copies.
func SampleOf(t Totals, now time.Time) Sample {
	return Sample{
		Time: now, Active: t.Active, Connections: t.Connections,
		Protocols: maps.Clone(t.Protocols), Rejected: maps.Clone(t.Rejected),
		BytesIn: t.BytesIn, BytesOut: t.BytesOut,
	}
}

// The defaults of a History: a sample every 5 s for 10 min; rates over the
// last minute.
const (
	SampleInterval = 5 * time.Second
	HistoryLength  = 120
	RateWindow     = time.Minute
)

// History keeps the last samples of the counters in a ring. The zero value
// keeps HistoryLength samples. It is not safe for concurrent use: its owner
// serialises access.
type History struct {
	ring []Sample
	next int // where the next sample goes once the ring is full
	full bool
}

// Add records s. Samples must come in time order.
func (h *History) Add(s Sample) {
	if h.ring == nil {
		h.ring = make([]Sample, 0, HistoryLength)
	}
	if !h.full {
		h.ring = append(h.ring, s)
		if len(h.ring) == cap(h.ring) {
			h.full = true
		}
		return
	}
	h.ring[h.next] = s
	h.next = (h.next + 1) % len(h.ring)
}

// Samples returns the samples, oldest first, in a new slice.
func (h *History) Samples() []Sample {
	if !h.full {
		return append([]Sample(nil), h.ring...)
	}
	out := make([]Sample, 0, len(h.ring))
	out = append(out, h.ring[h.next:]...)
	return append(out, h.ring[:h.next]...)
}

// Rates returns the per-second rates between now's sample and the oldest
// sample no older than window before it (the oldest kept when none is
// that old). Counters that went backwards (a predecessor's counts not yet
// inherited) count as 0.
func (h *History) Rates(now Sample, window time.Duration) Rates {
	r := Rates{Protocols: map[string]float64{}, Rejected: map[string]float64{}}
	for k := range now.Protocols {
		r.Protocols[k] = 0
	}
	for k := range now.Rejected {
		r.Rejected[k] = 0
	}
	var base *Sample
	ss := h.Samples()
	for i := range ss {
		if now.Time.Sub(ss[i].Time) <= window && ss[i].Time.Before(now.Time) {
			base = &ss[i]
			break
		}
	}
	if base == nil {
		for i := len(ss) - 1; i >= 0; i-- {
			if ss[i].Time.Before(now.Time) {
				base = &ss[i]
				break
			}
		}
	}
	if base == nil {
		return r
	}
	dt := now.Time.Sub(base.Time).Seconds()
	if dt <= 0 {
		return r
	}
	rate := func(a, b uint64) float64 {
		if a < b {
			return 0
		}
		return float64(a-b) / dt
	}
	r.WindowSeconds = dt
	r.Connections = rate(now.Connections, base.Connections)
	r.BytesIn = rate(now.BytesIn, base.BytesIn)
	r.BytesOut = rate(now.BytesOut, base.BytesOut)
	for k, v := range now.Protocols {
		r.Protocols[k] = rate(v, base.Protocols[k])
	}
	for k, v := range now.Rejected {
		r.Rejected[k] = rate(v, base.Rejected[k])
	}
	return r
}

// MaxReloads is how many reloads a Status keeps.
const MaxReloads = 10

// AddReload returns rs with r in front, keeping at most MaxReloads.
func AddReload(rs []Reload, r Reload) []Reload {
	out := make([]Reload, 0, min(len(rs)+1, MaxReloads))
	out = append(out, r)
	for _, x := range rs {
		if len(out) == MaxReloads {
			break
		}
		out = append(out, x)
	}
	return out
}
