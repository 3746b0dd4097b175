package worker

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/dupfd"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// The event loop serves the short phases of a connection on raw
// non-blocking descriptors, on one goroutine locked to its thread: accept,
// admission (a spare permit, the client's lease), sniff, route, dial of
// backends written as addresses (a pool's in its balancer's order, with
// failover), replay (with a PROXY header if the route sends one), and the
// exchanges both ways. A connection quiet for loopRelayFor (no byte
// either way), that moves a full buffer (the start of a stream: splice
// from then on), or whose peer does not take all it is sent, is handed to
// its pair (package proxy: goroutines, splice, the Poller) with its
// counts and half-closes; one that needs what the loop does not do (a
// look-up: DNS routing or a backend host name; a permit or client permit
// only the master can grant now) is handed to a goroutine at the phase it
// has reached, and goes on as any other. On a listener with
// accept_proxy_protocol the loop reads the header first (trusted sources
// only, within its own timeout). Nothing changes for the operator: the
// same phases, timeouts, results, counters and log lines.
//
// Why: a goroutine per connection costs the Go scheduler's work for each
// (goroutine start, netpoll registration and wake-ups, system calls seen
// by the scheduler, whose monitor thread then polls every 20 µs), which
// measured 1.4× nginx's CPU per short connection at best; the same work
// in a loop whose waits the scheduler does not see (epoll_pwait as a raw
// system call while there is work) measured at the peers' level. See
// ARCHITECTURE.md and bench/README.md.
//
// The loop holds its P while it waits raw, so it runs only with
// GOMAXPROCS ≥ 2 (Server.EventLoop); after loopQuiet with no event it
// waits through the scheduler instead, so an idle worker sleeps.

const (
	// loopRelayFor is how long a connection the loop relays may be quiet
	// (no byte either way) before it goes to its pair: longer than the
	// gaps of a handshake or a request and its answer, short enough that
	// an idle long-lived connection soon costs no more than any pair (no
	// goroutine, no buffer while idle).
	loopRelayFor = 50 * time.Millisecond
	// loopBufSize is the loop's one copy buffer; a read that fills it
	// hands the connection to its pair, which splices.
	loopBufSize = 32 << 10
	// loopAcceptBurst bounds the accepts per listener per wake-up, so
	// that one busy listener does not starve the connections in flight.
	loopAcceptBurst = 64
	// loopQuiet is the longest raw wait: a wait that long with no event
	// makes the loop wait through the scheduler until the next event.
	loopQuiet = 10 * time.Millisecond
	// loopPermitWait bounds how long a connection waits in the loop for
	// the permit block under way (an IPC round trip to the master, well
	// under a millisecond); past it, it goes to a goroutine that waits
	// for a permit as every connection did before the loop.
	loopPermitWait = 100 * time.Millisecond
)

// Phases of a connection in the loop.
const (
	lphSniff uint8 = iota
	lphConnect
	lphRelay
	lphProxy // the PROXY header of a listener with accept_proxy_protocol
	// lphPermit: accepted, waiting in the loop's permitQ for a permit
	// from a block the master is about to grant (not in the epoll set).
	lphPermit
)

// Sides of a connection, in the epoll data.
const (
	sideClient  = 0
	sideBackend = 1
)

// Special epoll data slots.
const (
	slotWake     = -1
	slotListener = -2 // -2 - index
)

// lconn is a connection while the loop serves it.
type lconn struct {
	c *conn
	p path
	// sn reads the hello; p.buf is its buffer.
	sn       sniff.Sniffer
	cfd, bfd int
	slot     int32
	gen      uint32
	phase    uint8
	// cReady, bReady: the socket may have bytes the loop has not read
	// (edge-triggered epoll: reading stops when a read comes back
	// short).
	cReady, bReady bool
	// cHup, bHup: epoll reported the peer's FIN (or an error): a read
	// that comes back short has not drained the socket, the end is
	// still to be read.
	cHup, bHup bool
	// upDone, downDone: a direction's source sent FIN, which was passed
	// on (shutdown of the other socket's write side).
	upDone, downDone bool
	done             bool
	// when is the phase's deadline (loop.mono), hidx its index in the
	// loop's timer heap (-1: none).
	when int64
	hidx int
	// dialStart is when the dial phase began, attemptStart when the
	// current connect did; addr the backend dialled.
	dialStart, attemptStart time.Time
	addr                    netip.AddrPort
	// For a pool: the backends to try in order (DialPool's), the next
	// one's index in it, the attempts made, the first failure and when the
	// dial phase ends.
	order    []int
	orderBuf [4]int
	next     int
	tried    int
	first    error
	dialEnd  time.Time
	in, out  int64
	last     int64 // when the last byte moved (loop.mono)
}

// loopListener is one listening socket the loop accepts on.
type loopListener struct {
	fd   int
	lcfg *config.Listener
	// retry, if not zero, is when accepting resumes after a temporary
	// error (out of fds): the socket is out of the epoll set until then;
	// delay is the back-off that set it, doubled by each failure in a
	// row.
	retry time.Time
	delay time.Duration
}

// loop is a Server's event loop (see the comment at the top of this file).
type loop struct {
	s     *Server
	ep    int
	wake  int // eventfd: requests from other goroutines
	lns   []loopListener
	slots []*lconn
	free  []int32
	gen   uint32
	live  int
	// base is the origin of the loop's clock (mono): monotonic, so that
	// a step of the wall clock fires or delays no deadline.
	base time.Time
	// now is when the loop's wait last returned: the time of every
	// event of that batch (one clock read per batch, not several per
	// connection).
	now   time.Time
	timer lheap
	// permitQ holds the connections waiting for a permit (lphPermit),
	// oldest first; see admitQueued.
	permitQ []*lconn
	// spares is the server's limiter if the loop can wait for its
	// permits (see admit), set once by newLoop.
	spares spareWaiter
	buf    []byte
	evs    [128]unix.EpollEvent
	// reserve holds descriptors (eventfds) kept for hand-offs: turning a
	// raw socket into a *net.TCPConn takes a duplicate for a moment, and
	// a worker out of fds would otherwise lose the established
	// connections it hands on. See rawTCP.
	reserve []int

	mu       sync.Mutex
	exited   bool // the loop has returned; its descriptors are closed
	closes   []*lconn
	handoffs []chan struct{}
	stopping bool
	linger   time.Duration

	acceptStopped chan struct{}
	done          chan struct{}

	// Counts, for tests: connections accepted here, ended here, handed
	// to a goroutine (after admission; before it: atAccept), handed to a
	// pair; events of connections no longer here.
	accepted, ended, toGoroutines, atAccept, toPairs, stale atomic.Int64
	// tid is the thread the loop runs on, for tests.
	tid atomic.Int32
}

// newLoop makes the loop for the listeners lns: it takes a duplicate of
// each socket and closes the *net.TCPListener (out of the Go runtime's
// epoll, which would otherwise be woken for every connection too).
func newLoop(s *Server, lns []Listener) (*loop, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("worker: event loop: epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(ep)
		return nil, fmt.Errorf("worker: event loop: eventfd: %w", err)
	}
	l := &loop{s: s, ep: ep, wake: wake, buf: make([]byte, loopBufSize), base: time.Now(),
		acceptStopped: make(chan struct{}), done: make(chan struct{})}
	fail := func(err error) (*loop, error) {
		for _, ln := range l.lns {
			unix.Close(ln.fd)
		}
		unix.Close(ep)
		unix.Close(wake)
		return nil, err
	}
	if err := l.ctl(unix.EPOLL_CTL_ADD, wake, unix.EPOLLIN, slotWake, 0); err != nil {
		return fail(err)
	}
	for i, ln := range lns {
		fd, err := dupListener(ln.Ln)
		if err != nil {
			return fail(err)
		}
		// Small writes go out at once (TCP_NODELAY, as Go sets on every
		// TCP socket); set here, every accepted socket inherits it: one
		// system call less per connection.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			unix.Close(fd)
			return fail(fmt.Errorf("worker: event loop: listener: TCP_NODELAY: %w", err))
		}
		l.lns = append(l.lns, loopListener{fd: fd, lcfg: &lns[i].Config})
		if err := l.addListener(i); err != nil {
			return fail(err)
		}
	}
	for _, ln := range lns {
		ln.Ln.Close()
	}
	l.refill()
	if sw, ok := s.limiter.(spareWaiter); ok {
		l.spares = sw
		sw.Watch(l.poke)
	}
	return l, nil
}

// dupListener returns a non-blocking close-on-exec duplicate of ln's
// socket (internal/dupfd, then O_NONBLOCK, which the socket has already:
// Go's listeners are non-blocking).
func dupListener(ln *net.TCPListener) (int, error) {
	fd, err := dupfd.Fd(ln)
	if err != nil {
		return -1, fmt.Errorf("worker: event loop: listener: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("worker: event loop: listener: %w", err)
	}
	return fd, nil
}

// ctl changes the epoll set: fd with events, tagged with slot and
// gen<<1|side.
func (l *loop) ctl(op, fd int, events uint32, slot int32, tag uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: slot, Pad: int32(tag)}
	_, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.ep), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
	if e != 0 {
		return fmt.Errorf("worker: event loop: epoll_ctl: %w", e)
	}
	return nil
}

// addListener adds listener i to the loop's epoll. EPOLLEXCLUSIVE: a
// socket shared by the workers (reuseport: false) wakes one waiting
// loop per connection, not every worker's (the thundering herd that
// nginx's accept_mutex and later its own EPOLLEXCLUSIVE avoid); a loop
// busy when a connection comes gets its event too and finds it taken or
// not. A SO_REUSEPORT socket has one loop anyway.
func (l *loop) addListener(i int) error {
	return l.ctl(unix.EPOLL_CTL_ADD, l.lns[i].fd, unix.EPOLLIN|unix.EPOLLEXCLUSIVE, int32(slotListener-i), 0)
}

// run is the loop; it returns once stopped with no connection left.
func (l *loop) run() {
	runtime.LockOSThread()
	l.tid.Store(int32(unix.Gettid()))
	defer close(l.done)
	defer func() {
		l.mu.Lock()
		l.exited = true
		unix.Close(l.ep)
		unix.Close(l.wake)
		for _, r := range l.reserve {
			unix.Close(r)
		}
		l.mu.Unlock()
	}()
	raw := true
	for {
		if l.stopped() && l.live == 0 {
			return
		}
		now := time.Now()
		wait := l.nextWait(now)
		var n int
		var err error
		if raw {
			if wait < 0 {
				wait = loopQuiet
			}
			ms := int(min(wait, loopQuiet) / time.Millisecond)
			if wait > 0 && ms == 0 {
				ms = 1
			}
			r, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.ep), uintptr(unsafe.Pointer(&l.evs[0])), uintptr(len(l.evs)), uintptr(ms), 0, 0)
			n = int(r)
			if e != 0 {
				n, err = 0, e
			}
			if err == nil && n == 0 && ms >= int(loopQuiet/time.Millisecond) {
				raw = false // quiet: sleep through the scheduler
			}
		} else {
			ms := -1
			if wait >= 0 {
				ms = int((wait + time.Millisecond - 1) / time.Millisecond)
			}
			n, err = unix.EpollWait(l.ep, l.evs[:], ms)
			if n > 0 {
				raw = true
			}
		}
		l.now = time.Now()
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			l.s.log.Error("event loop: epoll_pwait failed", "err", err)
			n = 0
		}
		for i := range n {
			l.event(&l.evs[i])
		}
		l.expire()
		l.requests()
		if len(l.permitQ) > 0 {
			l.admitQueued()
		}
	}
}

// nextWait returns how long the loop may wait: until the first deadline
// or listener retry; -1 for no limit.
func (l *loop) nextWait(now time.Time) time.Duration {
	wait := time.Duration(-1)
	if len(l.timer) > 0 {
		wait = max(0, time.Duration(l.timer[0].when-l.mono(now)))
	}
	for _, ln := range l.lns {
		if !ln.retry.IsZero() {
			d := max(0, ln.retry.Sub(now))
			if wait < 0 || d < wait {
				wait = d
			}
		}
	}
	return wait
}

// stopped reports whether stop was called and handled.
func (l *loop) stopped() bool {
	select {
	case <-l.acceptStopped:
		return true
	default:
		return false
	}
}

// event handles one epoll event.
func (l *loop) event(ev *unix.EpollEvent) {
	switch slot := ev.Fd; {
	case slot == slotWake:
		var b [8]byte
		syscall.RawSyscall(unix.SYS_READ, uintptr(l.wake), uintptr(unsafe.Pointer(&b[0])), 8)
	case slot <= slotListener:
		l.accept(int(slotListener - slot))
	default:
		if int(slot) >= len(l.slots) {
			return
		}
		lc := l.slots[slot]
		if lc == nil || lc.done || lc.gen != uint32(ev.Pad)>>1 {
			l.stale.Add(1)
			return // an event of a connection that ended in this batch
		}
		side := uint32(ev.Pad) & 1
		if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			if side == sideClient {
				lc.cHup = true
			} else {
				lc.bHup = true
			}
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			l.setReady(lc, side, true)
		}
		l.step(lc, uint32(ev.Pad)&1, ev.Events)
	}
}

// accept accepts what is queued on listener i, a burst at most.
func (l *loop) accept(i int) {
	ln := &l.lns[i]
	if ln.fd < 0 || !ln.retry.IsZero() {
		return
	}
	s := l.s
	for range loopAcceptBurst {
		var sa unix.RawSockaddrAny
		salen := uint32(unsafe.Sizeof(sa))
		r, _, e := syscall.RawSyscall6(unix.SYS_ACCEPT4, uintptr(ln.fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&salen)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		if e != 0 {
			if e == unix.EAGAIN {
				ln.delay = 0
				return
			}
			if e == unix.EINTR || e == unix.ECONNABORTED {
				continue
			}
			if isTemporary(e) {
				ln.delay = min(max(2*ln.delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "listener", ln.lcfg.Address, "err", os.NewSyscallError("accept4", e), "retry_in", ln.delay)
				ln.retry = time.Now().Add(ln.delay)
				l.ctl(unix.EPOLL_CTL_DEL, ln.fd, 0, 0, 0)
				return
			}
			s.log.Error("accept failed; this listener stops accepting in this worker", "listener", ln.lcfg.Address, "err", os.NewSyscallError("accept4", e))
			l.ctl(unix.EPOLL_CTL_DEL, ln.fd, 0, 0, 0)
			unix.Close(ln.fd)
			ln.fd = -1
			return
		}
		ln.delay = 0
		l.serve(int(r), rawAddrPort(&sa), ln.lcfg)
	}
}

// rawAddrPort converts an accepted socket's address.
func rawAddrPort(sa *unix.RawSockaddrAny) netip.AddrPort {
	switch sa.Addr.Family {
	case unix.AF_INET:
		a := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		p := (*[2]byte)(unsafe.Pointer(&a.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		a := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		p := (*[2]byte)(unsafe.Pointer(&a.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// serve starts serving an accepted socket: admit, then sniff.
func (l *loop) serve(fd int, peer netip.AddrPort, lcfg *config.Listener) {
	s := l.s
	s.rec.Opened()
	l.accepted.Add(1)
	c := &conn{srv: s, id: s.nextID.Add(1), lcfg: lcfg, start: l.now}
	c.peer = unmapAddrPort(peer)
	lc := &lconn{c: c, cfd: fd, bfd: -1, hidx: -1}
	lc.p.c = c
	// TCP_NODELAY, as Go sets on every TCP socket, comes from the
	// listener (newLoop): accepted sockets inherit it.
	perIP := perIPOK
	if lcfg.AcceptProxyProtocol {
		// The client is the one the header names: its limits apply
		// once it is read. A source that may not send one takes no
		// permit.
		if !lcfg.Trusts(c.peer.Addr()) {
			c.lc = lc
			s.track(c)
			l.add(lc)
			l.end(lc, rejected(stats.ProxyHeader, fmt.Errorf("worker: %v is not in trusted_proxies: closed before reading a PROXY header", c.peer.Addr())))
			return
		}
	} else {
		perIP = l.admitPerIP(lc)
	}
	if perIP == perIPRefused {
		c.lc = lc
		s.track(c)
		l.add(lc)
		l.end(lc, rejected(stats.PerIPLimit, errPerIP))
		return
	}
	ok, wait := perIP == perIPOK, false
	switch {
	case ok && len(l.permitQ) > 0:
		// Behind those already waiting for a permit: admitQueued takes
		// them in order, at the end of this turn of the loop.
		ok, wait = false, true
	case ok:
		ok, wait = l.admit()
	}
	if !ok && wait {
		// No spare permit, but a block is on its way from the master:
		// the connection waits here for it (admitQueued), not on a
		// goroutine of its own (a burst would start one each).
		lc.phase = lphPermit
		c.lc = lc
		s.track(c)
		l.add(lc)
		l.arm(lc, c.start.Add(s.permitWait))
		l.permitQ = append(l.permitQ, lc)
		return
	}
	if !ok {
		// A client permit only the master can grant, or no spare
		// permit here (Acquire may wait for the master, or evict a
		// slow sniffer): a goroutine does that, from the start.
		// A client permit taken here stays the connection's
		// (path.admit sees conn.perIPKey).
		client, err := l.rawTCP(fd, "client")
		l.refill()
		if err == nil {
			c.client = client
			s.track(c)
			l.atAccept.Add(1)
			go c.serve()
			return
		}
		// Out of descriptors for the duplicate: refused as at the limit.
		s.track(c)
		lc.p.finish(rejected(stats.Limit, fmt.Errorf("worker: max_connections reached, and no descriptor to wait for a permit: %w", err)))
		return
	}
	c.lc = lc
	s.track(c)
	l.add(lc)
	l.admitted(lc)
}

// admitted starts the sniff phase of lc, which has its permits and a
// slot.
func (l *loop) admitted(lc *lconn) {
	s, c, fd := l.s, lc.c, lc.cfd
	lc.p.permit = s.limiter != nil
	s.addSniffer(c)
	lc.p.sniffing = true
	if err := l.ctl(unix.EPOLL_CTL_ADD, fd, unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLET, lc.slot, lc.gen<<1|sideClient); err != nil {
		l.end(lc, rejected(stats.SniffError, err))
		return
	}
	lc.sn.Init(nil, s.sniffBudget)
	lc.p.buf = lc.sn.Buffer()
	lc.phase = lphSniff
	if c.lcfg.AcceptProxyProtocol {
		lc.phase = lphProxy
		l.arm(lc, c.start.Add(min(s.cfg.Timeouts.ClientHello, proxyHeaderTimeout)))
	} else {
		l.arm(lc, c.start.Add(s.cfg.Timeouts.ClientHello))
	}
	lc.cReady = true // the hello is often there already
	l.sniff(lc)
}

// admitQueued admits the connections waiting for a permit (lphPermit),
// oldest first, while permits are spare. Once no block is on its way any
// more (the master had none to spare), the rest go to goroutines, whose
// Acquire asks it urgently.
func (l *loop) admitQueued() {
	q := l.permitQ
	i := 0
	for ; i < len(q); i++ {
		lc := q[i]
		if lc.done || lc.phase != lphPermit {
			continue // closed meanwhile, or handed on by its deadline
		}
		ok, wait := l.admit()
		if !ok && wait {
			break
		}
		l.disarm(lc)
		if ok {
			l.admitted(lc)
		} else {
			l.toGoroutine(lc, (*path).run)
		}
	}
	n := copy(q, q[i:])
	clear(q[n:])
	l.permitQ = q[:n]
}

// Outcomes of admitPerIP.
const (
	perIPOK = iota
	perIPRefused
	perIPAsk
)

// admitPerIP takes lc's client permit under limits.per_ip_* if its lease
// has one (setting conn.perIPKey), refuses it if the master refused its
// client a moment ago, or says the master must be asked (a goroutine's
// Acquire).
func (l *loop) admitPerIP(lc *lconn) int {
	lim := l.s.PerIP
	if lim == nil {
		return perIPOK
	}
	local, ok := lim.(interface {
		AcquireLocal(netip.Addr) (bool, bool)
	})
	if !ok {
		return perIPAsk
	}
	key := lim.Key(lc.c.peer.Addr())
	granted, decided := local.AcquireLocal(key)
	switch {
	case !decided:
		return perIPAsk
	case !granted:
		return perIPRefused
	}
	lc.c.perIPKey = key
	return perIPOK
}

// admit takes a permit if one is spare, without waiting (true with no
// limiter). wait says none is, but the lease client has asked the master
// for more and will wake the loop when the answer lands (Watch).
func (l *loop) admit() (ok, wait bool) {
	if l.spares != nil {
		return l.spares.AcquireSpareOrWait()
	}
	lim := l.s.limiter
	if lim == nil {
		return true, false
	}
	if sa, ok := lim.(interface{ AcquireSpare() bool }); ok {
		return sa.AcquireSpare(), false
	}
	return lim.Acquire(), false
}

// spareWaiter is a Limiter whose spare permits the loop can wait for
// without blocking (lease.Client).
type spareWaiter interface {
	AcquireSpareOrWait() (ok, wait bool)
	// Watch sets the function called when the answer the loop waits
	// for lands.
	Watch(func())
}

// add gives lc a slot.
func (l *loop) add(lc *lconn) {
	l.gen++
	lc.gen = l.gen & (1<<31 - 1)
	if n := len(l.free); n > 0 {
		lc.slot = l.free[n-1]
		l.free = l.free[:n-1]
		l.slots[lc.slot] = lc
	} else {
		lc.slot = int32(len(l.slots))
		l.slots = append(l.slots, lc)
	}
	l.live++
}

// release gives lc's slot back and forgets it: the connection has ended
// or left the loop.
func (l *loop) release(lc *lconn) {
	lc.done = true
	l.disarm(lc)
	l.slots[lc.slot] = nil
	l.free = append(l.free, lc.slot)
	l.live--
}

// step handles readiness of lc's side.
func (l *loop) step(lc *lconn, side uint32, events uint32) {
	switch lc.phase {
	case lphSniff, lphProxy:
		if side == sideClient {
			l.sniff(lc)
		}
	case lphConnect:
		if side == sideBackend && events&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			l.connected(lc, events, 0)
		}
	case lphRelay:
		l.relay(lc)
	}
}

// sniff reads what the client sent until the sniffer decides.
func (l *loop) sniff(lc *lconn) {
	for lc.cReady {
		space, err := lc.sn.Space()
		if err != nil {
			if lc.phase == lphProxy {
				lc.p.countProtocol()
				l.end(lc, rejected(stats.ProxyHeader, err))
				return
			}
			l.sniffed(lc, sniff.Result{}, err)
			return
		}
		r, e := recvRaw(lc.cfd, space)
		if e == unix.EINTR {
			continue
		}
		if e == unix.EAGAIN {
			lc.cReady = false
			return
		}
		var rerr error
		n := int(r)
		if e != 0 {
			n, rerr = 0, os.NewSyscallError("read", e)
		} else if n == 0 {
			rerr = io.EOF
		}
		lc.cReady = rerr == nil && (n == len(space) || lc.cHup)
		if lc.phase == lphProxy {
			if !l.proxyHeader(lc, n, rerr) {
				return
			}
			continue
		}
		res, err := lc.sn.Advance(n)
		if errors.Is(err, sniff.ErrNeedMore) {
			if rerr == nil {
				continue
			}
			err = lc.sn.Ended(rerr)
		}
		l.sniffed(lc, res, err)
		return
	}
}

// sniffed ends the sniff phase with the sniffer's decision.
func (l *loop) sniffed(lc *lconn, res sniff.Result, err error) {
	lc.c.o.res = res
	lc.p.countProtocol()
	if rr := lc.p.sniffResult(err); rr.end != endNext {
		l.end(lc, rr)
		return
	}
	l.routed(lc)
}

// proxyHeader takes n more bytes read (rerr: the read's error) while
// waiting for the PROXY header of a listener with accept_proxy_protocol.
// Once the header is complete it names the client (path.useProxyHeader),
// the client's limits admit it, and the sniff phase goes on from the bytes
// after the header. It reports whether lc is still reading it.
func (l *loop) proxyHeader(lc *lconn, n int, rerr error) bool {
	p := &lc.p
	lc.sn.Grow(n)
	b := lc.sn.Buffer().Bytes()
	h, hlen, err := parseProxyHeader(b)
	if err == nil && hlen == 0 {
		if rerr == nil {
			return true
		}
		err = proxyReadError(rerr, len(b))
	}
	if err == nil {
		if r := p.useProxyHeader(h); r.end != endNext {
			l.end(lc, r)
			return false
		}
	}
	if err != nil {
		p.countProtocol()
		l.end(lc, rejected(stats.ProxyHeader, err))
		return false
	}
	rest := append([]byte(nil), b[hlen:]...)
	p.releaseBuffer()
	switch l.admitPerIP(lc) {
	case perIPRefused:
		l.end(lc, rejected(stats.PerIPLimit, errPerIP))
		return false
	case perIPAsk:
		l.toGoroutine(lc, func(p *path) result { return p.fromPerIP(rest) })
		return false
	}
	lc.phase = lphSniff
	lc.sn.Init(rest, lc.c.srv.sniffBudget)
	p.buf = lc.sn.Buffer()
	l.arm(lc, lc.c.start.Add(lc.c.srv.cfg.Timeouts.ClientHello))
	if res, err := lc.sn.Decide(); !errors.Is(err, sniff.ErrNeedMore) {
		l.sniffed(lc, res, err)
		return false
	}
	return true
}

// routed runs the route phase and starts the dial, or hands the
// connection to a goroutine for a dial the loop does not do.
func (l *loop) routed(lc *lconn) {
	p := &lc.p
	if r := p.route(); r.end != endNext {
		l.end(lc, r)
		return
	}
	connect := p.dialSettings()
	lc.dialStart = time.Now() // for the connect-time histogram: not the batch's time
	if pool := p.dec.Pool; pool != nil && pool.Addresses() != nil {
		// DialPool's plan: the balancer's order, then the rest; each
		// attempt a share of the time left; every outcome reported.
		lc.order = pool.Order(lc.orderBuf[:0], p.clientAddr())
		lc.dialEnd = lc.dialStart.Add(connect)
		l.dialNext(lc)
		return
	}
	addr, ok := loopAddr(p.dec)
	if !ok {
		l.toGoroutine(lc, (*path).fromDial)
		return
	}
	if err := p.c.srv.Dialer.CheckExplicit(addr); err != nil {
		l.end(lc, rejected(routeReason(err), fmt.Errorf("dial %q: 1 address refused: %w", p.dec.Host, err)))
		return
	}
	l.dial(lc, addr, connect)
}

// dialNext dials the pool's next backend in lc's order, or ends lc once
// every one failed or the dial phase is over.
func (l *loop) dialNext(lc *lconn) {
	pool := lc.p.dec.Pool
	for lc.next < len(lc.order) {
		left := lc.dialEnd.Sub(l.now)
		if left <= 0 {
			if lc.first == nil {
				lc.first = fmt.Errorf("%w: %w", route.ErrDial, context.DeadlineExceeded)
			}
			break
		}
		k := lc.next
		i := lc.order[k]
		lc.next++
		addr := pool.Addresses()[i]
		if err := lc.c.srv.Dialer.CheckExplicit(addr); err != nil {
			l.attemptFailed(lc, i, addr, err)
			continue
		}
		l.dial(lc, addr, min(route.AttemptTime(left, len(lc.order)-k), left))
		return
	}
	lc.c.o.backend = lc.addr
	l.end(lc, rejected(stats.DialError, pool.Failed(lc.tried, len(lc.order), lc.first)))
}

// attemptFailed records the failure of the attempt on pool backend i at
// addr: reported to the master as DialPool reports it.
func (l *loop) attemptFailed(lc *lconn, i int, addr netip.AddrPort, err error) {
	err = fmt.Errorf("dial %q: 1 address failed, first: %w: dial tcp %s: %w", lc.p.dec.Pool.Backends[i].Host, route.ErrDial, addr, err)
	lc.c.srv.reportDial(lc.p.dec.Pool)(i, err)
	lc.tried++
	if lc.first == nil {
		lc.first = err
	}
}

// loopAddr returns the address to dial for dec if the loop can dial it:
// an explicit route (or default backend) whose host is an IP address.
func loopAddr(dec route.Decision) (netip.AddrPort, bool) {
	if dec.Pool != nil || dec.Rule == route.RuleDNS || dec.Port < 1 || dec.Port > 65535 {
		return netip.AddrPort{}, false
	}
	a, err := netip.ParseAddr(dec.Host)
	if err != nil || a.Zone() != "" {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(dec.Port)), true
}

// dial starts a non-blocking connect to addr.
func (l *loop) dial(lc *lconn, addr netip.AddrPort, timeout time.Duration) {
	lc.phase = lphConnect
	lc.addr = addr
	lc.attemptStart = l.now
	lc.bReady, lc.bHup = false, false // of an earlier attempt's socket
	family := unix.AF_INET
	if addr.Addr().Is6() {
		family = unix.AF_INET6
	}
	r, _, e := syscall.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		l.dialFailed(lc, os.NewSyscallError("socket", e))
		return
	}
	lc.bfd = int(r)
	one := int32(1)
	syscall.RawSyscall6(unix.SYS_SETSOCKOPT, r, unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
	var e2 syscall.Errno
	if family == unix.AF_INET {
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: addr.Addr().As4()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(addr.Port()>>8), byte(addr.Port())
		_, _, e2 = syscall.RawSyscall(unix.SYS_CONNECT, r, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: addr.Addr().As16()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(addr.Port()>>8), byte(addr.Port())
		_, _, e2 = syscall.RawSyscall(unix.SYS_CONNECT, r, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	}
	if e2 != 0 && e2 != unix.EINPROGRESS {
		l.dialFailed(lc, os.NewSyscallError("connect", e2))
		return
	}
	if err := l.ctl(unix.EPOLL_CTL_ADD, lc.bfd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET, lc.slot, lc.gen<<1|sideBackend); err != nil {
		l.dialFailed(lc, err)
		return
	}
	l.arm(lc, lc.attemptStart.Add(timeout))
	if e2 == 0 {
		l.connected(lc, unix.EPOLLOUT, 0)
		return
	}
	// On loopback, and wherever the handshake is as quick, the socket is
	// connected by the time connect returns: the replay written now
	// saves a turn of the loop for EPOLLOUT. A socket still connecting
	// takes nothing (EAGAIN); one refused says so (its error).
	if b := lc.p.buf.Bytes(); lc.p.proxyHeader == "" && len(b) > 0 {
		switch n, e := sendRaw(lc.bfd, b); e {
		case 0:
			l.connected(lc, unix.EPOLLOUT, int(n))
		case unix.EAGAIN, unix.EINTR:
		default:
			l.dialFailed(lc, os.NewSyscallError("connect", e))
		}
	}
}

// dialFailed ends lc with a dial error, worded as Dialer.Dial words it.
func (l *loop) dialFailed(lc *lconn, err error) {
	if lc.order != nil {
		// A pool: the next backend, if any.
		l.disarm(lc)
		if lc.bfd >= 0 {
			closeRaw(lc.bfd) // out of the epoll set with it
			lc.bfd = -1
		}
		l.attemptFailed(lc, lc.order[lc.next-1], lc.addr, err)
		l.dialNext(lc)
		return
	}
	lc.c.o.backend = lc.addr
	l.end(lc, rejected(stats.DialError, fmt.Errorf("dial %q: 1 address failed, first: %w: dial tcp %s: %w", lc.p.dec.Host, route.ErrDial, lc.addr, err)))
}

// connected finishes the connect (or fails it), replays and starts
// relaying. sent is how much of the replay dial wrote already (no PROXY
// header then).
func (l *loop) connected(lc *lconn, events uint32, sent int) {
	c, s := lc.c, lc.c.srv
	lc.bReady = events&unix.EPOLLIN != 0
	if events&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		soerr, err := unix.GetsockoptInt(lc.bfd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err == nil && soerr != 0 {
			err = syscall.Errno(soerr)
		} else if err == nil {
			err = unix.ECONNREFUSED
		}
		l.dialFailed(lc, os.NewSyscallError("connect", err))
		return
	}
	l.disarm(lc)
	c.o.backend = lc.addr
	s.rec.BackendConnect(time.Since(lc.dialStart))
	if pool := lc.p.dec.Pool; lc.order != nil {
		i := lc.order[lc.next-1]
		pool.Connected(i)
		s.reportDial(pool)(i, nil)
		c.pool, c.poolBackend = pool, int32(i)
	}
	// Replay: the PROXY header, if the route sends one, then the sniffed
	// bytes (only those are counted, as the replay phase counts them).
	out, header := lc.p.buf.Bytes(), 0
	if v := lc.p.proxyHeader; v != "" {
		var sa unix.RawSockaddrAny
		salen := uint32(unsafe.Sizeof(sa))
		// The address the client connected to: the one a trusted PROXY
		// header named, else the socket's.
		if !lc.p.local.IsValid() {
			if _, _, e := syscall.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(lc.cfd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&salen))); e == 0 {
				lc.p.local = unmapAddrPort(rawAddrPort(&sa))
			}
		}
		h, err := formatProxyHeader(v, c.peer, lc.p.local, c.o.res.Name)
		if err != nil {
			l.end(lc, result{end: endBackendError, err: err})
			return
		}
		if len(h)+len(out) > len(l.buf) {
			l.toGoroutine(lc, (*path).fromReplay) // a hello too big to join
			return
		}
		out = append(append(l.buf[:0], h...), out...)
		header = len(h)
	}
	lc.phase = lphRelay
	lc.last = l.mono(l.now)
	l.armNano(lc, lc.last+int64(loopRelayFor))
	if sent > 0 {
		l.count(lc, sideBackend, int64(sent))
		out = out[sent:]
	}
	if !l.write(lc, sideBackend, out, header) {
		return
	}
	lc.p.releaseBuffer()
	l.relay(lc)
}

// closeRaw closes the socket fd, a raw system call as the loop's others
// (the scheduler does not see it: a close that the kernel preempts does
// not leave the loop's P in a system call for the runtime's monitor to
// take, with the thread hand-offs that follow). The loop's sockets never
// linger, so close returns at once.
func closeRaw(fd int) {
	syscall.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

// recvRaw reads from the socket fd into b (len(b) > 0): recvfrom(2),
// which takes a shorter path through the kernel than read(2) (no VFS
// layer).
func recvRaw(fd int, b []byte) (uintptr, syscall.Errno) {
	r, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0, 0, 0)
	return r, e
}

// sendRaw writes b (len(b) > 0) to the socket fd: sendto(2), as recvRaw,
// with MSG_NOSIGNAL (a peer gone is EPIPE, not a signal).
func sendRaw(fd int, b []byte) (uintptr, syscall.Errno) {
	r, _, e := syscall.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_NOSIGNAL, 0, 0)
	return r, e
}

// write writes b to lc's side, counting as moved all but its first skip
// bytes (a PROXY header); what the socket does not take at once goes to
// the pair with the rest of the connection. It reports whether lc is
// still the loop's.
func (l *loop) write(lc *lconn, side uint32, b []byte, skip int) bool {
	fd := lc.bfd
	if side == sideClient {
		fd = lc.cfd
	}
	for len(b) > 0 {
		r, e := sendRaw(fd, b)
		if e == unix.EINTR {
			continue
		}
		if e == unix.EAGAIN {
			break
		}
		if e != 0 {
			err := os.NewSyscallError("write", e)
			if lc.p.buf != nil { // replaying
				l.end(lc, result{end: endBackendError, err: fmt.Errorf("worker: replay to backend: %w", err)})
			} else {
				l.end(lc, copyResult(err))
			}
			return false
		}
		n := int(r)
		if d := min(skip, n); d > 0 {
			skip -= d
			n -= d
		}
		if n > 0 {
			l.count(lc, side, int64(n))
		}
		b = b[r:]
	}
	if len(b) == 0 {
		return true
	}
	// The peer is slow to take it: the pair writes the rest (with its
	// deadline) and goes on.
	l.toPair(lc, append([]byte(nil), b...), side, skip)
	return false
}

// count counts n bytes written to side.
func (l *loop) count(lc *lconn, side uint32, n int64) {
	if side == sideBackend {
		lc.in += n
		lc.c.srv.rec.Bytes(n, 0)
	} else {
		lc.out += n
		lc.c.srv.rec.Bytes(0, n)
	}
	lc.last = l.mono(l.now)
}

// relay copies what is ready either way.
func (l *loop) relay(lc *lconn) {
	for lc.cReady && !lc.upDone && !lc.done {
		if !l.copyOnce(lc, sideClient) {
			return
		}
	}
	for lc.bReady && !lc.downDone && !lc.done {
		if !l.copyOnce(lc, sideBackend) {
			return
		}
	}
}

// copyOnce reads once from side from and writes it to the other side. It
// reports whether lc is still the loop's.
func (l *loop) copyOnce(lc *lconn, from uint32) bool {
	src, to := lc.cfd, uint32(sideBackend)
	if from == sideBackend {
		src, to = lc.bfd, sideClient
	}
	r, e := recvRaw(src, l.buf)
	if e == unix.EINTR {
		return true
	}
	if e == unix.EAGAIN {
		l.setReady(lc, from, false)
		return true
	}
	if e != 0 {
		l.end(lc, copyResult(os.NewSyscallError("read", e)))
		return false
	}
	n := int(r)
	if n == 0 {
		// FIN: passed on; the direction has ended.
		l.setReady(lc, from, false)
		if (from == sideClient && lc.downDone) || (from == sideBackend && lc.upDone) {
			// The other way ended first: closing the sockets (end)
			// sends this FIN on. Nothing is left unread in either (each
			// was read to its end), so close sends FIN, not RST: one
			// shutdown less per connection.
			lc.upDone, lc.downDone = true, true
			l.end(lc, result{end: endOK})
			return false
		}
		dst := lc.bfd
		if to == sideClient {
			dst = lc.cfd
		}
		syscall.RawSyscall(unix.SYS_SHUTDOWN, uintptr(dst), unix.SHUT_WR, 0)
		if from == sideClient {
			lc.upDone = true
		} else {
			lc.downDone = true
		}
		if lc.upDone && lc.downDone {
			l.end(lc, result{end: endOK})
			return false
		}
		return true
	}
	l.setReady(lc, from, n == len(l.buf) || (from == sideClient && lc.cHup) || (from == sideBackend && lc.bHup))
	if !l.write(lc, to, l.buf[:n], 0) {
		return false
	}
	if n == len(l.buf) {
		// A stream: the pair splices it.
		l.toPair(lc, nil, 0, 0)
		return false
	}
	return true
}

// setReady records whether side may have bytes unread.
func (l *loop) setReady(lc *lconn, side uint32, ready bool) {
	if side == sideClient {
		lc.cReady = ready
	} else {
		lc.bReady = ready
	}
}

// end ends lc in the loop with r: both sockets closed, the permit and the
// rest given back, the access-log line written (conn.finish).
func (l *loop) end(lc *lconn, r result) {
	c := lc.c
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	closeRaw(lc.cfd)
	if lc.bfd >= 0 {
		closeRaw(lc.bfd)
	}
	l.finish(lc, r)
}

// finish is end once the sockets are closed.
func (l *loop) finish(lc *lconn, r result) {
	l.ended.Add(1)
	l.release(lc)
	if lc.phase == lphRelay {
		r.counts = proxy.Result{In: lc.in, Out: lc.out}
	}
	lc.p.finish(r)
}

// files turns lc's raw sockets into *net.TCPConn values (the backend's
// only if dialled) for a goroutine or a pair.
// The raw sockets are closed either way.
func (l *loop) files(lc *lconn) (client, backend *net.TCPConn, err error) {
	defer l.refill()
	client, err = l.rawTCP(lc.cfd, "client")
	if err == nil && lc.bfd >= 0 {
		backend, err = l.rawTCP(lc.bfd, "backend")
	} else if lc.bfd >= 0 {
		unix.Close(lc.bfd)
	}
	if err != nil && client != nil {
		client.Close()
	}
	return client, backend, err
}

// loopReserve is how many descriptors the loop keeps for hand-offs: one
// is enough for each conversion (its duplicate is made before the raw
// socket is closed), one more in case another goroutine of the worker
// takes a freed slot first.
const loopReserve = 2

// rawTCP makes a *net.TCPConn of a raw socket, which it closes (the conn
// has its own duplicate). Out of descriptors for the duplicate, it spends
// the loop's reserve and tries again: a worker at its fd limit (which
// only refuses new connections) hands its established ones on all the
// same. refill makes the reserve whole again afterwards.
func (l *loop) rawTCP(fd int, name string) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	c, err := fileTCP(f)
	if err != nil && (errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE)) && len(l.reserve) > 0 {
		for _, r := range l.reserve {
			unix.Close(r)
		}
		l.reserve = l.reserve[:0]
		c, err = fileTCP(f)
	}
	return c, err
}

// refill opens the loop's reserve descriptors that are missing (all of
// them at start, those a hand-off spent after): a hand-off gives back
// what it took, so they are there again unless another goroutine took
// them, and the next hand-off tries again.
func (l *loop) refill() {
	for len(l.reserve) < loopReserve {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			return
		}
		l.reserve = append(l.reserve, fd)
	}
}

// leave takes lc out of the loop for a goroutine or a pair: its sockets
// become *net.TCPConn values set on the conn under c.mu. If the
// connection was closed meanwhile (a drain, a move, an eviction), or the
// sockets cannot be converted, the loop ends it instead and leave returns
// false.
func (l *loop) leave(lc *lconn) bool {
	c := lc.c
	// Out of the loop's epoll set first: a registration belongs to the
	// socket, not the descriptor, and would outlive the close of the raw
	// descriptor in files (the duplicates keep the socket), waking the
	// loop for every byte of a stream it no longer serves.
	l.ctl(unix.EPOLL_CTL_DEL, lc.cfd, 0, 0, 0)
	if lc.bfd >= 0 {
		l.ctl(unix.EPOLL_CTL_DEL, lc.bfd, 0, 0, 0)
	}
	client, backend, err := l.files(lc)
	c.mu.Lock()
	if err != nil || c.closed {
		c.closed = true
		c.mu.Unlock()
		if err != nil {
			// Out of descriptors for the duplicates, most likely.
			r := result{end: endError, err: fmt.Errorf("worker: event loop: hand-off: %w", err)}
			if lc.phase != lphRelay {
				r = rejected(stats.Limit, r.err)
			}
			l.finish(lc, r)
			return false
		}
		client.Close()
		if backend != nil {
			backend.Close()
		}
		l.finish(lc, l.closedResult(lc, errors.New("worker: closed by a drain or a move")))
		return false
	}
	c.client, c.backend, c.lc = client, backend, nil
	c.mu.Unlock()
	l.release(lc)
	// What Go's listener sets on every accepted socket; the loop's
	// short connections do without it.
	client.SetKeepAliveConfig(clientKeepAlive)
	return true
}

// clientKeepAlive is Go's default for accepted sockets (net.ListenConfig).
var clientKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 15 * time.Second, Count: 9}

// toGoroutine hands lc to a goroutine that goes on with run, the phases
// from the one lc has reached.
func (l *loop) toGoroutine(lc *lconn, run func(*path) result) {
	if !l.leave(lc) {
		return
	}
	l.toGoroutines.Add(1)
	go func() {
		p := &lc.p
		if !p.local.IsValid() { // else named by a trusted PROXY header
			p.local = addrPortOf(lc.c.client.LocalAddr())
		}
		p.end(run(p))
	}()
}

// toPair hands a relaying lc to its pair. pending, if any, is what side
// (to) has not taken yet, the first skip bytes of it not counted (a PROXY
// header): a goroutine writes it first, bounded by the idle timeout.
func (l *loop) toPair(lc *lconn, pending []byte, to uint32, skip int) {
	if !l.leave(lc) {
		return
	}
	lc.p.releaseBuffer()
	l.toPairs.Add(1)
	c := lc.c
	st := proxy.State{In: lc.in, Out: lc.out, UpDone: lc.upDone, DownDone: lc.downDone, Last: l.base.Add(time.Duration(lc.last))}
	if len(pending) == 0 {
		c.mu.Lock()
		if c.closed {
			// Closed (a drain deadline, a move) since leave: its
			// sockets are closed; it ends here.
			c.mu.Unlock()
			r := result{end: endDeadline, err: errDeadline, counts: proxy.Result{In: st.In, Out: st.Out}}
			lc.p.finish(r)
			return
		}
		c.startPairLocked(lc.p.permit, st)
		c.mu.Unlock()
		return
	}
	c.mu.Lock()
	c.handing = true
	c.mu.Unlock()
	go func() {
		dst := c.backend
		if to == sideClient {
			dst = c.client
		}
		dst.SetWriteDeadline(time.Now().Add(c.idleTimeout()))
		n, err := dst.Write(pending)
		dst.SetWriteDeadline(time.Time{})
		if n -= min(n, skip); n > 0 {
			if to == sideBackend {
				st.In += int64(n)
				c.srv.rec.Bytes(int64(n), 0)
			} else {
				st.Out += int64(n)
				c.srv.rec.Bytes(0, int64(n))
			}
		}
		c.mu.Lock()
		c.handing = false
		if err == nil && !c.closed {
			st.Last = time.Now()
			c.startPairLocked(lc.p.permit, st)
			c.mu.Unlock()
			return
		}
		c.closed = true
		c.mu.Unlock()
		c.client.Close()
		c.backend.Close()
		r := copyResult(err)
		if err == nil {
			r = result{end: endClosed, err: errors.New("worker: closed by a drain or a move")}
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			r = result{end: endIdle, err: err}
		}
		r.counts = proxy.Result{In: st.In, Out: st.Out}
		lc.p.finish(r)
	}()
}

// closedResult is the result of lc closed from outside (requestClose).
func (l *loop) closedResult(lc *lconn, err error) result {
	c := lc.c
	switch {
	case (lc.phase == lphSniff || lc.phase == lphProxy) && c.stolen.Load():
		return rejected(stats.SniffTimeout, fmt.Errorf("worker: evicted after %v with no complete hello, its permit needed by another connection",
			time.Since(c.start).Round(time.Millisecond)))
	case lc.phase == lphRelay:
		return result{end: endDeadline, err: errDeadline}
	}
	return result{end: endClosed, err: err}
}

// mono returns t on the loop's monotonic clock, in nanoseconds.
func (l *loop) mono(t time.Time) int64 { return int64(t.Sub(l.base)) }

// arm sets lc's deadline.
func (l *loop) arm(lc *lconn, when time.Time) {
	l.armNano(lc, l.mono(when))
}

func (l *loop) armNano(lc *lconn, when int64) {
	lc.when = when
	if lc.hidx >= 0 {
		heap.Fix(&l.timer, lc.hidx)
		return
	}
	heap.Push(&l.timer, lc)
}

// disarm clears lc's deadline.
func (l *loop) disarm(lc *lconn) {
	if lc.hidx >= 0 {
		heap.Remove(&l.timer, lc.hidx)
	}
}

// expire handles the deadlines that have passed.
func (l *loop) expire() {
	nowT := l.now
	now := l.mono(nowT)
	for len(l.timer) > 0 && l.timer[0].when <= now {
		lc := l.timer[0]
		l.disarm(lc)
		switch lc.phase {
		case lphSniff:
			l.end(lc, rejected(stats.SniffTimeout, lc.sn.Ended(os.ErrDeadlineExceeded)))
		case lphProxy:
			lc.p.countProtocol()
			l.end(lc, rejected(stats.ProxyHeader, proxyReadError(os.ErrDeadlineExceeded, len(lc.sn.Buffer().Bytes()))))
		case lphConnect:
			l.dialFailed(lc, fmt.Errorf("i/o timeout: %w", os.ErrDeadlineExceeded))
		case lphPermit:
			l.toGoroutine(lc, (*path).run) // out of permitQ: admitQueued skips it
		case lphRelay:
			if quiet := lc.last + int64(loopRelayFor); quiet > now {
				// Bytes moved since it was armed: not quiet yet.
				l.armNano(lc, quiet)
				continue
			}
			l.toPair(lc, nil, 0, 0)
		}
	}
	for i := range l.lns {
		ln := &l.lns[i]
		if !ln.retry.IsZero() && !nowT.Before(ln.retry) {
			ln.retry = time.Time{}
			if ln.fd >= 0 {
				l.addListener(i)
			}
		}
	}
}

// requestClose asks the loop to close lc (conn.close, with c.mu held).
func (l *loop) requestClose(lc *lconn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closes = append(l.closes, lc)
	l.pokeLocked()
}

// handOffAll hands every relaying connection to its pair and returns
// once done (for Move: a pair can move, a loop connection cannot).
func (l *loop) handOffAll() {
	ack := make(chan struct{})
	l.mu.Lock()
	l.handoffs = append(l.handoffs, ack)
	l.pokeLocked()
	l.mu.Unlock()
	select {
	case <-ack:
	case <-l.done:
	}
}

// stop makes the loop stop accepting (its listeners closed, after
// linger) and exit once its connections have left; it returns once no
// connection is accepted any more.
func (l *loop) stop(linger time.Duration) {
	l.mu.Lock()
	l.stopping = true
	l.linger = linger
	l.pokeLocked()
	l.mu.Unlock()
	select {
	case <-l.acceptStopped:
	case <-l.done:
	}
}

// poke wakes the loop, unless it has returned.
func (l *loop) poke() {
	l.mu.Lock()
	l.pokeLocked()
	l.mu.Unlock()
}

// pokeLocked wakes the loop, unless it has returned; l.mu is held.
func (l *loop) pokeLocked() {
	if l.exited {
		return
	}
	one := uint64(1)
	unix.Write(l.wake, (*[8]byte)(unsafe.Pointer(&one))[:])
}

// requests handles what other goroutines asked for.
func (l *loop) requests() {
	l.mu.Lock()
	closes, handoffs, stopping, linger := l.closes, l.handoffs, l.stopping, l.linger
	l.closes, l.handoffs = nil, nil
	l.mu.Unlock()
	for _, lc := range closes {
		if !lc.done {
			l.end(lc, l.closedResult(lc, errors.New("worker: closed by a drain or a move")))
		}
	}
	if len(handoffs) > 0 {
		for _, lc := range l.slots {
			if lc != nil && !lc.done && lc.phase == lphRelay {
				l.toPair(lc, nil, 0, 0)
			}
		}
		for _, ack := range handoffs {
			close(ack)
		}
	}
	if stopping && !l.stopped() {
		var fds []int
		for i := range l.lns {
			if fd := l.lns[i].fd; fd >= 0 {
				l.ctl(unix.EPOLL_CTL_DEL, fd, 0, 0, 0)
				fds = append(fds, fd)
				l.lns[i].fd = -1
			}
		}
		closeAll := func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
		if linger > 0 {
			time.AfterFunc(linger, closeAll)
		} else {
			closeAll()
		}
		close(l.acceptStopped)
	}
}

// lheap is the loop's deadlines, earliest first.
type lheap []*lconn

func (h lheap) Len() int           { return len(h) }
func (h lheap) Less(i, j int) bool { return h[i].when < h[j].when }
func (h lheap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].hidx, h[j].hidx = i, j
}

func (h *lheap) Push(x any) {
	lc := x.(*lconn)
	lc.hidx = len(*h)
	*h = append(*h, lc)
}

func (h *lheap) Pop() any {
	old := *h
	lc := old[len(old)-1]
	old[len(old)-1] = nil
	lc.hidx = -1
	*h = old[:len(old)-1]
	return lc
}
