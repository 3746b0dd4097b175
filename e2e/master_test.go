package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// children returns the PIDs of pid's child processes.
func children(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		cpid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces; cut after ')'.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) && f[0] != "Z" {
			out = append(out, cpid)
		}
	}
	return out
}

// procState returns the state letter of pid from /proc, or "".
func procState(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

// alive reports whether pid is a live (not zombie) process.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z"
}

// workers waits until the master has n worker children and returns them.
func (p *proxyProc) workers(t *testing.T, n int) []int {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		kids := children(t, p.cmd.Process.Pid)
		if len(kids) == n {
			return kids
		}
		if time.Now().After(deadline) {
			t.Fatalf("master has %d children %v; want %d", len(kids), kids, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoBackend echoes every connection until EOF.
func echoBackend(t *testing.T) string {
	return rawBackend(t, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

// openEcho connects through the proxy with an HTTP request for host and
// waits until the echo of the request comes back: the connection reached
// a backend.
func openEcho(proxy, host string, wait time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", proxy, 5*time.Second)
	if err != nil {
		return nil, err
	}
	req := "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		c.Close()
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, len(req))
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return nil, err
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

const masterConfig = baseConfig + `
allowlist: ["localhost"]
routes: [{match: "echo.test", backend: "ECHO"}]
`

func TestTwoWorkersBothServe(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	if kids := p.workers(t, 2); len(kids) != 2 {
		t.Fatalf("workers %v", kids)
	}
	for range 40 {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="http"}`, 40)
	// Each access-log line is written when its connection ends, which can
	// come after the count.
	waitFor(t, "40 access-log lines", func() bool { return len(p.logLines("connection")) >= 40 })
	slots := map[float64]int{}
	for _, rec := range p.logLines("connection") {
		if w, ok := rec["worker"].(float64); ok {
			slots[w]++
		}
	}
	if len(slots) != 2 {
		t.Errorf("connections served by worker slots %v; want both slots", slots)
	}
}

// killQueued stops one worker, queues connections on its socket, kills it,
// and returns how many of the queued connections failed and how many were
// queued.
func killQueued(t *testing.T, p *proxyProc) (failed, queued int) {
	t.Helper()
	kids := p.workers(t, 2)
	victim := kids[0]
	syscall.Kill(victim, syscall.SIGSTOP)
	// Signals arrive asynchronously: until the worker is really stopped it
	// may still accept, and what it accepts dies with it (allowed, but not
	// what this measures).
	for deadline := time.Now().Add(5 * time.Second); procState(victim) != "T"; {
		if time.Now().After(deadline) {
			t.Fatalf("worker %d not stopped 5s after SIGSTOP (state %q)", victim, procState(victim))
		}
		time.Sleep(time.Millisecond)
	}
	const n = 24
	type res struct {
		early bool
		err   error
	}
	results := make(chan res, n)
	start := time.Now()
	for range n {
		go func() {
			c, err := openEcho(p.addr, "echo.test", 15*time.Second)
			if c != nil {
				c.Close()
			}
			results <- res{early: time.Since(start) < 500*time.Millisecond, err: err}
		}()
	}
	// Deliberate: the connections to the stopped worker wait in its queue
	// for a second (the kernel queues them; nothing outside can see it).
	time.Sleep(time.Second)
	syscall.Kill(victim, syscall.SIGKILL)
	killed := time.Now()
	for {
		kids := children(t, p.cmd.Process.Pid)
		if len(kids) == 2 && kids[0] != victim && kids[1] != victim {
			t.Logf("replacement worker running %v after the kill", time.Since(killed))
			break
		}
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("no replacement worker 10s after the kill: %v", kids)
		}
		time.Sleep(2 * time.Millisecond)
	}
	for range n {
		r := <-results
		if !r.early {
			queued++
		}
		if r.err != nil {
			failed++
			t.Logf("connection failed: %v", r.err)
		}
	}
	return failed, queued
}

func TestKillWorkerQueuedConnectionsSurvive(t *testing.T) {
	echo := echoBackend(t)
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echo))
	before := p.metric(t, `sniproxy_worker_restarts_total`)

	// Load alongside: short connections in a loop; only connections the
	// dead worker had accepted may fail, never more than the concurrency.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var loadOK, loadFailed int
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 10000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c, err := openEcho(p.addr, "echo.test", 15*time.Second)
				mu.Lock()
				if err != nil {
					loadFailed++
				} else {
					loadOK++
					c.Close()
				}
				mu.Unlock()
			}
		}()
	}

	failed, queued := killQueued(t, p)
	close(stop)
	wg.Wait()
	t.Logf("queued on the killed worker: %d, failed: %d; load: %d ok, %d failed", queued, failed, loadOK, loadFailed)
	if queued == 0 {
		t.Fatal("no connection was queued on the stopped worker; the test proved nothing")
	}
	if failed != 0 {
		t.Errorf("%d of %d connections queued on the killed worker's socket failed; want 0", failed, queued)
	}
	if loadFailed > 4 {
		t.Errorf("%d load connections failed; at most the 4 in flight on the dead worker may", loadFailed)
	}
	p.waitMetric(t, `sniproxy_worker_restarts_total`, before+1)
	p.workers(t, 2)
	if c, err := openEcho(p.addr, "echo.test", 5*time.Second); err != nil {
		t.Errorf("routing after the restart: %v", err)
	} else {
		c.Close()
	}
}

func TestKillWorkerNegativeControl(t *testing.T) {
	// With the test-only switch the master shuts the dead worker's socket
	// down, as closing it would: the queued connections must now fail, or
	// the zero in the test above means nothing.
	p := startProxyEnv(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)), "SNIPROXYTEST_REPLACE_DEAD_SOCKETS=1")
	failed, queued := killQueued(t, p)
	t.Logf("negative control: queued %d, failed %d", queued, failed)
	if failed == 0 {
		t.Errorf("no connection failed with the socket shut down under its queue; the positive test cannot fail")
	}
}

func TestKillMasterWorkersExit(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	kids := p.workers(t, 2)
	p.cmd.Process.Kill()
	<-p.done
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range kids {
		for alive(pid) {
			if time.Now().After(deadline) {
				syscall.Kill(pid, syscall.SIGKILL)
				t.Fatalf("worker %d still alive 10s after kill -9 of its master", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func TestMaxConnectionsAcrossWorkers(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"max_connections: 10\n")
	p.workers(t, 2)
	held, errs := openMany(p.addr, 20)
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	if refused := len(errs); len(held) != 10 || refused != 10 {
		t.Errorf("%d connections reached the backend, %d refused; want exactly 10 and 10", len(held), refused)
	}
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="limit"}`, 10)
	p.waitMetric(t, `sniproxy_connections_active`, 10)
	for _, c := range held {
		c.Close()
	}
	held = nil
	p.waitMetric(t, `sniproxy_connections_active`, 0)
	for range 10 {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatalf("after closing, a new connection failed: %v", err)
		}
		held = append(held, c)
	}
}

func TestCountersExactAndMonotonic(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	var in int
	const conns = 30
	for i := range conns {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		req := fmt.Sprintf("POST /%d HTTP/1.1\r\nHost: echo.test\r\n\r\n%s", i, bytes.Repeat([]byte("x"), i*100))
		c.Write([]byte(req))
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(b) != req {
			t.Fatalf("echo %d: %d bytes, %v", i, len(b), err)
		}
		in += len(req)
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="http"}`, conns)
	p.waitMetric(t, `sniproxy_bytes_total{direction="in"}`, float64(in))
	p.waitMetric(t, `sniproxy_bytes_total{direction="out"}`, float64(in))

	// Kill a worker: what it counted stays counted.
	kids := p.workers(t, 2)
	syscall.Kill(kids[0], syscall.SIGKILL)
	p.waitMetric(t, `sniproxy_worker_restarts_total`, 1)
	for _, series := range []string{`sniproxy_connections_total{protocol="http"}`, `sniproxy_bytes_total{direction="in"}`} {
		want := float64(conns)
		if strings.Contains(series, "bytes") {
			want = float64(in)
		}
		if got := p.metric(t, series); got != want {
			t.Errorf("%s = %v after a worker kill; want %v", series, got, want)
		}
	}
}

func TestGracefulStop(t *testing.T) {
	t.Run("drains a live connection", func(t *testing.T) {
		p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
		kids := p.workers(t, 2)
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		p.cmd.Process.Signal(syscall.SIGTERM)
		// New connections are refused while draining...
		waitRefused(t, p.addr)
		// ...and the live one is still proxied.
		c.Write([]byte("more"))
		buf := make([]byte, 4)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "more" {
			t.Fatalf("connection broken while draining: %q, %v", buf, err)
		}
		c.Close()
		start := time.Now()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Fatal("master did not exit after the last connection closed")
		}
		if p.err != nil {
			t.Errorf("exit: %v; want status 0", p.err)
		}
		t.Logf("exited %v after the last connection closed", time.Since(start))
		for _, pid := range kids {
			if alive(pid) {
				t.Errorf("worker %d outlived its master", pid)
			}
		}
	})

	t.Run("closes at shutdown_timeout", func(t *testing.T) {
		cfg := strings.Replace(strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)), "shutdown_timeout: 5", "shutdown_timeout: 2", 1)
		p := startProxy(t, cfg)
		kids := p.workers(t, 2)
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		p.cmd.Process.Signal(syscall.SIGTERM)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		closedAfter := time.Since(start)
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("connection not closed by the drain deadline: %v", err)
		}
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Fatal("master did not exit")
		}
		exited := time.Since(start)
		if closedAfter < 1500*time.Millisecond || exited > 6*time.Second {
			t.Errorf("connection closed after %v, master exited after %v; want both about 2s", closedAfter, exited)
		}
		if p.err != nil {
			t.Errorf("exit: %v; want status 0", p.err)
		}
		for _, pid := range kids {
			if alive(pid) {
				t.Errorf("worker %d outlived its master", pid)
			}
		}
	})
}

// openMany opens n echo connections through proxy at once; it returns
// those that reached the backend and the errors of the others.
func openMany(proxy string, n int) ([]net.Conn, []error) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var held []net.Conn
	var errs []error
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := openEcho(proxy, "echo.test", 5*time.Second)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			held = append(held, c)
		}()
	}
	wg.Wait()
	return held, errs
}

func TestLimitSparePermitsComeBack(t *testing.T) {
	// A worker keeps a few spare permits when its connections close; at
	// the limit, a sibling that needs one gets it back (Revoke) instead
	// of refusing. Rounds of exactly max_connections connections, spread
	// over the workers however the kernel likes, must all get through.
	var live atomic.Int64
	echo := rawBackend(t, func(c net.Conn) {
		live.Add(1)
		defer live.Add(-1)
		io.Copy(c, c)
	})
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echo)+"max_connections: 6\n")
	p.workers(t, 2)
	for round := range 20 {
		held, errs := openMany(p.addr, 6)
		for _, c := range held {
			c.Close()
		}
		if len(errs) > 0 {
			t.Fatalf("round %d: %d of 6 connections refused under max_connections 6: %v", round, len(errs), errs[0])
		}
		// The round is over once the proxy has closed every backend
		// connection (it releases the permit right after), not when
		// /metrics says so: it lags by up to a stats interval.
		deadline := time.Now().Add(5 * time.Second)
		for live.Load() > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: %d backend connections still open", round, live.Load())
			}
			time.Sleep(time.Millisecond)
		}
		// The worker returns the permit right after it closed the backend
		// connection; nothing outside the process shows that moment
		// (/metrics lags a stats interval), so allow it 20 ms.
		time.Sleep(20 * time.Millisecond)
	}
}
