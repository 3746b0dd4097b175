package master

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// Crash policy: a worker that dies within crashWindow of its start crashed.
// Restarts back off from 0 to maxBackoff; more than crashBudget crashes
// within budgetWindow stop the master, so systemd can act.
const (
	crashWindow  = 5 * time.Second
	maxBackoff   = 5 * time.Second
	crashBudget  = 10
	budgetWindow = time.Minute
)

// crashRecord is the crash budget: the times of the recent crashes.
type crashRecord struct {
	crashes []time.Time
}

// died records a worker started at started that died at now. It returns
// how long to wait before the restart, and an error when the crashes
// within budgetWindow exceed crashBudget.
func (r *crashRecord) died(started, now time.Time) (time.Duration, error) {
	if now.Sub(started) >= crashWindow {
		return 0, nil
	}
	recent := r.crashes[:0]
	for _, t := range r.crashes {
		if now.Sub(t) < budgetWindow {
			recent = append(recent, t)
		}
	}
	r.crashes = append(recent, now)
	if len(r.crashes) > crashBudget {
		return 0, fmt.Errorf("workers crashed %d times within %v", len(r.crashes), budgetWindow)
	}
	// 0, 100ms, 200ms, 400ms ... up to maxBackoff.
	n := len(r.crashes) - 1
	if n == 0 {
		return 0, nil
	}
	return min(100*time.Millisecond<<(n-1), maxBackoff), nil
}

// workerHandler gets the messages of a worker that the supervisor does not
// handle itself (leases, stats, moved connections). It runs on the
// worker's reader goroutine and must not block for long: the worker's
// messages wait behind it.
type workerHandler func(c *child, msg ipc.Message, body ipc.Body)

// supervisor is the part that owns the worker processes: it starts one per
// slot, reads each one's messages until it exits, reports the exit on
// exits, and restarts it with the crash policy's backoff.
type supervisor struct {
	log *slog.Logger
	// n is the number of slots.
	n int
	// start starts the worker of slot under worker id (startChild, or a
	// fake in tests).
	start func(slot, id int) (*child, error)
	// configYAML is sent to each worker that says Hello.
	configYAML []byte
	// handle gets the messages the supervisor leaves to other parts.
	handle workerHandler
	// welcome, when set, is called right after a worker was sent its
	// config (the health part sends it the health table).
	welcome func(*child)
	// now and after are the clock (time.Now, time.AfterFunc; fakes in
	// tests).
	now   func() time.Time
	after func(d time.Duration, f func())

	// exits receives each worker once it has exited and its messages are
	// read; respawn a slot whose restart is due.
	exits   chan *child
	respawn chan int

	// readers counts the goroutines still reading a worker's messages
	// (which may move connections on to the successor).
	readers sync.WaitGroup

	// crashes is touched only by the master's loop.
	crashes crashRecord

	mu           sync.Mutex
	children     []*child // by slot; nil while a slot restarts
	slotRestarts []uint64 // by slot
	nextID       int      // the last worker id given
	retiring     bool     // the workers were told to retire or move
}

// newSupervisor returns a supervisor of n slots.
func newSupervisor(log *slog.Logger, n int, start func(slot, id int) (*child, error), configYAML []byte, handle workerHandler) *supervisor {
	return &supervisor{
		log: log, n: n, start: start, configYAML: configYAML, handle: handle,
		now: time.Now, after: func(d time.Duration, f func()) { time.AfterFunc(d, f) },
		exits: make(chan *child, 16), respawn: make(chan int, n),
		children: make([]*child, n), slotRestarts: make([]uint64, n),
	}
}

// spawn starts the worker of slot under a new worker id.
func (s *supervisor) spawn(slot int) error {
	s.mu.Lock()
	s.nextID++
	id := s.nextID
	s.mu.Unlock()
	c, err := s.start(slot, id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.children[slot] = c
	s.mu.Unlock()
	s.log.Debug("worker started", "slot", slot, "pid", c.pid(), "worker_id", id)
	s.readers.Add(1)
	go s.read(c)
	return nil
}

// restart spawns slot again; on failure it tries again after maxBackoff.
func (s *supervisor) restart(slot int) {
	if err := s.spawn(slot); err != nil {
		s.log.Error("restarting worker failed", "slot", slot, "err", err)
		s.after(maxBackoff, func() { s.respawn <- slot })
	}
}

// died records the death of c (already reaped) and schedules its restart
// on respawn, or returns an error when crashes exceed the budget.
func (s *supervisor) died(c *child) error {
	delay, err := s.crashes.died(c.started, s.now())
	if err != nil {
		return fmt.Errorf("master: %w (last: slot %d, %s); giving up", err, c.slot, c.exitStatus())
	}
	s.log.Warn("worker died; restarting", "slot", c.slot, "pid", c.pid(), "status", c.exitStatus(), "restart_in", delay)
	s.mu.Lock()
	s.slotRestarts[c.slot]++
	s.mu.Unlock()
	slot := c.slot
	s.after(delay, func() { s.respawn <- slot })
	return nil
}

// remove forgets c, which exited, if it still holds its slot.
func (s *supervisor) remove(c *child) {
	s.mu.Lock()
	if s.children[c.slot] == c {
		s.children[c.slot] = nil
	}
	s.mu.Unlock()
}

// list returns a copy of the workers by slot (nil where a slot restarts).
func (s *supervisor) list() []*child {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*child(nil), s.children...)
}

// restarts returns the restarts of each slot.
func (s *supervisor) restarts() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]uint64(nil), s.slotRestarts...)
}

// retire marks the workers as retiring and returns the live ones. From
// then on isRetiring is true.
func (s *supervisor) retire() []*child {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.retiring = true
	var kids []*child
	for _, c := range s.children {
		if c != nil {
			kids = append(kids, c)
		}
	}
	return kids
}

// isRetiring reports whether retire was called.
func (s *supervisor) isRetiring() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retiring
}

// waitReady waits until every worker has said Ready, at most timeout.
func (s *supervisor) waitReady(timeout time.Duration) error {
	deadline := time.After(timeout)
	for _, c := range s.list() {
		if c == nil {
			continue
		}
		select {
		case <-c.ready:
		case <-c.exited:
			return fmt.Errorf("master: worker %d (pid %d) exited before it was ready: %s", c.slot, c.pid(), c.exitStatus())
		case <-deadline:
			return fmt.Errorf("master: worker %d not ready within %v", c.slot, timeout)
		}
	}
	return nil
}

// waitReaders waits until every worker's messages are read, at most
// timeout, and reports whether they were.
func (s *supervisor) waitReaders(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		s.readers.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// read handles one worker's messages until its connection ends, then
// reports the worker on exits once it has exited.
func (s *supervisor) read(c *child) {
	defer func() {
		<-c.exited
		s.exits <- c
	}()
	defer s.readers.Done() // first: the reading has ended
	for {
		msg, err := c.conn.Recv()
		if err != nil {
			c.conn.Close()
			return
		}
		body, err := ipc.Decode(msg)
		if err != nil {
			msg.CloseFiles()
			s.log.Error("bad message from worker; killing it", "slot", c.slot, "pid", c.pid(), "err", err)
			c.kill()
			continue
		}
		switch body.(type) {
		case ipc.Hello:
			if err := c.conn.SendBody(ipc.Config{YAML: s.configYAML}); err != nil {
				s.log.Warn("sending config to worker failed", "slot", c.slot, "err", err)
			} else if s.welcome != nil {
				s.welcome(c)
			}
		case ipc.Stopped:
			c.stoppedOnce.Do(func() { close(c.stopped) })
		case ipc.Ready:
			first := false
			c.readyOnce.Do(func() { close(c.ready); first = true })
			if !first {
				// A worker says Ready once; anything else is a bug or
				// not our worker. It is replaced, as on a bad message.
				s.log.Error("worker said Ready twice; killing it", "slot", c.slot, "pid", c.pid())
				c.kill()
			}
		case ipc.Pong:
		default:
			s.handle(c, msg, body)
		}
		msg.CloseFiles()
	}
}
