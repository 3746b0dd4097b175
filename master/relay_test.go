package master

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// movedConn returns a Connection message carrying two descriptors, of
// no client key.
func movedConn(t *testing.T, state string) ipc.Message {
	return movedConnOf(t, netip.Addr{}, state)
}

// movedConnOf returns a Connection message of client key carrying two
// descriptors.
func movedConnOf(t *testing.T, key netip.Addr, state string) ipc.Message {
	t.Helper()
	f := tempFile(t)
	m, err := ipc.Encode(ipc.Connection{Key: key, State: []byte(state)}, f, f)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// expectConn reads the worker's next message, which must be the moved
// connection state.
func expectConn(t *testing.T, w *fakeWorker, state string) {
	t.Helper()
	msg, b := w.recv(t)
	msg.CloseFiles()
	if c, ok := b.(ipc.Connection); !ok || string(c.State) != state || len(msg.Files) != 2 {
		t.Fatalf("worker %d got %T %+v (%d files); want connection %q", w.c.id, b, b, len(msg.Files), state)
	}
}

// Moved connections from the predecessor go round robin to the ready
// workers, skipping one that is not ready and one that does not read.
func TestRelayToWorkers(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	notReady := newFakeWorker(t, 1, 2, false)
	broken := newFakeWorker(t, 2, 3, true)
	c := newFakeWorker(t, 3, 4, true)
	r := newRelay(quietLog(), workersOf(a, notReady, broken, c), &countPermits{})
	broken.c.conn.Close() // its sends fail: the next worker gets it
	for _, s := range []string{"1", "2", "3", "4"} {
		if !r.toWorker(movedConn(t, s), netip.Addr{}) {
			t.Fatalf("connection %s not taken", s)
		}
	}
	expectConn(t, a, "1")
	expectConn(t, c, "2") // 1 not ready, 2 broken
	expectConn(t, c, "3")
	expectConn(t, c, "4")
	notReady.expectNothing(t, 10*time.Millisecond)
	r.retire()
	if r.toWorker(movedConn(t, "5"), netip.Addr{}) {
		t.Error("a connection reached a worker after retire")
	}
	a.expectNothing(t, 10*time.Millisecond)
}

// The predecessor's move socket: every connection sent on it reaches a
// worker, and its end closes fromPredecessor.
func TestRelayReceivesFromPredecessor(t *testing.T) {
	a := newFakeWorker(t, 0, 1, true)
	r := newRelay(quietLog(), workersOf(a), &countPermits{})
	pred, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	mine, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	r.receiveFrom(mine)
	if closed(r.fromPredecessor) {
		t.Fatal("done before the predecessor's end")
	}
	pred.Send(movedConn(t, "x"))
	pred.SendBody(ipc.Ping{}) // not a connection: dropped
	pred.Send(movedConn(t, "y"))
	pred.Close()
	expectConn(t, a, "x")
	expectConn(t, a, "y")
	select {
	case <-r.fromPredecessor:
	case <-time.After(waitLimit):
		t.Fatal("fromPredecessor not closed at the predecessor's end")
	}
}

// A connection a hurried worker moves goes to the successor's move socket.
func TestRelayToSuccessor(t *testing.T) {
	r := newRelay(quietLog(), workersOf(), &countPermits{})
	r.toSuccessor(movedConn(t, "lost"), netip.Addr{}) // no successor: closed, no panic
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	succ, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { succ.Close() })
	r.setSuccessor(mc)
	r.toSuccessor(movedConn(t, "z"), netip.Addr{})
	succ.SetReadDeadline(time.Now().Add(waitLimit))
	msg, err := succ.Recv()
	if err != nil || msg.Type != ipc.TypeConnection || len(msg.Files) != 2 {
		t.Fatalf("successor got %v %q (%d files), %v", msg.Type, msg.Payload, len(msg.Files), err)
	}
	if b, err := ipc.Decode(msg); err != nil || string(b.(ipc.Connection).State) != "z" {
		t.Fatalf("successor got %+v, %v; want the connection z", b, err)
	}
	msg.CloseFiles()
	r.closeSuccessor()
	if _, err := succ.Recv(); err == nil {
		t.Error("move socket still open after closeSuccessor")
	}
}

// countPermits is a movedPermits that counts the calls.
type countPermits struct {
	mu                             sync.Mutex
	nArrived, nNotArrived, nClosed int
	nSent                          int
}

func (p *countPermits) arrived(c *child) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c == nil {
		p.nClosed++
	} else {
		p.nArrived++
	}
}

func (p *countPermits) notArrived(*child) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nNotArrived++
}

func (p *countPermits) sentToSuccessor() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nSent++
}
