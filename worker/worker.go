// Package worker serves client connections on listeners it is handed.
// Each connection goes through the phases admit (a permit) → sniff (the
// first bytes, for a name: package sniff) → route and dial (package route)
// → replay (the sniffed bytes and a PROXY header, to the backend) → copy
// (both ways: package proxy); see conn.serve.
//
// A Server knows nothing of processes: it serves *net.TCPListener values
// however they were made (bound here, inherited from a parent, received
// over a Unix socket), takes its global connection permits from a Limiter
// and reports its counts to a Recorder, so the same code runs in-process or
// inside a worker process of a master. The worker process around it (its
// messages with the master, leases, counters, retiring and moving) is
// package worker/process.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// Recorder receives a Server's counts. *stats.Counters implements it; every
// method must be safe for concurrent use and cheap.
type Recorder interface {
	Opened()
	Closed()
	Protocol(stats.Protocol)
	Rejected(stats.Reason)
	Bytes(in, out int64)
	BackendConnect(time.Duration)
}

// Limiter hands out permits for the global connection limit. Acquire
// reports false when no permit is free; every successful Acquire is followed
// by exactly one Release.
type Limiter interface {
	Acquire() bool
	Release()
}

// Listener is a listening socket with its config.
type Listener struct {
	Config config.Listener
	Ln     *net.TCPListener
}

// keepAlive is the TCP keepalive idle time of backend connections, set by
// the Poller once a backend socket is quiet (client
// connections get the listener default, 15s).
const keepAlive = 60 * time.Second

// sniffBudgetBytes is how much a worker's sniffing connections may buffer
// beyond sniff.SmallBytes each, together: about 70 of the largest hellos
// (128 KiB) at once. So the memory of connections still sniffing stays under
// max_connections × 16 KiB (what HAProxy's and nginx's buffers hold) plus
// 8 MiB per worker, whatever clients send; a client whose hello needs more
// than 16 KiB while the budget is spent is refused (sniff_error).
const sniffBudgetBytes = 8 << 20

// Server serves connections. Create it with New.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	rec     Recorder
	limiter Limiter
	table   *route.Table
	// pools are the routes' pools, by route index (nil for a route
	// without one); SetHealth updates them.
	pools []*route.Pool
	// poolByMatch is the pool of each pooled route by its match, for the
	// connections moved here (adoptPoolBackend); first match wins.
	poolByMatch map[string]*route.Pool
	// dials collects the outcomes of dials to pool backends for the
	// master (TakeDialRuns).
	dials dialRuns
	// Dialer dials backends; a seam for tests (its Resolver). Its Timeout
	// is zero: the dial phase bounds each dial by the route's connect
	// timeout.
	Dialer *route.Dialer
	// LingerOnStop, for the reload test's negative control only, keeps
	// the listeners open (not accepting) this long after stopAccepting, so
	// that connections queue on sockets about to be closed.
	LingerOnStop time.Duration
	// AccessLog gets the access log: one line per connection. New sets
	// it to the server's logger; nil writes none (log.access: false). Set
	// it before Serve.
	AccessLog *slog.Logger
	// PerIP, if set, enforces the per-client limits (limits.per_ip_*).
	// Set it before Serve.
	PerIP PerIPLimiter
	// EventLoop serves the short phases of connections in an event loop
	// on a thread of its own (loop.go). The loop
	// holds a P of the Go scheduler while it waits for work: set it only
	// with GOMAXPROCS 2 or more, and for one Server per process. Set it
	// before Serve.
	EventLoop bool

	// sniffLimit bounds the connections of this server still in the sniff
	// phase, so slow or silent clients cannot hold the whole connection
	// budget: see sniffLimitFor.
	sniffLimit int64
	sniffing   atomic.Int64
	// sniffMu guards sniffers, the connections in the sniff phase (see
	// sniffers.go).
	sniffMu  sync.Mutex
	sniffers map[*conn]struct{}
	// sniffBudget lends the buffers of sniffing connections what they
	// need beyond sniff.SmallBytes each (sniffBudgetBytes).
	sniffBudget *sniff.Budget
	// permitWait is how long a connection may wait in the event loop for
	// a permit block under way (loopPermitWait; tests change it).
	permitWait time.Duration

	// poller parks idle pairs without goroutines; nil if it could not be
	// made (pairs then park on goroutines).
	poller *proxy.Poller
	// moving is set by the first Move.
	moving atomic.Bool
	// loop is the event loop, if Serve started one (under mu).
	loop *loop

	nextID atomic.Uint64
	wg     sync.WaitGroup // one per connection handler
	mu     sync.Mutex
	conns  map[*conn]struct{}
	lns    []*net.TCPListener
	closed bool
}

// New returns a Server for cfg. limiter may be nil (no limit beyond the
// process's own).
func New(cfg *config.Config, log *slog.Logger, rec Recorder, limiter Limiter) (*Server, error) {
	t, pools, err := newRoutes(cfg)
	if err != nil {
		return nil, err
	}
	var forbidden []netip.AddrPort
	for _, l := range cfg.Listeners {
		if ap, err := netip.ParseAddrPort(l.Address); err == nil {
			forbidden = append(forbidden, ap)
		} else if _, port, err := net.SplitHostPort(l.Address); err == nil {
			// ":443" listens on every address.
			if ap, err := netip.ParseAddrPort("0.0.0.0:" + port); err == nil {
				forbidden = append(forbidden, ap)
			}
		}
	}
	poller, err := proxy.NewPoller()
	if err != nil {
		log.Warn("idle connections will hold a goroutine each", "err", err)
		poller = nil
	}
	dialKeepAlive := keepAlive
	if poller != nil {
		// The poller turns keep-alive on once a backend socket has been
		// quiet a moment: short connections never pay for it.
		poller.SetBackendKeepAlive(net.KeepAliveConfig{Enable: true, Idle: keepAlive})
		dialKeepAlive = -1
	}
	return &Server{
		AccessLog:   log,
		poller:      poller,
		cfg:         cfg,
		log:         log,
		rec:         rec,
		limiter:     limiter,
		table:       t,
		pools:       pools,
		poolByMatch: poolsByMatch(cfg, pools),
		sniffBudget: sniff.NewBudget(sniffBudgetBytes),
		permitWait:  loopPermitWait,
		Dialer: &route.Dialer{
			AllowPrivate: cfg.Backend.AllowPrivate,
			Family:       route.Family(cfg.Backend.DNSFamily),
			Forbidden:    forbidden,
			KeepAlive:    dialKeepAlive,
		},
		conns:      map[*conn]struct{}{},
		sniffLimit: int64(sniffLimitFor(cfg)),
		sniffers:   map[*conn]struct{}{},
	}, nil
}

// sniffLimitFor returns this worker's sniff share: how many of its
// connections may sit in the sniff phase undisturbed, three quarters of its
// share of max_connections (at least 1). Past it, connections slow to send
// their hello give their permits up when they are needed (sniffers.go), so
// clients that never finish a hello cannot hold the whole budget.
func sniffLimitFor(cfg *config.Config) int {
	workers := cfg.Workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	return max(1, cfg.MaxConnections*3/4/workers)
}

// Serve accepts on every listener until ctx is done, then closes the
// listeners (these copies only: a socket shared with other processes stays
// open there) and returns once every accept loop has ended. Connections
// already accepted go on; Drain waits for them.
func (s *Server) Serve(ctx context.Context, lns []Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	for _, l := range lns {
		s.lns = append(s.lns, l.Ln)
	}
	s.mu.Unlock()

	if s.EventLoop && len(lns) > 0 {
		l, err := newLoop(s, lns)
		if err != nil {
			s.log.Warn("no event loop: connections are served on goroutines from the start", "err", err)
		} else {
			lns = nil
			s.mu.Lock()
			s.loop = l
			s.mu.Unlock()
			go l.run()
		}
	}
	var loops sync.WaitGroup
	errc := make(chan error, len(lns))
	for _, l := range lns {
		loops.Add(1)
		go func() {
			defer loops.Done()
			if err := s.acceptLoop(l); err != nil {
				errc <- err
			}
		}()
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		s.stopAccepting()
		loops.Wait()
		return err
	}
	s.stopAccepting()
	loops.Wait()
	return nil
}

// stopAccepting closes the listeners; accept loops end. It is idempotent.
func (s *Server) stopAccepting() {
	s.mu.Lock()
	l := s.loop
	s.mu.Unlock()
	if l != nil {
		// Not under mu: the loop takes it to end connections.
		l.stop(s.LingerOnStop)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if d := s.LingerOnStop; d > 0 {
		// Test-only negative control: stop accepting but keep the sockets
		// open a while, so that connections queue, then close them.
		lns := s.lns
		for _, ln := range lns {
			ln.SetDeadline(time.Now())
		}
		time.AfterFunc(d, func() {
			for _, ln := range lns {
				ln.Close()
			}
		})
	} else {
		for _, ln := range s.lns {
			ln.Close()
		}
	}
	s.lns = nil
}

// stopped reports whether stopAccepting was called.
func (s *Server) stopped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Active returns the number of connections being served.
func (s *Server) Active() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Drain waits until every connection has ended or ctx is done; then it
// closes those left and waits for their handlers. It returns the number of
// connections it had to close.
func (s *Server) Drain(ctx context.Context) int {
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	n := 0
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		n = len(s.conns)
		for c := range s.conns {
			c.close()
		}
		s.mu.Unlock()
		<-done
	}
	if s.poller != nil && s.stopped() {
		s.poller.Close()
	}
	return n
}

// acceptLoop accepts until the listener is closed, backing off on
// temporary errors such as running out of file descriptors.
func (s *Server) acceptLoop(l Listener) error {
	// Every connection points to one copy of the listener's config.
	lcfg := &l.Config
	var delay time.Duration
	for {
		c, err := l.Ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || (errors.Is(err, os.ErrDeadlineExceeded) && s.stopped()) {
				return nil
			}
			if isTemporary(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "listener", l.Config.Address, "err", err, "retry_in", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("worker: accept on %s: %w", l.Config.Address, err)
		}
		delay = 0
		s.rec.Opened()
		cn := &conn{srv: s, id: s.nextID.Add(1), client: c, lcfg: lcfg, start: time.Now()}
		s.track(cn)
		go cn.serve()
	}
}

// isTemporary reports accept errors worth retrying: out of fds or memory,
// or a connection aborted before it was accepted.
func isTemporary(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EINTR)
}

// track registers c: Active counts it and Drain waits for it until
// untrack.
func (s *Server) track(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = struct{}{}
	s.wg.Add(1)
}

// untrack is the end of track; once per tracked connection.
func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}
