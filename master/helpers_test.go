package master

import (
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// waitLimit bounds every wait for an event in these tests.
const waitLimit = 5 * time.Second

// quietLog discards the parts' logs.
func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fakeWorker is a child without a process: the master's end of an ipc
// pair in c, the worker's end in w.
type fakeWorker struct {
	c *child
	w *ipc.Conn
}

// newFakeWorker returns a worker of slot with worker id, ready if ready.
func newFakeWorker(t *testing.T, slot, id int, ready bool) *fakeWorker {
	t.Helper()
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	w, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{slot: slot, id: id, conn: mc, started: time.Now(),
		ready: make(chan struct{}), stopped: make(chan struct{}), exited: make(chan struct{})}
	if ready {
		close(c.ready)
	}
	t.Cleanup(func() {
		mc.Close()
		w.Close()
	})
	return &fakeWorker{c: c, w: w}
}

// exit marks the fake worker's process as exited.
func (f *fakeWorker) exit() { close(f.c.exited) }

// recv returns the next message the master sent the worker, decoded,
// failing the test after waitLimit.
func (f *fakeWorker) recv(t *testing.T) (ipc.Message, ipc.Body) {
	t.Helper()
	f.w.SetReadDeadline(time.Now().Add(waitLimit))
	msg, err := f.w.Recv()
	if err != nil {
		t.Fatalf("worker %d: receiving: %v", f.c.id, err)
	}
	b, err := ipc.Decode(msg)
	if err != nil {
		t.Fatalf("worker %d: decoding %v: %v", f.c.id, msg.Type, err)
	}
	return msg, b
}

// expectNothing fails the test if the master sends the worker anything
// within d.
func (f *fakeWorker) expectNothing(t *testing.T, d time.Duration) {
	t.Helper()
	f.w.SetReadDeadline(time.Now().Add(d))
	if msg, err := f.w.Recv(); err == nil {
		t.Fatalf("worker %d got an unexpected %v", f.c.id, msg.Type)
	}
}

// workersOf returns the children of fakes, for a part's workers func.
func workersOf(fakes ...*fakeWorker) func() []*child {
	return func() []*child {
		var kids []*child
		for _, f := range fakes {
			kids = append(kids, f.c)
		}
		return kids
	}
}

// waitUntil waits for cond, failing the test after waitLimit.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// stateSocketPair returns two connected state sockets.
func stateSocketPair(t *testing.T) (a, b *stateSocket) {
	t.Helper()
	fa, fb, err := socketPair("test")
	if err != nil {
		t.Fatal(err)
	}
	a, err = newStateSocket(fa)
	if err != nil {
		t.Fatal(err)
	}
	b, err = newStateSocket(fb)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.close()
		b.close()
	})
	return a, b
}

// recvState reads one message from s, failing the test after waitLimit.
func recvState(t *testing.T, s *stateSocket) stateMsg {
	t.Helper()
	s.conn.SetReadDeadline(time.Now().Add(waitLimit))
	m, err := s.recv()
	if err != nil {
		t.Fatalf("state socket: %v", err)
	}
	return m
}

// tempFile returns an open file that the test closes.
func tempFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "conn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
