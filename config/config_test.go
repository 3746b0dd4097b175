package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// seed is the original seed config format, which must stay valid.
const seed = `
listen_addrs:
  - "0.0.0.0:80"
  - "0.0.0.0:443"
timeouts:
  connect: 10
  client_hello: 5
  idle: 300
metrics:
  enabled: true
  address: "127.0.0.1:9000"
allowlist:
  - "*.example.com"
  - "example.org"
max_connections: 10000
shutdown_timeout: 30
`

func TestParseSeed(t *testing.T) {
	c, err := Parse([]byte(seed), []string{})
	if err != nil {
		t.Fatalf("Parse(seed): %v", err)
	}
	if got, want := c.Timeouts.Connect, 10*time.Second; got != want {
		t.Errorf("timeouts.connect = %v; want %v (integer seconds)", got, want)
	}
	if got, want := c.Timeouts.Idle, 300*time.Second; got != want {
		t.Errorf("timeouts.idle = %v; want %v", got, want)
	}
	if got, want := c.ShutdownTimeout, 30*time.Second; got != want {
		t.Errorf("shutdown_timeout = %v; want %v", got, want)
	}
	if len(c.Listeners) != 2 || c.Listeners[1].Address != "0.0.0.0:443" || c.Listeners[1].BackendPort != 443 || !c.Listeners[1].ReusePort() {
		t.Errorf("listeners = %+v; want two, the second 0.0.0.0:443 with backend port 443 and reuseport", c.Listeners)
	}
	if len(c.Allowlist) != 2 || c.MaxConnections != 10000 {
		t.Errorf("allowlist %v max_connections %d", c.Allowlist, c.MaxConnections)
	}
}

func TestDurations(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"10", 10 * time.Second},
		{"10s", 10 * time.Second},
		{"1m30s", 90 * time.Second},
		{"\"15\"", 15 * time.Second},
		{"250ms", 250 * time.Millisecond},
	} {
		t.Run(tc.in, func(t *testing.T) {
			c, err := Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\ntimeouts: {connect: "+tc.in+", client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n"), []string{})
			if err != nil {
				t.Fatal(err)
			}
			if c.Timeouts.Connect != tc.want {
				t.Errorf("got %v; want %v", c.Timeouts.Connect, tc.want)
			}
		})
	}
}

func TestErrorsNameKeys(t *testing.T) {
	base := "listen_addrs: [\"127.0.0.1:8443\"]\ntimeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n"
	for _, tc := range []struct {
		name, yaml, key string
	}{
		{"unknown key", base + "bogus_key: 1\n", "bogus_key"},
		{"unknown nested key", base + "metrics: {enabled: true, address: \"127.0.0.1:9\", color: red}\n", "color"},
		{"bad listen addr", "listen_addrs: [\"nope\"]\ntimeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n", "listen_addrs[0]"},
		{"bad port", "listen_addrs: [\"127.0.0.1:70000\"]\ntimeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n", "listen_addrs[0]"},
		{"bad duration", strings.Replace(base, "connect: 1", "connect: soon", 1), "connect"},
		{"zero duration", strings.Replace(base, "idle: 1", "idle: 0", 1), "timeouts.idle"},
		{"bad allow pattern", base + "allowlist: [\"a.*.com\"]\n", "allowlist[0]"},
		{"bad deny pattern", base + "denylist: [\"\"]\n", "denylist[0]"},
		{"bad route backend", base + "routes: [{match: a.example.com, backend: \"10.0.0.1:99999\"}]\n", "routes[0].backend"},
		{"bad route match", base + "routes: [{match: \"*\", backend: \"10.0.0.1:443\"}]\n", "routes[0].match"},
		{"bad proxy protocol", base + "backend: {proxy_protocol: v3}\n", "backend.proxy_protocol"},
		{"bad dns family", base + "backend: {dns_family: ipv5}\n", "backend.dns_family"},
		{"dns family case", base + "backend: {dns_family: IPv4}\n", "backend.dns_family"},
		{"bad level", base + "log: {level: loud}\n", "log.level"},
		{"bad format", base + "log: {format: xml}\n", "log.format"},
		{"negative workers", base + "workers: -1\n", "workers"},
		{"duplicate listener", base + "listeners: [{address: \"127.0.0.1:8443\"}]\n", "listeners"},
		{"bad metrics address", base + "metrics: {enabled: true, address: localhost}\n", "metrics.address"},
		{"zero max_connections", strings.Replace(base, "max_connections: 1", "max_connections: 0", 1), "max_connections"},
		{"no listeners", "timeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n", "listen_addrs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), []string{})
			if err == nil {
				t.Fatalf("Parse succeeded; want an error naming %q", tc.key)
			}
			if !strings.Contains(err.Error(), tc.key) {
				t.Errorf("error %q does not name key %q", err, tc.key)
			}
		})
	}
}

func TestEveryErrorReported(t *testing.T) {
	_, err := Parse([]byte("listen_addrs: [\"x\"]\ntimeouts: {connect: 0, client_hello: 1, idle: 1}\nmax_connections: 0\nshutdown_timeout: 1\n"), []string{})
	var n int
	for _, key := range []string{"listen_addrs[0]", "timeouts.connect", "max_connections"} {
		if err != nil && strings.Contains(err.Error(), key) {
			n++
		}
	}
	if n != 3 {
		t.Errorf("error %v; want all three problems named", err)
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Errorf("error %T does not hold a *config.Error", err)
	}
}

func TestEnvOverrides(t *testing.T) {
	env := []string{
		"SNIPROXY_MAX_CONNECTIONS=500",
		"SNIPROXY_TIMEOUTS_CONNECT=3s",
		"SNIPROXY_TIMEOUTS_IDLE=7",
		"SNIPROXY_LISTEN_ADDRS=127.0.0.1:1001,127.0.0.1:1002",
		"SNIPROXY_BACKEND_ALLOW_PRIVATE=true",
		"SNIPROXY_BACKEND_DNS_FAMILY=prefer_ipv6",
		"SNIPROXY_CONFIG=/ignored",
		"HOME=/root",
	}
	c, err := Parse(DefaultYAML, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxConnections != 500 || c.Timeouts.Connect != 3*time.Second || c.Timeouts.Idle != 7*time.Second || !c.Backend.AllowPrivate {
		t.Errorf("got max_connections %d connect %v idle %v allow_private %v", c.MaxConnections, c.Timeouts.Connect, c.Timeouts.Idle, c.Backend.AllowPrivate)
	}
	if c.Backend.DNSFamily != "prefer_ipv6" {
		t.Errorf("dns_family %q; want prefer_ipv6 from the environment", c.Backend.DNSFamily)
	}
	if len(c.Listeners) != 2 || c.Listeners[0].Address != "127.0.0.1:1001" {
		t.Errorf("listeners %+v; want the two from the environment", c.Listeners)
	}
	if _, err := Parse(DefaultYAML, []string{"SNIPROXY_NO_SUCH=1"}); err == nil || !strings.Contains(err.Error(), "SNIPROXY_NO_SUCH") {
		t.Errorf("unknown override: err %v; want one naming it", err)
	}
}

func TestDefault(t *testing.T) {
	c, err := Load("", []string{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Source != EmbeddedSource {
		t.Errorf("source %q", c.Source)
	}
	var addrs []string
	for _, l := range c.Listeners {
		addrs = append(addrs, l.Address)
	}
	if strings.Join(addrs, " ") != "127.0.0.1:8080 127.0.0.1:8443" || c.Metrics.Address != "127.0.0.1:9000" || c.Backend.AllowPrivate {
		t.Errorf("default listeners %v metrics %q allow_private %v", addrs, c.Metrics.Address, c.Backend.AllowPrivate)
	}
}

func TestSampleConfig(t *testing.T) {
	c, err := Load(filepath.Join("..", "etc", "config.yaml"), []string{})
	if err != nil {
		t.Fatalf("etc/config.yaml: %v", err)
	}
	if len(c.Routes) == 0 || len(c.Listeners) == 0 {
		t.Errorf("sample config has no routes or listeners")
	}
}

func TestResolve(t *testing.T) {
	none := func(string) (fs.FileInfo, error) { return nil, os.ErrNotExist }
	exists := func(string) (fs.FileInfo, error) { return nil, nil }
	env := func(v string) func(string) string { return func(string) string { return v } }
	for _, tc := range []struct {
		name, flag, env string
		stat            func(string) (fs.FileInfo, error)
		want            string
	}{
		{"flag wins", "/a.yaml", "/b.yaml", exists, "/a.yaml"},
		{"env next", "", "/b.yaml", exists, "/b.yaml"},
		{"etc next", "", "", exists, DefaultPath},
		{"embedded last", "", "", none, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Resolve(tc.flag, env(tc.env), tc.stat); got != tc.want {
				t.Errorf("got %q; want %q", got, tc.want)
			}
		})
	}
}

func TestYAMLRoundTrip(t *testing.T) {
	c, err := Parse([]byte(seed), []string{})
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.YAML()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "connect: 10s") || !strings.Contains(string(out), "shutdown_timeout: 30s") {
		t.Errorf("printed config lacks readable durations:\n%s", out)
	}
	c2, err := Parse(out, []string{})
	if err != nil {
		t.Fatalf("printed config does not parse: %v\n%s", err, out)
	}
	if c2.Timeouts != c.Timeouts || len(c2.Listeners) != len(c.Listeners) {
		t.Errorf("round trip changed the config:\n%s", out)
	}
}

func TestDefaultsForMissingKeys(t *testing.T) {
	c, err := Parse([]byte("listen_addrs: [\"127.0.0.1:8443\"]\n"), []string{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Timeouts.Connect != 10*time.Second || c.Timeouts.ClientHello != 5*time.Second || c.Timeouts.Idle != 300*time.Second ||
		c.ShutdownTimeout != 30*time.Second || c.MaxConnections != 10000 || !c.Metrics.Enabled || c.Metrics.Address != "127.0.0.1:9000" ||
		c.Backend.DNSFamily != "any" {
		t.Errorf("defaults not applied: %+v", c)
	}
}

func TestLimitsValidation(t *testing.T) {
	base := "listen_addrs: [\"127.0.0.1:8443\"]\nmetrics: {enabled: false}\n"
	for _, tc := range []struct {
		yaml string
		key  string // "" = valid
	}{
		{"limits: {per_ip_connections: 3, per_ip_rate: 2.5, ipv6_prefix: 48}\n", ""},
		{"limits: {per_ip_connections: -1}\n", "limits.per_ip_connections"},
		{"limits: {per_ip_rate: -0.5}\n", "limits.per_ip_rate"},
		{"limits: {ipv6_prefix: 0}\n", "limits.ipv6_prefix"},
		{"limits: {ipv6_prefix: 129}\n", "limits.ipv6_prefix"},
	} {
		cfg, err := Parse([]byte(base+tc.yaml), nil)
		if tc.key == "" {
			if err != nil {
				t.Errorf("%q: %v", tc.yaml, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%q: err %v, want one naming %s (cfg %+v)", tc.yaml, err, tc.key, cfg)
		}
	}
	cfg, err := Parse([]byte(base), nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Limits.IPv6Prefix != 64 || cfg.Limits.On() {
		t.Errorf("defaults %+v, want ipv6_prefix 64 and both limits off", cfg.Limits)
	}
}
