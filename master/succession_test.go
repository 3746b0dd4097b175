package master

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/ipc"
)

// fakeFlipper stands in for tableflip's Upgrader: it records the calls in
// order, keeps the files added for the successor, and gives the files
// inherited from a predecessor.
type fakeFlipper struct {
	t         *testing.T
	mu        sync.Mutex
	calls     []string
	added     map[string]*os.File
	inherited map[string]*os.File
	// onAdd, waitParent and upgrade script the calls (nil: succeed).
	onAdd      func(name string) string
	waitParent func(ctx context.Context) error
	upgrade    func(call int) error
	upgrades   int
}

func newFakeFlipper(t *testing.T) *fakeFlipper {
	f := &fakeFlipper{t: t, added: map[string]*os.File{}, inherited: map[string]*os.File{}}
	t.Cleanup(func() {
		for _, file := range f.added {
			file.Close()
		}
	})
	return f
}

func (f *fakeFlipper) record(call string) {
	f.mu.Lock()
	f.calls = append(f.calls, call)
	f.mu.Unlock()
}

func (f *fakeFlipper) callList() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeFlipper) AddFile(name string, file *os.File) error {
	fd, err := syscall.Dup(int(file.Fd()))
	if err != nil {
		return err
	}
	note := ""
	if f.onAdd != nil {
		note = f.onAdd(name)
	}
	f.record("add " + name + note)
	f.mu.Lock()
	f.added[name] = os.NewFile(uintptr(fd), name)
	f.mu.Unlock()
	return nil
}

func (f *fakeFlipper) File(name string) (*os.File, error) {
	file := f.inherited[name]
	delete(f.inherited, name)
	return file, nil
}

func (f *fakeFlipper) WaitForParent(ctx context.Context) error {
	f.record("WaitForParent")
	if f.waitParent != nil {
		return f.waitParent(ctx)
	}
	return nil
}

func (f *fakeFlipper) Upgrade() error {
	f.record("Upgrade")
	f.upgrades++
	if f.upgrade != nil {
		return f.upgrade(f.upgrades)
	}
	return nil
}

// successorEnd returns the successor's end of the state socket, once added.
func (f *fakeFlipper) successorEnd() *stateSocket {
	f.mu.Lock()
	file := f.added[stateSocketName]
	delete(f.added, stateSocketName)
	f.mu.Unlock()
	s, err := newStateSocket(file)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(s.close)
	return s
}

// parts is a succession and the parts it works on, without processes.
type parts struct {
	upg        *fakeFlipper
	counters   *counters
	broker     *broker
	relay      *relay
	sup        *supervisor
	fs         *fakeStarts
	succession *succession
}

func newParts(t *testing.T, workers int) *parts {
	p := &parts{upg: newFakeFlipper(t), counters: &counters{}, fs: &fakeStarts{t: t}}
	p.sup = newSupervisor(quietLog(), workers, p.fs.start, nil, func(*child, ipc.Message, ipc.Body) {})
	for slot := range workers {
		if err := p.sup.spawn(slot); err != nil {
			t.Fatal(err)
		}
		close(p.fs.last().c.ready)
	}
	p.broker = newBroker(quietLog(), 10, p.sup.list)
	p.relay = newRelay(quietLog(), p.sup.list, p.broker)
	p.succession = newSuccession(quietLog(), p.upg, p.counters, p.broker, p.relay, p.sup, false)
	return p
}

// predecessor is the test's side of an inherited predecessor.
type predecessor struct {
	state *stateSocket
	move  *ipc.Conn
}

// inheritFrom makes p's succession inherit from a predecessor of
// generation gen that sends st, and returns the predecessor's ends.
func (p *parts) inheritFrom(t *testing.T, st successionState) *predecessor {
	t.Helper()
	mine, theirs, err := socketPair("state")
	if err != nil {
		t.Fatal(err)
	}
	pred, err := newStateSocket(mine)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pred.close)
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mc.Close() })
	p.upg.inherited[stateSocketName] = theirs
	p.upg.inherited[moveSocketName] = wf
	if err := pred.send(stateMsg{State: &st}); err != nil {
		t.Fatal(err)
	}
	if err := p.succession.inherit(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.succession.close)
	return &predecessor{state: pred, move: mc}
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// What a successor inherits: generation, counters, the predecessor's
// reserve, which shrinks with its reserve messages and ends with it.
func TestInheritFromPredecessor(t *testing.T) {
	p := newParts(t, 0)
	pred := p.inheritFrom(t, successionState{Generation: 3, Totals: stats.Snapshot{Active: 4, BytesIn: 10},
		Restarts: 2, ReloadsOK: 5, ReloadsFailed: 1, Reserve: 4})
	if p.succession.generation != 4 {
		t.Errorf("generation %d; want 4", p.succession.generation)
	}
	if pr := p.counters.process(); pr.WorkerRestarts != 2 || pr.ReloadsOK != 5 || pr.ReloadsFailed != 1 {
		t.Errorf("counters %+v", pr)
	}
	if free := p.broker.pool.Free(); free != 6 {
		t.Errorf("free %d; want 10 - reserve 4", free)
	}
	pred.state.send(stateMsg{Delta: &stats.Snapshot{Active: -1, BytesIn: 5}})
	r := 3
	pred.state.send(stateMsg{Reserve: &r})
	waitUntil(t, "the reserve message", func() bool { return p.broker.pool.Free() == 7 })
	if s := p.counters.snapshot(); s.Active != 3 || s.BytesIn != 15 {
		t.Errorf("totals %+v; want active 3, bytes in 15", s)
	}
	// The predecessor exits: its connections and reserve go with it.
	pred.state.close()
	pred.move.Close()
	waitUntil(t, "the predecessor's exit", func() bool { return closed(p.succession.predecessorDone) })
	if s := p.counters.snapshot(); s.Active != 0 || s.BytesIn != 15 {
		t.Errorf("totals %+v after the predecessor exited; want active 0, bytes in 15", s)
	}
	if free := p.broker.pool.Free(); free != 10 {
		t.Errorf("free %d after the predecessor exited; want 10", free)
	}
	waitUntil(t, "the move socket's end", func() bool { return closed(p.relay.fromPredecessor) })
}

// A reload requested while the predecessor still drains: hurry it, wait
// for its exit, its last counts and the connections it moves; only then
// attach the successor and upgrade (again while tableflip has not seen the
// exit), and the successor's Ready ends it.
func TestReloadWhilePredecessorDrainsHurriesFirst(t *testing.T) {
	p := newParts(t, 1)
	w := p.fs.last()
	pred := p.inheritFrom(t, successionState{Generation: 1, Totals: stats.Snapshot{Active: 2}, Reserve: 2})
	parentExited := make(chan struct{})
	p.upg.waitParent = func(ctx context.Context) error {
		select {
		case <-parentExited:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.upg.onAdd = func(name string) string {
		return fmt.Sprintf(" (predecessor done %v, moves done %v)", closed(p.succession.predecessorDone), closed(p.relay.fromPredecessor))
	}
	var successor *stateSocket
	p.upg.upgrade = func(call int) error {
		if call == 1 {
			return errors.New("parent hasn't exited") // tableflip's text
		}
		successor = p.upg.successorEnd()
		return successor.send(stateMsg{Ready: &readyInfo{PID: 99, Generation: 3}})
	}
	done := make(chan reloadOutcome, 1)
	go p.succession.reload(time.Now(), done)

	if m := recvState(t, pred.state); !m.Hurry {
		t.Fatalf("predecessor got %+v; want Hurry first", m)
	}
	// The hurried predecessor sends its last counts and moves a connection,
	// then exits.
	pred.state.send(stateMsg{Delta: &stats.Snapshot{Active: -1, BytesOut: 7}})
	if err := pred.move.Send(movedConn(t, "st")); err != nil {
		t.Fatal(err)
	}
	msg, b := w.recv(t)
	msg.CloseFiles()
	if c, ok := b.(ipc.Connection); !ok || string(c.State) != "st" || len(msg.Files) != 2 {
		t.Fatalf("worker got %T %+v with %d files; want the moved connection", b, b, len(msg.Files))
	}
	pred.state.close()
	pred.move.Close()
	close(parentExited)

	var out reloadOutcome
	select {
	case out = <-done:
	case <-time.After(waitLimit):
		t.Fatal("reload did not end")
	}
	if out.err != nil || out.ready.PID != 99 || out.ready.Generation != 3 || out.successor == nil {
		t.Fatalf("outcome %+v", out)
	}
	want := []string{"WaitForParent",
		"add handover (predecessor done true, moves done true)",
		"add migrate (predecessor done true, moves done true)",
		"Upgrade", "Upgrade"}
	if got := p.upg.callList(); !slices.Equal(got, want) {
		t.Errorf("calls %q; want %q", got, want)
	}
	// The succession state sent on has the predecessor's last counts, and
	// none of its connections (it has exited).
	if m := recvState(t, successor); m.State == nil || m.State.Generation != 2 || m.State.Totals.Active != 0 || m.State.Totals.BytesOut != 7 {
		t.Errorf("succession state %+v", m.State)
	}
	if !p.relay.hasSuccessor() {
		t.Error("no move socket to the successor")
	}
}

// A reload without a predecessor goes straight to the successor; a
// failed Upgrade detaches it again, and tableflip's "parent hasn't
// exited" is not retried when there is no predecessor.
func TestReloadFailureDetachesSuccessor(t *testing.T) {
	p := newParts(t, 0)
	p.upg.upgrade = func(int) error { return errors.New("parent hasn't exited") }
	done := make(chan reloadOutcome, 1)
	go p.succession.reload(time.Now(), done)
	out := <-done
	if out.err == nil || out.successor != nil {
		t.Fatalf("outcome %+v; want an error", out)
	}
	if got, want := p.upg.callList(), []string{"add handover", "add migrate", "Upgrade"}; !slices.Equal(got, want) {
		t.Errorf("calls %q; want %q", got, want)
	}
	if p.relay.hasSuccessor() || p.broker.successor != nil || p.counters.successor != nil {
		t.Error("a part still sends to the failed successor")
	}
}

// A predecessor that does not exit when hurried fails the reload.
func TestReloadPredecessorDoesNotExit(t *testing.T) {
	p := newParts(t, 0)
	p.inheritFrom(t, successionState{Generation: 1})
	p.upg.waitParent = func(context.Context) error { return context.DeadlineExceeded }
	done := make(chan reloadOutcome, 1)
	go p.succession.reload(time.Now(), done)
	if out := <-done; !errors.Is(out.err, context.DeadlineExceeded) {
		t.Errorf("outcome %+v; want the wait's error", out)
	}
	if got := p.upg.callList(); !slices.Equal(got, []string{"WaitForParent"}) {
		t.Errorf("calls %q; want only the wait", got)
	}
}

// Hurried by its successor, a generation's workers are told to move their
// connections (or, with nowhere to move them or the NoMove control, to
// stop), after which the relay takes no more from the predecessor.
func TestHurry(t *testing.T) {
	for _, tc := range []struct {
		name      string
		successor bool
		noMove    bool
		want      ipc.Body
	}{
		{"move", true, false, ipc.Move{}},
		{"no successor", false, false, ipc.Stop{}},
		{"no move control", true, true, ipc.Stop{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newParts(t, 2)
			p.succession.noMove = tc.noMove
			if tc.successor {
				mc, wf, err := ipc.Pair()
				if err != nil {
					t.Fatal(err)
				}
				wf.Close()
				t.Cleanup(func() { mc.Close() })
				p.relay.setSuccessor(mc)
			}
			p.succession.hurry()
			for _, w := range p.fs.made {
				if _, b := w.recv(t); b != tc.want {
					t.Errorf("worker got %T; want %T", b, tc.want)
				}
			}
			if !p.sup.isRetiring() {
				t.Error("supervisor not retiring")
			}
			if p.relay.toWorker(ipc.Message{Type: ipc.TypeConnection}, netip.Addr{}) {
				t.Error("a moved connection reached a worker after the hurry")
			}
		})
	}
}

func TestParentNotExitedYet(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{errors.New("parent hasn't exited"), true},
		{errors.New("upgrade in progress"), false},
		{errors.New("process is not ready yet"), false},
	} {
		if got := parentNotExitedYet(tc.err); got != tc.want {
			t.Errorf("parentNotExitedYet(%v) = %v", tc.err, got)
		}
	}
	// The text is tableflip v1.2.3's (upgrader.go, Upgrader.run); another
	// version must be read again before this test is changed.
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(mod), "github.com/cloudflare/tableflip v1.2.3\n") {
		t.Error("tableflip is no longer v1.2.3: check that Upgrade still refuses with \"parent hasn't exited\"")
	}
}

func TestReloadQueue(t *testing.T) {
	var q reloadQueue
	a := reloadRequest{reply: make(chan reloadResult, 1)}
	b := reloadRequest{reply: make(chan reloadResult, 1)}
	if q.busy() || !q.add(a) {
		t.Fatal("first request does not start a reload")
	}
	if q.add(b) || !q.busy() {
		t.Fatal("second request starts another reload while one runs")
	}
	q.answer(reloadResult{Generation: 2})
	if (<-a.reply).Generation != 2 || (<-b.reply).Generation != 2 {
		t.Error("not every request got the result")
	}
	if q.busy() || !q.add(a) {
		t.Error("a request after the answer does not start a reload")
	}
}
