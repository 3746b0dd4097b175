package perip

import (
	"net/netip"
	"sync"
	"time"
)

// SpareTTL is how long a worker keeps a client's unused client permits and tokens
// before it gives them back (Client.Sweep), at least; at most half as long
// again.
const SpareTTL = time.Second

// sweepsTTL is the sweeps (one every SpareTTL/2, see Run) a lease must
// stay unused to be given back: the accept path reads no clock, it only
// notes the sweep count.
const sweepsTTL = 3

// maxLeases bounds the keys a Client keeps leases of when they have no
// open connection: beyond it, spares go back at once.
const maxLeases = 100_000

// Transport carries a Client's requests to the master's Table, usually
// over ipc.
type Transport interface {
	// Request asks for conns client permits and tokens rate tokens of key and waits
	// for the answer.
	Request(key netip.Addr, conns, tokens int) (Grant, error)
	// Return gives client permits and tokens back without waiting.
	Return(key netip.Addr, conns, tokens int)
}

// lease is what a worker holds of one key.
type lease struct {
	inUse, spare int // client permits: by open connections, unused
	tokens       int
	used         uint64    // Client.sweeps at the last Acquire or Release
	denyUntil    time.Time // refuse without asking until then
	fetching     bool
}

// Client is a worker's side: the leases it holds per client key. It is
// safe for concurrent use.
type Client struct {
	t      Transport
	lim    Limits
	prefix int
	// block and tblock are the client permits and tokens asked for at once.
	block, tblock int
	now           func() time.Time

	mu   sync.Mutex
	cond *sync.Cond // a request completed
	m    map[netip.Addr]*lease
	reqs uint64 // requests sent (tests)
	// sweeps counts Sweep calls: the clock of leases' use.
	sweeps uint64
	// draining: the worker retires; client permits go back as connections close.
	draining bool
}

// NewClient returns a Client enforcing lim through t for a proxy of
// workers workers; IPv6 clients are grouped by prefix bits. now reads the
// time (time.Now if nil).
func NewClient(t Transport, lim Limits, prefix, workers int, now func() time.Time) *Client {
	if now == nil {
		now = time.Now
	}
	workers = max(workers, 1)
	c := &Client{
		t: t, lim: lim, prefix: prefix, now: now, m: map[netip.Addr]*lease{},
		// A lease is a small share of a client's limit, so that siblings
		// rarely find it taken by another worker's spares (at most
		// SpareTTL); with small limits, one at a time.
		block:  min(max(lim.Conns/(2*workers), 1), 16),
		tblock: min(max(int(lim.Rate)/(2*workers), 1), 16),
	}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// Key returns the client key of addr under the Client's ipv6 prefix.
func (c *Client) Key(addr netip.Addr) netip.Addr { return Key(addr, c.prefix) }

// Acquire admits a new connection of the client key (see Key): it takes
// a client permit (if limits.per_ip_connections is on) and a token (if
// limits.per_ip_rate is on) from its lease, asking the master only when
// the lease has none (one round trip, not one per connection). A client
// the master refused is refused locally for the Retry it said. Every
// successful Acquire is followed by one Release when the connection
// closes.
func (c *Client) Acquire(key netip.Addr) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		l := c.m[key]
		if l == nil {
			l = &lease{}
			c.m[key] = l
		}
		needC, needT := c.takeLocked(l)
		if !needC && !needT {
			return true
		}
		if !l.denyUntil.IsZero() && c.now().Before(l.denyUntil) {
			return false
		}
		if l.fetching {
			c.cond.Wait()
			continue
		}
		wantC, wantT := 0, 0
		if needC {
			wantC = c.block
		}
		if needT {
			wantT = c.tblock
		}
		l.fetching = true
		c.reqs++
		c.mu.Unlock()
		g, err := c.t.Request(key, wantC, wantT)
		c.mu.Lock()
		l.fetching = false
		c.cond.Broadcast()
		if err != nil {
			c.forgetLocked(key, l)
			return false
		}
		l.spare += g.Conns
		l.tokens += g.Tokens
		if (needC && g.Conns == 0) || (needT && g.Tokens == 0) {
			if len(c.m) <= maxLeases {
				l.denyUntil = c.now().Add(g.Retry)
			}
			c.forgetLocked(key, l)
			return false
		}
	}
}

// takeLocked takes a client permit and a token from l, as the limits
// need, if l has both; otherwise it takes nothing and says which l lacks.
// c.mu is held.
func (c *Client) takeLocked(l *lease) (needC, needT bool) {
	needC = c.lim.Conns > 0 && l.spare == 0
	needT = c.lim.Rate > 0 && l.tokens == 0
	if needC || needT {
		return needC, needT
	}
	if c.lim.Conns > 0 {
		l.spare--
		l.inUse++
	}
	if c.lim.Rate > 0 {
		l.tokens--
	}
	l.used = c.sweeps
	return false, false
}

// AcquireLocal is Acquire without asking the master, for a caller that
// must not wait (the worker's event loop): decided is false when only the
// master can tell (no lease for key, or one spent), and the caller then
// calls Acquire, which may wait for it; otherwise ok is Acquire's answer
// (a refusal the master gave, for its Retry, is decided here).
func (c *Client) AcquireLocal(key netip.Addr) (ok, decided bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.m[key]
	if l == nil || l.fetching {
		return false, false
	}
	if needC, needT := c.takeLocked(l); !needC && !needT {
		return true, true
	}
	if !l.denyUntil.IsZero() && c.now().Before(l.denyUntil) {
		return false, true
	}
	return false, false
}

// Release gives back the client permit of a connection of key that ended. The
// client permit stays with the worker as a spare for the client's next connection
// (up to a lease's worth, for at most SpareTTL).
func (c *Client) Release(key netip.Addr) {
	if c.lim.Conns == 0 {
		return
	}
	c.mu.Lock()
	l := c.m[key]
	if l == nil || l.inUse == 0 {
		c.mu.Unlock()
		return
	}
	l.inUse--
	l.spare++
	l.used = c.sweeps
	extra := 0
	if l.spare > c.block || len(c.m) > maxLeases || c.draining {
		keep := c.block
		if len(c.m) > maxLeases || c.draining {
			keep = 0
		}
		extra = l.spare - keep
		l.spare = keep
	}
	c.forgetLocked(key, l)
	c.mu.Unlock()
	if extra > 0 {
		c.t.Return(key, extra, 0)
	}
}

// Adopt counts as in use the client permit of key that the master granted
// with a connection moved here (Table.Transfer); it is given back by the
// connection's Release like any other. It reports whether it counted one:
// false when limits.per_ip_connections is off (the master granted none).
func (c *Client) Adopt(key netip.Addr) bool {
	if c.lim.Conns == 0 || !key.IsValid() {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.m[key]
	if l == nil {
		l = &lease{}
		c.m[key] = l
	}
	l.inUse++
	l.used = c.sweeps
	return true
}

// Sweep gives back the spares and tokens unused for the last sweepsTTL
// sweeps and forgets the leases that hold nothing. A worker calls it every
// SpareTTL/2 (Run).
func (c *Client) Sweep() {
	type ret struct {
		key           netip.Addr
		conns, tokens int
	}
	var back []ret
	c.mu.Lock()
	c.sweeps++
	for k, l := range c.m {
		if l.fetching {
			continue
		}
		if (l.spare > 0 || l.tokens > 0) && c.sweeps-l.used >= sweepsTTL {
			back = append(back, ret{k, l.spare, l.tokens})
			l.spare, l.tokens = 0, 0
		}
		c.forgetLocked(k, l)
	}
	c.mu.Unlock()
	for _, r := range back {
		c.t.Return(r.key, r.conns, r.tokens)
	}
}

// Run sweeps (Sweep) until stop is closed.
func (c *Client) Run(stop <-chan struct{}) {
	t := time.NewTicker(SpareTTL / 2)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			c.Sweep()
		}
	}
}

// Drain gives back every spare client permit and token at once, and from then on
// each client permit as its connection closes: a retiring worker admits no more
// connections, and the successor counts what it holds.
func (c *Client) Drain() {
	c.mu.Lock()
	c.draining = true
	c.sweeps += sweepsTTL // every lease unused long enough to go back now
	c.mu.Unlock()
	c.Sweep()
}

// forgetLocked deletes the lease l of key if it holds nothing and says
// nothing.
func (c *Client) forgetLocked(key netip.Addr, l *lease) {
	if l.inUse == 0 && l.spare == 0 && l.tokens == 0 && !l.fetching && (l.denyUntil.IsZero() || !c.now().Before(l.denyUntil)) {
		delete(c.m, key)
	}
}

// Requests returns how many requests the Client has sent.
func (c *Client) Requests() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reqs
}

// Leases returns how many keys the Client holds a lease of.
func (c *Client) Leases() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
