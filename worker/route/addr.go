package route

import (
	"fmt"
	"net/netip"
)

// blockedRange is one address block DNS-routed names may not reach unless
// Dialer.AllowPrivate is set.
type blockedRange struct {
	prefix netip.Prefix
	why    string
}

var blocked4 = []blockedRange{
	{netip.MustParsePrefix("0.0.0.0/8"), "this-network (0.0.0.0/8)"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private (10/8)"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared CGNAT (100.64/10)"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback (127/8)"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local (169.254/16)"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private (172.16/12)"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignments (192.0.0/24)"},
	{netip.MustParsePrefix("192.0.2.0/24"), "documentation (192.0.2/24)"},
	{netip.MustParsePrefix("192.88.99.0/24"), "6to4 relay anycast (192.88.99/24)"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private (192.168/16)"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking (198.18/15)"},
	{netip.MustParsePrefix("198.51.100.0/24"), "documentation (198.51.100/24)"},
	{netip.MustParsePrefix("203.0.113.0/24"), "documentation (203.0.113/24)"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast (224/4)"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved (240/4)"},
}

// blocked6 is checked in order, after the embedded-IPv4 forms; an address in
// none of them must still be in global6.
var blocked6 = []blockedRange{
	{netip.MustParsePrefix("::/128"), "unspecified (::)"},
	{netip.MustParsePrefix("::1/128"), "loopback (::1)"},
	{netip.MustParsePrefix("::/96"), "IPv4-compatible (::/96, deprecated)"},
	{netip.MustParsePrefix("::ffff:0:0:0/96"), "IPv4-translated (::ffff:0:0:0/96)"},
	{netip.MustParsePrefix("100::/64"), "discard-only (100::/64)"},
	{netip.MustParsePrefix("2001::/32"), "Teredo (2001::/32)"},
	{netip.MustParsePrefix("2001::/23"), "IETF special-purpose (2001::/23)"},
	{netip.MustParsePrefix("2001:db8::/32"), "documentation (2001:db8::/32)"},
	{netip.MustParsePrefix("2002::/16"), "6to4 (2002::/16)"},
	{netip.MustParsePrefix("3fff::/20"), "documentation (3fff::/20)"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (fc00::/7)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local (fe80::/10)"},
	{netip.MustParsePrefix("fec0::/10"), "site-local (fec0::/10, deprecated)"},
	{netip.MustParsePrefix("ff00::/8"), "multicast (ff00::/8)"},
}

var (
	// global6 is the only IPv6 block IANA allocates for global unicast.
	global6 = netip.MustParsePrefix("2000::/3")
	// nat64 is the well-known NAT64 prefix (RFC 6052): the IPv4 address
	// is the last 32 bits.
	nat64 = netip.MustParsePrefix("64:ff9b::/96")
	// nat64Local is the local-use NAT64 prefix (RFC 8215). An operator may
	// translate with the whole /48 or with any longer prefix carved from it
	// at an RFC 6052 length (/56, /64, /96), and the IPv4 address sits in
	// different bits for each: see nat64LocalLayouts.
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")
)

// nat64LocalLayouts are the bytes holding the IPv4 address, in order, for
// each RFC 6052 prefix length (section 2.2) a sub-prefix of a /48 can have.
// Byte 8 (bits 64-71, the u octet) is never part of it.
var nat64LocalLayouts = [...]struct {
	bits int
	at   [4]int
}{
	{48, [4]int{6, 7, 9, 10}},
	{56, [4]int{7, 9, 10, 11}},
	{64, [4]int{9, 10, 11, 12}},
	{96, [4]int{12, 13, 14, 15}},
}

// blockedWhy says why a DNS-routed name may not reach a, or returns "" when
// it may: a is a public unicast address. The zone of a is ignored; IPv4-mapped
// and NAT64 addresses are judged by the IPv4 address they carry, a local-use
// NAT64 address by every IPv4 address it can carry.
func blockedWhy(a netip.Addr) string {
	if !a.IsValid() {
		return "invalid address"
	}
	a = a.WithZone("") // Prefix.Contains never matches a zoned address
	if a.Is4In6() {
		if why := blocked4Why(a.Unmap()); why != "" {
			return "IPv4-mapped " + why
		}
		return ""
	}
	if a.Is4() {
		return blocked4Why(a)
	}
	b := a.As16()
	switch {
	case nat64.Contains(a):
		if why := blocked4Why(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})); why != "" {
			return "NAT64 " + why
		}
		return ""
	case nat64Local.Contains(a):
		// The proxy cannot know which prefix length the local translator
		// uses, so the address must be public in every reading: otherwise
		// 64:ff9b:1:808:8:808:a00:1 (8.8.8.8 read as a /48) would reach
		// 10.0.0.1 through a /96 translator.
		if b[8] != 0 {
			return "local-use NAT64 (64:ff9b:1::/48) with a non-zero u octet"
		}
		for _, l := range nat64LocalLayouts {
			v4 := netip.AddrFrom4([4]byte{b[l.at[0]], b[l.at[1]], b[l.at[2]], b[l.at[3]]})
			if why := blocked4Why(v4); why != "" {
				return fmt.Sprintf("local-use NAT64 %s (%s read with a /%d prefix)", why, v4, l.bits)
			}
		}
		return ""
	}
	for _, r := range blocked6 {
		if r.prefix.Contains(a) {
			return r.why
		}
	}
	if !global6.Contains(a) {
		return "not global unicast (outside 2000::/3)"
	}
	return ""
}

func blocked4Why(a netip.Addr) string {
	for _, r := range blocked4 {
		if r.prefix.Contains(a) {
			return r.why
		}
	}
	return ""
}
