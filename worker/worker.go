// Package worker serves client connections on listeners it is handed:
// it sniffs each connection's first bytes for a name (package sniff),
// decides where the name goes and dials it (package route), replays the
// sniffed bytes and copies both ways (package proxy).
//
// A Server knows nothing of processes: it serves *net.TCPListener values
// however they were made (bound here, inherited from a parent, received
// over a Unix socket), takes its global connection permits from a Limiter
// and reports its counts to a Recorder, so the same code runs in-process or
// inside a worker process of a master.
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

	"github.com/pires/go-proxyproto"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/hostname"
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

// keepAlive is the TCP keepalive idle time of backend connections (client
// connections get the listener default, 15s).
const keepAlive = 60 * time.Second

// Server serves connections. Create it with New.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	rec     Recorder
	limiter Limiter
	table   *route.Table
	// Dialer dials backends; a seam for tests (its Resolver).
	Dialer *route.Dialer
	// LingerOnStop, for the reload test's negative control only, keeps
	// the listeners open (not accepting) this long after StopAccepting, so
	// that connections queue on sockets about to be closed.
	LingerOnStop time.Duration

	// sniffLimit bounds the connections of this server still in the sniff
	// phase, so slow or silent clients cannot hold the whole connection
	// budget: see SniffLimit.
	sniffLimit int64
	sniffing   atomic.Int64

	// poller parks idle pairs without goroutines; nil if it could not be
	// made (pairs then park on goroutines).
	poller *proxy.Poller
	// migrating is set by the first Migrate.
	migrating atomic.Bool

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
	t, err := NewTable(cfg)
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
	return &Server{
		poller:  poller,
		cfg:     cfg,
		log:     log,
		rec:     rec,
		limiter: limiter,
		table:   t,
		Dialer: &route.Dialer{
			Timeout:      cfg.Timeouts.Connect,
			AllowPrivate: cfg.Backend.AllowPrivate,
			Forbidden:    forbidden,
			KeepAlive:    keepAlive,
		},
		conns:      map[*conn]struct{}{},
		sniffLimit: int64(SniffLimit(cfg)),
	}, nil
}

// SniffLimit returns how many connections one worker lets sit in the sniff
// phase at once: three quarters of its share of max_connections (at least
// 16), so clients that never finish a hello can take at most that much of
// the budget and the rest stays for clients that do. Connections over it
// are closed at once and counted with reason "limit".
func SniffLimit(cfg *config.Config) int {
	workers := cfg.Workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	return max(16, cfg.MaxConnections*3/4/workers)
}

// NewTable builds the routing table of cfg.
func NewTable(cfg *config.Config) (*route.Table, error) {
	var deny, allow []hostname.Pattern
	var routes []route.Rule
	for i, s := range cfg.Denylist {
		p, err := hostname.ParsePattern(s)
		if err != nil {
			return nil, fmt.Errorf("worker: denylist[%d]: %w", i, err)
		}
		deny = append(deny, p)
	}
	for i, s := range cfg.Allowlist {
		p, err := hostname.ParsePattern(s)
		if err != nil {
			return nil, fmt.Errorf("worker: allowlist[%d]: %w", i, err)
		}
		allow = append(allow, p)
	}
	for i, r := range cfg.Routes {
		p, err := hostname.ParsePattern(r.Match)
		if err != nil {
			return nil, fmt.Errorf("worker: routes[%d].match: %w", i, err)
		}
		host, port, err := hostname.ParseBackend(r.Backend)
		if err != nil {
			return nil, fmt.Errorf("worker: routes[%d].backend: %w", i, err)
		}
		routes = append(routes, route.Rule{Match: p, Host: host, Port: port})
	}
	return route.NewTable(deny, routes, allow), nil
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
		s.StopAccepting()
		loops.Wait()
		return err
	}
	s.StopAccepting()
	loops.Wait()
	return nil
}

// StopAccepting closes the listeners; accept loops end. It is idempotent.
func (s *Server) StopAccepting() {
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

// stopped reports whether StopAccepting was called.
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
		cn := &conn{srv: s, id: s.nextID.Add(1), client: c, lcfg: l.Config, start: time.Now()}
		if !s.track(cn) {
			s.rec.Closed()
			c.Close()
			continue
		}
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

// track registers c; false if the server is fully closed.
func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// conn is one client connection being served.
type conn struct {
	srv    *Server
	id     uint64
	client *net.TCPConn
	lcfg   config.Listener
	start  time.Time

	// o is what the access log will say; written by serve before the
	// pair starts, then by the pair's done callback.
	o *outcome
	// moves counts the reloads this connection was handed over in.
	moves int
	// deadline, if set, is when an earlier generation's drain ends for
	// this connection (it came in a handover): it is closed then.
	deadline time.Time

	mu      sync.Mutex
	backend *net.TCPConn
	pipe    *proxy.Pair
	closed  bool
	// timer closes the connection at deadline (not under mu: a pair may
	// finish within Start, while serve holds mu).
	timer atomic.Pointer[time.Timer]
	// permit is the state of a permit taken after the pair started (an
	// adopted connection): permitNone, permitHeld, or permitDone once the
	// connection finished.
	permit atomic.Int32

	in, out atomic.Int64
}

// errDeadline closes a connection at a drain deadline.
var errDeadline = errors.New("worker: closed at the drain deadline")

// close closes both sockets; used by Drain at its deadline.
func (c *conn) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeLocked()
}

// closeLocked is close with c.mu held.
func (c *conn) closeLocked() {
	c.closed = true
	if c.pipe != nil {
		// Through the pair, which wakes a direction parked in the poller.
		c.pipe.CloseWith(errDeadline)
		return
	}
	c.client.Close()
	if c.backend != nil {
		c.backend.Close()
	}
}

// setBackend records the backend socket so close can reach it; false if
// the connection was closed meanwhile.
func (c *conn) setBackend(b *net.TCPConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.backend = b
	return true
}

// outcome is what the access log says of a connection.
type outcome struct {
	res     sniff.Result
	source  string // the client, or the one a PROXY header named
	rule    string // the matching route's pattern, if one matched
	backend netip.AddrPort
	reason  string
	err     error
}

// serve sniffs, routes and dials; then it hands the pair to proxy.Start
// and returns, so that its goroutine (whose stack grew while sniffing and
// dialling) does not stay parked for the life of an idle connection. Who
// finishes the connection (access log, permit, counters) is whoever ends
// last: serve itself on every early exit, else the pipe.
func (c *conn) serve() {
	s := c.srv
	o := &outcome{source: addrString(c.client.RemoteAddr())}
	c.o = o
	permit, handedOff := false, false
	defer func() {
		if !handedOff {
			c.finish(o, permit)
		}
	}()

	if s.limiter != nil {
		if !s.limiter.Acquire() {
			c.client.Close()
			s.rec.Protocol(stats.ProtoUnknown)
			c.reject(o, stats.Limit, errors.New("worker: max_connections reached"))
			return
		}
		permit = true
	}
	// Accepted connections already have TCP keepalive (Go's default for a
	// listener, 15s); backends get it from the dialer.

	if s.sniffing.Add(1) > s.sniffLimit {
		s.sniffing.Add(-1)
		c.client.Close()
		s.rec.Protocol(stats.ProtoUnknown)
		c.reject(o, stats.Limit, errors.New("worker: too many connections in the sniff phase"))
		return
	}
	sniffDone := false
	endSniff := func() {
		if !sniffDone {
			sniffDone = true
			s.sniffing.Add(-1)
		}
	}
	defer endSniff()

	deadline := c.start.Add(s.cfg.Timeouts.ClientHello)
	var start []byte
	var hdr *proxyproto.Header
	if c.lcfg.AcceptProxyProtocol {
		h, rest, err := readProxyHeader(c.client, deadline)
		if err != nil {
			c.client.Close()
			s.rec.Protocol(stats.ProtoUnknown)
			reason := stats.SniffError
			if errors.Is(err, os.ErrDeadlineExceeded) {
				reason = stats.SniffTimeout
			}
			c.reject(o, reason, err)
			return
		}
		hdr, start = h, rest
		if h.SourceAddr != nil {
			o.source = h.SourceAddr.String()
		}
	}

	res, buf, err := sniff.Read(c.client, start, deadline)
	defer buf.Release()
	o.res = res
	s.rec.Protocol(statsProtocol(res.Protocol))
	if err != nil && !errors.Is(err, sniff.ErrNoName) {
		c.client.Close()
		reason := stats.SniffError
		if errors.Is(err, sniff.ErrTimeout) {
			reason = stats.SniffTimeout
		}
		if reason == stats.SniffError {
			err = fmt.Errorf("%w (first bytes %s)", err, sniff.HexPrefix(buf.Bytes(), 32))
		}
		c.reject(o, reason, err)
		return
	}

	endSniff()
	dec, err := s.table.Decide(res.Name, c.lcfg.BackendPort)
	if dec.Rule >= 0 {
		o.rule = s.cfg.Routes[dec.Rule].Match
	}
	if err != nil {
		c.client.Close()
		c.reject(o, routeReason(err), err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeouts.Connect)
	t0 := time.Now()
	backend, addr, err := s.Dialer.Dial(ctx, dec)
	cancel()
	o.backend = addr
	if err != nil {
		c.client.Close()
		c.reject(o, routeReason(err), err)
		return
	}
	s.rec.BackendConnect(time.Since(t0))
	if !c.setBackend(backend) {
		backend.Close()
		c.client.Close()
		o.reason, o.err = "closed", errors.New("worker: closed while dialling")
		return
	}

	if v := s.cfg.Backend.ProxyProtocol; v != "" {
		if err := c.writeProxyHeader(backend, v, hdr); err != nil {
			c.client.Close()
			backend.Close()
			o.reason, o.err = "backend_error", err
			return
		}
	}
	// Replay every sniffed byte first, unchanged.
	if n, err := backend.Write(buf.Bytes()); err != nil {
		c.client.Close()
		backend.Close()
		s.rec.Bytes(int64(n), 0)
		o.reason, o.err = "backend_error", fmt.Errorf("worker: replay to backend: %w", err)
		return
	}
	c.in.Add(int64(len(buf.Bytes())))
	s.rec.Bytes(int64(len(buf.Bytes())), 0)
	buf.Release()

	endSniff()
	handedOff = true
	c.mu.Lock()
	defer c.mu.Unlock() // held until the Pair is recorded: close must see it
	c.pipe = proxy.Start(c.client, backend, s.cfg.Timeouts.Idle, s.poller, c.count, c.pipeDone(permit))
}

// States of conn.permit.
const (
	permitNone int32 = iota
	permitHeld
	permitDone
)

// pipeDone returns the done callback of c's pair; permit says whether c
// holds a permit already.
func (c *conn) pipeDone(permit bool) func(proxy.Result, error) {
	return func(_ proxy.Result, err error) {
		o := c.o
		o.err = err
		switch {
		case errors.Is(err, proxy.ErrDetached):
			o.reason, o.err = "moved", nil
		case errors.Is(err, errDeadline):
			o.reason = "deadline"
		case errors.Is(err, proxy.ErrIdle):
			o.reason = "idle"
		case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ENOTCONN):
			// A peer that closes without reading everything, or resets:
			// an ordinary end for a proxy, not an operator's problem.
			o.reason = "reset"
		case err != nil:
			o.reason = "error"
		default:
			o.reason = "ok"
		}
		if t := c.timer.Load(); t != nil {
			t.Stop()
		}
		if c.permit.Swap(permitDone) == permitHeld {
			permit = true
		}
		c.finish(o, permit)
	}
}

// finish writes the access log and gives back what the connection held.
func (c *conn) finish(o *outcome, permit bool) {
	c.logDone(o)
	if permit {
		c.srv.limiter.Release()
	}
	c.srv.rec.Closed()
	c.srv.untrack(c)
}

// writeProxyHeader sends a PROXY header naming the client (or, behind a
// PROXY-speaking balancer, the client it named) to the backend.
func (c *conn) writeProxyHeader(backend *net.TCPConn, version string, in *proxyproto.Header) error {
	v := byte(1)
	if version == "v2" {
		v = 2
	}
	src, dst := c.client.RemoteAddr(), c.client.LocalAddr()
	if in != nil && in.SourceAddr != nil && in.DestinationAddr != nil {
		src, dst = in.SourceAddr, in.DestinationAddr
	}
	h := proxyproto.HeaderProxyFromAddrs(v, src, dst)
	if _, err := h.WriteTo(backend); err != nil {
		return fmt.Errorf("worker: send PROXY header: %w", err)
	}
	return nil
}

// count is proxy.Pipe's progress callback.
func (c *conn) count(in, out int64) {
	c.in.Add(in)
	c.out.Add(out)
	c.srv.rec.Bytes(in, out)
}

// reject records a connection closed without being proxied.
func (c *conn) reject(o *outcome, r stats.Reason, err error) {
	c.srv.rec.Rejected(r)
	o.reason, o.err = r.String(), err
}

// routeReason maps a routing or dialling error to its metric reason.
func routeReason(err error) stats.Reason {
	switch {
	case errors.Is(err, route.ErrDenied), errors.Is(err, route.ErrPrivate):
		return stats.Denied
	case errors.Is(err, route.ErrNoRoute):
		return stats.NoRoute
	default:
		return stats.DialError
	}
}

// logDone writes the access-log line. A connection handed to the next
// generation gets its line there, when it ends; here only a debug line.
func (c *conn) logDone(o *outcome) {
	log := c.srv.log
	level := slog.LevelInfo
	switch o.reason {
	case "error", "backend_error", stats.DialError.String():
		level = slog.LevelWarn
	case "moved":
		level = slog.LevelDebug
	}
	if !log.Enabled(context.Background(), level) {
		return
	}
	attrs := []slog.Attr{
		slog.Uint64("conn", c.id),
		slog.String("client", o.source),
		slog.String("listener", c.lcfg.Address),
		slog.String("protocol", o.res.Protocol.String()),
	}
	if o.res.Class != "" {
		attrs = append(attrs, slog.String("class", o.res.Class))
	}
	if o.res.Name != "" {
		attrs = append(attrs, slog.String("name", o.res.Name))
	}
	if o.res.ALPN != "" {
		attrs = append(attrs, slog.String("alpn", o.res.ALPN))
	}
	if o.res.ECH {
		attrs = append(attrs, slog.Bool("ech", true))
	}
	if o.rule != "" {
		attrs = append(attrs, slog.String("rule", o.rule))
	}
	if o.backend.IsValid() {
		attrs = append(attrs, slog.String("backend", o.backend.String()))
	}
	attrs = append(attrs,
		slog.Int64("bytes_in", c.in.Load()),
		slog.Int64("bytes_out", c.out.Load()),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("result", o.reason),
	)
	if c.moves > 0 {
		attrs = append(attrs, slog.Int("moves", c.moves))
	}
	if o.err != nil {
		attrs = append(attrs, slog.String("err", o.err.Error()))
	}
	log.LogAttrs(context.Background(), level, "connection", attrs...)
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// statsProtocol maps what package sniff recognised to its counter.
func statsProtocol(p sniff.Protocol) stats.Protocol {
	switch p {
	case sniff.TLS:
		return stats.ProtoTLS
	case sniff.HTTP:
		return stats.ProtoHTTP
	case sniff.H2C:
		return stats.ProtoH2C
	default:
		return stats.ProtoUnknown
	}
}
