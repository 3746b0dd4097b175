package route

import (
	"net/netip"
	"regexp"

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
// # The scan list and conditional rules
//
// A pattern the maps cannot hold goes to the scan list, in list order, and
// is tried in turn. The answer is the lower of the first keyed match and the
// first scan-list match: the scan stops at its first match, or as soon as it
// reaches a position above the keyed match, which then wins. A route whose
// match is a "~regex" has no key and goes there, so a look-up costs one map
// probe per key plus one regexp per "~" rule before the answer, however many
// keyed rules there are.
//
// A rule with a condition besides its match (an alpn list) cannot be summed
// up by one position per key: a key maps to the first position with that
// key, as before, and when that rule is conditional, more lists the next
// positions with the same key, ascending, up to and including the first one
// without a condition (later ones can never be first). The key's candidate
// is the first of them whose condition holds; the keyed match is the lowest
// candidate over all the name's keys, as before. A conditional rule in the
// scan list has its condition checked there too.
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
	// more maps the position of a conditional entry that heads its key's
	// list to the later positions with that key, up to and including the
	// first unconditional one; nil when no entry is conditional.
	more map[int][]int
	// cond marks the conditional entries by position; nil when none is.
	cond []bool
}

// isCond reports whether the entry at pos is conditional.
func (x *index) isCond(pos int) bool { return x.cond != nil && x.cond[pos] }

// scanEntry is a pattern of the scan list and its position in its list.
type scanEntry struct {
	pos int
	p   hostname.Pattern
	re  *regexp.Regexp // when not nil, the match instead of p
}

// matches reports whether the entry's pattern matches name.
func (e *scanEntry) matches(name string) bool {
	if e.re != nil {
		return e.re.MatchString(name)
	}
	return e.p.Match(name)
}

// indexEntry is one pattern to index: a name pattern, or a regular
// expression (re not nil), and whether a condition besides the match
// applies to it.
type indexEntry struct {
	p    hostname.Pattern
	re   *regexp.Regexp
	cond bool
}

// newIndex indexes ps, positions being indices into ps.
func newIndex(ps []hostname.Pattern) index {
	es := make([]indexEntry, len(ps))
	for i, p := range ps {
		es[i] = indexEntry{p: p}
	}
	return newEntryIndex(es)
}

// newEntryIndex indexes es, positions being indices into es.
func newEntryIndex(es []indexEntry) index {
	var x index
	// open holds, per map and key, the head of a chain still open: every
	// entry with that key so far is conditional.
	type chainKey struct {
		kind int
		key  string
		addr netip.Addr
	}
	open := map[chainKey]int{}
	place := func(ck chainKey, pos int, cond bool, have bool, head int) {
		if !have {
			if cond {
				open[ck] = pos
			}
			return
		}
		h, ok := open[ck]
		if !ok || h != head {
			return // the key's chain ended at an unconditional entry
		}
		if x.more == nil {
			x.more = map[int][]int{}
		}
		x.more[head] = append(x.more[head], pos)
		if !cond {
			delete(open, ck)
		}
	}
	keep := func(m *map[string]int, kind int, k string, pos int, cond bool) {
		if *m == nil {
			*m = map[string]int{}
		}
		head, have := (*m)[k]
		if !have {
			(*m)[k] = pos
		}
		place(chainKey{kind: kind, key: k}, pos, cond, have, head)
	}
	for pos, e := range es {
		if e.cond {
			if x.cond == nil {
				x.cond = make([]bool, len(es))
			}
			x.cond[pos] = true
		}
		if e.re != nil {
			x.scan = append(x.scan, scanEntry{pos: pos, re: e.re})
			continue
		}
		p := e.p
		if n := p.Name(); n != "" {
			keep(&x.exact, 0, n, pos, e.cond)
			continue
		}
		if s := p.Suffix(); s != "" {
			keep(&x.suffix, 1, s, pos, e.cond)
			x.lengths[len(s)/64] |= 1 << (len(s) % 64)
			x.longest = max(x.longest, len(s))
			continue
		}
		if a, ok := p.Addr(); ok {
			if x.addr == nil {
				x.addr = map[netip.Addr]int{}
			}
			head, have := x.addr[a]
			if !have {
				x.addr[a] = pos
			}
			place(chainKey{kind: 2, addr: a}, pos, e.cond, have, head)
			continue
		}
		// The zero Pattern matches nothing: nothing to index.
	}
	return x
}

// first returns the position of the first pattern that matches name and
// whose condition holds, or -1. name is lowercased without a trailing dot,
// as Decide makes it; a and isAddr are what hostname.ParseIPLiteral says of
// it. holds reports whether the condition of the conditional entry at a
// position holds; nil means none does.
func (x *index) first(name string, a netip.Addr, isAddr bool, holds func(pos int) bool) int {
	best := -1
	hit := func(pos int) {
		for i := -1; ; i++ {
			p := pos
			if i >= 0 {
				chain := x.more[pos]
				if i >= len(chain) {
					return
				}
				p = chain[i]
			}
			if best >= 0 && p >= best {
				return
			}
			if !x.isCond(p) || (holds != nil && holds(p)) {
				best = p
				return
			}
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
	for i := range x.scan {
		e := &x.scan[i]
		if best >= 0 && e.pos > best {
			break
		}
		if e.matches(name) && (!x.isCond(e.pos) || (holds != nil && holds(e.pos))) {
			hit(e.pos)
			break
		}
	}
	return best
}
