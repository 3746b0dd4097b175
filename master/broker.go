package master

import (
	"log/slog"
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/internal/lease"
	"github.com/sniproxy/sniproxy/ipc"
)

// revokeWait bounds how long a request that found the pool dry waits for
// the spares a revoke asked back.
const revokeWait = 50 * time.Millisecond

// broker is the permit broker: it grants leases to workers from the pool
// of max_connections permits (less the predecessor's reserve), revokes
// spares from a worker's siblings when a request finds the pool dry, takes
// back a dead worker's permits, and keeps the successor's reserve exact.
type broker struct {
	pool *lease.Pool
	log  *slog.Logger
	// workers returns the workers a revoke may ask (the supervisor's).
	workers func() []*child
	// revokeWait bounds the wait for revoked spares (revokeWait).
	revokeWait time.Duration

	// mu makes reading the permits held and sending them as the reserve
	// one step: two senders must not send their readings out of order,
	// or the successor would be left with a count already too low.
	mu sync.Mutex
	// successor is the state socket to the successor, once there is one.
	successor *stateSocket
	// movedOut counts the connections this generation's workers moved to
	// the successor (sent with the reserve: see setPredecessor).
	movedOut int

	// The predecessor's side of the reserve, under mu: the permits its
	// workers hold (predHeld), the connections it says it moved here
	// (predMoved) and those that arrived (movedIn).
	predHeld, predMoved, movedIn int
}

// newBroker returns a broker over a pool of limit permits.
func newBroker(log *slog.Logger, limit int, workers func() []*child) *broker {
	return &broker{pool: lease.NewPool(limit), log: log, workers: workers, revokeWait: revokeWait}
}

// request answers a worker's lease request. It must not block the
// worker's reader: when it revokes, the grant waits in a goroutine.
func (b *broker) request(c *child, want int, urgent bool) {
	n := b.pool.Grant(c.id, want)
	if n == 0 && want > 0 && urgent && b.revokeFor(c) {
		// Siblings give their spares back; the grant waits a moment for
		// them (off the reader, which must read on).
		go b.grantAfterRevoke(c, want)
		return
	}
	b.answer(c, n)
}

// answer sends a grant of n to c; the successor, if any, learns of it
// before the worker can use it.
func (b *broker) answer(c *child, n int) {
	if n > 0 {
		b.sendReserve()
	}
	c.conn.SendBody(ipc.LeaseGrant{N: n})
}

// grantAfterRevoke retries a grant until permits come back or revokeWait
// passes, then answers; permits granted to a worker that died meanwhile go
// back to the pool.
func (b *broker) grantAfterRevoke(c *child, want int) {
	deadline := time.Now().Add(b.revokeWait)
	n := 0
	for {
		if n = b.pool.Grant(c.id, want); n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-c.exited:
		// The worker's permits may have been dropped already: these
		// would never come back.
		if n > 0 {
			b.pool.Return(c.id, n)
		}
		return
	default:
	}
	b.answer(c, n)
}

// revokeFor asks every other ready worker holding permits to give its
// spares back, and reports whether it asked any. A worker's spares are
// invisible to its siblings: without this, one worker could refuse
// connections at the limit while another sits on permits it does not use.
// (Which ones are spares the master cannot tell: its connection counts are
// up to a stats interval old.)
func (b *broker) revokeFor(c *child) bool {
	_, held := b.pool.Held()
	asked := false
	for _, k := range b.workers() {
		if k == nil || k == c || !k.isReady() || held[k.id] == 0 {
			continue
		}
		if k.conn.SendBody(ipc.Revoke{}) == nil {
			asked = true
		}
	}
	return asked
}

// giveBack takes back n permits a worker returns.
func (b *broker) giveBack(c *child, n int) {
	if err := b.pool.Return(c.id, n); err != nil {
		b.log.Error("worker returned permits it does not hold", "slot", c.slot, "worker_id", c.id, "err", err)
	}
	b.sendReserve()
}

// drop takes back every permit of c, which exited, and returns how many.
func (b *broker) drop(c *child) int {
	n := b.pool.Drop(c.id)
	b.sendReserve()
	return n
}

// setPredecessor takes a reading of the predecessor's permits: held by
// its workers, and the connections it has moved here so far (moved < 0:
// unchanged). The reserve is what it holds plus what is in flight: moved
// by it (its worker gave the permit back once the connection left) but
// not yet arrived here (not yet granted to a worker of ours by
// arrived). Whatever order the two readings and the moved connections
// arrive in (they come over two sockets), no open connection goes
// uncounted: at worst one counts twice for a moment.
func (b *broker) setPredecessor(held, moved int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.predHeld = held
	if moved >= 0 {
		b.predMoved = moved
	}
	b.resetReserveLocked()
}

// arrived takes a connection the predecessor moved here: its permit is
// granted to c, the worker it goes to (nil: it was closed, no worker took
// it), whatever the limit, and it no longer counts as in flight.
func (b *broker) arrived(c *child) {
	b.mu.Lock()
	b.movedIn++
	if c != nil {
		b.pool.Transfer(c.id)
	}
	b.resetReserveLocked()
	b.mu.Unlock()
	if c != nil {
		b.sendReserve()
	}
}

// notArrived undoes arrived(c) for a worker that did not take the
// connection after all (it goes to the next, or is closed: arrived(nil)).
func (b *broker) notArrived(c *child) {
	b.mu.Lock()
	b.movedIn--
	b.pool.Return(c.id, 1)
	b.resetReserveLocked()
	b.mu.Unlock()
	b.sendReserve()
}

// resetReserveLocked sets the pool's reserve from the predecessor's
// readings; b.mu is held.
func (b *broker) resetReserveLocked() {
	b.pool.SetReserve(b.predHeld + max(b.predMoved-b.movedIn, 0))
}

// sentToSuccessor counts a connection a worker moved to the successor and
// tells it: the worker gives its permit back next, so the successor must
// know of the move before it hears of the lower count.
func (b *broker) sentToSuccessor() {
	b.mu.Lock()
	b.movedOut++
	b.mu.Unlock()
	b.sendReserve()
}

// sendReserve tells the successor, if any, how many permits this
// generation holds and how many connections it has moved to it.
func (b *broker) sendReserve() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.successor != nil {
		held, _ := b.pool.Held()
		moved := b.movedOut
		b.successor.send(stateMsg{Reserve: &held, Moved: &moved})
	}
}

// attachSuccessor reads the permits held, passes them to sendState (which
// sends the succession state), and on success sends every later change to
// s: one step under mu, so the successor's reserve never misses a grant.
func (b *broker) attachSuccessor(s *stateSocket, sendState func(reserve int) error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	held, _ := b.pool.Held()
	if err := sendState(held); err != nil {
		return err
	}
	b.successor = s
	return nil
}

// detachSuccessor stops sending the reserve (the successor failed).
func (b *broker) detachSuccessor() {
	b.mu.Lock()
	b.successor = nil
	b.mu.Unlock()
}
