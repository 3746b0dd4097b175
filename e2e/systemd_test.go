package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnitVerifies checks systemd/sniproxy.service with
// systemd-analyze verify, pointing it at the binary just built.
func TestSystemdUnitVerifies(t *testing.T) {
	unit, err := os.ReadFile("../systemd/sniproxy.service")
	if err != nil {
		t.Fatal(err)
	}
	text := string(unit)
	for _, want := range []string{
		"Type=notify", "NotifyAccess=all", "PIDFile=", "ExecReload=/usr/local/bin/sniproxy reload",
		"ExecStartPre=/usr/local/bin/sniproxy check", "KillMode=mixed", "TimeoutStopSec=", "LimitNOFILE=",
		"AmbientCapabilities=CAP_NET_BIND_SERVICE", "SystemCallFilter=@system-service",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	if strings.Contains(text, "~@resources") {
		t.Error("unit filters @resources: the Go runtime calls setrlimit at start")
	}
	verifyUnit(t, strings.ReplaceAll(text, "/usr/local/bin/sniproxy", binary))
}

// verifyUnit runs systemd-analyze verify on a unit file with the given
// text, named sniproxy.service, and fails on any complaint about it.
func verifyUnit(t *testing.T, text string) {
	t.Helper()
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze is not installed; .ci/run installs systemd")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "sniproxy.service")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	// verify also lints units it pulls in from the host; only lines about
	// ours count.
	var ours []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "sniproxy.service") {
			ours = append(ours, line)
		}
	}
	if len(ours) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, strings.Join(ours, "\n"))
	}
	if err != nil && len(ours) == 0 {
		t.Logf("systemd-analyze exit %v for units other than ours:\n%s", err, out)
	}
}
