package route

import (
	"net/netip"
	"strings"
	"testing"
)

// The addresses here are values handed to the classifier; none is dialled.
func TestBlockedWhy(t *testing.T) {
	tests := []struct {
		addr string
		want string // substring of the reason; "" = public, allowed
	}{
		// IPv4 special-purpose ranges.
		{"0.0.0.0", "this-network"},
		{"0.1.2.3", "this-network"},
		{"10.0.0.1", "private (10/8)"},
		{"10.255.255.255", "private (10/8)"},
		{"100.64.0.1", "CGNAT"},
		{"100.127.255.254", "CGNAT"},
		{"127.0.0.1", "loopback"},
		{"127.255.255.254", "loopback"},
		{"169.254.169.254", "link-local"},
		{"169.254.0.1", "link-local"},
		{"172.16.0.1", "private (172.16/12)"},
		{"172.31.255.255", "private (172.16/12)"},
		{"192.0.0.170", "IETF protocol assignments"},
		{"192.0.2.1", "documentation"},
		{"192.88.99.1", "6to4 relay"},
		{"192.168.1.1", "private (192.168/16)"},
		{"198.18.0.1", "benchmarking"},
		{"198.19.255.255", "benchmarking"},
		{"198.51.100.7", "documentation"},
		{"203.0.113.9", "documentation"},
		{"224.0.0.1", "multicast"},
		{"239.255.255.250", "multicast"},
		{"240.0.0.1", "reserved"},
		{"255.255.255.255", "broadcast"},
		// Public IPv4, just outside the ranges.
		{"1.1.1.1", ""},
		{"8.8.8.8", ""},
		{"9.255.255.255", ""},
		{"11.0.0.0", ""},
		{"100.63.255.255", ""},
		{"100.128.0.0", ""},
		{"126.255.255.255", ""},
		{"128.0.0.0", ""},
		{"169.253.255.255", ""},
		{"172.15.255.255", ""},
		{"172.32.0.0", ""},
		{"192.0.1.255", ""},
		{"192.167.255.255", ""},
		{"192.169.0.0", ""},
		{"198.17.255.255", ""},
		{"198.20.0.0", ""},
		{"223.255.255.255", ""},
		// IPv6.
		{"::", "unspecified"},
		{"::1", "loopback"},
		{"::2", "IPv4-compatible"},
		{"::127.0.0.1", "IPv4-compatible"},
		{"::ffff:0:7f00:1", "IPv4-translated"},
		{"100::1", "discard-only"},
		{"2001::1", "Teredo"},
		{"2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"},
		{"2001:2::1", "IETF special-purpose"},
		{"2001:10::1", "IETF special-purpose"},
		{"2001:1ff:ffff::1", "IETF special-purpose"},
		{"2001:db8::1", "documentation"},
		{"2002:7f00:1::1", "6to4"},
		{"2002:808:808::1", "6to4"},
		{"3fff::1", "documentation"},
		{"fc00::1", "unique local"},
		{"fd12:3456:789a::1", "unique local"},
		{"fe80::1", "link-local"},
		{"fe80::1%eth0", "link-local"},
		{"febf::1", "link-local"},
		{"fec0::1", "site-local"},
		{"ff02::1", "multicast"},
		{"ff0e::1", "multicast"},
		{"4000::1", "not global unicast"},
		{"1::1", "not global unicast"},
		{"fa00::1", "not global unicast"},
		// Public IPv6.
		{"2001:200::1", ""},
		{"2001:4860:4860::8888", ""},
		{"2606:4700:4700::1111", ""},
		{"2a00:1450:4001::1", ""},
		{"3ffe::1", ""},
		{"2001:db7:ffff::1", ""},
		// IPv4-mapped, judged by the IPv4 address.
		{"::ffff:127.0.0.1", "IPv4-mapped loopback"},
		{"::ffff:10.1.2.3", "IPv4-mapped private"},
		{"::ffff:169.254.169.254", "IPv4-mapped link-local"},
		{"::ffff:0.0.0.0", "IPv4-mapped this-network"},
		{"::ffff:255.255.255.255", "IPv4-mapped broadcast"},
		{"::ffff:8.8.8.8", ""},
		// NAT64 well-known prefix 64:ff9b::/96.
		{"64:ff9b::7f00:1", "NAT64 loopback"},
		{"64:ff9b::10.0.0.1", "NAT64 private"},
		{"64:ff9b::169.254.169.254", "NAT64 link-local"},
		{"64:ff9b::192.168.0.1", "NAT64 private"},
		{"64:ff9b::100.64.0.1", "NAT64 shared CGNAT"},
		{"64:ff9b::808:808", ""},
		{"64:ff9b::1.1.1.1", ""},
		{"64:ff9b:0:0:1::1", "not global unicast"}, // outside the /96: neither NAT64 form
		// Local-use NAT64 64:ff9b:1::/48 read as a /48: IPv4 in bits 48-63 and 72-103.
		{"64:ff9b:1:7f00:0:100::", "local-use NAT64 loopback"},
		{"64:ff9b:1:a00:0:100::", "local-use NAT64 private"},
		{"64:ff9b:1:a9fe:a9:fe00::", "local-use NAT64 link-local"},
		{"64:ff9b:1:808:ff08:800::", "non-zero u octet"},
		// A /48 prefix is used at any RFC 6052 length from /48 to /96, and
		// the proxy cannot know which: every reading must be public. The
		// comments give the /48, /56, /64 and /96 readings.
		{"64:ff9b:1:80a:8:808:800:0", "local-use NAT64 private (10/8)"},   // 8.10.8.8, 10.8.8.8, 8.8.8.8, 8.0.0.0
		{"64:ff9b:1:808:a:808:808:808", "local-use NAT64 private (10/8)"}, // 8.8.10.8, 8.10.8.8, 10.8.8.8, 8.8.8.8
		{"64:ff9b:1:808:8:808:a00:1", "local-use NAT64 private (10/8)"},   // 8.8.8.8, 8.8.8.8, 8.8.8.10, 10.0.0.1
		{"64:ff9b:1:808:8:808:7f00:1", "local-use NAT64 loopback"},        // ..., 127.0.0.1
		{"64:ff9b:1:808:8:808:a9fe:a9fe", "local-use NAT64 link-local"},   // ..., 169.254.169.254
		{"64:ff9b:1:808:8:800::", "local-use NAT64 this-network"},         // 8.8.8.8, 8.8.8.0, 8.8.0.0, 0.0.0.0
		{"64:ff9b:1:808:8:808:808:808", ""},                               // 8.8.8.8 in every reading
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			got := blockedWhy(netip.MustParseAddr(tt.addr))
			switch {
			case tt.want == "" && got != "":
				t.Errorf("blockedWhy(%s): got %q; want allowed", tt.addr, got)
			case tt.want != "" && !strings.Contains(got, tt.want):
				t.Errorf("blockedWhy(%s): got %q; want %q", tt.addr, got, tt.want)
			}
		})
	}
	if got := blockedWhy(netip.Addr{}); got == "" {
		t.Errorf("blockedWhy(invalid): got allowed; want refused")
	}
}

// TestNAT64Embedding builds local-use NAT64 addresses from their parts, as
// RFC 6052 section 2.2 lays them out for each prefix length a /48 can use,
// with every other bit of the address set so that the other readings are
// public: each must be refused for the IPv4 address it embeds.
func TestNAT64Embedding(t *testing.T) {
	v4 := netip.MustParseAddr("10.20.30.40").As4()
	layouts := map[int][4]int{ // prefix length: the bytes holding the IPv4 address
		48: {6, 7, 9, 10},
		56: {7, 9, 10, 11},
		64: {9, 10, 11, 12},
		96: {12, 13, 14, 15},
	}
	for pl, at := range layouts {
		var b [16]byte
		copy(b[:], netip.MustParseAddr("64:ff9b:1::").AsSlice())
		for i := 6; i < 16; i++ {
			b[i] = 8
		}
		b[8] = 0 // the u octet
		for i, j := range at {
			b[j] = v4[i]
		}
		a := netip.AddrFrom16(b)
		if got := blockedWhy(a); !strings.Contains(got, "private (10/8)") {
			t.Errorf("/%d: blockedWhy(%s): got %q; want private (10/8)", pl, a, got)
		}
	}
}
