package route

import (
	"fmt"
	"strings"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// linearDecide is Table.Decide as it was before the index: every deny
// pattern, route and allow pattern tried in turn. It is the oracle the
// indexed Decide is compared with, and the "before" of BenchmarkDecide.
func linearDecide(deny []hostname.Pattern, routes []Rule, allow []hostname.Pattern, name string, backendPort int) (Decision, error) {
	return linearDecideALPN(deny, routes, allow, name, "", backendPort)
}

// linearDecideALPN is linearDecide for a client offering alpn.
func linearDecideALPN(deny []hostname.Pattern, routes []Rule, allow []hostname.Pattern, name, alpn string, backendPort int) (Decision, error) {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	refuse := func(r Reason, err error) (Decision, error) {
		return Decision{Rule: -1, Name: name, Reason: r, Fallback: r == ReasonNoRoute}, err
	}
	if name == "" {
		return refuse(ReasonNoRoute, fmt.Errorf("no name: %w", ErrNoRoute))
	}
	if _, ok := hostname.ParseIPLiteral(name); !ok {
		if why := hostname.Problem(name); why != "" {
			return refuse(ReasonNoRoute, fmt.Errorf("name %q: %s: %w", name, why, ErrNoRoute))
		}
	}
	for _, p := range deny {
		if p.Match(name) {
			return refuse(ReasonDenied, fmt.Errorf("name %q: in denylist (%s): %w", name, p, ErrDenied))
		}
	}
	for i, r := range routes {
		if r.Regexp != nil {
			if !r.Regexp.MatchString(name) {
				continue
			}
		} else if !r.Match.Match(name) {
			continue
		}
		if len(r.ALPN) > 0 && !r.offers(alpn) {
			continue
		}
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
	if len(allow) > 0 {
		allowed := false
		for _, p := range allow {
			if p.Match(name) {
				allowed = true
				break
			}
		}
		if !allowed {
			d, err := refuse(ReasonDenied, fmt.Errorf("name %q: not in allowlist: %w", name, ErrDenied))
			d.Fallback = true
			return d, err
		}
	}
	if hostname.IsAddress(name) {
		d, err := refuse(ReasonDenied, fmt.Errorf("name %q: an IP address is not routed through DNS: %w", name, ErrDenied))
		d.Fallback = true
		return d, err
	}
	if backendPort < 1 || backendPort > 65535 {
		return refuse(ReasonNoRoute, fmt.Errorf("name %q: no backend port: %w", name, ErrNoRoute))
	}
	return Decision{Rule: -1, Host: name, Port: backendPort, Name: name}, nil
}
