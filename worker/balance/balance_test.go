package balance

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
)

// pool builds backends named b0, b1, ... with the given weights.
func pool(weights ...int) []Backend {
	bs := make([]Backend, len(weights))
	for i, w := range weights {
		bs[i] = Backend{Key: fmt.Sprintf("10.0.0.%d:443", i+1), Weight: w}
	}
	return bs
}

func mustNew(t testing.TB, p Policy, bs []Backend, opt Options) *Balancer {
	t.Helper()
	b, err := New(p, bs, opt)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// seeded returns a deterministic random source for random_two.
func seeded() Options {
	r := rand.New(rand.NewPCG(1, 2))
	return Options{IntN: r.IntN}
}

// addr returns the i-th of a deterministic set of client addresses, IPv4
// and IPv6 mixed.
func addr(i int) netip.Addr {
	if i%4 == 3 {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i), 14: byte(i >> 8), 13: byte(i >> 16)})
	}
	return netip.AddrFrom4([4]byte{192, byte(i >> 16), byte(i >> 8), byte(i)})
}

func allUp(int) bool { return true }

func TestNewErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		bs   []Backend
		want error
	}{
		{"none", nil, ErrNoBackend},
		{"zero weight", []Backend{{Key: "a", Weight: 0}}, ErrWeight},
		{"huge weight", []Backend{{Key: "a", Weight: MaxWeight + 1}}, ErrWeight},
		{"all backups", []Backend{{Key: "a", Weight: 1, Backup: true}}, ErrNoPrimary},
		{"duplicate", []Backend{{Key: "a", Weight: 1}, {Key: "a", Weight: 2}}, ErrDuplicateKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(RoundRobin, tc.bs, Options{}); !errors.Is(err, tc.want) {
				t.Errorf("got %v; want %v", err, tc.want)
			}
		})
	}
	if _, err := New(Policy(9), pool(1), Options{}); err == nil {
		t.Error("unknown policy accepted")
	}
}

func TestParsePolicy(t *testing.T) {
	for _, p := range []Policy{RoundRobin, LeastConn, RandomTwo, SourceHash} {
		got, err := ParsePolicy(p.String())
		if err != nil || got != p {
			t.Errorf("ParsePolicy(%q) = %v, %v", p, got, err)
		}
	}
	if p, err := ParsePolicy(""); p != RoundRobin || err != nil {
		t.Errorf(`ParsePolicy("") = %v, %v; want round_robin`, p, err)
	}
	if _, err := ParsePolicy("fastest"); err == nil {
		t.Error("unknown policy parsed")
	}
}

func TestSmoothRoundRobinSequence(t *testing.T) {
	b := mustNew(t, RoundRobin, pool(5, 1, 1), Options{})
	var got strings.Builder
	for range 14 {
		got.WriteByte("abc"[b.Pick(nil, netip.Addr{}, nil)[0]])
	}
	// nginx's sequence for weights 5, 1, 1, twice.
	if want := "aabacaaaabacaa"; got.String() != want {
		t.Errorf("sequence %s; want %s", got.String(), want)
	}
}

func TestRoundRobinFailoverOrder(t *testing.T) {
	b := mustNew(t, RoundRobin, pool(1, 1, 1, 1), Options{})
	for k, want := range [][]int{{0, 1, 2, 3}, {1, 2, 3, 0}, {2, 3, 0, 1}, {3, 0, 1, 2}} {
		if got := b.Pick(nil, netip.Addr{}, allUp); !slices.Equal(got, want) {
			t.Errorf("pick %d: %v; want %v", k, got, want)
		}
	}
}

// counts picks first choices over n picks; hold keeps each picked
// connection active (for least_conn), as long connections do.
func counts(b *Balancer, n int, hold bool, up func(int) bool) []int {
	c := make([]int, b.Len())
	var buf [16]int
	for i := range n {
		o := b.Pick(buf[:0], addr(i), up)
		c[o[0]]++
		if hold {
			b.Acquire(o[0])
		}
	}
	return c
}

func TestWeightedDistribution(t *testing.T) {
	for _, tc := range []struct {
		p    Policy
		hold bool
		tol  int // allowed distance from 1000, 2000, 3000
	}{
		{RoundRobin, false, 0},
		{LeastConn, true, 1},
		{LeastConn, false, 0}, // short connections: every pick a tie
		{RandomTwo, false, 150},
		{RandomTwo, true, 10},
		{SourceHash, false, 150},
	} {
		t.Run(fmt.Sprintf("%v/hold=%v", tc.p, tc.hold), func(t *testing.T) {
			b := mustNew(t, tc.p, pool(1, 2, 3), seeded())
			got := counts(b, 6000, tc.hold, allUp)
			for i, want := range []int{1000, 2000, 3000} {
				if d := got[i] - want; d < -tc.tol || d > tc.tol {
					t.Errorf("backend %d: %d picks; want %d ± %d (all: %v)", i, got[i], want, tc.tol, got)
				}
			}
		})
	}
}

func TestLeastConn(t *testing.T) {
	b := mustNew(t, LeastConn, pool(1, 1, 2), Options{})
	// 0 has 3, 1 has 1, 2 has 4 with weight 2 (2 per unit): 1 is least.
	for i, n := range []int{3, 1, 4} {
		for range n {
			b.Acquire(i)
		}
	}
	if got := b.Pick(nil, netip.Addr{}, allUp); !slices.Equal(got, []int{1, 2, 0}) {
		t.Errorf("order %v; want [1 2 0] (least loaded first, then cyclic)", got)
	}
	if got := b.Pick(nil, netip.Addr{}, func(i int) bool { return i != 1 }); got[0] != 2 {
		t.Errorf("with 1 down: %v; want 2 first (2 per unit of weight < 3)", got)
	}
	b.Release(2)
	b.Release(2)
	b.Release(1)
	if b.Active(1) != 0 || b.Active(2) != 2 {
		t.Errorf("active %d %d; want 0 2", b.Active(1), b.Active(2))
	}
	// Ties go round robin (weighted; see TestWeightedDistribution).
	e := mustNew(t, LeastConn, pool(1, 1, 1), Options{})
	if got := counts(e, 300, false, allUp); !slices.Equal(got, []int{100, 100, 100}) {
		t.Errorf("ties: %v; want 100 each", got)
	}
}

func TestRandomTwoAvoidsTheLoaded(t *testing.T) {
	b := mustNew(t, RandomTwo, pool(1, 1, 1), seeded())
	for range 100 {
		b.Acquire(0)
	}
	got := counts(b, 3000, false, allUp)
	// Backend 0 loses every draw it is in, and two distinct are drawn.
	if got[0] != 0 || got[1]+got[2] != 3000 || got[1] < 1300 || got[2] < 1300 {
		t.Errorf("picks %v; want none for the loaded backend, the rest shared", got)
	}
	// The random source is injected: the same seed, the same sequence.
	b1, b2 := mustNew(t, RandomTwo, pool(1, 2, 3, 4), seeded()), mustNew(t, RandomTwo, pool(1, 2, 3, 4), seeded())
	for i := range 100 {
		if o1, o2 := b1.Pick(nil, netip.Addr{}, nil), b2.Pick(nil, netip.Addr{}, nil); !slices.Equal(o1, o2) {
			t.Fatalf("pick %d: %v and %v from the same seed", i, o1, o2)
		}
	}
}

// owners maps n client addresses to their first choice's key.
func owners(t *testing.T, bs []Backend, n int) []string {
	b := mustNew(t, SourceHash, bs, Options{})
	out := make([]string, n)
	var buf [16]int
	for i := range out {
		out[i] = bs[b.Pick(buf[:0], addr(i), nil)[0]].Key
	}
	return out
}

func TestSourceHashStable(t *testing.T) {
	bs := pool(1, 1, 1, 1)
	a, b := mustNew(t, SourceHash, bs, Options{}), mustNew(t, SourceHash, bs, Options{})
	// Another process may list the backends in another order.
	rev := slices.Clone(bs)
	slices.Reverse(rev)
	r := mustNew(t, SourceHash, rev, Options{})
	for i := range 1000 {
		c := addr(i)
		oa, ob, or := a.Pick(nil, c, nil), b.Pick(nil, c, nil), r.Pick(nil, c, nil)
		if !slices.Equal(oa, ob) {
			t.Fatalf("%v: %v then %v", c, oa, ob)
		}
		for k := range oa {
			if bs[oa[k]].Key != rev[or[k]].Key {
				t.Fatalf("%v: order depends on the config order: %v vs reversed %v", c, oa, or)
			}
		}
		if !slices.Equal(oa, a.Pick(nil, c, nil)) {
			t.Fatalf("%v: a second pick differs", c)
		}
	}
	// An IPv4-mapped address is the IPv4 address.
	v4 := netip.MustParseAddr("192.0.2.7")
	if !slices.Equal(a.Pick(nil, v4, nil), a.Pick(nil, netip.AddrFrom16(v4.As16()), nil)) {
		t.Error("::ffff:192.0.2.7 is ordered unlike 192.0.2.7")
	}
	// A pinned value: the hash has no per-process seed, so this never
	// changes (a change would remap every client on upgrade).
	if got := a.Pick(nil, netip.MustParseAddr("203.0.113.9"), nil); !slices.Equal(got, sourceHashGolden) {
		t.Errorf("203.0.113.9 ordered %v; want %v as in every previous build", got, sourceHashGolden)
	}
}

// sourceHashGolden is the order of pool(1, 1, 1, 1) for 203.0.113.9.
var sourceHashGolden = []int{0, 3, 2, 1}

func TestSourceHashMovement(t *testing.T) {
	const n = 10000
	four, five := pool(1, 1, 1, 1), pool(1, 1, 1, 1, 1)
	before, after := owners(t, four, n), owners(t, five, n)
	moved := 0
	for i := range before {
		if before[i] != after[i] {
			moved++
			if after[i] != five[4].Key {
				t.Fatalf("client %d moved from %s to %s, not to the new backend", i, before[i], after[i])
			}
		}
	}
	if max := n/5 + n/50; moved > max || moved < n/5-n/50 {
		t.Errorf("adding a 5th backend moved %d of %d clients; want about %d (≤ %d)", moved, n, n/5, max)
	}
	// Removing one moves its clients only.
	three := []Backend{four[0], four[2], four[3]}
	after = owners(t, three, n)
	for i := range before {
		if before[i] != after[i] && before[i] != four[1].Key {
			t.Fatalf("client %d moved from %s to %s though %s stayed", i, before[i], after[i], before[i])
		}
	}
	// A backend that is down is skipped in the same way: its clients go to
	// their second choice, everyone else stays.
	b := mustNew(t, SourceHash, four, Options{})
	for i := range 2000 {
		full := b.Pick(nil, addr(i), nil)
		down := b.Pick(nil, addr(i), func(k int) bool { return k != 1 })
		want := slices.DeleteFunc(slices.Clone(full), func(k int) bool { return k == 1 })
		if !slices.Equal(down, want) {
			t.Fatalf("client %d: with 1 down %v; want %v (the full order %v without 1)", i, down, want, full)
		}
	}
}

func TestBackupsAndAllDown(t *testing.T) {
	bs := []Backend{
		{Key: "p0", Weight: 1}, {Key: "b1", Weight: 1, Backup: true},
		{Key: "p2", Weight: 1}, {Key: "b3", Weight: 1, Backup: true},
	}
	for _, p := range []Policy{RoundRobin, LeastConn, RandomTwo, SourceHash} {
		t.Run(p.String(), func(t *testing.T) {
			b := mustNew(t, p, bs, seeded())
			for _, tc := range []struct {
				name string
				up   []int
				want [][]int // the set of candidates, in groups whose order is the policy's
			}{
				{"all up", []int{0, 1, 2, 3}, [][]int{{0, 2}}},
				{"one primary up", []int{1, 2, 3}, [][]int{{2}}},
				{"primaries down", []int{1, 3}, [][]int{{1, 3}}},
				{"one backup up", []int{3}, [][]int{{3}}},
				{"nothing up", nil, [][]int{{0, 2}, {1, 3}}},
			} {
				up := func(i int) bool { return slices.Contains(tc.up, i) }
				for k := range 20 {
					got := b.Pick(nil, addr(k), up)
					rest := got
					for _, g := range tc.want {
						if len(rest) < len(g) {
							t.Fatalf("%s: %v; want groups %v", tc.name, got, tc.want)
						}
						s := slices.Clone(rest[:len(g)])
						slices.Sort(s)
						if !slices.Equal(s, g) {
							t.Fatalf("%s: %v; want groups %v", tc.name, got, tc.want)
						}
						rest = rest[len(g):]
					}
					if len(rest) != 0 {
						t.Fatalf("%s: %v; want groups %v", tc.name, got, tc.want)
					}
				}
			}
		})
	}
}

func TestUpCalledOncePerBackend(t *testing.T) {
	b := mustNew(t, RoundRobin, []Backend{{Key: "a", Weight: 1}, {Key: "b", Weight: 1, Backup: true}}, Options{})
	calls := map[int]int{}
	b.Pick(nil, netip.Addr{}, func(i int) bool { calls[i]++; return false })
	for i, n := range calls {
		if n != 1 {
			t.Errorf("up(%d) called %d times", i, n)
		}
	}
}

func TestPickAppends(t *testing.T) {
	b := mustNew(t, RoundRobin, pool(1, 1), Options{})
	got := b.Pick([]int{7}, netip.Addr{}, nil)
	if len(got) != 3 || got[0] != 7 {
		t.Errorf("Pick([7]) = %v; want 7 kept and two appended", got)
	}
}

func TestPickAllocations(t *testing.T) {
	for _, p := range []Policy{RoundRobin, LeastConn, RandomTwo, SourceHash} {
		b := mustNew(t, p, pool(1, 2, 3, 4), Options{})
		c := netip.MustParseAddr("192.0.2.1")
		up := func(i int) bool { return i != 2 }
		var buf [16]int
		if n := testing.AllocsPerRun(100, func() { b.Pick(buf[:0], c, up) }); n != 0 {
			t.Errorf("%v: %v allocations per pick; want 0", p, n)
		}
	}
}

func TestConcurrentPicks(t *testing.T) {
	for _, p := range []Policy{RoundRobin, LeastConn, RandomTwo, SourceHash} {
		b := mustNew(t, p, pool(1, 2, 3), Options{})
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Go(func() {
				var buf [4]int
				for i := range 500 {
					o := b.Pick(buf[:0], addr(g*1000+i), nil)
					b.Acquire(o[0])
					b.Release(o[0])
				}
			})
		}
		wg.Wait()
		for i := range b.Len() {
			if b.Active(i) != 0 {
				t.Errorf("%v: backend %d active %d after all released", p, i, b.Active(i))
			}
		}
	}
	// Round robin stays exact under concurrency: every 6 picks are 1:2:3.
	b := mustNew(t, RoundRobin, pool(1, 2, 3), Options{})
	var mu sync.Mutex
	got := make([]int, 3)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 1500 {
				o := b.Pick(nil, netip.Addr{}, nil)
				mu.Lock()
				got[o[0]]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if !slices.Equal(got, []int{1000, 2000, 3000}) {
		t.Errorf("concurrent round robin %v; want [1000 2000 3000]", got)
	}
}

func BenchmarkPick(b *testing.B) {
	c := netip.MustParseAddr("192.0.2.1")
	up := func(i int) bool { return i != 5 }
	for _, p := range []Policy{RoundRobin, LeastConn, RandomTwo, SourceHash} {
		for _, n := range []int{4, 16} {
			ws := make([]int, n)
			for i := range ws {
				ws[i] = 1 + i%3
			}
			bal := mustNew(b, p, pool(ws...), Options{})
			b.Run(fmt.Sprintf("%v/%d", p, n), func(b *testing.B) {
				b.ReportAllocs()
				var buf [16]int
				for b.Loop() {
					bal.Pick(buf[:0], c, up)
				}
			})
			b.Run(fmt.Sprintf("%v/%d/parallel", p, n), func(b *testing.B) {
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					var buf [16]int
					for pb.Next() {
						o := bal.Pick(buf[:0], c, up)
						bal.Acquire(o[0])
						bal.Release(o[0])
					}
				})
			})
		}
	}
}
