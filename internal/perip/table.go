// Package perip enforces the per-client limits (limits.per_ip_connections
// and limits.per_ip_rate) across processes without a round trip per
// connection.
//
// # Shape
//
// DESIGN.md names two shapes for a limit exact across workers: counts owned
// by the master with leases per client, or steering each client address to
// one worker (SO_ATTACH_REUSEPORT_CBPF hashing the source address). This
// package is the first. Steering was rejected because it cannot be exact
// where it matters: a listener with reuseport: false shares one socket
// between all workers (no steering at all), a client behind a PROXY-speaking
// balancer is not the packet's source address (the kernel hashes the
// balancer), and while a reload changes the socket set the hash maps a
// client to a different worker of another generation, whose count starts
// at zero. Its cost on the accept path is nil in the worker (the kernel
// runs the filter per connection; not measured here), but a warm lease is
// close to nil too: the admit check with a lease in hand is a map lookup
// under a mutex and reads no clock. BenchmarkClientAcquireWarm (key,
// Acquire and Release, -benchmem, -cpu 1) measured 75 ns for an IPv4
// client and 121 ns for an IPv6 one (the /64 mask), 0 allocations, on a
// loaded 2-core machine where the global limit's lease
// (lease.BenchmarkAcquireRelease) measured 37-61 ns at the same time:
// well under 1% of the 11-15 µs median of the one ipc round trip a
// client's first connection (and one after its lease went back) waits for.
//
// # Master: Table
//
// A client permit is the right of one client to hold one open connection
// under limits.per_ip_connections: what a permit (package lease) is to
// max_connections, for one client key. The master owns a Table: for each client key, the client permits
// granted to workers and a token bucket. A worker asks for a small lease
// for a key (Grant) when a connection of that client finds no spare client permit or
// token; it hands them to later connections of the same client locally,
// and gives back what it has not used for a while (Return). The table holds
// at most a fixed number of keys (NewTable's size); a key that holds no
// client permit is idle and may be evicted, least recently used first, so a flood of
// distinct sources never grows it. Only when every key in the table holds
// client permits (with the default size of max(100000, 2 × max_connections), more
// clients than there can be open connections) is a new client refused,
// counted per_ip_limit, until one of them closes.
//
// The limits are never exceeded (the Table never grants more than a
// client's limit, less what the predecessor still holds). The price of
// leases is the other way: near its limit a client may be refused by one
// worker while another holds unused client permits or tokens of its lease,
// for at most 1.5 × SpareTTL. Leases are small to keep that rare: half a
// worker's share of the limit, at most 16, and one at a time for limits
// below four times the workers.
//
// A successor inherits the client permits the predecessor's workers hold as a
// reserve per key (State, then SetReserve as they close), and the buckets
// not yet full, so a reload neither lets a client exceed its limits nor
// refills its bucket. A connection the predecessor moves here (a hurry)
// brings its client permit along: the master grants it to the worker that
// resumes the connection whatever the limit (Transfer), and that worker's
// Client counts it as in use (Adopt).
package perip

import (
	"fmt"
	"math"
	"net/netip"
	"sync"
	"time"
)

// DefaultSize is the least number of keys a master's Table holds.
const DefaultSize = 100_000

// denyRetry is how long a worker refuses a client locally once the master
// found it at its connection limit, before asking again.
const denyRetry = 20 * time.Millisecond

// Key returns the client key of addr: an IPv4 address (IPv4-mapped IPv6
// too) as is, an IPv6 address masked to prefix bits.
func Key(addr netip.Addr, prefix int) netip.Addr {
	addr = addr.Unmap()
	if addr.Is4() {
		return addr
	}
	p, err := addr.WithZone("").Prefix(min(max(prefix, 0), 128))
	if err != nil {
		return addr
	}
	return p.Addr()
}

// Limits are the per-client limits: Conns open connections (0 = off) and
// Rate new connections per second (0 = off), with a burst of
// max(1, Rate).
type Limits struct {
	Conns int
	Rate  float64
}

// On reports whether either limit is on.
func (l Limits) On() bool { return l.Conns > 0 || l.Rate > 0 }

// burst is the bucket's size.
func (l Limits) burst() float64 { return max(1, l.Rate) }

// Grant is the master's answer to a request for a key: Conns client permits and
// Tokens rate tokens (both 0 when the client is over a limit), and, when
// refused, how long the worker may refuse it without asking again.
type Grant struct {
	Conns, Tokens int
	Retry         time.Duration
}

// holding is the client permits of one key a worker holds.
type holding struct {
	worker int
	n      int
}

// entry is one key of a Table.
type entry struct {
	key     netip.Addr
	held    int       // client permits granted to workers, Σ by
	by      []holding // per worker, usually one or two
	reserve int       // client permits held by the predecessor's workers
	tokens  float64
	filled  time.Time // when tokens was last refilled
	// prev and next link the idle list (held and reserve 0), least
	// recently used first.
	prev, next *entry
	idle       bool
}

// State is what a successor inherits of a Table: the client permits held per key
// and the buckets that are not full. It is JSON on the state socket.
type State struct {
	Held   map[netip.Addr]int     `json:"held,omitempty"`
	Tokens map[netip.Addr]float64 `json:"tokens,omitempty"`
}

// Table is the master's side: the per-client counts. It is safe for
// concurrent use.
type Table struct {
	lim  Limits
	size int
	now  func() time.Time

	mu         sync.Mutex
	m          map[netip.Addr]*entry
	head, tail *entry // the idle list
	full       uint64 // requests refused because the table was full
	// dirty, when tracking, are the keys whose held changed since the
	// last Changes.
	dirty    map[netip.Addr]struct{}
	tracking bool
}

// NewTable returns a Table enforcing lim over at most size keys (at least
// 1), reading the time from now (time.Now if nil).
func NewTable(lim Limits, size int, now func() time.Time) *Table {
	if now == nil {
		now = time.Now
	}
	return &Table{lim: lim, size: max(size, 1), now: now, m: map[netip.Addr]*entry{}}
}

// Grant answers worker's request for key: up to conns client permits (0: it needs
// none) and up to tokens rate tokens (0: it needs none). A request is
// granted whole or not at all: when either part cannot be given at least
// one, neither is, and Retry says when asking again makes sense.
func (t *Table) Grant(worker int, key netip.Addr, conns, tokens int) Grant {
	if conns <= 0 && tokens <= 0 {
		return Grant{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	e := t.m[key]
	if e == nil {
		if e = t.addLocked(key, now); e == nil {
			t.full++
			return Grant{Retry: denyRetry}
		}
	}
	t.refillLocked(e, now)
	t.touchLocked(e)
	var g Grant
	if conns > 0 && t.lim.Conns > 0 {
		g.Conns = min(conns, max(t.lim.Conns-e.held-e.reserve, 0))
		if g.Conns == 0 {
			return Grant{Retry: denyRetry}
		}
	}
	if tokens > 0 && t.lim.Rate > 0 {
		g.Tokens = min(tokens, int(e.tokens))
		if g.Tokens == 0 {
			wait := time.Duration((1 - e.tokens) / t.lim.Rate * float64(time.Second))
			return Grant{Retry: max(wait, time.Millisecond)}
		}
	}
	if conns > 0 && t.lim.Conns == 0 {
		g.Conns = conns // the limit is off: the worker counts nothing
	}
	if tokens > 0 && t.lim.Rate == 0 {
		g.Tokens = tokens
	}
	if t.lim.Rate > 0 {
		e.tokens -= float64(g.Tokens)
	}
	if g.Conns > 0 && t.lim.Conns > 0 {
		t.holdLocked(e, worker, g.Conns)
	}
	return g
}

// Return takes back conns client permits and tokens unused rate tokens of key from
// worker. Returning more client permits than the worker holds is an error and
// changes nothing.
func (t *Table) Return(worker int, key netip.Addr, conns, tokens int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	if e == nil {
		if conns > 0 && t.lim.Conns > 0 {
			return fmt.Errorf("perip: worker %d returns %d client permits of %v but holds none", worker, conns, key)
		}
		return nil // tokens of a key evicted meanwhile: its bucket is full
	}
	if conns > 0 && t.lim.Conns > 0 {
		i := e.find(worker)
		if i < 0 || e.by[i].n < conns {
			return fmt.Errorf("perip: worker %d returns %d client permits of %v but holds fewer", worker, conns, key)
		}
		t.releaseLocked(e, i, conns)
	}
	if tokens > 0 && t.lim.Rate > 0 {
		t.refillLocked(e, t.now())
		e.tokens = min(e.tokens+float64(tokens), t.lim.burst())
	}
	return nil
}

// Transfer grants worker one client permit of key whatever the limit: the
// permit of a connection the predecessor moved here, which is open and
// counted already (as the predecessor's reserve until it arrives). The
// worker adopts it (Client.Adopt) and gives it back like any other. It
// does nothing when limits.per_ip_connections is off or key is invalid;
// a full table takes the key over its size (an open connection).
func (t *Table) Transfer(worker int, key netip.Addr) {
	if t.lim.Conns <= 0 || !key.IsValid() {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	if e == nil {
		now := t.now()
		if e = t.addLocked(key, now); e == nil {
			e = t.newLocked(key, now)
		}
	}
	t.holdLocked(e, worker, 1)
}

// Drop takes back every client permit of a worker that is gone and returns how many.
func (t *Table) Drop(worker int) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, e := range t.m {
		if i := e.find(worker); i >= 0 {
			n += e.by[i].n
			t.releaseLocked(e, i, e.by[i].n)
		}
	}
	return n
}

// SetReserve sets the client permits of key held by the predecessor's workers.
func (t *Table) SetReserve(key netip.Addr, n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	if e == nil {
		if n <= 0 {
			return
		}
		// Over size if need be: these are open connections.
		e = t.addLocked(key, t.now())
		if e == nil {
			e = t.newLocked(key, t.now())
		}
	}
	e.reserve = max(n, 0)
	t.touchLocked(e)
}

// ClearReserves forgets every reserve: the predecessor has exited, and its
// connections with it.
func (t *Table) ClearReserves() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.m {
		if e.reserve > 0 {
			e.reserve = 0
			t.touchLocked(e)
		}
	}
}

// Inherit takes the predecessor's state: its client permits become reserves, its
// buckets this table's.
func (t *Table) Inherit(s *State) {
	if s == nil {
		return
	}
	for k, n := range s.Held {
		t.SetReserve(k, n)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	for k, v := range s.Tokens {
		if t.lim.Rate == 0 || math.IsNaN(v) {
			break
		}
		e := t.m[k]
		if e == nil {
			if e = t.addLocked(k, now); e == nil {
				break
			}
		}
		e.tokens = min(max(v, 0), t.lim.burst())
		e.filled = now
	}
}

// Snapshot returns the state a successor inherits, and from then on
// records the keys whose client permits change (see Changes).
func (t *Table) Snapshot() *State {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := &State{Held: map[netip.Addr]int{}, Tokens: map[netip.Addr]float64{}}
	now := t.now()
	for k, e := range t.m {
		if e.held > 0 {
			s.Held[k] = e.held
		}
		if t.lim.Rate > 0 {
			t.refillLocked(e, now)
			if e.tokens < t.lim.burst() {
				s.Tokens[k] = e.tokens
			}
		}
	}
	t.tracking = true
	t.dirty = map[netip.Addr]struct{}{}
	return s
}

// Untrack stops recording changes (the successor failed).
func (t *Table) Untrack() {
	t.mu.Lock()
	t.tracking = false
	t.dirty = nil
	t.mu.Unlock()
}

// Changes returns the client permits now held of every key whose count changed
// since the last Snapshot or Changes (0 for a key held no more), or nil.
func (t *Table) Changes() map[netip.Addr]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.dirty) == 0 {
		return nil
	}
	c := make(map[netip.Addr]int, len(t.dirty))
	for k := range t.dirty {
		if e := t.m[k]; e != nil {
			c[k] = e.held
		} else {
			c[k] = 0
		}
	}
	clear(t.dirty)
	return c
}

// Sweep forgets the idle keys whose bucket is full again: nothing is lost
// by forgetting them. It returns how many keys remain.
func (t *Table) Sweep() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	for e := t.head; e != nil; {
		next := e.next
		t.refillLocked(e, now)
		if t.lim.Rate == 0 || e.tokens >= t.lim.burst() {
			t.removeLocked(e)
		}
		e = next
	}
	return len(t.m)
}

// Len returns the number of keys in the table and the requests refused
// because it was full.
func (t *Table) Len() (keys int, refusedFull uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m), t.full
}

// Held returns the client permits of key held by workers and by the predecessor.
func (t *Table) Held(key netip.Addr) (held, reserve int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.m[key]; e != nil {
		return e.held, e.reserve
	}
	return 0, 0
}

// addLocked adds key, evicting the least recently used idle key if the
// table is full; nil if every key holds client permits.
func (t *Table) addLocked(key netip.Addr, now time.Time) *entry {
	if len(t.m) >= t.size {
		if t.head == nil {
			return nil
		}
		t.removeLocked(t.head)
	}
	return t.newLocked(key, now)
}

func (t *Table) newLocked(key netip.Addr, now time.Time) *entry {
	e := &entry{key: key, tokens: t.lim.burst(), filled: now}
	t.m[key] = e
	t.pushIdleLocked(e)
	return e
}

// removeLocked forgets the idle entry e.
func (t *Table) removeLocked(e *entry) {
	t.unlinkLocked(e)
	delete(t.m, e.key)
	if t.tracking {
		delete(t.dirty, e.key) // held 0 was sent already, or never changed
	}
}

func (t *Table) refillLocked(e *entry, now time.Time) {
	if t.lim.Rate <= 0 {
		return
	}
	if d := now.Sub(e.filled); d > 0 {
		e.tokens = min(e.tokens+d.Seconds()*t.lim.Rate, t.lim.burst())
	}
	e.filled = now
}

func (e *entry) find(worker int) int {
	for i, h := range e.by {
		if h.worker == worker {
			return i
		}
	}
	return -1
}

// holdLocked grants n client permits of e to worker.
func (t *Table) holdLocked(e *entry, worker, n int) {
	if i := e.find(worker); i >= 0 {
		e.by[i].n += n
	} else {
		e.by = append(e.by, holding{worker, n})
	}
	e.held += n
	t.changedLocked(e)
	t.touchLocked(e)
}

// releaseLocked takes back n of the client permits e.by[i] holds.
func (t *Table) releaseLocked(e *entry, i, n int) {
	e.by[i].n -= n
	e.held -= n
	if e.by[i].n == 0 {
		e.by = append(e.by[:i], e.by[i+1:]...)
	}
	t.changedLocked(e)
	t.touchLocked(e)
}

func (t *Table) changedLocked(e *entry) {
	if t.tracking {
		t.dirty[e.key] = struct{}{}
	}
}

// touchLocked puts e where it belongs: at the idle list's end (most
// recently used) when it holds nothing, off the list otherwise.
func (t *Table) touchLocked(e *entry) {
	t.unlinkLocked(e)
	if e.held == 0 && e.reserve == 0 {
		t.pushIdleLocked(e)
	}
}

func (t *Table) pushIdleLocked(e *entry) {
	e.idle, e.prev, e.next = true, t.tail, nil
	if t.tail != nil {
		t.tail.next = e
	} else {
		t.head = e
	}
	t.tail = e
}

func (t *Table) unlinkLocked(e *entry) {
	if !e.idle {
		return
	}
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		t.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		t.tail = e.prev
	}
	e.prev, e.next, e.idle = nil, nil, false
}
