package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// end is the kind of a result: how a phase, or the whole connection,
// ended.
type end uint8

const (
	// endNext: the phase succeeded; the connection goes on to the next.
	endNext end = iota
	// endRejected: closed before it was proxied, for result.reason
	// (counted in sniproxy_connections_rejected_total).
	endRejected
	// endClosed: closed by a drain or a move before it was proxied
	// (while it was sniffing, reading a PROXY header or dialling).
	endClosed
	// endBackendError: the backend failed while the sniffed bytes were
	// replayed to it.
	endBackendError
	// endCopying: the pair runs; its end ends the connection.
	endCopying

	// The ends of a pair (copyResult).

	endOK       // both directions ended cleanly
	endIdle     // the idle timeout
	endReset    // a peer reset or left without reading everything
	endError    // any other error
	endDeadline // closed at a drain deadline
	endMoved    // detached and moved to another process
)

// endNames are the access log's "result" values of every end but
// endRejected, whose value is its reason.
var endNames = [...]string{
	endNext:         "",
	endRejected:     "",
	endClosed:       "closed",
	endBackendError: "backend_error",
	endCopying:      "",
	endOK:           "ok",
	endIdle:         "idle",
	endReset:        "reset",
	endError:        "error",
	endDeadline:     "deadline",
	endMoved:        "moved",
}

// result is what a phase of the serve path returns: the zero value (go on
// to the next phase), or how the connection ended, which the one cleanup
// (path.end, or the pair's end, conn.Done) logs as the access log's
// "result" and "err" and counts.
type result struct {
	end    end
	reason stats.Reason // why, for endRejected
	err    error        // logged as "err"
	// counts are the bytes moved each way (the pair's, which include the
	// replayed ones): logged as "bytes_in" and "bytes_out". Zero for a
	// connection that ended before its pair started.
	counts proxy.Result
}

// rejected returns the result of a connection closed for reason.
func rejected(reason stats.Reason, err error) result {
	return result{end: endRejected, reason: reason, err: err}
}

// String returns the access log's "result" value.
func (r result) String() string {
	if r.end == endRejected {
		return r.reason.String()
	}
	return endNames[r.end]
}

// level is the access log level of r: a warning for what an operator may
// have to fix, debug for a connection that moved (its line comes from the
// worker that serves it last).
func (r result) level() slog.Level {
	switch {
	case r.end == endError, r.end == endBackendError, r.end == endRejected && r.reason == stats.DialError:
		return slog.LevelWarn
	case r.end == endMoved:
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// copyResult maps how a pair ended to its result.
func copyResult(err error) result {
	switch {
	case errors.Is(err, proxy.ErrDetached):
		return result{end: endMoved}
	case errors.Is(err, errDeadline):
		return result{end: endDeadline, err: err}
	case errors.Is(err, proxy.ErrIdle):
		return result{end: endIdle, err: err}
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ENOTCONN):
		// A peer that closes without reading everything, or resets: an
		// ordinary end for a proxy, not an operator's problem.
		return result{end: endReset, err: err}
	case err != nil:
		return result{end: endError, err: err}
	}
	return result{end: endOK}
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

// path is one accepted connection on its way through the phases: what
// each phase hands on to the next, and what the cleanup (end) gives back.
// It lives on serve's goroutine only.
type path struct {
	c *conn
	// permit: admit took a permit; whoever ends the connection returns it.
	permit bool
	// sniffing: admit took one of the server's sniff slots; route (or end)
	// gives it back.
	sniffing bool
	// counted: the connection is in the protocol counter.
	counted bool
	buf     *sniff.Buffer // the sniffed bytes, until replayed
	// replayed counts the sniffed bytes the replay phase sent the
	// backend: the pair counts on from there.
	replayed int64
	dec      route.Decision
	// unknown is set by sniff when the bytes are no known protocol and a
	// default backend takes them.
	unknown error
	// proxyHeader is the PROXY protocol version to send the backend ("",
	// "v1", "v2"): the route's, else backend.proxy_protocol.
	proxyHeader string
	// local is the address the client connected to: the socket's, or the
	// one a trusted PROXY header named (see setAddrs); for the PROXY
	// header sent to the backend.
	local netip.AddrPort
}

// serve runs the phases admit → sniff → route → dial → replay → copy in
// turn until one ends the connection, then ends it (path.end). The copy
// phase hands both sockets to a pair and returns, so that this goroutine
// (whose stack grew while sniffing and dialling) does not stay parked for
// the life of an idle connection; the pair's end (conn.Done) ends the
// connection then.
func (c *conn) serve() {
	p := &path{c: c}
	peer := c.peer // set by the event loop from accept, for one it hands on
	if !peer.IsValid() {
		// A client gone since, reset, has no address any more.
		peer = addrPortOf(c.client.RemoteAddr())
	}
	p.setAddrs(peer, addrPortOf(c.client.LocalAddr()))
	p.end(p.run())
}

// run runs the phases and returns the result of the last one run.
func (p *path) run() result {
	if r := p.admit(); r.end != endNext {
		return r
	}
	if r := p.sniff(); r.end != endNext {
		return r
	}
	if r := p.route(); r.end != endNext {
		return r
	}
	if r := p.dial(); r.end != endNext {
		return r
	}
	if r := p.replay(); r.end != endNext {
		return r
	}
	return p.copy()
}

// end is the serve path's one cleanup. Unless the pair runs (it ends the
// connection itself), it closes the sockets, gives back the sniff slot
// and buffer, counts the connection and writes its access-log line
// (conn.finish), returning the permit.
func (p *path) end(r result) {
	if r.end == endCopying {
		return
	}
	p.c.close()
	p.finish(r)
}

// finish is end once the sockets are closed (the event loop closes its
// own): the sniff slot and buffer given back, the connection counted
// under a protocol if it was not yet, then conn.finish.
func (p *path) finish(r result) {
	c := p.c
	p.endSniff()
	p.releaseBuffer()
	if !p.counted {
		c.srv.rec.Protocol(stats.ProtoUnknown)
	}
	c.finish(r, p.permit && !c.stolen.Load())
}

// admit takes a client permit and rate token of the per-client limits
// (admitPerIP; on a listener that expects a PROXY header, the sniff phase
// does, once the header names the client), a permit of the global limit
// and a slot of the sniff limit (see sniffLimitFor).
func (p *path) admit() result {
	s := p.c.srv
	if !p.c.lcfg.AcceptProxyProtocol {
		// One the event loop hands on may be admitted already.
		if !p.c.perIPKey.IsValid() {
			if r := p.admitPerIP(); r.end != endNext {
				return r
			}
		}
	} else if !p.c.lcfg.Trusts(p.c.peer.Addr()) {
		// Before any permit: a source that may not send a PROXY header
		// takes none, and is told apart from a full house.
		return rejected(stats.ProxyHeader, fmt.Errorf("worker: %v is not in trusted_proxies: closed before reading a PROXY header", p.c.peer.Addr()))
	}
	if s.limiter != nil {
		// At the limit, a connection that has sent no complete hello
		// for a while, past this worker's sniff share, gives its permit
		// to this one (stealSniffers).
		if !s.limiter.Acquire() && s.stealSniffers(1, false) == 0 {
			return rejected(stats.Limit, errors.New("worker: max_connections reached"))
		}
		p.permit = true
	}
	// Accepted connections already have TCP keepalive (Go's default for a
	// listener, 15s); backends get it from the dialer.
	//
	// Over the sniff share, slow ones make room; young ones are a burst
	// of clients that all send their hellos at once, not refused (the
	// permits bound them, and they leave the phase in milliseconds).
	s.addSniffer(p.c)
	p.sniffing = true
	return result{}
}

// endSniff gives back the sniff slot admit took, once.
func (p *path) endSniff() {
	if p.sniffing {
		p.sniffing = false
		p.c.srv.removeSniffer(p.c)
	}
}

// releaseBuffer returns the sniffed bytes' buffer, once.
func (p *path) releaseBuffer() {
	if p.buf != nil {
		p.buf.Release()
		p.buf = nil
	}
}

// sniff reads the PROXY header a listener expects (readProxy: from a
// trusted source, within its own shorter timeout), then the first bytes
// for the protocol and name, all within timeouts.client_hello of the
// accept. It counts the connection under the protocol it found.
func (p *path) sniff() result {
	var start []byte
	if p.c.lcfg.AcceptProxyProtocol {
		var r result
		if start, r = p.readProxy(); r.end != endNext {
			return r
		}
		if r = p.admitPerIP(); r.end != endNext {
			return r
		}
	}
	return p.sniffFrom(start)
}

// sniffFrom reads the client's first bytes, start being those read
// already, until the sniffer decides.
func (p *path) sniffFrom(start []byte) result {
	c, s := p.c, p.c.srv
	deadline := c.start.Add(s.cfg.Timeouts.ClientHello)
	res, buf, err := sniff.Read(c.client, start, deadline, c.srv.sniffBudget)
	p.buf = buf
	c.o.res = res
	p.countProtocol()
	return p.sniffResult(err)
}

// sniffResult is the sniff phase's result for the sniffer's err (nil, or
// why no name was found).
func (p *path) sniffResult(err error) result {
	c := p.c
	buf := p.buf
	if err != nil && c.stolen.Load() {
		return rejected(stats.SniffTimeout, fmt.Errorf("worker: evicted after %v with no complete hello, its permit needed by another connection: %w",
			time.Since(c.start).Round(time.Millisecond), err))
	}
	if err != nil && c.wasClosed() {
		return closedSniffing(err)
	}
	if err != nil && !errors.Is(err, sniff.ErrNoName) {
		if errors.Is(err, sniff.ErrTimeout) {
			return rejected(stats.SniffTimeout, err)
		}
		err = fmt.Errorf("%w (first bytes %s)", err, sniff.HexPrefix(buf.Bytes(), 32))
		if errors.Is(err, sniff.ErrNotProtocol) && p.defaultBackend() != "" {
			// No known protocol: the default backend gets the bytes as
			// they came (the sslh case, SSH on :443).
			p.unknown = err
			return result{}
		}
		return rejected(stats.SniffError, err)
	}
	return result{}
}

// fromPerIP runs the phases from the client's admission under its limits
// on, start being the client's bytes read after the PROXY header (a
// connection the event loop hands on for a client permit the master must
// grant).
func (p *path) fromPerIP(start []byte) result {
	if r := p.admitPerIP(); r.end != endNext {
		return r
	}
	if r := p.sniffFrom(start); r.end != endNext {
		return r
	}
	if r := p.route(); r.end != endNext {
		return r
	}
	return p.fromDial()
}

// fromDial runs the phases from dial on (a connection the event loop
// routed and hands on).
func (p *path) fromDial() result {
	if r := p.dial(); r.end != endNext {
		return r
	}
	return p.fromReplay()
}

// closedSniffing is the result of a read of the client that failed with
// err because a drain or a move closed the connection before its first
// bytes were read (conn.wasClosed).
func closedSniffing(err error) result {
	return result{end: endClosed, err: fmt.Errorf("%w: %w", errClosedSniffing, err)}
}

// fromReplay runs the phases from replay on.
func (p *path) fromReplay() result {
	if r := p.replay(); r.end != endNext {
		return r
	}
	return p.copy()
}

// defaultBackend returns the default backend of the connection's
// listener, "" for none.
func (p *path) defaultBackend() string {
	return p.c.srv.cfg.DefaultBackendFor(*p.c.lcfg)
}

// toDefault sends the connection to the default backend instead of
// refusing it for why; it returns false when there is none.
func (p *path) toDefault(why error) bool {
	def := p.defaultBackend()
	if def == "" {
		return false
	}
	host, port, err := splitHostPort(def)
	if err != nil {
		return false
	}
	c := p.c
	p.dec = route.Decision{Rule: route.RuleDefault, Host: host, Port: port, Name: p.dec.Name}
	c.o.rule = "default_backend"
	if log := c.srv.log; log.Enabled(context.Background(), slog.LevelDebug) {
		log.Debug("to the default backend", "conn", c.id, "backend", def, "why", why)
	}
	return true
}

// countProtocol counts the connection under the protocol sniffed so far
// (unknown if none).
func (p *path) countProtocol() {
	p.c.srv.rec.Protocol(statsProtocol(p.c.o.res.Protocol))
	p.counted = true
}

// route ends the sniff phase and decides where the name goes.
func (p *path) route() result {
	c, s := p.c, p.c.srv
	p.endSniff()
	if p.unknown != nil && p.toDefault(p.unknown) {
		return result{}
	}
	res := c.o.res
	dec, err := s.table.DecideALPN(res.Name, res.ALPN, c.lcfg.BackendPort)
	if dec.Rule >= 0 {
		c.o.rule = s.cfg.Routes[dec.Rule].Match
	}
	p.dec = dec
	if err != nil {
		if route.FallbackOK(dec, err) && p.toDefault(err) {
			return result{}
		}
		return rejected(routeReason(err), err)
	}
	return result{}
}

// dial connects to the backend within the route's connect timeout
// (timeouts.connect unless the route has its own): a pool's backends in
// the balancer's order with failover, a DNS-routed name without an answer
// to the default backend if there is one.
func (p *path) dial() result {
	c, s := p.c, p.c.srv
	connect := p.dialSettings()
	ctx, cancel := context.WithTimeout(context.Background(), connect)
	t0 := time.Now()
	var (
		backend *net.TCPConn
		addr    netip.AddrPort
		err     error
	)
	if pool := p.dec.Pool; pool != nil {
		var i int
		backend, i, addr, err = s.Dialer.DialPool(ctx, p.dec, p.clientAddr(), s.reportDial(pool))
		if err == nil {
			c.pool, c.poolBackend = pool, int32(i)
		}
	} else {
		backend, addr, err = s.Dialer.Dial(ctx, p.dec)
	}
	cancel()
	c.o.backend = addr
	if err != nil {
		if p.dec.Rule == route.RuleDNS && route.FallbackOK(p.dec, err) && p.toDefault(err) {
			return p.dial()
		}
		return rejected(routeReason(err), err)
	}
	s.rec.BackendConnect(time.Since(t0))
	if !c.setBackend(backend) {
		return result{end: endClosed, err: errors.New("worker: closed while dialling")}
	}
	return result{}
}

// dialSettings sets what the route decides besides the backend (the
// PROXY header to send, the idle timeout) and returns its connect
// timeout: the route's own, else timeouts.connect.
func (p *path) dialSettings() time.Duration {
	c, s := p.c, p.c.srv
	connect := s.cfg.Timeouts.Connect
	p.proxyHeader = s.cfg.Backend.ProxyProtocol
	if p.dec.Rule >= 0 {
		r := s.cfg.Routes[p.dec.Rule]
		connect, c.idle = r.EffectiveTimeouts(s.cfg.Timeouts)
		p.proxyHeader = r.ProxyHeader(s.cfg.Backend.ProxyProtocol)
	}
	return connect
}

// replay sends the backend a PROXY header if configured, then every
// sniffed byte, unchanged.
//
// The writes are bounded by the idle timeout: the pair's idle timer does not
// exist yet, and a backend that never reads would otherwise hold the
// connection (and its permit) for ever once the socket buffers are full.
func (p *path) replay() result {
	c, s := p.c, p.c.srv
	backend := c.backend // set by dial; only serve's goroutine writes it
	backend.SetWriteDeadline(time.Now().Add(c.idleTimeout()))
	if v := p.proxyHeader; v != "" {
		if err := p.writeProxyHeader(backend, v); err != nil {
			return replayFailed(err)
		}
	}
	b := p.buf.Bytes()
	if n, err := backend.Write(b); err != nil {
		s.rec.Bytes(int64(n), 0)
		r := replayFailed(fmt.Errorf("worker: replay to backend: %w", err))
		r.counts.In = int64(n) // the log says what the counters counted
		return r
	}
	backend.SetWriteDeadline(time.Time{})
	p.replayed = int64(len(b))
	s.rec.Bytes(p.replayed, 0)
	p.releaseBuffer()
	return result{}
}

// replayFailed is the result of a replay that failed with err: idle when
// the backend read nothing for the idle timeout, else backend_error.
func replayFailed(err error) result {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return result{end: endIdle, err: err}
	}
	return result{end: endBackendError, err: err}
}

// copy hands both sockets to a pair that copies both ways (package proxy)
// and ends the connection when it ends.
func (p *path) copy() result {
	p.c.startPair(p.permit, p.replayed)
	return result{end: endCopying}
}
