package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/backendtest"
	"github.com/sniproxy/sniproxy/internal/stats"
)

// testServer runs a Server on one loopback listener with the config body
// (YAML, without listen_addrs) and returns its address and counters.
type testServer struct {
	srv      *Server
	addr     string
	counters *stats.Counters
	cancel   context.CancelFunc
	served   chan struct{} // closed when Serve returns
}

func startServer(t *testing.T, body string, lim Limiter, lopts string) *testServer {
	t.Helper()
	return startServerWith(t, body, lim, lopts, nil)
}

// startServerWith is startServer with prep run on the Server before it
// serves.
func startServerWith(t testing.TB, body string, lim Limiter, lopts string, prep func(*Server)) *testServer {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return startServerOn(t, ln, body, lim, lopts, prep)
}

// startServerOn is startServerWith on the listener ln, which it takes
// over.
func startServerOn(t testing.TB, ln *net.TCPListener, body string, lim Limiter, lopts string, prep func(*Server)) *testServer {
	t.Helper()
	addr := ln.Addr().String()
	yaml := fmt.Sprintf("listeners: [{address: %q%s}]\ntimeouts: {connect: 2, client_hello: 2, idle: 30}\n%s", addr, lopts, body)
	cfg, err := config.Parse([]byte(yaml), []string{})
	if err != nil {
		t.Fatal(err)
	}
	var counters stats.Counters
	srv, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), &counters, lim)
	if err != nil {
		t.Fatal(err)
	}
	// The event loop, as worker processes run it (tests of the
	// goroutine path turn it off in prep; TestMain gives it its P).
	srv.EventLoop = true
	if prep != nil {
		prep(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{srv: srv, addr: addr, counters: &counters, cancel: cancel, served: make(chan struct{})}
	go func() {
		defer close(ts.served)
		if err := srv.Serve(ctx, []Listener{{Config: cfg.Listeners[0], Ln: ln}}); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-ts.served
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer dcancel()
		srv.Drain(dctx)
	})
	return ts
}

// holdBackend accepts connections, reports the first line of each on got,
// and keeps them open until the test ends.
func holdBackend(t *testing.T) (string, chan string) {
	t.Helper()
	got := make(chan string, 100)
	addr := backendtest.Serve(t, func(c net.Conn) {
		line, _ := bufio.NewReader(c).ReadString('\n')
		got <- line
		<-t.Context().Done()
	})
	return addr, got
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func dialHTTP(t *testing.T, addr, host string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", host)
	return c
}

func TestLimit(t *testing.T) {
	backend, got := holdBackend(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), NewLocalLimiter(2), "")
	c1 := dialHTTP(t, ts.addr, "a.test")
	dialHTTP(t, ts.addr, "a.test")
	for range 2 {
		select {
		case <-got:
		case <-time.After(10 * time.Second):
			t.Fatal("held connection did not reach the backend")
		}
	}
	over := dialHTTP(t, ts.addr, "a.test")
	over.SetReadDeadline(time.Now().Add(5 * time.Second))
	// Closed at once: EOF, or a reset since the request was never read.
	if n, err := over.Read(make([]byte, 1)); n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("third connection: read %d, %v; want it closed at once", n, err)
	}
	waitFor(t, "rejected{limit}", func() bool { return ts.counters.Snapshot().Rejected[stats.Limit] == 1 })

	// A permit comes back when a connection ends (a reset ends both
	// directions; a FIN alone would leave the backend's direction open).
	c1.(*net.TCPConn).SetLinger(0)
	c1.Close()
	waitFor(t, "permit returned", func() bool { return ts.srv.Active() == 1 })
	dialHTTP(t, ts.addr, "a.test")
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("connection after a permit came back did not reach the backend")
	}
}

func TestProxyProtocolInAndOut(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type seen struct {
		hdr  *proxyproto.Header
		rest string
		err  error
	}
	got := make(chan seen, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		rest, _ := io.ReadAll(br)
		got <- seen{h, string(rest), err}
	}()
	ts := startServer(t, fmt.Sprintf("routes: [{match: pp.test, backend: %q}]\nbackend: {proxy_protocol: v2}\n", ln.Addr()), nil, ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1]")

	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// 192.0.2.1 is only a value in the header; nothing dials it.
	req := "GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n"
	fmt.Fprintf(c, "PROXY TCP4 192.0.2.1 127.0.0.1 5555 443\r\n%s", req)
	c.(*net.TCPConn).CloseWrite()
	select {
	case s := <-got:
		if s.err != nil {
			t.Fatalf("backend: %v", s.err)
		}
		if s.hdr.Version != 2 || s.hdr.SourceAddr.String() != "192.0.2.1:5555" {
			t.Errorf("backend got PROXY v%d from %v; want v2 from 192.0.2.1:5555", s.hdr.Version, s.hdr.SourceAddr)
		}
		if s.rest != req {
			t.Errorf("backend got %q after the header; want the request unchanged", s.rest)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend got nothing")
	}
}

func TestProxyProtocolMissing(t *testing.T) {
	ts := startServer(t, "routes: [{match: pp.test, backend: \"127.0.0.1:1\"}]\n", nil, ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1]")
	c := dialHTTP(t, ts.addr, "pp.test")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Error("got bytes back")
	}
	waitFor(t, "rejected{proxy_header}", func() bool { return ts.counters.Snapshot().Rejected[stats.ProxyHeader] == 1 })
}

func TestDrainClosesAtDeadline(t *testing.T) {
	backend, got := holdBackend(t)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), nil, "")
	c := dialHTTP(t, ts.addr, "a.test")
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("no backend connection")
	}
	ts.cancel()
	<-ts.served
	if _, err := net.DialTimeout("tcp", ts.addr, time.Second); err == nil {
		t.Error("listener still accepting after Serve returned")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if n := ts.srv.Drain(ctx); n != 1 {
		t.Errorf("Drain closed %d connections; want 1", n)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("client connection still open after drain deadline")
	}
	if a := ts.counters.Active(); a != 0 {
		t.Errorf("active = %d after drain; want 0", a)
	}
}

func TestCountersMatchTraffic(t *testing.T) {
	backend := backendtest.Serve(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		c.Write([]byte(strings.ToUpper(string(b))))
	})
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\nallowlist: [a.test]\n", backend), nil, "")
	var in, out int
	for i := range 5 {
		req := fmt.Sprintf("GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n", i)
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(req))
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		c.Close()
		if string(b) != strings.ToUpper(req) {
			t.Fatalf("got %q", b)
		}
		in += len(req)
		out += len(b)
	}
	// One refused: not allowlisted.
	dialHTTP(t, ts.addr, "b.test")
	waitFor(t, "counters", func() bool {
		s := ts.counters.Snapshot()
		return s.Active == 0 && s.Rejected[stats.Denied] == 1 && s.Conns[2] == 6
	})
	s := ts.counters.Snapshot()
	if s.BytesIn != uint64(in) || s.BytesOut != uint64(out) || s.ConnectCount != 5 {
		t.Errorf("bytes in %d out %d connects %d; want %d %d 5", s.BytesIn, s.BytesOut, s.ConnectCount, in, out)
	}
}

// The sniff share under pressure: young connections are never refused for
// the phase (a burst), but once their permits are all taken, those past
// the share that have sent no hello for evictAfter give their permits to
// newcomers; within the share they are left alone.
func TestSniffShareUnderPressure(t *testing.T) {
	// max_connections 8 over 1 worker: a share of 6; client_hello 2s, so
	// a connection is evicted after 1s.
	ts := startServer(t, "workers: 1\nmax_connections: 8\n", NewLocalLimiter(8), "")
	if got := ts.srv.sniffLimit; got != 6 {
		t.Fatalf("sniff share %d; want 6", got)
	}
	var silent []net.Conn
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	for range 8 {
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	// A burst past the share is let in: every permit is taken.
	waitFor(t, "8 sniffing", func() bool { return ts.srv.sniffing.Load() == 8 })
	// A 9th now: nobody is slow yet, so the limit refuses it.
	c9, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c9.Close()
	waitFor(t, "rejected{limit}", func() bool { return ts.counters.Snapshot().Rejected[stats.Limit] == 1 })

	time.Sleep(1100 * time.Millisecond) // deliberate: the silent ones become slow
	// Now a newcomer takes the permit of the oldest slow one past the
	// share; then a second; a third finds the share reached and is
	// refused.
	if got := ts.srv.stealSniffers(1, false); got != 1 {
		t.Fatalf("stealSniffers: %d; want 1", got)
	}
	ts.srv.limiter.Release() // as admit would have used it
	if got := ts.srv.EvictSlowSniffers(); got != 1 {
		t.Errorf("EvictSlowSniffers: %d; want the 1 left past the share", got)
	}
	if got := ts.srv.EvictSlowSniffers(); got != 0 {
		t.Errorf("EvictSlowSniffers within the share: %d; want 0", got)
	}
	if got := ts.srv.sniffing.Load(); got != 6 {
		t.Errorf("%d sniffing after the evictions; want the share, 6", got)
	}
	waitFor(t, "2 evictions counted as sniff_timeout", func() bool { return ts.counters.Snapshot().Rejected[stats.SniffTimeout] >= 2 })
	// The 2 permits came back: 2 new connections get in (and are
	// sniffed, which only an admitted connection is).
	for range 2 {
		dialHTTP(t, ts.addr, "nowhere.test")
	}
	waitFor(t, "2 newcomers sniffed", func() bool { return ts.counters.Snapshot().Conns[stats.ProtoHTTP] == 2 })
	if got := ts.counters.Snapshot().Rejected[stats.Limit]; got != 1 {
		t.Errorf("rejected{limit} %d after the evictions; want still 1", got)
	}
}
