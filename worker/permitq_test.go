package worker

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

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
// spare permits of a pool of limit, its next request waiting for a token.
func permitQServer(t *testing.T, limit int) (*testServer, *loop, gatedPool) {
	t.Helper()
	g := gatedPool{pool: lease.NewPool(limit), gate: make(chan struct{}, 1)}
	client := lease.NewClient(g, 4)
	g.answer(t)
	if !client.Acquire() {
		t.Fatal("no first block")
	}
	client.Release() // 4 spare, no request under way
	ts := startServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\n", backendtest.Echo(t)), client, "")
	return ts, loopOf(t, ts), g
}

// holdEcho opens a connection for a.test through addr and returns it once
// the echo backend has answered its request (the connection is
// established, permit and all), or unanswered with answered false.
func holdEcho(t *testing.T, addr string, wait bool) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte(echoReq)); err != nil {
		t.Fatal(err)
	}
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
// are served by the loop once it lands.
func TestLoopQueuesForPermitBlock(t *testing.T) {
	ts, l, g := permitQServer(t, 100)
	for range 4 {
		holdEcho(t, ts.addr, true) // the 4 spares; a refill waits at the gate
	}
	var queued []net.Conn
	for range 4 {
		queued = append(queued, holdEcho(t, ts.addr, false))
	}
	waitFor(t, "8 accepts", func() bool { return l.accepted.Load() == 8 })
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

// A connection waits in the loop for loopPermitWait at most: a master
// that does not answer by then leaves it to a goroutine's Acquire, as
// before the queue; an answer of no permits at all does so at once, and
// the urgent request that follows refuses it at the limit.
func TestLoopPermitWaitEnds(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		ts, l, g := permitQServer(t, 100)
		for range 4 {
			holdEcho(t, ts.addr, true)
		}
		c := holdEcho(t, ts.addr, false)
		waitFor(t, "the hand-off to a goroutine", func() bool { return l.toGoroutines.Load() == 1 })
		g.answer(t) // the refill
		g.answer(t) // the goroutine's request, if the refill brought none first
		readEcho(t, c)
	})
	t.Run("pool empty", func(t *testing.T) {
		ts, l, g := permitQServer(t, 4)
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
