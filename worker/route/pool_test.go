package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/hostname"
	"github.com/sniproxy/sniproxy/worker/balance"
)

// TestDecideALPNAndRegexp checks the rule kinds that are not indexed by
// key: alpn conditions (on keyed and regexp rules) and regular
// expressions, in first-match order with the keyed rules.
func TestDecideALPNAndRegexp(t *testing.T) {
	re := func(s string) *regexp.Regexp {
		r, err := config.CompileMatch(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	p := hostname.MustParsePattern
	routes := []Rule{
		{Match: p("app.example.com"), ALPN: []string{"acme-tls/1"}, Host: "10.0.0.1", Port: 1},
		{Match: p("app.example.com"), ALPN: []string{"h2", "spdy/3"}, Host: "10.0.0.2", Port: 2},
		{Regexp: re(`~app\.example\.(com|org)`), ALPN: []string{"x"}, Host: "10.0.0.3", Port: 3},
		{Match: p("app.example.com"), Host: "10.0.0.4", Port: 4},
		{Match: p("app.example.com"), ALPN: []string{"h3"}, Host: "10.0.0.5", Port: 5}, // shadowed
		{Regexp: re(`~[a-z]+-[0-9]+\.example\.net`), Host: "10.0.0.6", Port: 6},
		{Match: p("*.example.net"), Host: "10.0.0.7", Port: 7},
	}
	tab := NewTable(nil, routes, nil)
	tests := []struct {
		name, alpn string
		want       int
	}{
		{"app.example.com", "acme-tls/1", 0},
		{"app.example.com", "h2,http/1.1", 1},
		{"app.example.com", "http/1.1,spdy/3", 1},
		{"app.example.com", "x", 2},
		{"app.example.org", "x", 2},
		{"app.example.com", "", 3},
		{"app.example.com", "h3", 3},
		{"app.example.com", "acme-tls/10", 3},
		{"web-12.example.net", "", 5},
		{"web.example.net", "", 6},
		{"WEB-1.example.net.", "h2", 5},
		{"web-1.example.net.evil", "", -1},
	}
	for _, tt := range tests {
		got, err := tab.DecideALPN(tt.name, tt.alpn, 443)
		if err != nil {
			t.Fatalf("DecideALPN(%q, %q): %v", tt.name, tt.alpn, err)
		}
		if got.Rule != tt.want {
			t.Errorf("DecideALPN(%q, %q): got rule %d; want %d", tt.name, tt.alpn, got.Rule, tt.want)
		}
		if got.Rule >= 0 && got.Port != got.Rule+1 {
			t.Errorf("DecideALPN(%q, %q): got port %d; want %d", tt.name, tt.alpn, got.Port, got.Rule+1)
		}
	}
}

// TestFallback checks which refusals a default backend may take.
func TestFallback(t *testing.T) {
	tab := NewTable(patterns("evil.test"), nil, patterns("*.allowed.test"))
	tests := []struct {
		name string
		want bool
	}{
		{"", true},             // no name
		{"a b", true},          // not a host name
		{"x.other.test", true}, // not in the allowlist
		{"127.0.0.1", true},    // an address no route matches
		{"evil.test", false},   // the denylist
	}
	for _, tt := range tests {
		dec, err := tab.Decide(tt.name, 443)
		if err == nil {
			t.Fatalf("Decide(%q): no error", tt.name)
		}
		if got := FallbackOK(dec, err); got != tt.want {
			t.Errorf("FallbackOK(Decide(%q)) = %v; want %v (err %v)", tt.name, got, tt.want, err)
		}
	}
	dns := Decision{Rule: RuleDNS, Host: "x.test", Port: 443}
	if !FallbackOK(dns, fmt.Errorf("resolve: %w", ErrNoRoute)) {
		t.Error("a DNS-routed name without an answer: no fallback")
	}
	if FallbackOK(dns, fmt.Errorf("all refused: %w", ErrPrivate)) {
		t.Error("a private address: fallback")
	}
	if FallbackOK(dns, fmt.Errorf("refused: %w", ErrDial)) {
		t.Error("an unreachable DNS-routed backend: fallback")
	}
}

// listenHold returns a loopback listener that accepts (and holds) connections
// until the test ends.
func listenHold(t *testing.T) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	return ln
}

// deadPort returns a loopback port nothing listens on.
func deadPort(t *testing.T) int {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func poolOf(t *testing.T, policy balance.Policy, ports ...int) *Pool {
	t.Helper()
	var bs []PoolBackend
	for _, port := range ports {
		a := "127.0.0.1:" + strconv.Itoa(port)
		bs = append(bs, PoolBackend{Address: a, Host: "127.0.0.1", Port: port, Key: a, Weight: 1})
	}
	p, err := NewPool("app.test", policy, bs)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDialPoolFailover: a dead backend first in the order costs the client
// nothing; the failure and the success are reported; the connection is
// counted until released.
func TestDialPoolFailover(t *testing.T) {
	live := listenHold(t).Addr().(*net.TCPAddr).Port
	dead := deadPort(t)
	p := poolOf(t, balance.RoundRobin, dead, live)
	d := &Dialer{}
	type attempt struct {
		i   int
		err error
	}
	for round := range 4 {
		var got []attempt
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, i, ap, err := d.DialPool(ctx, Decision{Rule: 0, Pool: p}, netip.Addr{}, func(i int, err error) { got = append(got, attempt{i, err}) })
		cancel()
		if err != nil {
			t.Fatalf("round %d: DialPool: %v", round, err)
		}
		c.Close()
		if i != 1 || int(ap.Port()) != live {
			t.Fatalf("round %d: got backend %d at %v; want 1 at port %d", round, i, ap, live)
		}
		last := got[len(got)-1]
		if last.i != 1 || last.err != nil {
			t.Errorf("round %d: last report %+v; want success of 1", round, last)
		}
		for _, a := range got[:len(got)-1] {
			if a.i != 0 || Failure(a.err) != "connection refused" {
				t.Errorf("round %d: report %+v (%s); want backend 0 refused", round, a, Failure(a.err))
			}
		}
		if p.Active(1) != int64(round+1) {
			t.Errorf("round %d: active %d; want %d", round, p.Active(1), round+1)
		}
	}
	if p.Connections(1) != 4 || p.Connections(0) != 0 {
		t.Errorf("connections %d, %d; want 0, 4", p.Connections(0), p.Connections(1))
	}
	for range 4 {
		p.Release(1)
	}
	if p.Active(1) != 0 {
		t.Errorf("active after release %d; want 0", p.Active(1))
	}
}

// TestDialPoolDown: a backend marked down is not tried while another is
// up; when every backend is down all are tried, and the error says
// dial_error.
func TestDialPoolDown(t *testing.T) {
	a := listenHold(t).Addr().(*net.TCPAddr).Port
	b := listenHold(t).Addr().(*net.TCPAddr).Port
	p := poolOf(t, balance.RoundRobin, a, b)
	p.SetUp(0, false)
	d := &Dialer{}
	for range 6 {
		c, i, _, err := d.DialPool(context.Background(), Decision{Pool: p}, netip.Addr{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		p.Release(i)
		if i != 1 {
			t.Fatalf("got backend %d while 0 is down", i)
		}
	}
	dead := poolOf(t, balance.RoundRobin, deadPort(t), deadPort(t))
	dead.SetUp(0, false)
	dead.SetUp(1, false)
	n := 0
	_, _, _, err := d.DialPool(context.Background(), Decision{Pool: dead}, netip.Addr{}, func(int, error) { n++ })
	if !errors.Is(err, ErrDial) || reasonOf(err) != ReasonDialError {
		t.Errorf("all dead: err %v; want ErrDial", err)
	}
	if n != 2 {
		t.Errorf("all down and dead: %d attempts reported; want 2", n)
	}
}

// TestDialPoolCancelled: a dial cut short by the closing connection is not
// reported as the backend's failure.
func TestDialPoolCancelled(t *testing.T) {
	p := poolOf(t, balance.RoundRobin, deadPort(t))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	n := 0
	_, _, _, err := (&Dialer{}).DialPool(ctx, Decision{Pool: p}, netip.Addr{}, func(int, error) { n++ })
	if err == nil || n != 0 {
		t.Errorf("cancelled: err %v, %d reports; want an error and none", err, n)
	}
}

func TestPoolFind(t *testing.T) {
	p, err := NewPool("app.test", balance.RoundRobin, []PoolBackend{
		{Address: "10.0.0.1:443", Host: "10.0.0.1", Port: 443, Weight: 1},
		{Address: "[2001:db8::1]:443", Host: "2001:db8::1", Port: 443, Weight: 1},
		{Address: "app.internal:443", Host: "app.internal", Port: 443, Weight: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr string
		want int
	}{
		{"10.0.0.1:443", 0},
		{"[::ffff:10.0.0.1]:443", 0}, // IPv4-mapped, as a dual-stack socket reports it
		{"[2001:db8::1]:443", 1},
		{"10.0.0.1:444", -1},
		{"10.0.0.2:443", -1},
		{"192.0.2.7:443", -1}, // what app.internal resolved to: not known here
	} {
		if got := p.Find(netip.MustParseAddrPort(tc.addr)); got != tc.want {
			t.Errorf("Find(%s) = %d; want %d", tc.addr, got, tc.want)
		}
	}
	p.Adopt(1)
	if p.Active(1) != 1 {
		t.Errorf("Active after Adopt %d; want 1", p.Active(1))
	}
	p.Release(1)
	if p.Active(1) != 0 {
		t.Errorf("Active after Release %d; want 0", p.Active(1))
	}
}
