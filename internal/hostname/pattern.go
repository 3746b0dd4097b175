// Package hostname holds the syntax of the host names, name patterns and
// backend addresses that sniproxy's config is written in. It is shared by
// package config, which validates them, and package route, which matches and
// dials them; it imports nothing of sniproxy's own.
package hostname

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Name limits from RFC 1035, in bytes of the presentation form without the
// trailing dot.
const (
	maxNameLen  = 253
	maxLabelLen = 63
)

// Pattern is a name pattern from the config: "example.com" (exact) or
// "*.example.com" (any name ending in ".example.com", at any depth, but not
// "example.com" itself). An IP address is an exact pattern that matches the
// same address however the name spells it ("::1" matches "[::1]" and
// "0:0::1").
//
// Patterns are case-insensitive and ignore one trailing dot. The zero Pattern
// matches nothing. A Pattern is a small immutable value, safe to copy and to
// use from several goroutines.
type Pattern struct {
	s      string     // canonical form; "" only for the zero Pattern
	suffix string     // ".example.com" for "*.example.com", "" otherwise
	ip     netip.Addr // valid when the pattern is an IP address
}

// ParsePattern parses a pattern from the config. The error says what is
// wrong: empty, surrounding space, a bad character, an empty or too long label
// or name, "*" anywhere but as the whole first label, "*" alone.
func ParsePattern(s string) (Pattern, error) {
	fail := func(reason string) (Pattern, error) {
		return Pattern{}, fmt.Errorf("pattern %q: %s", s, reason)
	}
	if s == "" {
		return fail("empty")
	}
	if strings.TrimSpace(s) != s {
		return fail("leading or trailing space")
	}
	n := strings.ToLower(strings.TrimSuffix(s, "."))
	if n == "" {
		return fail("empty")
	}
	if a, ok := ParseIPLiteral(n); ok {
		if a.Zone() != "" {
			return fail("IP address with a zone")
		}
		return Pattern{s: a.String(), ip: a}, nil
	}
	if n == "*" {
		return fail(`"*" alone would match every name; leave the allowlist empty to allow any name`)
	}
	rest, wildcard := strings.CutPrefix(n, "*.")
	if strings.Contains(rest, "*") {
		return fail(`"*" may only be the whole first label, as in "*.example.com"`)
	}
	if why := Problem(rest); why != "" {
		return fail(why)
	}
	if wildcard {
		return Pattern{s: n, suffix: n[1:]}, nil
	}
	return Pattern{s: n}, nil
}

// MustParsePattern is like ParsePattern but panics on error. It is meant for
// tests and for patterns written in the source.
func MustParsePattern(s string) Pattern {
	p, err := ParsePattern(s)
	if err != nil {
		panic(err)
	}
	return p
}

// Match reports whether name matches the pattern. The name must already be
// lowercased and have no trailing dot, as [Table.Decide] and package sniff
// produce it.
func (p Pattern) Match(name string) bool {
	switch {
	case p.s == "":
		return false
	case p.ip.IsValid():
		a, ok := ParseIPLiteral(name)
		return ok && a == p.ip
	case p.suffix != "":
		return len(name) > len(p.suffix) && strings.HasSuffix(name, p.suffix)
	default:
		return name == p.s
	}
}

// Name returns the name an exact pattern matches ("example.com"), or "" for
// a "*.suffix" pattern, an IP address pattern and the zero Pattern. Together
// with [Pattern.Suffix] and [Pattern.Addr] it lets a caller index many
// patterns by key instead of trying each in turn: p matches name exactly when
// name == p.Name(), when name ends in p.Suffix() after at least one more
// byte, or when name is an IP literal ([ParseIPLiteral]) equal to p.Addr().
func (p Pattern) Name() string {
	if p.suffix != "" || p.ip.IsValid() {
		return ""
	}
	return p.s
}

// Suffix returns ".example.com" for the pattern "*.example.com", or "" for
// any other pattern.
func (p Pattern) Suffix() string { return p.suffix }

// Addr returns the address of an IP address pattern, without a zone; ok is
// false for any other pattern.
func (p Pattern) Addr() (a netip.Addr, ok bool) { return p.ip, p.ip.IsValid() }

// String returns the pattern in canonical form: lowercased, without a
// trailing dot, an IPv6 address without brackets. It is "" for the zero
// Pattern.
func (p Pattern) String() string { return p.s }

// ParseIPLiteral parses s as an IP address, IPv6 optionally in brackets as in
// a URL or Host header.
func ParseIPLiteral(s string) (netip.Addr, bool) {
	// Most names are not addresses: an IPv6 address has a ':' and an IPv4
	// one only digits and dots. Saying so here spares the error value
	// netip.ParseAddr allocates, once per connection.
	if !strings.Contains(s, ":") && strings.ContainsFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' }) {
		return netip.Addr{}, false
	}
	bracketed := len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']'
	if bracketed {
		s = s[1 : len(s)-1]
	}
	a, err := netip.ParseAddr(s)
	if err != nil || (bracketed && !a.Is6()) {
		return netip.Addr{}, false
	}
	return a, true
}

// Problem says what makes s, lowercased and without a trailing dot, not a
// host name, or returns "" when it is one. Labels are letters, digits, '-'
// and '_' (seen in real names though not in RFC 952 host names); anything
// else, including non-ASCII, is refused: international names arrive in
// punycode ("xn--...").
func Problem(s string) string {
	if s == "" {
		return "empty name"
	}
	if len(s) > maxNameLen {
		return fmt.Sprintf("name longer than %d bytes", maxNameLen)
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 {
				return "empty label"
			}
			label = 0
			continue
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		case c >= 0x80:
			return "non-ASCII character (write international names in punycode, xn--...)"
		default:
			return fmt.Sprintf("invalid character %q", c)
		}
		label++
		if label > maxLabelLen {
			return fmt.Sprintf("label longer than %d bytes", maxLabelLen)
		}
	}
	if label == 0 {
		return "empty label"
	}
	return ""
}

// IsAddress reports whether name, lowercased and without a trailing dot,
// denotes an IP address rather than a DNS name: an address net/netip parses
// (IPv6 also in brackets), or a name whose last label is a number in the
// sense of the WHATWG URL host parser (decimal digits, or "0x" and hex
// digits). The C library's inet_aton reads "127.1", "2130706433" and
// "0x7f.0.0.1" as 127.0.0.1, and no top-level domain is numeric.
func IsAddress(name string) bool {
	if _, ok := ParseIPLiteral(name); ok {
		return true
	}
	last := name[strings.LastIndexByte(name, '.')+1:]
	if last == "" {
		return false
	}
	if hex, ok := strings.CutPrefix(last, "0x"); ok {
		return strings.Trim(hex, "0123456789abcdef") == ""
	}
	return strings.Trim(last, "0123456789") == ""
}

// ParseBackend parses a route's backend: "10.0.0.5:8443", "[::1]:443",
// "::1", "host" or "backend.internal:8443". The port, when present, must be
// 1..65535; port is 0 when s has none. The host is returned in canonical
// form: an IP address as netip formats it (IPv6 without brackets), a name
// lowercased without its trailing dot. A name whose last label is numeric
// ("10.1") is refused as an ambiguous IP address.
func ParseBackend(s string) (host string, port int, err error) {
	fail := func(reason string) (string, int, error) {
		return "", 0, fmt.Errorf("backend %q: %s", s, reason)
	}
	if s == "" {
		return fail("empty")
	}
	if strings.TrimSpace(s) != s {
		return fail("leading or trailing space")
	}
	if a, err := netip.ParseAddr(s); err == nil { // IPv6 without brackets, no port
		return a.String(), 0, nil
	}
	h := s
	if a, ok := ParseIPLiteral(s); ok { // "[::1]"
		return a.String(), 0, nil
	}
	if strings.Contains(s, ":") {
		var p string
		h, p, err = net.SplitHostPort(s)
		if err != nil {
			var ae *net.AddrError
			if errors.As(err, &ae) {
				return fail(ae.Err)
			}
			return fail(err.Error())
		}
		if strings.HasPrefix(s, "[") && !strings.Contains(h, ":") {
			return fail("brackets are for IPv6 addresses")
		}
		if p == "" {
			return fail("empty port")
		}
		if strings.Trim(p, "0123456789") != "" {
			return fail(fmt.Sprintf("port %q is not a number", p))
		}
		port, err = strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return fail(fmt.Sprintf("port %s out of range 1-65535", p))
		}
	}
	if h == "" {
		return fail("empty host")
	}
	if a, err := netip.ParseAddr(h); err == nil {
		return a.String(), port, nil
	}
	n := strings.ToLower(strings.TrimSuffix(h, "."))
	if why := Problem(n); why != "" {
		return fail("host " + why)
	}
	if IsAddress(n) {
		return fail(fmt.Sprintf("host %q is neither an IP address nor a host name", h))
	}
	return n, port, nil
}
