package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/worker/balance"
)

// PoolBackend is one backend of a Pool.
type PoolBackend struct {
	// Address is host:port as the config writes it: the backend label of
	// the sniproxy_backend_* metrics.
	Address string
	// Host and Port are what is dialled: an IP address or a host name the
	// Dialer's Resolver resolves, and 1..65535.
	Host string
	Port int
	// Key names the backend in the shared health table (see
	// health.Table): its address and the way it is checked.
	Key string
	// Weight (≥ 1) and Backup are as in the config.
	Weight int
	Backup bool
}

// Pool is the backends of one route: a Balancer over them, whether each is
// up (the worker's copy of the master's health table) and its connection
// counts. Build it with NewPool; its methods are safe for concurrent use.
type Pool struct {
	// Route is the route's match as the config writes it: the route label
	// of the sniproxy_backend_* metrics.
	Route string
	// Backends are the pool's backends, as given to NewPool; read only.
	Backends []PoolBackend

	bal   *balance.Balancer
	down  []atomic.Bool   // by backend: the last health table said down
	conns []atomic.Uint64 // by backend: connections made (dials that succeeded)
	// addrs are the backends' addresses when every host is an IP
	// address (nil otherwise): see Addresses.
	addrs []netip.AddrPort
}

// NewPool returns the pool of route's backends under policy. It fails as
// balance.New does (no backend, a weight out of range, no primary,
// duplicate addresses).
func NewPool(route string, policy balance.Policy, backends []PoolBackend) (*Pool, error) {
	bs := make([]balance.Backend, len(backends))
	for i, b := range backends {
		if b.Host == "" || b.Port < 1 || b.Port > 65535 {
			return nil, fmt.Errorf("route: pool of %s: backend %q has no host or port", route, b.Address)
		}
		bs[i] = balance.Backend{Key: b.Address, Weight: b.Weight, Backup: b.Backup}
	}
	bal, err := balance.New(policy, bs, balance.Options{})
	if err != nil {
		return nil, fmt.Errorf("route: pool of %s: %w", route, err)
	}
	addrs := make([]netip.AddrPort, len(backends))
	for i, b := range backends {
		a, err := netip.ParseAddr(b.Host)
		if err != nil || a.Zone() != "" {
			addrs = nil
			break
		}
		addrs[i] = netip.AddrPortFrom(a.Unmap(), uint16(b.Port))
	}
	return &Pool{
		Route: route, Backends: append([]PoolBackend(nil), backends...), bal: bal,
		down: make([]atomic.Bool, len(backends)), conns: make([]atomic.Uint64, len(backends)),
		addrs: addrs,
	}, nil
}

// Addresses returns the backends' addresses, by index, when every backend
// is written as an IP address (no look-up needed to dial any); nil
// otherwise. Read only.
func (p *Pool) Addresses() []netip.AddrPort { return p.addrs }

// SetUp records whether backend i is up. Until the first call every
// backend is.
func (p *Pool) SetUp(i int, up bool) { p.down[i].Store(!up) }

// Up reports whether backend i is up.
func (p *Pool) Up(i int) bool { return !p.down[i].Load() }

// Active returns the open connections to backend i that this process
// counts.
func (p *Pool) Active(i int) int64 { return p.bal.Active(i) }

// Connections returns the connections this process made to backend i.
func (p *Pool) Connections(i int) uint64 { return p.conns[i].Load() }

// Adopt counts a connection to backend i that another process dialled and
// moved here (a reload): it is active here from now on, and ends with
// Release like the connections DialPool made.
func (p *Pool) Adopt(i int) { p.bal.Acquire(i) }

// Find returns the index of the backend a connection that reached addr
// went to: the one whose configured address is addr, or whose host is the
// IP address and port of addr; -1 if none is (a backend given by a name
// that resolved to addr is not recognised).
func (p *Pool) Find(addr netip.AddrPort) int {
	for i, b := range p.Backends {
		if b.Address == addr.String() {
			return i
		}
		if ip, err := netip.ParseAddr(b.Host); err == nil && netip.AddrPortFrom(ip.Unmap(), uint16(b.Port)) == netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()) {
			return i
		}
	}
	return -1
}

// Release counts the end of a connection DialPool made to backend i; call
// it exactly once per such connection.
func (p *Pool) Release(i int) { p.bal.Release(i) }

// Failure names why a dial failed, for the health table and its log:
// "connection refused", "timeout", "unreachable", or the error's text.
func Failure(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return "resolve: " + dnsErr.Err
	}
	s := err.Error()
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// DialPool connects to a backend of dec.Pool for a client at client (the
// address source_hash hashes; a PROXY header's source when the client came
// through one). The backends are tried in the order the pool's Balancer
// gives (the up primaries, else the up backups, else all), then, should
// all of those fail, the rest (down primaries, then backups), each with an
// equal share of the time left in ctx but at least 2s (or all that is
// left), until one answers: one dead backend costs the client nothing as
// long as time is left. report, if not nil, hears the outcome of every
// attempt (err nil for the one that succeeded), but not of one cut short
// because ctx was cancelled: those are the passive health results.
//
// It returns the connection, the index of its backend in dec.Pool.Backends
// (the caller calls Pool.Release(i) when the connection ends) and the
// address reached. When every attempt failed the error wraps [ErrDial] and
// the first attempt's error.
func (d *Dialer) DialPool(ctx context.Context, dec Decision, client netip.Addr, report func(i int, err error)) (*net.TCPConn, int, netip.AddrPort, error) {
	p := dec.Pool
	if p == nil {
		return nil, -1, netip.AddrPort{}, fmt.Errorf("dial: no pool: %w", ErrNoRoute)
	}
	var buf [16]int
	order := p.Order(buf[:0], client)
	var first error
	tried := 0
	for k, i := range order {
		if err := phaseOver(ctx); err != nil {
			if first == nil {
				first = fmt.Errorf("%w: %w", ErrDial, err)
			}
			break
		}
		b := &p.Backends[i]
		actx, cancel := ctx, context.CancelFunc(func() {})
		if dl, ok := ctx.Deadline(); ok && len(order)-k > 1 {
			actx, cancel = context.WithTimeout(ctx, AttemptTime(time.Until(dl), len(order)-k)) // never later than dl
		}
		c, ap, err := d.Dial(actx, Decision{Rule: dec.Rule, Host: b.Host, Port: b.Port, Name: dec.Name})
		cancel()
		tried++
		if err == nil {
			p.Connected(i)
			if report != nil {
				report(i, nil)
			}
			return c, i, ap, nil
		}
		if errors.Is(ctx.Err(), context.Canceled) {
			// The connection is being closed: nothing learnt of the backend.
			if first == nil {
				first = err
			}
			break
		}
		if report != nil {
			report(i, err)
		}
		if first == nil {
			first = err
		}
	}
	return nil, -1, netip.AddrPort{}, p.Failed(tried, len(order), first)
}

// Order returns, appended to buf, the backends to try for a client at
// client, in DialPool's order: the balancer's pick (the up primaries, else
// the up backups, else all), then the rest as a last resort, primaries
// (down) first, then backups — the health verdict is older than the dial.
func (p *Pool) Order(buf []int, client netip.Addr) []int {
	order := p.bal.Pick(buf, client, p.Up)
	if n := len(order); n < len(p.Backends) {
		for pass := range 2 {
			for i, b := range p.Backends {
				if b.Backup == (pass == 1) && !slices.Contains(order[:n], i) {
					order = append(order, i)
				}
			}
		}
	}
	return order
}

// AttemptTime is the time one attempt of a dial phase gets: an equal share
// of left among the attempts still to make, but at least 2s (or all that
// is left, when the caller's deadline comes first).
func AttemptTime(left time.Duration, attempts int) time.Duration {
	if attempts <= 1 {
		return left
	}
	return max(left/time.Duration(attempts), minAttempt)
}

// Connected counts a connection made to backend i (by DialPool, or by a
// caller that dials Order itself): the balancer's count, which Release
// gives back, and the backend's total.
func (p *Pool) Connected(i int) {
	p.bal.Acquire(i)
	p.conns[i].Add(1)
}

// Failed is DialPool's error when tried of the ordered backends failed,
// the first with first.
func (p *Pool) Failed(tried, ordered int, first error) error {
	if !errors.Is(first, ErrDial) {
		first = fmt.Errorf("%w: %w", ErrDial, first)
	}
	return fmt.Errorf("pool %s: %d of %d backends tried, first: %w", p.Route, tried, ordered, first)
}

// FallbackOK reports whether a connection that dec and err refused may go
// to a default backend: it found no route (dec.Fallback, from Decide), or
// it is a DNS-routed name without an answer. A name on the denylist or
// refused for a private address never may.
func FallbackOK(dec Decision, err error) bool {
	if err == nil || errors.Is(err, ErrPrivate) {
		return false
	}
	if dec.Fallback {
		return true
	}
	return dec.Rule == RuleDNS && errors.Is(err, ErrNoRoute) && !errors.Is(err, ErrDenied)
}
