// Package proxy copies bytes both ways between a client and a backend TCP
// connection.
//
// Bulk data moves with Linux splice(2) through the kernel: each direction
// hands *net.TCPConn to (*net.TCPConn).ReadFrom, never a wrapper that would
// force a user-space copy. An idle connection holds no pipe and no buffer:
// each direction first waits for readability on the socket itself (through
// syscall.RawConn, peeking one byte), and only then splices, with a read
// deadline that ends the splice's own wait for more data after holdPipe, so
// Go's splice pipe is borrowed only while data moves.
//
// A FIN from one side is passed on as a half-close (CloseWrite) and the
// other direction keeps flowing. The idle timeout counts silence in both
// directions together: a long one-way download is not idle.
package proxy

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// holdPipe bounds how long a direction may wait for more bytes while it
// holds a splice pipe (two fds) in the middle of a stream.
const holdPipe = 20 * time.Millisecond

// ErrIdle is returned by Pipe when neither side sent a byte for the idle
// timeout.
var ErrIdle = errors.New("proxy: idle timeout")

// Result says what a Pipe moved.
type Result struct {
	// In counts bytes copied client to backend; Out backend to client.
	In, Out int64
}

// Pipe copies client to backend and backend to client until both directions
// have ended, then closes both connections. A direction ends on EOF (passed
// on as CloseWrite) or on an error, which closes both connections at once.
// idle > 0 closes both when no byte moved either way for that long.
//
// Pipe returns the byte counts and the first error other than a clean EOF:
// ErrIdle, or a read or write error wrapped with its direction. If count is
// not nil it is called from both directions' goroutines as bytes move, so a
// caller can report progress of long connections; it must be cheap and safe
// for concurrent use.
func Pipe(client, backend *net.TCPConn, idle time.Duration, count func(in, out int64)) (Result, error) {
	type outcome struct {
		r   Result
		err error
	}
	ch := make(chan outcome, 1)
	Start(client, backend, idle, nil, count, func(r Result, err error) { ch <- outcome{r, err} })
	o := <-ch
	return o.r, o.err
}

// Start is Pipe without the wait: it starts the two directions on their own
// goroutines and returns at once; done is called (on one of them) when both
// have ended and both connections are closed.
//
// This is what a server holding many idle connections wants: the caller's
// goroutine, whose stack grew while it sniffed and dialled, can exit, and an
// idle pair costs two goroutines with small stacks, parked in the poller.
//
// With a Poller, a direction that has nothing to read parks there instead of
// on a goroutine of its own (see Poller); poller may be nil. The returned
// Pair may be closed at any time (a drain deadline).
func Start(client, backend *net.TCPConn, idle time.Duration, poller *Poller, count func(in, out int64), done func(Result, error)) *Pair {
	p := &pair{client: client, backend: backend, idle: idle, done: done}
	p.touch()
	p.left.Store(2)
	if idle > 0 {
		// Armed after the assignment, so checkIdle always sees p.timer.
		p.timer = time.AfterFunc(math.MaxInt64, p.checkIdle)
		p.timer.Reset(idle)
	}
	p.up = direction{p: p, name: "client to backend", src: client, dst: backend, up: true, count: count}
	p.down = direction{p: p, name: "backend to client", src: backend, dst: client, count: count}
	for _, d := range []*direction{&p.up, &p.down} {
		rc, err := d.src.SyscallConn()
		if err != nil {
			// Only a closed conn has none: end that direction now.
			d.err = fmt.Errorf("proxy: %s: %w", d.name, err)
			p.abort()
			p.finish()
			continue
		}
		d.rc, d.lr, d.waitFn, d.poller = rc, &io.LimitedReader{R: d.src}, d.peek, poller
		if poller == nil || !poller.park(d) {
			go wait(d)
		}
	}
	return &Pair{p: p}
}

// Pair is a running pair started by Start.
type Pair struct{ p *pair }

// Close closes both connections at once; the pair then finishes as on any
// error, and done is called. It is safe to call at any time, more than
// once.
func (h *Pair) Close() { h.p.abort() }

// finish runs when a direction ends; the last one closes up and reports.
func (p *pair) finish() {
	if p.left.Add(-1) != 0 {
		return
	}
	if p.timer != nil {
		p.timer.Stop()
	}
	p.client.Close()
	p.backend.Close()
	err := p.up.err
	if err == nil {
		err = p.down.err
	}
	if p.idled.Load() {
		err = ErrIdle
	}
	p.done(Result{In: p.up.n, Out: p.down.n}, err)
}

// pair is the state both directions share.
type pair struct {
	client, backend *net.TCPConn
	idle            time.Duration
	// timer fires when the pair may have been idle for the timeout. One
	// timer per pair, re-armed only when it fires, costs nothing per byte;
	// socket deadlines would not do: a write deadline expiring mid-splice
	// drops the bytes already in the pipe.
	timer *time.Timer
	// last is the time of the last byte moved in either direction, in
	// UnixNano. A direction blocked writing to a peer that does not read
	// does not move it, so such a pair is idle too.
	last      atomic.Int64
	idled     atomic.Bool
	closeOnce sync.Once

	up, down direction
	left     atomic.Int32 // directions still running
	done     func(Result, error)
}

func (p *pair) touch() { p.last.Store(time.Now().UnixNano()) }

// checkIdle runs on the timer: close the pair if it has been idle for the
// timeout, else re-arm for the end of the new idle period.
func (p *pair) checkIdle() {
	left := time.Until(time.Unix(0, p.last.Load()).Add(p.idle))
	if left > 0 {
		p.timer.Reset(left)
		return
	}
	p.idled.Store(true)
	p.abort()
}

// abort closes both connections, which ends both directions; a direction
// parked in a Poller is resumed to find its socket closed.
func (p *pair) abort() {
	p.closeOnce.Do(func() {
		p.client.Close()
		p.backend.Close()
		for _, d := range []*direction{&p.up, &p.down} {
			if d.poller != nil && d.state.Load() == parked {
				d.poller.unpark(d)
				d.resumeFrom(parked)
			}
		}
	})
}

// direction is one half of a pair.
type direction struct {
	p        *pair
	name     string
	src, dst *net.TCPConn
	up       bool
	count    func(in, out int64)
	n        int64

	// Copy state, used by one goroutine at a time.
	poller  *Poller
	state   atomic.Int32 // running or parked
	parkID  uint64
	rc      syscall.RawConn
	lr      *io.LimitedReader
	waitFn  func(fd uintptr) bool
	eof     bool
	peekErr error
	one     [1]byte
	err     error
}

// run copies, starting from the result of the wait that woke it, until
// the direction ends (true), or until it would wait again: then a fresh
// goroutine waits (see copy) and run returns false.
func (d *direction) run(woke error) (finished bool) {
	err, handedOff := d.copy(woke)
	if handedOff {
		return false
	}
	if err != nil {
		if !errors.Is(err, net.ErrClosed) {
			d.err = fmt.Errorf("proxy: %s: %w", d.name, err)
		}
		d.p.abort()
		return true
	}
	// Clean EOF from src: pass the FIN on; the other direction goes on.
	if err := d.dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		d.err = fmt.Errorf("proxy: %s: close write: %w", d.name, err)
		d.p.abort()
	}
	return true
}

// peek reports whether src has something to read, without consuming it:
// bytes (ok), EOF (d.eof) or an error (d.peekErr); ok is false when nothing
// is there yet. It is the callback of syscall.RawConn.Read (false means
// "wait for readability") and of RawConn.Control (no waiting).
func (d *direction) peek(fd uintptr) (ok bool) {
	n, _, err := unix.Recvfrom(int(fd), d.one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return false
	case err != nil:
		d.peekErr = err
	case n == 0:
		d.eof = true
	}
	return true
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
		if err == nil && d.peekErr != nil {
			err = os.NewSyscallError("recvfrom", d.peekErr)
		}
		if err != nil {
			return err, false
		}
		if d.eof {
			return nil, false
		}
		// Splice what is queued and whatever follows, letting Go's splice
		// loop wait for more while the stream flows; the read deadline
		// ends that wait holdPipe after it began, so a pipe is held at most
		// that long past the last byte. A read deadline is safe here: it
		// can only end a wait for src with the pipe empty, never a write
		// of bytes already spliced in.
		d.lr.N = 1 << 62
		d.src.SetReadDeadline(time.Now().Add(holdPipe))
		n, err := d.dst.ReadFrom(d.lr)
		d.src.SetReadDeadline(time.Time{})
		switch {
		case err == nil:
			// ReadFrom ends without error only at EOF: N is unreachable.
			d.eof = true
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = nil
		}
		if n > 0 {
			d.n += n
			if d.count != nil {
				if d.up {
					d.count(n, 0)
				} else {
					d.count(0, n)
				}
			}
			d.p.touch()
		}
		if err != nil {
			return err, false
		}
		if d.eof {
			return nil, false
		}
		d.eof, d.peekErr = false, nil
		ready := false
		err = d.rc.Control(func(fd uintptr) { ready = d.peek(fd) })
		if err == nil && !ready {
			if d.poller == nil || !d.poller.park(d) {
				go wait(d)
			}
			return nil, true
		}
	}
}

// wait is where every goroutine of a direction starts: it parks, with the
// shallowest stack possible, until src is readable, then copies. Named for
// stack dumps.
func wait(d *direction) {
	d.eof, d.peekErr = false, nil
	err := d.rc.Read(d.waitFn)
	if d.run(err) {
		d.p.finish()
	}
}
