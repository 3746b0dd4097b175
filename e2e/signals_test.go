package e2e

import (
	"net"
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

// TestSilentClientsCannotTakeTheBudget: with a small max_connections,
// clients that connect and send nothing once held every permit until
// client_hello (the sniff share had a floor of 16 per worker). Now those
// past the share that have sent nothing for a while give their permits to
// newcomers, on the worker the newcomer reached or, through the master's
// revoke, on another.
func TestSilentClientsCannotTakeTheBudget(t *testing.T) {
	echo := echoBackend(t)
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echo) + "max_connections: 8\n"
	cfg = strings.Replace(cfg, "client_hello: 3", "client_hello: 10", 1)
	p := startProxy(t, cfg)
	p.workers(t, 2)
	var silent []net.Conn
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	for range 8 {
		c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	// Every permit is taken: a newcomer now is refused.
	p.waitMetric(t, "sniproxy_connections_active", 8)
	time.Sleep(2500 * time.Millisecond) // deliberate: the silent ones become slow (evicted after 2s)
	for i := range 2 {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatalf("client %d with 8 silent ones holding every permit: %v", i+1, err)
		}
		c.Close()
	}
	if n := len(p.logLines("evicted connections with no complete hello to free their permits")); n == 0 {
		t.Error("no eviction logged")
	}
}
