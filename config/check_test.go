package config

import (
	"os"
	"strings"
	"testing"
)

// TestParseReportsEveryProblemOnce: unknown keys, values that do not
// decode and semantic problems come out of one Parse, each once, and a
// key that did not decode is not also reported by the semantic checks.
func TestParseReportsEveryProblemOnce(t *testing.T) {
	yaml := `listen_addrs: ["127.0.0.1:8443", "127.0.0.1:8443", "127.0.0.1:8443", "0.0.0.0:9100"]
max_connections: abc
metrics: {address: "127.0.0.1:9100"}
workers: -1
bogus: 1
`
	_, err := Parse([]byte(yaml), []string{})
	if err == nil {
		t.Fatal("Parse accepted the config")
	}
	msg := err.Error()
	for _, want := range []string{
		"bogus: unknown key",
		"max_connections: cannot parse",
		"listen_addrs[1]: address 127.0.0.1:8443 is already listed as listen_addrs[0]",
		"listen_addrs[2]: address 127.0.0.1:8443 is already listed as listen_addrs[0]",
		"workers: -1 is negative",
		"metrics.address: 127.0.0.1:9100 clashes with listen_addrs[3] (0.0.0.0:9100)",
	} {
		if n := strings.Count(msg, want); n != 1 {
			t.Errorf("%q appears %d times in:\n%s", want, n, msg)
		}
	}
	if strings.Contains(msg, "max_connections: must be positive") {
		t.Errorf("a key that did not decode is reported again:\n%s", msg)
	}
}

func TestMetricsAddressClash(t *testing.T) {
	for _, c := range []struct {
		listen, metrics string
		clash           bool
	}{
		{"127.0.0.1:9000", "127.0.0.1:9000", true},
		{"0.0.0.0:9000", "127.0.0.1:9000", true},
		{"127.0.0.1:9000", "0.0.0.0:9000", true},
		{":9000", "127.0.0.1:9000", true},
		{"[::]:9000", "127.0.0.1:9000", true},
		{"[::1]:9000", "0.0.0.0:9000", false},
		{"127.0.0.2:9000", "127.0.0.1:9000", false},
		{"127.0.0.1:9001", "127.0.0.1:9000", false},
	} {
		yaml := "listen_addrs: [\"" + c.listen + "\"]\nmetrics: {address: \"" + c.metrics + "\"}\n"
		_, err := Parse([]byte(yaml), []string{})
		got := err != nil && strings.Contains(err.Error(), "clashes with")
		if got != c.clash {
			t.Errorf("listen %s, metrics %s: clash %v, want %v (err %v)", c.listen, c.metrics, got, c.clash, err)
		}
	}
}

func TestPeekBrokenConfig(t *testing.T) {
	path := t.TempDir() + "/c.yaml"
	if err := os.WriteFile(path, []byte("control_socket: /x.sock\npid_file: /x.pid\nworkers: many\nbogus: 1\nworkers: 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if sock, pid := Peek(path, []string{}); sock != "/x.sock" || pid != "/x.pid" {
		t.Errorf("Peek = %q, %q", sock, pid)
	}
	if sock, _ := Peek(path, []string{"SNIPROXY_CONTROL_SOCKET=/y.sock"}); sock != "/y.sock" {
		t.Errorf("Peek with the environment = %q", sock)
	}
	if sock, pid := Peek(path+".missing", []string{}); sock != "" || pid != "" {
		t.Errorf("Peek of a missing file = %q, %q", sock, pid)
	}
}
