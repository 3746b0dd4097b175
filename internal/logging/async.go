package logging

import (
	"io"
	"sync"
)

// AsyncQueue is how many bytes of log records an Async holds queued at
// most: about 3,000 access-log lines.
const AsyncQueue = 1 << 20

// Async is an io.Writer that queues each Write (one log record: slog's
// handlers write a record with one Write) and writes what is queued from a
// goroutine of its own, all of it at once. A worker's event loop logs each
// connection it ends on its one thread; with Async that costs it a copy,
// not a system call, and a slow file or a pipe nobody reads (a stalled
// journal) does not stall every connection of the worker, until max bytes
// are queued: then a Write waits for room, as a plain write would have
// waited, so memory stays bounded and no line is dropped. Records keep
// their order. Close writes what is queued and stops the goroutine; a
// Write after Close goes straight through.
type Async struct {
	w   io.Writer
	max int

	mu     sync.Mutex
	room   sync.Cond // broadcast when the queue has been taken
	q      []byte
	closed bool
	kick   chan struct{} // capacity 1; closed by Close
	done   chan struct{}
}

// NewAsync returns an Async writing to w, with at most max bytes queued
// (a single larger record is queued alone).
func NewAsync(w io.Writer, max int) *Async {
	a := &Async{w: w, max: max, kick: make(chan struct{}, 1), done: make(chan struct{})}
	a.room.L = &a.mu
	go a.run()
	return a
}

// Write queues a copy of p; it waits only while the queue is full.
func (a *Async) Write(p []byte) (int, error) {
	a.mu.Lock()
	for !a.closed && len(a.q) > 0 && len(a.q)+len(p) > a.max {
		a.room.Wait()
	}
	if a.closed {
		a.mu.Unlock()
		<-a.done // after what was queued
		return a.w.Write(p)
	}
	a.q = append(a.q, p...)
	select {
	case a.kick <- struct{}{}:
	default: // the goroutine is kicked already
	}
	a.mu.Unlock()
	return len(p), nil
}

// run writes what is queued each time it is kicked, and the rest once
// closed.
func (a *Async) run() {
	defer close(a.done)
	var batch []byte
	for {
		_, open := <-a.kick
		a.mu.Lock()
		batch, a.q = a.q, batch[:0]
		a.room.Broadcast()
		a.mu.Unlock()
		if len(batch) > 0 {
			a.w.Write(batch) // as slog does, a failed log write is not reported
		}
		if !open {
			return
		}
	}
}

// Close writes what is queued and stops; it returns once written.
func (a *Async) Close() error {
	a.mu.Lock()
	if !a.closed {
		a.closed = true
		close(a.kick)
	}
	a.mu.Unlock()
	<-a.done
	return nil
}
