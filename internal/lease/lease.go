// Package lease enforces a global connection limit across processes
// without a round trip per connection.
//
// The master owns a Pool holding max_connections permits. Each worker runs a
// Client that takes permits from the Pool in blocks (a lease) and hands them
// to connections locally; a connection that closes gives its permit back to
// the Client, which keeps a few spares and returns the rest. Because the
// Pool never grants more than it holds, the sum of permits in use across
// every worker can never exceed the limit. The price is that a worker's
// spare permits are not available to its siblings: near the limit a worker
// may refuse a connection while a sibling holds spares. Blocks are kept small
// relative to the limit (see BlockSize), and when a request finds the Pool
// dry the master asks the siblings to give their spares back (Client.Revoke,
// on an ipc Revoke message) and grants from what returns, so that window is
// small and short.
//
// Permits held by a dead worker return to the Pool with Drop; permits held
// by an older generation during a reload are a Reserve that shrinks as its
// connections close.
package lease

import (
	"fmt"
	"sync"
)

// BlockSize returns the lease block for a limit shared by workers: about an
// eighth of a worker's fair share, between 1 and 64 permits.
func BlockSize(limit, workers int) int {
	if workers < 1 {
		workers = 1
	}
	return min(max(limit/(workers*8), 1), 64)
}

// Pool is the master's side: the permits of the global limit. It is safe for
// concurrent use.
type Pool struct {
	mu      sync.Mutex
	limit   int
	reserve int
	held    map[int]int // worker id -> permits granted and not returned
	total   int         // sum of held
}

// NewPool returns a Pool of limit permits.
func NewPool(limit int) *Pool {
	return &Pool{limit: limit, held: map[int]int{}}
}

// Grant gives the worker with id worker up to want permits, as many as are free, and returns
// how many.
func (p *Pool) Grant(worker, want int) int {
	if want <= 0 {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	n := min(want, p.freeLocked())
	if n > 0 {
		p.held[worker] += n
		p.total += n
	}
	return n
}

// Return takes back n permits from worker. Returning more than the worker
// holds is an error and changes nothing.
func (p *Pool) Return(worker, n int) error {
	if n <= 0 {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held[worker] < n {
		return fmt.Errorf("lease: worker %d returns %d permits but holds %d", worker, n, p.held[worker])
	}
	p.held[worker] -= n
	p.total -= n
	if p.held[worker] == 0 {
		delete(p.held, worker)
	}
	return nil
}

// Drop takes back every permit of a worker that is gone (a dead worker:
// its connections died with it) and returns how many.
func (p *Pool) Drop(worker int) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.held[worker]
	delete(p.held, worker)
	p.total -= n
	return n
}

// Transfer grants the worker with id worker one permit whatever the limit:
// the permit of a connection that exists already, moved here from the
// predecessor, which counted it in its reserve until now (the caller
// lowers the reserve in the same step). It never makes more connections
// count than are open.
func (p *Pool) Transfer(worker int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.held[worker]++
	p.total++
}

// SetReserve sets the number of permits held outside the Pool's workers,
// by an older generation's connections still open.
func (p *Pool) SetReserve(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reserve = max(n, 0)
}

// Free returns the number of permits that may be granted now.
func (p *Pool) Free() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.freeLocked()
}

// Held returns the permits granted to workers, in total and to each.
func (p *Pool) Held() (total int, byWorker map[int]int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[int]int, len(p.held))
	for k, v := range p.held {
		m[k] = v
	}
	return p.total, m
}

func (p *Pool) freeLocked() int {
	return max(p.limit-p.reserve-p.total, 0)
}

// Transport carries a Client's requests to its Pool, usually over IPC.
type Transport interface {
	// Request asks for want permits and waits for the answer: how many
	// were granted (possibly 0). urgent says a connection waits for the
	// answer with no spare left (the master may then ask siblings for
	// theirs); a background refill is not urgent.
	Request(want int, urgent bool) (int, error)
	// Return gives n permits back without waiting.
	Return(n int)
}

// Client is a worker's side of a lease; it implements worker.Limiter. It is
// safe for concurrent use.
type Client struct {
	t     Transport
	block int

	mu       sync.Mutex
	cond     *sync.Cond // signalled when a request for permits completes
	spare    int        // held, not in use
	inUse    int
	fetching bool   // a request to the Pool is under way
	fetches  uint64 // completed requests
	empty    bool   // the last request got nothing
	draining bool   // keep no spares (see Drain)
	// landing is called when a request's answer lands while a caller of
	// AcquireSpareOrWait waits for it (waiting); see Watch.
	landing func()
	waiting bool
}

// NewClient returns a Client that leases blocks of block permits through t.
func NewClient(t Transport, block int) *Client {
	c := &Client{t: t, block: max(block, 1)}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// Acquire takes a permit for a new connection. It answers from the local
// spares when it can; otherwise it asks the Pool for a block and waits for
// the answer (one IPC round trip per block, not per connection). Only one
// request is in flight at a time: connections arriving meanwhile wait for
// its answer rather than each asking (a burst would otherwise drain the
// Pool into spares and be refused). When the spares run low it refills in
// the background so the next connections do not wait.
func (c *Client) Acquire() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.takeSpareLocked() {
			return true
		}
		if c.fetching {
			seen := c.fetches
			for c.fetching && c.fetches == seen {
				c.cond.Wait()
			}
			if c.empty && c.spare == 0 {
				return false // the Pool had nothing: the limit is reached
			}
			continue
		}
		c.fetching = true
		c.mu.Unlock()
		n, err := c.t.Request(c.block, true)
		c.mu.Lock()
		c.landed(n, err)
		if c.empty && c.spare == 0 {
			return false
		}
	}
}

// AcquireSpare takes a permit only if one is spare here, without waiting
// or asking the Pool: for a caller that must never block (the worker's
// event loop), which hands the connection to Acquire otherwise. Like
// Acquire, it starts a refill in the background when the spares run low.
func (c *Client) AcquireSpare() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.takeSpareLocked()
}

// Watch sets f to be called when the answer to a request lands (with
// permits or without) after AcquireSpareOrWait said to wait for it: for an
// event loop that queues connections instead of blocking. f is called with
// the Client's lock held, so it must not call the Client; it should only
// wake its caller.
func (c *Client) Watch(f func()) {
	c.mu.Lock()
	c.landing = f
	c.mu.Unlock()
}

// AcquireSpareOrWait takes a permit if one is spare here, as AcquireSpare
// does. When none is but a request to the Pool is under way, it reports
// wait: the answer is near, and the function set with Watch is called
// when it lands (then try again). With neither, only Acquire (which asks
// the Pool urgently) can tell.
func (c *Client) AcquireSpareOrWait() (ok, wait bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.takeSpareLocked() {
		return true, false
	}
	if c.fetching && c.landing != nil {
		c.waiting = true
		return false, true
	}
	return false, false
}

// takeSpareLocked takes a spare permit if there is one, starting a refill
// in the background when the spares run low; c.mu is held.
func (c *Client) takeSpareLocked() bool {
	if c.spare == 0 {
		return false
	}
	c.spare--
	c.inUse++
	if c.spare < c.block/2 && !c.fetching {
		c.fetching = true
		go c.refill()
	}
	return true
}

// TryAcquire takes a permit if one comes without making anybody wait: a
// spare, or the answer to a request that is not urgent (see Transport).
// It is for a connection served already, without a permit, that should
// count again (a connection moved by a reload).
func (c *Client) TryAcquire() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.spare == 0 && !c.fetching && !c.draining {
		c.fetching = true
		c.mu.Unlock()
		n, err := c.t.Request(c.block, false)
		c.mu.Lock()
		c.landed(n, err)
	}
	if c.spare == 0 {
		return false
	}
	c.spare--
	c.inUse++
	return true
}

// landed records the answer to a request; c.mu is held.
func (c *Client) landed(n int, err error) {
	if err != nil {
		n = 0
	}
	c.spare += n
	c.empty = n == 0
	c.fetching = false
	c.fetches++
	c.cond.Broadcast()
	if c.waiting && c.landing != nil {
		c.waiting = false
		c.landing()
	}
}

// refill asks for a block in the background.
func (c *Client) refill() {
	n, err := c.t.Request(c.block, false)
	c.mu.Lock()
	c.landed(n, err)
	c.mu.Unlock()
}

// Release gives back the permit of a connection that ended. Spares beyond
// two blocks go back to the Pool (all of them once draining).
func (c *Client) Release() {
	c.mu.Lock()
	c.inUse--
	c.spare++
	extra := 0
	switch {
	case c.draining:
		extra, c.spare = c.spare, 0
	case c.spare > 2*c.block:
		extra = c.spare - c.block
		c.spare = c.block
	}
	c.mu.Unlock()
	if extra > 0 {
		c.t.Return(extra)
	}
}

// Drain gives every spare permit back and keeps none from now on: a
// draining worker accepts no new connections, and its spares would only
// stand in the way of the next generation's workers (they count in its
// reserve) for as long as the drain lasts.
func (c *Client) Drain() {
	c.mu.Lock()
	c.draining = true
	n := c.spare
	c.spare = 0
	c.mu.Unlock()
	if n > 0 {
		c.t.Return(n)
	}
}

// Revoke gives up to n spare permits back to the Pool at once (the Pool
// has run dry and a sibling needs them) and returns how many.
func (c *Client) Revoke(n int) int {
	c.mu.Lock()
	n = min(n, c.spare)
	c.spare -= n
	c.mu.Unlock()
	if n > 0 {
		c.t.Return(n)
	}
	return n
}

// Adopt counts a permit the master granted with a moved connection (see
// Pool.Transfer) as in use by that connection; it is given back with
// Release like any other.
func (c *Client) Adopt() {
	c.mu.Lock()
	c.inUse++
	c.mu.Unlock()
}

// InUse returns the permits held by open connections.
func (c *Client) InUse() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inUse
}

// Spare returns the permits held and not in use.
func (c *Client) Spare() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.spare
}
