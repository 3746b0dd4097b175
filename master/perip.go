package master

import (
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/ipc"
)

// perIPSweep is how often the per-client table forgets idle keys.
const perIPSweep = 5 * time.Second

// perIPFullLog bounds the warnings that the per-client table is full.
const perIPFullLog = 10 * time.Second

// perIP is the master's side of the per-client limits (package perip):
// the table of client keys, the leases its workers ask for (ipc PerIP),
// and, during a reload, the feed of its client permits to the successor, which
// counts them as reserves per key until they close (the way the broker
// feeds it the global reserve).
//
// Moved connections keep their client permits counted all the way, as
// they keep their permits (see broker.setPredecessor): the predecessor
// counts per key the connections it moved (sentToSuccessor) and sends
// those counts before its worker's client permit comes back; the
// successor's reserve for a key is what the predecessor's workers hold
// plus what it moved and has not arrived yet, and each arriving
// connection's client permit is granted to the worker that takes it
// (arrived, perip.Table.Transfer).
type perIP struct {
	t   *perip.Table
	log *slog.Logger
	// prefix is limits.ipv6_prefix: a moved connection's key, from a
	// generation that may have grouped IPv6 clients otherwise, is
	// grouped under this one's (as its worker's perip.Client does).
	prefix int

	// mu orders reading the table's changes with sending them: two
	// senders must not send their readings out of order.
	mu        sync.Mutex
	successor *stateSocket
	// movedOut counts per key the connections this generation's workers
	// moved to the successor.
	movedOut map[netip.Addr]int
	fullSeen uint64    // the table's full count when last logged
	fullAt   time.Time // when last logged

	// pred is the predecessor's side of the reserves.
	pred predecessorClients
}

// predecessorClients is what the successor knows of its predecessor's
// client permits, per key: held by its workers, moved here (its count),
// arrived here. The reserve of a key is held + max(moved - arrived, 0).
type predecessorClients struct {
	// mu is taken under relay.mu and under no other lock of the master,
	// and never with perIP.mu held; it takes perip.Table's lock.
	mu                   sync.Mutex
	held, moved, arrived map[netip.Addr]int
	// gone: the predecessor has exited and every message of it is read
	// (its moved counts are final). movesEnded: its move socket is at
	// its end (nothing more arrives).
	gone, movesEnded bool
}

// newPerIP returns the per-client table for cfg: at least
// perip.DefaultSize keys, and twice max_connections, so that only clients
// holding open connections can fill it.
func newPerIP(log *slog.Logger, cfg *config.Config) *perIP {
	lim := perip.Limits{Conns: cfg.Limits.PerIPConnections, Rate: cfg.Limits.PerIPRate}
	return &perIP{t: perip.NewTable(lim, max(perip.DefaultSize, 2*cfg.MaxConnections), nil), log: log,
		prefix: cfg.Limits.IPv6Prefix,
		pred: predecessorClients{
			held: map[netip.Addr]int{}, moved: map[netip.Addr]int{}, arrived: map[netip.Addr]int{},
		}}
}

// handle answers a worker's request, or takes its return. The successor,
// if any, learns of a grant before the worker can use it.
func (p *perIP) handle(c *child, b ipc.PerIP) {
	if b.Return {
		if err := p.t.Return(c.id, b.Key, b.Conns, b.Tokens); err != nil {
			p.log.Error("worker returned client permits it does not hold", "slot", c.slot, "worker_id", c.id, "err", err)
		}
		p.flush()
		return
	}
	g := p.t.Grant(c.id, b.Key, b.Conns, b.Tokens)
	p.flush()
	if g.Conns == 0 && g.Tokens == 0 {
		p.logFull()
	}
	c.conn.SendBody(ipc.PerIPGrant{Key: b.Key, Conns: g.Conns, Tokens: g.Tokens, Retry: g.Retry})
}

// logFull warns, at most every perIPFullLog, that clients were refused
// because every key of the table holds open connections.
func (p *perIP) logFull() {
	keys, full := p.t.Len()
	p.mu.Lock()
	defer p.mu.Unlock()
	if full == p.fullSeen || time.Since(p.fullAt) < perIPFullLog {
		return
	}
	p.log.Warn("per-client table full: new clients refused (per_ip_limit) until one closes",
		"keys", keys, "refused", full-p.fullSeen)
	p.fullSeen, p.fullAt = full, time.Now()
}

// drop takes back every client permit of c, which exited.
func (p *perIP) drop(c *child) int {
	n := p.t.Drop(c.id)
	p.flush()
	return n
}

// flush sends the successor, if any, the client permits now held of every key that
// changed.
func (p *perIP) flush() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.successor == nil {
		return
	}
	if ch := p.t.Changes(); ch != nil {
		p.successor.send(stateMsg{PerIP: ch})
	}
}

// attachSuccessor takes the table's state, passes it to sendState (which
// sends the succession state), and on success sends every later change to
// s: one step under mu, so the successor misses no grant.
func (p *perIP) attachSuccessor(s *stateSocket, sendState func(*perip.State) error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := sendState(p.t.Snapshot()); err != nil {
		p.t.Untrack()
		return err
	}
	p.successor = s
	p.movedOut = map[netip.Addr]int{}
	return nil
}

// sentToSuccessor counts a connection of client key a worker moved to the
// successor, and tells it: the worker gives the connection's client
// permit back next, so the successor must know of the move before it
// hears of the lower count.
func (p *perIP) sentToSuccessor(key netip.Addr) {
	if !key.IsValid() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.successor == nil {
		return
	}
	p.movedOut[key]++
	p.successor.send(stateMsg{PerIPMoved: map[netip.Addr]int{key: p.movedOut[key]}})
}

// detachSuccessor stops the feed (the successor failed).
func (p *perIP) detachSuccessor() {
	p.mu.Lock()
	p.successor = nil
	p.t.Untrack()
	p.mu.Unlock()
}

// inherit takes the predecessor's state: its client permits count as reserves.
func (p *perIP) inherit(s *perip.State) {
	if s == nil {
		return
	}
	p.pred.mu.Lock()
	for k, n := range s.Held {
		if n > 0 {
			p.pred.held[k] = n
		}
	}
	p.pred.mu.Unlock()
	p.t.Inherit(s)
}

// predecessorChanged takes the predecessor's new counts of some keys.
func (p *perIP) predecessorChanged(ch map[netip.Addr]int) {
	p.pred.mu.Lock()
	defer p.pred.mu.Unlock()
	for k, n := range ch {
		if n > 0 {
			p.pred.held[k] = n
		} else {
			delete(p.pred.held, k)
		}
		p.resetReserveLocked(k)
	}
}

// predecessorMoved takes the predecessor's new counts of the connections
// it moved here, per key.
func (p *perIP) predecessorMoved(ch map[netip.Addr]int) {
	p.pred.mu.Lock()
	defer p.pred.mu.Unlock()
	for k, n := range ch {
		p.pred.moved[k] = max(n, p.pred.moved[k]) // counts only grow
		p.resetReserveLocked(k)
	}
}

// arrived takes a connection of client key the predecessor moved here:
// its client permit is granted to c, the worker it goes to (nil: it was
// closed, no worker took it), whatever the limit, and it no longer counts
// as in flight. key is the predecessor's; c's worker counts it under
// this generation's grouping of IPv6 clients.
func (p *perIP) arrived(c *child, key netip.Addr) {
	if !key.IsValid() {
		return
	}
	p.pred.mu.Lock()
	if c != nil {
		p.t.Transfer(c.id, perip.Key(key, p.prefix))
	}
	p.pred.arrived[key]++
	p.resetReserveLocked(key)
	p.pred.mu.Unlock()
	if c != nil {
		p.flush()
	}
}

// notArrived undoes arrived(c, key) for a worker that did not take the
// connection after all (it goes to the next, or is closed: arrived(nil,
// key)).
func (p *perIP) notArrived(c *child, key netip.Addr) {
	if !key.IsValid() {
		return
	}
	p.pred.mu.Lock()
	p.pred.arrived[key]--
	p.resetReserveLocked(key)
	if err := p.t.Return(c.id, perip.Key(key, p.prefix), 1, 0); err != nil {
		p.log.Error("taking back the client permit of a moved connection failed", "slot", c.slot, "worker_id", c.id, "err", err)
	}
	p.pred.mu.Unlock()
	p.flush()
}

// movesEnded says the predecessor's move socket is at its end: no moved
// connection arrives any more.
func (p *perIP) movesEnded() {
	p.pred.mu.Lock()
	defer p.pred.mu.Unlock()
	p.pred.movesEnded = true
	p.forgetMovesLocked()
}

// predecessorGone forgets what the predecessor's workers held: its
// connections are closed. What it moved and has not arrived yet still
// counts.
func (p *perIP) predecessorGone() {
	p.pred.mu.Lock()
	defer p.pred.mu.Unlock()
	p.pred.gone = true
	for k := range p.pred.held {
		delete(p.pred.held, k)
		p.resetReserveLocked(k)
	}
	p.forgetMovesLocked()
}

// forgetMovesLocked forgets the moved and arrived counts that can no
// longer change a reserve: every count once the predecessor is gone and
// its move socket ended (a connection still missing was lost on the way),
// and, once it is gone (its counts are final), those of the keys whose
// moved connections have all arrived. p.pred.mu is held.
func (p *perIP) forgetMovesLocked() {
	if !p.pred.gone {
		return
	}
	for k, n := range p.pred.moved {
		if p.pred.movesEnded || n <= p.pred.arrived[k] {
			delete(p.pred.moved, k)
			delete(p.pred.arrived, k)
			p.resetReserveLocked(k)
		}
	}
	if p.pred.movesEnded {
		clear(p.pred.arrived)
	}
}

// resetReserveLocked sets key's reserve from the predecessor's counts;
// p.pred.mu is held.
func (p *perIP) resetReserveLocked(key netip.Addr) {
	n := p.pred.held[key] + max(p.pred.moved[key]-p.pred.arrived[key], 0)
	p.t.SetReserve(key, n)
}

// sweepEvery forgets idle keys every interval until done is closed.
func (p *perIP) sweepEvery(interval time.Duration, done <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			p.t.Sweep()
		case <-done:
			return
		}
	}
}
