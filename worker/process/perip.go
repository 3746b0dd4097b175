package process

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
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
// limit: connections' goroutines call Request and Return; the control loop
// hands it the master's grants (grant) and tells it when the master is
// gone (lose). It is safe for concurrent use.
type perIPLeases struct {
	conn *ipc.Conn
	log  *slog.Logger

	mu      sync.Mutex
	waiters []perIPWaiter // in the order sent; the master answers in order
	lost    bool          // the master is gone: everything asked is granted
}

// Request implements perip.Transport. Once the master is gone the worker
// only drains, and a connection accepted in that instant is served (the
// counts cannot be consulted), as with the global limit.
func (l *perIPLeases) Request(key netip.Addr, conns, tokens int) (perip.Grant, error) {
	ch := make(chan perip.Grant, 1)
	l.mu.Lock()
	if l.lost {
		l.mu.Unlock()
		return perip.Grant{Conns: conns, Tokens: tokens}, nil
	}
	l.waiters = append(l.waiters, perIPWaiter{key, ch})
	// Sent under the lock so the order of sends is the order of waiters.
	err := l.conn.SendBody(ipc.PerIP{Key: key, Conns: conns, Tokens: tokens})
	if err != nil {
		l.waiters = l.waiters[:len(l.waiters)-1]
	}
	l.mu.Unlock()
	if err != nil {
		return perip.Grant{}, fmt.Errorf("process: per-client request: %w", err)
	}
	g, ok := <-ch
	if !ok {
		return perip.Grant{Conns: conns, Tokens: tokens}, nil // see above
	}
	return g, nil
}

// Return implements perip.Transport; once the master is gone nothing goes
// back (it drops this worker's client permits when it exits).
func (l *perIPLeases) Return(key netip.Addr, conns, tokens int) {
	l.mu.Lock()
	lost := l.lost
	l.mu.Unlock()
	if lost {
		return
	}
	if err := l.conn.SendBody(ipc.PerIP{Key: key, Conns: conns, Tokens: tokens, Return: true}); err != nil {
		l.log.Debug("returning client permits failed", "key", key, "err", err)
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
	for _, w := range l.waiters {
		close(w.ch)
	}
	l.waiters = nil
}
