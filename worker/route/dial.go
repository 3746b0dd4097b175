package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// minAttempt is the least time one address gets when the dial phase is split
// between several, as in net.Dialer: enough for one SYN retransmission, so a
// single lost packet does not write an address off.
const minAttempt = 2 * time.Second

// maxAddrs caps how many addresses of one host are tried. A name's owner
// controls its DNS answer; without a cap one client connection could make
// the proxy send SYNs to thousands of addresses of somebody else's.
const maxAddrs = 16

// localAddrsTTL is how long the host's interface addresses are cached for
// the Forbidden check of an unspecified listen address.
const localAddrsTTL = 10 * time.Second

// Resolver looks up the IP addresses of a host name. *net.Resolver
// implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Dialer dials a Decision's backend. Set its fields before the first Dial and
// do not change them afterwards; Dial is then safe for concurrent use. A
// Dialer must not be copied after first use (it caches the host's
// addresses).
type Dialer struct {
	// Timeout bounds the whole dial phase (timeouts.connect): resolution and
	// every address tried, together. Addresses are tried in the order
	// Family gives, at most 16 of them; each gets an equal share of the time left,
	// but at least 2s (or all that is left). Zero means no limit beyond ctx.
	Timeout time.Duration

	// AllowPrivate (backend.allow_private) lets DNS-routed names reach
	// loopback, private, link-local and the other blocked ranges listed in
	// the package documentation.
	AllowPrivate bool

	// Forbidden lists the proxy's own listen addresses. A DNS-routed name is
	// never dialled at one of them, whatever AllowPrivate says, so a name
	// pointing back at the proxy cannot make it loop. An unspecified address
	// (0.0.0.0:443 or [::]:443, either family) forbids every address of this
	// host at that port: loopback, unspecified and every interface address.
	// Port 0 forbids every port of the address.
	Forbidden []netip.AddrPort

	// Resolver resolves the host names of explicit routes; nil means
	// net.DefaultResolver, the system's: /etc/hosts and resolv.conf's search
	// list apply, as they do for any name an operator writes in a config
	// (a Kubernetes service name "backend" stays usable).
	Resolver Resolver

	// DNS resolves DNS-routed names, the names clients ask for. It is given
	// the name rooted ("secret.") and must take it as absolute. nil means a
	// *DNSResolver with its defaults (no search list, no /etc/hosts, a
	// cache honouring TTLs), made at the first DNS-routed dial.
	DNS Resolver

	// Family is backend.dns_family: the address families of a host name
	// (DNS-routed or of an explicit route) that are dialled, and their
	// order. "" means FamilyAny. IP-address backends are dialled whatever
	// it says.
	Family Family

	// KeepAlive is the TCP keep-alive period of the backend connection, as
	// net.Dialer.KeepAlive: zero means Go's default (15s), negative turns
	// keep-alives off.
	KeepAlive time.Duration

	// InterfaceAddrs lists this host's addresses for an unspecified
	// Forbidden entry; nil means those of net.InterfaceAddrs. The list is
	// cached for 10s; when it cannot be had and nothing is cached, dials to
	// the forbidden port are refused (fail closed).
	InterfaceAddrs func() ([]netip.Addr, error)

	local localAddrs

	dnsOnce sync.Once
	dns     Resolver
}

type localAddrs struct {
	mu      sync.Mutex
	addrs   []netip.Addr // unmapped, without zones; non-nil once fetched
	fetched time.Time
}

// Dial connects to dec's backend and returns the connection, with TCP
// keep-alive set per KeepAlive, and the address it reached.
//
// An explicit route (dec.Rule >= 0) or a default backend (RuleDefault) may
// reach any address; a host name is resolved by Resolver and each address
// tried in turn. A DNS-routed name (dec.Rule == RuleDNS) is resolved by DNS, as an absolute name, and each address
// that passes the address policy is tried in turn; the policy is enforced in
// the socket's Control hook, on the address actually being connected,
// before any packet is sent.
//
// Errors: a DNS-routed name with no address, or whose look-up fails or times
// out, is [ErrNoRoute] (an explicit route's host is [ErrDial]); when every
// address was refused by the policy, [ErrPrivate]; when any permitted address
// was tried and all failed (refused, unreachable, timed out, ctx done),
// [ErrDial]. The cause is wrapped too (context.DeadlineExceeded, the
// *net.OpError, the *net.DNSError).
func (d *Dialer) Dial(ctx context.Context, dec Decision) (*net.TCPConn, netip.AddrPort, error) {
	dnsRouted := dec.Rule == RuleDNS
	if dec.Host == "" {
		return nil, netip.AddrPort{}, fmt.Errorf("dial: no host: %w", ErrNoRoute)
	}
	if dec.Port < 1 || dec.Port > 65535 {
		return nil, netip.AddrPort{}, fmt.Errorf("dial %q: port %d out of range: %w", dec.Host, dec.Port, ErrNoRoute)
	}
	if dnsRouted && hostname.IsAddress(dec.Host) {
		// Decide refuses these already; repeat it for hand-made Decisions.
		return nil, netip.AddrPort{}, fmt.Errorf("dial %q: an IP address is not routed through DNS: %w", dec.Host, ErrDenied)
	}
	if d.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.Timeout)
		defer cancel()
	}
	addrs, err := d.resolve(ctx, dec.Host, dnsRouted)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}

	port := uint16(dec.Port)
	var (
		candidates  = make([]netip.AddrPort, 0, len(addrs))
		firstRefuse error
		firstFail   error
		refused     int
		failed      int
	)
	for _, a := range addrs {
		ap := netip.AddrPortFrom(a, port)
		if dnsRouted {
			// Pre-filter to save a socket; control is the authoritative check.
			if err := d.check(ap); err != nil {
				refused++
				if firstRefuse == nil {
					firstRefuse = err
				}
				continue
			}
		}
		candidates = append(candidates, ap)
	}
	for i, ap := range candidates {
		if err := phaseOver(ctx); err != nil {
			if firstFail == nil {
				firstFail = fmt.Errorf("%w: dial tcp %s: %w", ErrDial, ap, err)
			}
			failed += len(candidates) - i
			break
		}
		c, err := d.dialOne(ctx, ap, dnsRouted, len(candidates)-i)
		if err == nil {
			return c, ap, nil
		}
		if errors.Is(err, ErrPrivate) {
			refused++
			if firstRefuse == nil {
				firstRefuse = err
			}
			continue
		}
		failed++
		if firstFail == nil {
			firstFail = fmt.Errorf("%w: %w", ErrDial, err)
		}
	}
	if failed == 0 {
		return nil, netip.AddrPort{}, fmt.Errorf("dial %q: %s refused: %w", dec.Host, count(refused), firstRefuse)
	}
	what := count(failed) + " failed"
	if refused > 0 {
		what += fmt.Sprintf(", %d refused", refused)
	}
	if err := phaseOver(ctx); err != nil {
		// The dial phase ran out (or ctx was cancelled): say so in a form
		// errors.Is sees, whatever the net package turned it into.
		return nil, netip.AddrPort{}, fmt.Errorf("dial %q: %s, first: %w (%w)", dec.Host, what, firstFail, err)
	}
	return nil, netip.AddrPort{}, fmt.Errorf("dial %q: %s, first: %w", dec.Host, what, firstFail)
}

// phaseOver returns why ctx is over, or nil. A deadline counts as soon as it
// has passed: the net package times a dial out by the deadline itself and
// can return before the context's own timer has cancelled it.
func phaseOver(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

func count(n int) string {
	if n == 1 {
		return "1 address"
	}
	return fmt.Sprintf("%d addresses", n)
}

// resolve returns the addresses of host, unmapped and without duplicates,
// filtered and ordered by Family, at most maxAddrs of them. A DNS-routed
// name goes to the DNS resolver, rooted; an explicit route's host to
// Resolver as written.
func (d *Dialer) resolve(ctx context.Context, host string, dnsRouted bool) ([]netip.Addr, error) {
	if a, ok := hostname.ParseIPLiteral(host); ok {
		return []netip.Addr{a.Unmap()}, nil
	}
	sentinel := ErrDial
	if dnsRouted {
		sentinel = ErrNoRoute
	}
	if err := d.Family.check(); err != nil {
		return nil, fmt.Errorf("resolve %q: %w: %w", host, sentinel, err)
	}
	var (
		r    Resolver
		name = host
	)
	if dnsRouted {
		// A client's name is looked up as it stands, rooted, so no search
		// list ever applies: with "search corp.example" and ndots:5, SNI
		// "secret" would otherwise reach secret.corp.example whatever the
		// denylist says about it.
		name = strings.TrimSuffix(host, ".") + "."
		r = d.dnsResolver()
	} else {
		r = d.Resolver
		if r == nil {
			r = net.DefaultResolver
		}
	}
	found, err := r.LookupNetIP(ctx, d.Family.network(), name)
	if err != nil {
		return nil, fmt.Errorf("resolve %q: %w: %w", host, sentinel, err)
	}
	unique := make([]netip.Addr, 0, len(found))
	seen := make(map[netip.Addr]struct{}, len(found))
	for _, a := range found {
		if !a.IsValid() {
			continue
		}
		a = a.Unmap()
		if _, dup := seen[a]; !dup {
			seen[a] = struct{}{}
			unique = append(unique, a)
		}
	}
	addrs := d.Family.order(unique)
	if len(addrs) > maxAddrs {
		addrs = addrs[:maxAddrs]
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("resolve %q: no addresses: %w", host, sentinel)
	}
	return addrs, nil
}

// dnsResolver returns the resolver of DNS-routed names.
func (d *Dialer) dnsResolver() Resolver {
	d.dnsOnce.Do(func() {
		d.dns = d.DNS
		if d.dns == nil {
			d.dns = &DNSResolver{}
		}
	})
	return d.dns
}

// dialOne connects to ap with its share of the time left in ctx, left being
// the number of addresses still to try, this one included.
func (d *Dialer) dialOne(ctx context.Context, ap netip.AddrPort, dnsRouted bool, left int) (*net.TCPConn, error) {
	if dl, ok := ctx.Deadline(); ok && left > 1 {
		share := time.Until(dl) / time.Duration(left)
		if share < minAttempt {
			share = minAttempt
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, share) // never later than dl
		defer cancel()
	}
	nd := net.Dialer{KeepAlive: d.KeepAlive, Control: d.controlSelf}
	if dnsRouted {
		nd.Control = d.control
	}
	c, err := nd.DialContext(ctx, "tcp", ap.String())
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok { // cannot happen for "tcp"
		c.Close()
		return nil, fmt.Errorf("dial tcp %s: got %T", ap, c)
	}
	return tc, nil
}

// control is the net.Dialer.Control hook for DNS-routed names: it sees the
// address the socket is about to connect to, after every look-up, so it is
// the check that counts. It refuses what it cannot parse.
func (d *Dialer) control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("cannot check address %q: %w", address, ErrPrivate)
	}
	return d.check(ap)
}

// check applies the address policy for DNS-routed names to ap.
func (d *Dialer) check(ap netip.AddrPort) error {
	a := ap.Addr().WithZone("").Unmap()
	if !d.AllowPrivate {
		if why := blockedWhy(ap.Addr()); why != "" {
			return fmt.Errorf("%s is %s: %w", ap.Addr(), why, ErrPrivate)
		}
	}
	if a.IsUnspecified() { // connecting to 0.0.0.0 or :: reaches this host
		return fmt.Errorf("%s is unspecified: %w", ap.Addr(), ErrPrivate)
	}
	return d.checkSelf(ap, ErrPrivate)
}

// controlSelf is the net.Dialer.Control hook for explicit routes: they may
// reach private addresses, but never the proxy's own listeners (a loop that
// would spend max_connections on one request). The config check refuses
// such routes when it can tell without DNS; this catches the rest.
func (d *Dialer) controlSelf(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("cannot check address %q: %w", address, ErrDial)
	}
	return d.CheckExplicit(ap)
}

// CheckExplicit applies the address policy of an explicit route (one
// whose backend is written in the config, not a DNS-routed name) to ap,
// the address about to be connected: never this host's unspecified
// address, never the proxy's own listeners ([ErrDial]). It is what Dial
// checks on every such address, for a caller that connects by itself.
func (d *Dialer) CheckExplicit(ap netip.AddrPort) error {
	if ap.Addr().WithZone("").Unmap().IsUnspecified() {
		return fmt.Errorf("%s is unspecified (this host): %w", ap.Addr(), ErrDial)
	}
	return d.checkSelf(ap, ErrDial)
}

// checkSelf refuses ap, wrapping sentinel, when it is one of the proxy's
// own listen addresses (Forbidden; an unspecified one stands for every
// address of this host).
func (d *Dialer) checkSelf(ap netip.AddrPort, sentinel error) error {
	a := ap.Addr().WithZone("").Unmap()
	for _, f := range d.Forbidden {
		if f.Port() != 0 && f.Port() != ap.Port() {
			continue
		}
		fa := f.Addr().WithZone("").Unmap()
		if !fa.IsUnspecified() {
			if fa == a {
				return fmt.Errorf("%s is the proxy's own listen address %s: %w", ap, f, sentinel)
			}
			continue
		}
		local, err := d.isLocal(a)
		if err != nil {
			return fmt.Errorf("cannot tell whether %s is the proxy's own listen address %s: %w: %w", ap, f, sentinel, err)
		}
		if local {
			return fmt.Errorf("%s is this host, and the proxy listens on %s: %w", ap, f, sentinel)
		}
	}
	return nil
}

// isLocal reports whether a (unmapped, no zone) is an address of this host.
func (d *Dialer) isLocal(a netip.Addr) (bool, error) {
	if a.IsLoopback() || a.IsUnspecified() {
		return true, nil
	}
	addrs, err := d.localAddrs()
	if err != nil {
		return false, err
	}
	for _, b := range addrs {
		if a == b {
			return true, nil
		}
	}
	return false, nil
}

// localAddrs returns this host's addresses, cached for localAddrsTTL; a
// stale list is used when refreshing fails.
func (d *Dialer) localAddrs() ([]netip.Addr, error) {
	d.local.mu.Lock()
	defer d.local.mu.Unlock()
	if d.local.addrs != nil && time.Since(d.local.fetched) < localAddrsTTL {
		return d.local.addrs, nil
	}
	list := d.InterfaceAddrs
	if list == nil {
		list = interfaceAddrs
	}
	found, err := list()
	if err != nil {
		if d.local.addrs != nil {
			return d.local.addrs, nil
		}
		return nil, fmt.Errorf("list interface addresses: %w", err)
	}
	addrs := make([]netip.Addr, 0, len(found))
	for _, a := range found {
		addrs = append(addrs, a.WithZone("").Unmap())
	}
	d.local.addrs, d.local.fetched = addrs, time.Now()
	return addrs, nil
}

// interfaceAddrs is the default Dialer.InterfaceAddrs.
func interfaceAddrs() ([]netip.Addr, error) {
	ifas, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	addrs := make([]netip.Addr, 0, len(ifas))
	for _, ifa := range ifas {
		var ip net.IP
		switch v := ifa.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a)
		}
	}
	return addrs, nil
}
