package config

import (
	"strings"
	"testing"
)

func TestRouteToOwnListenerIsAnError(t *testing.T) {
	for _, tt := range []struct {
		name, yaml, key string
	}{
		{"same address", `listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "127.0.0.1:8443"}]`, "routes[0].backend"},
		{"no port: the listener's backend port is its own", `listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "127.0.0.1"}]`, "routes[0].backend"},
		{"localhost", `listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "localhost:8443"}]`, "routes[0].backend"},
		{"wildcard listener, loopback backend", `listen_addrs: ["0.0.0.0:8443"]
routes: [{match: a.test, backend: "127.0.0.2:8443"}]`, "routes[0].backend"},
		{"IPv6 wildcard", `listen_addrs: ["[::]:8443"]
routes: [{match: a.test, backend: "[::1]:8443"}]`, "routes[0].backend"},
		{"pool member", `listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backends: ["127.0.0.1:9000", "127.0.0.1:8443"]}]`, "routes[0].backends[1]"},
		{"default backend", `listen_addrs: ["127.0.0.1:8443"]
default_backend: "127.0.0.1:8443"`, "default_backend"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), []string{})
			if err == nil || !strings.Contains(err.Error(), tt.key+": ") || !strings.Contains(err.Error(), "loop") {
				t.Errorf("got %v; want an error at %s about a loop", err, tt.key)
			}
		})
	}
	for _, ok := range []string{
		`listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "127.0.0.1:9443"}]`,
		`listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "127.0.0.2:8443"}]`,
		`listeners: [{address: "127.0.0.1:8443", backend_port: 443}]
routes: [{match: a.test, backend: "127.0.0.1"}]`,
		`listen_addrs: ["127.0.0.1:8443"]
routes: [{match: a.test, backend: "backend.internal:8443"}]`,
	} {
		if _, err := Parse([]byte(ok), []string{}); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}
