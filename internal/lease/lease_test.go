package lease

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// direct is a Transport calling a Pool in-process.
type direct struct {
	p  *Pool
	id int
}

func (d direct) Request(want int, _ bool) (int, error) { return d.p.Grant(d.id, want), nil }
func (d direct) Return(n int) {
	if err := d.p.Return(d.id, n); err != nil {
		panic(err)
	}
}

func TestBlockSize(t *testing.T) {
	for _, tc := range []struct{ limit, workers, want int }{
		{10, 2, 1}, {10000, 2, 64}, {1000, 4, 31}, {1, 0, 1}, {100, 1, 12},
	} {
		if got := BlockSize(tc.limit, tc.workers); got != tc.want {
			t.Errorf("BlockSize(%d, %d) = %d; want %d", tc.limit, tc.workers, got, tc.want)
		}
	}
}

func TestPoolNeverOvergrants(t *testing.T) {
	p := NewPool(10)
	if n := p.Grant(1, 7); n != 7 {
		t.Fatalf("grant %d; want 7", n)
	}
	if n := p.Grant(2, 7); n != 3 {
		t.Fatalf("grant %d; want the 3 left", n)
	}
	if n := p.Grant(2, 1); n != 0 {
		t.Fatalf("grant %d from an empty pool", n)
	}
	if err := p.Return(1, 8); err == nil {
		t.Error("returning more than held succeeded")
	}
	if n := p.Drop(1); n != 7 {
		t.Errorf("Drop returned %d; want 7", n)
	}
	p.SetReserve(5)
	if n := p.Grant(3, 10); n != 2 {
		t.Errorf("grant with reserve 5 and 3 held: %d; want 2", n)
	}
	p.SetReserve(0)
	if got := p.Free(); got != 5 {
		t.Errorf("free %d; want 5", got)
	}
}

func TestClientExactAtSmallLimit(t *testing.T) {
	// max_connections 10 over two workers: exactly 10 of 20 admitted.
	p := NewPool(10)
	block := BlockSize(10, 2)
	a, b := NewClient(direct{p, 1}, block), NewClient(direct{p, 2}, block)
	admitted := 0
	for i := range 20 {
		c := a
		if i%2 == 1 {
			c = b
		}
		if c.Acquire() {
			admitted++
		}
	}
	if admitted != 10 {
		t.Errorf("admitted %d; want 10", admitted)
	}
	a.Release()
	if !b.Acquire() && !a.Acquire() {
		t.Error("no permit after a release")
	}
}

func TestClientsRespectLimitConcurrently(t *testing.T) {
	const limit = 100
	p := NewPool(limit)
	clients := []*Client{NewClient(direct{p, 1}, BlockSize(limit, 3)), NewClient(direct{p, 2}, BlockSize(limit, 3)), NewClient(direct{p, 3}, BlockSize(limit, 3))}
	var open, peak atomic.Int64
	var wg sync.WaitGroup
	for g := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := clients[g%len(clients)]
			for range 2000 {
				if !c.Acquire() {
					continue
				}
				n := open.Add(1)
				for {
					old := peak.Load()
					if n <= old || peak.CompareAndSwap(old, n) {
						break
					}
				}
				if n > limit {
					t.Errorf("%d connections open; limit %d", n, limit)
				}
				open.Add(-1)
				c.Release()
			}
		}()
	}
	wg.Wait()
	// A background refill may still be landing: wait for it, bounded.
	var total, held int
	for range 1000 {
		total, _ = p.Held()
		held = 0
		for _, c := range clients {
			held += c.Spare()
		}
		if total == held {
			break
		}
		time.Sleep(time.Millisecond) // poll the condition, 1000 times at most
	}
	for _, c := range clients {
		if c.InUse() != 0 {
			t.Errorf("client has %d in use after all released", c.InUse())
		}
	}
	if total != held {
		t.Errorf("pool says %d granted; clients hold %d spares", total, held)
	}
	if peak.Load() == 0 {
		t.Error("nothing was ever admitted")
	}
}

func TestRevokeReturnsSpares(t *testing.T) {
	p := NewPool(64)
	a := NewClient(direct{p, 1}, 16)
	a.Acquire() // takes a block of 16: 15 spare
	if got := a.Spare(); got != 15 {
		t.Fatalf("spare %d; want 15", got)
	}
	if n := a.Revoke(100); n != 15 {
		t.Errorf("revoked %d; want 15", n)
	}
	if got := p.Free(); got != 63 {
		t.Errorf("free %d; want 63", got)
	}
}

func TestDrainKeepsNoSpares(t *testing.T) {
	p := NewPool(64)
	a := NewClient(direct{p, 1}, 16)
	for range 3 {
		a.Acquire() // one block: 13 spare
	}
	a.Drain()
	if got, free := a.Spare(), p.Free(); got != 0 || free != 61 {
		t.Fatalf("after Drain: spare %d, pool free %d; want 0 and 61 (3 in use)", got, free)
	}
	a.Release()
	a.Release()
	if got, free := a.Spare(), p.Free(); got != 0 || free != 63 {
		t.Fatalf("released twice while draining: spare %d, pool free %d; want 0 and 63", got, free)
	}
}

// BenchmarkAcquireRelease is the per-connection cost of the global limit on
// a worker's accept path: no IPC unless a block runs out.
func BenchmarkAcquireRelease(b *testing.B) {
	p := NewPool(10000)
	c := NewClient(direct{p, 1}, BlockSize(10000, 2))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if c.Acquire() {
				c.Release()
			}
		}
	})
}

// slow is a Transport whose requests take a while, like an IPC round trip
// under load.
type slow struct{ direct }

func (s slow) Request(want int, urgent bool) (int, error) {
	time.Sleep(2 * time.Millisecond) // deliberate: the slow round trip
	return s.direct.Request(want, urgent)
}

func TestBurstDoesNotStarve(t *testing.T) {
	// 3000 connections at once against a limit of 4020 with blocks of 64:
	// concurrent requests must not drain the pool into spares and refuse
	// connections while permits are there.
	p := NewPool(4020)
	c := NewClient(slow{direct{p, 1}}, BlockSize(4020, 1))
	var wg sync.WaitGroup
	var refused atomic.Int64
	for range 3000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !c.Acquire() {
				refused.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := refused.Load(); n != 0 {
		t.Errorf("%d of 3000 refused under a limit of 4020", n)
	}
}

// gated answers a request only when told to.
type gated struct {
	direct
	gate chan struct{}
}

func (g gated) Request(want int, urgent bool) (int, error) {
	select {
	case <-g.gate:
	case <-time.After(10 * time.Second):
		return 0, errors.New("gated: never answered")
	}
	return g.direct.Request(want, urgent)
}

// answer lets one request through, or fails the test if none comes.
func (g gated) answer(t *testing.T) {
	t.Helper()
	select {
	case g.gate <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("no request took the answer in 10s")
	}
}

// AcquireSpareOrWait says to wait only while a request is under way, and
// the watcher hears once when its answer lands, permits or none.
func TestAcquireSpareOrWait(t *testing.T) {
	p := NewPool(6)
	g := gated{direct{p, 1}, make(chan struct{}, 1)}
	c := NewClient(g, 4)
	landed := make(chan struct{}, 8)
	c.Watch(func() { landed <- struct{}{} })
	if ok, wait := c.AcquireSpareOrWait(); ok || wait {
		t.Fatalf("no spares, nothing asked: got ok %v wait %v; want neither", ok, wait)
	}
	g.answer(t)
	if !c.Acquire() { // the first block: 4, 1 in use
		t.Fatal("Acquire failed")
	}
	for range 2 { // spares 3 → 1: a refill starts, held at the gate
		if ok, _ := c.AcquireSpareOrWait(); !ok {
			t.Fatal("a spare was refused")
		}
	}
	if ok, _ := c.AcquireSpareOrWait(); !ok {
		t.Fatal("the last spare was refused")
	}
	if ok, wait := c.AcquireSpareOrWait(); ok || !wait {
		t.Fatalf("no spare, a refill under way: got ok %v wait %v; want to wait", ok, wait)
	}
	select {
	case <-landed:
		t.Fatal("the watcher heard before the answer")
	default:
	}
	g.answer(t) // the refill lands: 2 (the pool's last)
	select {
	case <-landed:
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher never heard of the answer")
	}
	for range 2 {
		if ok, _ := c.AcquireSpareOrWait(); !ok {
			t.Fatal("a permit of the refill was refused")
		}
	}
	// A refill started by the last take gets nothing: told once, then
	// neither a permit nor a wait.
	if ok, wait := c.AcquireSpareOrWait(); ok || !wait {
		t.Fatalf("pool dry, a refill under way: got ok %v wait %v; want to wait", ok, wait)
	}
	g.answer(t)
	select {
	case <-landed:
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher never heard of the empty answer")
	}
	if ok, wait := c.AcquireSpareOrWait(); ok || wait {
		t.Fatalf("pool dry, nothing under way: got ok %v wait %v; want neither", ok, wait)
	}
	if len(landed) != 0 {
		t.Errorf("the watcher heard %d more times", len(landed))
	}
}
