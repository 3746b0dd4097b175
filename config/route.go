package config

import (
	"fmt"
	"net"
	"reflect"
	"regexp"
	"strings"
	"time"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// Route is one explicit routing rule: the names (and optionally the ALPN
// protocols) it applies to, and the backend or the pool of backends that
// serve them.
type Route struct {
	// Match is an exact name, "*.suffix", or "~RE2": a regular expression
	// over the whole name (anchored at both ends; names are lowercased
	// before matching).
	Match string `mapstructure:"match" yaml:"match"`
	// ALPN, when not empty, restricts the route to ClientHellos that offer
	// at least one of these protocols.
	ALPN []string `mapstructure:"alpn" yaml:"alpn,omitempty"`
	// Backend is a single backend: "host:port", or "host" (the port is the
	// listener's backend port). Exactly one of Backend and Backends is set.
	Backend string `mapstructure:"backend" yaml:"backend,omitempty"`
	// Backends is a pool. After validation every Address is canonical
	// host:port (see [hostname.ParseBackend]) and every Weight is ≥ 1.
	Backends []PoolBackend `mapstructure:"backends" yaml:"backends,omitempty"`
	// Balance is the balancing policy of a pool; after validation a pool's
	// is one of BalanceRoundRobin (the default), BalanceLeastConn,
	// BalanceRandomTwo and BalanceSourceHash.
	Balance string `mapstructure:"balance" yaml:"balance,omitempty"`
	// HealthCheck is the active check the master runs; nil means none
	// (dial results alone then move the backends' state).
	HealthCheck *HealthCheck `mapstructure:"health_check" yaml:"health_check,omitempty"`
	// ProxyProtocol, when not nil, overrides backend.proxy_protocol for this
	// route: "" (no header), "v1" or "v2". See [Route.ProxyHeader].
	ProxyProtocol *string `mapstructure:"proxy_protocol" yaml:"proxy_protocol,omitempty"`
	// Timeouts override the global connect and idle timeouts for this
	// route; zero means the global one. See [Route.EffectiveTimeouts].
	Timeouts RouteTimeouts `mapstructure:"timeouts" yaml:"timeouts,omitempty"`
}

// PoolBackend is one backend of a pool. In YAML it is either a string
// "host:port" (weight 1, not a backup) or a map {address, weight, backup}.
type PoolBackend struct {
	// Address is host:port; the port is required, since the master's health
	// check has no listener to take a port from.
	Address string `mapstructure:"address" yaml:"address"`
	// Weight is the backend's share relative to the pool's other backends,
	// 1..MaxWeight; absent means 1.
	Weight int `mapstructure:"weight" yaml:"weight"`
	// Backup backends serve only when no other backend of the pool is up.
	Backup bool `mapstructure:"backup" yaml:"backup"`
}

// MarshalYAML prints a backend with the default weight and no backup flag
// in the short string form, so that the effective config reads like the
// file and parses back to the same value.
func (b PoolBackend) MarshalYAML() (any, error) {
	if b.Weight == 1 && !b.Backup {
		return b.Address, nil
	}
	type plain PoolBackend // no MarshalYAML: no recursion
	return plain(b), nil
}

// HealthCheck is a pool's active health check. After validation every
// field holds its effective value (defaults applied).
type HealthCheck struct {
	// Type is HealthTCP (connect) or HealthTLS (a handshake offering SNI;
	// the certificate is not verified).
	Type string `mapstructure:"type" yaml:"type"`
	// SNI is the name a tls check offers. It defaults to the route's match
	// when that is an exact host name; otherwise a tls check offers none.
	SNI string `mapstructure:"sni" yaml:"sni,omitempty"`
	// Interval is the time between two checks of one backend (the master
	// jitters it).
	Interval time.Duration `mapstructure:"interval" yaml:"interval"`
	// Timeout bounds one check; it is less than Interval.
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
	// Rise is the number of consecutive successes that mark a down
	// backend up; Fall the number of consecutive failures (checks or
	// dials) that mark an up backend down. Both are ≥ 1.
	Rise int `mapstructure:"rise" yaml:"rise"`
	Fall int `mapstructure:"fall" yaml:"fall"`
}

// RouteTimeouts are a route's overrides of the global timeouts; zero means
// the global value.
type RouteTimeouts struct {
	Connect time.Duration `mapstructure:"connect" yaml:"connect,omitempty"`
	Idle    time.Duration `mapstructure:"idle" yaml:"idle,omitempty"`
}

// Balancing policies, the values of a route's balance key.
const (
	BalanceRoundRobin = "round_robin"
	BalanceLeastConn  = "least_conn"
	BalanceRandomTwo  = "random_two"
	BalanceSourceHash = "source_hash"
)

// Health check types, the values of health_check.type.
const (
	HealthTCP = "tcp"
	HealthTLS = "tls"
)

// Health check defaults (SPEC), also the rise and fall of a pool without an
// active check, whose state only dials move.
const (
	DefaultHealthInterval = 5 * time.Second
	DefaultHealthTimeout  = 2 * time.Second
	DefaultHealthRise     = 2
	DefaultHealthFall     = 3
)

// MaxWeight is the largest weight of a pool backend: ample for any
// proportion, and small enough that no balancer arithmetic overflows.
const MaxWeight = 1_000_000

// RegexpPrefix starts a route match that is a regular expression.
const RegexpPrefix = "~"

// maxALPNLen is the longest protocol name ALPN can carry (RFC 7301: one
// length byte).
const maxALPNLen = 255

// CompileMatch compiles a route match "~RE" into a regular expression over
// the whole name: RE is RE2 syntax, wrapped as ^(?:RE)$. It returns nil and
// no error when match is not a regular expression (an exact or suffix
// pattern, for [hostname.ParsePattern]).
func CompileMatch(match string) (*regexp.Regexp, error) {
	re, ok := strings.CutPrefix(match, RegexpPrefix)
	if !ok {
		return nil, nil
	}
	if re == "" {
		return nil, fmt.Errorf("regular expression %q: empty", match)
	}
	r, err := regexp.Compile("^(?:" + re + ")$")
	if err != nil {
		return nil, fmt.Errorf("regular expression %q: %w", match, err)
	}
	return r, nil
}

// Pool returns the route's backends: Backends, or Backend as a pool of one
// (weight 1, no backup).
func (r Route) Pool() []PoolBackend {
	if len(r.Backends) > 0 {
		return r.Backends
	}
	return []PoolBackend{{Address: r.Backend, Weight: 1}}
}

// Thresholds returns the rise and fall of the route's backends: those of
// its health check, or the defaults when it has none.
func (r Route) Thresholds() (rise, fall int) {
	if r.HealthCheck == nil {
		return DefaultHealthRise, DefaultHealthFall
	}
	return r.HealthCheck.Rise, r.HealthCheck.Fall
}

// ProxyHeader returns the PROXY protocol version to send to this route's
// backends, given the global backend.proxy_protocol.
func (r Route) ProxyHeader(global string) string {
	if r.ProxyProtocol != nil {
		return *r.ProxyProtocol
	}
	return global
}

// EffectiveTimeouts returns the connect and idle timeouts of this route,
// given the global ones.
func (r Route) EffectiveTimeouts(global Timeouts) (connect, idle time.Duration) {
	connect, idle = global.Connect, global.Idle
	if r.Timeouts.Connect > 0 {
		connect = r.Timeouts.Connect
	}
	if r.Timeouts.Idle > 0 {
		idle = r.Timeouts.Idle
	}
	return connect, idle
}

var (
	poolBackendType = reflect.TypeOf(PoolBackend{})
	healthCheckType = reflect.TypeOf(HealthCheck{})
)

// poolHook decodes a pool backend from either form: a string is the
// address, a map may leave out weight (1) and backup (false). It also fills
// the defaults of a health check's absent keys, so that an explicit
// "rise: 0" is an error rather than a default.
func poolHook(from, to reflect.Type, data any) (any, error) {
	switch to {
	case poolBackendType:
		switch d := data.(type) {
		case string:
			return PoolBackend{Address: d, Weight: 1}, nil
		case map[string]any:
			return withDefaults(d, map[string]any{"weight": 1}), nil
		}
	case healthCheckType:
		if d, ok := data.(map[string]any); ok {
			return withDefaults(d, map[string]any{
				"type":     HealthTCP,
				"interval": DefaultHealthInterval.String(),
				"timeout":  DefaultHealthTimeout.String(),
				"rise":     DefaultHealthRise,
				"fall":     DefaultHealthFall,
			}), nil
		}
	}
	return data, nil
}

// withDefaults returns a copy of m with the keys of defaults that m lacks
// (compared without case, as mapstructure matches them) added.
func withDefaults(m, defaults map[string]any) map[string]any {
	out := make(map[string]any, len(m)+len(defaults))
	have := map[string]bool{}
	for k, v := range m {
		out[k] = v
		have[strings.ToLower(k)] = true
	}
	for k, v := range defaults {
		if !have[k] {
			out[k] = v
		}
	}
	return out
}

// validateRoutes checks and normalises c.Routes, reporting each problem
// through bad with its key.
func (c *Config) validateRoutes(bad func(key, format string, args ...any)) {
	for i := range c.Routes {
		r := &c.Routes[i]
		key := fmt.Sprintf("routes[%d]", i)
		exact := ""
		if strings.HasPrefix(r.Match, RegexpPrefix) {
			if _, err := CompileMatch(r.Match); err != nil {
				bad(key+".match", "%v", err)
			}
		} else if p, err := hostname.ParsePattern(r.Match); err != nil {
			bad(key+".match", "%v", err)
		} else if s := p.String(); !strings.HasPrefix(s, "*.") && !hostname.IsAddress(s) {
			exact = s
		}
		for j, a := range r.ALPN {
			if a == "" || len(a) > maxALPNLen {
				bad(fmt.Sprintf("%s.alpn[%d]", key, j), "%q: a protocol name is 1 to %d bytes", a, maxALPNLen)
			} else if strings.Contains(a, ",") {
				// The worker sees the offered protocols joined by ",".
				bad(fmt.Sprintf("%s.alpn[%d]", key, j), "%q: a protocol name with a comma cannot be matched", a)
			}
		}
		switch {
		case r.Backend != "" && len(r.Backends) > 0:
			bad(key, "both backend and backends: give one")
		case r.Backend == "" && len(r.Backends) == 0:
			bad(key+".backend", "missing: give backend or backends")
		case r.Backend != "":
			if _, _, err := hostname.ParseBackend(r.Backend); err != nil {
				bad(key+".backend", "%v", err)
			}
		default:
			validatePool(r, key, bad)
		}
		switch r.Balance {
		case "":
			if len(r.Backends) > 0 {
				r.Balance = BalanceRoundRobin
			}
		case BalanceRoundRobin, BalanceLeastConn, BalanceRandomTwo, BalanceSourceHash:
		default:
			bad(key+".balance", "%q: want %s, %s, %s or %s", r.Balance,
				BalanceRoundRobin, BalanceLeastConn, BalanceRandomTwo, BalanceSourceHash)
		}
		if hc := r.HealthCheck; hc != nil {
			validateHealthCheck(hc, *r, exact, key+".health_check", bad)
		}
		if r.ProxyProtocol != nil {
			switch *r.ProxyProtocol {
			case "", "v1", "v2":
			default:
				bad(key+".proxy_protocol", "%q: want \"\", \"v1\" or \"v2\"", *r.ProxyProtocol)
			}
		}
		if r.Timeouts.Connect < 0 {
			bad(key+".timeouts.connect", "negative (got %v; 0 means the global timeout)", r.Timeouts.Connect)
		}
		if r.Timeouts.Idle < 0 {
			bad(key+".timeouts.idle", "negative (got %v; 0 means the global timeout)", r.Timeouts.Idle)
		}
	}
}

// validatePool checks a route's backends and writes their addresses in
// canonical form.
func validatePool(r *Route, key string, bad func(key, format string, args ...any)) {
	seen := map[string]int{}
	primary := false
	for j := range r.Backends {
		b := &r.Backends[j]
		bkey := fmt.Sprintf("%s.backends[%d]", key, j)
		if a, err := canonicalHostPort(b.Address); err != nil {
			bad(bkey+".address", "%v", err)
		} else {
			b.Address = a
			if k, dup := seen[a]; dup {
				bad(bkey+".address", "%s is also backends[%d]: give it a weight instead", a, k)
			}
			seen[a] = j
		}
		if b.Weight <= 0 || b.Weight > MaxWeight {
			bad(bkey+".weight", "must be positive and at most %d (got %d)", MaxWeight, b.Weight)
		}
		if !b.Backup {
			primary = true
		}
	}
	if !primary {
		bad(key+".backends", "every backend is a backup: at least one must not be")
	}
}

// validateHealthCheck checks hc and fills in the tls check's default name,
// the route's exact match (exact is "" when the match is not an exact host
// name).
func validateHealthCheck(hc *HealthCheck, r Route, exact, key string, bad func(key, format string, args ...any)) {
	switch hc.Type {
	case HealthTCP:
		if hc.SNI != "" {
			bad(key+".sni", "%q: only a tls check offers a name", hc.SNI)
		}
	case HealthTLS:
		if hc.SNI == "" {
			hc.SNI = exact
		} else {
			n := strings.ToLower(strings.TrimSuffix(hc.SNI, "."))
			if why := hostname.Problem(n); why != "" {
				bad(key+".sni", "%q: %s", hc.SNI, why)
			} else if hostname.IsAddress(n) {
				bad(key+".sni", "%q: SNI carries a host name, not an address", hc.SNI)
			} else {
				hc.SNI = n
			}
		}
	default:
		bad(key+".type", "%q: want %s or %s", hc.Type, HealthTCP, HealthTLS)
	}
	if hc.Interval <= 0 {
		bad(key+".interval", "must be positive (got %v)", hc.Interval)
	}
	if hc.Timeout <= 0 {
		bad(key+".timeout", "must be positive (got %v)", hc.Timeout)
	} else if hc.Interval > 0 && hc.Timeout >= hc.Interval {
		bad(key+".timeout", "%v is not less than the interval %v", hc.Timeout, hc.Interval)
	}
	if hc.Rise < 1 {
		bad(key+".rise", "must be at least 1 (got %d)", hc.Rise)
	}
	if hc.Fall < 1 {
		bad(key+".fall", "must be at least 1 (got %d)", hc.Fall)
	}
	if r.Backend != "" {
		if _, port, err := hostname.ParseBackend(r.Backend); err == nil && port == 0 {
			bad(key, "backend %q has no port to check: write host:port", r.Backend)
		}
	}
}

// canonicalHostPort validates a backend that must carry a port (a pool
// member, a default backend) and returns it as canonical host:port.
func canonicalHostPort(s string) (string, error) {
	host, port, err := hostname.ParseBackend(s)
	if err != nil {
		return "", err
	}
	if port == 0 {
		return "", fmt.Errorf("backend %q: no port: write host:port", s)
	}
	return net.JoinHostPort(host, fmt.Sprint(port)), nil
}

// DefaultBackendFor returns the default backend of connections accepted on
// l: the listener's own, else the global one; "" means none.
func (c *Config) DefaultBackendFor(l Listener) string {
	if l.DefaultBackend != "" {
		return l.DefaultBackend
	}
	return c.DefaultBackend
}

// HasPool reports whether the route's backends form a pool: balanced, their
// health shared by every worker, their connections counted per backend. A
// route has one when it lists backends or has a health check; a single
// backend without a check is dialled as it stands.
func (r Route) HasPool() bool { return len(r.Backends) > 0 || r.HealthCheck != nil }

// PoolAddresses returns the addresses of the route's pool backends in
// canonical host:port form ("" for a single backend without a port, which
// has no pool), in the order of Pool.
func (r Route) PoolAddresses() []string {
	pool := r.Pool()
	out := make([]string, len(pool))
	for i, b := range pool {
		if a, err := canonicalHostPort(b.Address); err == nil {
			out[i] = a
		}
	}
	return out
}

// HealthKey names a backend of this route, at address (canonical
// host:port), in the health table the master shares with the workers: the
// address and how it is checked, "10.0.0.6:443 tcp", "10.0.0.7:443 tls
// app.example.com", or "10.0.0.8:443 dial" for a pool without an active
// check (dial results alone, and the master's tcp check of a backend they
// took down). Routes that check a backend the same way share its state.
// The form is stable across versions: a successor keeps the state of every
// key its predecessor had.
func (r Route) HealthKey(address string) string {
	switch hc := r.HealthCheck; {
	case hc == nil:
		return address + " dial"
	case hc.Type == HealthTLS && hc.SNI != "":
		return address + " tls " + hc.SNI
	default:
		return address + " " + hc.Type
	}
}
