package proxy

import (
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// maxPipes bounds the splice pipes one Poller (one worker) holds at
	// once, lent and free together: 2,500 pipes, 5,000 fds. It is
	// HAProxy's default maxpipes (maxconn/4) for sniproxy's default
	// max_connections of 10,000. A direction that finds no pipe within
	// the bound copies through a user-space buffer instead, so any number
	// of busy streams holds at most maxPipes pipes.
	maxPipes = 2500
	// pipeLinger is how long a free pipe stays in the pool unused before
	// it is closed: while traffic flows, pipes are reused; a quiet worker
	// is back at its baseline fds within about twice this.
	pipeLinger = 2 * time.Second
	// spliceSize is the most one splice(2) moves, and the size asked for
	// each pipe (the default /proc/sys/fs/pipe-max-size), as Go's own
	// splice does.
	spliceSize = 1 << 20
	// copyBufSize is the buffer of a direction that copies in user
	// space (no pipe to be had).
	copyBufSize = 32 << 10
)

// pipe is one splice pipe: bytes are spliced from a socket into w and
// from r into the other socket. It also carries the state of the splice
// that holds it, and its syscall.RawConn callbacks, made once per pipe, so
// that neither a splice nor an idle direction costs an allocation.
type pipe struct {
	r, w int
	free time.Time // when it was given back, while in the pool

	inPipe  int   // bytes in the pipe
	written int64 // bytes from the pipe into dst, this transfer
	err     error // of the last splice(2)
	drainFn func(fd uintptr) bool
	pumpFn  func(fd uintptr) bool
}

// close closes both ends.
func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// pipePool lends splice pipes, at most max at once (lent and free
// together), and closes a free one once it has not been used for linger.
// The zero value is not usable: see newPipePool. A nil *pipePool lends a
// new pipe each time and closes it when it is given back (a pair started
// without a Poller, as in tests).
type pipePool struct {
	max    int
	linger time.Duration
	bufs   sync.Pool // *[]byte of copyBufSize, for user-space copies

	mu     sync.Mutex
	free   []*pipe // the most recently given back last
	open   int     // pipes open: lent, being made, or free
	timer  *time.Timer
	armed  bool
	closed bool

	// overflow counts transfers that found no pipe within the bound and
	// copied in user space.
	overflow atomic.Int64
}

// newPipePool returns a pool of at most max pipes that closes free pipes
// unused for linger.
func newPipePool(max int, linger time.Duration) *pipePool {
	pp := &pipePool{max: max, linger: linger}
	pp.bufs.New = func() any {
		b := make([]byte, copyBufSize)
		return &b
	}
	pp.timer = time.AfterFunc(time.Hour, pp.trim)
	pp.timer.Stop()
	return pp
}

// get lends a pipe, or returns nil when the bound is reached or a pipe
// cannot be made (out of fds): the caller copies in user space then.
func (pp *pipePool) get() *pipe {
	if pp == nil {
		return newPipe()
	}
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free[n-1] = nil
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p
	}
	if pp.closed || pp.open >= pp.max {
		pp.mu.Unlock()
		pp.overflow.Add(1)
		return nil
	}
	pp.open++
	pp.mu.Unlock()
	p := newPipe()
	if p == nil {
		pp.mu.Lock()
		pp.open--
		pp.mu.Unlock()
		pp.overflow.Add(1)
	}
	return p
}

// put gives p back. A pipe that still holds bytes (a splice into the
// other socket failed) is closed: they belong to a stream that ended.
func (pp *pipePool) put(p *pipe, dirty bool) {
	p.err = nil
	if pp == nil {
		p.close()
		return
	}
	pp.mu.Lock()
	if dirty || pp.closed {
		pp.mu.Unlock()
		pp.closeOpen(p)
		return
	}
	p.free = time.Now()
	pp.free = append(pp.free, p)
	if !pp.armed {
		pp.armed = true
		pp.timer.Reset(pp.linger)
	}
	pp.mu.Unlock()
}

// trim runs on the timer: it closes the free pipes unused for linger and
// re-arms for the next one to come due, if any.
func (pp *pipePool) trim() {
	now := time.Now()
	pp.mu.Lock()
	// free is in the order pipes were given back: the stale ones first.
	i := 0
	for i < len(pp.free) && now.Sub(pp.free[i].free) >= pp.linger {
		i++
	}
	stale := make([]*pipe, i)
	copy(stale, pp.free[:i])
	n := copy(pp.free, pp.free[i:])
	clear(pp.free[n:])
	pp.free = pp.free[:n]
	if len(pp.free) > 0 {
		pp.timer.Reset(pp.free[0].free.Add(pp.linger).Sub(now))
	} else {
		pp.armed = false
	}
	pp.mu.Unlock()
	pp.closeOpen(stale...)
}

// closeOpen closes pipes taken out of the pool and only then counts them
// out of open: until their descriptors are gone, get makes no pipe in
// their place, so the pool never holds more than max pipes' fds, not even
// for a moment.
func (pp *pipePool) closeOpen(ps ...*pipe) {
	if len(ps) == 0 {
		return
	}
	for _, p := range ps {
		p.close()
	}
	pp.mu.Lock()
	pp.open -= len(ps)
	pp.mu.Unlock()
}

// close closes every free pipe; pipes given back later are closed then.
func (pp *pipePool) close() {
	pp.mu.Lock()
	pp.closed = true
	pp.timer.Stop()
	pp.armed = false
	free := pp.free
	pp.free = nil
	pp.mu.Unlock()
	pp.closeOpen(free...)
}

// buf lends a user-space copy buffer; give it back with putBuf.
func (pp *pipePool) buf() *[]byte {
	if pp == nil {
		b := make([]byte, copyBufSize)
		return &b
	}
	return pp.bufs.Get().(*[]byte)
}

// putBuf gives a buffer from buf back.
func (pp *pipePool) putBuf(b *[]byte) {
	if pp != nil {
		pp.bufs.Put(b)
	}
}

// newPipe makes a pipe sized for spliceSize (a smaller one if the system
// will not allow it: it only takes more splices), or returns nil.
func newPipe() *pipe {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, spliceSize)
	p := &pipe{r: fds[0], w: fds[1]}
	p.drainFn, p.pumpFn = p.drain, p.pump
	return p
}

// transfer moves bytes from d.src to d.dst, as (*net.TCPConn).ReadFrom
// would, until EOF (nil), an error, or until the read deadline ends a wait
// for src (os.ErrDeadlineExceeded): through a pipe from d.pipes, spliced,
// or, when none is to be had, through a user-space buffer. Either way it
// only stops waiting for src when every byte read has been written.
func (d *direction) transfer() (int64, error) {
	p := d.pipes().get()
	if p == nil {
		return d.copyBuffer()
	}
	n, inPipe, err := d.splice(p)
	d.pipes().put(p, inPipe > 0)
	return n, err
}

// splice moves bytes from src into p and from p into dst until EOF, an
// error, or a deadline on src; inPipe is what p still holds when it stops
// (only after a failed write to dst).
func (d *direction) splice(p *pipe) (written int64, inPipe int, err error) {
	p.inPipe, p.written, p.err = 0, 0, nil
	rc, wc := d.rc(), d.wc()
	for {
		err = rc.Read(p.drainFn)
		if err == nil && p.err != nil {
			err = os.NewSyscallError("splice", p.err)
		}
		if err != nil || p.inPipe == 0 {
			return p.written, 0, err // inPipe == 0: EOF
		}
		for p.inPipe > 0 {
			err = wc.Write(p.pumpFn)
			if err == nil && p.err != nil {
				err = os.NewSyscallError("splice", p.err)
			}
			if err != nil {
				return p.written, p.inPipe, err
			}
		}
	}
}

// drain is the syscall.RawConn.Read callback of splice: it moves what the
// source socket fd has into the empty pipe; false means fd has nothing
// yet.
func (p *pipe) drain(fd uintptr) bool {
	for {
		n, err := rawSplice(int(fd), p.w, spliceSize)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			// The pipe is empty here: fd has nothing yet.
			return false
		}
		p.inPipe, p.err = int(max(n, 0)), err
		return true
	}
}

// pump is the syscall.RawConn.Write callback of splice: it moves what it
// can of the pipe's bytes into the destination socket fd; false means fd's
// send buffer is full.
func (p *pipe) pump(fd uintptr) bool {
	for {
		n, err := rawSplice(p.r, int(fd), p.inPipe)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		if n > 0 {
			p.inPipe -= int(n)
			p.written += n
		} else if err == nil {
			// Never seen: the pipe had bytes for fd.
			err = io.ErrNoProgress
		}
		p.err = err
		return true
	}
}

// copyBuffer is splice through a user-space buffer, for a direction that
// got no pipe. It hides ReadFrom and WriteTo, which would splice.
func (d *direction) copyBuffer() (int64, error) {
	b := d.pipes().buf()
	defer d.pipes().putBuf(b)
	n, err := io.CopyBuffer(struct{ io.Writer }{d.dst()}, struct{ io.Reader }{d.src()}, *b)
	return n, err
}

// rawSplice is splice(2) without offsets, non-blocking, as a raw system
// call: the goroutine keeps its P for the (bounded) time it takes, so
// the runtime's monitor does not take the P of a long splice and hand it
// to another thread (with the wake-ups that follow and another P to find
// when it returns).
func rawSplice(in, out, n int) (int64, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return -1, e
	}
	return int64(r), nil
}
