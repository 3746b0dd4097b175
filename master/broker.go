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

// setReserve sets the permits the predecessor's workers still hold.
func (b *broker) setReserve(n int) { b.pool.SetReserve(n) }

// sendReserve tells the successor, if any, how many permits this
// generation holds.
func (b *broker) sendReserve() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.successor != nil {
		held, _ := b.pool.Held()
		b.successor.send(stateMsg{Reserve: &held})
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
