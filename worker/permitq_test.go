package worker

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/backendtest"
	"github.com/sniproxy/sniproxy/internal/lease"
	"github.com/sniproxy/sniproxy/internal/stats"
)

// gatedPool is a lease.Transport to a real lease.Pool whose answers wait
// for a token on gate: a master slow to answer, on demand.
type gatedPool struct {
	pool *lease.Pool
	gate chan struct{}
}

func (g gatedPool) Request(want int, urgent bool) (int, error) {
	select {
	case <-g.gate:
	case <-time.After(10 * time.Second):
		return 0, fmt.Errorf("gatedPool: no token in 10s")
	}
	return g.pool.Grant(1, want), nil
}

func (g gatedPool) Return(n int) { g.pool.Return(1, n) }

// answer lets one request through.
func (g gatedPool) answer(t *testing.T) {
	t.Helper()
	select {
	case g.gate <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("no request took the token in 10s")
	}
}

// permitQServer starts a server whose lease client (blocks of 4) holds 4
// spare permits of a pool of limit, its next request waiting for a token;
// a connection waits in the loop for a permit at most wait.
func permitQServer(t *testing.T, limit int, wait time.Duration) (*testServer, *loop, gatedPool) {
	t.Helper()
	g := gatedPool{pool: lease.NewPool(limit), gate: make(chan struct{}, 1)}
	client := lease.NewClient(g, 4)
	g.answer(t)
	if !client.Acquire() {
		t.Fatal("no first block")
	}
	client.Release() // 4 spare, no request under way
	ts := startServerWith(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backendtest.Echo(t)), client, "",
		func(s *Server) { s.permitWait = wait })
	return ts, loopOf(t, ts), g
}

// holdEcho opens a connection for a.test through addr and returns it once
// the echo backend has answered its request (the connection is
// established, permit and all), or unanswered with answered false.
func holdEcho(t *testing.T, addr string, wait bool) net.Conn {
	t.Helper()
	c := dialWrite(t, addr, []byte(echoReq))
	if wait {
		readEcho(t, c)
	}
	return c
}

const echoReq = "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"

func readEcho(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, len(echoReq))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != echoReq {
		t.Fatalf("echo: %q, %v", b, err)
	}
}

// Connections that find no spare permit while a block is on its way from
// the master wait for it in the loop, not on a goroutine each (a burst
// past the spares started one per connection, each with its stack), and
// are served by the loop as soon as it lands: the lease client wakes the
// loop, asleep by then (no deadline of its own is near: the wait is 30 s).
func TestLoopQueuesForPermitBlock(t *testing.T) {
	ts, l, g := permitQServer(t, 100, 30*time.Second)
	for range 4 {
		holdEcho(t, ts.addr, true) // the 4 spares; a refill waits at the gate
	}
	// Past the held connections' relay timers (loopRelayFor) and the
	// loop's raw waits (loopQuiet): nothing wakes it but an event.
	time.Sleep(loopRelayFor + 3*loopQuiet)
	var queued []net.Conn
	for range 4 {
		queued = append(queued, holdEcho(t, ts.addr, false))
	}
	waitFor(t, "8 accepts", func() bool { return l.accepted.Load() == 8 })
	time.Sleep(3 * loopQuiet)
	g.answer(t) // the block of 4 lands
	for _, c := range queued {
		readEcho(t, c)
	}
	if n, m := l.toGoroutines.Load(), l.atAccept.Load(); n != 0 || m != 0 {
		t.Errorf("%d connections waited for their permit on a goroutine (%d from the accept); want 0 (all in the loop)", n+m, m)
	}
	if s := ts.counters.Snapshot(); s.Active != 8 {
		t.Errorf("active %d; want 8", s.Active)
	}
}

// A connection waits in the loop for its permit wait at most: a master
// that does not answer by then leaves it to a goroutine's Acquire, as
// before the queue; an answer of no permits at all does so at once (well
// before a wait of 30 s), and the urgent request that follows refuses it
// at the limit.
func TestLoopPermitWaitEnds(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		ts, l, g := permitQServer(t, 100, 50*time.Millisecond)
		for range 4 {
			holdEcho(t, ts.addr, true)
		}
		c := holdEcho(t, ts.addr, false)
		waitFor(t, "the hand-off to a goroutine", func() bool { return l.toGoroutines.Load() == 1 })
		g.answer(t) // the refill, which the goroutine's Acquire waits for
		readEcho(t, c)
	})
	t.Run("pool empty", func(t *testing.T) {
		ts, l, g := permitQServer(t, 4, 30*time.Second)
		for range 4 {
			holdEcho(t, ts.addr, true)
		}
		c := holdEcho(t, ts.addr, false)
		waitFor(t, "the accept", func() bool { return l.accepted.Load() == 5 })
		g.answer(t) // the refill: nothing
		g.answer(t) // the goroutine's urgent request: nothing
		waitFor(t, "the refusal", func() bool { return ts.counters.Snapshot().Rejected[stats.Limit] == 1 })
		if n := l.toGoroutines.Load(); n != 1 {
			t.Errorf("%d hand-offs to goroutines; want 1", n)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("read %d bytes of a refused connection", n)
		}
	})
}

// The backend's connect time is measured (sniproxy_backend_connect_seconds),
// also when the replay is written right after connect, in the same turn
// of the loop.
func TestLoopMeasuresConnectTime(t *testing.T) {
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backendtest.Echo(t)), nil, "")
	loopOf(t, ts)
	for range 20 {
		holdEcho(t, ts.addr, true).Close()
	}
	waitFor(t, "20 connects", func() bool { return ts.counters.Snapshot().ConnectCount == 20 })
	if s := ts.counters.Snapshot(); s.ConnectNanos == 0 {
		t.Errorf("20 connects took 0 ns in all")
	}
}

// A hello of any size the sniffer takes is replayed whole, in order and
// counted once by the write right after connect (on loopback the socket
// is connected by then and takes all of it).
func TestLoopReplaysLargeHello(t *testing.T) {
	for _, size := range []int{1500, 30000, 65000} { // the extensions' length is 16 bits
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			hello := bigHelloSNI("a.test", size)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			backend := hashBackend(t, ln, len(hello))
			ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backend), NewLocalLimiter(10), "")
			loopOf(t, ts)
			checkHashed(t, ts, hello)
		})
	}
}

// A backend that does not complete the handshake at once (its accept
// queue is full, so the SYN waits for a retransmission) takes nothing
// from the write right after connect (EAGAIN): the loop waits for the
// socket to become writable and replays then.
func TestLoopReplaysAfterSlowConnect(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil { // room for one connection
		unix.Close(fd)
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "backend")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	// The queue's one place taken, not accepted yet.
	filler, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	t.Cleanup(func() { ln.Close() })
	hello := bigHelloSNI("a.test", 3000)
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", ln.Addr()), NewLocalLimiter(10), "")
	l := loopOf(t, ts)
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		time.Sleep(200 * time.Millisecond) // the proxy's SYN dropped by then
		if c, err := ln.Accept(); err == nil {
			c.Close() // the filler's
		}
		serveHash(ln, len(hello))
	}()
	checkHashed(t, ts, hello)
	if g := l.toGoroutines.Load(); g != 0 {
		t.Errorf("%d connections handed to goroutines; want the loop to wait for the connect", g)
	}
}

// checkHashed sends hello through ts and checks the backend's answer (its
// SHA-256, see hashBackend) and the counts.
func checkHashed(t *testing.T, ts *testServer, hello []byte) {
	t.Helper()
	c := dialWrite(t, ts.addr, hello)
	got, err := io.ReadAll(c)
	c.Close()
	want := sha256.Sum256(hello)
	if string(got) != hex.EncodeToString(want[:]) {
		t.Fatalf("backend got a hello with SHA-256 %q (%v); want %x", got, err, want)
	}
	waitFor(t, "the connection to end", func() bool { return ts.counters.Snapshot().Active == 0 })
	if s := ts.counters.Snapshot(); s.BytesIn != uint64(len(hello)) || s.BytesOut != 64 {
		t.Errorf("bytes in %d out %d; want %d and 64", s.BytesIn, s.BytesOut, len(hello))
	}
}

// hashBackend serves ln with serveHash until the test ends, and returns
// ln's address.
func hashBackend(t *testing.T, ln net.Listener, n int) string {
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		serveHash(ln, n)
	}()
	return ln.Addr().String()
}

// serveHash serves ln one connection at a time until it is closed: it
// reads n bytes, answers their SHA-256 in hex and closes.
func serveHash(ln net.Listener, n int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, n)
		if _, err := io.ReadFull(c, b); err == nil {
			sum := sha256.Sum256(b)
			c.Write([]byte(hex.EncodeToString(sum[:])))
		}
		c.Close()
	}
}
