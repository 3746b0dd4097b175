// Package config loads, validates and prints sniproxy's configuration.
//
// The file is YAML read through spf13/viper. Every key may be overridden from
// the environment as SNIPROXY_<KEY>, with dots written as underscores
// (SNIPROXY_TIMEOUTS_CONNECT=3s). Durations accept an integer number of
// seconds or a Go duration string. Unknown keys are errors.
//
// A Config returned by Load or Parse has been validated and normalised: its
// Listeners hold every listen address (the short listen_addrs form merged in)
// with defaults applied, and it is never modified afterwards, so it may be
// shared between goroutines.
package config

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

// DefaultYAML is the embedded default configuration, used when no file is
// found.
//
//go:embed default.yaml
var DefaultYAML []byte

// DefaultPath is the config file looked up when neither -c nor
// $SNIPROXY_CONFIG names one.
const DefaultPath = "/etc/sniproxy/config.yaml"

// EnvConfig names the environment variable that may point at the config file.
const EnvConfig = "SNIPROXY_CONFIG"

// EmbeddedSource is the Source of a Config loaded from DefaultYAML.
const EmbeddedSource = "embedded default"

// Config is the whole sniproxy configuration.
type Config struct {
	// ListenAddrs is the short form of Listeners: addresses with default
	// options. After validation they are also present in Listeners.
	ListenAddrs []string `mapstructure:"listen_addrs" yaml:"listen_addrs,omitempty"`
	// Listeners is every listening address with its options.
	Listeners []Listener `mapstructure:"listeners" yaml:"listeners"`
	// Workers is the number of worker processes; 0 means one per CPU.
	Workers        int      `mapstructure:"workers" yaml:"workers"`
	Timeouts       Timeouts `mapstructure:"timeouts" yaml:"timeouts"`
	Metrics        Metrics  `mapstructure:"metrics" yaml:"metrics"`
	MaxConnections int      `mapstructure:"max_connections" yaml:"max_connections"`
	// Limits are the per-client limits (see [Limits]).
	Limits          Limits        `mapstructure:"limits" yaml:"limits"`
	ShutdownTimeout time.Duration `mapstructure:"shutdown_timeout" yaml:"shutdown_timeout"`
	Allowlist       []string      `mapstructure:"allowlist" yaml:"allowlist"`
	Denylist        []string      `mapstructure:"denylist" yaml:"denylist"`
	Routes          []Route       `mapstructure:"routes" yaml:"routes"`
	Backend         Backend       `mapstructure:"backend" yaml:"backend"`
	Log             Log           `mapstructure:"log" yaml:"log"`
	PIDFile         string        `mapstructure:"pid_file" yaml:"pid_file"`
	// User and Group, when the master runs as root, are who the workers
	// run as (with no capabilities); the master keeps root to bind
	// sockets on a reload. Group "" means the user's primary group. A
	// Group set explicitly also opens the control socket to that group's
	// members (0660; never to the workers' user): see master's
	// controlAccess.
	User          string `mapstructure:"user" yaml:"user"`
	Group         string `mapstructure:"group" yaml:"group"`
	ControlSocket string `mapstructure:"control_socket" yaml:"control_socket"`

	// DefaultBackend (host:port) receives, bytes unchanged, the connections
	// that are no known protocol, carry no name or find no route; "" closes
	// them. A listener's own DefaultBackend overrides it.
	DefaultBackend string `mapstructure:"default_backend" yaml:"default_backend"`

	// Source says where the config came from: a file path or
	// EmbeddedSource.
	Source string `mapstructure:"-" yaml:"-"`
}

// Limits are the per-client limits, global across workers and kept across
// a reload. A client is its address (the one a trusted PROXY header names,
// if any): an IPv4 address as is, an IPv6 address masked to IPv6Prefix
// bits, so that one host's many addresses count as one client.
type Limits struct {
	// PerIPConnections bounds a client's open connections; 0 = off.
	PerIPConnections int `mapstructure:"per_ip_connections" yaml:"per_ip_connections"`
	// PerIPRate bounds a client's new connections per second: a token
	// bucket refilled at this rate holding at most max(1, PerIPRate)
	// tokens (the burst); 0 = off.
	PerIPRate float64 `mapstructure:"per_ip_rate" yaml:"per_ip_rate"`
	// IPv6Prefix is the prefix length (1..128) IPv6 clients are grouped
	// by; default 64.
	IPv6Prefix int `mapstructure:"ipv6_prefix" yaml:"ipv6_prefix"`
}

// On reports whether either per-client limit is on.
func (l Limits) On() bool { return l.PerIPConnections > 0 || l.PerIPRate > 0 }

// Listener is one listening address and its options.
type Listener struct {
	Address string `mapstructure:"address" yaml:"address"`
	// AcceptProxyProtocol expects a PROXY protocol v1 or v2 header first.
	AcceptProxyProtocol bool `mapstructure:"accept_proxy_protocol" yaml:"accept_proxy_protocol"`
	// TrustedProxies are the CIDRs (or single addresses) that may send a
	// PROXY header; required when AcceptProxyProtocol is true. A
	// connection from any other source is refused. After validation each
	// is a masked prefix ("10.0.0.0/8", "192.0.2.1/32").
	TrustedProxies []string `mapstructure:"trusted_proxies" yaml:"trusted_proxies,omitempty"`
	// trusted is TrustedProxies parsed, IPv4-mapped IPv6 prefixes as IPv4.
	trusted []netip.Prefix
	// BackendPort is dialled for DNS-routed names; 0 means the listener's
	// own port. After validation it is never 0.
	BackendPort int `mapstructure:"backend_port" yaml:"backend_port"`
	// Reuseport gives each worker its own SO_REUSEPORT socket; false means
	// one socket shared by all workers. Absent means true.
	Reuseport *bool `mapstructure:"reuseport" yaml:"reuseport"`
	// DefaultBackend overrides the global default_backend for this
	// listener; "" means the global one. See [Config.DefaultBackendFor].
	DefaultBackend string `mapstructure:"default_backend" yaml:"default_backend,omitempty"`
}

// ReusePort reports whether the listener uses per-worker SO_REUSEPORT
// sockets.
func (l Listener) ReusePort() bool { return l.Reuseport == nil || *l.Reuseport }

// Trusts reports whether a is in the listener's trusted_proxies. An
// IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 peer)
// is matched as the IPv4 address it maps.
func (l Listener) Trusts(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range l.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// parseTrusted parses one trusted_proxies entry: a CIDR or a single
// address, IPv4-mapped IPv6 ones as IPv4, host bits cleared.
func parseTrusted(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil {
			return netip.Prefix{}, fmt.Errorf("%q: want a CIDR (10.0.0.0/8) or an IP address", s)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q: an address with a zone", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// Timeouts are the connection phase limits.
type Timeouts struct {
	// Connect bounds dialling the backend, all addresses together.
	Connect time.Duration `mapstructure:"connect" yaml:"connect"`
	// ClientHello bounds the whole sniff phase, from accept to the routing
	// decision.
	ClientHello time.Duration `mapstructure:"client_hello" yaml:"client_hello"`
	// Idle closes a proxied pair after this long with no byte either way.
	Idle time.Duration `mapstructure:"idle" yaml:"idle"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Enabled bool   `mapstructure:"enabled" yaml:"enabled"`
	Address string `mapstructure:"address" yaml:"address"`
}

// Backend holds options for connections to backends.
type Backend struct {
	// ProxyProtocol is "", "v1" or "v2".
	ProxyProtocol string `mapstructure:"proxy_protocol" yaml:"proxy_protocol"`
	// AllowPrivate lets DNS-routed names reach private addresses.
	AllowPrivate bool `mapstructure:"allow_private" yaml:"allow_private"`
	// DNSFamily is which address families of a backend's host name are
	// dialled, in which order: any (both, alternating), ipv4, ipv6,
	// prefer_ipv4 or prefer_ipv6. After validation it is never "".
	DNSFamily string `mapstructure:"dns_family" yaml:"dns_family"`
}

// dnsFamilies are the values of backend.dns_family.
var dnsFamilies = []string{"any", "ipv4", "ipv6", "prefer_ipv4", "prefer_ipv6"}

// Log configures logging.
type Log struct {
	Level  string `mapstructure:"level" yaml:"level"`
	Format string `mapstructure:"format" yaml:"format"`
	// File is the path the lines are appended to (created 0640), reopened
	// on SIGUSR1; "" is stderr.
	File string `mapstructure:"file" yaml:"file"`
	// Access writes one line per connection, whatever Level says.
	Access bool `mapstructure:"access" yaml:"access"`
	// AccessFile is where the access lines go; "" is where the others go.
	AccessFile string `mapstructure:"access_file" yaml:"access_file"`
}

// Error is a validation error naming the offending key.
type Error struct {
	Key    string
	Reason string
}

func (e *Error) Error() string { return e.Key + ": " + e.Reason }

// Resolve returns the config file to read: path if not empty, else
// $SNIPROXY_CONFIG, else DefaultPath if it exists, else "" (the embedded
// default). getenv and stat are seams for tests; nil means the os ones.
func Resolve(path string, getenv func(string) string, stat func(string) (fs.FileInfo, error)) string {
	if path != "" {
		return path
	}
	if getenv == nil {
		getenv = os.Getenv
	}
	if stat == nil {
		stat = os.Stat
	}
	if p := getenv(EnvConfig); p != "" {
		return p
	}
	if _, err := stat(DefaultPath); err == nil {
		return DefaultPath
	}
	return ""
}

// Load reads the config file at path (the embedded default when path is
// empty), applies SNIPROXY_* environment overrides from environ (nil means
// os.Environ()), and validates it.
func Load(path string, environ []string) (*Config, error) {
	var data []byte
	source := EmbeddedSource
	if path == "" {
		data = DefaultYAML
	} else {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
		data, source = b, path
	}
	if environ == nil {
		environ = os.Environ()
	}
	c, err := Parse(data, environ)
	if err != nil {
		return nil, fmt.Errorf("config %s:\n%w", source, err)
	}
	c.Source = source
	return c, nil
}

// Parse decodes YAML data with the SNIPROXY_* variables of environ applied
// and validates the result.
func Parse(data []byte, environ []string) (*Config, error) {
	v := viper.NewWithOptions(viper.ExperimentalBindStruct())
	v.SetConfigType("yaml")
	v.SetEnvPrefix("SNIPROXY")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	// Viper reads the process environment; a test passes its own, so the
	// overrides are bound explicitly from environ rather than AutomaticEnv.
	env := map[string]string{}
	for _, kv := range environ {
		k, val, ok := strings.Cut(kv, "=")
		if ok && strings.HasPrefix(k, "SNIPROXY_") && k != EnvConfig {
			env[k] = val
		}
	}
	// The YAML is parsed once: unknownKeys reads the keys as written, then
	// viper takes the same map (MergeConfigMap into an empty viper is what
	// ReadConfig does after its own parse; it lowercases the keys in place).
	// Parsing twice cost a third of the time of a config with 100,000
	// routes.
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("parse yaml: %w", err)
	}
	// Every problem is reported, each once: unknown keys, values that do
	// not decode, then the checks of validate on what did decode (minus
	// those of keys that did not).
	errs := unknownKeys(raw, reflect.TypeOf(Config{}), "")
	if err := v.MergeConfigMap(raw); err != nil {
		return nil, fmt.Errorf("parse yaml: %w", err)
	}
	for k, val := range defaults {
		v.SetDefault(k, val)
	}
	known := structKeys(reflect.TypeOf(Config{}), "")
	for k, val := range env {
		key, ok := known[k]
		if !ok {
			errs = append(errs, &Error{Key: k, Reason: "unknown environment override"})
			continue
		}
		v.Set(key, val)
	}
	var c Config
	err := v.UnmarshalExact(&c, func(dc *mapstructure.DecoderConfig) {
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(durationHook, sliceHook, poolHook)
	})
	decodeErrs, failed := decodeErrors(err, len(errs) > 0)
	errs = append(errs, decodeErrs...)
	if err := c.validate(); err != nil {
		for _, e := range unjoin(err) {
			var ce *Error
			if errors.As(e, &ce) && failedKey(failed, ce.Key) {
				continue // a consequence of the decode error reported above
			}
			errs = append(errs, e)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &c, nil
}

// decodeErrors turns mapstructure's error into one Error per key that
// did not decode, and returns those keys. Its "has invalid keys" errors
// are left out when unknownKeys already reported them (knownUnknown).
func decodeErrors(err error, knownUnknown bool) ([]error, []string) {
	if err == nil {
		return nil, nil
	}
	var out []error
	var keys []string
	var walk func(error)
	walk = func(e error) {
		if de, ok := e.(*mapstructure.DecodeError); ok && de.Unwrap() != nil {
			if _, nested := de.Unwrap().(interface{ Unwrap() []error }); !nested {
				reason := de.Unwrap().Error()
				if strings.HasPrefix(reason, "has invalid keys") {
					if !knownUnknown {
						out = append(out, &Error{Key: de.Name(), Reason: reason})
					}
					return
				}
				keys = append(keys, de.Name())
				out = append(out, &Error{Key: de.Name(), Reason: reason})
				return
			}
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				walk(x)
			}
			return
		}
		if u := errors.Unwrap(e); u != nil {
			walk(u)
			return
		}
		out = append(out, fmt.Errorf("decode: %w", e))
	}
	walk(err)
	return out, keys
}

// unjoin returns the errors joined in err (errors.Join), or err alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// failedKey reports whether key is one of failed or inside one of them.
func failedKey(failed []string, key string) bool {
	for _, f := range failed {
		if key == f || strings.HasPrefix(key, f+".") || strings.HasPrefix(key, f+"[") {
			return true
		}
	}
	return false
}

// defaults are the values of keys a file leaves out (SPEC's documented
// defaults). Listeners have none: a file must name at least one.
var defaults = map[string]any{
	"workers":               0,
	"timeouts.connect":      "10s",
	"timeouts.client_hello": "5s",
	"timeouts.idle":         "300s",
	"metrics.enabled":       true,
	"metrics.address":       "127.0.0.1:9000",
	"max_connections":       10000,
	"limits.ipv6_prefix":    64,
	"shutdown_timeout":      "30s",
	"backend.dns_family":    "any",
	"log.level":             "info",
	"log.format":            "auto",
	"log.access":            true,
}

// unknownKeys returns an error for every key of m (and of nested maps and
// lists of maps) that t has no field for.
func unknownKeys(m map[string]any, t reflect.Type, prefix string) []error {
	fields := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		if tag := f.Tag.Get("mapstructure"); tag != "" && tag != "-" {
			fields[tag] = f.Type
		}
	}
	var errs []error
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		ft, ok := fields[strings.ToLower(k)]
		if !ok {
			errs = append(errs, &Error{Key: prefix + k, Reason: "unknown key"})
			continue
		}
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		switch val := m[k].(type) {
		case map[string]any:
			if ft.Kind() == reflect.Struct && ft != durationType {
				errs = append(errs, unknownKeys(val, ft, prefix+k+".")...)
			}
		case []any:
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
				for i, e := range val {
					if em, ok := e.(map[string]any); ok {
						errs = append(errs, unknownKeys(em, ft.Elem(), fmt.Sprintf("%s%s[%d].", prefix, k, i))...)
					}
				}
			}
		}
	}
	return errs
}

// structKeys maps each SNIPROXY_* variable name to the viper key it sets, for
// every scalar or list key of t (lists of structs cannot be set this way).
func structKeys(t reflect.Type, prefix string) map[string]string {
	out := map[string]string{}
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		ft := f.Type
		if ft.Kind() == reflect.Struct && ft != reflect.TypeOf(time.Duration(0)) {
			for k, v := range structKeys(ft, key+".") {
				out[k] = v
			}
			continue
		}
		if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
			continue
		}
		out["SNIPROXY_"+strings.ToUpper(strings.ReplaceAll(key, ".", "_"))] = key
	}
	return out
}

var durationType = reflect.TypeOf(time.Duration(0))

// durationHook decodes an integer as seconds and a string as either an
// integer number of seconds or a Go duration. Without it viper/cast turn
// the integer 10 into 10ns.
func durationHook(from, to reflect.Type, data any) (any, error) {
	if to != durationType {
		return data, nil
	}
	switch d := data.(type) {
	case int:
		return time.Duration(d) * time.Second, nil
	case int64:
		return time.Duration(d) * time.Second, nil
	case uint64:
		return time.Duration(d) * time.Second, nil
	case float64:
		return time.Duration(d * float64(time.Second)), nil
	case string:
		s := strings.TrimSpace(d)
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return time.Duration(n) * time.Second, nil
		}
		dur, err := time.ParseDuration(s)
		if err != nil {
			return nil, fmt.Errorf("%q is neither whole seconds nor a duration like 10s", d)
		}
		return dur, nil
	case time.Duration:
		return d, nil
	}
	return nil, fmt.Errorf("%v (%T) is not a duration", data, data)
}

// sliceHook splits a string (from the environment) on commas and spaces
// into a list.
func sliceHook(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to.Kind() != reflect.Slice {
		return data, nil
	}
	return strings.FieldsFunc(data.(string), func(r rune) bool { return r == ',' || r == ' ' }), nil
}

// validate checks every key, normalises Listeners and returns every problem
// found, each naming its key.
func (c *Config) validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, &Error{Key: key, Reason: fmt.Sprintf(format, args...)})
	}

	var all []Listener
	var keys []string // the key of each of all
	for i, a := range c.ListenAddrs {
		all = append(all, Listener{Address: a})
		keys = append(keys, fmt.Sprintf("listen_addrs[%d]", i))
		if err := checkListenAddr(a); err != nil {
			bad(fmt.Sprintf("listen_addrs[%d]", i), "%v", err)
		}
	}
	for i, l := range c.Listeners {
		key := fmt.Sprintf("listeners[%d]", i)
		if err := checkListenAddr(l.Address); err != nil {
			bad(key+".address", "%v", err)
		}
		if l.BackendPort < 0 || l.BackendPort > 65535 {
			bad(key+".backend_port", "%d is not a port (0-65535)", l.BackendPort)
		}
		if l.DefaultBackend != "" {
			if a, err := canonicalHostPort(l.DefaultBackend); err != nil {
				bad(key+".default_backend", "%v", err)
			} else {
				l.DefaultBackend = a
			}
		}
		l.checkTrusted(key, bad)
		all = append(all, l)
		keys = append(keys, key)
	}
	if len(all) == 0 {
		bad("listen_addrs", "no listener configured (listen_addrs or listeners)")
	}
	seen := map[string]string{} // address: the key that listed it first
	for i := range all {
		l := &all[i]
		if ap, err := netip.ParseAddrPort(l.Address); err == nil {
			l.Address = ap.String()
			if l.BackendPort == 0 {
				l.BackendPort = int(ap.Port())
			}
		}
		if l.Reuseport == nil {
			t := true
			l.Reuseport = &t
		}
		if first, dup := seen[l.Address]; dup {
			bad(keys[i], "address %s is already listed as %s", l.Address, first)
			continue
		}
		seen[l.Address] = keys[i]
	}
	c.Listeners, c.ListenAddrs = all, nil

	if c.Workers < 0 {
		bad("workers", "%d is negative (0 means one per CPU)", c.Workers)
	}
	for _, d := range []struct {
		key string
		d   time.Duration
	}{
		{"timeouts.connect", c.Timeouts.Connect},
		{"timeouts.client_hello", c.Timeouts.ClientHello},
		{"timeouts.idle", c.Timeouts.Idle},
		{"shutdown_timeout", c.ShutdownTimeout},
	} {
		if d.d <= 0 {
			bad(d.key, "must be positive (got %v)", d.d)
		}
	}
	if c.Metrics.Enabled {
		if ap, err := netip.ParseAddrPort(c.Metrics.Address); err != nil {
			bad("metrics.address", "%q: want ip:port", c.Metrics.Address)
		} else {
			for i, l := range all {
				if addrsOverlap(l.Address, ap) {
					bad("metrics.address", "%s clashes with %s (%s): the metrics server and a listener cannot share a port",
						c.Metrics.Address, keys[i], l.Address)
				}
			}
		}
	}
	if c.MaxConnections <= 0 {
		bad("max_connections", "must be positive (got %d)", c.MaxConnections)
	}
	if c.Limits.PerIPConnections < 0 {
		bad("limits.per_ip_connections", "must be 0 (off) or positive (got %d)", c.Limits.PerIPConnections)
	}
	if r := c.Limits.PerIPRate; r < 0 || math.IsNaN(r) || math.IsInf(r, 0) {
		bad("limits.per_ip_rate", "must be 0 (off) or a positive number of connections per second (got %v)", r)
	}
	if p := c.Limits.IPv6Prefix; p < 1 || p > 128 {
		bad("limits.ipv6_prefix", "must be 1..128 (got %d)", p)
	}
	for i, p := range c.Allowlist {
		if _, err := hostname.ParsePattern(p); err != nil {
			bad(fmt.Sprintf("allowlist[%d]", i), "%v", err)
		}
	}
	for i, p := range c.Denylist {
		if _, err := hostname.ParsePattern(p); err != nil {
			bad(fmt.Sprintf("denylist[%d]", i), "%v", err)
		}
	}
	c.validateRoutes(bad)
	if c.DefaultBackend != "" {
		if a, err := canonicalHostPort(c.DefaultBackend); err != nil {
			bad("default_backend", "%v", err)
		} else {
			c.DefaultBackend = a
		}
	}
	c.checkSelfRoutes(bad)
	c.checkUser(bad)
	switch c.Backend.ProxyProtocol {
	case "", "v1", "v2":
	default:
		bad("backend.proxy_protocol", "%q: want \"\", \"v1\" or \"v2\"", c.Backend.ProxyProtocol)
	}
	if c.Backend.DNSFamily == "" {
		c.Backend.DNSFamily = "any"
	}
	if !slices.Contains(dnsFamilies, c.Backend.DNSFamily) {
		bad("backend.dns_family", "%q: want %s", c.Backend.DNSFamily, strings.Join(dnsFamilies, ", "))
	}
	switch strings.ToLower(c.Log.Level) {
	case "", "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q: want debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "", "auto", "text", "json":
	default:
		bad("log.format", "%q: want auto, text or json", c.Log.Format)
	}
	if c.Log.File != "" && c.Log.File == c.Log.AccessFile {
		bad("log.access_file", "is log.file (%s): leave it empty for the access lines to go there", c.Log.File)
	}
	return errors.Join(errs...)
}

// addrsOverlap reports whether a bind on the listen address listen (as
// checkListenAddr accepts it) and one on m would take the same port: the
// same address, or the same port with either one a wildcard (0.0.0.0, ::
// or an empty host) of a family that covers the other.
func addrsOverlap(listen string, m netip.AddrPort) bool {
	host, port, err := net.SplitHostPort(listen)
	if err != nil || port != strconv.Itoa(int(m.Port())) {
		return false
	}
	if host == "" {
		return true
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	a, b := a.Unmap(), m.Addr().Unmap()
	switch {
	case a == b:
		return true
	case a.IsUnspecified() && (a.Is6() || b.Is4()):
		return true // :: takes IPv4 too (unless IPV6_V6ONLY)
	case b.IsUnspecified() && (b.Is6() || a.Is4()):
		return true
	}
	return false
}

// checkTrusted parses and normalises l.TrustedProxies, reporting problems
// under key (the listener's).
func (l *Listener) checkTrusted(key string, bad func(key, format string, args ...any)) {
	if l.AcceptProxyProtocol && len(l.TrustedProxies) == 0 {
		bad(key+".trusted_proxies", "required when accept_proxy_protocol is true: the CIDRs of the balancers that send PROXY headers")
	}
	l.trusted = nil
	norm := make([]string, 0, len(l.TrustedProxies))
	for j, s := range l.TrustedProxies {
		p, err := parseTrusted(strings.TrimSpace(s))
		if err != nil {
			bad(fmt.Sprintf("%s.trusted_proxies[%d]", key, j), "%v", err)
			continue
		}
		l.trusted = append(l.trusted, p)
		norm = append(norm, p.String())
	}
	if len(norm) > 0 {
		l.TrustedProxies = norm
	}
}

// checkListenAddr accepts "ip:port" and ":port".
func checkListenAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q: %w", a, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%q: port %q is not 1-65535", a, port)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%q: host must be an IP address or empty", a)
		}
	}
	return nil
}

// listChunk is how many items of a list YAML encodes at a time. go-yaml's
// encoder keeps every event of a document until the document ends, so one
// document with 100,000 routes took 4s to print; in pieces it takes
// milliseconds.
const listChunk = 1000

// YAML returns the effective configuration as YAML, durations written as Go
// duration strings.
func (c *Config) YAML() ([]byte, error) {
	// The lists that may be long are printed apart, in chunks, and put in
	// place of the "key: []" line the rest prints for them.
	rest := *c
	rest.Allowlist, rest.Denylist, rest.Routes = nil, nil, nil
	out, err := rest.yamlDoc()
	if err != nil {
		return nil, err
	}
	for _, l := range []struct {
		key   string
		items func() ([]byte, error)
	}{
		{"allowlist", func() ([]byte, error) { return yamlList(c.Allowlist) }},
		{"denylist", func() ([]byte, error) { return yamlList(c.Denylist) }},
		{"routes", func() ([]byte, error) { return yamlList(c.Routes) }},
	} {
		items, err := l.items()
		if err != nil {
			return nil, err
		}
		if items == nil {
			continue
		}
		empty := []byte("\n" + l.key + ": []\n")
		if bytes.Count(out, empty) != 1 {
			return nil, fmt.Errorf("config: print: no single %q line to put the list in", empty[1:len(empty)-1])
		}
		out = bytes.Replace(out, empty, slices.Concat([]byte("\n"+l.key+":\n"), items), 1)
	}
	return out, nil
}

// yamlList prints the items of a top-level list, indented as YAML prints
// them under their key, listChunk items per document; nil for no items.
func yamlList[T any](items []T) ([]byte, error) {
	var out bytes.Buffer
	for chunk := range slices.Chunk(items, listChunk) {
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		if err := enc.Encode(chunk); err != nil {
			return nil, fmt.Errorf("config: print: %w", err)
		}
		if err := enc.Close(); err != nil {
			return nil, fmt.Errorf("config: print: %w", err)
		}
		for line := range bytes.Lines(buf.Bytes()) {
			out.WriteString("  ")
			out.Write(line)
		}
	}
	return out.Bytes(), nil
}

// yamlDoc prints c as one YAML document, durations written as Go duration
// strings.
func (c *Config) yamlDoc() ([]byte, error) {
	var doc yaml.Node
	if err := doc.Encode(c); err != nil {
		return nil, fmt.Errorf("config: print: %w", err)
	}
	durations := map[string]time.Duration{
		"shutdown_timeout": c.ShutdownTimeout,
		"connect":          c.Timeouts.Connect,
		"client_hello":     c.Timeouts.ClientHello,
		"idle":             c.Timeouts.Idle,
	}
	var fix func(n *yaml.Node, top bool)
	fix = func(n *yaml.Node, top bool) {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i].Value, n.Content[i+1]
			switch {
			case k == "timeouts" && top:
				fix(v, false)
			case (k == "shutdown_timeout") == top:
				if d, ok := durations[k]; ok {
					v.SetString(d.String())
				}
			}
		}
	}
	fix(&doc, true)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, fmt.Errorf("config: print: %w", err)
	}
	return buf.Bytes(), nil
}

// Peek returns the control_socket and pid_file the config file at path
// (the embedded default when "") and the SNIPROXY_* variables of environ
// (nil means os.Environ()) set, without validating anything else: for
// `sniproxy status`, which must find the master even when the file on
// disk no longer validates. A key it cannot read is "".
func Peek(path string, environ []string) (controlSocket, pidFile string) {
	data := DefaultYAML
	if path != "" {
		if b, err := os.ReadFile(path); err == nil {
			data = b
		} else {
			data = nil
		}
	}
	// A node tree, not a map: a file with a duplicate key or a value of
	// the wrong type still yields the two keys.
	var doc yaml.Node
	if yaml.Unmarshal(data, &doc) == nil && len(doc.Content) == 1 && doc.Content[0].Kind == yaml.MappingNode {
		m := doc.Content[0].Content
		for i := 0; i+1 < len(m); i += 2 {
			if m[i+1].Kind != yaml.ScalarNode {
				continue
			}
			switch strings.ToLower(m[i].Value) {
			case "control_socket":
				controlSocket = m[i+1].Value
			case "pid_file":
				pidFile = m[i+1].Value
			}
		}
	}
	if environ == nil {
		environ = os.Environ()
	}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "SNIPROXY_CONTROL_SOCKET":
			controlSocket = v
		case "SNIPROXY_PID_FILE":
			pidFile = v
		}
	}
	return controlSocket, pidFile
}
