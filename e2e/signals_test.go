package e2e

import (
	"net/http"
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

// TestHealthzDuringStop: from the moment a stop begins /healthz answers
// 503, so a load balancer stops sending, while the metrics stay served
// until the drain is over.
func TestHealthzDuringStop(t *testing.T) {
	echo := echoBackend(t)
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echo))
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string) int {
		resp, err := http.Get("http://" + p.metrics + path)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get("/healthz"); code != 200 {
		t.Fatalf("/healthz before the stop: %d", code)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	// The held connection keeps the drain going (shutdown_timeout 5s).
	deadline := time.Now().Add(5 * time.Second)
	for get("/healthz") != 503 {
		if time.Now().After(deadline) {
			t.Fatal("/healthz still not 503 5s after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code := get("/metrics"); code != 200 {
		t.Errorf("/metrics while draining: %d; want 200", code)
	}
	c.Close()
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("the master did not exit after its last connection closed")
	}
}
