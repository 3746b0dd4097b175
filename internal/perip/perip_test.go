package perip

import (
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

// clock is a settable time for tests.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var (
	a = netip.MustParseAddr("192.0.2.1")
	b = netip.MustParseAddr("192.0.2.2")
)

func TestKey(t *testing.T) {
	for _, tc := range []struct {
		in     string
		prefix int
		want   string
	}{
		{"192.0.2.7", 64, "192.0.2.7"},
		{"::ffff:192.0.2.7", 64, "192.0.2.7"},
		{"2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::"},
		{"2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::"},
		{"2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::"},
		{"2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6"},
		{"fe80::1%eth0", 64, "fe80::"},
	} {
		if got := Key(netip.MustParseAddr(tc.in), tc.prefix); got.String() != tc.want {
			t.Errorf("Key(%s, %d) = %s, want %s", tc.in, tc.prefix, got, tc.want)
		}
	}
	// Two addresses of one /64 are one client; of two /64s, two.
	tb := NewTable(Limits{Conns: 1}, 10, nil)
	k1 := Key(netip.MustParseAddr("2001:db8::1"), 64)
	k2 := Key(netip.MustParseAddr("2001:db8::2"), 64)
	k3 := Key(netip.MustParseAddr("2001:db8:0:1::1"), 64)
	if g := tb.Grant(1, k1, 1, 0); g.Conns != 1 {
		t.Fatalf("first grant %+v", g)
	}
	if g := tb.Grant(1, k2, 1, 0); g.Conns != 0 {
		t.Errorf("same /64 granted again: %+v", g)
	}
	if g := tb.Grant(1, k3, 1, 0); g.Conns != 1 {
		t.Errorf("another /64 refused: %+v", g)
	}
}

func TestTableConns(t *testing.T) {
	tb := NewTable(Limits{Conns: 5}, 10, nil)
	if g := tb.Grant(1, a, 3, 0); g.Conns != 3 {
		t.Fatalf("grant 3 of 5: %+v", g)
	}
	if g := tb.Grant(2, a, 3, 0); g.Conns != 2 {
		t.Fatalf("grant 3 of the 2 left: %+v", g)
	}
	if g := tb.Grant(2, a, 1, 0); g.Conns != 0 || g.Retry <= 0 {
		t.Fatalf("grant at the limit: %+v", g)
	}
	if g := tb.Grant(2, b, 5, 0); g.Conns != 5 {
		t.Fatalf("another client: %+v", g)
	}
	if err := tb.Return(2, a, 3, 0); err == nil {
		t.Error("worker 2 returned 3 client permits it does not hold")
	}
	if err := tb.Return(1, a, 1, 0); err != nil {
		t.Fatal(err)
	}
	if h, _ := tb.Held(a); h != 4 {
		t.Errorf("held %d, want 4", h)
	}
	if n := tb.Drop(2); n != 7 {
		t.Errorf("Drop(2) = %d, want 7 (2 of a, 5 of b)", n)
	}
	if h, _ := tb.Held(a); h != 2 {
		t.Errorf("held %d after drop, want 2", h)
	}
}

func TestTableRate(t *testing.T) {
	clk := newClock()
	tb := NewTable(Limits{Rate: 2}, 10, clk.now) // burst 2
	if g := tb.Grant(1, a, 0, 5); g.Tokens != 2 {
		t.Fatalf("burst: %+v", g)
	}
	g := tb.Grant(1, a, 0, 1)
	if g.Tokens != 0 || g.Retry != 500*time.Millisecond {
		t.Fatalf("empty bucket: %+v, want retry 500ms", g)
	}
	clk.add(499 * time.Millisecond)
	if g := tb.Grant(1, a, 0, 1); g.Tokens != 0 {
		t.Fatalf("token before its time: %+v", g)
	}
	clk.add(time.Millisecond)
	if g := tb.Grant(1, a, 0, 1); g.Tokens != 1 {
		t.Fatalf("token after 500ms: %+v", g)
	}
	clk.add(time.Hour)
	if g := tb.Grant(1, a, 0, 10); g.Tokens != 2 {
		t.Fatalf("bucket holds more than its burst: %+v", g)
	}
	// Returned tokens go back, up to the burst.
	if err := tb.Return(1, a, 0, 5); err != nil {
		t.Fatal(err)
	}
	if g := tb.Grant(1, a, 0, 10); g.Tokens != 2 {
		t.Fatalf("after a return: %+v, want the burst", g)
	}
	// A rate below 1 has a burst of 1.
	tb = NewTable(Limits{Rate: 0.5}, 10, clk.now)
	if g := tb.Grant(1, a, 0, 5); g.Tokens != 1 {
		t.Fatalf("burst of rate 0.5: %+v", g)
	}
	if g := tb.Grant(1, a, 0, 1); g.Retry != 2*time.Second {
		t.Fatalf("retry at rate 0.5: %+v", g)
	}
}

func TestTableGrantWholeOrNothing(t *testing.T) {
	clk := newClock()
	tb := NewTable(Limits{Conns: 10, Rate: 1}, 10, clk.now)
	if g := tb.Grant(1, a, 1, 1); g.Conns != 1 || g.Tokens != 1 {
		t.Fatalf("%+v", g)
	}
	if g := tb.Grant(1, a, 1, 1); g.Conns != 0 || g.Tokens != 0 {
		t.Fatalf("no token, yet %+v", g)
	}
	if h, _ := tb.Held(a); h != 1 {
		t.Errorf("a refused request holds client permits: %d", h)
	}
}

func key(i uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], i)
	return netip.AddrFrom4(b)
}

// TestTableBoundedUnderFlood: a million distinct clients leave at most
// size keys, in bounded memory, and refuse nobody.
func TestTableBoundedUnderFlood(t *testing.T) {
	const size, n = 100_000, 1_000_000
	clk := newClock()
	tb := NewTable(Limits{Conns: 2, Rate: 10}, size, clk.now)
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := range uint32(n) {
		k := key(i)
		if g := tb.Grant(1, k, 1, 1); g.Conns != 1 || g.Tokens != 1 {
			t.Fatalf("client %d refused: %+v", i, g)
		}
		if err := tb.Return(1, k, 1, 0); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	keys, full := tb.Len()
	if keys > size || full != 0 {
		t.Fatalf("%d keys (size %d), %d refused as full", keys, size, full)
	}
	grown := int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
	t.Logf("%d distinct clients: %d keys, heap +%.1f MiB (%.0f B/key)", n, keys, float64(grown)/(1<<20), float64(grown)/float64(keys))
	if grown > 40<<20 {
		t.Errorf("heap grew %d bytes for %d keys", grown, keys)
	}
	// Keys that hold client permits are never evicted; when every key holds one,
	// a new client is refused (and counted), not another's client permit taken.
	tb = NewTable(Limits{Conns: 1}, 3, clk.now)
	for i := range uint32(3) {
		tb.Grant(1, key(i), 1, 0)
	}
	if g := tb.Grant(1, key(99), 1, 0); g.Conns != 0 {
		t.Fatalf("full table granted %+v", g)
	}
	if _, full := tb.Len(); full != 1 {
		t.Errorf("refused as full: %d, want 1", full)
	}
	tb.Return(1, key(1), 1, 0)
	if g := tb.Grant(1, key(99), 1, 0); g.Conns != 1 {
		t.Fatalf("after a key went idle: %+v", g)
	}
	if h, _ := tb.Held(key(0)); h != 1 {
		t.Errorf("a key holding a client permit was evicted")
	}
	// Sweep forgets idle keys with full buckets.
	tb = NewTable(Limits{Conns: 1, Rate: 1}, 10, clk.now)
	tb.Grant(1, a, 1, 1)
	tb.Grant(1, b, 1, 1)
	tb.Return(1, a, 1, 0)
	if n := tb.Sweep(); n != 2 {
		t.Errorf("swept a key whose bucket is not full: %d left", n)
	}
	clk.add(time.Second)
	if n := tb.Sweep(); n != 1 {
		t.Errorf("%d keys left after the sweep, want 1 (b holds a client permit)", n)
	}
}

// TestTableSuccession: the successor counts the predecessor's client permits as
// reserves per key, follows their changes, and inherits buckets.
func TestTableSuccession(t *testing.T) {
	clk := newClock()
	old := NewTable(Limits{Conns: 3, Rate: 1}, 10, clk.now)
	old.Grant(1, a, 3, 1)
	st := old.Snapshot()
	js, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var got State
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	succ := NewTable(Limits{Conns: 3, Rate: 1}, 10, clk.now)
	succ.Inherit(&got)
	if g := succ.Grant(7, a, 1, 0); g.Conns != 0 {
		t.Fatalf("successor granted over the predecessor's client permits: %+v (state %s)", g, js)
	}
	if g := succ.Grant(7, b, 1, 1); g.Conns != 1 {
		t.Fatalf("another client: %+v", g)
	}
	if c := old.Changes(); c != nil {
		t.Fatalf("changes with none: %v", c)
	}
	old.Return(1, a, 1, 0)
	c := old.Changes()
	if c[a] != 2 || len(c) != 1 {
		t.Fatalf("changes %v, want a: 2", c)
	}
	for k, n := range c {
		succ.SetReserve(k, n)
	}
	// One client permit free now, but the bucket (inherited empty) has no token.
	if g := succ.Grant(7, a, 1, 1); g.Conns != 0 {
		t.Fatalf("inherited empty bucket gave a token: %+v", g)
	}
	clk.add(time.Second)
	if g := succ.Grant(7, a, 1, 1); g.Conns != 1 {
		t.Fatalf("a client permit came free: %+v", g)
	}
	succ.ClearReserves()
	if _, r := succ.Held(a); r != 0 {
		t.Errorf("reserve %d after the predecessor exited", r)
	}
}

// fakeTransport answers from a Table, counting requests.
type fakeTransport struct {
	tb     *Table
	worker int
	mu     sync.Mutex
	reqs   int
}

func (f *fakeTransport) Request(key netip.Addr, conns, tokens int) (Grant, error) {
	f.mu.Lock()
	f.reqs++
	f.mu.Unlock()
	return f.tb.Grant(f.worker, key, conns, tokens), nil
}

func (f *fakeTransport) Return(key netip.Addr, conns, tokens int) {
	if err := f.tb.Return(f.worker, key, conns, tokens); err != nil {
		panic(err)
	}
}

func (f *fakeTransport) requests() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs
}

// TestClientLeaseReuse: N connections from one client, one after another
// and some at once, cost one round trip.
func TestClientLeaseReuse(t *testing.T) {
	clk := newClock()
	tb := NewTable(Limits{Conns: 100}, 10, clk.now)
	ft := &fakeTransport{tb: tb, worker: 1}
	c := NewClient(ft, Limits{Conns: 100}, 64, 2, clk.now)
	for range 50 {
		if !c.Acquire(a) {
			t.Fatal("refused")
		}
		c.Release(a)
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			if !c.Acquire(a) {
				t.Error("refused")
			}
		})
	}
	wg.Wait()
	if r := ft.requests(); r != 1 {
		t.Errorf("60 connections cost %d round trips, want 1", r)
	}
	for range 10 {
		c.Release(a)
	}
	if h, _ := tb.Held(a); h != c.block {
		t.Errorf("master counts %d client permits, want the lease of %d", h, c.block)
	}
	for range sweepsTTL - 1 {
		c.Sweep()
	}
	if h, _ := tb.Held(a); h != c.block {
		t.Errorf("spares given back after %d sweeps", sweepsTTL-1)
	}
	c.Sweep()
	if h, _ := tb.Held(a); h != 0 || c.Leases() != 0 {
		t.Errorf("after SpareTTL unused: master holds %d, client %d leases", h, c.Leases())
	}
}

// TestClientLimitAcrossWorkers: two workers' clients never admit more than
// the limit between them, and a refused client is refused locally until
// the retry passes.
func TestClientLimitAcrossWorkers(t *testing.T) {
	clk := newClock()
	lim := Limits{Conns: 3}
	tb := NewTable(lim, 10, clk.now)
	t1, t2 := &fakeTransport{tb: tb, worker: 1}, &fakeTransport{tb: tb, worker: 2}
	c1, c2 := NewClient(t1, lim, 64, 2, clk.now), NewClient(t2, lim, 64, 2, clk.now)
	admitted := 0
	for i := range 10 {
		c := c1
		if i%2 == 1 {
			c = c2
		}
		if c.Acquire(a) {
			admitted++
		}
	}
	if admitted != 3 {
		t.Fatalf("admitted %d, want 3", admitted)
	}
	before := t1.requests() + t2.requests()
	for range 100 {
		c1.Acquire(a)
	}
	if r := t1.requests() + t2.requests(); r != before {
		t.Errorf("refusals within the retry asked the master %d times", r-before)
	}
	if !c1.Acquire(b) {
		t.Error("another client refused")
	}
	c2.Release(a)
	for range sweepsTTL {
		c2.Sweep()
	}
	clk.add(denyRetry)
	if !c1.Acquire(a) {
		t.Error("refused after a sibling's client permit came back")
	}
}

func TestClientRate(t *testing.T) {
	clk := newClock()
	lim := Limits{Rate: 4}
	tb := NewTable(lim, 10, clk.now)
	ft := &fakeTransport{tb: tb, worker: 1}
	c := NewClient(ft, lim, 64, 1, clk.now)
	n := 0
	for range 20 {
		if c.Acquire(a) {
			n++
		}
	}
	if n != 4 {
		t.Fatalf("admitted %d at once, want the burst of 4", n)
	}
	if r := ft.requests(); r > 3 {
		t.Errorf("%d round trips for 20 connections", r)
	}
	clk.add(500 * time.Millisecond)
	n = 0
	for range 20 {
		if c.Acquire(a) {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("admitted %d after 500ms at 4/s, want 2", n)
	}
}

// BenchmarkClientAcquireWarm is the admit check with a warm lease (the
// cost on the accept path of every connection but a client's first): the
// key, Acquire, and the Release when the connection ends.
func BenchmarkClientAcquireWarm(b *testing.B) {
	for _, addr := range []string{"192.0.2.1", "2001:db8::1"} {
		b.Run(addr, func(b *testing.B) {
			lim := Limits{Conns: 1000}
			tb := NewTable(lim, 10, nil)
			c := NewClient(&fakeTransport{tb: tb, worker: 1}, lim, 64, 1, nil)
			a := netip.MustParseAddr(addr)
			c.Acquire(c.Key(a))
			b.ReportAllocs()
			for b.Loop() {
				k := c.Key(a)
				if !c.Acquire(k) {
					b.Fatal("refused")
				}
				c.Release(k)
			}
		})
	}
}

// TestClientSpareBeatsRefusal: a client permit freed locally admits the client's
// next connection at once, even within the retry of a refusal.
func TestClientSpareBeatsRefusal(t *testing.T) {
	clk := newClock()
	lim := Limits{Conns: 1}
	ft := &fakeTransport{tb: NewTable(lim, 10, clk.now), worker: 1}
	c := NewClient(ft, lim, 64, 1, clk.now)
	if !c.Acquire(a) || c.Acquire(a) {
		t.Fatal("want the first admitted, the second refused")
	}
	c.Release(a)
	if !c.Acquire(a) {
		t.Error("refused with a spare client permit in hand")
	}
}

// TestClientDrain: a retiring worker gives its spares back at once and
// each client permit as its connection closes.
func TestClientDrain(t *testing.T) {
	clk := newClock()
	lim := Limits{Conns: 10, Rate: 100}
	tb := NewTable(lim, 10, clk.now)
	c := NewClient(&fakeTransport{tb: tb, worker: 1}, lim, 64, 1, clk.now)
	c.Acquire(a)
	c.Acquire(a)
	c.Drain()
	if h, _ := tb.Held(a); h != 2 {
		t.Fatalf("held %d after Drain; want the 2 in use", h)
	}
	c.Release(a)
	if h, _ := tb.Held(a); h != 1 {
		t.Fatalf("held %d after a close while draining; want 1", h)
	}
}

// TestClientBoundedUnderFlood: a worker's leases of clients with no open
// connection stay bounded under a flood of distinct sources.
func TestClientBoundedUnderFlood(t *testing.T) {
	lim := Limits{Conns: 4}
	tb := NewTable(lim, 1_000_000, nil)
	c := NewClient(&fakeTransport{tb: tb, worker: 1}, lim, 64, 1, nil)
	for i := range uint32(maxLeases + 50_000) {
		k := key(i)
		if !c.Acquire(k) {
			t.Fatalf("client %d refused", i)
		}
		c.Release(k)
	}
	if n := c.Leases(); n > maxLeases+1 {
		t.Errorf("%d leases held; want at most %d", n, maxLeases+1)
	}
	for range sweepsTTL {
		c.Sweep()
	}
	if n := c.Leases(); n != 0 {
		t.Errorf("after the sweeps: %d leases in the worker; want 0", n)
	}
	var held int
	for i := range uint32(maxLeases + 50_000) {
		h, _ := tb.Held(key(i))
		held += h
	}
	if held != 0 {
		t.Errorf("the table still counts %d client permits", held)
	}
}

// TestTransferAndAdopt: the client permit of a moved connection is
// granted to the worker that resumes it whatever the limit, counts
// against the client until that connection closes, and then goes back
// like any other.
func TestTransferAndAdopt(t *testing.T) {
	clk := newClock()
	lim := Limits{Conns: 2}
	tb := NewTable(lim, 1, clk.now)
	// The predecessor held 2 of a's client permits; both connections move.
	tb.SetReserve(a, 2)
	tb.Transfer(1, a)
	tb.SetReserve(a, 1) // the first arrived: no longer in flight
	tb.Transfer(2, a)
	tb.SetReserve(a, 0)
	if h, r := tb.Held(a); h != 2 || r != 0 {
		t.Fatalf("after two transfers: held %d, reserve %d; want 2, 0", h, r)
	}
	if g := tb.Grant(3, a, 1, 0); g.Conns != 0 {
		t.Fatalf("a third connection of a client at its limit of 2 was granted: %+v", g)
	}
	// Over the limit (the client had 2 here and 1 elsewhere) and over the
	// table's size of 1: still counted, never refused.
	tb.Transfer(2, a)
	tb.Transfer(2, b)
	if h, _ := tb.Held(a); h != 3 {
		t.Fatalf("held %d after a transfer over the limit; want 3", h)
	}
	if h, _ := tb.Held(b); h != 1 {
		t.Fatalf("held %d of a key over the table's size; want 1", h)
	}

	c := NewClient(&fakeTransport{tb: tb, worker: 2}, lim, 64, 1, clk.now)
	for _, k := range []netip.Addr{a, a, b} {
		if !c.Adopt(k) {
			t.Fatalf("Adopt(%v) counted nothing", k)
		}
	}
	c.Release(a)
	c.Release(b)
	c.Drain() // the spares go back; the connection still open keeps its permit
	if h, _ := tb.Held(a); h != 2 {
		t.Fatalf("held %d with worker 1's and one adopted connection open; want 2", h)
	}
	if h, _ := tb.Held(b); h != 0 {
		t.Fatalf("held %d of b after its connection closed; want 0", h)
	}
	c.Release(a) // returns it, or fakeTransport panics on a permit not held
	if h, _ := tb.Held(a); h != 1 {
		t.Fatalf("held %d after the adopted connections closed; want worker 1's 1", h)
	}

	// Limit off: nothing is counted on either side.
	off := NewTable(Limits{Rate: 5}, 10, clk.now)
	off.Transfer(1, a)
	if h, _ := off.Held(a); h != 0 {
		t.Errorf("per_ip_connections off: Transfer counted %d", h)
	}
	if NewClient(&fakeTransport{tb: off, worker: 1}, Limits{Rate: 5}, 64, 1, clk.now).Adopt(a) {
		t.Error("per_ip_connections off: Adopt counted a client permit")
	}
}
