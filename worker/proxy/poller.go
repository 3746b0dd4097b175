package proxy

import (
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Direction states, for parking in a Poller.
const (
	running int32 = iota // a goroutine owns the direction
	parked               // registered in the Poller, no goroutine
)

// Poller parks idle directions without a goroutine: a direction with
// nothing to read registers its socket in the Poller's own epoll instance
// (one per Poller, shared by every pair) and its goroutine exits; when the
// socket becomes readable, or the pair is aborted, a fresh goroutine resumes
// it. An idle pair then costs its heap objects only: no goroutine, no stack,
// no pipe, no buffer.
//
// The epoll descriptor itself is waited on through Go's poller, so the
// Poller needs no thread of its own. A Poller also lends splice pipes to
// the pairs started with it, at most maxPipes at once, and closes those
// left unused for pipeLinger. The zero value is not usable; create
// one with NewPoller and Close it when no pair uses it any more.
type Poller struct {
	ep   *os.File
	epfd int
	mu   sync.Mutex
	// parked holds the parked directions by slot (nil: free, and in
	// free); a direction's parkID is its slot and, above it, the park's
	// generation, so an event left over from an earlier park of a slot
	// finds no direction. A slice and a free list cost 12 bytes a slot,
	// a map three times that.
	parked []*direction
	free   []uint32
	gen    uint32
	closed chan struct{}
	done   chan struct{}
	// clock runs the idle checks of the pairs started with this Poller.
	clock *idleClock
	// pipes lends splice pipes to the directions of every pair started
	// with this Poller: at most maxPipes at once, none kept long once the
	// worker is quiet.
	pipes *pipePool
	// keepAlive is set on a backend socket when its direction first
	// parks (see direction.keepAlive); set by SetBackendKeepAlive before
	// any pair starts.
	keepAlive net.KeepAliveConfig
}

// SetBackendKeepAlive makes the pairs started with p turn TCP keep-alive
// on for their backend socket, with cfg, once that socket has been quiet
// for a while (so that short connections never pay for it). Call it
// before the first pair starts.
func (p *Poller) SetBackendKeepAlive(cfg net.KeepAliveConfig) {
	p.keepAlive = cfg
}

// NewPoller creates a Poller and starts its wait loop.
func NewPoller() (*Poller, error) {
	return newPollerPipes(maxPipes, pipeLinger)
}

// newPollerPipes is NewPoller with a pipe pool of at most max pipes, each
// closed once free for linger.
func newPollerPipes(max int, linger time.Duration) (*Poller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("proxy: epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("proxy: epoll nonblock: %w", err)
	}
	p := &Poller{
		ep:     os.NewFile(uintptr(fd), "idle-epoll"),
		epfd:   fd,
		closed: make(chan struct{}),
		done:   make(chan struct{}),
		pipes:  newPipePool(max, linger),
		clock:  newIdleClock(),
	}
	go p.loop()
	return p, nil
}

// Close stops the wait loop. Directions still parked are resumed (they
// find their sockets as they are) so that no pair is left unfinished.
func (p *Poller) Close() error {
	select {
	case <-p.closed:
		return nil
	default:
	}
	close(p.closed)
	p.pipes.close()
	err := p.ep.Close() // ends the wait loop
	<-p.done
	p.mu.Lock()
	var ds []*direction
	for _, d := range p.parked {
		if d != nil {
			ds = append(ds, d)
		}
	}
	p.parked, p.free = nil, nil
	p.mu.Unlock()
	for _, d := range ds {
		d.resumeFrom(parked)
	}
	return err
}

// park registers d's source socket and reports whether d is now parked;
// false means the caller must wait itself (the Poller is closed or the
// socket could not be registered). The caller's goroutine must not touch d
// after a true result.
func (p *Poller) park(d *direction) bool {
	select {
	case <-p.closed:
		return false
	default:
	}
	var fd int
	if err := d.rc().Control(func(s uintptr) { fd = int(s) }); err != nil {
		return false
	}
	p.mu.Lock()
	id := p.insertLocked(d)
	p.mu.Unlock()
	d.state.Store(parked)
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(id), Pad: int32(id >> 32)}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		// Not parked after all: take it back if nobody else did.
		p.mu.Lock()
		p.takeLocked(id)
		p.mu.Unlock()
		if d.state.CompareAndSwap(parked, running) {
			return false
		}
		return true // an abort already resumed it
	}
	if d.p.detach.Load() {
		// Detach may have looked for parked directions before this one
		// was parked: resume it so it sees the flag (unless Detach or an
		// abort already did; then d is theirs: only id and fd are used).
		if d.state.CompareAndSwap(parked, running) {
			p.unparkFD(id, fd)
			return false
		}
	}
	return true
}

// insertLocked gives d a slot in parked and returns its new parkID;
// p.mu must be held.
func (p *Poller) insertLocked(d *direction) uint64 {
	var slot uint32
	if n := len(p.free); n > 0 {
		slot = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		slot = uint32(len(p.parked))
		p.parked = append(p.parked, nil)
	}
	p.gen++
	d.parkID = uint64(p.gen)<<32 | uint64(slot)
	p.parked[slot] = d
	return d.parkID
}

// takeLocked removes and returns the direction parked as id, or nil if
// none is (any more); p.mu must be held.
func (p *Poller) takeLocked(id uint64) *direction {
	slot := uint32(id)
	if int(slot) >= len(p.parked) {
		return nil
	}
	d := p.parked[slot]
	if d == nil || d.parkID != id {
		return nil
	}
	p.parked[slot] = nil
	p.free = append(p.free, slot)
	return d
}

// parkedCount returns how many directions are parked.
func (p *Poller) parkedCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.parked) - len(p.free)
}

// unpark removes d from the Poller (when it is resumed by an abort or a
// detach).
func (p *Poller) unpark(d *direction) {
	var fd int
	if d.rc().Control(func(s uintptr) { fd = int(s) }) == nil {
		p.unparkFD(d.parkID, fd)
		return
	}
	p.mu.Lock()
	p.takeLocked(d.parkID)
	p.mu.Unlock()
}

// unparkFD removes the direction parked as id, whose socket is fd.
func (p *Poller) unparkFD(id uint64, fd int) {
	p.mu.Lock()
	p.takeLocked(id)
	p.mu.Unlock()
	unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

// loop waits for parked sockets to become readable and resumes their
// directions.
func (p *Poller) loop() {
	defer close(p.done)
	rc, err := p.ep.SyscallConn()
	if err != nil {
		return
	}
	events := make([]unix.EpollEvent, 128)
	var ready []*direction
	for {
		n := 0
		werr := rc.Read(func(fd uintptr) bool {
			var err error
			n, err = unix.EpollWait(int(fd), events, 0)
			return n > 0 || (err != nil && err != unix.EINTR)
		})
		if werr != nil {
			return // closed
		}
		ready = ready[:0]
		p.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if d := p.takeLocked(id); d != nil {
				ready = append(ready, d)
			}
		}
		p.mu.Unlock()
		for _, d := range ready {
			var fd int
			if d.rc().Control(func(s uintptr) { fd = int(s) }) == nil {
				unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
			}
			d.resumeFrom(parked)
		}
	}
}

// resumeFrom starts a goroutine for d if d is in state from; it is how a
// parked direction is woken, by the Poller or by an abort, exactly once.
func (d *direction) resumeFrom(from int32) {
	if d.state.CompareAndSwap(from, running) {
		go wait(d)
	}
}
