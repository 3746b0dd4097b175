package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/worker/proxy"
	"github.com/sniproxy/sniproxy/worker/route"
	"github.com/sniproxy/sniproxy/worker/sniff"
)

// movedState is what a proxied connection carries from one worker process
// to another (ipc.Connection.State): everything its access-log line and its
// pair need to go on. JSON, so that a newer binary reads an older one's.
type movedState struct {
	Listener string       `json:"listener"`
	Client   string       `json:"client"`
	Start    time.Time    `json:"start"`
	Sniff    sniff.Result `json:"sniff"`
	Rule     string       `json:"rule,omitempty"`
	Backend  string       `json:"backend,omitempty"`
	Pair     proxy.State  `json:"pair"`
	// Deadline is when the drain of the generation that first let the
	// connection go ends: moving does not extend it. Zero: no deadline.
	Deadline time.Time `json:"deadline,omitzero"`
	Moves    int       `json:"moves"`
	// Idle is the route's own idle timeout, if it has one: it goes on
	// applying after the move (zero: the global one).
	Idle time.Duration `json:"idle,omitempty"`
}

// SendMoved sends one moved connection on (see Server.Move).
type SendMoved func(key netip.Addr, state []byte, client, backend *os.File) error

// Move sends every proxied connection away with send, for another process
// to resume (see Resume), and closes the connections still being sniffed
// or dialled. It is for a draining server whose generation must exit
// before its connections end (a hurry): it returns once each connection is
// moved or closed, with the counts of each. Only the first call does
// anything.
//
// Every pair is asked to stop at once (proxy.Pair.BeginDetach) and is sent
// as soon as it has stopped, so a pair slow to stop (a direction blocked
// writing to a peer that does not read) delays no other; one still not
// stopped when ctx is done is closed. drainBy is this server's drain
// deadline (zero: none); the connection keeps the earlier of it and the
// one it came with. send gets the connection's client key (ipc.Connection's
// Key: the one its client permit is counted under, else the client's
// address), the state and both sockets; it must not keep the files, which
// are closed after it returns. Once sent, a connection is finished here
// (its permit and client permit returned, Active decremented) with result
// "moved" in a debug log line; the receiving server logs it when it ends.
func (s *Server) Move(ctx context.Context, drainBy time.Time, send SendMoved) (moved, closed int) {
	if !s.moving.CompareAndSwap(false, true) {
		return 0, 0
	}
	s.mu.Lock()
	l := s.loop
	s.mu.Unlock()
	if l != nil {
		// A pair can move; a connection in the loop cannot.
		l.handOffAll()
		s.waitHanding(ctx)
	}
	s.mu.Lock()
	if len(s.conns) == 0 {
		s.mu.Unlock()
		return 0, 0
	}
	// Drain waits for this too: a connection is finished (untracked)
	// before it is sent. The count is above zero here, so Add is safe.
	s.wg.Add(1)
	defer s.wg.Done()
	cs := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()

	stopped := make(chan *conn, len(cs))
	var pending []*conn
	for _, c := range cs {
		c.mu.Lock()
		paired := c.paired
		if !paired {
			// Not proxied yet: nothing another process could go on
			// with. Closed under the same lock, so serve cannot start a
			// pair in between.
			c.closeLocked()
		}
		c.mu.Unlock()
		if !paired {
			closed++
			continue
		}
		if c.pair.BeginDetach(func() { stopped <- c }) {
			pending = append(pending, c)
		}
	}
	done := ctx.Done()
	for left := len(pending); left > 0; {
		select {
		case c := <-stopped:
			left--
			if s.sendMoved(ctx, c, drainBy, send) {
				moved++
			} else {
				closed++
			}
		case <-done:
			// Those still running are blocked writing: close them; they
			// report stopped as they end.
			for _, c := range pending {
				c.pair.CloseWith(fmt.Errorf("worker: not moved in time: %w", ctx.Err()))
			}
			done = nil
		}
	}
	return moved, closed
}

// handingWait bounds how long Move waits for connections the event loop
// handed on with bytes pending (waitHanding).
const handingWait = time.Second

// waitHanding waits until no connection is being handed on by the event
// loop with bytes its peer had not taken yet (conn.handing): once they
// are written, the connection is a pair, and moves. It waits at most
// handingWait, and a quarter of what ctx leaves, so that the other
// connections still have the time to move; one whose peer takes nothing
// meanwhile is closed, as one not yet proxied is.
func (s *Server) waitHanding(ctx context.Context) {
	wait := handingWait
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(d)/4)
	}
	limit := time.Now().Add(wait)
	for s.handing() && ctx.Err() == nil && time.Now().Before(limit) {
		time.Sleep(2 * time.Millisecond)
	}
}

// handing reports whether a connection is being handed on with bytes
// pending (conn.handing).
func (s *Server) handing() bool {
	s.mu.Lock()
	cs := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		c.mu.Lock()
		h := c.handing
		c.mu.Unlock()
		if h {
			return true
		}
	}
	return false
}

// sendMoved detaches a stopped pair and sends its connection; false if it
// could not (it is closed then, or it had ended by itself).
func (s *Server) sendMoved(ctx context.Context, c *conn, drainBy time.Time, send SendMoved) bool {
	d, err := c.pair.Detach(ctx) // stopped already: returns at once
	// The permits go back after the send, whatever its outcome (see
	// conn.Done): the master must see the connection leave first.
	defer func() {
		if c.movedPermit.Swap(false) {
			s.limiter.Release()
		}
		c.releaseMovedPerIP()
	}()
	if err != nil {
		if !errors.Is(err, proxy.ErrClosed) {
			s.log.Info("a connection could not be moved; closed", "conn", c.id, "err", err)
		}
		return false
	}
	defer d.Close()
	state, err := json.Marshal(c.movedState(d.State, drainBy))
	if err == nil {
		err = send(c.movedKey(), state, d.Client, d.Backend)
	}
	if err != nil {
		s.log.Warn("moving a connection failed; closed", "conn", c.id, "err", err)
		return false
	}
	return true
}

// movedState returns what c carries to the next process.
func (c *conn) movedState(ps proxy.State, drainBy time.Time) movedState {
	deadline := drainBy
	if c.deadline != 0 {
		if own := time.Unix(0, c.deadline); deadline.IsZero() || own.Before(deadline) {
			deadline = own
		}
	}
	// ps counts the sniffed bytes replayed to the backend too (the pair
	// started from them: conn.startPair).
	st := movedState{
		Listener: c.lcfg.Address,
		Client:   c.peer.String(),
		Start:    c.start,
		Sniff:    c.o.res,
		Rule:     c.o.rule,
		Pair:     ps,
		Deadline: deadline,
		Moves:    int(c.moves) + 1,
		Idle:     c.idle,
	}
	if c.o.backend.IsValid() {
		st.Backend = c.o.backend.String()
	}
	return st
}

// Resume goes on serving a connection another process moved here (see
// Move): state is what it sent, client and backend the sockets. Resume
// owns the files and closes them. The connection counts as open here from
// now on, and it is closed at the deadline it came with.
//
// permitted says the connection came with its permit, already counted in
// this server's Limiter (the master grants one with every moved
// connection: see lease.Pool.Transfer and lease.Client.Adopt); it is
// given back when the connection ends, and also when Resume fails.
// Without one, the connection takes a permit when one is free (it is
// served either way: a live connection is not dropped for the limit).
//
// key is the client key the connection came with (ipc.Connection's Key;
// invalid: none). Under limits.per_ip_connections the master granted this
// worker that client's permit with the connection (perip.Table.Transfer,
// under the key PerIP.Key maps it to): Resume counts it in PerIP (Adopt),
// and it is given back when the connection ends, or when Resume fails, so
// that the connection counts against its client as long as it is open.
//
// Resume must not be called once Drain has returned.
func (s *Server) Resume(state []byte, client, backend *os.File, permitted bool, key netip.Addr) (err error) {
	if permitted && s.limiter != nil {
		defer func() {
			if err != nil {
				s.limiter.Release()
			}
		}()
	}
	var perIPKey netip.Addr
	if s.PerIP != nil && key.IsValid() {
		if k := s.PerIP.Key(key); s.PerIP.Adopt(k) {
			perIPKey = k
			defer func() {
				if err != nil {
					s.PerIP.Release(k)
				}
			}()
		}
	}
	defer client.Close()
	defer backend.Close()
	var st movedState
	if err := json.Unmarshal(state, &st); err != nil {
		return fmt.Errorf("worker: resume: state: %w", err)
	}
	cc, err := fileTCP(client)
	if err != nil {
		return err
	}
	bc, err := fileTCP(backend)
	if err != nil {
		cc.Close()
		return err
	}
	lcfg := &config.Listener{Address: st.Listener}
	for i := range s.cfg.Listeners {
		if l := &s.cfg.Listeners[i]; l.Address == st.Listener {
			lcfg = l
		}
	}
	c := &conn{srv: s, id: s.nextID.Add(1), client: cc, backend: bc, lcfg: lcfg, start: st.Start,
		o: outcome{res: st.Sniff, rule: st.Rule}, moves: int32(st.Moves), idle: st.Idle, perIPKey: perIPKey}
	c.o.backend, _ = netip.ParseAddrPort(st.Backend)
	s.adoptPoolBackend(c)
	if peer, err := netip.ParseAddrPort(st.Client); err == nil {
		c.peer = unmapAddrPort(peer) // the client as it was where it was sniffed
	}
	if !st.Deadline.IsZero() {
		c.deadline = st.Deadline.UnixNano()
	}
	if permitted && s.limiter != nil {
		c.permit.Store(permitHeld)
	}
	s.rec.Opened()
	s.track(c)
	c.mu.Lock()
	if c.deadline != 0 {
		// Armed first: Done stops it, even if the pair ends at once.
		c.timer.Store(time.AfterFunc(time.Until(st.Deadline), c.close))
	}
	// Set before Resume returns, so a Move right after finds the pair.
	c.paired = true
	c.pair.Resume(cc, bc, st.Pair, c.idleTimeout(), s.poller, c)
	c.mu.Unlock()
	if s.limiter != nil && !permitted {
		go c.acquireLate()
	}
	return nil
}

// adoptPoolBackend counts a resumed connection in its route's pool here,
// when this generation's config has that route with a pool holding the
// backend it reached: balancing (least_conn) and
// sniproxy_backend_connections_active then see it as they see the
// connections dialled here, and finish releases it.
func (s *Server) adoptPoolBackend(c *conn) {
	pool := s.poolByMatch[c.o.rule]
	if pool == nil || !c.o.backend.IsValid() {
		return
	}
	if j := pool.Find(c.o.backend); j >= 0 {
		pool.Adopt(j)
		c.pool, c.poolBackend = pool, int32(j)
	}
}

// poolsByMatch maps the match of every route with a pool to its pool (the
// first route of a match, as routing finds it).
func poolsByMatch(cfg *config.Config, pools []*route.Pool) map[string]*route.Pool {
	m := map[string]*route.Pool{}
	for i, p := range pools {
		if p == nil {
			continue
		}
		if _, ok := m[cfg.Routes[i].Match]; !ok {
			m[cfg.Routes[i].Match] = p
		}
	}
	return m
}

// acquireLate takes a permit for a resumed connection, which is served
// without one until then. When none is free (the previous generation's
// connections still count), it tries again, backing off to once a second,
// for as long as the connection lasts, so that the global count is right
// again once permits free up. It runs off the caller's goroutine: a
// permit may take a round trip to the master, whose answer the caller may
// be the one to read.
func (c *conn) acquireLate() {
	lim := c.srv.limiter
	try := lim.Acquire
	if t, ok := lim.(interface{ TryAcquire() bool }); ok {
		// Without pressing siblings for their spares: this connection
		// is served already.
		try = t.TryAcquire
	}
	for delay := 10 * time.Millisecond; c.permit.Load() == permitNone; delay = min(2*delay, time.Second) {
		if try() {
			if !c.permit.CompareAndSwap(permitNone, permitHeld) {
				lim.Release() // the connection ended meanwhile
			}
			return
		}
		time.Sleep(delay)
	}
}

// fileTCP returns the TCP connection of a socket file, leaving f open.
func fileTCP(f *os.File) (*net.TCPConn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("worker: resume %s: %w", f.Name(), err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("worker: resume %s: a %T, not TCP", f.Name(), c)
	}
	return tc, nil
}
