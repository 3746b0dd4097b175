package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckRefusesRouteToItself: a route to the proxy's own listener is a
// config error that `sniproxy check` names (it passed before, and one
// request then looped until max_connections was spent).
func TestCheckRefusesRouteToItself(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "loop.yaml")
	os.WriteFile(cfg, []byte(`
listen_addrs: ["127.0.0.1:18443"]
routes:
  - {match: "loop.test", backend: "127.0.0.1:18443"}
  - {match: "*.loop.test", backend: "localhost"}
`), 0o600)
	out, err := exec.Command(binary, "check", "-c", cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("check: %v; want exit 1\n%s", err, out)
	}
	for _, want := range []string{"routes[0].backend", "routes[1].backend", "loop"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}
}
