package config

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// trustedBase is a valid config but for its listeners.
const trustedBase = "timeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n"

func TestTrustedProxiesErrors(t *testing.T) {
	for _, tc := range []struct {
		name, listeners, key, reason string
	}{
		{"required", `[{address: "127.0.0.1:8443", accept_proxy_protocol: true}]`,
			"listeners[0].trusted_proxies", "required when accept_proxy_protocol"},
		{"empty list", `[{address: "127.0.0.1:8443"}, {address: "127.0.0.1:8444", accept_proxy_protocol: true, trusted_proxies: []}]`,
			"listeners[1].trusted_proxies", "required when accept_proxy_protocol"},
		{"not an address", `[{address: "127.0.0.1:8443", accept_proxy_protocol: true, trusted_proxies: ["10.0.0.0/8", "lb.example"]}]`,
			"listeners[0].trusted_proxies[1]", "CIDR"},
		{"bad prefix length", `[{address: "127.0.0.1:8443", accept_proxy_protocol: true, trusted_proxies: ["10.0.0.0/33"]}]`,
			"listeners[0].trusted_proxies[0]", "CIDR"},
		{"zone", `[{address: "127.0.0.1:8443", accept_proxy_protocol: true, trusted_proxies: ["fe80::1%eth0"]}]`,
			"listeners[0].trusted_proxies[0]", "zone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(trustedBase+"listeners: "+tc.listeners+"\n"), []string{})
			if err == nil {
				t.Fatalf("Parse succeeded; want an error naming %q", tc.key)
			}
			if !strings.Contains(err.Error(), tc.key+": ") || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q; want one naming %q saying %q", err, tc.key, tc.reason)
			}
		})
	}
}

func TestTrustedProxies(t *testing.T) {
	yaml := trustedBase + `listeners:
  - address: "127.0.0.1:8443"
    accept_proxy_protocol: true
    trusted_proxies: ["10.1.2.3/8", "192.0.2.7", "2001:db8::/32", "::ffff:198.51.100.0/120"]
  - address: "127.0.0.1:8444"
`
	c, err := Parse([]byte(yaml), []string{})
	if err != nil {
		t.Fatal(err)
	}
	l := c.Listeners[0]
	want := []string{"10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "198.51.100.0/24"}
	if !slices.Equal(l.TrustedProxies, want) {
		t.Errorf("trusted_proxies normalised to %q; want %q", l.TrustedProxies, want)
	}
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"10.200.0.1", true},
		{"11.0.0.1", false},
		{"192.0.2.7", true},
		{"192.0.2.8", false},
		{"::ffff:192.0.2.7", true}, // a dual-stack listener's view of 192.0.2.7
		{"::ffff:10.0.0.1", true},
		{"2001:db8:1::1", true},
		{"2001:db9::1", false},
		{"198.51.100.200", true}, // written as an IPv4-mapped prefix
		{"::ffff:198.51.100.200", true},
		{"198.51.101.1", false},
	} {
		if got := l.Trusts(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("Trusts(%s) = %v; want %v", tc.addr, got, tc.want)
		}
	}
	if c.Listeners[1].Trusts(netip.MustParseAddr("10.0.0.1")) {
		t.Error("a listener without trusted_proxies trusts 10.0.0.1")
	}

	// Workers parse the config the master prints: the list must survive.
	out, err := c.YAML()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := Parse(out, []string{})
	if err != nil {
		t.Fatalf("printed config does not parse: %v\n%s", err, out)
	}
	if l2 := c2.Listeners[0]; !slices.Equal(l2.TrustedProxies, want) || !l2.Trusts(netip.MustParseAddr("192.0.2.7")) {
		t.Errorf("after printing, trusted_proxies %q:\n%s", l2.TrustedProxies, out)
	}
}
