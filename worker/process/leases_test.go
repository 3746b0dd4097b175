package process

import (
	"io"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/ipc"
)

// blockedConn returns the worker's end of an ipc pair and the master's
// end, which reads nothing until unblock is called: by then a sender is
// blocked in SendBody with the socket's buffer full, holding the
// connection's writer, as when the master stops reading for a while.
// unblock stops that sender and lets the master read: recv then returns
// the next message that is not the filler's.
func blockedConn(t *testing.T) (wc *ipc.Conn, unblock func(), recv func() ipc.Body) {
	t.Helper()
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	wc, err = ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mc.Close(); wc.Close() })
	var sent atomic.Int64
	var stop atomic.Bool
	go func() {
		for !stop.Load() {
			if wc.SendBody(ipc.Ready{}) != nil {
				return
			}
			sent.Add(1)
		}
	}()
	// Blocked once no send has completed for a while.
	last, deadline := int64(-1), time.Now().Add(10*time.Second)
	for n := sent.Load(); n != last; n = sent.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the filler never blocked")
		}
		last = n
		time.Sleep(100 * time.Millisecond)
	}
	unblock = func() { stop.Store(true) }
	recv = func() ipc.Body {
		t.Helper()
		mc.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			m, err := mc.Recv()
			if err != nil {
				t.Fatalf("master: %v", err)
			}
			b, err := ipc.Decode(m)
			if err != nil {
				t.Fatalf("master: %v", err)
			}
			if _, ok := b.(ipc.Ready); !ok {
				return b
			}
		}
	}
	return wc, unblock, recv
}

// returns reports whether f returns within a second.
func returns(f func()) bool {
	done := make(chan struct{})
	go func() { f(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(time.Second):
		return false
	}
}

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// Giving permits back never waits for the master's connection (the event
// loop gives them back, and every connection of the worker would wait
// with it); they reach the master once it reads again.
func TestLeaseReturnNeverWaits(t *testing.T) {
	wc, unblock, recv := blockedConn(t)
	l := newLeases(wc, discard)
	done := make(chan struct{})
	defer close(done)
	go l.sendReturns(done)
	if !returns(func() { l.Return(5) }) {
		t.Fatal("Return waited for the blocked connection")
	}
	l.Return(2)
	unblock()
	n := 0
	for n < 7 {
		r, ok := recv().(ipc.LeaseReturn)
		if !ok {
			t.Fatalf("master got %T; want LeaseReturn", r)
		}
		n += r.N
	}
	if n != 7 {
		t.Errorf("master got %d permits back; want 7", n)
	}
}

// A request carries the returns made before it: the master never answers
// it counting a permit already given back as held.
func TestLeaseReturnBeforeRequest(t *testing.T) {
	wc, unblock, recv := blockedConn(t)
	l := newLeases(wc, discard) // no sendReturns: only the request sends
	if !returns(func() { l.Return(3) }) {
		t.Fatal("Return waited for the blocked connection")
	}
	got := make(chan int, 1)
	go func() {
		n, err := l.Request(4, true)
		if err != nil {
			t.Error(err)
		}
		got <- n
	}()
	unblock()
	if r, ok := recv().(ipc.LeaseReturn); !ok || r.N != 3 {
		t.Fatalf("master got %+v first; want LeaseReturn{N: 3}", r)
	}
	if r, ok := recv().(ipc.LeaseRequest); !ok || r.Want != 4 {
		t.Fatalf("master got %+v next; want LeaseRequest{Want: 4}", r)
	}
	if err := l.grant(4); err != nil {
		t.Fatal(err)
	}
	if n := <-got; n != 4 {
		t.Errorf("granted %d; want 4", n)
	}
}

// The same for client permits, per client address.
func TestPerIPReturnNeverWaits(t *testing.T) {
	wc, unblock, recv := blockedConn(t)
	l := newPerIPLeases(wc, discard)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	done := make(chan struct{})
	defer close(done)
	go l.sendReturns(done)
	if !returns(func() { l.Return(a, 2, 0) }) {
		t.Fatal("Return waited for the blocked connection")
	}
	l.Return(b, 1, 1)
	l.Return(a, 1, 0)
	unblock()
	back := map[netip.Addr]perip.Grant{}
	for back[a].Conns+back[b].Conns < 4 {
		r, ok := recv().(ipc.PerIP)
		if !ok || !r.Return {
			t.Fatalf("master got %+v; want a PerIP return", r)
		}
		g := back[r.Key]
		g.Conns += r.Conns
		g.Tokens += r.Tokens
		back[r.Key] = g
	}
	if back[a] != (perip.Grant{Conns: 3}) || back[b] != (perip.Grant{Conns: 1, Tokens: 1}) {
		t.Errorf("master got back %+v", back)
	}
}

func TestPerIPReturnBeforeRequest(t *testing.T) {
	wc, unblock, recv := blockedConn(t)
	l := newPerIPLeases(wc, discard)
	a := netip.MustParseAddr("192.0.2.1")
	if !returns(func() { l.Return(a, 1, 0) }) {
		t.Fatal("Return waited for the blocked connection")
	}
	got := make(chan perip.Grant, 1)
	go func() {
		g, err := l.Request(a, 2, 0)
		if err != nil {
			t.Error(err)
		}
		got <- g
	}()
	unblock()
	if r, ok := recv().(ipc.PerIP); !ok || !r.Return || r.Key != a || r.Conns != 1 {
		t.Fatalf("master got %+v first; want the return of 1 for %v", r, a)
	}
	if r, ok := recv().(ipc.PerIP); !ok || r.Return || r.Key != a || r.Conns != 2 {
		t.Fatalf("master got %+v next; want the request of 2 for %v", r, a)
	}
	if err := l.grant(ipc.PerIPGrant{Key: a, Conns: 2}); err != nil {
		t.Fatal(err)
	}
	if g := <-got; g.Conns != 2 {
		t.Errorf("granted %+v; want 2", g)
	}
}
