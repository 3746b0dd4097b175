package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// conn is one client connection being served: accepted here and sent
// through the phases (serve), or moved here from another process and
// resumed (Server.Resume). Its sockets are closed in one place, close,
// until its pair runs; then the pair closes them.
//
// An idle connection is this one allocation (its pair is embedded) plus
// its sockets: what is needed only before the copy phase lives in path,
// on serve's goroutine, and is gone with it.
type conn struct {
	srv    *Server
	client *net.TCPConn
	// lcfg is the listener's config (one of srv.cfg.Listeners, or made by
	// Resume for a listener this config lacks).
	lcfg  *config.Listener
	id    uint64
	start time.Time
	// peer is the client's address: the socket's, or the one a trusted
	// PROXY header named (IPv4-mapped addresses as IPv4). Set only by
	// path.setAddrs, before the route phase (or by Resume, from the moved
	// state); whatever says who the client is (the access log's
	// "client", per-IP limits, the PROXY header sent to the backend)
	// reads it.
	peer netip.AddrPort
	// perIPKey is the client key whose client permit the connection
	// holds (admitPerIP, or adopted by Resume), until finish gives it
	// back; invalid if none. Once perIPMoved is set, sendMoved sends the
	// connection with it and only then gives the client permit back.
	perIPKey netip.Addr

	// o is what the access log will say besides the result; written by
	// the phases before the pair starts, read when the connection ends
	// and when it moves.
	o outcome
	// deadline, if not zero, is when an earlier generation's drain ends
	// for this connection (it was moved here), in UnixNano: it is closed
	// then.
	deadline int64

	// pool and poolBackend are the pool backend the connection reached,
	// once dialled (pool nil otherwise): finish releases it. idle is the
	// route's idle timeout (0: the global one).
	pool *route.Pool
	idle time.Duration

	// timer closes the connection at deadline (not under mu: a pair may
	// finish within Start, while serve holds mu).
	timer atomic.Pointer[time.Timer]

	mu      sync.Mutex
	backend *net.TCPConn
	// lc (under mu) is set while the event loop serves the connection
	// on raw descriptors (client and backend are nil then); the loop
	// clears it when it hands the connection to a goroutine or a pair.
	lc *lconn

	poolBackend int32
	// moves counts the reloads this connection moved in.
	moves int32
	// permit is the state of a permit taken after the pair started (a
	// resumed connection): permitNone, permitHeld, or permitDone once the
	// connection finished.
	permit atomic.Int32
	// stolen is set when the connection, slow to send its hello, was
	// evicted for another one under pressure and its permit went with
	// the eviction (see Server.stealSniffers): it must not give it back.
	stolen atomic.Bool
	// movedPermit is set when the pair was detached to be moved while
	// holding a permit: sendMoved releases it after the send.
	movedPermit atomic.Bool
	// closed (under mu): close ran before the pair started; the sockets
	// are closed.
	closed bool
	// paired (under mu): pair runs; it owns the sockets.
	paired bool
	// handing (under mu): the event loop handed the connection on with
	// bytes its peer had not taken yet; a goroutine writes them, then
	// starts the pair (loop.toPair). Move waits for it (waitHanding).
	handing bool
	// pairPermit: the pair started holding the connection's permit (set
	// before it starts).
	pairPermit bool
	// perIPMoved is set by Done when the pair was detached to be moved
	// (before the pair reports it stopped; read after): perIPKey is then
	// given back by sendMoved, not by finish.
	perIPMoved bool

	// pair copies both ways once the connection is proxied (paired).
	pair proxy.Pair
}

// errDeadline closes a connection at a drain deadline.
var errDeadline = errors.New("worker: closed at the drain deadline")

// close closes the connection: through its pair once it runs (which wakes
// a direction parked in the poller, and ends the pair with errDeadline),
// else both sockets, only the first time. Drain calls it at its deadline,
// Move for a connection not proxied yet, the serve path at its end.
func (c *conn) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeLocked()
}

// closeLocked is close with c.mu held.
func (c *conn) closeLocked() {
	if c.paired {
		c.pair.CloseWith(errDeadline)
		return
	}
	if c.closed {
		return
	}
	c.closed = true
	if c.lc != nil {
		// The event loop has the sockets: it closes them and ends the
		// connection.
		c.srv.loop.requestClose(c.lc)
		return
	}
	c.client.Close()
	if c.backend != nil {
		c.backend.Close()
	}
}

// wasClosed reports whether close ran before the pair started: a read
// of the client that fails then failed because Drain or Move closed the
// socket, not because of the client.
func (c *conn) wasClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// errClosedSniffing ends a connection that a drain deadline or a move
// closed before its first bytes were read: result "closed" (as the
// event loop logs it), not a rejection the client caused.
var errClosedSniffing = errors.New("worker: closed by a drain or a move before its first bytes were read")

// setBackend hands the backend socket to c, which closes it with the
// client's; false if c was closed meanwhile (b is closed then too).
func (c *conn) setBackend(b *net.TCPConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		b.Close()
		return false
	}
	c.backend = b
	return true
}

// startPair starts copying between the client and the backend set by
// setBackend, handing both sockets to the pair; from then on the pair's
// end (Done) ends the connection; permit says whether c holds a permit,
// replayed how many bytes the replay phase sent the backend.
// c.mu is held until the pair is recorded, so close (Drain, Move) sees
// it.
func (c *conn) startPair(permit bool, replayed int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// The pair counts from the bytes replayed: its counts are the
	// connection's (the access log's, and what a move carries on).
	c.startPairLocked(permit, proxy.State{In: replayed})
}

// startPairLocked is startPair, with c.mu held, for a pair that goes on
// from st (the event loop's hand-off).
func (c *conn) startPairLocked(permit bool, st proxy.State) {
	c.pairPermit = permit
	c.paired = true
	c.pair.Resume(c.client, c.backend, st, c.idleTimeout(), c.srv.poller, c)
}

// idleTimeout returns the connection's idle timeout: its route's, else
// the global one.
func (c *conn) idleTimeout() time.Duration {
	if c.idle > 0 {
		return c.idle
	}
	return c.srv.cfg.Timeouts.Idle
}

// outcome is what the access log says of a connection besides its result.
type outcome struct {
	res     sniff.Result
	rule    string // the matching route's pattern, if one matched
	backend netip.AddrPort
}

// States of conn.permit.
const (
	permitNone int32 = iota
	permitHeld
	permitDone
)

// Done ends the connection when its pair has ended (proxy.Owner).
func (c *conn) Done(counts proxy.Result, err error) {
	if t := c.timer.Load(); t != nil {
		t.Stop()
	}
	permit := c.pairPermit
	if c.permit.Swap(permitDone) == permitHeld {
		permit = true
	}
	if errors.Is(err, proxy.ErrDetached) {
		// Moved: the permit and the client permit are given back
		// only once the connection has been sent on
		// (Server.sendMoved), so that the master hears of the move
		// before it sees them come back and no moment passes in
		// which the connection counts nowhere.
		if permit {
			c.movedPermit.Store(true)
			permit = false
		}
		c.perIPMoved = true
	}
	r := copyResult(err)
	r.counts = counts
	c.finish(r, permit)
}

// finish ends the connection once, whatever phase it ended in: it writes
// the access log and gives back what the connection held.
func (c *conn) finish(r result, permit bool) {
	// The line first: whoever sees the count sees the line written.
	c.logDone(r)
	if r.end == endRejected {
		c.srv.rec.Rejected(r.reason)
	}
	if c.pool != nil {
		c.pool.Release(int(c.poolBackend))
	}
	if permit {
		c.srv.limiter.Release()
	}
	c.releasePerIP()
	c.srv.rec.Closed()
	c.srv.untrack(c)
}

// setAddrs makes peer the connection's client and local the address it
// connected to (see conn.peer and path.local).
func (p *path) setAddrs(peer, local netip.AddrPort) {
	p.c.peer, p.local = unmapAddrPort(peer), unmapAddrPort(local)
}

// writeProxyHeader sends the backend a PROXY header (version "v1" or
// "v2") naming the client (or, behind a PROXY-speaking balancer, the
// client it named) and, in v2, the name the client asked for as the
// authority TLV (see formatProxyHeader).
func (p *path) writeProxyHeader(backend *net.TCPConn, version string) error {
	c := p.c
	b, err := formatProxyHeader(version, c.peer, p.local, c.o.res.Name)
	if err != nil {
		return err
	}
	if _, err := backend.Write(b); err != nil {
		return fmt.Errorf("worker: send PROXY header: %w", err)
	}
	return nil
}

// Count counts the pair's progress (proxy.Owner).
func (c *conn) Count(in, out int64) {
	c.srv.rec.Bytes(in, out)
}

// logDone writes the access-log line. A connection moved to the next
// generation gets its line there, when it ends; here only a debug line.
func (c *conn) logDone(r result) {
	log := c.srv.AccessLog
	level := r.level()
	if log == nil || !log.Enabled(context.Background(), level) {
		return
	}
	o := &c.o
	attrs := []slog.Attr{
		slog.Uint64("conn", c.id),
		slog.String("client", c.peer.String()),
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
		slog.Int64("bytes_in", r.counts.In),
		slog.Int64("bytes_out", r.counts.Out),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("result", r.String()),
	)
	if c.moves > 0 {
		attrs = append(attrs, slog.Int("moves", int(c.moves)))
	}
	if r.err != nil {
		attrs = append(attrs, slog.String("err", r.err.Error()))
	}
	log.LogAttrs(context.Background(), level, "connection", attrs...)
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
