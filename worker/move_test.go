package worker

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/backendtest"
	"github.com/sniproxy/sniproxy/internal/dupfd"
)

// echoBackend answers each connection's HTTP request head with "hello",
// then echoes every line.
func echoBackend(t *testing.T) string {
	return backendtest.AfterHead(t, func(c net.Conn, r *bufio.Reader) {
		io.WriteString(c, "hello\n")
		io.Copy(c, r)
	})
}

// floodBackend writes without end to every connection once it has read
// the request head.
func floodBackend(t *testing.T) string {
	return backendtest.AfterHead(t, func(c net.Conn, _ *bufio.Reader) {
		buf := make([]byte, 1<<16)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
}

// stalled returns a condition for waitFor: true once the count has moved
// and then stayed the same for 100 ms.
func stalled(count func() uint64) func() bool {
	var last uint64
	var since time.Time
	return func() bool {
		n := count()
		if n == 0 || n != last {
			last, since = n, time.Now()
			return false
		}
		return time.Since(since) >= 100*time.Millisecond
	}
}

// echoLine sends line and expects it back.
func echoLine(t *testing.T, r *bufio.Reader, c net.Conn, line string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatalf("write %q: %v", line, err)
	}
	got, err := r.ReadString('\n')
	if err != nil || got != line+"\n" {
		t.Fatalf("echo of %q: %q, %v", line, got, err)
	}
}

// stop ends a test server's accepting, as a drain does.
func (ts *testServer) stop() {
	ts.cancel()
	<-ts.served
}

func TestMoveResumesConnections(t *testing.T) {
	backend := echoBackend(t)
	routes := fmt.Sprintf("routes: [{match: echo.test, backend: %q}]\n", backend)
	a := startServer(t, routes, nil, "")
	lim := NewLocalLimiter(1)
	b := startServer(t, routes, lim, "")
	c := startServer(t, routes, nil, "")

	conn := dialHTTP(t, a.addr, "echo.test")
	r := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if hello, err := r.ReadString('\n'); err != nil || hello != "hello\n" {
		t.Fatalf("first answer %q, %v", hello, err)
	}
	echoLine(t, r, conn, "one")
	// A client still silent (sniff phase) cannot be moved: it is closed.
	silent, err := net.Dial("tcp", a.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	waitFor(t, "two connections on a", func() bool { return a.srv.Active() == 2 })

	move := func(from, to *testServer, drainBy time.Time) (int, int) {
		t.Helper()
		from.stop()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return from.srv.Move(ctx, drainBy, func(_ netip.Addr, state []byte, cl, be *os.File) error {
			// In-process, the receiver gets duplicates, as SCM_RIGHTS
			// would give it.
			return to.srv.Resume(state, dup(t, cl), dup(t, be), false, netip.Addr{})
		})
	}
	moved, closed := move(a, b, time.Time{})
	if moved != 1 || closed != 1 {
		t.Fatalf("moved %d, closed %d; want 1 and 1", moved, closed)
	}
	expectEOF(t, silent)
	echoLine(t, r, conn, "two")
	waitFor(t, "a empty", func() bool { return a.srv.Active() == 0 && a.counters.Active() == 0 })
	if got := b.counters.Active(); got != 1 {
		t.Errorf("b counts %d active; want the resumed one", got)
	}
	// The resumed connection takes b's only permit.
	waitFor(t, "the resumed connection's permit", func() bool { return lim.used.Load() == 1 })
	refused := dialHTTP(t, b.addr, "echo.test")
	expectEOF(t, refused)
	waitFor(t, "the refused connection to finish", func() bool { return b.srv.Active() == 1 })

	before := c.counters.Snapshot()
	moved, closed = move(b, c, time.Now().Add(700*time.Millisecond))
	if moved != 1 || closed != 0 {
		t.Fatalf("second move: moved %d, closed %d; want 1 and 0", moved, closed)
	}
	echoLine(t, r, conn, "three")
	// Counts land when a splice returns, up to holdPipe after the bytes.
	waitFor(t, "c to count the echo", func() bool {
		d := c.counters.Snapshot().Sub(before)
		return d.BytesIn >= 6 && d.BytesOut >= 6
	})
	if got := c.counters.Snapshot().Sub(before); got.BytesIn != 6 || got.BytesOut != 6 || got.Active != 1 {
		t.Errorf("c counted %+v; want only the bytes it moved (6 each way) and one active", got)
	}
	// The deadline of b's drain came along: c closes it then.
	start := time.Now()
	expectEOF(t, conn)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("closed %v after the move; want at the 700ms deadline", d)
	}
	waitFor(t, "c empty", func() bool { return c.srv.Active() == 0 && c.counters.Active() == 0 })
}

func TestResumeRejectsBadState(t *testing.T) {
	s := startServer(t, "", nil, "")
	cl, pe := tcpFiles(t)
	if err := s.srv.Resume([]byte("{not json"), cl, pe, false, netip.Addr{}); err == nil || !strings.Contains(err.Error(), "state") {
		t.Fatalf("Resume with a bad state: %v", err)
	}
	if s.srv.Active() != 0 || s.counters.Active() != 0 {
		t.Fatal("a refused resume counted")
	}
}

// tcpFiles returns the two ends of a loopback TCP connection as files.
func tcpFiles(t *testing.T) (*os.File, *os.File) {
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
	defer d.Close()
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	df, err := d.File()
	if err != nil {
		t.Fatal(err)
	}
	af, err := a.File()
	if err != nil {
		t.Fatal(err)
	}
	return df, af
}

// dup returns a duplicate of f.
func dup(t *testing.T, f *os.File) *os.File {
	t.Helper()
	d, err := dupfd.File(f, f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// expectEOF reads until c ends, which it must within 5 s.
func expectEOF(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil && strings.Contains(err.Error(), "timeout") {
		t.Fatal("connection still open")
	}
}

func TestMoveStuckPairsDelayNoOther(t *testing.T) {
	// Downloads to clients that read nothing cannot stop (their pairs are
	// blocked writing): they are closed at the deadline, and every idle
	// connection is moved regardless of how many are stuck.
	flood := floodBackend(t)
	echo := echoBackend(t)
	routes := fmt.Sprintf("routes: [{match: flood.test, backend: %q}, {match: echo.test, backend: %q}]\n", flood, echo)
	a := startServer(t, routes, nil, "")
	b := startServer(t, routes, nil, "")
	const stuck, idle = 80, 8
	for range stuck {
		dialHTTP(t, a.addr, "flood.test")
	}
	type held struct {
		c net.Conn
		r *bufio.Reader
	}
	var idles []held
	for range idle {
		c := dialHTTP(t, a.addr, "echo.test")
		r := bufio.NewReader(c)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if s, err := r.ReadString('\n'); err != nil || s != "hello\n" {
			t.Fatal(s, err)
		}
		idles = append(idles, held{c, r})
	}
	waitFor(t, "every connection proxied", func() bool { return a.srv.Active() == stuck+idle })
	waitFor(t, "the floods to fill every buffer", stalled(func() uint64 { return a.counters.Snapshot().BytesOut }))
	a.stop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var ins []int64
	start := time.Now()
	moved, closed := a.srv.Move(ctx, time.Time{}, func(_ netip.Addr, state []byte, cl, be *os.File) error {
		var st movedState
		if err := json.Unmarshal(state, &st); err != nil {
			return err
		}
		ins = append(ins, st.Pair.In)
		return b.srv.Resume(state, dup(t, cl), dup(t, be), false, netip.Addr{})
	})
	if moved != idle || closed != stuck {
		t.Fatalf("moved %d, closed %d; want the %d idle moved and the %d stuck closed", moved, closed, idle, stuck)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Move took %v with a 1s deadline", d)
	}
	head := int64(len("GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"))
	for _, in := range ins {
		if in != head {
			t.Errorf("moved state counts %d bytes in; want the replayed request head (%d)", in, head)
		}
	}
	for i, h := range idles {
		echoLine(t, h.r, h.c, fmt.Sprintf("idle %d after the move", i))
	}
	if a.srv.Move(ctx, time.Time{}, nil); a.srv.Active() != 0 {
		t.Errorf("a still has %d connections", a.srv.Active())
	}
}

// TestResumeCountsPoolBackend: a connection moved to another process
// counts there in its route's pool (least_conn and
// sniproxy_backend_connections_active see it) until it ends.
func TestResumeCountsPoolBackend(t *testing.T) {
	b1, b2 := echoBackend(t), echoBackend(t)
	routes := fmt.Sprintf("routes: [{match: echo.test, backends: [%q, %q], balance: least_conn}]\n", b1, b2)
	a := startServer(t, routes, nil, "")
	b := startServer(t, routes, nil, "")
	conn := dialHTTP(t, a.addr, "echo.test")
	defer conn.Close()
	r := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if hello, err := r.ReadString('\n'); err != nil || hello != "hello\n" {
		t.Fatalf("first answer %q, %v", hello, err)
	}
	pa, pb := a.srv.pools[0], b.srv.pools[0]
	used := -1
	for i := range pa.Backends {
		if pa.Active(i) == 1 {
			used = i
		}
	}
	if used < 0 {
		t.Fatal("no backend of a's pool counts the connection")
	}
	a.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	moved, _ := a.srv.Move(ctx, time.Time{}, func(_ netip.Addr, state []byte, cl, be *os.File) error {
		return b.srv.Resume(state, dup(t, cl), dup(t, be), false, netip.Addr{})
	})
	if moved != 1 {
		t.Fatalf("moved %d; want 1", moved)
	}
	echoLine(t, r, conn, "after the move")
	if got := pb.Active(used); got != 1 {
		t.Errorf("b's pool counts %d on backend %d after the move; want 1", got, used)
	}
	if got := pb.Active(1 - used); got != 0 {
		t.Errorf("b's pool counts %d on the other backend; want 0", got)
	}
	waitFor(t, "a's pool to forget it", func() bool { return pa.Active(used) == 0 })
	conn.Close()
	waitFor(t, "b's pool to release it", func() bool { return pb.Active(used) == 0 && b.srv.Active() == 0 })
}

// A connection the event loop handed on with bytes its backend had not
// taken yet moves once they are written, rather than being closed (a
// move caught it between the loop and its pair).
func TestMoveWaitsForPendingWrite(t *testing.T) {
	release := make(chan struct{})
	bln := smallWindow(t, func(c net.Conn) {
		select { // reads nothing until released
		case <-release:
		case <-t.Context().Done():
			return
		}
		io.Copy(io.Discard, c)
	})
	routes := fmt.Sprintf("routes: [{match: slow.test, backend: %q}]\n", bln.Addr())
	a := startServer(t, routes, nil, "")
	b := startServer(t, routes, nil, "")
	loopOf(t, a)
	c := dialHTTP(t, a.addr, "slow.test")
	go func() {
		// Chunks under the loop's buffer, apart: it relays them itself
		// until the backend's socket stops taking them.
		chunk := make([]byte, 8000)
		for {
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(chunk); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	waitFor(t, "the loop to hand the connection on with bytes pending", a.srv.handing)
	a.stop()
	go func() {
		time.Sleep(100 * time.Millisecond) // deliberate: Move is waiting by then
		close(release)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	moved, closed := a.srv.Move(ctx, time.Time{}, func(_ netip.Addr, state []byte, cl, be *os.File) error {
		return b.srv.Resume(state, dup(t, cl), dup(t, be), false, netip.Addr{})
	})
	if moved != 1 || closed != 0 {
		t.Fatalf("moved %d, closed %d; want the connection moved", moved, closed)
	}
	waitFor(t, "the connection in b", func() bool { return b.srv.Active() == 1 })
}
