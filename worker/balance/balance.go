// Package balance orders the backends of a pool for a new connection: the
// first choice under the route's balancing policy, then the backends to fail
// over to. It does no I/O: the worker says which backends are up (from the
// shared health state) and counts its active connections per backend here.
//
// Four policies, as the config names them:
//
//   - round_robin: nginx's smooth weighted round robin. Weights 5, 1, 1
//     give a a b a c a a, repeating.
//   - least_conn: the backend with the fewest active connections per unit
//     of weight; ties go by smooth weighted round robin.
//   - random_two: the power of two choices: two distinct backends drawn at
//     random in proportion to their weights, the one with fewer active
//     connections per unit of weight first.
//   - source_hash: weighted rendezvous hashing (highest random weight) of
//     the client address and each backend's key. The same client address
//     gets the same order in every worker process and generation (no seed),
//     and adding or removing a backend moves only that backend's share of
//     addresses.
//
// Whatever the policy, only backends that are up are candidates; backups are
// candidates only when no primary is up; when no backend at all is up, every
// backend is a candidate (primaries first), since a health check can be
// wrong and trying is better than refusing.
package balance

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
)

// Policy is a balancing policy.
type Policy uint8

// The policies. The zero Policy is RoundRobin, the config's default.
const (
	RoundRobin Policy = iota
	LeastConn
	RandomTwo
	SourceHash
)

var policyNames = [...]string{
	RoundRobin: "round_robin",
	LeastConn:  "least_conn",
	RandomTwo:  "random_two",
	SourceHash: "source_hash",
}

// String returns the policy's name in the config.
func (p Policy) String() string {
	if int(p) < len(policyNames) {
		return policyNames[p]
	}
	return fmt.Sprintf("Policy(%d)", p)
}

// ParsePolicy returns the policy a config names; "" is RoundRobin.
func ParsePolicy(s string) (Policy, error) {
	if s == "" {
		return RoundRobin, nil
	}
	for p, name := range policyNames {
		if s == name {
			return Policy(p), nil
		}
	}
	return 0, fmt.Errorf("balance: unknown policy %q", s)
}

// Backend describes one backend of a pool to New.
type Backend struct {
	// Key identifies the backend for source_hash: its address, host:port as
	// the config writes it. Keys must be distinct within a pool.
	Key string
	// Weight is the backend's share, 1..MaxWeight.
	Weight int
	// Backup backends are candidates only when no primary is up.
	Backup bool
}

// MaxWeight is the largest weight New accepts (config.MaxWeight): with at
// most 2^31 connections per backend no product or sum overflows.
const MaxWeight = 1_000_000

// Options are optional settings of New.
type Options struct {
	// IntN returns a uniformly random int in [0, n) for random_two; nil
	// means math/rand/v2's IntN. It must be safe for concurrent use if the
	// Balancer is.
	IntN func(n int) int
}

// Errors New returns.
var (
	ErrNoBackend    = errors.New("balance: no backend")
	ErrWeight       = errors.New("balance: weight not in 1..MaxWeight")
	ErrNoPrimary    = errors.New("balance: every backend is a backup")
	ErrDuplicateKey = errors.New("balance: duplicate backend key")
)

// counter is one backend's active connections, alone on its cache line so
// that workers' goroutines counting different backends do not contend.
type counter struct {
	n atomic.Int64
	_ [56]byte
}

// Balancer orders a pool's backends for new connections. Build it once per
// route with New; all its methods are safe for concurrent use. Backends are
// named by their index in the slice given to New.
type Balancer struct {
	policy Policy
	weight []int64
	backup []bool
	hash   []uint64 // per-backend key hashes, for source_hash
	active []counter
	intN   func(int) int

	mu      sync.Mutex
	current []int64 // smooth round robin's current weights, under mu
}

// New returns a Balancer for backends under policy p. It fails when there is
// no backend, a weight is not positive, every backend is a backup, or two
// keys are equal.
func New(p Policy, backends []Backend, opt Options) (*Balancer, error) {
	if int(p) >= len(policyNames) {
		return nil, fmt.Errorf("balance: unknown policy %d", p)
	}
	if len(backends) == 0 {
		return nil, ErrNoBackend
	}
	n := len(backends)
	b := &Balancer{
		policy:  p,
		weight:  make([]int64, n),
		backup:  make([]bool, n),
		hash:    make([]uint64, n),
		active:  make([]counter, n),
		current: make([]int64, n),
		intN:    opt.IntN,
	}
	if b.intN == nil {
		b.intN = rand.IntN
	}
	primary := false
	seen := make(map[string]bool, n)
	for i, be := range backends {
		if be.Weight <= 0 || be.Weight > MaxWeight {
			return nil, fmt.Errorf("backend %d (%s): %w", i, be.Key, ErrWeight)
		}
		if seen[be.Key] {
			return nil, fmt.Errorf("backend %d (%s): %w", i, be.Key, ErrDuplicateKey)
		}
		seen[be.Key] = true
		b.weight[i] = int64(be.Weight)
		b.backup[i] = be.Backup
		b.hash[i] = hashKey(be.Key)
		primary = primary || !be.Backup
	}
	if !primary {
		return nil, ErrNoPrimary
	}
	return b, nil
}

// Len returns the number of backends.
func (b *Balancer) Len() int { return len(b.weight) }

// Policy returns the balancing policy.
func (b *Balancer) Policy() Policy { return b.policy }

// Acquire counts one more active connection to backend i. Call it when a
// dial to i succeeds, and Release when that connection closes.
func (b *Balancer) Acquire(i int) { b.active[i].n.Add(1) }

// Release counts one active connection to backend i fewer.
func (b *Balancer) Release(i int) { b.active[i].n.Add(-1) }

// Active returns the number of active connections to backend i this
// Balancer counts.
func (b *Balancer) Active(i int) int64 { return b.active[i].n.Load() }

// Pick appends to dst the backends to try for a new connection from client,
// in order: the first choice, then the ones to fail over to. up reports
// whether backend i is up (nil means all are); it is called at most once per
// backend and must not call back into the Balancer.
//
// The candidates are the primaries that are up; if there are none, the
// backups that are up; if none of those either, every backend, primaries
// first. Every candidate appears exactly once and the result is never empty.
// Pick does not allocate when dst has room for every backend, as in
//
//	var buf [16]int
//	order := b.Pick(buf[:0], client, up)
//
// client matters only to source_hash; an IPv4-mapped IPv6 address counts as
// the IPv4 address.
func (b *Balancer) Pick(dst []int, client netip.Addr, up func(i int) bool) []int {
	start := len(dst)
	for i, bk := range b.backup {
		if !bk && (up == nil || up(i)) {
			dst = append(dst, i)
		}
	}
	if len(dst) == start {
		for i, bk := range b.backup {
			if bk && (up == nil || up(i)) {
				dst = append(dst, i)
			}
		}
	}
	if len(dst) > start {
		b.order(dst[start:], client)
		return dst
	}
	// Nothing is up: every backend, primaries first, each group in the
	// policy's order.
	for i, bk := range b.backup {
		if !bk {
			dst = append(dst, i)
		}
	}
	mid := len(dst)
	for i, bk := range b.backup {
		if bk {
			dst = append(dst, i)
		}
	}
	b.order(dst[start:mid], client)
	if len(dst) > mid {
		b.order(dst[mid:], client)
	}
	return dst
}

// order reorders the candidates c (backend indices in increasing order) in
// place: the policy's first choice first.
func (b *Balancer) order(c []int, client netip.Addr) {
	if len(c) < 2 {
		return
	}
	switch b.policy {
	case RoundRobin:
		rotate(c, b.smooth(c))
	case LeastConn:
		rotate(c, b.least(c))
	case RandomTwo:
		rotate(c, b.two(c))
	case SourceHash:
		b.rank(c, client)
	}
}

// rotate moves c[k] to the front, keeping the cyclic order: c[k], c[k+1],
// ..., c[0], ..., c[k-1].
func rotate(c []int, k int) {
	if k == 0 {
		return
	}
	slices.Reverse(c[:k])
	slices.Reverse(c[k:])
	slices.Reverse(c)
}

// smooth is nginx's smooth weighted round robin over the candidates: each
// one's current weight grows by its weight, the largest is chosen and loses
// the sum of the weights. Backends that are not candidates keep their
// current weight. It returns the chosen position in c.
func (b *Balancer) smooth(c []int) int {
	b.mu.Lock()
	var total int64
	best := 0
	for k, i := range c {
		b.current[i] += b.weight[i]
		total += b.weight[i]
		if b.current[i] > b.current[c[best]] {
			best = k
		}
	}
	b.current[c[best]] -= total
	b.mu.Unlock()
	return best
}

// less reports whether backend i has fewer active connections per unit of
// weight than backend j.
func (b *Balancer) less(i, j int) bool {
	return b.active[i].n.Load()*b.weight[j] < b.active[j].n.Load()*b.weight[i]
}

// least returns the position in c of the backend with the fewest active
// connections per unit of weight. Ties go by smooth weighted round robin
// among the tied backends, as in nginx, so that short connections (all
// counts 0) still spread by weight.
func (b *Balancer) least(c []int) int {
	best := 0
	for k := 1; k < len(c); k++ {
		if b.less(c[k], c[best]) {
			best = k
		}
	}
	// The counts move under our feet: a backend is tied when it is not
	// less loaded than best, nor best than it, read again now.
	i := c[best]
	b.mu.Lock()
	var total int64
	chosen := -1
	for k, j := range c {
		if b.less(j, i) || b.less(i, j) {
			continue
		}
		b.current[j] += b.weight[j]
		total += b.weight[j]
		if chosen < 0 || b.current[j] > b.current[c[chosen]] {
			chosen = k
		}
	}
	b.current[c[chosen]] -= total
	b.mu.Unlock()
	return chosen
}

// two draws two distinct candidates, each in proportion to its weight, and
// returns the position in c of the one with fewer active connections per
// unit of weight (the first drawn on a tie).
func (b *Balancer) two(c []int) int {
	var total int64
	for _, i := range c {
		total += b.weight[i]
	}
	first := b.draw(c, total, -1)
	second := b.draw(c, total-b.weight[c[first]], first)
	if b.less(c[second], c[first]) {
		return second
	}
	return first
}

// draw returns a position in c other than skip, drawn in proportion to the
// weights, whose sum over c without skip is total.
func (b *Balancer) draw(c []int, total int64, skip int) int {
	r := int64(b.intN(int(total)))
	last := 0
	for k, i := range c {
		if k == skip {
			continue
		}
		last = k
		if r < b.weight[i] {
			return k
		}
		r -= b.weight[i]
	}
	return last // only if intN broke its contract
}

// rankBuf is how many scores rank keeps on the stack.
const rankBuf = 16

// rank orders c by weighted rendezvous score for client, highest first. The
// score of backend i is w_i / -ln(u), u uniform in (0, 1) from a hash of
// the client and the backend's key: the top one is chosen with probability
// w_i / Σw, and a backend's arrival or departure changes only the clients
// it wins or held.
func (b *Balancer) rank(c []int, client netip.Addr) {
	var buf [rankBuf]float64
	var score []float64
	if len(c) <= rankBuf {
		score = buf[:len(c)]
	} else {
		score = make([]float64, len(c))
	}
	h := hashAddr(client)
	for k, i := range c {
		u := (float64(mix(h^b.hash[i])>>11) + 0.5) / (1 << 53)
		score[k] = float64(b.weight[i]) / -math.Log(u)
	}
	// Insertion sort, descending; pools are small. Ties (vanishingly
	// rare) keep the config order, so every process agrees.
	for k := 1; k < len(c); k++ {
		for j := k; j > 0 && score[j] > score[j-1]; j-- {
			score[j], score[j-1] = score[j-1], score[j]
			c[j], c[j-1] = c[j-1], c[j]
		}
	}
}

// FNV-1a, 64 bits.
const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

// hashKey hashes a backend key with FNV-1a, then mixes it.
func hashKey(s string) uint64 {
	h := uint64(fnvOffset)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime
	}
	return mix(h)
}

// hashAddr hashes a client address (IPv4-mapped IPv6 as IPv4, without its
// zone) with FNV-1a over its 16-byte form, then mixes it. The hash is the
// same in every process: no seed.
func hashAddr(a netip.Addr) uint64 {
	b := a.Unmap().As16()
	h := uint64(fnvOffset)
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime
	}
	return mix(h)
}

// mix is MurmurHash3's 64-bit finaliser (fmix64): a bijection in which
// every input bit affects every output bit.
func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}
