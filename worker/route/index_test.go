package route

import (
	"fmt"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/hostname"
)

// A small alphabet of labels, so that random patterns and names overlap:
// equal keys, nested suffixes, numeric last labels, and names and suffixes
// longer than 64 and 128 bytes.
var randLabels = []string{"a", "b", "c", "www", "xn--d", "_e", "1", "10", "0x1f", strings.Repeat("l", 63), strings.Repeat("m", 40)}

// randIPs are IP patterns and names, several spelling the same address.
var randIPs = []string{"127.0.0.1", "::1", "0:0::1", "[::1]", "1.2.3.4", "::ffff:1.2.3.4", "10.0.0.1", "fe80::1", "fe80::1%eth0", "[127.0.0.1]"}

func randHost(r *rand.Rand) string {
	labels := make([]string, 1+r.IntN(4))
	for i := range labels {
		labels[i] = randLabels[r.IntN(len(randLabels))]
	}
	return strings.Join(labels, ".")
}

func randPattern(r *rand.Rand) hostname.Pattern {
	var s string
	switch r.IntN(10) {
	case 0:
		return hostname.Pattern{} // matches nothing
	case 1, 2:
		s = randIPs[r.IntN(len(randIPs))]
	case 3, 4, 5:
		s = "*." + randHost(r)
	default:
		s = randHost(r)
	}
	p, err := hostname.ParsePattern(s)
	if err != nil { // "fe80::1%eth0": no zones in patterns
		return hostname.Pattern{}
	}
	return p
}

func randPatterns(r *rand.Rand, max int) []hostname.Pattern {
	ps := make([]hostname.Pattern, r.IntN(max+1))
	for i := range ps {
		ps[i] = randPattern(r)
	}
	return ps
}

func randRules(r *rand.Rand, max int) []Rule {
	rules := make([]Rule, r.IntN(max+1))
	hosts := []string{"backend.internal", "10.0.0.9", "::1", ""}
	ports := []int{0, 0, 8443, 70000}
	for i := range rules {
		rules[i] = Rule{Match: randPattern(r), Host: hosts[r.IntN(len(hosts))], Port: ports[r.IntN(len(ports))]}
		switch r.IntN(8) {
		case 0:
			// A regular expression: the same names as the pattern, or a
			// class of them.
			res := []string{`~.*\.a`, `~[a-c]+\.b`, `~a|b\.c`, `~x` + regexp.QuoteMeta(rules[i].Match.String())}
			re, err := config.CompileMatch(res[r.IntN(len(res))])
			if err != nil {
				panic(err)
			}
			rules[i].Regexp = re
		case 1, 2:
			rules[i].ALPN = randALPN[:1+r.IntN(len(randALPN))]
			if r.IntN(2) == 0 {
				rules[i].ALPN = rules[i].ALPN[len(rules[i].ALPN)-1:]
			}
		}
	}
	return rules
}

// randALPN are the protocols random rules ask for and random clients offer.
var randALPN = []string{"h2", "acme-tls/1", "http/1.1"}

// randOffer returns what a random client offers: nothing, or some of
// randALPN joined by ",".
func randOffer(r *rand.Rand) string {
	var ps []string
	for _, p := range randALPN {
		if r.IntN(2) == 0 {
			ps = append(ps, p)
		}
	}
	return strings.Join(ps, ",")
}

func randName(r *rand.Rand) string {
	switch r.IntN(10) {
	case 0:
		return []string{"", ".", "a..b", "a b.c", "*.a", "a.b:443", "A.B.", "WWW.A."}[r.IntN(8)]
	case 1, 2:
		return randIPs[r.IntN(len(randIPs))]
	default:
		n := randHost(r)
		if r.IntN(4) == 0 {
			n = strings.ToUpper(n) + "."
		}
		return n
	}
}

// sameDecision fails t unless the indexed and the linear Decide agree
// exactly, error text included.
func sameDecision(t *testing.T, tab *Table, deny []hostname.Pattern, routes []Rule, allow []hostname.Pattern, name string, port int) {
	t.Helper()
	sameDecisionALPN(t, tab, deny, routes, allow, name, "", port)
}

// sameDecisionALPN is sameDecision for a client offering alpn.
func sameDecisionALPN(t *testing.T, tab *Table, deny []hostname.Pattern, routes []Rule, allow []hostname.Pattern, name, alpn string, port int) {
	t.Helper()
	got, gotErr := tab.DecideALPN(name, alpn, port)
	want, wantErr := linearDecideALPN(deny, routes, allow, name, alpn, port)
	if got != want || fmt.Sprint(gotErr) != fmt.Sprint(wantErr) {
		t.Fatalf("DecideALPN(%q, %q, %d) with deny %v, routes %v, allow %v:\nindexed %+v, %v\nlinear  %+v, %v",
			name, alpn, port, deny, routes, allow, got, gotErr, want, wantErr)
	}
}

// TestDecideIndexedEqualsLinear compares the indexed Decide with the linear
// one over random tables and names.
func TestDecideIndexedEqualsLinear(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	ports := []int{443, 0, 8443, 65536}
	for range 3000 {
		deny, routes, allow := randPatterns(r, 4), randRules(r, 12), randPatterns(r, 6)
		if r.IntN(3) == 0 {
			allow = nil
		}
		tab := NewTable(deny, routes, allow)
		for range 40 {
			sameDecisionALPN(t, tab, deny, routes, allow, randName(r), randOffer(r), ports[r.IntN(len(ports))])
		}
	}
}

// TestNewTableCopies checks that a Table does not change when the caller
// reuses the slices it was built from.
func TestNewTableCopies(t *testing.T) {
	deny := patterns("evil.test")
	routes := []Rule{mustRule(t, "app.test", "10.0.0.1:443")}
	allow := patterns("ok.test")
	tab := NewTable(deny, routes, allow)
	deny[0] = hostname.MustParsePattern("ok.test")
	routes[0].Host = "10.0.0.2"
	allow[0] = hostname.MustParsePattern("other.test")
	if got, err := tab.Decide("app.test", 443); err != nil || got.Host != "10.0.0.1" {
		t.Errorf("Decide(app.test): got %+v, %v; want host 10.0.0.1", got, err)
	}
	if _, err := tab.Decide("ok.test", 443); err != nil {
		t.Errorf("Decide(ok.test): got error %v; want nil", err)
	}
	if _, err := tab.Decide("evil.test", 443); err == nil {
		t.Errorf("Decide(evil.test): got nil error; want denied")
	}
}

// linearFirst is the position of the first pattern of ps matching name, or -1.
func linearFirst(ps []hostname.Pattern, name string) int {
	for i, p := range ps {
		if p.Match(name) {
			return i
		}
	}
	return -1
}

// TestIndexScanList checks the merge of keyed hits with the scan list (where
// pattern kinds without a key will go) by moving random patterns from the
// maps to the scan list: the first match must not change.
func TestIndexScanList(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 3000 {
		ps := randPatterns(r, 12)
		keyed := make([]hostname.Pattern, len(ps))
		var scan []scanEntry
		all := r.IntN(4) == 0
		for i, p := range ps {
			if all || r.IntN(3) == 0 {
				scan = append(scan, scanEntry{pos: i, p: p})
			} else {
				keyed[i] = p
			}
		}
		x := newIndex(keyed)
		x.scan = scan
		for range 40 {
			name := strings.ToLower(strings.TrimSuffix(randName(r), "."))
			a, isAddr := hostname.ParseIPLiteral(name)
			if got, want := x.first(name, a, isAddr, nil), linearFirst(ps, name); got != want {
				t.Fatalf("first(%q) over %v, scan %v: got %d; want %d", name, ps, scan, got, want)
			}
		}
	}
}

// FuzzDecideIndexed compares the indexed Decide with the linear one. spec is
// a comma-separated table: "d:pattern" (denylist), "r:pattern" (route to
// backend.internal), "n:pattern" (route without a backend host),
// "a:pattern" (allowlist); entries that do not parse are skipped.
func FuzzDecideIndexed(f *testing.F) {
	seeds := []struct {
		spec, name string
	}{
		{"d:evil.example.com,r:*.example.com,r:app.example.com,a:*.allowed.test", "app.example.com"},
		{"r:app.example.com,r:*.example.com", "APP.example.com."},
		{"r:*.a.b,r:*.b,r:c.a.b", "c.a.b"},
		{"n:*.b,r:*.a.b", "x.a.b"},
		{"r:::1,r:127.0.0.1", "[0:0::1]"},
		{"r:*.2.3.4", "::ffff:1.2.3.4"},
		{"a:example.com", "www.example.com"},
		{"d:*.com,r:example.com", "a.example.com"},
		{"r:127.1", "127.1"},
		{"", "10.1"},
	}
	for _, s := range seeds {
		f.Add(s.spec, s.name, 443)
	}
	f.Fuzz(func(t *testing.T, spec, name string, port int) {
		var deny, allow []hostname.Pattern
		var routes []Rule
		for e := range strings.SplitSeq(spec, ",") {
			kind, s, ok := strings.Cut(e, ":")
			if !ok {
				continue
			}
			p, err := hostname.ParsePattern(s)
			if err != nil {
				continue
			}
			switch kind {
			case "d":
				deny = append(deny, p)
			case "r":
				routes = append(routes, Rule{Match: p, Host: "backend.internal"})
			case "n":
				routes = append(routes, Rule{Match: p})
			case "a":
				allow = append(allow, p)
			}
		}
		sameDecision(t, NewTable(deny, routes, allow), deny, routes, allow, name, port)
	})
}

// benchTable is an operator's table with n tenants: half exact names, half
// "*.suffix" patterns, and n/10 denylist patterns; names is a mix of exact
// hits, suffix hits several labels deep and misses (routed through DNS).
func benchTable(n int) (deny []hostname.Pattern, routes []Rule, names []string) {
	for i := range n / 10 {
		deny = append(deny, hostname.MustParsePattern(fmt.Sprintf("blocked%d.example.net", i)))
	}
	for i := range n {
		m := fmt.Sprintf("tenant%d.example.com", i)
		if i%2 == 1 {
			m = fmt.Sprintf("*.tenant%d.example.org", i)
		}
		routes = append(routes, Rule{Match: hostname.MustParsePattern(m), Host: fmt.Sprintf("backend%d.internal", i)})
	}
	r := rand.New(rand.NewPCG(5, 6))
	for range 1024 {
		i := r.IntN(n)
		switch r.IntN(3) {
		case 0:
			names = append(names, fmt.Sprintf("tenant%d.example.com", i&^1))
		case 1:
			names = append(names, fmt.Sprintf("www.api.tenant%d.example.org", i|1))
		default:
			names = append(names, fmt.Sprintf("unknown%d.example.com", i))
		}
	}
	return deny, routes, names
}

var benchSizes = []int{10, 1_000, 100_000}

// BenchmarkDecide measures Decide on tables of 10 to 100,000 routes: the
// time per name should not grow with the table.
func BenchmarkDecide(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("routes=%d", n), func(b *testing.B) {
			deny, routes, names := benchTable(n)
			tab := NewTable(deny, routes, nil)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := tab.Decide(names[i%len(names)], 443); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkDecideLinear is BenchmarkDecide for the linear Decide that
// preceded the index, for comparison.
func BenchmarkDecideLinear(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("routes=%d", n), func(b *testing.B) {
			deny, routes, names := benchTable(n)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := linearDecide(deny, routes, nil, names[i%len(names)], 443); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkNewTable measures building (indexing) a table of n routes and
// n/10 denylist patterns, as each worker does on a reload.
func BenchmarkNewTable(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("routes=%d", n), func(b *testing.B) {
			deny, routes, _ := benchTable(n)
			b.ReportAllocs()
			for b.Loop() {
				NewTable(deny, routes, nil)
			}
		})
	}
}
