package config

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse feeds YAML and one environment entry through Parse, the
// loader's whole path after reading the file: it must return a config or
// an error, never both, never neither and never panic; a config it returns
// must print (YAML), parse back, and print the same again.
//
//	go test -run XXX -fuzz FuzzParse -fuzztime 60s -parallel 1 ./config
func FuzzParse(f *testing.F) {
	for _, p := range []string{filepath.Join("..", "etc", "config.yaml"), "default.yaml"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, "")
	}
	base := "listen_addrs: [\"127.0.0.1:8443\"]\ntimeouts: {connect: 1, client_hello: 1, idle: 1}\nmax_connections: 1\nshutdown_timeout: 1\n"
	for _, s := range []string{
		seed,
		base,
		base + "bogus_key: 1\n",
		base + "metrics: {enabled: true, address: \"127.0.0.1:9\", color: red}\n",
		strings.Replace(base, "connect: 1", "connect: 1m30s", 1),
		strings.Replace(base, "connect: 1", "connect: \"15\"", 1),
		strings.Replace(base, "idle: 1", "idle: 0", 1),
		base + "allowlist: [\"a.*.com\"]\n",
		base + "routes: [{match: a.example.com, backend: \"10.0.0.1:443\"}, {match: \"*.b.example\", backend: \"[::1]:8443\"}]\n",
		base + "backend: {proxy_protocol: v2}\n",
		base + "listeners: [{address: \"127.0.0.1:8444\", accept_proxy_protocol: true, trusted_proxies: [10.1.0.0/8, \"::ffff:192.0.2.1\"], backend_port: 443, reuseport: false}]\n",
		base + "log: {level: debug, format: json}\n",
		base + "workers: -1\n",
		"listen_addrs: [\"127.0.0.1:8443\"]\n",
		"listen_addrs: &a [\"127.0.0.1:1\"]\nallowlist: *a\n",
		"{",
		"- 1\n- 2\n",
		"",
	} {
		f.Add([]byte(s), "")
	}
	f.Add([]byte(base), "SNIPROXY_MAX_CONNECTIONS=500")
	f.Add([]byte(base), "SNIPROXY_TIMEOUTS_CONNECT=3s")
	f.Add([]byte(base), "SNIPROXY_BOGUS=1")

	f.Fuzz(func(t *testing.T, data []byte, env string) {
		environ := []string{env}
		c, err := Parse(data, environ)
		if (c == nil) == (err == nil) {
			t.Fatalf("Parse = %v, %v; want exactly one of a config and an error", c, err)
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		out, err := c.YAML()
		if err != nil {
			t.Fatalf("YAML of a parsed config: %v", err)
		}
		// The environment override is in c, so the printed config is
		// parsed without it.
		c2, err := Parse(out, []string{})
		if err != nil {
			t.Fatalf("printed config does not parse: %v\n%s", err, out)
		}
		// Compared as printed: Parse may give an empty slice where the
		// first config had nil.
		out2, err := c2.YAML()
		if err != nil {
			t.Fatalf("YAML of a parsed printed config: %v", err)
		}
		if !bytes.Equal(out, out2) {
			t.Fatalf("round trip changed the config:\n%s\nprinted again:\n%s", out, out2)
		}
	})
}
