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
type perIP struct {
	t   *perip.Table
	log *slog.Logger

	// mu orders reading the table's changes with sending them: two
	// senders must not send their readings out of order.
	mu        sync.Mutex
	successor *stateSocket
	fullSeen  uint64    // the table's full count when last logged
	fullAt    time.Time // when last logged
}

// newPerIP returns the per-client table for cfg: at least
// perip.DefaultSize keys, and twice max_connections, so that only clients
// holding open connections can fill it.
func newPerIP(log *slog.Logger, cfg *config.Config) *perIP {
	lim := perip.Limits{Conns: cfg.Limits.PerIPConnections, Rate: cfg.Limits.PerIPRate}
	return &perIP{t: perip.NewTable(lim, max(perip.DefaultSize, 2*cfg.MaxConnections), nil), log: log}
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
	return nil
}

// detachSuccessor stops the feed (the successor failed).
func (p *perIP) detachSuccessor() {
	p.mu.Lock()
	p.successor = nil
	p.t.Untrack()
	p.mu.Unlock()
}

// inherit takes the predecessor's state: its client permits count as reserves.
func (p *perIP) inherit(s *perip.State) { p.t.Inherit(s) }

// predecessorChanged takes the predecessor's new counts of some keys.
func (p *perIP) predecessorChanged(ch map[netip.Addr]int) {
	for k, n := range ch {
		p.t.SetReserve(k, n)
	}
}

// predecessorGone forgets the reserves: the predecessor's connections are
// closed.
func (p *perIP) predecessorGone() { p.t.ClearReserves() }

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
