package config

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// checkSelfRoutes reports every route, pool backend and default backend
// that points at one of the proxy's own listeners: a connection routed there
// comes back to the proxy, which routes it there again, until
// max_connections is spent. Only what can be known without DNS is checked
// here (IP addresses and localhost); the worker's dialer refuses the rest at
// run time. It runs after the listeners are normalised (BackendPort set).
func (c *Config) checkSelfRoutes(bad func(key, format string, args ...any)) {
	var local []netip.Addr // this host's addresses, read once if needed
	localRead := false
	isLocal := func(a netip.Addr) bool {
		if a.IsLoopback() || a.IsUnspecified() {
			return true
		}
		if !localRead {
			localRead = true
			if as, err := net.InterfaceAddrs(); err == nil {
				for _, x := range as {
					if p, err := netip.ParsePrefix(x.String()); err == nil {
						local = append(local, p.Addr().Unmap())
					}
				}
			}
		}
		for _, l := range local {
			if l == a {
				return true
			}
		}
		return false
	}
	// self returns the listener that host:port reaches, or "".
	self := func(host string, port int) string {
		a, err := netip.ParseAddr(host)
		isLocalhost := host == "localhost" || strings.HasSuffix(host, ".localhost")
		if err != nil && !isLocalhost {
			return "" // a DNS name: checked when dialled
		}
		a = a.Unmap().WithZone("")
		for _, l := range c.Listeners {
			h, p, err := net.SplitHostPort(l.Address)
			if err != nil {
				continue
			}
			if lp, err := strconv.Atoi(p); err != nil || lp != port {
				continue
			}
			la, err := netip.ParseAddr(h)
			wildcard := h == "" || (err == nil && la.IsUnspecified())
			switch {
			case wildcard && (isLocalhost || isLocal(a)):
				return l.Address
			case !wildcard && err == nil && isLocalhost && la.IsLoopback():
				return l.Address
			case !wildcard && err == nil && a.IsValid() && la.Unmap() == a:
				return l.Address
			}
		}
		return ""
	}
	check := func(key, backend string, ports []int) {
		host, port, err := hostname.ParseBackend(backend)
		if err != nil {
			return // reported by the syntax checks
		}
		if port != 0 {
			ports = []int{port}
		}
		for _, p := range ports {
			if l := self(host, p); l != "" {
				bad(key, "%s reaches the proxy's own listener %s: connections would loop back to it", net.JoinHostPort(host, strconv.Itoa(p)), l)
				return
			}
		}
	}
	var backendPorts []int
	for _, l := range c.Listeners {
		backendPorts = append(backendPorts, l.BackendPort)
	}
	for i, r := range c.Routes {
		key := fmt.Sprintf("routes[%d]", i)
		if r.Backend != "" {
			check(key+".backend", r.Backend, backendPorts)
		}
		for j, b := range r.Backends {
			check(fmt.Sprintf("%s.backends[%d]", key, j), b.Address, nil)
		}
	}
	if c.DefaultBackend != "" {
		check("default_backend", c.DefaultBackend, nil)
	}
	for i, l := range c.Listeners {
		if l.DefaultBackend != "" {
			check(fmt.Sprintf("listeners[%d].default_backend", i), l.DefaultBackend, nil)
		}
	}
}
