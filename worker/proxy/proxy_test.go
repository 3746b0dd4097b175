package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	return c, a
}

// funcs is an Owner made of two functions; count may be nil.
type funcs struct {
	count func(in, out int64)
	done  func(Result, error)
}

func (f funcs) Count(in, out int64) {
	if f.count != nil {
		f.count(in, out)
	}
}

func (f funcs) Done(r Result, err error) { f.done(r, err) }

// start starts a new Pair with count and done as its Owner.
func start(client, backend *net.TCPConn, idle time.Duration, poller *Poller, count func(in, out int64), done func(Result, error)) *Pair {
	h := new(Pair)
	h.Start(client, backend, idle, poller, funcs{count, done})
	return h
}

// resume resumes a new Pair with count and done as its Owner.
func resume(client, backend *net.TCPConn, st State, idle time.Duration, poller *Poller, count func(in, out int64), done func(Result, error)) *Pair {
	h := new(Pair)
	h.Resume(client, backend, st, idle, poller, funcs{count, done})
	return h
}

// rig is client <-> [proxyC | Start | proxyB] <-> backend.
type rig struct {
	client, backend *net.TCPConn
	done            chan struct{}
	res             Result
	err             error
	in, out         atomic.Int64
}

func newRig(t testing.TB, idle time.Duration) *rig {
	t.Helper()
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	r := &rig{client: client, backend: backend, done: make(chan struct{})}
	start(proxyC, proxyB, idle, nil, func(in, out int64) { r.in.Add(in); r.out.Add(out) }, func(res Result, err error) {
		r.res, r.err = res, err
		close(r.done)
	})
	t.Cleanup(func() {
		client.Close()
		backend.Close()
		r.wait(t, 10*time.Second)
	})
	return r
}

func (r *rig) wait(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(d):
		t.Fatalf("pair did not finish within %v", d)
	}
}

func readAll(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func TestHalfCloseClientFirst(t *testing.T) {
	r := newRig(t, time.Minute)
	if _, err := r.client.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	r.client.CloseWrite()
	// The backend sees the request then EOF, and can still answer.
	if got := readAll(t, r.backend); got != "request" {
		t.Fatalf("backend got %q; want %q", got, "request")
	}
	r.backend.Write([]byte("response after client FIN"))
	r.backend.CloseWrite()
	if got := readAll(t, r.client); got != "response after client FIN" {
		t.Fatalf("client got %q", got)
	}
	r.wait(t, 10*time.Second)
	if r.err != nil {
		t.Errorf("pair err %v; want nil", r.err)
	}
	if r.res.In != 7 || r.res.Out != 25 || r.in.Load() != 7 || r.out.Load() != 25 {
		t.Errorf("counts %+v callback in=%d out=%d; want 7/25", r.res, r.in.Load(), r.out.Load())
	}
}

func TestHalfCloseBackendFirst(t *testing.T) {
	r := newRig(t, time.Minute)
	r.backend.Write([]byte("banner"))
	r.backend.CloseWrite()
	if got := readAll(t, r.client); got != "banner" {
		t.Fatalf("client got %q", got)
	}
	// The client's direction still flows after the backend's FIN.
	r.client.Write([]byte("still talking"))
	r.client.CloseWrite()
	if got := readAll(t, r.backend); got != "still talking" {
		t.Fatalf("backend got %q", got)
	}
	r.wait(t, 10*time.Second)
}

func TestIdleTimeout(t *testing.T) {
	r := newRig(t, 200*time.Millisecond)
	r.client.Write([]byte("x"))
	buf := make([]byte, 1)
	r.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(r.backend, buf); err != nil {
		t.Fatal(err)
	}
	r.wait(t, 10*time.Second)
	if !errors.Is(r.err, ErrIdle) {
		t.Errorf("err %v; want ErrIdle", r.err)
	}
	// Both peers see the close.
	r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.client.Read(buf); err == nil {
		t.Errorf("client read succeeded after idle close")
	}
}

func TestOneWayDownloadIsNotIdle(t *testing.T) {
	const idle = 300 * time.Millisecond
	r := newRig(t, idle)
	got := make(chan string, 1)
	go func() {
		r.client.SetReadDeadline(time.Now().Add(20 * time.Second))
		b, _ := io.ReadAll(r.client)
		got <- string(b)
	}()
	// Trickle for 4 idle periods in one direction only.
	var want strings.Builder
	for i := 0; i < 16; i++ {
		r.backend.Write([]byte("chunk;"))
		want.WriteString("chunk;")
		time.Sleep(idle / 4) // deliberate: the trickle being tested
	}
	r.backend.CloseWrite()
	r.client.CloseWrite()
	select {
	case s := <-got:
		if s != want.String() {
			t.Errorf("client got %d bytes; want %d", len(s), want.Len())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("download did not finish")
	}
	r.wait(t, 10*time.Second)
	if r.err != nil {
		t.Errorf("err %v; want nil (traffic in one direction keeps the pair alive)", r.err)
	}
}

func TestStuckReaderIsIdle(t *testing.T) {
	// The client never reads: the backend's writes stall once the socket
	// buffers fill, no byte moves, and the idle timeout must still fire.
	r := newRig(t, 300*time.Millisecond)
	r.client.SetReadBuffer(4096)
	go func() {
		chunk := bytes.Repeat([]byte("z"), 64<<10)
		r.backend.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for {
			if _, err := r.backend.Write(chunk); err != nil {
				return
			}
		}
	}()
	r.wait(t, 15*time.Second)
	if !errors.Is(r.err, ErrIdle) {
		t.Errorf("err %v; want ErrIdle", r.err)
	}
}

func TestResetPropagates(t *testing.T) {
	r := newRig(t, time.Minute)
	r.backend.SetLinger(0)
	r.backend.Close() // RST towards the proxy
	buf := make([]byte, 1)
	r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.client.Read(buf); err == nil {
		t.Fatal("client read succeeded after backend reset")
	}
	r.wait(t, 10*time.Second)
}

func TestLargeTransferBothWays(t *testing.T) {
	r := newRig(t, time.Minute)
	const size = 8 << 20
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(i * 7)
	}
	errc := make(chan error, 2)
	go func() { _, err := r.client.Write(src); r.client.CloseWrite(); errc <- err }()
	go func() { _, err := r.backend.Write(src); r.backend.CloseWrite(); errc <- err }()
	gotB := make(chan []byte, 1)
	go func() {
		r.backend.SetReadDeadline(time.Now().Add(30 * time.Second))
		b, _ := io.ReadAll(r.backend)
		gotB <- b
	}()
	r.client.SetReadDeadline(time.Now().Add(30 * time.Second))
	gotC, _ := io.ReadAll(r.client)
	if !bytes.Equal(gotC, src) {
		t.Errorf("client got %d bytes, equal=%v; want %d", len(gotC), bytes.Equal(gotC, src), size)
	}
	if b := <-gotB; !bytes.Equal(b, src) {
		t.Errorf("backend got %d bytes; want %d", len(b), size)
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	r.wait(t, 10*time.Second)
	if r.res.In != size || r.res.Out != size {
		t.Errorf("counts %+v; want %d each way", r.res, size)
	}
}

// pipeFDs counts this process's open pipe file descriptors.
func pipeFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	// Only pipes both of whose ends are listed count, two fds each: the
	// directory is listed first and each link read after, so a pipe closed
	// meanwhile and another made in its place could otherwise show as one
	// fd more than ever were open at once. A pipe with both ends listed
	// existed when the listing was taken.
	ends := map[string]int{}
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			ends[l]++
		}
	}
	n := 0
	for _, k := range ends {
		if k >= 2 {
			n += 2
		}
	}
	return n
}

func TestIdlePairsHoldNoPipe(t *testing.T) {
	before := pipeFDs(t)
	const pairs = 50
	rigs := make([]*rig, pairs)
	for i := range rigs {
		rigs[i] = newRig(t, time.Minute)
		// Move some bytes both ways so each direction has spliced once.
		rigs[i].client.Write([]byte("ping"))
		rigs[i].backend.Write([]byte("pong"))
	}
	buf := make([]byte, 4)
	for _, r := range rigs {
		r.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.ReadFull(r.backend, buf)
		r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.ReadFull(r.client, buf)
	}
	// Go keeps free pipes in a sync.Pool and closes them when the pool is
	// collected; a pipe held by a waiting splice would survive that. A
	// splice gives its pipe back within holdPipe of the last byte.
	deadline := time.Now().Add(2 * time.Second)
	for {
		runtime.GC()
		extra := pipeFDs(t) - before
		if extra <= 8 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pipe fds open with %d idle pairs; want no pipe held per idle pair", extra, pairs)
		}
		time.Sleep(10 * time.Millisecond) // poll the condition until the deadline
	}
}

func BenchmarkCopy(b *testing.B) {
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	// direct: no proxy; proxy: a pair (Start, splice); usercopy: the same topology
	// with a plain user-space io.CopyBuffer, what wrapping the conns costs.
	for _, mode := range []string{"direct", "proxy", "usercopy"} {
		b.Run(mode, func(b *testing.B) {
			var src, dst *net.TCPConn
			switch mode {
			case "direct":
				src, dst = tcpPair(b)
			case "proxy":
				r := newRig(b, time.Minute)
				src, dst = r.client, r.backend
			case "usercopy":
				var pc, pb *net.TCPConn
				src, pc = tcpPair(b)
				pb, dst = tcpPair(b)
				go func() {
					io.CopyBuffer(struct{ io.Writer }{pb}, struct{ io.Reader }{pc}, make([]byte, 32<<10))
					pb.CloseWrite()
				}()
				defer pc.Close()
				defer pb.Close()
			}
			b.SetBytes(chunk)
			done := make(chan int64)
			go func() {
				n, _ := io.Copy(io.Discard, dst)
				done <- n
			}()
			b.ResetTimer()
			for range b.N {
				if _, err := src.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			src.CloseWrite()
			<-done
			b.StopTimer()
			src.Close()
			dst.Close()
		})
	}
}

func TestPollerParksIdlePairs(t *testing.T) {
	poller, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	defer poller.Close()
	base := runtime.NumGoroutine()
	const pairs = 40
	type live struct {
		client, backend *net.TCPConn
		h               *Pair
		done            chan error
	}
	var ls []live
	for range pairs {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		l := live{client: client, backend: backend, done: make(chan error, 1)}
		l.h = start(proxyC, proxyB, time.Minute, poller, nil, func(_ Result, err error) { l.done <- err })
		ls = append(ls, l)
		defer client.Close()
		defer backend.Close()
	}
	// Traffic both ways wakes them; then they park again.
	buf := make([]byte, 4)
	for _, l := range ls {
		l.client.Write([]byte("ping"))
		l.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(l.backend, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("up: %q %v", buf, err)
		}
		l.backend.Write([]byte("pong"))
		l.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(l.client, buf); err != nil || string(buf) != "pong" {
			t.Fatalf("down: %q %v", buf, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base+2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines with %d idle pairs parked in the poller (base %d); want none per pair", runtime.NumGoroutine(), pairs, base)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Closing a parked pair (a drain deadline) finishes it.
	for _, l := range ls[:pairs/2] {
		l.h.Close()
		select {
		case <-l.done:
		case <-time.After(5 * time.Second):
			t.Fatal("closed parked pair did not finish")
		}
	}
	// A half-close on a parked pair is passed on and the pair finishes.
	for _, l := range ls[pairs/2:] {
		l.client.CloseWrite()
		l.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := l.backend.Read(buf); err != io.EOF {
			t.Fatalf("backend read after client FIN: %v; want EOF", err)
		}
		l.backend.CloseWrite()
		select {
		case err := <-l.done:
			if err != nil {
				t.Errorf("pair ended with %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("half-closed parked pair did not finish")
		}
	}
}

// sockOpt reads an integer socket option of c.
func sockOpt(t *testing.T, c *net.TCPConn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

// TestBackendKeepAliveOnceQuiet: the backend socket of a pair gets TCP
// keep-alive from its Poller when its direction parks, not before (a
// short connection never pays the setsockopt calls).
func TestBackendKeepAliveOnceQuiet(t *testing.T) {
	poller, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	defer poller.Close()
	poller.SetBackendKeepAlive(net.KeepAliveConfig{Enable: true, Idle: 47 * time.Second})
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	if err := proxyB.SetKeepAlive(false); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	done := make(chan error, 1)
	h := start(proxyC, proxyB, time.Minute, poller, nil, func(_ Result, err error) { done <- err })
	defer h.Close()
	on := sockOpt(t, proxyB, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	if time.Since(t0) < parkAfter/2 && on != 0 {
		t.Fatalf("SO_KEEPALIVE %d right after Start; want it set only once the backend is quiet", on)
	}
	deadline := time.Now().Add(parkAfter + 10*time.Second)
	for sockOpt(t, proxyB, unix.SOL_SOCKET, unix.SO_KEEPALIVE) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("SO_KEEPALIVE still off %v after Start of a quiet pair", time.Since(t0))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if idle := sockOpt(t, proxyB, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE); idle != 47 {
		t.Errorf("TCP_KEEPIDLE %d; want 47", idle)
	}
	// Still a working pair after parking.
	backend.Write([]byte("late"))
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "late" {
		t.Fatalf("down after park: %q %v", buf, err)
	}
}

// TestClientResetBeforeStart: a client that resets its connection before
// the pair starts ends the pair at once (the reset is reported by the
// socket once: the first look at it must not throw it away, or the next
// sees an orderly EOF and the pair is only half-closed, held open by a
// quiet backend). Found as a flake of TestPerIPLimit.
func TestClientResetBeforeStart(t *testing.T) {
	poller, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	defer poller.Close()
	for i := range 20 {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		client.SetLinger(0)
		client.Close() // RST, delivered to proxyC before Close returns on loopback
		done := make(chan error, 1)
		start(proxyC, proxyB, time.Minute, poller, nil, func(_ Result, err error) { done <- err })
		select {
		case err := <-done:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("pair %d ended with %v; want the client's reset", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("pair %d of a client that reset is still open after 5s (the quiet backend holds it)", i)
		}
		backend.Close()
	}
}
