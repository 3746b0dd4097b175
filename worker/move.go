package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/worker/proxy"
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
}

// maxMoving bounds the pairs being detached at once by Migrate.
const maxMoving = 64

// Migrate hands every proxied connection to send, for another process to
// go on serving it (see Adopt), and closes the connections still being
// sniffed or dialled. It is for a draining server whose generation must
// exit before its connections end: it returns once each connection is
// handed over or closed, with the counts of each.
//
// Each pair is detached (proxy.Pair.Detach) within ctx; one that cannot
// stop in time (blocked writing to a peer that does not read) is closed.
// drainBy is this server's drain deadline (zero: none); the connection
// keeps the earlier of it and the one it came with. send gets the state
// and both sockets; it must not keep the files, which are closed after it
// returns. Once sent, a connection is finished here (its permit returned,
// Active decremented) with result "moved" in a debug log line; the
// receiving server logs it when it ends.
func (s *Server) Migrate(ctx context.Context, drainBy time.Time, send func(state []byte, client, backend *os.File) error) (moved, closed int) {
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

	var nMoved, nClosed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, maxMoving)
	for _, c := range cs {
		c.mu.Lock()
		pipe := c.pipe
		c.mu.Unlock()
		if pipe == nil {
			// Not proxied yet: nothing another process could go on with.
			c.close()
			nClosed.Add(1)
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			d, err := pipe.Detach(ctx)
			if err != nil {
				if !errors.Is(err, proxy.ErrClosed) {
					// It ended by itself meanwhile otherwise.
					nClosed.Add(1)
					s.log.Info("a connection could not be handed over; closed", "conn", c.id, "err", err)
				}
				return
			}
			defer d.Close()
			state, err := json.Marshal(c.movedState(d.State, drainBy))
			if err == nil {
				err = send(state, d.Client, d.Backend)
			}
			if err != nil {
				nClosed.Add(1)
				s.log.Warn("handing a connection over failed; closed", "conn", c.id, "err", err)
				return
			}
			nMoved.Add(1)
		}()
	}
	wg.Wait()
	return int(nMoved.Load()), int(nClosed.Load())
}

// movedState returns what c carries to the next process.
func (c *conn) movedState(ps proxy.State, drainBy time.Time) movedState {
	deadline := drainBy
	if !c.deadline.IsZero() && (deadline.IsZero() || c.deadline.Before(deadline)) {
		deadline = c.deadline
	}
	st := movedState{
		Listener: c.lcfg.Address,
		Client:   c.o.source,
		Start:    c.start,
		Sniff:    c.o.res,
		Rule:     c.o.rule,
		Pair:     ps,
		Deadline: deadline,
		Moves:    c.moves + 1,
	}
	if c.o.backend.IsValid() {
		st.Backend = c.o.backend.String()
	}
	return st
}

// Adopt goes on serving a connection another process handed over (see
// Migrate): state is what it sent, client and backend the sockets. Adopt
// owns the files and closes them. The connection counts as open here from
// now on; it takes a permit when one is free (it is served either way: a
// live connection is not dropped for the limit), and it is closed at the
// deadline it came with.
//
// Adopt must not be called once Drain has returned.
func (s *Server) Adopt(state []byte, client, backend *os.File) error {
	defer client.Close()
	defer backend.Close()
	var st movedState
	if err := json.Unmarshal(state, &st); err != nil {
		return fmt.Errorf("worker: adopt: state: %w", err)
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
	lcfg := config.Listener{Address: st.Listener}
	for _, l := range s.cfg.Listeners {
		if l.Address == st.Listener {
			lcfg = l
		}
	}
	o := &outcome{res: st.Sniff, source: st.Client, rule: st.Rule}
	o.backend, _ = netip.ParseAddrPort(st.Backend)
	c := &conn{srv: s, id: s.nextID.Add(1), client: cc, backend: bc, lcfg: lcfg, start: st.Start,
		o: o, moves: st.Moves, deadline: st.Deadline}
	c.in.Store(st.Pair.In)
	c.out.Store(st.Pair.Out)
	s.rec.Opened()
	s.track(c)
	c.mu.Lock()
	// Set before Adopt returns, so a Migrate right after finds the pair.
	c.pipe = proxy.Resume(cc, bc, st.Pair, s.cfg.Timeouts.Idle, s.poller, c.count, c.pipeDone(false))
	if !c.deadline.IsZero() {
		c.timer.Store(time.AfterFunc(time.Until(c.deadline), c.close))
	}
	c.mu.Unlock()
	if s.limiter != nil {
		// A permit may take a round trip to the master: not on the
		// caller's goroutine, which may be the one that reads the answer.
		go func() {
			if s.limiter.Acquire() && !c.permit.CompareAndSwap(permitNone, permitHeld) {
				s.limiter.Release() // the connection ended meanwhile
			}
		}()
	}
	return nil
}

// fileTCP returns the TCP connection of a socket file, leaving f open.
func fileTCP(f *os.File) (*net.TCPConn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("worker: adopt %s: %w", f.Name(), err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("worker: adopt %s: a %T, not TCP", f.Name(), c)
	}
	return tc, nil
}
