package worker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
)

// strictLimiter is a Limiter that fails the test on a Release without an
// Acquire, and counts both.
type strictLimiter struct {
	t   *testing.T
	max int

	mu                 sync.Mutex
	acquired, released int
}

func (l *strictLimiter) Acquire() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.acquired-l.released >= l.max {
		return false
	}
	l.acquired++
	return true
}

func (l *strictLimiter) Release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.released++
	if l.released > l.acquired {
		l.t.Errorf("permit released %d times, acquired %d", l.released, l.acquired)
	}
}

func (l *strictLimiter) counts() (acquired, released int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acquired, l.released
}

// accessLog collects the attributes of every access-log line.
type accessLog struct {
	mu    sync.Mutex
	lines []map[string]string
}

func (h *accessLog) Enabled(context.Context, slog.Level) bool { return true }
func (h *accessLog) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *accessLog) WithGroup(string) slog.Handler            { return h }

func (h *accessLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "connection" {
		return nil
	}
	m := map[string]string{"level": r.Level.String()}
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	h.mu.Lock()
	h.lines = append(h.lines, m)
	h.mu.Unlock()
	return nil
}

func (h *accessLog) get() []map[string]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]map[string]string(nil), h.lines...)
}

// phaseServer runs a Server on one loopback listener with config body
// (listener options lopts), a strictLimiter of max permits and an
// accessLog. prep, if not nil, may change the server before it serves.
func phaseServer(t *testing.T, body, lopts string, max int, prep func(*Server)) (*Server, string, *stats.Counters, *strictLimiter, *accessLog) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	yaml := fmt.Sprintf("listeners: [{address: %q%s}]\ntimeouts: {connect: 2, client_hello: 0.3, idle: 30}\n%s", addr, lopts, body)
	cfg, err := config.Parse([]byte(yaml), []string{})
	if err != nil {
		t.Fatal(err)
	}
	var counters stats.Counters
	lim := &strictLimiter{t: t, max: max}
	logs := &accessLog{}
	srv, err := New(cfg, slog.New(logs), &counters, lim)
	if err != nil {
		t.Fatal(err)
	}
	if prep != nil {
		prep(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ctx, []Listener{{Config: cfg.Listeners[0], Ln: ln}})
	}()
	t.Cleanup(func() {
		cancel()
		<-served
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer dcancel()
		srv.Drain(dctx)
	})
	return srv, addr, &counters, lim, logs
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestPhaseResults sends one connection through each way the serve path
// can end and checks what the access log and the counters say, and that
// whatever the connection held was given back exactly once.
func TestPhaseResults(t *testing.T) {
	echo := echoBackend(t)
	refusing := closedPort(t)
	routes := fmt.Sprintf("routes: [{match: echo.test, backend: %q}, {match: down.test, backend: %q}]\ndenylist: [bad.test]\n", echo, refusing)
	httpReq := func(host string) string { return "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n" }
	for _, tc := range []struct {
		name     string
		lopts    string
		permits  int
		send     string // "" sends nothing: the client stays silent
		result   string
		err      string // a part of the logged err; "" for none
		reject   stats.Reason
		rejected bool
		proto    stats.Protocol
		level    string
		acquired int
	}{
		{name: "admit/limit", permits: 0, send: httpReq("echo.test"), result: "limit", err: "max_connections reached",
			reject: stats.Limit, rejected: true, proto: stats.ProtoUnknown, level: "INFO"},
		{name: "sniff/no PROXY header", lopts: ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1]", permits: 1, send: httpReq("echo.test"),
			result: "proxy_header", err: "PROXY", reject: stats.ProxyHeader, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 1},
		{name: "sniff/PROXY header timeout", lopts: ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1]", permits: 1,
			result: "proxy_header", err: "PROXY header", reject: stats.ProxyHeader, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 1},
		{name: "admit/PROXY header from an untrusted source", lopts: ", accept_proxy_protocol: true, trusted_proxies: [192.0.2.0/24]", permits: 1,
			send:   "PROXY TCP4 198.51.100.1 127.0.0.1 5555 443\r\n" + httpReq("echo.test"),
			result: "proxy_header", err: "not in trusted_proxies", reject: stats.ProxyHeader, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 0},
		{name: "admit/untrusted source at the limit", lopts: ", accept_proxy_protocol: true, trusted_proxies: [192.0.2.0/24]", permits: 0,
			send:   "PROXY TCP4 198.51.100.1 127.0.0.1 5555 443\r\n" + httpReq("echo.test"),
			result: "proxy_header", err: "not in trusted_proxies", reject: stats.ProxyHeader, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 0},
		{name: "sniff/garbage", permits: 1, send: "\x00\x01\x02 no protocol\r\n\r\n", result: "sniff_error", err: "000102",
			reject: stats.SniffError, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 1},
		{name: "sniff/timeout", permits: 1, send: "GET / HTTP/1.1\r\n", result: "sniff_timeout", err: "timeout",
			reject: stats.SniffTimeout, rejected: true, proto: stats.ProtoUnknown, level: "INFO", acquired: 1},
		{name: "route/denied", permits: 1, send: httpReq("bad.test"), result: "denied", err: "denylist",
			reject: stats.Denied, rejected: true, proto: stats.ProtoHTTP, level: "INFO", acquired: 1},
		{name: "route/no name", permits: 1, send: "GET / HTTP/1.0\r\n\r\n", result: "no_route", err: "no name",
			reject: stats.NoRoute, rejected: true, proto: stats.ProtoHTTP, level: "INFO", acquired: 1},
		{name: "dial/refused", permits: 1, send: httpReq("down.test"), result: "dial_error", err: "refused",
			reject: stats.DialError, rejected: true, proto: stats.ProtoHTTP, level: "WARN", acquired: 1},
		{name: "copy/ok", permits: 1, send: httpReq("echo.test") + "line\n", result: "ok",
			proto: stats.ProtoHTTP, level: "INFO", acquired: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, addr, counters, lim, logs := phaseServer(t, routes, tc.lopts, tc.permits, nil)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.send != "" {
				io.WriteString(c, tc.send)
			}
			if tc.result == "ok" {
				c.(*net.TCPConn).CloseWrite()
			}
			// Every end closes the client's socket.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("client: %v; want the connection closed", err)
			}
			waitFor(t, "the connection to end", func() bool { return len(logs.get()) > 0 && srv.Active() == 0 })

			lines := logs.get()
			if len(lines) != 1 {
				t.Fatalf("%d access-log lines; want 1: %v", len(lines), lines)
			}
			l := lines[0]
			if l["result"] != tc.result || l["level"] != tc.level {
				t.Errorf("logged result %q at %s; want %q at %s", l["result"], l["level"], tc.result, tc.level)
			}
			if !strings.Contains(l["err"], tc.err) || (tc.err == "") != (l["err"] == "") {
				t.Errorf("logged err %q; want one containing %q", l["err"], tc.err)
			}
			s := counters.Snapshot()
			var wantRejected [stats.NumReasons]uint64
			if tc.rejected {
				wantRejected[tc.reject] = 1
			}
			var wantConns [stats.NumProtocols]uint64
			wantConns[tc.proto] = 1
			if s.Rejected != wantRejected || s.Conns != wantConns || s.Active != 0 {
				t.Errorf("counted rejected %v, conns %v, active %d; want %v, %v, 0", s.Rejected, s.Conns, s.Active, wantRejected, wantConns)
			}
			if acq, rel := lim.counts(); acq != tc.acquired || rel != acq {
				t.Errorf("permits acquired %d, released %d; want %d both", acq, rel, tc.acquired)
			}
			if n := srv.sniffing.Load(); n != 0 {
				t.Errorf("%d sniff slots still taken", n)
			}
		})
	}
}

// tcpConns returns both ends of a loopback TCP connection.
func tcpConns(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); a.Close() })
	return d, a
}

// isClosed reports whether c was closed here.
func isClosed(c *net.TCPConn) bool {
	return errors.Is(c.SetDeadline(time.Time{}), net.ErrClosed)
}

// newPath returns a path for a connection accepted by srv whose client end
// (the proxy's side) is client, admitted with a permit of lim.
func newPath(t *testing.T, srv *Server, lim *strictLimiter, client *net.TCPConn) *path {
	t.Helper()
	c := &conn{srv: srv, id: 1, client: client, lcfg: &srv.cfg.Listeners[0], start: time.Now(),
		peer: client.RemoteAddr().(*net.TCPAddr).AddrPort()}
	srv.rec.Opened()
	srv.track(c)
	p := &path{c: c}
	if r := p.admit(); r.end != endNext {
		t.Fatalf("admit: %v", r)
	}
	return p
}

// TestPhaseEnds covers the ends the table above cannot reach from outside:
// a drain closing a connection while it dials, sniffs or reads a PROXY
// header, and a backend failing the replay. Each closes both sockets and
// gives back the permit once.
func TestPhaseEnds(t *testing.T) {
	echo := echoBackend(t)
	t.Run("closed while dialling", func(t *testing.T) {
		srv, _, counters, lim, logs := phaseServer(t, fmt.Sprintf("routes: [{match: echo.test, backend: %q}]\n", echo), "", 1, nil)
		client, _ := tcpConns(t)
		p := newPath(t, srv, lim, client)
		p.c.o.res.Name = "echo.test"
		if r := p.route(); r.end != endNext {
			t.Fatalf("route: %v", r)
		}
		p.c.close() // as Drain does at its deadline
		r := p.dial()
		if r.String() != "closed" {
			t.Fatalf("dial after close: %q; want closed", r)
		}
		p.end(r)
		if !isClosed(client) || p.c.backend != nil {
			t.Error("client socket open, or the backend kept")
		}
		checkEnded(t, srv, counters, lim, logs, "closed")
	})
	// A drain deadline or a move closing a connection before its first
	// bytes are read ends it "closed", as the event loop does: not a
	// sniff_error or proxy_header rejection, which the client did not
	// cause.
	for _, tc := range []struct {
		name, lopts, input string
		step               func(*path) result
	}{
		{"closed while sniffing", "", "GET / HTTP/1.1\r\nHost: ec", // not a whole request yet
			(*path).sniff},
		{"closed while reading a PROXY header", ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.0/8]", "PROXY TCP4 192.0.2.1 ",
			func(p *path) result { _, r := p.readProxy(); return r }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, _, counters, lim, logs := phaseServer(t, "", tc.lopts, 1, nil)
			peer, client := tcpConns(t)
			p := newPath(t, srv, lim, client)
			io.WriteString(peer, tc.input)
			time.AfterFunc(50*time.Millisecond, p.c.close) // as Drain does at its deadline
			r := tc.step(p)
			p.end(r) // first: the cleanup waits for every tracked connection to end
			if r.String() != "closed" || !errors.Is(r.err, errClosedSniffing) {
				t.Errorf("closed meanwhile: %q (%v); want closed", r, r.err)
			}
			checkEnded(t, srv, counters, lim, logs, "closed")
		})
	}
	t.Run("replay to a closed backend", func(t *testing.T) {
		srv, _, counters, lim, logs := phaseServer(t, "", "", 1, nil)
		peer, client := tcpConns(t)
		backend, _ := tcpConns(t)
		p := newPath(t, srv, lim, client)
		io.WriteString(peer, "GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n")
		if r := p.sniff(); r.end != endNext {
			t.Fatalf("sniff: %v", r)
		}
		if !p.c.setBackend(backend) {
			t.Fatal("setBackend refused")
		}
		backend.Close() // writes now fail
		r := p.replay()
		if r.end != endBackendError {
			t.Fatalf("replay: %q; want backend_error", r)
		}
		p.end(r)
		if !isClosed(client) {
			t.Error("client socket open")
		}
		checkEnded(t, srv, counters, lim, logs, "backend_error")
	})
}

// checkEnded checks a connection ended with result, its permit given back
// once and one access-log line.
func checkEnded(t *testing.T, srv *Server, counters *stats.Counters, lim *strictLimiter, logs *accessLog, result string) {
	t.Helper()
	if acq, rel := lim.counts(); acq != 1 || rel != 1 {
		t.Errorf("permits acquired %d, released %d; want 1 each", acq, rel)
	}
	if n := srv.sniffing.Load(); n != 0 {
		t.Errorf("%d sniff slots still taken", n)
	}
	if srv.Active() != 0 || counters.Active() != 0 {
		t.Errorf("active %d, counted %d; want 0", srv.Active(), counters.Active())
	}
	lines := logs.get()
	if len(lines) != 1 || lines[0]["result"] != result {
		t.Errorf("access log %v; want one line with result %s", lines, result)
	}
	s := counters.Snapshot()
	if s.Rejected != [stats.NumReasons]uint64{} {
		t.Errorf("rejected %v; want none", s.Rejected)
	}
}

// TestCopyResult checks how a pair's end maps to the access log's result.
func TestCopyResult(t *testing.T) {
	for _, tc := range []struct {
		err    error
		result string
		logged bool // the error is logged
		level  slog.Level
	}{
		{nil, "ok", false, slog.LevelInfo},
		{proxy.ErrDetached, "moved", false, slog.LevelDebug},
		{fmt.Errorf("x: %w", errDeadline), "deadline", true, slog.LevelInfo},
		{proxy.ErrIdle, "idle", true, slog.LevelInfo},
		{&net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, "reset", true, slog.LevelInfo},
		{fmt.Errorf("write: %w", syscall.EPIPE), "reset", true, slog.LevelInfo},
		{syscall.ENOTCONN, "reset", true, slog.LevelInfo},
		{errors.New("something else"), "error", true, slog.LevelWarn},
	} {
		r := copyResult(tc.err)
		if r.String() != tc.result || (r.err != nil) != tc.logged || r.level() != tc.level {
			t.Errorf("copyResult(%v) = %q (err %v) at %v; want %q (logged %v) at %v", tc.err, r, r.err, r.level(), tc.result, tc.logged, tc.level)
		}
	}
	// Rejections log their reason.
	for r := range stats.NumReasons {
		if got := rejected(r, nil).String(); got != r.String() {
			t.Errorf("rejected(%v) logs %q", r, got)
		}
	}
	if got := routeReason(fmt.Errorf("x: %w", route.ErrPrivate)); got != stats.Denied {
		t.Errorf("routeReason(ErrPrivate) = %v; want denied", got)
	}
}

// smallWindow returns a backend listener with a small window and a small
// MSS, serving each connection with serve: the proxy's socket to it then
// starts with a small send buffer too (Linux sizes it from the MSS;
// loopback's 64 KiB MSS would buffer a whole hello), so its writes soon
// come back short when serve does not read.
func smallWindow(t *testing.T, serve func(net.Conn)) net.Listener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024)
			if serr == nil {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
			}
		})
		return serr
	}}
	bln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bln.Close() })
	go func() {
		for {
			c, err := bln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return bln
}

// neverReads returns a smallWindow backend whose connections are held,
// never read, until the test ends.
func neverReads(t *testing.T) net.Listener {
	return smallWindow(t, func(net.Conn) { <-t.Context().Done() })
}

// A backend that accepts and never reads cannot hold a connection: the
// replay of a large ClientHello blocks once the socket buffers are full,
// and the idle timeout ends it (it held the connection for ever before).
func TestReplayToBackendThatNeverReads(t *testing.T) {
	bln := neverReads(t)
	// Idle is 30s in phaseServer's config; a shorter one for this test.
	_, addr, counters, lim, logs := phaseServer(t, fmt.Sprintf("routes: [{match: stuck.test, backend: %q}]\n", bln.Addr()), "", 10,
		func(s *Server) { s.cfg.Timeouts.Idle = time.Second })

	client, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// A ClientHello of about 60 KiB: a long ALPN list.
	var protos []string
	for i := range 235 {
		protos = append(protos, fmt.Sprintf("%0250d", i))
	}
	go tls.Client(client, &tls.Config{ServerName: "stuck.test", NextProtos: protos, InsecureSkipVerify: true}).Handshake()
	client.SetReadDeadline(time.Now().Add(15 * time.Second))
	start := time.Now()
	_, err = io.Copy(io.Discard, client)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the connection to a backend that never reads was still open after 15s")
	}
	waitFor(t, "access log", func() bool { return len(logs.get()) == 1 })
	l := logs.get()[0]
	if l["result"] != "idle" {
		t.Errorf("result %q (err %q); want idle", l["result"], l["err"])
	}
	// What the backend took before it stopped reading is in the log as in
	// the counters.
	if in := counters.Snapshot().BytesIn; in == 0 || fmt.Sprint(l["bytes_in"]) != fmt.Sprint(in) {
		t.Errorf("log bytes_in %v, counters %d; want the same, not 0", l["bytes_in"], in)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("closed after %v; want about the idle timeout (1s)", d)
	}
	waitFor(t, "permit released", func() bool { a, r := lim.counts(); return a == 1 && r == 1 })
	if a := counters.Active(); a != 0 {
		t.Errorf("active %d after the close; want 0", a)
	}
}
