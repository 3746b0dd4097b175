package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func run(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

func TestCheckCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("listen_addrs: [\"127.0.0.1:8443\"]\ntimeouts: {connect: 3}\n"), 0o600)
	out, code := run(t, nil, "check", "-c", good)
	if code != 0 || !strings.Contains(out, "connect: 3s") || !strings.Contains(out, "client_hello: 5s") {
		t.Errorf("check good config: exit %d\n%s", code, out)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listen_addrs: [\"127.0.0.1:99999\"]\ncolour: red\nroutes: [{match: \"a.*\", backend: x}]\n"), 0o600)
	out, code = run(t, nil, "check", "-c", bad)
	if code != 1 || !strings.Contains(out, "colour: unknown key") {
		t.Errorf("check unknown key: exit %d\n%s", code, out)
	}
	os.WriteFile(bad, []byte("listen_addrs: [\"127.0.0.1:99999\"]\nroutes: [{match: \"a.*\", backend: x}]\n"), 0o600)
	out, code = run(t, nil, "check", "-c", bad)
	if code != 1 || !strings.Contains(out, "listen_addrs[0]") || !strings.Contains(out, "routes[0].match") {
		t.Errorf("check bad values: exit %d\n%s", code, out)
	}
	// No file: $SNIPROXY_CONFIG, then the embedded default.
	out, code = run(t, []string{"SNIPROXY_CONFIG=" + good}, "check")
	if code != 0 || !strings.Contains(out, good) {
		t.Errorf("check via SNIPROXY_CONFIG: exit %d\n%s", code, out)
	}
	out, code = run(t, []string{"SNIPROXY_CONFIG=", "SNIPROXY_MAX_CONNECTIONS=500"}, "check")
	if _, err := os.Stat("/etc/sniproxy/config.yaml"); err == nil {
		t.Fatal("/etc/sniproxy/config.yaml exists on this machine; the embedded-default case cannot be tested")
	}
	if code != 0 || !strings.Contains(out, "embedded default") || !strings.Contains(out, "127.0.0.1:8443") || !strings.Contains(out, "max_connections: 500") {
		t.Errorf("check embedded default with an override: exit %d\n%s", code, out)
	}
}

func TestVersionCommand(t *testing.T) {
	out, code := run(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "sniproxy ") || !strings.Contains(out, "go1.") {
		t.Errorf("version: exit %d %q", code, out)
	}
	if _, code := run(t, nil, "frobnicate"); code != 2 {
		t.Errorf("unknown command: exit %d; want 2", code)
	}
}

func TestStatusCommand(t *testing.T) {
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))
	p := startProxy(t, cfg)
	kids := p.workers(t, 2)
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.waitMetric(t, "sniproxy_connections_active", 1)
	cfgPath := p.cmd.Args[2]
	out, code := run(t, nil, "status", "-c", cfgPath, "--json")
	if code != 0 {
		t.Fatalf("status --json: exit %d\n%s", code, out)
	}
	var st struct {
		PID        int `json:"pid"`
		Generation int `json:"generation"`
		Workers    []struct {
			PID    int   `json:"pid"`
			Ready  bool  `json:"ready"`
			Active int64 `json:"active"`
		} `json:"workers"`
		Totals struct {
			Active int64 `json:"active"`
		} `json:"totals"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if st.PID != p.cmd.Process.Pid || st.Generation != 1 || len(st.Workers) != 2 || st.Totals.Active != 1 {
		t.Errorf("status %+v; want master %d, generation 1, 2 workers, 1 active", st, p.cmd.Process.Pid)
	}
	for _, w := range st.Workers {
		if !w.Ready || (w.PID != kids[0] && w.PID != kids[1]) {
			t.Errorf("worker %+v not one of %v or not ready", w, kids)
		}
	}
	out, code = run(t, nil, "status", "-c", cfgPath)
	if code != 0 || !strings.Contains(out, "SLOT") || !strings.Contains(out, "generation 1") {
		t.Errorf("status: exit %d\n%s", code, out)
	}
	// No master: a clear error and exit 1.
	c.Close()
	p.stop(syscall.SIGTERM, 15*time.Second)
	out, code = run(t, nil, "status", "-c", cfgPath)
	if code != 1 || !strings.Contains(out, "no master answers") {
		t.Errorf("status without a master: exit %d\n%s", code, out)
	}
}

func TestSecondSignalStopsAtOnce(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("master still running 5s after a second SIGTERM (shutdown_timeout is 5s; want at once)")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stopped %v after the second signal; want at once", d)
	}
	if p.err != nil {
		t.Errorf("exit %v; want 0", p.err)
	}
}
