package process

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/ipc"
)

// errNoPerIPRequest is a per-client grant the worker did not ask for.
var errNoPerIPRequest = errors.New("process: per-client grant with no request outstanding")

// perIPWaiter is a request awaiting the master's PerIPGrant.
type perIPWaiter struct {
	key netip.Addr
	ch  chan perip.Grant
}

// perIPLeases is the per-client limit client's transport
// (perip.Transport) over the ipc connection, like leases for the global
// limit: connections' goroutines call Request; Return, called from the
// event loop too, never waits for the connection (sendReturns sends what
// it gives back, and a request first sends the returns made before it);
// the control loop hands it the master's grants (grant) and tells it when
// the master is gone (lose). It is safe for concurrent use; make it with
// newPerIPLeases.
type perIPLeases struct {
	conn *ipc.Conn
	log  *slog.Logger

	send sender // orders the sends; taken before mu, never under it

	mu        sync.Mutex
	waiters   []perIPWaiter              // in the order sent; the master answers in order
	lost      bool                       // the master is gone: everything asked is granted
	returning map[netip.Addr]perip.Grant // given back per key, not sent yet
}

// newPerIPLeases returns the transport over conn; sendReturns must run
// for returns to reach the master.
func newPerIPLeases(conn *ipc.Conn, log *slog.Logger) *perIPLeases {
	return &perIPLeases{conn: conn, log: log, returning: map[netip.Addr]perip.Grant{}, send: newSender()}
}

// Request implements perip.Transport. Once the master is gone the worker
// only drains, and a connection accepted in that instant is served (the
// counts cannot be consulted), as with the global limit.
func (l *perIPLeases) Request(key netip.Addr, conns, tokens int) (perip.Grant, error) {
	ch := make(chan perip.Grant, 1)
	l.send.mu.Lock()
	l.mu.Lock()
	if l.lost {
		l.mu.Unlock()
		l.send.mu.Unlock()
		return perip.Grant{Conns: conns, Tokens: tokens}, nil
	}
	// Appended in the order of sends: send is held.
	l.waiters = append(l.waiters, perIPWaiter{key, ch})
	l.mu.Unlock()
	l.sendReturnsLocked()
	err := l.conn.SendBody(ipc.PerIP{Key: key, Conns: conns, Tokens: tokens})
	if err != nil {
		l.mu.Lock()
		l.waiters = slices.DeleteFunc(l.waiters, func(w perIPWaiter) bool { return w.ch == ch })
		l.mu.Unlock()
	}
	l.send.mu.Unlock()
	if err != nil {
		return perip.Grant{}, fmt.Errorf("process: per-client request: %w", err)
	}
	g, ok := <-ch
	if !ok {
		return perip.Grant{Conns: conns, Tokens: tokens}, nil // see above
	}
	return g, nil
}

// Return implements perip.Transport without waiting: sendReturns (or the
// next Request) sends it. Once the master is gone nothing goes back (it
// drops this worker's client permits when it exits).
func (l *perIPLeases) Return(key netip.Addr, conns, tokens int) {
	l.mu.Lock()
	if !l.lost {
		r := l.returning[key]
		r.Conns += conns
		r.Tokens += tokens
		l.returning[key] = r
	}
	l.mu.Unlock()
	l.send.poke()
}

// sendReturns sends what Return gave back until done is closed.
func (l *perIPLeases) sendReturns(done <-chan struct{}) { l.send.loop(done, l.sendReturnsLocked) }

// sendReturnsLocked sends the client permits given back so far, one
// message per key; l.send is held.
func (l *perIPLeases) sendReturnsLocked() {
	l.mu.Lock()
	if len(l.returning) == 0 {
		l.mu.Unlock()
		return
	}
	returning := l.returning
	l.returning = make(map[netip.Addr]perip.Grant, len(returning))
	l.mu.Unlock()
	for key, r := range returning {
		if err := l.conn.SendBody(ipc.PerIP{Key: key, Conns: r.Conns, Tokens: r.Tokens, Return: true}); err != nil {
			l.log.Debug("returning client permits failed", "key", key, "err", err)
		}
	}
}

// grant hands the master's answer to the oldest request, which must be
// for the same key.
func (l *perIPLeases) grant(g ipc.PerIPGrant) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.waiters) == 0 {
		return errNoPerIPRequest
	}
	w := l.waiters[0]
	if w.key != g.Key {
		return fmt.Errorf("process: per-client grant for %v, but the oldest request is for %v", g.Key, w.key)
	}
	l.waiters = l.waiters[1:]
	w.ch <- perip.Grant{Conns: g.Conns, Tokens: g.Tokens, Retry: g.Retry}
	return nil
}

// lose wakes every request with what it asked for; later requests get it
// at once and returns are dropped.
func (l *perIPLeases) lose() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lost = true
	clear(l.returning)
	for _, w := range l.waiters {
		close(w.ch)
	}
	l.waiters = nil
}
