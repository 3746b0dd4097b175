package route

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// Sentinel errors. Every error this package returns wraps exactly one of them
// (and sometimes the underlying cause too); test with errors.Is.
var (
	// ErrDenied means policy refuses the name: the denylist, an allowlist
	// that does not list it, or an IP address given as a name to DNS routing.
	ErrDenied = errors.New("route: denied")
	// ErrNoRoute means there is nowhere to send the name: no name, a name
	// that is not a host name, no backend port, or a DNS-routed name with no
	// DNS answer.
	ErrNoRoute = errors.New("route: no route")
	// ErrPrivate means every address of a DNS-routed name was refused by
	// the address policy (private, loopback, ..., or one of the proxy's own
	// listeners).
	ErrPrivate = errors.New("route: private address")
	// ErrDial means the backend could not be reached: every permitted
	// address failed to connect, the dial phase timed out, or the host of an
	// explicit route did not resolve.
	ErrDial = errors.New("route: dial failed")
)

// Reason is why a connection was refused, as the reason label of
// sniproxy_connections_rejected_total.
type Reason string

// The reasons this package produces.
const (
	ReasonDenied    Reason = "denied"
	ReasonNoRoute   Reason = "no_route"
	ReasonDialError Reason = "dial_error"
)

// Rule is one explicit route: names matching Match (or Regexp) whose
// ClientHello offers one of ALPN (when set) go to Host:Port, or to Pool.
type Rule struct {
	// Match selects the names this rule routes, unless Regexp is set.
	Match hostname.Pattern
	// Regexp, when not nil, selects the names instead of Match: those it
	// matches (config.CompileMatch anchors it at both ends). Such a rule
	// cannot be indexed: each costs one regexp match per look-up.
	Regexp *regexp.Regexp
	// ALPN, when not empty, restricts the rule to clients that offer at
	// least one of these protocols.
	ALPN []string
	// Host is the backend: an IP address (canonical form, IPv6 without
	// brackets, possibly with a zone) or a lowercased host name that the
	// Dialer resolves.
	Host string
	// Port is the backend port; 0 means the listener's backend port.
	Port int
	// Pool, when not nil, is the rule's pool of backends (Host and Port
	// are then unused): Dialer.DialPool dials it.
	Pool *Pool
}

// String returns the rule's match as the config writes it.
func (r Rule) String() string {
	if r.Regexp != nil {
		return "~" + strings.TrimSuffix(strings.TrimPrefix(r.Regexp.String(), "^(?:"), ")$")
	}
	return r.Match.String()
}

// offers reports whether the client's offered protocols, joined by ","
// as package sniff gives them, include one of the rule's.
func (r *Rule) offers(alpn string) bool {
	for p := range strings.SplitSeq(alpn, ",") {
		if p != "" && slices.Contains(r.ALPN, p) {
			return true
		}
	}
	return false
}

// Table holds the routing policy. Build it with [NewTable]; it is immutable
// and safe for concurrent use by any number of goroutines. The zero Table
// (and a nil *Table) routes every valid name through DNS.
//
// Decide takes the same time whether the lists hold ten patterns or a
// hundred thousand: each list is indexed by key (exact name, "*.suffix", IP
// address) when the Table is built, and first-match order is kept by taking
// the lowest position among the keyed hits (see index).
type Table struct {
	deny   []hostname.Pattern
	routes []Rule
	allow  []hostname.Pattern

	denyIndex, routeIndex, allowIndex index
}

// NewTable builds the routing policy: deny is checked first and a match
// refuses the name; routes are explicit backends, the first match wins;
// allow, when non-empty, lists the only names DNS routing may dial. NewTable
// keeps copies of the slices and indexes them, in time and memory linear in
// their length.
func NewTable(deny []hostname.Pattern, routes []Rule, allow []hostname.Pattern) *Table {
	t := &Table{
		deny:   slices.Clone(deny),
		routes: slices.Clone(routes),
		allow:  slices.Clone(allow),
	}
	t.denyIndex = newIndex(t.deny)
	entries := make([]indexEntry, len(t.routes))
	for i, r := range t.routes {
		entries[i] = indexEntry{p: r.Match, re: r.Regexp, cond: len(r.ALPN) > 0}
	}
	t.routeIndex = newEntryIndex(entries)
	t.allowIndex = newIndex(t.allow)
	return t
}

// Special values of Decision.Rule.
const (
	// RuleDNS is the Rule of DNS routing (and of a refusal).
	RuleDNS = -1
	// RuleDefault is the Rule of a connection sent to a default backend:
	// trusted configuration, like an explicit route.
	RuleDefault = -2
)

// Decision says how a name is routed.
type Decision struct {
	// Rule is the index of the matching route in the routes given to
	// NewTable, RuleDNS (-1) for DNS routing, or RuleDefault for a default
	// backend. Dialer.Dial applies the address policy only to RuleDNS: a
	// hand-made Decision must set it (the zero value means route 0).
	Rule int
	// Pool is the matching route's pool, if it has one; Host and Port are
	// then empty and Dialer.DialPool dials it.
	Pool *Pool
	// Fallback is set with an error when the name found no route and was
	// not refused by policy: no name (or not a host name), not in a
	// non-empty allowlist, an IP address no route matches, no backend
	// port. A default backend may take such a connection; it never takes
	// one refused by the denylist. Dialer.Dial adds the other case, a
	// DNS-routed name without an answer (see FallbackOK).
	Fallback bool
	// Host is the host to dial: the route's backend host, or the name
	// itself for DNS routing.
	Host string
	// Port is the port to dial, 1..65535 when Decide succeeds.
	Port int
	// Name is the name as routed: lowercased, without a trailing dot.
	Name string
	// Reason is why the name was refused; set exactly when Decide returns
	// an error.
	Reason Reason
}

// Decide routes name, as sniffed from a client, for a listener whose backend
// port (for DNS routing and for routes without a port) is backendPort. The
// name is lowercased and one trailing dot dropped first. On error the
// Decision carries the Reason and Rule -1.
//
// Order, as the SPEC fixes it: denylist (refuse, [ErrDenied]) → routes,
// first match → allowlist, if non-empty (refuse when unmatched, [ErrDenied])
// → DNS routing of the name at backendPort. An empty name or one that is not
// a host name or IP address is [ErrNoRoute]; an IP address name that no route
// matches is [ErrDenied].
func (t *Table) Decide(name string, backendPort int) (Decision, error) {
	return t.DecideALPN(name, "", backendPort)
}

// DecideALPN is Decide for a client that offered the ALPN protocols alpn,
// joined by "," as package sniff gives them ("" for none, or not TLS): a
// route with an alpn list matches only when one of them is offered.
func (t *Table) DecideALPN(name, alpn string, backendPort int) (Decision, error) {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	refuse := func(r Reason, err error) (Decision, error) {
		return Decision{Rule: RuleDNS, Name: name, Reason: r, Fallback: r == ReasonNoRoute}, err
	}
	if name == "" {
		return refuse(ReasonNoRoute, fmt.Errorf("no name: %w", ErrNoRoute))
	}
	a, isAddr := hostname.ParseIPLiteral(name)
	if !isAddr {
		if why := hostname.Problem(name); why != "" {
			return refuse(ReasonNoRoute, fmt.Errorf("name %q: %s: %w", name, why, ErrNoRoute))
		}
	}
	if t == nil {
		t = &Table{}
	}
	if i := t.denyIndex.first(name, a, isAddr, nil); i >= 0 {
		return refuse(ReasonDenied, fmt.Errorf("name %q: in denylist (%s): %w", name, t.deny[i], ErrDenied))
	}
	holds := func(pos int) bool { return t.routes[pos].offers(alpn) }
	if i := t.routeIndex.first(name, a, isAddr, holds); i >= 0 {
		r := t.routes[i]
		if r.Pool != nil {
			return Decision{Rule: i, Pool: r.Pool, Name: name}, nil
		}
		port := r.Port
		if port == 0 {
			port = backendPort
		}
		if r.Host == "" || port < 1 || port > 65535 {
			return refuse(ReasonNoRoute, fmt.Errorf("name %q: route %d (%s) has no backend host or port: %w", name, i, r, ErrNoRoute))
		}
		return Decision{Rule: i, Host: r.Host, Port: port, Name: name}, nil
	}
	if len(t.allow) > 0 && t.allowIndex.first(name, a, isAddr, nil) < 0 {
		d, err := refuse(ReasonDenied, fmt.Errorf("name %q: not in allowlist: %w", name, ErrDenied))
		d.Fallback = true
		return d, err
	}
	if hostname.IsAddress(name) {
		d, err := refuse(ReasonDenied, fmt.Errorf("name %q: an IP address is not routed through DNS: %w", name, ErrDenied))
		d.Fallback = true
		return d, err
	}
	if backendPort < 1 || backendPort > 65535 {
		return refuse(ReasonNoRoute, fmt.Errorf("name %q: no backend port: %w", name, ErrNoRoute))
	}
	return Decision{Rule: RuleDNS, Host: name, Port: backendPort, Name: name}, nil
}
