package master

import (
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// grantOf reads the worker's next message, which must be a LeaseGrant.
func grantOf(t *testing.T, f *fakeWorker) int {
	t.Helper()
	_, b := f.recv(t)
	g, ok := b.(ipc.LeaseGrant)
	if !ok {
		t.Fatalf("worker %d got %T; want a LeaseGrant", f.c.id, b)
	}
	return g.N
}

// expectRevoke reads the worker's next message, which must be a Revoke.
func expectRevoke(t *testing.T, f *fakeWorker) {
	t.Helper()
	if _, b := f.recv(t); b != (ipc.Revoke{}) {
		t.Fatalf("worker %d got %T; want a Revoke", f.c.id, b)
	}
}

func TestBrokerGrantsWithinLimit(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	b := newBroker(quietLog(), 5, workersOf(a))
	b.request(a.c, 3, false)
	if n := grantOf(t, a); n != 3 {
		t.Fatalf("granted %d; want 3", n)
	}
	b.request(a.c, 3, false)
	if n := grantOf(t, a); n != 2 {
		t.Fatalf("granted %d; want the 2 left", n)
	}
	// Not urgent: a dry pool answers 0 at once and revokes nothing.
	b.request(a.c, 1, false)
	if n := grantOf(t, a); n != 0 {
		t.Fatalf("granted %d from a dry pool", n)
	}
}

// A revoke that comes back empty: the request is refused once the bound
// passes.
func TestBrokerRevokeComesBackEmpty(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	c := newFakeWorker(t, 1, 2, true)
	b := newBroker(quietLog(), 2, workersOf(a, c))
	b.revokeWait = 20 * time.Millisecond
	b.request(a.c, 2, false)
	grantOf(t, a)
	start := time.Now()
	b.request(c.c, 1, true)
	expectRevoke(t, a)
	if n := grantOf(t, c); n != 0 {
		t.Fatalf("granted %d with every permit held", n)
	}
	if d := time.Since(start); d < b.revokeWait {
		t.Errorf("refused after %v, before the revoke bound %v", d, b.revokeWait)
	}
}

// A revoke that brings some back: the request gets what is left, within
// the bound.
func TestBrokerRevokeGrantsWhatComesBack(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	c := newFakeWorker(t, 1, 2, true)
	idle := newFakeWorker(t, 2, 3, true) // holds nothing: not asked
	b := newBroker(quietLog(), 4, workersOf(a, c, idle))
	b.revokeWait = time.Minute // the return ends the wait, not the bound
	b.request(a.c, 4, false)
	grantOf(t, a)
	b.request(c.c, 3, true)
	expectRevoke(t, a)
	b.giveBack(a.c, 1)
	if n := grantOf(t, c); n != 1 {
		t.Fatalf("granted %d; want the 1 returned", n)
	}
	idle.expectNothing(t, 20*time.Millisecond)
	if total, held := b.pool.Held(); total != 4 || held[1] != 3 || held[2] != 1 {
		t.Errorf("held %d %v; want 4: 3 by worker 1, 1 by worker 2", total, held)
	}
}

// A grant racing the requesting worker's death: the permits it got go
// back to the pool, not to the dead worker id.
func TestBrokerGrantRacingWorkerDeath(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	c := newFakeWorker(t, 1, 2, true)
	b := newBroker(quietLog(), 2, workersOf(a, c))
	b.revokeWait = time.Minute
	b.request(a.c, 2, false)
	grantOf(t, a)
	b.request(c.c, 2, true)
	expectRevoke(t, a)
	// c dies and is reaped (its permits dropped) before a's spares return.
	c.exit()
	if n := b.drop(c.c); n != 0 {
		t.Fatalf("dropped %d permits of a worker that held none", n)
	}
	b.giveBack(a.c, 2)
	waitUntil(t, "the permits back in the pool", func() bool { return b.pool.Free() == 2 })
	if _, held := b.pool.Held(); held[2] != 0 {
		t.Errorf("the dead worker id still holds %d permits", held[2])
	}
	c.expectNothing(t, 20*time.Millisecond)
}

// The successor's reserve: the state carries the permits held, and every
// grant, return and drop after it sends the new count, in order.
func TestBrokerReserveAccounting(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	c := newFakeWorker(t, 1, 2, true)
	b := newBroker(quietLog(), 10, workersOf(a, c))
	b.setPredecessor(3, 0) // the predecessor's: counted against the limit
	b.request(a.c, 4, false)
	grantOf(t, a)
	b.request(c.c, 10, false)
	if n := grantOf(t, c); n != 3 {
		t.Fatalf("granted %d; want 3 (10 - reserve 3 - 4 held)", n)
	}
	mine, theirs := stateSocketPair(t)
	var cnt counters
	if err := b.attachSuccessor(mine, func(reserve int) error { return cnt.attachSuccessor(mine, 1, reserve, time.Time{}) }); err != nil {
		t.Fatal(err)
	}
	if m := recvState(t, theirs); m.State == nil || m.State.Reserve != 7 {
		t.Fatalf("first message %+v; want the state with reserve 7", m)
	}
	reserve := func() int {
		t.Helper()
		m := recvState(t, theirs)
		if m.Reserve == nil {
			t.Fatalf("got %+v; want a reserve", m)
		}
		return *m.Reserve
	}
	b.giveBack(a.c, 1)
	if r := reserve(); r != 6 {
		t.Errorf("reserve %d after a return; want 6", r)
	}
	b.setPredecessor(0, -1) // the predecessor exited
	b.request(a.c, 2, false)
	if r := reserve(); r != 8 {
		t.Errorf("reserve %d after a grant; want 8", r)
	}
	grantOf(t, a)
	b.drop(c.c)
	if r := reserve(); r != 5 {
		t.Errorf("reserve %d after a drop; want 5", r)
	}
	b.detachSuccessor()
	b.giveBack(a.c, 1)
	theirs.conn.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if m, err := theirs.recv(); err == nil {
		t.Errorf("detached successor got %+v", m)
	}
}

// Connections moved here by a hurried predecessor keep counting against
// max_connections all the way, whatever order its readings (state socket)
// and the connections (move socket) arrive in: the limit is 4, the
// predecessor holds 4 for 4 open connections and moves all of them here;
// at no step may a new connection get a permit. (Before, the predecessor's
// permits came back before the moved connections took new ones, and they
// were served without: 5 connections open at a limit of 4.)
func TestBrokerMovedConnectionsKeepTheirPermits(t *testing.T) {
	type step struct {
		what  string // "reading" (held, moved) or "arrival"
		held  int
		moved int
	}
	orders := map[string][]step{
		"readings first": {
			{"reading", 4, 1}, {"reading", 4, 2}, {"reading", 3, 2}, {"reading", 2, 4}, {"reading", 0, 4},
			{"arrival", 0, 0}, {"arrival", 0, 0}, {"arrival", 0, 0}, {"arrival", 0, 0},
		},
		"arrivals first": {
			{"arrival", 0, 0}, {"arrival", 0, 0}, {"arrival", 0, 0}, {"arrival", 0, 0},
			{"reading", 4, 4}, {"reading", 0, 4},
		},
		"interleaved": {
			{"reading", 4, 1}, {"reading", 3, 1}, {"arrival", 0, 0}, {"arrival", 0, 0},
			{"reading", 3, 2}, {"reading", 2, 3}, {"arrival", 0, 0}, {"reading", 0, 4}, {"arrival", 0, 0},
		},
		"predecessor exits before the last arrive": {
			{"reading", 4, 2}, {"arrival", 0, 0}, {"reading", 2, 4}, {"exit", 0, 0},
			{"arrival", 0, 0}, {"arrival", 0, 0}, {"arrival", 0, 0},
		},
	}
	for name, steps := range orders {
		t.Run(name, func(t *testing.T) {
			a := newFakeWorker(t, 0, 1, true)
			b := newBroker(quietLog(), 4, workersOf(a))
			b.setPredecessor(4, 0)
			for i, s := range steps {
				switch s.what {
				case "reading":
					b.setPredecessor(s.held, s.moved)
				case "exit":
					b.setPredecessor(0, -1)
				case "arrival":
					b.arrived(a.c)
				}
				if free := b.pool.Free(); free != 0 {
					t.Fatalf("step %d (%+v): %d permits free with 4 connections open at a limit of 4", i, s, free)
				}
			}
			if total, held := b.pool.Held(); total != 4 || held[1] != 4 {
				t.Errorf("after the moves the worker holds %d (of %d); want all 4", held[1], total)
			}
			// They end: the permits come back, and new connections may
			// take them.
			b.giveBack(a.c, 4)
			if free := b.pool.Free(); free != 4 {
				t.Errorf("after they ended: %d free; want 4", free)
			}
		})
	}
}

// A moved connection no worker takes is no longer in flight: it does not
// keep counting for ever.
func TestBrokerMovedConnectionClosed(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	b := newBroker(quietLog(), 4, workersOf(a))
	b.setPredecessor(1, 1)
	b.setPredecessor(0, 1) // its worker gave the permit back
	if free := b.pool.Free(); free != 3 {
		t.Fatalf("%d free with one connection in flight; want 3", free)
	}
	b.arrived(a.c)
	b.notArrived(a.c) // the worker did not take it
	b.arrived(nil)    // and no other did: it was closed
	if free := b.pool.Free(); free != 4 {
		t.Errorf("%d free once the moved connection was closed; want 4", free)
	}
}
