package master

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// moveSendTimeout bounds sending one moved connection to a worker.
const moveSendTimeout = 5 * time.Second

// relay is the part that carries moved connections between masters: from
// the hurried predecessor's move socket to this generation's workers
// (round robin), and, once this generation is hurried, from its workers to
// the successor's move socket.
type relay struct {
	log *slog.Logger
	// workers returns this generation's workers by slot (the supervisor's).
	workers func() []*child
	// sendTimeout bounds one send to a worker (moveSendTimeout).
	sendTimeout time.Duration
	// fromPredecessor is closed once every connection the predecessor
	// moved has been sent to a worker (or it sent none).
	fromPredecessor chan struct{}
	// successor is this master's end of the move socket to the successor.
	successor atomic.Pointer[ipc.Conn]
	// permits carries each moved connection's permit (the broker's):
	// granted to the worker that takes it, counted when it goes on.
	permits movedPermits
	// clients does the same for its client permit (the per-client
	// table's); nil: none. Set before the relay is used.
	clients movedClientPermits

	// mu is held while a moved connection is sent to a worker: retire
	// takes it, so once it returns no worker gets one (it could arrive
	// after the worker's last read).
	mu       sync.Mutex
	retiring bool
	next     int // the slot the next moved connection goes to
}

// movedPermits is what the relay needs of the permit broker: a moved
// connection keeps counting against max_connections all the way (see
// broker.setPredecessor).
type movedPermits interface {
	// arrived grants the permit of a connection the predecessor moved
	// here to c (nil: no worker took it).
	arrived(c *child)
	// notArrived takes it back from c, which did not take it.
	notArrived(c *child)
	// sentToSuccessor counts a connection moved on to the successor.
	sentToSuccessor()
}

// movedClientPermits is what the relay needs of the per-client table: a
// moved connection keeps counting against its client's
// limits.per_ip_connections all the way (see perIP). key is the client key
// the connection came with (ipc.Connection's Key).
type movedClientPermits interface {
	// arrived grants the client permit of a connection the predecessor
	// moved here to c (nil: no worker took it).
	arrived(c *child, key netip.Addr)
	// notArrived takes it back from c, which did not take it.
	notArrived(c *child, key netip.Addr)
	// movesEnded says no connection arrives from the predecessor any more.
	movesEnded()
	// sentToSuccessor counts a connection moved on to the successor.
	sentToSuccessor(key netip.Addr)
}

// newRelay returns a relay with nothing to receive from a predecessor.
func newRelay(log *slog.Logger, workers func() []*child, permits movedPermits) *relay {
	r := &relay{log: log, workers: workers, permits: permits, sendTimeout: moveSendTimeout, fromPredecessor: make(chan struct{})}
	close(r.fromPredecessor)
	return r
}

// receiveFrom sends each connection the hurried predecessor moves over mc
// to one of this generation's workers until the predecessor exits. It
// returns at once; fromPredecessor is closed when it is done.
func (r *relay) receiveFrom(mc *ipc.Conn) {
	r.fromPredecessor = make(chan struct{})
	go r.receive(mc)
}

func (r *relay) receive(mc *ipc.Conn) {
	defer close(r.fromPredecessor)
	defer mc.Close()
	if r.clients != nil {
		defer r.clients.movesEnded()
	}
	n := 0
	for {
		msg, err := mc.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.log.Warn("receiving connections from the previous generation failed", "err", err)
			}
			break
		}
		b, err := ipc.Decode(msg)
		conn, ok := b.(ipc.Connection)
		if err != nil || !ok {
			msg.CloseFiles()
			r.log.Warn("unexpected message on the move socket", "type", msg.Type.String(), "err", err)
			continue
		}
		if r.toWorker(msg, conn.Key) {
			n++
		}
		msg.CloseFiles()
	}
	if n > 0 {
		r.log.Info("moved the previous generation's connections to this one's workers", "connections", n)
	}
}

// toWorker sends a moved connection of client key to a ready worker,
// round robin, with its permit and its client permit; false if none took
// it (the connection is then closed).
func (r *relay) toWorker(msg ipc.Message, key netip.Addr) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.retiring {
		r.arrived(nil, key)
		r.log.Warn("a connection from the previous generation came after this one began to retire; it is closed")
		return false
	}
	kids := r.workers()
	start := r.next
	r.next++
	for i := range kids {
		c := kids[(start+i)%len(kids)]
		if c == nil || !c.isReady() {
			continue
		}
		// Bounded: mu is held, and retire waits for it. A worker that
		// reads nothing for that long is broken: its IPC is closed, so it
		// drains and exits as on a lost master and is replaced, and the
		// next worker gets the connection.
		//
		// The permits are granted first: the worker may end the
		// connection and give them back before Send returns.
		r.arrived(c, key)
		c.conn.SetWriteDeadline(time.Now().Add(r.sendTimeout))
		err := c.conn.Send(msg)
		c.conn.SetWriteDeadline(time.Time{})
		if err == nil {
			return true
		}
		r.permits.notArrived(c)
		if r.clients != nil {
			r.clients.notArrived(c, key)
		}
		r.log.Error("a worker did not take a connection from the previous generation; cutting it off", "slot", c.slot, "pid", c.pid(), "err", err)
		c.conn.Close()
	}
	r.arrived(nil, key)
	r.log.Warn("no worker could take a connection from the previous generation; it is closed")
	return false
}

// arrived grants c (nil: none) the permits of a moved connection of
// client key.
func (r *relay) arrived(c *child, key netip.Addr) {
	r.permits.arrived(c)
	if r.clients != nil {
		r.clients.arrived(c, key)
	}
}

// retire waits for a send to a worker under way and makes toWorker refuse
// from then on.
func (r *relay) retire() {
	r.mu.Lock()
	r.retiring = true
	r.mu.Unlock()
}

// setSuccessor sets (or, with nil, clears) the move socket to the
// successor.
func (r *relay) setSuccessor(mc *ipc.Conn) { r.successor.Store(mc) }

// hasSuccessor reports whether a move socket to the successor is set.
func (r *relay) hasSuccessor() bool { return r.successor.Load() != nil }

// toSuccessor sends a connection of client key a worker moved (after a
// hurry) to the successor, which sends it to one of its workers.
func (r *relay) toSuccessor(msg ipc.Message, key netip.Addr) {
	err := errors.New("no successor")
	if mc := r.successor.Load(); mc != nil {
		err = mc.Send(msg)
	}
	if err != nil {
		r.log.Warn("moving a connection to the next generation failed; it is closed", "err", err)
		return
	}
	// Before the worker's permits come back (its next messages).
	r.permits.sentToSuccessor()
	if r.clients != nil {
		r.clients.sentToSuccessor(key)
	}
}

// closeSuccessor closes the move socket to the successor: call it once
// every worker's messages are read.
func (r *relay) closeSuccessor() {
	if mc := r.successor.Load(); mc != nil {
		mc.Close()
	}
}
