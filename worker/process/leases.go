package process

import (
	"errors"
	"log/slog"
	"slices"
	"sync"

	"github.com/sniproxy/sniproxy/ipc"
)

// errNoRequest is a lease grant the worker did not ask for.
var errNoRequest = errors.New("process: lease grant with no request outstanding")

// leases is the lease client's transport (lease.Transport) over the ipc
// connection. Connections' goroutines call Request; Return is called from
// the event loop too, so it never waits for the connection: it adds to
// what is to be given back, and sendReturns sends it. Whatever goes to the
// master leaves in the order taken (send): a request carries the returns
// made before it, so the master never counts a returned permit as held
// when it answers a later request. The control loop hands it the
// master's grants (grant) and tells it when the master is gone (lose). It
// is safe for concurrent use; make it with newLeases.
type leases struct {
	conn *ipc.Conn
	log  *slog.Logger

	send sender // orders the sends; taken before mu, never under it

	mu        sync.Mutex
	waiters   []chan int // requests awaiting a grant, in the order sent
	lost      bool       // the master is gone: permits are local
	returning int        // given back, not sent yet
}

// newLeases returns the transport over conn; sendReturns must run for
// returns to reach the master.
func newLeases(conn *ipc.Conn, log *slog.Logger) *leases {
	return &leases{conn: conn, log: log, send: newSender()}
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
	l.send.mu.Lock()
	l.mu.Lock()
	if l.lost {
		l.mu.Unlock()
		l.send.mu.Unlock()
		return 1, nil
	}
	// Appended in the order of sends: send is held.
	l.waiters = append(l.waiters, ch)
	l.mu.Unlock()
	l.sendReturnsLocked()
	err := l.conn.SendBody(ipc.LeaseRequest{Want: want, Urgent: urgent})
	if err != nil {
		l.mu.Lock()
		l.waiters = slices.DeleteFunc(l.waiters, func(w chan int) bool { return w == ch })
		l.mu.Unlock()
	}
	l.send.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n, ok := <-ch
	if !ok {
		return 1, nil // the master went away meanwhile: see above
	}
	return n, nil
}

// Return implements lease.Transport without waiting: sendReturns (or the
// next Request) sends the permits. Once the master is gone permits are
// local and nothing goes back: the master takes back what it granted when
// this worker exits.
func (l *leases) Return(n int) {
	l.mu.Lock()
	if !l.lost {
		l.returning += n
	}
	l.mu.Unlock()
	l.send.poke()
}

// sendReturns sends what Return gave back until done is closed.
func (l *leases) sendReturns(done <-chan struct{}) { l.send.loop(done, l.sendReturnsLocked) }

// sendReturnsLocked sends the permits given back so far, all in one
// message; l.send is held.
func (l *leases) sendReturnsLocked() {
	l.mu.Lock()
	n := l.returning
	l.returning = 0
	l.mu.Unlock()
	if n == 0 {
		return
	}
	if err := l.conn.SendBody(ipc.LeaseReturn{N: n}); err != nil {
		l.log.Debug("returning permits failed", "n", n, "err", err)
	}
}

// sender orders what a transport sends to the master (mu is held while
// sending) and wakes the goroutine that sends returns (poke, loop).
type sender struct {
	mu   sync.Mutex
	kick chan struct{} // a return to send (capacity 1)
}

func newSender() sender { return sender{kick: make(chan struct{}, 1)} }

// poke wakes loop, without waiting.
func (s *sender) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// loop calls flush, with mu held, each time it is poked, until done is
// closed.
func (s *sender) loop(done <-chan struct{}, flush func()) {
	for {
		select {
		case <-s.kick:
		case <-done:
			return
		}
		s.now(flush)
	}
}

// now calls flush with mu held: what is owed leaves at once (a worker
// about to exit sends its returns before it goes).
func (s *sender) now(flush func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	flush()
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
	l.returning = 0
	for _, ch := range l.waiters {
		close(ch)
	}
	l.waiters = nil
}
