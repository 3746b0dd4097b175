// Package route decides where a sniffed name goes and dials that backend
// without letting a client steer the proxy into the operator's own network.
//
// # Routing order
//
// [Table.Decide] applies the policy from the config in the order the SPEC
// fixes, and nothing else:
//
//  1. denylist: a match refuses ([ErrDenied]); it always wins;
//  2. routes: the first matching rule (its match — exact, "*.suffix" or a
//     "~regex" over the whole name — and, when it has an alpn list, one of
//     those protocols offered by the client: [Table.DecideALPN]) gives an
//     explicit backend or a pool ([Pool], dialled with failover by
//     [Dialer.DialPool]); a rule without a port inherits the listener's
//     backend port;
//  3. allowlist: when non-empty, a name that matches none is refused
//     ([ErrDenied]);
//  4. DNS routing: the name itself is dialled at the listener's backend port.
//
// [NewTable] indexes the three lists by exact name, "*.suffix" and IP
// address, so Decide takes the same time for ten routes as for a hundred
// thousand; "first match" still means the first in config order. Regular
// expressions cannot be indexed: each "~" route costs one match per look-up.
//
// A refusal that found no route (no name, not in the allowlist, a DNS-routed
// name without an answer) may go to a default backend instead
// ([FallbackOK]); a denylist or private-address refusal never does.
//
// Names that are IP addresses (anything [net/netip] parses, or whose last
// label is a number the way WHATWG URL hosts are, such as "127.1",
// "2130706433" or "0x7f.1", which the C library's resolver turns into
// addresses) are never routed through DNS: an explicit route may still match
// them. A name that is empty or not syntactically a host name gets
// [ErrNoRoute].
//
// # Address policy for DNS-routed names
//
// [Dialer.Dial] checks every address of a DNS-routed name in the
// [net.Dialer] Control hook, that is on the address the socket is about to
// connect to, after resolution and before any packet is sent, so a name that
// rebinds between look-up and connect cannot slip past. Resolved addresses
// are also pre-filtered with the same check to save sockets. Unless
// Dialer.AllowPrivate is set it refuses ([ErrPrivate]):
//
//   - IPv4: 0.0.0.0/8 (this network, unspecified), 10/8, 172.16/12,
//     192.168/16 (RFC 1918), 100.64/10 (CGNAT), 127/8 (loopback),
//     169.254/16 (link-local, cloud metadata 169.254.169.254), 192.0.0/24
//     (IETF protocol assignments, DS-Lite, NAT64 discovery), 192.0.2/24,
//     198.51.100/24, 203.0.113/24 (documentation), 192.88.99/24 (6to4 relay
//     anycast), 198.18/15 (benchmarking), 224/4 (multicast), 240/4 (reserved)
//     and 255.255.255.255 (broadcast);
//   - IPv6: anything outside 2000::/3, the only block IANA allocates for
//     global unicast (this covers ::, ::1, the deprecated IPv4-compatible
//     ::/96, IPv4-translated ::ffff:0:0:0/96, discard-only 100::/64, ULA
//     fc00::/7, link-local fe80::/10, site-local fec0::/10, multicast
//     ff00::/8), and inside it 2001::/23 (IETF special-purpose, including
//     Teredo 2001::/32 and benchmarking 2001:2::/48), 2001:db8::/32 and
//     3fff::/20 (documentation) and 6to4 2002::/16;
//   - IPv4-mapped ::ffff:a.b.c.d and NAT64 64:ff9b::/96 addresses are
//     judged by the IPv4 address they carry: a NAT64 address of a public
//     IPv4 address passes, one of 10.0.0.1 is refused. A local-use NAT64
//     address (64:ff9b:1::/48, RFC 8215) may belong to a translator using
//     the /48 or any sub-prefix of it at an RFC 6052 length (/56, /64,
//     /96), each placing the IPv4 address in other bits: it passes only
//     when all four readings are public and its u octet (bits 64-71) is
//     zero.
//
// Teredo and 6to4 are refused whole rather than judged by the IPv4 address
// they embed: both are deprecated tunnelling schemes (RFC 7526), a host with
// a tunnel interface sends their packets straight to the embedded IPv4
// address, and no service needs them in practice. Whatever AllowPrivate says,
// a DNS-routed name never reaches the unspecified address nor one of the
// proxy's own listeners (Dialer.Forbidden), so it cannot loop back into the
// proxy.
//
// Explicit routes are trusted configuration: they may reach any address,
// private and loopback included, and their host names are resolved and each
// address tried in turn without the check.
//
// # Resolution
//
// The two kinds of backend host names are resolved apart ([Dialer]):
//
//   - DNS-routed names, which clients choose, go to Dialer.DNS, by default a
//     [DNSResolver]: absolute names (no search list, so SNI "secret" cannot
//     become secret.corp.example past the denylist), asked of the name
//     servers of /etc/resolv.conf, not of /etc/hosts; localhost names are
//     loopback (RFC 6761). Answers are cached for their TTL, negative ones
//     for the SOA's negative TTL, in a bounded cache.
//   - Host names of explicit routes, which the operator wrote, go to
//     Dialer.Resolver, by default the system's (net.DefaultResolver):
//     /etc/hosts and the search list apply, with no cache of ours.
//
// Dialer.Family (backend.dns_family) then keeps the addresses of the
// families it allows, in its order, and [Dialer.Dial] tries them in turn
// within the connect timeout, applying the address policy to each.
//
// # Errors and metrics
//
// Every error wraps one of the sentinels; the worker maps an error to the
// label of sniproxy_connections_rejected_total: [ErrDenied] and [ErrPrivate]
// are "denied", [ErrNoRoute] is "no_route", [ErrDial] is "dial_error".
package route
