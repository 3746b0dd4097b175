// Package proxy copies bytes both ways between a client and a backend TCP
// connection.
//
// Bulk data moves with Linux splice(2) through the kernel: each direction
// hands *net.TCPConn to (*net.TCPConn).ReadFrom, never a wrapper that would
// force a user-space copy. An idle connection holds no pipe and no buffer:
// each direction first waits for readability on the socket itself (through
// syscall.RawConn), asks the kernel how many bytes are queued, and only then
// splices exactly that many, so Go's splice pipe is borrowed only while data
// moves.
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
	"time"

	"golang.org/x/sys/unix"
)

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
	p := &pair{client: client, backend: backend, idle: idle}
	p.touch()
	if idle > 0 {
		// Armed after the assignment, so checkIdle always sees p.timer.
		p.timer = time.AfterFunc(math.MaxInt64, p.checkIdle)
		p.timer.Reset(idle)
		defer p.timer.Stop()
	}
	up := direction{p: p, name: "client to backend", src: client, dst: backend, up: true, count: count}
	down := direction{p: p, name: "backend to client", src: backend, dst: client, count: count}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		copyDown(&down)
	}()
	up.run()
	wg.Wait()
	client.Close()
	backend.Close()
	err := up.err
	if err == nil {
		err = down.err
	}
	if p.idled.Load() {
		err = ErrIdle
	}
	return Result{In: up.n, Out: down.n}, err
}

// copyDown runs the backend-to-client direction; named for stack dumps.
func copyDown(d *direction) { d.run() }

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

// abort closes both connections, which ends both directions.
func (p *pair) abort() {
	p.closeOnce.Do(func() {
		p.client.Close()
		p.backend.Close()
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
	err      error
}

func (d *direction) run() {
	err := d.copy()
	if err != nil {
		if !errors.Is(err, net.ErrClosed) {
			d.err = fmt.Errorf("proxy: %s: %w", d.name, err)
		}
		d.p.abort()
		return
	}
	// Clean EOF from src: pass the FIN on; the other direction goes on.
	if err := d.dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		d.err = fmt.Errorf("proxy: %s: close write: %w", d.name, err)
		d.p.abort()
	}
}

// copy moves bytes until EOF (nil) or an error.
func (d *direction) copy() error {
	rc, err := d.src.SyscallConn()
	if err != nil {
		return err
	}
	var (
		avail   int
		eof     bool
		peekErr error
		one     [1]byte
	)
	// wait is called by the runtime poller: false means "not yet, wait for
	// readability". MSG_PEEK consumes nothing; SIOCINQ says how much is
	// queued so the splice below never waits holding a pipe.
	wait := func(fd uintptr) bool {
		n, _, err := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN || err == unix.EINTR:
			return false
		case err != nil:
			peekErr = err
		case n == 0:
			eof = true
		default:
			q, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			if err != nil || q < 1 {
				q = 1
			}
			avail = q
		}
		return true
	}
	lr := &io.LimitedReader{R: d.src}
	for {
		avail, eof, peekErr = 0, false, nil
		err := rc.Read(wait)
		if err == nil && peekErr != nil {
			err = os.NewSyscallError("recvfrom", peekErr)
		}
		if err != nil {
			return err
		}
		if eof {
			return nil
		}
		lr.N = int64(avail)
		n, err := d.dst.ReadFrom(lr)
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
			return err
		}
	}
}
