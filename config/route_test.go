package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

// minimal is a valid config without routes, to which tests append keys.
const minimal = "listen_addrs: [\"127.0.0.1:8443\"]\n"

func TestPoolBothForms(t *testing.T) {
	c, err := Parse([]byte(minimal+`
routes:
  - match: "*.api.example.com"
    backends:
      - "10.0.0.6:443"
      - { address: "10.0.0.7:443", weight: 2 }
      - { address: "[::1]:443", backup: true }
      - { address: "Pool.Internal.:8443" }
`), []string{})
	if err != nil {
		t.Fatal(err)
	}
	r := c.Routes[0]
	want := []PoolBackend{
		{Address: "10.0.0.6:443", Weight: 1},
		{Address: "10.0.0.7:443", Weight: 2},
		{Address: "[::1]:443", Weight: 1, Backup: true},
		{Address: "pool.internal:8443", Weight: 1},
	}
	if !reflect.DeepEqual(r.Backends, want) {
		t.Errorf("backends = %+v; want %+v", r.Backends, want)
	}
	if r.Balance != BalanceRoundRobin {
		t.Errorf("balance = %q; want the default %q", r.Balance, BalanceRoundRobin)
	}
	if r.HealthCheck != nil {
		t.Errorf("health_check = %+v; want nil when absent", r.HealthCheck)
	}
	if rise, fall := r.Thresholds(); rise != DefaultHealthRise || fall != DefaultHealthFall {
		t.Errorf("thresholds without a check = %d, %d; want the defaults", rise, fall)
	}
	if !reflect.DeepEqual(r.Pool(), want) {
		t.Errorf("Pool() = %+v; want the backends", r.Pool())
	}
}

func TestSingleBackendStaysValid(t *testing.T) {
	c, err := Parse([]byte(minimal+"routes: [{match: a.example.com, backend: \"b.internal\"}]\n"), []string{})
	if err != nil {
		t.Fatal(err)
	}
	r := c.Routes[0]
	if r.Backend != "b.internal" || r.Backends != nil {
		t.Errorf("route = %+v", r)
	}
	if got, want := r.Pool(), []PoolBackend{{Address: "b.internal", Weight: 1}}; !reflect.DeepEqual(got, want) {
		t.Errorf("Pool() = %+v; want %+v", got, want)
	}
}

func TestHealthCheckDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal+`
routes:
  - match: app.example.com
    backends: ["10.0.0.1:443", "10.0.0.2:443"]
    health_check: { type: tls }
  - match: "*.example.com"
    backends: ["10.0.0.1:443"]
    health_check: { type: tls, interval: 10, rise: 1, fall: 1 }
  - match: "~[a-z]+\\.example\\.org"
    backends: ["10.0.0.1:443"]
    health_check: {}
`), []string{})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []HealthCheck{
		{Type: HealthTLS, SNI: "app.example.com", Interval: 5 * time.Second, Timeout: 2 * time.Second, Rise: 2, Fall: 3},
		{Type: HealthTLS, Interval: 10 * time.Second, Timeout: 2 * time.Second, Rise: 1, Fall: 1},
		{Type: HealthTCP, Interval: 5 * time.Second, Timeout: 2 * time.Second, Rise: 2, Fall: 3},
	} {
		if got := c.Routes[i].HealthCheck; got == nil || *got != want {
			t.Errorf("routes[%d].health_check = %+v; want %+v", i, got, want)
		}
	}
	if rise, fall := c.Routes[1].Thresholds(); rise != 1 || fall != 1 {
		t.Errorf("thresholds = %d, %d; want the check's 1, 1", rise, fall)
	}
}

func TestRouteOverrides(t *testing.T) {
	c, err := Parse([]byte(minimal+`
backend: { proxy_protocol: v1 }
default_backend: "10.0.0.9:22"
listeners: [{address: "127.0.0.1:9443", default_backend: "ssh.internal:22"}]
routes:
  - match: a.example.com
    backend: "10.0.0.1:443"
    alpn: ["acme-tls/1"]
    proxy_protocol: ""
    timeouts: { connect: 3s, idle: 1h }
  - match: b.example.com
    backend: "10.0.0.1:443"
    timeouts: { idle: 60 }
  - match: c.example.com
    backend: "10.0.0.1:443"
    proxy_protocol: v2
`), []string{})
	if err != nil {
		t.Fatal(err)
	}
	g := c.Timeouts
	for i, want := range []struct {
		pp            string
		connect, idle time.Duration
	}{
		{"", 3 * time.Second, time.Hour},
		{"v1", g.Connect, time.Minute},
		{"v2", g.Connect, g.Idle},
	} {
		r := c.Routes[i]
		if got := r.ProxyHeader(c.Backend.ProxyProtocol); got != want.pp {
			t.Errorf("routes[%d] proxy header %q; want %q", i, got, want.pp)
		}
		if connect, idle := r.EffectiveTimeouts(g); connect != want.connect || idle != want.idle {
			t.Errorf("routes[%d] timeouts %v, %v; want %v, %v", i, connect, idle, want.connect, want.idle)
		}
	}
	if got := c.Routes[0].ALPN; !reflect.DeepEqual(got, []string{"acme-tls/1"}) {
		t.Errorf("alpn = %q", got)
	}
	if got := c.DefaultBackendFor(c.Listeners[0]); got != "10.0.0.9:22" {
		t.Errorf("default backend of the short-form listener = %q; want the global one", got)
	}
	if got := c.DefaultBackendFor(c.Listeners[1]); got != "ssh.internal:22" {
		t.Errorf("default backend of the listener with its own = %q", got)
	}
}

func TestCompileMatch(t *testing.T) {
	re, err := CompileMatch(`~(www|api)\.example\.com`)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]bool{
		"www.example.com":      true,
		"api.example.com":      true,
		"xapi.example.com":     false, // anchored at the start
		"api.example.com.evil": false, // and at the end
	} {
		if got := re.MatchString(name); got != want {
			t.Errorf("match %q = %v; want %v", name, got, want)
		}
	}
	// Alternation must not escape the anchors: ^a|b$ would match "bx...".
	re, _ = CompileMatch("~a|b")
	if re.MatchString("bx") || re.MatchString("xa") {
		t.Errorf("~a|b matches a partial name")
	}
	if re, err := CompileMatch("*.example.com"); re != nil || err != nil {
		t.Errorf("a suffix pattern: got %v, %v; want nil, nil", re, err)
	}
}

func TestPoolErrors(t *testing.T) {
	route := func(s string) string { return minimal + "routes:\n  - match: a.example.com\n" + s }
	pool := "    backends: [\"10.0.0.1:443\", \"10.0.0.2:443\"]\n"
	for _, tc := range []struct {
		name, yaml, key, reason string
	}{
		{"all backups", route("    backends: [{address: \"10.0.0.1:443\", backup: true}]\n"), "routes[0].backends", "every backend is a backup"},
		{"zero weight", route("    backends: [{address: \"10.0.0.1:443\", weight: 0}]\n"), "routes[0].backends[0].weight", "positive"},
		{"negative weight", route("    backends: [\"10.0.0.2:443\", {address: \"10.0.0.1:443\", weight: -2}]\n"), "routes[0].backends[1].weight", "positive"},
		{"huge weight", route("    backends: [{address: \"10.0.0.1:443\", weight: 1000001}]\n"), "routes[0].backends[0].weight", "at most 1000000"},
		{"bad address", route("    backends: [\"10.0.0.1:99999\"]\n"), "routes[0].backends[0].address", "out of range"},
		{"no port", route("    backends: [\"10.0.0.1\"]\n"), "routes[0].backends[0].address", "no port"},
		{"duplicate", route("    backends: [\"10.0.0.1:443\", \"10.0.0.1:0443\"]\n"), "routes[0].backends[1].address", "also backends[0]"},
		{"unknown pool key", route("    backends: [{address: \"10.0.0.1:443\", wieght: 2}]\n"), "routes[0].backends[0].wieght", "unknown key"},
		{"both", route("    backend: \"10.0.0.1:443\"\n" + pool), "routes[0]", "both backend and backends"},
		{"neither", route(""), "routes[0].backend", "missing"},
		{"empty pool", route("    backends: []\n"), "routes[0].backend", "missing"},
		{"unknown balance", route(pool + "    balance: fastest\n"), "routes[0].balance", "fastest"},
		{"rise zero", route(pool + "    health_check: {rise: 0}\n"), "routes[0].health_check.rise", "at least 1"},
		{"fall zero", route(pool + "    health_check: {fall: 0}\n"), "routes[0].health_check.fall", "at least 1"},
		{"timeout = interval", route(pool + "    health_check: {interval: 2s, timeout: 2s}\n"), "routes[0].health_check.timeout", "not less than the interval"},
		{"timeout > interval", route(pool + "    health_check: {interval: 1s}\n"), "routes[0].health_check.timeout", "not less than the interval"},
		{"zero interval", route(pool + "    health_check: {interval: 0}\n"), "routes[0].health_check.interval", "positive"},
		{"unknown type", route(pool + "    health_check: {type: http}\n"), "routes[0].health_check.type", "http"},
		{"sni on tcp", route(pool + "    health_check: {sni: a.example.com}\n"), "routes[0].health_check.sni", "only a tls check"},
		{"bad sni", route(pool + "    health_check: {type: tls, sni: \"a b\"}\n"), "routes[0].health_check.sni", "invalid character"},
		{"address sni", route(pool + "    health_check: {type: tls, sni: 10.0.0.1}\n"), "routes[0].health_check.sni", "not an address"},
		{"check without port", route("    backend: b.internal\n    health_check: {}\n"), "routes[0].health_check", "no port"},
		{"unknown check key", route(pool + "    health_check: {path: /}\n"), "routes[0].health_check.path", "unknown key"},
		{"empty alpn", route(pool + "    alpn: [\"h2\", \"\"]\n"), "routes[0].alpn[1]", "1 to 255 bytes"},
		{"long alpn", route(pool + "    alpn: [\"" + strings.Repeat("x", 256) + "\"]\n"), "routes[0].alpn[0]", "1 to 255 bytes"},
		{"comma in alpn", route(pool + "    alpn: [\"h2,http/1.1\"]\n"), "routes[0].alpn[0]", "comma"},
		{"route proxy protocol", route(pool + "    proxy_protocol: v3\n"), "routes[0].proxy_protocol", "v3"},
		{"negative route timeout", route(pool + "    timeouts: {idle: -1s}\n"), "routes[0].timeouts.idle", "negative"},
		{"client_hello per route", route(pool + "    timeouts: {client_hello: 1s}\n"), "routes[0].timeouts.client_hello", "unknown key"},
		{"bad regex", minimal + "routes: [{match: \"~(a\", backend: \"10.0.0.1:443\"}]\n", "routes[0].match", "missing closing )"},
		{"empty regex", minimal + "routes: [{match: \"~\", backend: \"10.0.0.1:443\"}]\n", "routes[0].match", "empty"},
		{"bad default backend", minimal + "default_backend: \"10.0.0.1\"\n", "default_backend", "no port"},
		{"bad default backend syntax", minimal + "default_backend: \"a b:22\"\n", "default_backend", "invalid character"},
		{"bad listener default backend", minimal + "listeners: [{address: \"127.0.0.1:9\", default_backend: \":22\"}]\n", "listeners[0].default_backend", "empty host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), []string{})
			if err == nil {
				t.Fatalf("Parse succeeded; want an error naming %q", tc.key)
			}
			want := tc.key + ": "
			if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q; want %q with %q", err, want, tc.reason)
			}
		})
	}
}

func TestPoolErrorsAllReported(t *testing.T) {
	_, err := Parse([]byte(minimal+`
routes:
  - match: "~("
    backends: [{address: "10.0.0.1:443", backup: true, weight: 0}]
    health_check: {rise: 0, fall: 0, interval: 1s, timeout: 1s}
    balance: nope
`), []string{})
	if err == nil {
		t.Fatal("Parse succeeded")
	}
	for _, key := range []string{"routes[0].match", "routes[0].backends:", "routes[0].backends[0].weight",
		"routes[0].health_check.rise", "routes[0].health_check.fall", "routes[0].health_check.timeout", "routes[0].balance"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error does not name %s:\n%v", key, err)
		}
	}
}

func TestPoolYAMLRoundTrip(t *testing.T) {
	c, err := Parse([]byte(minimal+`
default_backend: "10.0.0.9:22"
listeners: [{address: "127.0.0.1:9443", default_backend: "[::1]:22"}]
routes:
  - match: "~[a-z]+\\.example\\.com"
    alpn: [h2, "http/1.1"]
    backends:
      - "10.0.0.6:443"
      - { address: "10.0.0.7:443", weight: 2 }
      - { address: "10.0.0.8:443", backup: true }
    balance: source_hash
    health_check: { type: tls, sni: check.example.com, interval: 1m30s, timeout: 1500ms, rise: 1, fall: 5 }
    proxy_protocol: ""
    timeouts: { connect: 3s, idle: 1h }
  - match: a.example.com
    backend: "10.0.0.5:8443"
`), []string{})
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.YAML()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"- 10.0.0.6:443\n", "weight: 2", "backup: true", "interval: 1m30s", "timeout: 1.5s", "idle: 1h0m0s", `proxy_protocol: ""`} {
		if !strings.Contains(string(out), s) {
			t.Errorf("printed config lacks %q:\n%s", s, out)
		}
	}
	c2, err := Parse(out, []string{})
	if err != nil {
		t.Fatalf("printed config does not parse: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(c2.Routes, c.Routes) || c2.DefaultBackend != c.DefaultBackend || !reflect.DeepEqual(c2.Listeners, c.Listeners) {
		t.Errorf("round trip changed the config:\n%s\nroutes %+v\nthen   %+v", out, c.Routes, c2.Routes)
	}
	out2, err := c2.YAML()
	if err != nil {
		t.Fatal(err)
	}
	if string(out2) != string(out) {
		t.Errorf("printing is not stable:\n%s\nthen\n%s", out, out2)
	}
}

func TestDefaultBackendFromEnv(t *testing.T) {
	c, err := Parse([]byte(minimal), []string{"SNIPROXY_DEFAULT_BACKEND=10.0.0.1:22"})
	if err != nil {
		t.Fatal(err)
	}
	if c.DefaultBackend != "10.0.0.1:22" {
		t.Errorf("default_backend = %q; want the environment's", c.DefaultBackend)
	}
}
