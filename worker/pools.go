package worker

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/health"
	"github.com/sniproxy/sniproxy/internal/hostname"
	"github.com/sniproxy/sniproxy/worker/balance"
	"github.com/sniproxy/sniproxy/worker/route"
)

// maxRunsPerKey bounds the dial runs a Server keeps per backend between
// two TakeDialRuns: a backend flapping faster than the master hears of it
// loses its oldest runs, not the worker's memory.
const maxRunsPerKey = 64

// DialRun is a run of Count consecutive dial outcomes of one pool backend,
// all successes (OK) or all failures for Reason: what a worker reports to
// the master for the backends' shared health.
type DialRun struct {
	Key    string
	OK     bool
	Count  uint32
	Reason string
	// Last is when the run's last dial ended.
	Last time.Time
}

// BackendCount is one pool backend's connection counts in this process:
// the labels of the sniproxy_backend_* metrics, the connections made so
// far and the ones open now.
type BackendCount struct {
	Route       string
	Backend     string
	Connections uint64
	Active      int64
}

// dialRuns collects dial outcomes until the next TakeDialRuns.
type dialRuns struct {
	mu   sync.Mutex
	runs map[string][]DialRun
	keys []string // in the order they were first reported since the last take
}

// add records one dial outcome of key.
func (d *dialRuns) add(key string, ok bool, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.runs == nil {
		d.runs = map[string][]DialRun{}
	}
	rs, seen := d.runs[key]
	if !seen {
		d.keys = append(d.keys, key)
	}
	now := time.Now()
	if n := len(rs); n > 0 && rs[n-1].OK == ok && rs[n-1].Reason == reason && rs[n-1].Count < 1<<31 {
		rs[n-1].Count++
		rs[n-1].Last = now
		return
	}
	if len(rs) >= maxRunsPerKey {
		rs = append(rs[:0], rs[1:]...)
	}
	d.runs[key] = append(rs, DialRun{Key: key, OK: ok, Count: 1, Reason: reason, Last: now})
}

// take returns every run since the last take, those of one key in order.
func (d *dialRuns) take() []DialRun {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []DialRun
	for _, k := range d.keys {
		out = append(out, d.runs[k]...)
	}
	d.runs, d.keys = nil, nil
	return out
}

// newRoutes builds the routing table of cfg and the pools of its routes
// (by route index; nil for a route without a pool).
func newRoutes(cfg *config.Config) (*route.Table, []*route.Pool, error) {
	var deny, allow []hostname.Pattern
	var routes []route.Rule
	for i, s := range cfg.Denylist {
		p, err := hostname.ParsePattern(s)
		if err != nil {
			return nil, nil, fmt.Errorf("worker: denylist[%d]: %w", i, err)
		}
		deny = append(deny, p)
	}
	for i, s := range cfg.Allowlist {
		p, err := hostname.ParsePattern(s)
		if err != nil {
			return nil, nil, fmt.Errorf("worker: allowlist[%d]: %w", i, err)
		}
		allow = append(allow, p)
	}
	pools := make([]*route.Pool, len(cfg.Routes))
	for i, r := range cfg.Routes {
		rule := route.Rule{ALPN: r.ALPN}
		re, err := config.CompileMatch(r.Match)
		if err != nil {
			return nil, nil, fmt.Errorf("worker: routes[%d].match: %w", i, err)
		}
		if re != nil {
			rule.Regexp = re
		} else if rule.Match, err = hostname.ParsePattern(r.Match); err != nil {
			return nil, nil, fmt.Errorf("worker: routes[%d].match: %w", i, err)
		}
		if r.HasPool() {
			if rule.Pool, err = newPool(r); err != nil {
				return nil, nil, fmt.Errorf("worker: routes[%d]: %w", i, err)
			}
			pools[i] = rule.Pool
		} else if rule.Host, rule.Port, err = hostname.ParseBackend(r.Backend); err != nil {
			return nil, nil, fmt.Errorf("worker: routes[%d].backend: %w", i, err)
		}
		routes = append(routes, rule)
	}
	return route.NewTable(deny, routes, allow), pools, nil
}

// newPool builds the pool of route r.
func newPool(r config.Route) (*route.Pool, error) {
	policy, err := balance.ParsePolicy(r.Balance)
	if err != nil {
		return nil, err
	}
	addrs := r.PoolAddresses()
	var bs []route.PoolBackend
	for j, b := range r.Pool() {
		host, port, err := splitHostPort(addrs[j])
		if err != nil {
			return nil, fmt.Errorf("backend %q: %w", b.Address, err)
		}
		bs = append(bs, route.PoolBackend{Address: addrs[j], Host: host, Port: port,
			Key: r.HealthKey(addrs[j]), Weight: b.Weight, Backup: b.Backup})
	}
	return route.NewPool(r.Match, policy, bs)
}

// splitHostPort splits a canonical host:port.
func splitHostPort(a string) (string, int, error) {
	host, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", a)
	}
	return host, port, nil
}

// SetHealth makes the pools follow t, the master's health table: a backend
// is up unless t says it is down (a backend t lacks is up). Connections
// being dialled see the change at their next attempt.
func (s *Server) SetHealth(t *health.Table) {
	for _, p := range s.pools {
		if p == nil {
			continue
		}
		for i, b := range p.Backends {
			p.SetUp(i, t.Up(b.Key))
		}
	}
}

// TakeDialRuns returns the outcomes of dials to pool backends since the
// last call, for the master.
func (s *Server) TakeDialRuns() []DialRun { return s.dials.take() }

// BackendCounts returns the connection counts of every pool backend, in
// config order.
func (s *Server) BackendCounts() []BackendCount {
	var out []BackendCount
	for _, p := range s.pools {
		if p == nil {
			continue
		}
		for i, b := range p.Backends {
			out = append(out, BackendCount{Route: p.Route, Backend: b.Address, Connections: p.Connections(i), Active: p.Active(i)})
		}
	}
	return out
}

// reportDial returns the DialPool report function for pool p.
func (s *Server) reportDial(p *route.Pool) func(i int, err error) {
	return func(i int, err error) {
		if err == nil {
			s.dials.add(p.Backends[i].Key, true, "")
			return
		}
		s.dials.add(p.Backends[i].Key, false, route.Failure(err))
	}
}

// clientAddr returns the address source_hash hashes for the connection:
// its client (the source a PROXY header named, else the peer: conn.peer).
func (p *path) clientAddr() netip.Addr {
	return p.c.peer.Addr()
}
