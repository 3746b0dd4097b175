package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// clock is a settable clock for the cache.
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

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func lookup(t *testing.T, r *DNSResolver, network, host string) []string {
	t.Helper()
	addrs, err := r.LookupNetIP(context.Background(), network, host)
	if err != nil {
		t.Fatalf("LookupNetIP(%s, %s): %v", network, host, err)
	}
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out
}

func isNotFound(err error) bool {
	var de *net.DNSError
	return errors.As(err, &de) && de.IsNotFound
}

// TestDNSResolverNoSearchList is the search-list bypass of issue 9 with a
// real resolv.conf and a real name server: with "search corp.example" and
// ndots:5, SNI "secret" must not reach secret.corp.example.
func TestDNSResolverNoSearchList(t *testing.T) {
	l := listen(t, "127.0.0.1:0")
	srv := zoneServer(t, zone{
		"secret.corp.example.": {rrAddr("secret.corp.example.", 60, "127.0.0.1")},
	})
	res := srv.resolver(t, "nameserver 127.0.0.1\nsearch corp.example\noptions ndots:5\n")
	d := &Dialer{Timeout: 5 * time.Second, AllowPrivate: true, DNS: res}
	port := int(l.addr.Port())

	c, ap, err := d.Dial(context.Background(), Decision{Rule: -1, Host: "secret", Port: port})
	if err == nil {
		c.Close()
		t.Fatalf("Dial(secret): reached %s; want %v", ap, ErrNoRoute)
	}
	if !errors.Is(err, ErrNoRoute) {
		t.Errorf("Dial(secret): got error %v; want %v", err, ErrNoRoute)
	}
	asked := srv.asked()
	slices.Sort(asked)
	if want := []string{"udp A secret.", "udp AAAA secret."}; !slices.Equal(asked, want) {
		t.Errorf("name server asked %q; want %q", asked, want)
	}
	if got := l.count(); got != 0 {
		t.Errorf("listener of secret.corp.example accepted %d connections; want 0", got)
	}

	// Control: the name asked for in full does reach it.
	c, ap, err = d.Dial(context.Background(), Decision{Rule: -1, Host: "secret.corp.example", Port: port})
	if err != nil {
		t.Fatalf("Dial(secret.corp.example): %v", err)
	}
	defer c.Close()
	if ap != l.addr {
		t.Errorf("Dial(secret.corp.example): reached %s; want %s", ap, l.addr)
	}
}

func TestDNSResolverTTL(t *testing.T) {
	srv := zoneServer(t, zone{
		"a.test.":    {rrAddr("a.test.", 60, "192.0.2.1")},
		"long.test.": {rrAddr("long.test.", 86400, "192.0.2.2")},
		"zero.test.": {rrAddr("zero.test.", 0, "192.0.2.3")},
		"www.test.":  {rrCNAME("www.test.", 30, "cdn.test.")},
		"cdn.test.":  {rrAddr("cdn.test.", 300, "192.0.2.4")},
	})
	clk := newClock()
	queries := func() int { return len(srv.asked()) }

	tests := []struct {
		host string
		ttl  time.Duration // how long the answer is cached
	}{
		{"a.test", 60 * time.Second},
		{"long.test", 5 * time.Minute}, // capped at MaxTTL
		{"zero.test", time.Second},     // raised to MinTTL
		{"www.test", 30 * time.Second}, // the CNAME's TTL is the lesser
		{"A.Test.", 60 * time.Second},  // one name, whatever its case and dot
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			r := srv.resolver(t, "nameserver 127.0.0.1\n")
			r.Now = clk.now
			before := queries()
			lookup(t, r, "ip4", tt.host)
			lookup(t, r, "ip4", tt.host)
			if got := queries() - before; got != 1 {
				t.Fatalf("two look-ups asked %d times; want once", got)
			}
			clk.advance(tt.ttl - time.Millisecond)
			lookup(t, r, "ip4", tt.host)
			if got := queries() - before; got != 1 {
				t.Errorf("look-up just before the TTL (%v) ran out asked again", tt.ttl)
			}
			clk.advance(time.Millisecond)
			lookup(t, r, "ip4", tt.host)
			if got := queries() - before; got != 2 {
				t.Errorf("look-up once the TTL (%v) ran out: asked %d times; want twice", tt.ttl, got)
			}
		})
	}
}

func TestDNSResolverNegative(t *testing.T) {
	srv := startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		m := reply(id, q)
		switch q.Name.String() {
		case "nx.test.":
			m.RCode = dnsmessage.RCodeNameError
			m.Authorities = []dnsmessage.Resource{rrSOA(300, 20)} // negative TTL 20s
		case "nodata.test.":
			m.Authorities = []dnsmessage.Resource{rrSOA(10, 60)} // negative TTL 10s
		case "longneg.test.":
			m.RCode = dnsmessage.RCodeNameError
			m.Authorities = []dnsmessage.Resource{rrSOA(86400, 86400)} // capped at 30s
		case "nosoa.test.":
			m.RCode = dnsmessage.RCodeNameError // not cached (RFC 2308)
		}
		return []dnsmessage.Message{m}
	})
	clk := newClock()
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	r.Now = clk.now
	r.MaxNegativeTTL = 30 * time.Second

	tests := []struct {
		host string
		ttl  time.Duration // 0: not cached
	}{
		{"nx.test", 20 * time.Second},
		{"nodata.test", 10 * time.Second},
		{"longneg.test", 30 * time.Second},
		{"nosoa.test", 0},
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			count := func() int {
				n := 0
				for _, q := range srv.asked() {
					if strings.HasSuffix(q, " "+tt.host+".") {
						n++
					}
				}
				return n
			}
			for range 2 {
				addrs, err := r.LookupNetIP(context.Background(), "ip6", tt.host)
				if !isNotFound(err) || len(addrs) != 0 {
					t.Fatalf("LookupNetIP(%s): got %v, %v; want a not-found error", tt.host, addrs, err)
				}
			}
			want := 1
			if tt.ttl == 0 {
				want = 2
			}
			if got := count(); got != want {
				t.Fatalf("two look-ups asked %d times; want %d", got, want)
			}
			if tt.ttl == 0 {
				return
			}
			clk.advance(tt.ttl - time.Millisecond)
			r.LookupNetIP(context.Background(), "ip6", tt.host)
			if got := count(); got != 1 {
				t.Errorf("look-up just before the negative TTL (%v) ran out asked again", tt.ttl)
			}
			clk.advance(time.Millisecond)
			r.LookupNetIP(context.Background(), "ip6", tt.host)
			if got := count(); got != 2 {
				t.Errorf("look-up once the negative TTL (%v) ran out: asked %d times; want twice", tt.ttl, got)
			}
		})
	}
}

func TestDNSResolverCacheBound(t *testing.T) {
	z := zone{}
	for i := range 5 {
		name := fmt.Sprintf("n%d.test.", i)
		z[name] = []dnsmessage.Resource{rrAddr(name, 3600, fmt.Sprintf("192.0.2.%d", i))}
	}
	srv := zoneServer(t, z)
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	r.CacheSize = 3
	for i := range 5 {
		lookup(t, r, "ip4", fmt.Sprintf("n%d.test", i))
	}
	if got := r.cache.len(); got != 3 {
		t.Errorf("cache holds %d answers; want 3 (CacheSize)", got)
	}
	before := len(srv.asked())
	lookup(t, r, "ip4", "n2.test") // cached; now the most recently used
	lookup(t, r, "ip4", "n4.test") // cached
	if got := len(srv.asked()) - before; got != 0 {
		t.Errorf("look-ups of the 3 most recent names asked %d times; want 0", got)
	}
	lookup(t, r, "ip4", "n0.test") // evicted: asked again, evicting n3
	lookup(t, r, "ip4", "n2.test") // still cached
	if got, want := srv.asked()[before:], []string{"udp A n0.test."}; !slices.Equal(got, want) {
		t.Errorf("asked %q; want %q (only the evicted name again)", got, want)
	}
}

func TestDNSResolverFamilies(t *testing.T) {
	srv := zoneServer(t, zone{
		"dual.test.": {
			rrAddr("dual.test.", 60, "192.0.2.1"), rrAddr("dual.test.", 60, "2001:db8::1"),
			rrAddr("dual.test.", 60, "192.0.2.2"), rrAddr("dual.test.", 60, "2001:db8::2"),
		},
	})
	tests := []struct {
		network string
		want    []string
		asked   []string
	}{
		{"ip", []string{"2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2"}, []string{"udp A dual.test.", "udp AAAA dual.test."}},
		{"ip4", []string{"192.0.2.1", "192.0.2.2"}, []string{"udp A dual.test."}},
		{"ip6", []string{"2001:db8::1", "2001:db8::2"}, []string{"udp AAAA dual.test."}},
	}
	for _, tt := range tests {
		t.Run(tt.network, func(t *testing.T) {
			before := len(srv.asked())
			r := srv.resolver(t, "nameserver 127.0.0.1\n")
			if got := lookup(t, r, tt.network, "dual.test"); !slices.Equal(got, tt.want) {
				t.Errorf("got %v; want %v", got, tt.want)
			}
			asked := srv.asked()[before:]
			slices.Sort(asked)
			if !slices.Equal(asked, tt.asked) {
				t.Errorf("asked %q; want %q", asked, tt.asked)
			}
		})
	}
}

// TestDNSResolverRotates: a cached answer is handed out rotated, one place
// more at every hit, so connections spread over a name's addresses.
func TestDNSResolverRotates(t *testing.T) {
	srv := zoneServer(t, zone{
		"rr.test.": {rrAddr("rr.test.", 60, "192.0.2.1"), rrAddr("rr.test.", 60, "192.0.2.2"), rrAddr("rr.test.", 60, "192.0.2.3")},
	})
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	var firsts []string
	for range 4 {
		firsts = append(firsts, lookup(t, r, "ip4", "rr.test")[0])
	}
	if want := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"}; !slices.Equal(firsts, want) {
		t.Errorf("first addresses of 4 look-ups: got %v; want %v", firsts, want)
	}
}

func TestDNSResolverTruncatedRetriesOverTCP(t *testing.T) {
	var all []dnsmessage.Resource
	var want []string
	for i := range 40 {
		a := fmt.Sprintf("2001:db8::%x", i+1)
		all = append(all, rrAddr("big.test.", 60, a))
		want = append(want, a)
	}
	srv := startDNS(t, func(id uint16, q dnsmessage.Question, tcp bool) []dnsmessage.Message {
		m := reply(id, q)
		if !tcp {
			m.Truncated = true
			m.Answers = slices.Clone(all[:2]) // what fitted; must not be used
			return []dnsmessage.Message{m}
		}
		m.Answers = slices.Clone(all) // Pack writes into the records
		return []dnsmessage.Message{m}
	})
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	if got := lookup(t, r, "ip6", "big.test"); !slices.Equal(got, want) {
		t.Errorf("got %v; want the 40 addresses of the TCP answer", got)
	}
	if got, want := srv.asked(), []string{"udp AAAA big.test.", "tcp AAAA big.test."}; !slices.Equal(got, want) {
		t.Errorf("asked %q; want %q", got, want)
	}
}

// TestDNSResolverIgnoresOtherReplies: a datagram answering another ID or
// another question (a late reply, a forgery) is ignored, and the real reply
// still taken.
func TestDNSResolverIgnoresOtherReplies(t *testing.T) {
	srv := startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		forgedID := reply(id+1, q)
		forgedID.Answers = []dnsmessage.Resource{rrAddr(q.Name.String(), 60, "10.0.0.1")}
		otherQ := reply(id, dnsmessage.Question{Name: dnsmessage.MustNewName("other.test."), Type: q.Type, Class: q.Class})
		otherQ.Answers = []dnsmessage.Resource{rrAddr("other.test.", 60, "10.0.0.2")}
		real := reply(id, q)
		real.Answers = []dnsmessage.Resource{
			rrAddr("evil.test.", 60, "10.0.0.3"), // not in the chain: ignored
			rrAddr(q.Name.String(), 60, "192.0.2.1"),
		}
		return []dnsmessage.Message{forgedID, otherQ, real}
	})
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	if got, want := lookup(t, r, "ip4", "x.test"), []string{"192.0.2.1"}; !slices.Equal(got, want) {
		t.Errorf("got %v; want %v", got, want)
	}
}

// TestDNSResolverNextServer: a server answering SERVFAIL is passed over for
// the next one of resolv.conf.
func TestDNSResolverNextServer(t *testing.T) {
	bad := startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		m := reply(id, q)
		m.RCode = dnsmessage.RCodeServerFailure
		return []dnsmessage.Message{m}
	})
	good := zoneServer(t, zone{"x.test.": {rrAddr("x.test.", 60, "192.0.2.1")}})
	var mu sync.Mutex
	var servers []string
	r := &DNSResolver{
		ResolvConf: writeResolvConf(t, "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"),
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			mu.Lock()
			servers = append(servers, network+" "+address)
			mu.Unlock()
			if address == "192.0.2.53:53" {
				return bad.dial(ctx, network, address)
			}
			return good.dial(ctx, network, address)
		},
	}
	if got, want := lookup(t, r, "ip4", "x.test"), []string{"192.0.2.1"}; !slices.Equal(got, want) {
		t.Errorf("got %v; want %v", got, want)
	}
	if want := []string{"udp 192.0.2.53:53", "udp [2001:db8::53]:53"}; !slices.Equal(servers, want) {
		t.Errorf("servers asked %q; want %q", servers, want)
	}
	// Every server failing is an error, not "no such host".
	r = &DNSResolver{ResolvConf: writeResolvConf(t, "nameserver 127.0.0.1\noptions attempts:1\n"), DialContext: bad.dial}
	_, err := r.LookupNetIP(context.Background(), "ip4", "x.test")
	if err == nil || isNotFound(err) {
		t.Errorf("every server SERVFAIL: got %v; want a failure that is not not-found", err)
	}
}

// TestDNSResolverSharesLookups: concurrent look-ups of one name send one
// query; a caller that gives up does not cancel it for the others.
func TestDNSResolverSharesLookups(t *testing.T) {
	release := make(chan struct{})
	srv := startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		<-release
		m := reply(id, q)
		m.Answers = []dnsmessage.Resource{rrAddr(q.Name.String(), 60, "192.0.2.1")}
		return []dnsmessage.Message{m}
	})
	r := srv.resolver(t, "nameserver 127.0.0.1\n")

	// The first caller starts the query, and will give up.
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := r.LookupNetIP(ctx, "ip4", "shared.test")
		errc <- err
	}()
	waitQuery(t, srv)

	const n = 8
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			addrs, err := r.LookupNetIP(context.Background(), "ip4", "shared.test")
			if err != nil || len(addrs) != 1 {
				t.Errorf("LookupNetIP: got %v, %v; want one address", addrs, err)
			}
		})
	}
	waitFlight(t, r, cacheKey{name: "shared.test.", qtype: dnsmessage.TypeA}, func(f *flight) bool { return f.waiters == n })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled caller: got %v; want context.Canceled", err)
	}
	close(release)
	wg.Wait()
	if got := srv.asked(); len(got) != 1 {
		t.Errorf("asked %q; want one query", got)
	}
}

// TestDNSResolverAbandonedLookup: once every caller gave up, the query is
// abandoned (its socket closed) and the next look-up asks afresh.
func TestDNSResolverAbandonedLookup(t *testing.T) {
	release := make(chan struct{})
	srv := startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		if q.Name.String() == "first.test." {
			<-release // never answered before the test ends
			return nil
		}
		m := reply(id, q)
		m.Answers = []dnsmessage.Resource{rrAddr(q.Name.String(), 60, "192.0.2.1")}
		return []dnsmessage.Message{m}
	})
	t.Cleanup(func() { close(release) }) // runs before the server's cleanup
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := r.LookupNetIP(ctx, "ip4", "first.test")
		errc <- err
	}()
	waitQuery(t, srv)
	k := cacheKey{name: "first.test.", qtype: dnsmessage.TypeA}
	var f *flight
	waitFlight(t, r, k, func(got *flight) bool { f = got; return true })
	cancel()
	<-errc
	r.cache.mu.Lock()
	_, still := r.cache.flights[k]
	r.cache.mu.Unlock()
	if still {
		t.Errorf("the flight outlived its last caller")
	}
	select {
	case <-f.done: // the query ended with its callers, not at its timeout (5s)
	case <-time.After(3 * time.Second):
		t.Errorf("the abandoned query still runs")
	}
	if _, err := r.LookupNetIP(context.Background(), "ip4", "second.test"); err != nil {
		t.Errorf("next look-up: %v", err)
	}
}

// waitQuery waits for the server to receive a query.
func waitQuery(t *testing.T, srv *dnsServer) {
	t.Helper()
	select {
	case <-srv.got:
	case <-time.After(10 * time.Second):
		t.Fatal("no query reached the server")
	}
}

// waitFlight waits until the flight of k satisfies ok.
func waitFlight(t *testing.T, r *DNSResolver, k cacheKey, ok func(*flight) bool) {
	t.Helper()
	r.once.Do(r.init) // orders the read of r.cache after the resolver's init
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.cache.mu.Lock()
		f := r.cache.flights[k]
		done := f != nil && ok(f)
		r.cache.mu.Unlock()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("flight of %v: condition not met within 10s", k)
		}
		time.Sleep(time.Millisecond) // poll the condition until the deadline
	}
}

func TestDNSResolverLocalhost(t *testing.T) {
	srv := zoneServer(t, zone{})
	r := srv.resolver(t, "nameserver 127.0.0.1\n")
	for _, tt := range []struct {
		network, host string
		want          []string
	}{
		{"ip", "localhost", []string{"::1", "127.0.0.1"}},
		{"ip4", "localhost.", []string{"127.0.0.1"}},
		{"ip6", "a.b.LOCALHOST", []string{"::1"}},
	} {
		if got := lookup(t, r, tt.network, tt.host); !slices.Equal(got, tt.want) {
			t.Errorf("LookupNetIP(%s, %s): got %v; want %v", tt.network, tt.host, got, tt.want)
		}
	}
	if got := srv.asked(); len(got) != 0 {
		t.Errorf("localhost names asked the name server: %q", got)
	}
}

func TestDNSResolverTimeout(t *testing.T) {
	// A server that never answers.
	srv := startDNS(t, func(uint16, dnsmessage.Question, bool) []dnsmessage.Message { return nil })
	r := srv.resolver(t, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := r.LookupNetIP(ctx, "ip4", "silent.test")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsTimeout {
		t.Errorf("got %v; want a timeout *net.DNSError", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %v; want about the resolv.conf timeout (1s)", d)
	}
}

func TestParseResolvConf(t *testing.T) {
	tests := []struct {
		conf     string
		servers  []string
		timeout  time.Duration
		attempts int
	}{
		{"", []string{"127.0.0.1:53", "[::1]:53"}, 5 * time.Second, 2},
		{"search corp.example\noptions ndots:5\n", []string{"127.0.0.1:53", "[::1]:53"}, 5 * time.Second, 2},
		{"nameserver 10.0.0.53\n# nameserver 10.0.0.54\nnameserver 2001:db8::53 ; comment\n", []string{"10.0.0.53:53", "[2001:db8::53]:53"}, 5 * time.Second, 2},
		{"nameserver 1.1.1.1\nnameserver 1.0.0.1\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n", []string{"1.1.1.1:53", "1.0.0.1:53", "8.8.8.8:53"}, 5 * time.Second, 2},
		{"nameserver fe80::1%eth0\nnameserver not-an-address\n", []string{"[fe80::1%eth0]:53"}, 5 * time.Second, 2},
		{"nameserver 10.0.0.53\noptions timeout:2 attempts:3 rotate\n", []string{"10.0.0.53:53"}, 2 * time.Second, 3},
		{"nameserver 10.0.0.53\noptions timeout:0 attempts:99\n", []string{"10.0.0.53:53"}, time.Second, 5},
	}
	for _, tt := range tests {
		c := parseResolvConf([]byte(tt.conf))
		if !slices.Equal(c.servers, tt.servers) || c.timeout != tt.timeout || c.attempts != tt.attempts {
			t.Errorf("parseResolvConf(%q): got %v %v %d; want %v %v %d", tt.conf, c.servers, c.timeout, c.attempts, tt.servers, tt.timeout, tt.attempts)
		}
	}
}

// TestResolvConfReread: a changed resolv.conf is read again, at most every
// 5s.
func TestResolvConfReread(t *testing.T) {
	path := writeResolvConf(t, "nameserver 10.0.0.1\n")
	f := confFile{path: path}
	clk := newClock()
	if got := f.get(clk.now()).servers; !slices.Equal(got, []string{"10.0.0.1:53"}) {
		t.Fatalf("got %v", got)
	}
	if err := os.WriteFile(path, []byte("nameserver 10.0.0.2\nnameserver 10.0.0.3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	clk.advance(time.Second)
	if got := f.get(clk.now()).servers; !slices.Equal(got, []string{"10.0.0.1:53"}) {
		t.Errorf("1s later: got %v; want the file as first read", got)
	}
	clk.advance(resolvConfCheck)
	if got := f.get(clk.now()).servers; !slices.Equal(got, []string{"10.0.0.2:53", "10.0.0.3:53"}) {
		t.Errorf("after the check interval: got %v; want the new file", got)
	}
}

func TestDialFamily(t *testing.T) {
	tests := []struct {
		family  Family
		network string
	}{
		{"", "ip"}, {FamilyAny, "ip"}, {FamilyIPv4, "ip4"}, {FamilyIPv6, "ip6"},
		{FamilyPreferIPv4, "ip"}, {FamilyPreferIPv6, "ip"},
	}
	for _, tt := range tests {
		res := resolver("f.test", "::1", "127.0.0.1")
		d := &Dialer{DNS: res, Family: tt.family}
		if _, err := d.resolve(context.Background(), "f.test", true); err != nil {
			t.Errorf("family %q: %v", tt.family, err)
		}
		if want := []string{tt.network + " f.test."}; !slices.Equal(res.asked, want) {
			t.Errorf("family %q: resolver asked %q; want %q", tt.family, res.asked, want)
		}
	}
	d := &Dialer{DNS: resolver("f.test", "::1"), Family: "ipv5"}
	if _, err := d.resolve(context.Background(), "f.test", true); err == nil || !errors.Is(err, ErrNoRoute) {
		t.Errorf("family ipv5: got %v; want an error", err)
	}
}

func TestFamilyOrder(t *testing.T) {
	in := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2"}
	tests := []struct {
		family Family
		in     []string
		want   []string
	}{
		{FamilyAny, in, []string{"192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2", "192.0.2.3"}},
		{"", []string{"2001:db8::1", "2001:db8::2", "192.0.2.1"}, []string{"2001:db8::1", "192.0.2.1", "2001:db8::2"}},
		{FamilyIPv4, in, []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"}},
		{FamilyIPv6, in, []string{"2001:db8::1", "2001:db8::2"}},
		{FamilyPreferIPv4, []string{"2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"}, []string{"192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"}},
		{FamilyPreferIPv6, in, []string{"2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2", "192.0.2.3"}},
		{FamilyAny, nil, nil},
	}
	for _, tt := range tests {
		var addrs []netip.Addr
		for _, a := range tt.in {
			addrs = append(addrs, netip.MustParseAddr(a))
		}
		var got []string
		for _, a := range tt.family.order(addrs) {
			got = append(got, a.String())
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%q.order(%v): got %v; want %v", tt.family, tt.in, got, tt.want)
		}
	}
}

// TestParseAnswerEdges: records a reply may carry that must not be taken.
func TestParseAnswerEdges(t *testing.T) {
	q := dnsmessage.Question{Name: dnsmessage.MustNewName("x.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
	tests := []struct {
		name   string
		edit   func(m *dnsmessage.Message)
		addrs  int
		negTTL int64
	}{
		{"NXDOMAIN with an address", func(m *dnsmessage.Message) {
			m.RCode = dnsmessage.RCodeNameError
			m.Answers = []dnsmessage.Resource{rrAddr("x.test.", 60, "192.0.2.1")}
			m.Authorities = []dnsmessage.Resource{rrSOA(60, 5)}
		}, 0, 5},
		{"AAAA for an A question", func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{rrAddr("x.test.", 60, "2001:db8::1")}
		}, 0, -1},
		{"CNAME loop", func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{rrCNAME("x.test.", 60, "y.test."), rrCNAME("y.test.", 60, "x.test.")}
		}, 0, -1},
		{"name in another case", func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{rrAddr("X.TEST.", 60, "192.0.2.1")}
		}, 1, -1},
		{"too many addresses", func(m *dnsmessage.Message) {
			for i := range 100 {
				m.Answers = append(m.Answers, rrAddr("x.test.", 60, fmt.Sprintf("192.0.2.%d", i)))
			}
		}, maxAnswerAddrs, -1},
	}
	for _, tt := range tests {
		m := reply(7, q)
		tt.edit(&m)
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		ans, err := parseAnswer(b, 7, q)
		if err != nil || len(ans.addrs) != tt.addrs || ans.negTTL != tt.negTTL {
			t.Errorf("%s: got %v addresses, negative TTL %d, error %v; want %d, %d", tt.name, ans.addrs, ans.negTTL, err, tt.addrs, tt.negTTL)
		}
	}
}
