package route

import (
	"container/list"
	"context"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// cacheKey names one cached answer: the addresses of one type for one name.
type cacheKey struct {
	name  string // absolute, lower case, with the trailing dot
	qtype dnsmessage.Type
}

// cacheEntry is one answer. An entry with no addresses is a negative one:
// the name does not exist or has no address of that type.
type cacheEntry struct {
	key     cacheKey
	addrs   []netip.Addr
	expires time.Time
	next    int // where the next hit starts (round robin)
}

// flight is one look-up in progress; the callers asking for the same key
// meanwhile wait for it instead of asking the name servers again.
type flight struct {
	done  chan struct{} // closed once addrs and err are set
	addrs []netip.Addr
	err   error
	// waiters counts the callers that joined the flight after the one
	// that started it: what one query saved. refs counts the callers
	// still waiting; the last to give up calls cancel. Both under
	// dnsCache.mu.
	waiters int
	refs    int
	cancel  context.CancelFunc
}

// dnsCache holds at most max answers, evicting the least recently used,
// and the look-ups in flight. Its zero value is not usable: see newDNSCache.
type dnsCache struct {
	mu      sync.Mutex
	max     int
	lru     *list.List // of *cacheEntry, most recently used first
	entries map[cacheKey]*list.Element
	flights map[cacheKey]*flight
}

func newDNSCache(max int) *dnsCache {
	return &dnsCache{
		max:     max,
		lru:     list.New(),
		entries: map[cacheKey]*list.Element{},
		flights: map[cacheKey]*flight{},
	}
}

// getLocked returns the answer cached for k, if one is and has not expired
// at now. The addresses are a fresh slice, rotated by one more place at
// every hit, so that connections spread over a name's addresses for as long
// as its answer is cached, as they did over a name server's rotated answers.
// c.mu must be held.
func (c *dnsCache) getLocked(k cacheKey, now time.Time) ([]netip.Addr, bool) {
	el, ok := c.entries[k]
	if !ok {
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.lru.Remove(el)
		delete(c.entries, k)
		return nil, false
	}
	c.lru.MoveToFront(el)
	n := len(e.addrs)
	if n == 0 {
		return nil, true
	}
	out := make([]netip.Addr, 0, n)
	out = append(out, e.addrs[e.next:]...)
	out = append(out, e.addrs[:e.next]...)
	e.next = (e.next + 1) % n
	return out, true
}

// putLocked caches addrs (none: a negative answer) for k until now+ttl,
// replacing what was there; a ttl of zero or less caches nothing.
func (c *dnsCache) putLocked(k cacheKey, addrs []netip.Addr, ttl time.Duration, now time.Time) {
	if ttl <= 0 || c.max <= 0 {
		return
	}
	if el, ok := c.entries[k]; ok {
		c.lru.Remove(el)
		delete(c.entries, k)
	}
	c.entries[k] = c.lru.PushFront(&cacheEntry{key: k, addrs: addrs, expires: now.Add(ttl), next: 1 % max(len(addrs), 1)})
	for c.lru.Len() > c.max {
		el := c.lru.Back()
		c.lru.Remove(el)
		delete(c.entries, el.Value.(*cacheEntry).key)
	}
}

// len returns the number of cached answers, expired ones included.
func (c *dnsCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}
