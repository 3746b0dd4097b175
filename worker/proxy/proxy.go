// Package proxy copies bytes both ways between a client and a backend TCP
// connection.
//
// Bulk data moves with Linux splice(2) through the kernel: socket to pipe,
// pipe to socket, waiting through Go's poller (syscall.RawConn). An idle
// connection holds no pipe and no buffer: each direction first waits for
// readability on the socket itself (peeking one byte), and only then
// borrows a pipe and splices, with a read deadline that ends the wait for
// more data after holdPipe, so a pipe is borrowed only while data moves.
//
// The pipes come from a pool per Poller (one per worker): at most maxPipes
// are open at once, and a free one is closed once unused for pipeLinger,
// so a quiet worker holds none. A direction that finds no pipe within the
// bound copies through a user-space buffer instead. (Go's own splice,
// behind (*net.TCPConn).ReadFrom, keeps its pipes in a sync.Pool, unbounded
// and freed only by garbage collections a quiet worker never runs.)
//
// A FIN from one side is passed on as a half-close (CloseWrite) and the
// other direction keeps flowing. The idle timeout counts silence in both
// directions together: a long one-way download is not idle.
//
// A running pair can be detached (Pair.Detach) at a point where no byte is
// in flight in this process: every byte is either still in a socket's
// receive queue or already written to the other socket. Its sockets can
// then move to another process (over SCM_RIGHTS), which resumes the pair
// with Resume. That is how a reload moves long-lived connections from a
// generation that must exit to the next one.
package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/dupfd"
)

// parkAfter is how long a direction with a Poller waits for its source on
// a goroutine before it parks in the Poller (see wait).
//
// Long enough for the next bytes of a short exchange (a reply, a
// handshake's next flight, the FIN after it) on a loaded machine; short
// enough that a burst of new idle connections does not leave thousands of
// goroutines (and their stacks, kept by the runtime after they exit)
// behind: 500 ms added 2.4 KiB per idle connection to the worker's RSS
// after 9,950 connections opened in batches of 500.
const parkAfter = 50 * time.Millisecond

// holdPipe bounds how long a direction may wait for more bytes while it
// holds a splice pipe (two fds) in the middle of a stream.
const holdPipe = 20 * time.Millisecond

// Sentinel errors.
var (
	// ErrIdle is passed to Owner.Done when neither side sent a
	// byte for the idle timeout.
	ErrIdle = errors.New("proxy: idle timeout")
	// ErrDetached is passed to Owner.Done when the pair was
	// detached (Pair.Detach): its sockets were handed out, not closed.
	ErrDetached = errors.New("proxy: detached")
	// ErrClosed is returned by Pair.Detach for a pair that had already
	// ended or was closed before it could be detached.
	ErrClosed = errors.New("proxy: pair closed")
)

// longAgo is a deadline in the past: it wakes a goroutine waiting to read.
var longAgo = time.Unix(1, 0)

// Result says what a pair moved.
type Result struct {
	// In counts bytes copied client to backend; Out backend to client.
	In, Out int64
}

// Owner is told of a pair's progress and of its end: the connection the
// pair serves. Being an interface on a struct the caller has anyway, it
// costs a pair no closure.
type Owner interface {
	// Count is called from both directions as bytes move (in: client to
	// backend, out: backend to client), so a caller can report progress
	// of long connections; it must be cheap and safe for concurrent use.
	Count(in, out int64)
	// Done is called once, on one of the pair's goroutines, when both
	// directions have ended and both connections are closed (or handed
	// out: ErrDetached), with the byte counts and the first error other
	// than a clean EOF: ErrIdle, or a read or write error wrapped with its
	// direction.
	Done(Result, error)
}

// Pair copies between a client and a backend connection. Its zero value
// is ready for Start or Resume, once; it must not be copied after. It is a
// value, not a handle, so that the caller can embed it in its own
// per-connection struct: an idle connection is then one allocation.
type Pair struct{ p pair }

// Start copies client to backend and backend to client until both
// directions have ended, then closes both connections. A direction ends on
// EOF (passed on as CloseWrite) or on an error, which closes both
// connections at once. idle > 0 closes both when no byte moved either way
// for that long.
//
// Start returns at once: the two directions run on their own goroutines
// (or park in poller), and owner.Done is called (on one of them) when both
// have ended and both connections are closed; owner.Count as bytes move.
//
// This is what a server holding many idle connections wants: the caller's
// goroutine, whose stack grew while it sniffed and dialled, can exit.
//
// With a Poller, a direction that has nothing to read parks there instead of
// on a goroutine of its own (see Poller and wait), and the idle timeout is
// checked by the Poller's clock; an idle pair then holds no goroutine and
// no timer of its own. poller may be nil. The Pair may be closed at any
// time once started (a drain deadline).
func (h *Pair) Start(client, backend *net.TCPConn, idle time.Duration, poller *Poller, owner Owner) {
	h.Resume(client, backend, State{}, idle, poller, owner)
}

// State is what a detached pair had done: enough for Resume to go on where
// it stopped.
type State struct {
	// In and Out count the bytes moved so far, client to backend and
	// backend to client.
	In, Out int64
	// UpDone and DownDone report a direction that had ended: its source
	// sent a FIN, which was passed on (CloseWrite). Resume does not start
	// it again.
	UpDone, DownDone bool
	// Last is when a byte last moved either way (zero: now). The idle
	// timeout goes on counting from it.
	Last time.Time
}

// Resume is Start for a pair detached elsewhere (see Pair.Detach): client
// and backend are its sockets, st what it had done. The Result passed to
// owner.Done counts from st.In and st.Out.
func (h *Pair) Resume(client, backend *net.TCPConn, st State, idle time.Duration, poller *Poller, owner Owner) {
	p := &h.p
	p.client, p.backend, p.idle, p.poller, p.owner = client, backend, idle, poller, owner
	if st.Last.IsZero() {
		p.touch()
	} else {
		p.last.Store(st.Last.UnixNano())
	}
	p.up.p, p.up.up, p.up.n, p.up.ended = p, true, st.In, st.UpDone
	p.down.p, p.down.n, p.down.ended = p, st.Out, st.DownDone
	var live []*direction
	for _, d := range []*direction{&p.up, &p.down} {
		if !d.ended {
			live = append(live, d)
		}
	}
	if len(live) == 0 {
		// Both ways had ended: nothing to do but close.
		p.left.Store(1)
		p.finish()
		return
	}
	p.left.Store(int32(len(live)))
	// Every direction is set up before either starts: a started one may
	// abort the pair at once, which looks at both.
	_, cerr := client.SyscallConn()
	_, berr := backend.SyscallConn()
	if err := cmp.Or(cerr, berr); err != nil {
		// Only a conn without a socket has none (and it never gets one:
		// rc and wc can count on it): end both directions now.
		for _, d := range live {
			d.err = fmt.Errorf("proxy: %s: %w", d.name(), err)
		}
		for range live {
			p.abort()
			p.finish()
		}
		return
	}
	if idle > 0 {
		// Armed once both directions are set up (a resumed pair may be
		// idle already: the check is due at once and aborts).
		if poller != nil {
			p.clock = poller.clock
		} else {
			p.clock = newIdleClock()
		}
		p.clockIdx = notQueued
		p.clock.add(p, idleDue(p.last.Load(), idle))
	}
	for _, d := range live {
		if d.up && poller != nil {
			d.start()
			continue
		}
		go wait(d)
	}
}

// start parks the client-to-backend direction of a starting pair at once
// if the client has nothing queued. The client
// has just sent what it had (the sniffed bytes, replayed) and waits for
// the backend's answer: waiting for the client's next bytes on a goroutine
// for parkAfter first would only make a burst of new connections hold
// twice the goroutines, whose g structs the runtime keeps for good. The
// backend-to-client direction, whose answer is usually near, waits on a
// goroutine as usual.
func (d *direction) start() {
	ready, err := d.peekNow()
	switch {
	case err == nil && !ready && d.p.poller.park(d):
	case err != nil || ready:
		// Go on from what the look found: a reset is reported once
		// (reading the socket's error clears it), so looking again
		// would see an orderly EOF instead and half-close a pair the
		// client has torn down.
		go d.goOn(err)
	default:
		go wait(d)
	}
}

// goOn copies from what the last look at src found (d.eof, d.err, or
// bytes), as a wait that woke does.
func (d *direction) goOn(err error) {
	if d.run(err) {
		d.p.finish()
	}
}

// Close closes both connections at once; the pair then finishes as on any
// error, and Owner.Done is called. It is safe to call at any time after
// Start or Resume, more than once.
func (h *Pair) Close() { h.p.abort() }

// CloseWith is Close, with err passed to Owner.Done when the directions end
// without an error of their own (a closed socket is not one).
func (h *Pair) CloseWith(err error) { h.p.abortWith(err) }

// Detached is a pair stopped by Detach: its two sockets, as files the
// caller owns, and what it had done.
type Detached struct {
	Client, Backend *os.File
	State
}

// Close closes both files.
func (d *Detached) Close() {
	d.Client.Close()
	d.Backend.Close()
}

// Detach stops the pair where no byte is in flight here and hands its
// sockets out instead of closing them: each direction stops when it would
// next wait for its source (at once if it is waiting or parked), never in
// the middle of a splice, so every byte is either still queued in a socket
// or already written to the other one. A direction that ended before (a FIN
// passed on) stays ended and is reported in the State.
//
// Owner.Done is called with ErrDetached before Detach returns the sockets. If a
// direction cannot stop before ctx is done (it is blocked writing to a peer
// that does not read), or the pair ends or is closed meanwhile, the pair is
// closed as by Close and Detach returns an error (ctx's, ErrClosed, or why
// the sockets could not be taken). After BeginDetach, Detach waits for that
// detach; a pair that stopped already is returned even if ctx is done.
func (h *Pair) Detach(ctx context.Context) (*Detached, error) {
	p := &h.p
	stopped, ok := p.beginDetach(nil)
	if !ok {
		return nil, ErrClosed
	}
	select {
	case <-stopped:
	default:
		select {
		case <-stopped:
		case <-ctx.Done():
			p.abortWith(fmt.Errorf("proxy: could not detach in time: %w", ctx.Err()))
			<-stopped
		}
	}
	if e := p.end; e.detached != nil { // p.end was made by beginDetach
		return e.detached, nil
	} else if e.detachErr != nil {
		return nil, e.detachErr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return nil, ErrClosed
}

// BeginDetach starts a Detach without waiting: stopped is called once,
// from one of the pair's goroutines, when the pair has stopped (or ended,
// or been closed); Detach then returns at once. It reports false, and
// never calls stopped, when the pair had already ended or was closed
// (detached included).
// This lets a caller stop many pairs at once and collect them as they
// stop.
func (h *Pair) BeginDetach(stopped func()) bool {
	_, ok := h.p.beginDetach(stopped)
	return ok
}

// beginDetach sets the detach flag and wakes every waiting direction; it
// returns the channel closed once the pair has stopped, or false if the
// pair ended before any detach began.
func (p *pair) beginDetach(onStop func()) (<-chan struct{}, bool) {
	p.mu.Lock()
	if ((p.end == nil || p.end.stopped == nil) && p.closed) || (onStop != nil && p.finished) {
		p.mu.Unlock()
		return nil, false
	}
	e := p.ending()
	if e.stopped == nil {
		e.stopped = make(chan struct{})
	}
	stopped := e.stopped
	if onStop != nil {
		e.onStop = onStop
	}
	again := p.detach.Swap(true)
	p.mu.Unlock()
	if !again {
		// Wake every waiting direction: a parked one is resumed and sees
		// the flag; one waiting on a goroutine gets a read deadline in
		// the past. One mid-splice sees the flag when the splice returns
		// (within holdPipe of its start, unless it is blocked writing).
		p.resumeParked()
		p.client.SetReadDeadline(longAgo)
		p.backend.SetReadDeadline(longAgo)
	}
	return stopped, true
}

// finish runs when a direction ends; the last one closes up and reports,
// or, when the pair is being detached and no direction failed, hands the
// sockets out.
func (p *pair) finish() {
	if p.left.Add(-1) != 0 {
		return
	}
	if p.clock != nil {
		p.clock.remove(p)
	}
	res := Result{In: p.up.n, Out: p.down.n}
	p.mu.Lock()
	detach := p.detach.Load() && !p.closed && (p.up.stopped || p.down.stopped) &&
		p.up.err == nil && p.down.err == nil
	p.closed = true // no abort may close the sockets under us now
	p.finished = true
	var (
		stopped  chan struct{}
		onStop   func()
		abortErr error
	)
	if e := p.end; e != nil {
		stopped, onStop, abortErr = e.stopped, e.onStop, e.abortErr
	}
	p.mu.Unlock()
	if detach {
		d, err := p.takeFiles()
		if err == nil {
			p.end.detached = d // p.end was made by beginDetach
			p.owner.Done(res, ErrDetached)
			close(stopped)
			if onStop != nil {
				onStop()
			}
			return
		}
		p.end.detachErr = err
		p.up.err = err
	}
	p.client.Close()
	p.backend.Close()
	err := p.up.err
	if err == nil {
		err = p.down.err
	}
	if err == nil {
		err = abortErr
	}
	if p.idled.Load() {
		err = ErrIdle
	}
	p.owner.Done(res, err)
	if stopped != nil {
		close(stopped)
	}
	if onStop != nil {
		onStop()
	}
}

// takeFiles duplicates both sockets into files, then closes the
// connections (the sockets live on in the files), and returns them with
// the pair's state.
func (p *pair) takeFiles() (*Detached, error) {
	// The deadlines that woke the directions are kept per descriptor by
	// Go, not by the socket; clear them anyway, nothing waits any more.
	p.client.SetReadDeadline(time.Time{})
	p.backend.SetReadDeadline(time.Time{})
	c, err := dupfd.File(p.client, "client")
	if err != nil {
		return nil, fmt.Errorf("proxy: detach client: %w", err)
	}
	b, err := dupfd.File(p.backend, "backend")
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("proxy: detach backend: %w", err)
	}
	p.client.Close()
	p.backend.Close()
	return &Detached{Client: c, Backend: b, State: State{
		In: p.up.n, Out: p.down.n,
		UpDone: !p.up.stopped, DownDone: !p.down.stopped,
		Last: time.Unix(0, p.last.Load()),
	}}, nil
}

// pair is the state both directions share. Everything an idle pair does
// not need (why it was closed, a detach under way) is in end, made only
// then.
type pair struct {
	client, backend *net.TCPConn
	poller          *Poller // nil: directions wait on goroutines only
	owner           Owner
	idle            time.Duration
	// clock checks, when the pair may have been idle for the timeout,
	// whether it was (nil without a timeout); clockIdx is the pair's
	// place in it, under clock.mu. Socket deadlines would not do: a
	// write deadline expiring mid-splice drops the bytes already in the
	// pipe.
	clock *idleClock
	// last is the time of the last byte moved in either direction, in
	// UnixNano. A direction blocked writing to a peer that does not read
	// does not move it, so such a pair is idle too.
	last  atomic.Int64
	idled atomic.Bool

	// detach is set by Detach; a direction that sees it stops instead of
	// waiting for its source again.
	detach atomic.Bool
	// mu guards closed (the sockets were closed, or are being handed
	// out), finished and end.
	mu       sync.Mutex
	closed   bool
	finished bool // finish has run (or is running)
	end      *ending

	left     atomic.Int32 // directions still running
	clockIdx int32
	up, down direction
}

// ending is what a pair keeps once it is being closed or detached.
type ending struct {
	abortErr error // why the pair was closed, if not by Close
	// stopped is closed once the pair has finished either way; made by
	// Detach, with onStop (BeginDetach's callback).
	stopped chan struct{}
	onStop  func()
	// detached, or detachErr when taking the sockets failed, is set
	// before stopped is closed.
	detached  *Detached
	detachErr error
}

// ending returns p.end, made if need be; p.mu must be held.
func (p *pair) ending() *ending {
	if p.end == nil {
		p.end = new(ending)
	}
	return p.end
}

func (p *pair) touch() { p.last.Store(time.Now().UnixNano()) }

// checkIdle runs when the clock finds the pair's check due: close the
// pair if it has been idle for the timeout, else queue the check again
// for the end of the new idle period.
func (p *pair) checkIdle() {
	if due := idleDue(p.last.Load(), p.idle); time.Now().UnixNano() < due {
		p.clock.add(p, due)
		return
	}
	p.idled.Store(true)
	p.abort()
}

// abort closes both connections, which ends both directions; a direction
// parked in a Poller is resumed to find its socket closed.
func (p *pair) abort() { p.abortWith(nil) }

// abortWith is abort with the error Owner.Done gets when the directions end
// without one of their own (a closed socket is not one).
func (p *pair) abortWith(err error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	if err != nil {
		p.ending().abortErr = err
	}
	p.mu.Unlock()
	p.client.Close()
	p.backend.Close()
	p.resumeParked()
}

// resumeParked resumes the directions parked in a Poller.
func (p *pair) resumeParked() {
	for _, d := range []*direction{&p.up, &p.down} {
		// Taken first: once it is ours, nobody parks it again (with a
		// new parkID) while unpark reads it.
		if d.p.poller != nil && d.state.CompareAndSwap(parked, running) {
			d.p.poller.unpark(d)
			go wait(d)
		}
	}
}

// direction is one half of a pair: client to backend (up) or backend to
// client. Its sockets, raw connections and pipes are the pair's, chosen
// by up (src, dst, rc, wc, pipes).
type direction struct {
	p *pair
	n int64

	// Copy state, used by one goroutine at a time.
	parkID uint64
	// err is why the direction ended; while it runs, the error a peek
	// found (see peek), which ends it.
	err   error
	state atomic.Int32 // running or parked
	up    bool
	// ended is set for a direction that had ended before a Resume.
	ended bool
	// stopped is set when the direction stopped for a detach rather
	// than ended.
	stopped bool
	eof     bool
	kept    bool // keepAlive has run
	one     [1]byte
}

// src returns the socket d reads.
func (d *direction) src() *net.TCPConn {
	if d.up {
		return d.p.client
	}
	return d.p.backend
}

// dst returns the socket d writes.
func (d *direction) dst() *net.TCPConn {
	if d.up {
		return d.p.backend
	}
	return d.p.client
}

// rc returns src's raw connection. It is made on each call (8 bytes)
// rather than kept: an idle pair holds none. Resume checked that both
// sockets have one.
func (d *direction) rc() syscall.RawConn {
	rc, _ := d.src().SyscallConn()
	return rc
}

// wc returns dst's raw connection, as rc.
func (d *direction) wc() syscall.RawConn {
	wc, _ := d.dst().SyscallConn()
	return wc
}

// pipes returns the pool d borrows pipes and buffers from; nil (a pipe of
// its own for each transfer) without a Poller.
func (d *direction) pipes() *pipePool {
	if d.p.poller == nil {
		return nil
	}
	return d.p.poller.pipes
}

// name names d in errors.
func (d *direction) name() string {
	if d.up {
		return "client to backend"
	}
	return "backend to client"
}

// run copies, starting from the result of the wait that woke it, until
// the direction ends (true), or until it would wait again: then a fresh
// goroutine waits (see copy) and run returns false.
func (d *direction) run(woke error) (finished bool) {
	err, handedOff := d.copy(woke)
	if handedOff {
		return false
	}
	if d.stopped {
		return true
	}
	if err != nil {
		if !errors.Is(err, net.ErrClosed) {
			d.err = fmt.Errorf("proxy: %s: %w", d.name(), err)
		}
		d.p.abort()
		return true
	}
	// Clean EOF from src: pass the FIN on; the other direction goes on.
	if err := d.dst().CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		d.err = fmt.Errorf("proxy: %s: close write: %w", d.name(), err)
		d.p.abort()
	}
	return true
}

// peek reports whether src has something to read, without consuming it:
// bytes (ok), EOF (d.eof) or an error (d.err); ok is false when nothing
// is there yet. It is the callback of syscall.RawConn.Read (false means
// "wait for readability") and of RawConn.Control (no waiting).
func (d *direction) peek(fd uintptr) (ok bool) {
	n, _, err := unix.Recvfrom(int(fd), d.one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return false
	case err != nil:
		d.err = err
	case n == 0:
		d.eof = true
	}
	return true
}

// peekNow looks at src once, without waiting: ready reports bytes, EOF
// (d.eof) or an error (d.err) there; err is the socket's (closed).
func (d *direction) peekNow() (ready bool, err error) {
	d.eof, d.err = false, nil
	err = d.rc().Control(func(fd uintptr) { ready = d.peek(fd) })
	return ready, err
}

// copy moves bytes until EOF (nil), an error, or until nothing is queued
// after a transfer (handedOff): the goroutine's stack grew in the splice
// path, so rather than park with it, copy starts a fresh goroutine (2 KiB
// of stack) to wait for the next bytes and returns. An idle pair thus holds
// two small parked goroutines and no pipe or buffer. woke is the error of
// the wait that found the first bytes (their state is in d).
func (d *direction) copy(woke error) (err error, handedOff bool) {
	err = woke
	for {
		if err == nil && d.err != nil {
			// A peek's error; run records it wrapped (it is never
			// net.ErrClosed).
			err = os.NewSyscallError("recvfrom", d.err)
		}
		if err != nil {
			return err, false
		}
		if d.eof {
			return nil, false
		}
		if d.p.detach.Load() {
			// A safe point: whatever is queued stays in src.
			d.stopped = true
			return nil, false
		}
		// What is queued first goes through a buffer: a short message
		// (a handshake flight, a request, a reply) costs one read and
		// one write and no pipe. Only a read that fills the buffer, the
		// start of a stream, goes on with splice.
		n, full, err := d.copySmall()
		if n > 0 {
			d.moved(n)
		}
		if err != nil {
			return err, false
		}
		if d.eof {
			return nil, false
		}
		if !full {
			// The next bytes are waited for on a fresh goroutine (its
			// first look at the socket finds them if they came already).
			go wait(d)
			return nil, true
		}
		// Splice what is queued and whatever follows, letting the splice
		// loop wait for more while the stream flows; the read deadline
		// ends that wait holdPipe after it began, so a pipe is held at most
		// that long past the last byte. A read deadline is safe here: it
		// can only end a wait for src with the pipe empty, never a write
		// of bytes already spliced in.
		d.src().SetReadDeadline(time.Now().Add(holdPipe))
		n, err = d.transfer()
		d.src().SetReadDeadline(time.Time{})
		switch {
		case err == nil:
			// transfer ends without error only at EOF.
			d.eof = true
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = nil
		}
		if n > 0 {
			d.moved(n)
		}
		if err != nil {
			return err, false
		}
		if d.eof {
			return nil, false
		}
		var ready bool
		ready, err = d.peekNow()
		if err == nil && !ready {
			go wait(d)
			return nil, true
		}
	}
}

// moved counts n bytes copied.
func (d *direction) moved(n int64) {
	d.n += n
	if d.up {
		d.p.owner.Count(n, 0)
	} else {
		d.p.owner.Count(0, n)
	}
	d.p.touch()
}

// copySmall reads what src has queued into a buffer, without waiting, and
// writes it all to dst. full reports a read that filled the buffer (more
// is likely queued: a stream); EOF sets d.eof.
func (d *direction) copySmall() (n int64, full bool, err error) {
	b := d.pipes().buf()
	defer d.pipes().putBuf(b)
	var (
		m    int
		rerr error
	)
	if err := d.rc().Control(func(fd uintptr) {
		for {
			m, rerr = unix.Read(int(fd), *b)
			if rerr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return 0, false, err
	}
	switch {
	case rerr == unix.EAGAIN:
		return 0, false, nil // nothing after all: wait again
	case rerr != nil:
		return 0, false, os.NewSyscallError("read", rerr)
	case m == 0:
		d.eof = true
		return 0, false, nil
	}
	w, err := d.dst().Write((*b)[:m])
	return int64(w), m == len(*b), err
}

// wait is where every goroutine of a direction starts: it waits, with the
// shallowest stack possible, until src is readable, then copies. Named for
// stack dumps.
//
// With a Poller, it waits on its goroutine for parkAfter at most, then
// parks the direction in the Poller and exits: a short connection, whose
// next bytes come within milliseconds, never registers with the Poller
// (two epoll_ctl calls and a goroutine hand-off per wait saved), and an
// idle one holds no goroutine once parkAfter has passed.
func wait(d *direction) {
	grace := d.p.poller != nil
	for {
		if grace {
			// Set before the detach flag is read: a Detach that sets the
			// flag after this line also moves the deadline to longAgo,
			// one that set it before is seen below.
			d.src().SetReadDeadline(time.Now().Add(parkAfter))
		} else {
			d.keepAlive()
		}
		if d.p.detach.Load() {
			d.stopped = true
			d.p.finish()
			return
		}
		d.eof, d.err = false, nil
		err := d.rc().Read(d.peek)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			if d.p.detach.Load() {
				d.stopped = true
				d.p.finish()
				return
			}
			if grace {
				// Quiet for parkAfter, or the deadline passed before the
				// first look (a stalled machine): look once more, then
				// park without a goroutine.
				d.src().SetReadDeadline(time.Time{})
				if ready, err := d.peekNow(); err == nil && ready {
					d.goOn(nil)
					return
				}
				d.keepAlive()
				if d.p.poller.park(d) {
					return
				}
				grace = false
				continue
			}
		}
		if d.run(err) {
			d.p.finish()
		}
		return
	}
}

// keepAlive turns TCP keep-alive on for the backend socket the first time
// its direction waits long (parks): a connection that ends within
// parkAfter never needs it, and the four setsockopt calls of a dial with
// keep-alive are a tenth of a short connection's system calls. Only the
// direction reading the backend sets it, once; the client socket has it
// from its listener.
func (d *direction) keepAlive() {
	if d.up || d.kept || d.p.poller == nil || !d.p.poller.keepAlive.Enable {
		return
	}
	d.kept = true
	d.src().SetKeepAliveConfig(d.p.poller.keepAlive)
}
