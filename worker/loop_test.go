package worker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/backendtest"
	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// TestMain runs the package's tests with at least 2 Ps, as worker
// processes run (procsFor): the event loop holds one while it waits, and
// every test server runs one, so on a 1-CPU machine too.
func TestMain(m *testing.M) {
	if runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2)
	}
	os.Exit(m.Run())
}

// loopOf returns ts's event loop.
func loopOf(t *testing.T, ts *testServer) *loop {
	t.Helper()
	var l *loop
	waitFor(t, "the event loop", func() bool { // Serve runs on its goroutine
		ts.srv.mu.Lock()
		defer ts.srv.mu.Unlock()
		l = ts.srv.loop
		return l != nil
	})
	return l
}

// upperBackend answers everything a client sends, upper-cased, once the
// client has half-closed.
func upperBackend(t *testing.T) string {
	return backendtest.Serve(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		c.Write(bytes.ToUpper(b))
	})
}

// request sends req, half-closes, and returns all the answer.
func request(t *testing.T, addr, req string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(req))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

// Short connections are served from accept to close in the loop, with the
// counts and the half-closes of the goroutine path.
func TestLoopServesShortConnections(t *testing.T) {
	backend := upperBackend(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), NewLocalLimiter(100), "")
	l := loopOf(t, ts)
	in, out := 0, 0
	for i := range 20 {
		req := fmt.Sprintf("GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n", i)
		if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
			t.Fatalf("answer %q", got)
		}
		in += len(req)
		out += len(req)
	}
	waitFor(t, "the connections to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	s := ts.counters.Snapshot()
	if s.BytesIn != uint64(in) || s.BytesOut != uint64(out) || s.ConnectCount != 20 {
		t.Errorf("bytes in %d out %d connects %d; want %d %d 20", s.BytesIn, s.BytesOut, s.ConnectCount, in, out)
	}
	if a, e := l.accepted.Load(), l.ended.Load(); a != 20 || e != 20 {
		t.Errorf("loop accepted %d and ended %d; want 20 and 20", a, e)
	}
	if g, p := l.toGoroutines.Load(), l.toPairs.Load(); g != 0 || p != 0 {
		t.Errorf("handed %d to goroutines and %d to pairs; want none", g, p)
	}
}

// A listening socket shared by the workers (reuseport: false) wakes one
// idle loop per connection, not every one: without EPOLLEXCLUSIVE every
// connection woke all eight loops here, seven of them for nothing (the
// kernel finds the connection taken and puts them back to sleep, unseen
// but for the thread's context switches). With eight workers under
// proxybench that was 10.8 context switches per connection instead of
// 4.1 (bench/README.md).
func TestLoopSharedListenerWakesOneLoop(t *testing.T) {
	const loops, n = 8, 40
	// Each loop holds a P while it waits; the clients and the backend
	// need theirs.
	procs := runtime.GOMAXPROCS(max(loops+2, runtime.GOMAXPROCS(0)))
	t.Cleanup(func() { runtime.GOMAXPROCS(procs) })
	backend := upperBackend(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend)
	var ts []*testServer
	var ls []*loop
	for range loops {
		f, err := ln.File()
		if err != nil {
			t.Fatal(err)
		}
		dup, err := net.FileListener(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, startServerOn(t, dup.(*net.TCPListener), body, nil, "", nil))
		ls = append(ls, loopOf(t, ts[len(ts)-1]))
	}
	ln.Close()
	active := func() (a int64) {
		for _, s := range ts {
			a += s.counters.Snapshot().Active
		}
		return a
	}
	// switches is the context switches of the loops' threads so far.
	switches := func() (sum int) {
		for _, l := range ls {
			var tid int32
			waitFor(t, "the loop's thread", func() bool { tid = l.tid.Load(); return tid != 0 })
			b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/status", tid))
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
					x, _ := strconv.Atoi(strings.TrimSpace(v))
					sum += x
				}
			}
		}
		return sum
	}
	// The loops' raw waits end after loopQuiet with no event; then they
	// wait through the scheduler, and stay asleep until woken.
	time.Sleep(3 * loopQuiet)
	before := switches()
	for i := range n {
		req := fmt.Sprintf("GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n", i)
		if got := request(t, ts[0].addr, req); got != strings.ToUpper(req) {
			t.Fatalf("answer %q", got)
		}
		// Every loop idle again before the next one comes.
		waitFor(t, "the connection to end", func() bool { return active() == 0 })
	}
	woken := switches() - before
	var accepted []int64
	var sum int64
	for _, l := range ls {
		accepted = append(accepted, l.accepted.Load())
		sum += l.accepted.Load()
	}
	t.Logf("accepted %v; the loops' threads switched %d times for %d connections", accepted, woken, n)
	if sum != n {
		t.Fatalf("the loops accepted %d; want %d", sum, n)
	}
	// The loop that serves one wakes about four times for it (accept,
	// the backend's connect, its answer, the ends); every other loop
	// woken adds one. Measured: 4–4.7 per connection, and 12–15 without
	// EPOLLEXCLUSIVE.
	if woken > 8*n {
		t.Errorf("the loops' threads switched %d times for %d connections; want at most %d: idle loops are woken for connections another takes", woken, n, 8*n)
	}
}

// A connection still open after loopRelayFor goes to its pair and goes on
// there; one that streams goes to its pair at the first full buffer.
func TestLoopHandsLongAndBulkToPair(t *testing.T) {
	backend := backendtest.Echo(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "")
	l := loopOf(t, ts)

	c := dialHTTP(t, ts.addr, "a.test")
	head := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	buf := make([]byte, len(head))
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != head {
		t.Fatalf("echo of the head: %q, %v", buf, err)
	}
	waitFor(t, "the hand-off to the pair", func() bool { return l.toPairs.Load() == 1 })
	for i := range 3 {
		msg := fmt.Sprintf("after the hand-off %d\n", i)
		c.Write([]byte(msg))
		b := make([]byte, len(msg))
		if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
			t.Fatalf("echo %d: %q, %v", i, b, err)
		}
	}

	// Bulk: 4 MiB each way through the echo, checked by hash.
	c2 := dialHTTP(t, ts.addr, "a.test")
	c2.SetDeadline(time.Now().Add(20 * time.Second))
	data := bytes.Repeat([]byte("0123456789abcdef"), 4<<20/16)
	go func() {
		c2.Write(data)
		c2.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c2)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte(head), data...)
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatalf("bulk echo: %d bytes, not what was sent (%d)", len(got), len(want))
	}
	if p := l.toPairs.Load(); p != 2 {
		t.Errorf("%d connections handed to pairs; want 2", p)
	}
	// Once handed on, a connection no longer wakes the loop (its sockets
	// left the loop's epoll set): a few events of the same batch at most,
	// not one per chunk of the 8 MiB.
	if n := l.stale.Load(); n > 8 {
		t.Errorf("the loop was woken %d times for connections it had handed on", n)
	}
}

// A pool of addresses and a route that sends a PROXY header are served in
// the loop: the header names the client and the address it connected to,
// and only the client's bytes are counted, as in the goroutine path.
func TestLoopPoolsAndProxyHeaders(t *testing.T) {
	backend := upperBackend(t)
	ts := startServer(t, fmt.Sprintf(`routes:
  - {match: pool.test, backends: [{address: %q}]}
  - {match: header.test, backend: %q, proxy_protocol: v1}
`, backend, backend), nil, "")
	l := loopOf(t, ts)
	req := "GET / HTTP/1.1\r\nHost: pool.test\r\n\r\n"
	if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
		t.Fatalf("pool: %q", got)
	}
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req2 := "GET / HTTP/1.1\r\nHost: header.test\r\n\r\n"
	c.Write([]byte(req2))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	la, ra := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
	header := fmt.Sprintf("PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n", la.Port, ra.Port)
	if got := string(b); got != strings.ToUpper(header+req2) {
		t.Fatalf("proxy header route: %q; want %q", got, strings.ToUpper(header+req2))
	}
	waitFor(t, "the connections to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	st := ts.counters.Snapshot()
	if want := uint64(len(req) + len(req2)); st.BytesIn != want {
		t.Errorf("bytes in %d; want %d (the header not counted)", st.BytesIn, want)
	}
	if g, e := l.toGoroutines.Load(), l.ended.Load(); g != 0 || e != 2 {
		t.Errorf("handed %d to goroutines, ended %d in the loop; want 0 and 2", g, e)
	}
}

// Refusals and failures in the loop end as in the goroutine path: counted
// by reason, the client closed.
func TestLoopRejects(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	ts := startServer(t, fmt.Sprintf("routes: [{match: dead.test, backend: %q}]\ndenylist: [denied.test]\n", deadAddr), nil, "")
	l := loopOf(t, ts)
	for _, host := range []string{"dead.test", "denied.test", "none.test"} {
		if got := request(t, ts.addr, "GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); got != "" {
			t.Errorf("%s: answered %q", host, got)
		}
	}
	if got := request(t, ts.addr, "\x00\x01 not a protocol\r\n\r\n"); got != "" {
		t.Errorf("garbage: answered %q", got)
	}
	waitFor(t, "the refusals", func() bool { return ts.counters.Snapshot().Active == 0 })
	s := ts.counters.Snapshot()
	for reason, want := range map[stats.Reason]uint64{stats.DialError: 1, stats.Denied: 1, stats.NoRoute: 1, stats.SniffError: 1} {
		if s.Rejected[reason] != want {
			t.Errorf("rejected %v = %d; want %d", reason, s.Rejected[reason], want)
		}
	}
	// none.test goes to DNS routing, whose look-up is a goroutine's.
	if e, g := l.ended.Load(), l.toGoroutines.Load(); e+g != 4 || e < 3 {
		t.Errorf("the loop ended %d and handed %d on; want 4 in all, 3 ended", e, g)
	}
}

// A silent client is closed at timeouts.client_hello, counted
// sniff_timeout; a drain closes one still sniffing at its deadline.
func TestLoopSniffTimeoutAndDrain(t *testing.T) {
	ts := startServer(t, "", nil, "")
	loopOf(t, ts)
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes from a proxy that should close", n)
	}
	if d := time.Since(start); d < 1500*time.Millisecond || d > 6*time.Second {
		t.Errorf("closed after %v; want timeouts.client_hello (2s)", d)
	}
	waitFor(t, "sniff_timeout", func() bool { return ts.counters.Snapshot().Rejected[stats.SniffTimeout] == 1 })

	c2, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.Write([]byte("GET / HTTP/1.1\r\n")) // no end of head
	waitFor(t, "the connection", func() bool { return ts.counters.Snapshot().Active == 1 })
	ts.cancel()
	<-ts.served
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if n := ts.srv.Drain(ctx); n != 1 {
		t.Errorf("Drain closed %d; want 1", n)
	}
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c2.Read(make([]byte, 1)); err == nil {
		t.Error("still open after the drain")
	}
}

// The goroutine path still serves everything when there is no loop.
func TestGoroutinePathWithoutLoop(t *testing.T) {
	backend := upperBackend(t)
	ts := startServerWith(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "", func(s *Server) { s.EventLoop = false })
	req := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
		t.Fatalf("answer %q", got)
	}
	ts.srv.mu.Lock()
	defer ts.srv.mu.Unlock()
	if ts.srv.loop != nil {
		t.Error("a loop without EventLoop")
	}
}

// A pool of addresses is dialled in the loop as DialPool dials it: a dead
// backend is passed over for the next (the client sees nothing), every
// attempt is reported for passive health, and the backend reached counts
// the connection until it ends. With every backend dead: dial_error.
func TestLoopPoolFailover(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	dead2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead2Addr := dead2.Addr().String()
	dead2.Close()
	live := upperBackend(t)
	ts := startServer(t, fmt.Sprintf(`routes:
  - {match: a.test, balance: round_robin, backends: [%q, %q]}
  - {match: b.test, backends: [%q, %q]}
`, deadAddr, live, deadAddr, dead2Addr), nil, "")
	l := loopOf(t, ts)
	for i := range 6 {
		req := fmt.Sprintf("GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n", i)
		if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
			t.Fatalf("request %d: %q", i, got)
		}
	}
	if got := request(t, ts.addr, "GET / HTTP/1.1\r\nHost: b.test\r\n\r\n"); got != "" {
		t.Fatalf("b.test (every backend dead) answered %q", got)
	}
	waitFor(t, "the connections to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	if g := l.toGoroutines.Load(); g != 0 {
		t.Errorf("%d handed to goroutines; want none", g)
	}
	if r := ts.counters.Snapshot().Rejected[stats.DialError]; r != 1 {
		t.Errorf("dial_error %d; want 1", r)
	}
	ok, failed := map[string]uint64{}, map[string]uint64{}
	for _, run := range ts.srv.TakeDialRuns() {
		if run.OK {
			ok[run.Key] += uint64(run.Count)
		} else {
			failed[run.Key] += uint64(run.Count)
			if run.Reason != "connection refused" {
				t.Errorf("failure reason %q; want connection refused", run.Reason)
			}
		}
	}
	var okSum, failedSum uint64
	for _, n := range ok {
		okSum += n
	}
	for _, n := range failed {
		failedSum += n
	}
	// round_robin starts on the dead one every other time: 3 failovers,
	// then b.test's 2 failures.
	if okSum != 6 || failedSum != 5 {
		t.Errorf("reported %d successes and %d failures (%v, %v); want 6 and 5", okSum, failedSum, ok, failed)
	}
	counts := ts.srv.BackendCounts()
	for _, c := range counts {
		want := uint64(0)
		if c.Route == "a.test" && c.Backend == live {
			want = 6
		}
		if c.Connections != want || c.Active != 0 {
			t.Errorf("backend %s of %s: %d connections, %d active; want %d, 0", c.Backend, c.Route, c.Connections, c.Active, want)
		}
	}
}

// Per-client limits in the loop: a client permit its lease holds is taken
// there; a client the master has to be asked about goes to a goroutine
// (Acquire); a client the master refused a moment ago is refused in the
// loop, counted per_ip_limit, closed at once.
func TestLoopPerIPLimits(t *testing.T) {
	backend := upperBackend(t)
	lim := perip.Limits{Conns: 64}
	table := perip.NewTable(lim, 100, nil)
	ts := startServerWith(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "",
		func(s *Server) { s.PerIP = perip.NewClient(tableTransport{table}, lim, 64, 1, nil) })
	l := loopOf(t, ts)
	req := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	for i := range 10 {
		if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
			t.Fatalf("request %d: %q", i, got)
		}
	}
	waitFor(t, "the connections to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	// The first asks the master (a lease of 32); the others are the loop's.
	if g, e := l.toGoroutines.Load(), l.ended.Load(); g != 0 || e != 9 {
		t.Errorf("handed %d to goroutines and ended %d in the loop; want 0 and 9 (and 1 served from the start by a goroutine)", g, e)
	}

	// A client refused by the master: the first refusal is a goroutine's
	// (Acquire asks), the next are the loop's own.
	lim1 := perip.Limits{Conns: 1}
	table1 := perip.NewTable(lim1, 100, nil)
	backend2, got := holdBackend(t)
	ts1 := startServerWith(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend2), nil, "",
		func(s *Server) { s.PerIP = perip.NewClient(tableTransport{table1}, lim1, 64, 1, nil) })
	l1 := loopOf(t, ts1)
	dialHTTP(t, ts1.addr, "a.test")
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the first connection did not reach the backend")
	}
	for i := range 3 {
		c := dialHTTP(t, ts1.addr, "a.test")
		if err := closedAtOnce(c); err != nil {
			t.Fatalf("connection %d over the limit: %v", i+2, err)
		}
	}
	waitFor(t, "3 refusals", func() bool { return ts1.counters.Snapshot().Rejected[stats.PerIPLimit] == 3 })
	if e := l1.ended.Load(); e < 2 {
		t.Errorf("the loop ended %d refusals itself; want at least 2", e)
	}
}

// A listener with accept_proxy_protocol is the loop's too: the header
// (whole, or split from the hello) names the client, the bytes after it
// are the hello; an untrusted source, a missing header are refused at once,
// counted proxy_header.
func TestLoopProxyProtocolIn(t *testing.T) {
	backend := upperBackend(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}, {match: h.test, backend: %q, proxy_protocol: v1}]\n", backend, backend), nil, `, accept_proxy_protocol: true, trusted_proxies: ["127.0.0.1"]`)
	l := loopOf(t, ts)
	header := "PROXY TCP4 192.0.2.9 127.0.0.1 1234 443\r\n"
	req := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	if got := request(t, ts.addr, header+req); got != strings.ToUpper(req) {
		t.Fatalf("header and hello in one write: %q", got)
	}
	// The header sent on names the client and the address the balancer
	// said it connected to, not this socket's.
	hreq := "GET / HTTP/1.1\r\nHost: h.test\r\n\r\n"
	if got := request(t, ts.addr, header+hreq); got != strings.ToUpper(header+hreq) {
		t.Fatalf("PROXY header on: %q; want %q", got, strings.ToUpper(header+hreq))
	}
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(header[:10]))
	time.Sleep(20 * time.Millisecond)
	c.Write([]byte(header[10:]))
	time.Sleep(20 * time.Millisecond)
	c.Write([]byte(req))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); err != nil || string(b) != strings.ToUpper(req) {
		t.Fatalf("header and hello apart: %q, %v", b, err)
	}
	refused := func(addr, what string) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte(what))
		if err := closedAtOnce(c); err != nil {
			t.Fatalf("%q: %v", what, err)
		}
	}
	refused(ts.addr, req) // no header
	waitFor(t, "the connections to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	if r := ts.counters.Snapshot().Rejected[stats.ProxyHeader]; r != 1 {
		t.Errorf("proxy_header %d; want 1", r)
	}
	if e, g := l.ended.Load(), l.toGoroutines.Load(); e != 4 || g != 0 {
		t.Errorf("ended %d in the loop, %d to goroutines; want 4 and 0", e, g)
	}

	untrusted := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), NewLocalLimiter(10), `, accept_proxy_protocol: true, trusted_proxies: ["127.0.0.2"]`)
	loopOf(t, untrusted)
	refused(untrusted.addr, header+req)
	waitFor(t, "the refusal", func() bool { return untrusted.counters.Snapshot().Rejected[stats.ProxyHeader] == 1 })
}

// spareless is a limiter that never has a permit spare for the loop, so
// that every connection goes on to a goroutine's Acquire.
type spareless struct{ *LocalLimiter }

func (spareless) AcquireSpare() bool { return false }

// A client admitted under its limits by the loop keeps that admission when
// the global permit sends it on to a goroutine: one rate token per
// connection, not two.
func TestLoopPerIPKeptAcrossHandOff(t *testing.T) {
	backend := upperBackend(t)
	lim := perip.Limits{Rate: 4} // a burst of 4
	table := perip.NewTable(lim, 100, nil)
	client := perip.NewClient(tableTransport{table}, lim, 64, 1, nil)
	ts := startServerWith(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), spareless{NewLocalLimiter(100)}, "",
		func(s *Server) { s.PerIP = client })
	loopOf(t, ts)
	req := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	for i := range 4 {
		if got := request(t, ts.addr, req); got != strings.ToUpper(req) {
			t.Fatalf("connection %d of a burst of 4: %q (refused: %d per_ip_limit)", i+1, got, ts.counters.Snapshot().Rejected[stats.PerIPLimit])
		}
	}
}

// An established connection the loop hands to its pair while the worker
// is out of descriptors goes on: the hand-off's duplicates come from the
// loop's reserve (it was ended, "hand-off: too many open files", before).
func TestLoopHandOffOutOfFds(t *testing.T) {
	backend := backendtest.Echo(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "")
	l := loopOf(t, ts)
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	var held []*os.File
	release := func() {
		for _, f := range held {
			f.Close()
		}
		held = nil
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)
	}
	defer release()
	// squeeze takes every descriptor the soft limit allows.
	squeeze := func() {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		lim := old
		lim.Cur = uint64(len(ents) + 64)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
		for range 1000 {
			f, err := os.Open(os.DevNull)
			if err != nil {
				break
			}
			held = append(held, f)
		}
	}
	head := "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	for attempt := 1; ; attempt++ {
		pairs, ended := l.toPairs.Load(), l.ended.Load()
		c := dialHTTP(t, ts.addr, "a.test")
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, len(head))); err != nil {
			t.Fatal(err)
		}
		// Within loopRelayFor of the echo, the squeeze; the hand-off
		// comes due while it lasts.
		squeeze()
		if l.toPairs.Load() != pairs {
			// Handed on before the squeeze (a slow machine): again.
			release()
			c.Close()
			if attempt == 5 {
				t.Fatal("the loop handed the connection on before the squeeze, 5 times")
			}
			continue
		}
		deadline := time.Now().Add(10 * time.Second)
		for l.toPairs.Load() == pairs && l.ended.Load() == ended && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond)
		release()
		if p, e := l.toPairs.Load()-pairs, l.ended.Load()-ended; p != 1 || e != 0 {
			t.Fatalf("out of fds: %d handed to a pair, %d ended in the loop; want 1 and 0", p, e)
		}
		if _, err := c.Write([]byte("after\n")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 6)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "after\n" {
			t.Fatalf("echo after the squeeze: %q, %v", b, err)
		}
		break
	}
	if n := len(l.reserve); n != loopReserve {
		t.Errorf("reserve %d after the hand-off; want %d", n, loopReserve)
	}
}

// What a peer does not take at once is written by a goroutine bounded by
// the idle timeout: a backend that never reads cannot hold a connection
// the loop handed on with bytes pending.
func TestLoopPendingWriteHasDeadline(t *testing.T) {
	bln := neverReads(t)
	ts := startServerWith(t, fmt.Sprintf("routes: [{match: stuck.test, backend: %q}]\n", bln.Addr()), nil, "",
		func(s *Server) { s.cfg.Timeouts.Idle = time.Second })
	l := loopOf(t, ts)
	c := dialHTTP(t, ts.addr, "stuck.test")
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		// Chunks smaller than the loop's buffer, so that it relays them
		// itself until the backend's socket stops taking them.
		chunk := bytes.Repeat([]byte("x"), 8000)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	start := time.Now()
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection to a backend that never reads was still open after %v", time.Since(start).Round(time.Millisecond))
	}
	if p := l.toPairs.Load(); p != 1 {
		t.Errorf("handed %d connections to a pair; want 1", p)
	}
	waitFor(t, "the connection to end", func() bool { return ts.counters.Snapshot().Active == 0 })
}

// Sockets the loop accepts have TCP_NODELAY, as Go's accepted sockets
// do, though the loop no longer sets it on each: they inherit it from the
// listener.
func TestLoopClientNoDelay(t *testing.T) {
	ts := startServer(t, "routes: [{match: a.test, backend: \"127.0.0.1:1\"}]\n", nil, "")
	loopOf(t, ts)
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.1\r\n")) // half a request: it stays in the sniff phase
	fd := -1
	waitFor(t, "the connection in the loop", func() bool {
		ts.srv.mu.Lock()
		defer ts.srv.mu.Unlock()
		for c := range ts.srv.conns {
			c.mu.Lock()
			if c.lc != nil {
				fd = c.lc.cfd
			}
			c.mu.Unlock()
		}
		return fd >= 0
	})
	v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	if err != nil || v == 0 {
		t.Errorf("client socket TCP_NODELAY %d, %v; want set", v, err)
	}
}

// dialWrite connects to addr, sends b and returns the connection, with a
// 10 s deadline both ways; it is closed when the test ends.
func dialWrite(t *testing.T, addr string, b []byte) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	return c
}

// bigHelloPrefix returns the first n bytes of a ClientHello of about 60
// KB (a padding extension, no name), in records of 16 KiB.
func bigHelloPrefix(n int) []byte {
	return bigHelloSNI("", 60000)[:n]
}

// bigHelloSNI returns a ClientHello of about size bytes (at most 65,000:
// one extensions block) for name (an SNI extension, none if name is
// empty, and padding), in records of 16 KiB.
func bigHelloSNI(name string, size int) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...)
	body = append(body, 0, 0, 2, 0x13, 0x01, 1, 0)
	var sni []byte
	if name != "" {
		sni = []byte{0, 0, 0, byte(len(name) + 5), 0, byte(len(name) + 3), 0, 0, byte(len(name))}
		sni = append(sni, name...)
	}
	extLen := size - len(body) - 2
	padLen := extLen - len(sni) - 4
	body = append(body, byte(extLen>>8), byte(extLen))
	body = append(body, sni...)
	body = append(body, 0, 21, byte(padLen>>8), byte(padLen))
	body = append(body, make([]byte, padLen)...)
	msg := append([]byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	var out []byte
	for len(msg) > 0 {
		k := min(len(msg), 16384)
		out = append(out, 0x16, 3, 1, byte(k>>8), byte(k))
		out = append(out, msg[:k]...)
		msg = msg[k:]
	}
	return out
}

// The buffers of connections still sniffing hold at most 16 KiB each
// beyond the worker's budget: clients that stall half-way through large
// hellos are refused (sniff_error) once it is spent, in the loop and on
// the goroutine path, and it is whole again once they are gone.
func TestSniffBudgetBoundsMemory(t *testing.T) {
	for _, loopOn := range []bool{true, false} {
		t.Run(fmt.Sprint("loop=", loopOn), func(t *testing.T) {
			budget := sniff.NewBudget(100 << 10)
			ts := startServerWith(t, "routes: [{match: big.test, backend: \"127.0.0.1:1\"}]\n", NewLocalLimiter(100), "", func(s *Server) {
				s.EventLoop = loopOn
				s.sniffBudget = budget
				s.cfg.Timeouts.ClientHello = 30 * time.Second
			})
			if loopOn {
				loopOf(t, ts)
			}
			// 40,000 bytes of the hello each: a 64 KiB buffer, 48 KiB of
			// it from the budget; two fit in 100 KiB.
			hello := bigHelloPrefix(40000)
			var cs []net.Conn
			for i := range 4 {
				c := dialWrite(t, ts.addr, hello)
				cs = append(cs, c)
				if i < 2 {
					waitFor(t, fmt.Sprintf("client %d's buffer", i+1), func() bool { return budget.Used() == int64(i+1)*48<<10 })
				} else {
					waitFor(t, fmt.Sprintf("client %d refused", i+1), func() bool { return ts.counters.Snapshot().Rejected[stats.SniffError] == uint64(i-1) })
					if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
						t.Errorf("client %d over the budget: read %v; want closed", i+1, err)
					}
				}
			}
			if u := budget.Used(); u != 96<<10 {
				t.Errorf("budget used %d with two large hellos held; want %d", u, 96<<10)
			}
			if a := ts.counters.Snapshot().Active; a != 2 {
				t.Errorf("%d connections active; want the 2 within the budget", a)
			}
			cs[0].Close()
			cs[1].Close()
			waitFor(t, "the budget back", func() bool { return budget.Used() == 0 && ts.counters.Snapshot().Active == 0 })
		})
	}
}

// BenchmarkShortConnection: one short connection through a worker's
// Server (connect, an HTTP request, the backend's 2-byte answer, close), as
// the event loop serves it and as goroutines do. Client and backend run in
// the same process: the difference between the two in cpu-ns/op (user +
// system time of the whole process) and in allocations is the proxy's.
// Run it with more Ps than the default on a small machine: the loop holds
// one while it waits, which client and backend would otherwise lack (a
// worker process has its own); the proxy as a whole is measured by
// bench/proxybench.
//
//	go test -run XXX -bench ShortConnection -benchmem -cpu 4 ./worker/
func BenchmarkShortConnection(b *testing.B) {
	for _, mode := range []string{"loop", "goroutines"} {
		b.Run(mode, func(b *testing.B) {
			backend := backendtest.Serve(b, func(c net.Conn) {
				buf := make([]byte, 512)
				if _, err := c.Read(buf); err == nil {
					c.Write([]byte("ok"))
				}
			})
			ts := startServerWith(b, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "",
				func(s *Server) { s.EventLoop = mode == "loop" })
			req := []byte("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
			buf := make([]byte, 16)
			b.ReportAllocs()
			// CPU time of the whole process per connection: wall time
			// says little here, where the loop holds one of the
			// process's Ps that client and backend would use.
			cpu0 := processCPU(b)
			defer func() { b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op") }()
			for b.Loop() {
				c, err := net.Dial("tcp", ts.addr)
				if err != nil {
					b.Fatal(err)
				}
				c.Write(req)
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := io.ReadFull(c, buf[:2]); err != nil || string(buf[:n]) != "ok" {
					b.Fatalf("answer %q, %v", buf[:n], err)
				}
				c.Close()
			}
		})
	}
}

// processCPU returns the user and system time this process has used.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
