package route

import (
	"net/netip"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// index finds the first pattern of an ordered list (the denylist, the
// routes' matches or the allowlist) that matches a name, in time that does
// not depend on the length of the list. It is built once by newIndex and
// read-only afterwards; the zero index matches nothing.
//
// # Keyed patterns
//
// A pattern with a key — an exact name, a "*.suffix" or an IP address (see
// [hostname.Pattern.Name]) — goes into the map for its kind, from key to the
// lowest position of a pattern with that key: a later pattern with the same
// key can never be the first match, so it is dropped. A name has few keys to
// look up, whatever the number of patterns: itself, its address if it is an
// IP literal, and each of its suffixes that starts at a dot after the first
// byte (at most 126 for a 253-byte name, and only those as long as some key
// of the suffix map). The first keyed match is the lowest position among the
// hits.
//
// # The scan list, and what later rule kinds need
//
// A pattern the maps cannot hold goes to the scan list, in list order, and
// is tried in turn. The answer is the lower of the first keyed match and the
// first scan-list match: the scan stops at its first match, or as soon as it
// reaches a position above the keyed match, which then wins. No pattern kind
// needs the scan list today (the zero Pattern matches nothing and is left
// out); it is where the kinds the SPEC plans go:
//
//   - a "~regex" match has no key: its rule goes to the scan list, so a
//     look-up costs one map probe per key plus one regexp per "~" rule
//     before the answer, however many keyed rules there are;
//   - a rule with a condition besides its match (an alpn list) cannot be
//     summed up by one position per key any more: a key then maps to the
//     positions of the rules with that key, ascending, up to and including
//     the first one without conditions; the key's candidate is the first of
//     them whose conditions hold, and the keyed match is the lowest
//     candidate over all the name's keys, as now. A rule with conditions and
//     no key goes to the scan list, which checks its conditions too.
//
// TestIndexScanList moves random patterns into the scan list to check the
// merge.
type index struct {
	exact  map[string]int     // name → position of the first pattern for exactly that name
	suffix map[string]int     // ".example.com" → position of the first "*.example.com"
	addr   map[netip.Addr]int // address → position of the first pattern for it
	// lengths has bit n set when suffix has a key of n bytes (n ≤ 254):
	// a suffix of a name of any other length needs no look-up. longest is
	// the highest such n.
	lengths [4]uint64
	longest int
	scan    []scanEntry // patterns without a key, by position
}

// scanEntry is a pattern of the scan list and its position in its list.
type scanEntry struct {
	pos int
	p   hostname.Pattern
}

// newIndex indexes ps, positions being indices into ps.
func newIndex(ps []hostname.Pattern) index {
	var x index
	keep := func(m *map[string]int, k string, pos int) {
		if *m == nil {
			*m = map[string]int{}
		}
		if _, ok := (*m)[k]; !ok {
			(*m)[k] = pos
		}
	}
	for pos, p := range ps {
		if n := p.Name(); n != "" {
			keep(&x.exact, n, pos)
			continue
		}
		if s := p.Suffix(); s != "" {
			keep(&x.suffix, s, pos)
			x.lengths[len(s)/64] |= 1 << (len(s) % 64)
			x.longest = max(x.longest, len(s))
			continue
		}
		if a, ok := p.Addr(); ok {
			if x.addr == nil {
				x.addr = map[netip.Addr]int{}
			}
			if _, ok := x.addr[a]; !ok {
				x.addr[a] = pos
			}
			continue
		}
		// The zero Pattern matches nothing: nothing to index. A later
		// pattern kind without a key ("~regex") is appended to x.scan
		// here, as scanEntry{pos, p}.
	}
	return x
}

// first returns the position of the first pattern that matches name, or -1.
// name is lowercased without a trailing dot, as Decide makes it; a and isAddr
// are what hostname.ParseIPLiteral says of it.
func (x *index) first(name string, a netip.Addr, isAddr bool) int {
	best := -1
	hit := func(pos int) {
		if best < 0 || pos < best {
			best = pos
		}
	}
	if pos, ok := x.exact[name]; ok {
		hit(pos)
	}
	if isAddr {
		if pos, ok := x.addr[a]; ok {
			hit(pos)
		}
	}
	if len(x.suffix) > 0 {
		// Suffixes starting at a dot, shortest first; name[0] is never
		// one: "*.x" does not match ".x".
		for i := len(name) - 1; i > 0 && len(name)-i <= x.longest; i-- {
			if n := len(name) - i; name[i] != '.' || x.lengths[n/64]&(1<<(n%64)) == 0 {
				continue
			}
			if pos, ok := x.suffix[name[i:]]; ok {
				hit(pos)
			}
		}
	}
	for _, e := range x.scan {
		if best >= 0 && e.pos > best {
			break
		}
		if e.p.Match(name) {
			hit(e.pos)
			break
		}
	}
	return best
}
