package route

import (
	"errors"
	"fmt"
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

// Rule is one explicit route: names matching Match go to Host:Port.
type Rule struct {
	// Match selects the names this rule routes.
	Match hostname.Pattern
	// Host is the backend: an IP address (canonical form, IPv6 without
	// brackets, possibly with a zone) or a lowercased host name that the
	// Dialer resolves.
	Host string
	// Port is the backend port; 0 means the listener's backend port.
	Port int
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
	matches := make([]hostname.Pattern, len(t.routes))
	for i, r := range t.routes {
		matches[i] = r.Match
	}
	t.routeIndex = newIndex(matches)
	t.allowIndex = newIndex(t.allow)
	return t
}

// Decision says how a name is routed.
type Decision struct {
	// Rule is the index of the matching route in the routes given to
	// NewTable, or -1 for DNS routing. Dialer.Dial applies the address policy only to -1: a
	// hand-made Decision must set it (the zero value means route 0).
	Rule int
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
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	refuse := func(r Reason, err error) (Decision, error) {
		return Decision{Rule: -1, Name: name, Reason: r}, err
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
	if i := t.denyIndex.first(name, a, isAddr); i >= 0 {
		return refuse(ReasonDenied, fmt.Errorf("name %q: in denylist (%s): %w", name, t.deny[i], ErrDenied))
	}
	if i := t.routeIndex.first(name, a, isAddr); i >= 0 {
		r := t.routes[i]
		port := r.Port
		if port == 0 {
			port = backendPort
		}
		if r.Host == "" || port < 1 || port > 65535 {
			return refuse(ReasonNoRoute, fmt.Errorf("name %q: route %d (%s) has no backend host or port: %w", name, i, r.Match, ErrNoRoute))
		}
		return Decision{Rule: i, Host: r.Host, Port: port, Name: name}, nil
	}
	if len(t.allow) > 0 && t.allowIndex.first(name, a, isAddr) < 0 {
		return refuse(ReasonDenied, fmt.Errorf("name %q: not in allowlist: %w", name, ErrDenied))
	}
	if hostname.IsAddress(name) {
		return refuse(ReasonDenied, fmt.Errorf("name %q: an IP address is not routed through DNS: %w", name, ErrDenied))
	}
	if backendPort < 1 || backendPort > 65535 {
		return refuse(ReasonNoRoute, fmt.Errorf("name %q: no backend port: %w", name, ErrNoRoute))
	}
	return Decision{Rule: -1, Host: name, Port: backendPort, Name: name}, nil
}
