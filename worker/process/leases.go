package process

import (
	"errors"
	"log/slog"
	"sync"

	"github.com/sniproxy/sniproxy/ipc"
)

// errNoRequest is a lease grant the worker did not ask for.
var errNoRequest = errors.New("process: lease grant with no request outstanding")

// leases is the lease client's transport (lease.Transport) over the ipc
// connection. Connections' goroutines call Request and Return; the
// control loop hands it the master's grants (grant) and tells it when the
// master is gone (lose). It is safe for concurrent use.
type leases struct {
	conn *ipc.Conn
	log  *slog.Logger

	mu      sync.Mutex
	waiters []chan int // requests awaiting a grant, in the order sent
	lost    bool       // the master is gone: permits are local
}

// Request implements lease.Transport: it asks the master for permits and
// waits for the grant. The master grants in request order.
//
// Once the master is gone the worker only drains: its listeners are
// closing, and a connection it accepted in that instant is served rather
// than reset, with a permit granted locally (the global count cannot be
// consulted).
func (l *leases) Request(want int, urgent bool) (int, error) {
	ch := make(chan int, 1)
	l.mu.Lock()
	if l.lost {
		l.mu.Unlock()
		return 1, nil
	}
	l.waiters = append(l.waiters, ch)
	// Sent under the lock so the order of sends is the order of waiters.
	err := l.conn.SendBody(ipc.LeaseRequest{Want: want, Urgent: urgent})
	if err != nil {
		l.waiters = l.waiters[:len(l.waiters)-1]
	}
	l.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n, ok := <-ch
	if !ok {
		return 1, nil // the master went away meanwhile: see above
	}
	return n, nil
}

// Return implements lease.Transport. Once the master is gone permits are
// local and nothing goes back: the master takes back what it granted when
// this worker exits.
func (l *leases) Return(n int) {
	l.mu.Lock()
	lost := l.lost
	l.mu.Unlock()
	if lost {
		return
	}
	if err := l.conn.SendBody(ipc.LeaseReturn{N: n}); err != nil {
		l.log.Debug("returning permits failed", "n", n, "err", err)
	}
}

// grant hands a grant of n permits to the oldest request.
func (l *leases) grant(n int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.waiters) == 0 {
		return errNoRequest
	}
	ch := l.waiters[0]
	l.waiters = l.waiters[1:]
	ch <- n
	return nil
}

// lose wakes every request with a local permit; later requests get one at
// once and returns are dropped.
func (l *leases) lose() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lost = true
	for _, ch := range l.waiters {
		close(ch)
	}
	l.waiters = nil
}
