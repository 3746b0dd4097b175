package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestQuitStopsGracefully: QUIT is nginx's graceful stop, and here the same
// as TERM: exit 0 after draining, and no Go stack dump (Go's default for
// SIGQUIT) in the log.
func TestQuitStopsGracefully(t *testing.T) {
	p := startProxy(t, `
listen_addrs: ["LISTEN"]
workers: 2
metrics: {address: "METRICS"}
control_socket: "CTLSOCK"
`)
	kids := p.workers(t, 2)
	if err := p.stop(syscall.SIGQUIT, 20*time.Second); err != nil {
		t.Errorf("exit after QUIT: %v; want status 0", err)
	}
	logs := p.logs.String()
	for _, bad := range []string{"goroutine ", "SIGQUIT: quit", "PC="} {
		if strings.Contains(logs, bad) {
			t.Errorf("log after QUIT contains %q (a stack dump):\n%s", bad, logs)
		}
	}
	if len(p.logLines("sniproxy stopped")) != 1 {
		t.Errorf("no graceful stop in the log:\n%s", logs)
	}
	waitAllGone(t, 10*time.Second, kids...)
}
