package process

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/backendtest"
	"github.com/sniproxy/sniproxy/internal/health"
	"github.com/sniproxy/sniproxy/ipc"
)

// fakeMaster is the master's end of a worker process running in-process
// (Run on a goroutine) over a real ipc pair: it reads every message the
// worker sends onto got, answering lease requests itself when autoGrant.
type fakeMaster struct {
	t    *testing.T
	conn *ipc.Conn
	addr string     // the worker's listener
	ran  chan error // Run's result
	got  chan received
}

// received is one message from the worker, with its files (the caller
// closes them).
type received struct {
	body  ipc.Body
	files []*os.File
}

// startProcess runs a worker process with one shared listening socket and
// config yaml (listeners added), and waits for it to be ready.
func startProcess(t *testing.T, yaml string, autoGrant bool) *fakeMaster {
	t.Helper()
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	wc, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	lf, err := ln.File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	m := &fakeMaster{t: t, conn: mc, addr: addr, ran: make(chan error, 1), got: make(chan received, 1000)}
	opts := Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Conn: wc, Files: []NamedFile{{Name: "shared/" + addr, File: lf}}}
	go func() { m.ran <- Run(opts) }()
	t.Cleanup(func() {
		// Stop now, for the tests that leave connections open.
		mc.SendBody(ipc.Stop{})
		mc.Close()
		select {
		case <-m.ran:
		case <-time.After(10 * time.Second):
			t.Error("worker process still running 10 s after the test")
		}
		wc.Close()
	})
	if _, ok := m.recv().body.(ipc.Hello); !ok {
		t.Fatal("no hello")
	}
	if err := mc.SendBody(ipc.Config{YAML: fmt.Appendf(nil, "listeners: [{address: %q}]\n%s", addr, yaml)}); err != nil {
		t.Fatal(err)
	}
	var empty health.Table
	tb, _ := empty.MarshalBinary()
	if err := mc.SendBody(ipc.Health{Table: tb}); err != nil {
		t.Fatal(err)
	}
	if _, ok := m.recv().body.(ipc.Ready); !ok {
		t.Fatal("no ready")
	}
	go m.read(autoGrant)
	return m
}

// recv reads one message directly (before read runs).
func (m *fakeMaster) recv() received {
	m.t.Helper()
	m.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer m.conn.SetReadDeadline(time.Time{})
	msg, err := m.conn.Recv()
	if err != nil {
		m.t.Fatal(err)
	}
	b, err := ipc.Decode(msg)
	if err != nil {
		m.t.Fatal(err)
	}
	return received{b, msg.Files}
}

// read passes every message on to got until the connection ends.
func (m *fakeMaster) read(autoGrant bool) {
	defer close(m.got)
	for {
		msg, err := m.conn.Recv()
		if err != nil {
			return
		}
		b, err := ipc.Decode(msg)
		if err != nil {
			msg.CloseFiles()
			return
		}
		if r, ok := b.(ipc.LeaseRequest); ok && autoGrant {
			m.conn.SendBody(ipc.LeaseGrant{N: r.Want})
		}
		m.got <- received{b, msg.Files}
	}
}

// send sends b to the worker.
func (m *fakeMaster) send(b ipc.Body, files ...*os.File) {
	m.t.Helper()
	if err := m.conn.SendBody(b, files...); err != nil {
		m.t.Fatal(err)
	}
}

// expect waits for the first message like want, skipping others; it
// returns it (with its files).
func expect[T ipc.Body](m *fakeMaster) (T, []*os.File) {
	m.t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case r, ok := <-m.got:
			if !ok {
				var zero T
				m.t.Fatalf("worker connection ended before a %T", zero)
			}
			if b, ok := r.body.(T); ok {
				return b, r.files
			}
			for _, f := range r.files {
				f.Close()
			}
		case <-timeout:
			var zero T
			m.t.Fatalf("no %T from the worker in 10 s", zero)
		}
	}
}

// exited waits for Run to return, within d.
func (m *fakeMaster) exited(d time.Duration) {
	m.t.Helper()
	select {
	case err := <-m.ran:
		if err != nil {
			m.t.Fatalf("Run: %v", err)
		}
		m.ran <- nil // for the cleanup
	case <-time.After(d):
		m.t.Fatalf("worker process still running %v later", d)
	}
}

// running reports whether Run has not returned.
func (m *fakeMaster) running() bool {
	select {
	case err := <-m.ran:
		m.ran <- err
		return false
	default:
		return true
	}
}

// echoBackend answers every line a connection sends with the same line,
// after the request head of an HTTP request.
func echoBackend(t *testing.T) string {
	t.Helper()
	return backendtest.AfterHead(t, func(c net.Conn, r *bufio.Reader) { io.Copy(c, r) })
}

// openEcho opens a connection through the worker to echo.test and checks
// a line comes back.
func openEcho(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, r, err := tryEcho(addr)
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	if err != nil {
		t.Fatal(err)
	}
	return c, r
}

// tryEcho is openEcho for any goroutine: the caller closes c, even with an
// error.
func tryEcho(addr string) (c net.Conn, r *bufio.Reader, err error) {
	c, err = net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: echo.test\r\n\r\nhello\n")
	r = bufio.NewReader(c)
	if got, err := r.ReadString('\n'); err != nil || got != "hello\n" {
		return c, nil, fmt.Errorf("first echo: %q, %v", got, err)
	}
	return c, r, nil
}

// echo sends line and expects it back.
func echo(t *testing.T, c net.Conn, r *bufio.Reader, line string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatalf("write %q: %v", line, err)
	}
	if got, err := r.ReadString('\n'); err != nil || got != line+"\n" {
		t.Fatalf("echo of %q: %q, %v", line, got, err)
	}
}

// expectEOF reads until c ends, which it must within 5 s.
func expectEOF(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection still open")
	}
}

// refused reports whether a connection to addr is refused or closed at
// once (nobody accepts any more).
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return true
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	return !errors.Is(err, os.ErrDeadlineExceeded)
}

func testConfig(backend, extra string) string {
	return fmt.Sprintf("timeouts: {connect: 2, client_hello: 2, idle: 30}\nmax_connections: 8\nworkers: 1\nshutdown_timeout: 30\nroutes: [{match: echo.test, backend: %q}]\n%s", backend, extra)
}

func TestProcessMoveWhileServing(t *testing.T) {
	// A hurry can reach a worker before its retire: it must still read
	// its master (here a lease grant a connection waits for) and exit.
	m := startProcess(t, testConfig("127.0.0.1:1", ""), false)
	c, err := net.Dial("tcp", m.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	expect[ipc.LeaseRequest](m)
	m.send(ipc.Move{})
	m.send(ipc.LeaseGrant{N: 1})
	expect[ipc.Stopped](m)
	m.exited(8 * time.Second)
	expectEOF(t, c)
}

func TestProcessLeaseGrant(t *testing.T) {
	// A connection waits for the master's grant, then is proxied.
	m := startProcess(t, testConfig(echoBackend(t), ""), false)
	done := make(chan error, 1)
	go func() {
		c, _, err := tryEcho(m.addr)
		if c != nil {
			defer c.Close()
		}
		done <- err
	}()
	req, _ := expect[ipc.LeaseRequest](m)
	if !req.Urgent || req.Want < 1 {
		t.Errorf("first request %+v; want an urgent one for at least 1", req)
	}
	select {
	case <-done:
		t.Fatal("connection proxied before the grant")
	case <-time.After(50 * time.Millisecond):
	}
	m.send(ipc.LeaseGrant{N: req.Want})
	if err := <-done; err != nil {
		t.Fatalf("after the grant: %v", err)
	}
	// The stats push reports it.
	var in uint64
	for in == 0 {
		s, _ := expect[ipc.Stats](m)
		in += s.Delta.BytesIn
	}
}

func TestProcessPingRevoke(t *testing.T) {
	m := startProcess(t, strings.Replace(testConfig(echoBackend(t), ""), "max_connections: 8", "max_connections: 64", 1), true)
	openEcho(t, m.addr)
	m.send(ipc.Ping{Seq: 7})
	if p, _ := expect[ipc.Pong](m); p.Seq != 7 {
		t.Errorf("pong %d; want 7", p.Seq)
	}
	// The grant was a block of 8 permits (max_connections 64, one
	// worker, 8 blocks); one is in use, so the 7 spares go back.
	m.send(ipc.Revoke{})
	if r, _ := expect[ipc.LeaseReturn](m); r.N != 7 {
		t.Errorf("revoke returned %d permits; want the 7 spares", r.N)
	}
}

func TestProcessRetire(t *testing.T) {
	// Retire without a deadline: stop accepting at once, say so, serve
	// the open connection until it ends, then exit.
	m := startProcess(t, testConfig(echoBackend(t), ""), true)
	c, r := openEcho(t, m.addr)
	m.send(ipc.Retire{})
	expect[ipc.Stopped](m)
	if !refused(m.addr) {
		t.Error("a retired worker still accepts")
	}
	echo(t, c, r, "while retiring")
	if !m.running() {
		t.Fatal("worker exited with a connection open")
	}
	c.Close()
	m.exited(5 * time.Second)
}

func TestProcessRetireDeadline(t *testing.T) {
	m := startProcess(t, testConfig(echoBackend(t), ""), true)
	c, _ := openEcho(t, m.addr)
	start := time.Now()
	m.send(ipc.Retire{Deadline: start.Add(300 * time.Millisecond)})
	expectEOF(t, c)
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("connection closed %v after the retire; want at the 300ms deadline", d)
	}
	m.exited(5 * time.Second)
}

func TestProcessStopWhileDraining(t *testing.T) {
	m := startProcess(t, testConfig(echoBackend(t), ""), true)
	c, _ := openEcho(t, m.addr)
	m.send(ipc.Retire{})
	expect[ipc.Stopped](m)
	m.send(ipc.Stop{})
	expectEOF(t, c)
	m.exited(5 * time.Second)
}

func TestProcessMoveWhileDraining(t *testing.T) {
	// Move after a retire: the proxied connection goes to the master
	// (a Connection with its two sockets), then the worker exits.
	m := startProcess(t, testConfig(echoBackend(t), ""), true)
	c, r := openEcho(t, m.addr)
	m.send(ipc.Retire{})
	expect[ipc.Stopped](m)
	m.send(ipc.Move{})
	conn, files := expect[ipc.Connection](m)
	if len(files) != 2 || len(conn.State) == 0 {
		t.Fatalf("Connection with %d files and %d bytes of state; want 2 and some", len(files), len(conn.State))
	}
	m.exited(5 * time.Second)
	// Resumed by a second worker process, the client goes on.
	m2 := startProcess(t, testConfig(echoBackend(t), ""), true)
	m2.send(conn, files...)
	for _, f := range files {
		f.Close()
	}
	echo(t, c, r, "after the move")
}

func TestProcessConnectionWhileDrainingClosed(t *testing.T) {
	// A moved connection that reaches a worker already retiring is closed,
	// not resumed.
	m := startProcess(t, testConfig(echoBackend(t), ""), true)
	open, _ := openEcho(t, m.addr) // keeps the worker draining
	m.send(ipc.Retire{})
	expect[ipc.Stopped](m)
	cl, peer := tcpPair(t)
	f1, f2 := file(t, cl), file(t, cl)
	m.send(ipc.Connection{State: []byte(`{}`)}, f1, f2)
	f1.Close()
	f2.Close()
	cl.Close()
	expectEOF(t, peer)
	if !m.running() {
		t.Fatal("worker exited with a connection open")
	}
	open.Close()
	m.exited(5 * time.Second)
}

func TestProcessMasterGone(t *testing.T) {
	// EOF on the lifeline: the worker stops accepting, drains within
	// shutdown_timeout and exits. A connection waiting for a grant when
	// the master goes gets a local permit and is served.
	m := startProcess(t, strings.Replace(testConfig(echoBackend(t), ""), "shutdown_timeout: 30", "shutdown_timeout: 0.5", 1), false)
	type opened struct {
		c   net.Conn
		err error
	}
	proxied := make(chan opened, 1)
	go func() {
		c, _, err := tryEcho(m.addr)
		proxied <- opened{c, err}
	}()
	expect[ipc.LeaseRequest](m)
	start := time.Now()
	m.conn.Close()
	o := <-proxied
	if o.c != nil {
		defer o.c.Close()
	}
	if o.err != nil {
		t.Fatalf("the connection waiting for a grant when the master went: %v", o.err)
	}
	expectEOF(t, o.c)
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Errorf("connection closed %v after the master went; want at shutdown_timeout (500ms)", d)
	}
	m.exited(5 * time.Second)
	if !refused(m.addr) {
		t.Error("listener still accepting")
	}
}

func TestProcessUnrequestedGrant(t *testing.T) {
	// A grant nobody asked for breaks the protocol: as with a lost
	// master, the worker drains on its own and exits.
	m := startProcess(t, strings.Replace(testConfig("127.0.0.1:1", ""), "shutdown_timeout: 30", "shutdown_timeout: 0.5", 1), false)
	m.send(ipc.LeaseGrant{N: 1})
	m.exited(5 * time.Second)
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
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

// file returns a duplicate of c's socket as a file.
func file(t *testing.T, c *net.TCPConn) *os.File {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestListenerAddress(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"shared/127.0.0.1:443", "127.0.0.1:443"},
		{"reuseport/[::1]:443/3", "[::1]:443"},
		{"reuseport/0.0.0.0:80/0", "0.0.0.0:80"},
		{"bogus", ""},
		{"reuseport/nothing", ""},
	} {
		got, err := listenerAddress(tc.name)
		if got != tc.want || (err != nil) != (tc.want == "") {
			t.Errorf("listenerAddress(%q) = %q, %v; want %q", tc.name, got, err, tc.want)
		}
	}
}

func TestProcsFor(t *testing.T) {
	for _, tc := range []struct{ cpus, workers, want int }{
		{2, 2, 2}, {8, 8, 2}, {8, 1, 9}, {2, 1, 3}, {8, 3, 4}, {2, 3, 2}, {1, 4, 2}, {4, 0, 5},
	} {
		if got := procsFor(tc.cpus, tc.workers); got != tc.want {
			t.Errorf("procsFor(%d cpus, %d workers) = %d; want %d", tc.cpus, tc.workers, got, tc.want)
		}
	}
}
