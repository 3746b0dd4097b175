package route

import (
	"fmt"
	"net/netip"
)

// Family is backend.dns_family: which address families of a backend's host
// name are dialled, and in which order. The zero value is FamilyAny.
type Family string

// The values of backend.dns_family.
const (
	// FamilyAny dials both families, alternating between them and starting
	// with the family of the resolver's first address (RFC 8305 section 4),
	// so one unreachable family costs one attempt, not all of its addresses.
	// The DNS resolver for DNS-routed names puts IPv6 first.
	FamilyAny Family = "any"
	// FamilyIPv4 dials IPv4 addresses only (only A records are asked for).
	FamilyIPv4 Family = "ipv4"
	// FamilyIPv6 dials IPv6 addresses only (only AAAA records are asked for).
	FamilyIPv6 Family = "ipv6"
	// FamilyPreferIPv4 dials every IPv4 address before any IPv6 one.
	FamilyPreferIPv4 Family = "prefer_ipv4"
	// FamilyPreferIPv6 dials every IPv6 address before any IPv4 one.
	FamilyPreferIPv6 Family = "prefer_ipv6"
)

// check returns an error when f is none of the values above ("" is any).
func (f Family) check() error {
	switch f {
	case "", FamilyAny, FamilyIPv4, FamilyIPv6, FamilyPreferIPv4, FamilyPreferIPv6:
		return nil
	}
	return fmt.Errorf("unknown address family %q", string(f))
}

// network is the network argument of LookupNetIP that asks only for the
// addresses f may dial.
func (f Family) network() string {
	switch f {
	case FamilyIPv4:
		return "ip4"
	case FamilyIPv6:
		return "ip6"
	}
	return "ip"
}

// order returns the addresses of addrs (unmapped) f dials, in the order it
// dials them. It does not modify addrs.
func (f Family) order(addrs []netip.Addr) []netip.Addr {
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		if a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	switch f {
	case FamilyIPv4:
		return v4
	case FamilyIPv6:
		return v6
	case FamilyPreferIPv4:
		return append(v4, v6...)
	case FamilyPreferIPv6:
		return append(v6, v4...)
	}
	if len(addrs) == 0 {
		return nil
	}
	first, second := v6, v4
	if addrs[0].Is4() {
		first, second = v4, v6
	}
	out := make([]netip.Addr, 0, len(addrs))
	for i := 0; i < len(first) || i < len(second); i++ {
		if i < len(first) {
			out = append(out, first[i])
		}
		if i < len(second) {
			out = append(out, second[i])
		}
	}
	return out
}
