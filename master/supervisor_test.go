package master

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/ipc"
)

func TestCrashRecordBackoffAndBudget(t *testing.T) {
	var r crashRecord
	now := time.Unix(1_000_000, 0)
	var delays []time.Duration
	for range crashBudget {
		now = now.Add(time.Second)
		d, err := r.died(now.Add(-time.Second), now)
		if err != nil {
			t.Fatalf("gave up after %d crashes: %v", len(delays), err)
		}
		delays = append(delays, d)
	}
	if delays[0] != 0 || delays[1] != 100*time.Millisecond || delays[2] != 200*time.Millisecond || delays[len(delays)-1] != maxBackoff {
		t.Errorf("backoff %v; want 0, 100ms, 200ms ... %v", delays, maxBackoff)
	}
	// The 11th crash within the minute is over the budget.
	now = now.Add(time.Second)
	if _, err := r.died(now.Add(-time.Second), now); err == nil {
		t.Error("no error past the crash budget")
	}
	// A worker that ran for crashWindow did not crash.
	var r2 crashRecord
	if d, err := r2.died(now.Add(-crashWindow), now); d != 0 || err != nil || len(r2.crashes) != 0 {
		t.Errorf("long-lived worker counted as a crash: %v %v", d, err)
	}
}

func TestCrashRecordForgetsOldCrashes(t *testing.T) {
	var r crashRecord
	now := time.Unix(1_000_000, 0)
	// crashBudget crashes, then a quiet minute: the next one starts over.
	for range crashBudget {
		now = now.Add(time.Second)
		if _, err := r.died(now, now); err != nil {
			t.Fatal(err)
		}
	}
	now = now.Add(budgetWindow)
	d, err := r.died(now, now)
	if err != nil || d != 0 || len(r.crashes) != 1 {
		t.Errorf("after a quiet minute: delay %v, err %v, %d crashes recorded; want 0, nil, 1", d, err, len(r.crashes))
	}
}

// fakeStarts is a supervisor's start function that makes fake workers and
// records them.
type fakeStarts struct {
	t    *testing.T
	mu   sync.Mutex
	made []*fakeWorker
	fail error
	// run, if set, plays each worker made, in its own goroutine.
	run func(*fakeWorker)
}

func (f *fakeStarts) start(slot, id int) (*child, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	w := newFakeWorker(f.t, slot, id, false)
	f.made = append(f.made, w)
	if f.run != nil {
		go f.run(w)
	}
	return w.c, nil
}

func (f *fakeStarts) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.made)
}

func (f *fakeStarts) last() *fakeWorker {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.made[len(f.made)-1]
}

// A worker that keeps crashing restarts in its slot, under a new worker
// id, after growing delays, until the budget stops the master; no real
// time passes.
func TestSupervisorRestartsWithBackoffThenGivesUp(t *testing.T) {
	fs := &fakeStarts{t: t}
	s := newSupervisor(quietLog(), 2, fs.start, nil, func(*child, ipc.Message, ipc.Body) {})
	now := time.Unix(1_000_000, 0)
	s.now = func() time.Time { return now }
	var delays []time.Duration
	s.after = func(d time.Duration, f func()) {
		delays = append(delays, d)
		f() // due at once: the test's clock decides
	}
	for slot := range 2 {
		if err := s.spawn(slot); err != nil {
			t.Fatal(err)
		}
	}
	ids := map[int]bool{}
	for i := 0; ; i++ {
		w := fs.last()
		if ids[w.c.id] {
			t.Fatalf("worker id %d given twice", w.c.id)
		}
		ids[w.c.id] = true
		w.c.started = now
		now = now.Add(time.Second)
		w.w.Close() // the worker dies: its IPC ends, then it is reaped
		w.exit()
		var c *child
		select {
		case c = <-s.exits:
		case <-time.After(waitLimit):
			t.Fatal("exit not reported")
		}
		if c != w.c {
			t.Fatalf("reported worker %d; want %d", c.id, w.c.id)
		}
		s.remove(c)
		if s.list()[c.slot] != nil {
			t.Fatal("dead worker still listed")
		}
		if err := s.died(c); err != nil {
			if i != crashBudget {
				t.Fatalf("gave up after %d crashes; want %d: %v", i+1, crashBudget+1, err)
			}
			break
		}
		slot := <-s.respawn
		if slot != c.slot {
			t.Fatalf("respawn of slot %d; want %d", slot, c.slot)
		}
		s.restart(slot)
		if got := s.list()[slot]; got == nil || got.id == c.id {
			t.Fatal("slot not restarted under a new worker id")
		}
	}
	if delays[0] != 0 || delays[1] != 100*time.Millisecond || delays[len(delays)-1] != maxBackoff {
		t.Errorf("restart delays %v", delays)
	}
	if r := s.restarts()[1]; r != crashBudget {
		t.Errorf("slot 1 restarts %d; want %d", r, crashBudget)
	}
}

// A restart that fails to start is tried again after maxBackoff.
func TestSupervisorRetriesFailedStart(t *testing.T) {
	fs := &fakeStarts{t: t, fail: errors.New("no exec")}
	s := newSupervisor(quietLog(), 1, fs.start, nil, nil)
	var delay time.Duration
	s.after = func(d time.Duration, f func()) { delay = d; f() }
	s.restart(0)
	if delay != maxBackoff {
		t.Errorf("retry after %v; want %v", delay, maxBackoff)
	}
	if slot := <-s.respawn; slot != 0 {
		t.Errorf("respawn of slot %d", slot)
	}
}

// The supervisor answers Hello with the config, notes Ready and Stopped,
// and hands everything else to its handler.
func TestSupervisorReadsWorker(t *testing.T) {
	fs := &fakeStarts{t: t}
	handled := make(chan ipc.Body, 1)
	s := newSupervisor(quietLog(), 1, fs.start, []byte("workers: 1\n"), func(c *child, msg ipc.Message, b ipc.Body) { handled <- b })
	if err := s.spawn(0); err != nil {
		t.Fatal(err)
	}
	w := fs.last()
	w.w.SendBody(ipc.Hello{Proto: ipc.Version, Slot: 0})
	if _, b := w.recv(t); string(b.(ipc.Config).YAML) != "workers: 1\n" {
		t.Errorf("config %q", b.(ipc.Config).YAML)
	}
	w.w.SendBody(ipc.Ready{})
	w.w.SendBody(ipc.Stats{Delta: stats.Snapshot{Active: 2}})
	select {
	case b := <-handled:
		if b.(ipc.Stats).Delta.Active != 2 {
			t.Errorf("handled %+v", b)
		}
	case <-time.After(waitLimit):
		t.Fatal("stats not handed on")
	}
	if !w.c.isReady() {
		t.Error("Ready not noted")
	}
	errc := make(chan error, 1)
	go func() { errc <- s.waitReady(waitLimit) }()
	if err := <-errc; err != nil {
		t.Error(err)
	}
	w.w.SendBody(ipc.Stopped{})
	select {
	case <-w.c.stopped:
	case <-time.After(waitLimit):
		t.Fatal("Stopped not noted")
	}
	if kids := s.retire(); len(kids) != 1 || !s.isRetiring() {
		t.Errorf("retire returned %d workers", len(kids))
	}
	w.w.Close()
	if !s.waitReaders(waitLimit) {
		t.Error("reader still running after EOF")
	}
	w.exit()
	if c := <-s.exits; c != w.c {
		t.Error("wrong worker reported")
	}
}

// waitReady fails for a worker that exits before it is ready.
func TestSupervisorWaitReadyExited(t *testing.T) {
	fs := &fakeStarts{t: t}
	s := newSupervisor(quietLog(), 1, fs.start, nil, nil)
	if err := s.spawn(0); err != nil {
		t.Fatal(err)
	}
	fs.last().exit()
	if err := s.waitReady(waitLimit); err == nil {
		t.Error("no error for a worker that exited before ready")
	}
}

// A second Ready from a worker is refused (the worker is killed), and the
// master neither panics (it closed the ready channel twice) nor stops
// reading that worker.
func TestSupervisorDuplicateReady(t *testing.T) {
	fs := &fakeStarts{t: t}
	handled := make(chan ipc.Body, 1)
	s := newSupervisor(quietLog(), 1, fs.start, []byte("workers: 1\n"), func(c *child, msg ipc.Message, b ipc.Body) { handled <- b })
	if err := s.spawn(0); err != nil {
		t.Fatal(err)
	}
	w := fs.last()
	w.w.SendBody(ipc.Ready{})
	w.w.SendBody(ipc.Ready{})
	w.w.SendBody(ipc.Stats{Delta: stats.Snapshot{Active: 1}})
	select {
	case b := <-handled:
		if b.(ipc.Stats).Delta.Active != 1 {
			t.Errorf("handled %+v", b)
		}
	case <-time.After(waitLimit):
		t.Fatal("the worker's messages after a second Ready were not read")
	}
	if !w.c.isReady() {
		t.Error("first Ready not noted")
	}
	w.w.Close()
	if !s.waitReaders(waitLimit) {
		t.Error("reader did not end")
	}
}
