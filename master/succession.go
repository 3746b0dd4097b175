package master

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/ipc"
)

// Timeouts of a reload. Each bounds one wait of the succession; none is
// configurable.
const (
	// predecessorExitWait bounds the wait for a hurried predecessor to
	// exit (it moves its connections first).
	predecessorExitWait = 15 * time.Second
	// predecessorStateWait bounds the wait, once the hurried predecessor
	// has exited, for its last Deltas on the state socket to be counted:
	// they must be in the succession state sent on.
	predecessorStateWait = 5 * time.Second
	// predecessorMovesWait bounds the wait for the connections the
	// hurried predecessor moved to be sent to this generation's workers,
	// before those are told to retire.
	predecessorMovesWait = 30 * time.Second
	// successorReadyWait bounds the wait for the successor's Ready message
	// once tableflip's Upgrade returned (the successor sends it before it
	// signals readiness, so it is normally there already).
	successorReadyWait = 5 * time.Second
)

// Retrying tableflip's Upgrade right after a hurried predecessor exited:
// at most upgradeRetries more times, upgradeRetryPause apart.
const (
	upgradeRetries    = 100
	upgradeRetryPause = 5 * time.Millisecond
)

// flipper is what the succession uses of tableflip's Upgrader (a fake in
// tests).
type flipper interface {
	fileAdder
	File(name string) (*os.File, error)
	WaitForParent(ctx context.Context) error
	Upgrade() error
}

// succession is the part that owns this master's place between its
// predecessor and its successor: it inherits the succession state and the
// moved connections from the predecessor, and runs a reload (hurry a
// draining predecessor, attach the successor's state and move sockets,
// tableflip Upgrade, successor ready). What it changes of the other parts
// it changes through their methods; its own fields are set before the
// master serves (inherit) or belong to the reload goroutine.
type succession struct {
	log *slog.Logger
	upg flipper
	// generation is this master's generation (1 + the predecessor's).
	generation int
	counters   *counters
	broker     *broker
	relay      *relay
	sup        *supervisor
	// perip is the per-client table (nil in tests that need none).
	perip *perIP
	// noMove makes a hurried generation close its connections instead of
	// moving them (the e2e negative control).
	noMove bool

	// The reload's waits: the constants above, shorter in tests.
	exitWait, stateWait, movesWait, readyWait time.Duration

	// predecessor is the state socket to the predecessor while it drains;
	// nil for a first master.
	predecessor *stateSocket
	// predecessorDone is closed once every message of the predecessor is
	// counted and it has exited; nil without a predecessor.
	predecessorDone chan struct{}
	// reloadBegan is when the predecessor began the reload that started
	// this master (zero from a predecessor of an older build).
	reloadBegan time.Time
	// inherited is the predecessor's succession state; nil for a first
	// master.
	inherited *successionState
	// inheritedSockets are the predecessor's listening sockets by name,
	// until openSockets takes them (takeSockets); empty for a first
	// master or a predecessor of an older build.
	inheritedSockets map[string]rawFD
	// socks is this generation's listening sockets, sent to the
	// successor at a reload (nil in tests that have none).
	socks *socketSet
	// health is the health part, for the counts the draining predecessor
	// sends on (nil in tests that have none).
	health *healthPart
}

// newSuccession returns the succession of a first master (generation 1).
func newSuccession(log *slog.Logger, upg flipper, c *counters, b *broker, r *relay, sup *supervisor, noMove bool) *succession {
	return &succession{log: log, upg: upg, generation: 1, counters: c, broker: b, relay: r, sup: sup, noMove: noMove,
		exitWait: predecessorExitWait, stateWait: predecessorStateWait, movesWait: predecessorMovesWait, readyWait: successorReadyWait}
}

// inherit takes the predecessor's listening sockets, succession state and
// move socket, when this master is a successor, and starts reading them.
func (s *succession) inherit() error {
	f, err := s.upg.File(stateSocketName)
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	if f == nil {
		return nil
	}
	h, err := newStateSocket(f)
	if err != nil {
		return err
	}
	socks, msg, err := h.recvSockets()
	if err != nil || msg.State == nil {
		closeAll(socks)
		h.close()
		return fmt.Errorf("master: no succession state from the previous generation: %v", err)
	}
	s.inheritedSockets = socks
	st := msg.State
	s.inherited = st
	s.predecessor = h
	s.generation = st.Generation + 1
	s.counters.inherit(*st)
	s.reloadBegan = st.ReloadBegan
	s.broker.setPredecessor(st.Reserve, 0)
	if s.perip != nil {
		s.perip.inherit(st.PerIP)
	}
	s.predecessorDone = make(chan struct{})
	go s.readPredecessor(h)
	mf, err := s.upg.File(moveSocketName)
	if err != nil || mf == nil {
		// A predecessor of an older build: it has no connections to move.
		return nil
	}
	mc, err := ipc.FileConn(mf)
	mf.Close()
	if err != nil {
		s.log.Warn("previous generation's move socket is unusable", "err", err)
		return nil
	}
	s.relay.receiveFrom(mc)
	return nil
}

// takeSockets returns the listening sockets inherited from the
// predecessor, by name, and leaves them to the caller (openSockets).
func (s *succession) takeSockets() map[string]rawFD {
	socks := s.inheritedSockets
	s.inheritedSockets = nil
	if socks == nil {
		socks = map[string]rawFD{}
	}
	return socks
}

// readPredecessor counts the draining predecessor's Deltas and reserve
// until it exits; its connections count against max_connections until
// they close.
func (s *succession) readPredecessor(h *stateSocket) {
	for {
		msg, err := h.recv()
		if err != nil {
			break
		}
		if msg.Delta != nil {
			s.counters.addPredecessor(*msg.Delta)
		}
		if len(msg.Backends) > 0 && s.health != nil {
			s.health.addPredecessor(msg.Backends)
		}
		if msg.Reserve != nil {
			moved := -1
			if msg.Moved != nil {
				moved = *msg.Moved
			}
			s.broker.setPredecessor(*msg.Reserve, moved)
		}
		if msg.PerIPMoved != nil && s.perip != nil {
			s.perip.predecessorMoved(msg.PerIPMoved)
		}
		if msg.PerIP != nil && s.perip != nil {
			s.perip.predecessorChanged(msg.PerIP)
		}
	}
	// The predecessor is gone, and its connections with it.
	s.counters.predecessorGone()
	// Its workers hold nothing now; what it moved and has not arrived
	// yet still counts (client permits too: see perIP.predecessorGone).
	s.broker.setPredecessor(0, -1)
	if s.perip != nil {
		s.perip.predecessorGone()
	}
	close(s.predecessorDone)
	s.log.Info("previous generation exited")
}

// announceReady tells the predecessor, if any, that this generation is
// ready (it answers `sniproxy reload` with this) and counts the reload.
func (s *succession) announceReady() {
	if s.predecessor == nil {
		return
	}
	r := status.Reload{Time: time.Now(), Result: "ok", Generation: s.generation}
	if !s.reloadBegan.IsZero() {
		r.Time, r.DurationSeconds = s.reloadBegan, time.Since(s.reloadBegan).Seconds()
	}
	s.counters.reloaded(r)
	s.predecessor.send(stateMsg{Ready: &readyInfo{PID: os.Getpid(), Generation: s.generation}})
}

// close closes the state socket to the predecessor, if any, and the
// inherited sockets openSockets did not take.
func (s *succession) close() {
	if s.predecessor != nil {
		s.predecessor.close()
	}
	closeAll(s.inheritedSockets)
	s.inheritedSockets = nil
}

// reloadOutcome is what a reload came to.
type reloadOutcome struct {
	err   error
	ready readyInfo
	// successor is the state socket to the successor, on success.
	successor *stateSocket
}

// reload runs a reload whose config was validated: it hurries a draining
// predecessor (tableflip cannot start a successor while this master's
// predecessor lives, and there are never more than two generations),
// attaches the successor's state and move sockets, calls tableflip's
// Upgrade and waits for
// the successor's Ready. Run it in its own goroutine; the outcome comes on
// done.
func (s *succession) reload(began time.Time, done chan<- reloadOutcome) {
	out := reloadOutcome{}
	defer func() { done <- out }()
	if s.predecessor != nil {
		if out.err = s.hurryPredecessor(); out.err != nil {
			return
		}
	}
	h, mc, err := s.attachSuccessor(began)
	if err != nil {
		out.err = err
		return
	}
	// The successor's Ready arrives before Upgrade returns.
	readyc := make(chan readyInfo, 1)
	go s.readSuccessor(h, readyc)
	if err := s.callUpgrade(); err != nil {
		s.detachSuccessor(h, mc)
		out.err = fmt.Errorf("new generation failed, old one keeps serving: %w", err)
		return
	}
	select {
	case out.ready = <-readyc:
	case <-time.After(s.readyWait):
	}
	out.successor = h
}

// hurryPredecessor makes the draining predecessor move its connections
// here and exit, and waits until it has exited, its last counts are in and
// the connections it moved are with this generation's workers.
func (s *succession) hurryPredecessor() error {
	select {
	case <-s.predecessorDone:
		s.log.Info("previous generation has exited; reloading")
	default:
		s.log.Info("previous generation still draining: hurrying it before reloading")
	}
	s.predecessor.send(stateMsg{Hurry: true})
	ctx, cancel := context.WithTimeout(context.Background(), s.exitWait)
	err := s.upg.WaitForParent(ctx)
	cancel()
	if err != nil {
		return fmt.Errorf("previous generation did not exit: %w", err)
	}
	select {
	case <-s.predecessorDone:
	case <-time.After(s.stateWait):
	}
	// The predecessor has exited, so the move socket ends (EOF) as soon
	// as what it sent is read.
	select {
	case <-s.relay.fromPredecessor:
	case <-time.After(s.movesWait):
		s.log.Error("connections from the previous generation still arriving; reloading anyway", "waited", s.movesWait)
	}
	return nil
}

// attachSuccessor makes the state and move sockets for the successor and
// sends the listening sockets and then the succession state (with began,
// when the reload began): from then on every Delta and reserve change
// goes to the successor too.
func (s *succession) attachSuccessor(began time.Time) (*stateSocket, *ipc.Conn, error) {
	h, err := newStateSocketPair(s.upg)
	if err != nil {
		return nil, nil, err
	}
	// First on the state socket, before anything else can be sent on
	// it: the successor takes them before it opens its sockets.
	if err := s.sendSockets(h); err != nil {
		h.close()
		return nil, nil, err
	}
	mc, err := newMoveSocketPair(s.upg)
	if err != nil {
		h.close()
		return nil, nil, err
	}
	err = s.broker.attachSuccessor(h, func(reserve int) error {
		if s.perip == nil {
			return s.counters.attachSuccessor(h, s.generation, reserve, began)
		}
		return s.perip.attachSuccessor(h, func(st *perip.State) error {
			return s.counters.attachSuccessorWith(h, s.generation, reserve, began, st)
		})
	})
	if err != nil {
		h.close()
		mc.Close()
		return nil, nil, err
	}
	s.relay.setSuccessor(mc)
	return h, mc, nil
}

// sendSockets sends this generation's listening sockets to the successor
// over h: the successor serves the same sockets, so that no connection
// queued on one is lost.
func (s *succession) sendSockets(h *stateSocket) error {
	if s.socks == nil {
		return nil
	}
	names, fds, err := s.socks.dups()
	if err != nil {
		return err
	}
	defer closeFDs(fds)
	return h.sendSockets(names, fds)
}

// detachSuccessor undoes attachSuccessor after a failed Upgrade.
func (s *succession) detachSuccessor(h *stateSocket, mc *ipc.Conn) {
	s.broker.detachSuccessor()
	if s.perip != nil {
		s.perip.detachSuccessor()
	}
	s.counters.detachSuccessor()
	s.relay.setSuccessor(nil)
	h.close()
	mc.Close()
}

// callUpgrade calls tableflip's Upgrade, asking again while tableflip has not
// yet seen a hurried predecessor's exit.
func (s *succession) callUpgrade() error {
	err := s.upg.Upgrade()
	for i := 0; s.predecessor != nil && parentNotExitedYet(err) && i < upgradeRetries; i++ {
		// tableflip learns of the predecessor's exit in its own
		// goroutine, a moment after WaitForParent returns (it selects
		// between that and our request at random): ask again.
		time.Sleep(upgradeRetryPause)
		err = s.upg.Upgrade()
	}
	return err
}

// parentNotExitedYet reports whether err is tableflip's refusal of Upgrade
// while this process's parent lives. tableflip v1.2.3 makes it with
// errors.New("parent hasn't exited") inside Upgrader.run and exports no
// sentinel, so the text is the only test; it is kept here alone so that a
// tableflip update that changes it breaks one unit test
// (TestParentNotExitedYet), not a reload.
func parentNotExitedYet(err error) bool {
	return err != nil && err.Error() == "parent hasn't exited"
}

// readSuccessor reads the successor's messages: its Ready (to readyc), and
// Hurry when it must reload again while this generation still drains.
func (s *succession) readSuccessor(h *stateSocket, readyc chan<- readyInfo) {
	for {
		msg, err := h.recv()
		if err != nil {
			return
		}
		if msg.Ready != nil {
			select {
			case readyc <- *msg.Ready:
			default:
			}
		}
		if msg.Hurry {
			s.hurry()
		}
	}
}

// hurry runs when the successor must reload again while this generation
// still drains. The workers move their proxied connections (they go to
// the successor's workers through the relay) and exit; the rest are
// closed.
func (s *succession) hurry() {
	// After every connection the relay is sending to a worker: a
	// Connection frame that reached a worker after its Move would be
	// closed.
	s.relay.retire()
	kids := s.sup.retire()
	var body ipc.Body = ipc.Move{}
	if !s.relay.hasSuccessor() || s.noMove {
		body = ipc.Stop{}
	}
	s.log.Info("next generation reloads again: moving the remaining connections to it", "active", s.counters.snapshot().Active)
	for _, c := range kids {
		c.conn.SendBody(body)
	}
}

// reloadRequest asks the master's loop for a reload; the result comes back
// on reply.
type reloadRequest struct {
	reply chan reloadResult
}

// reloadResult is the outcome of a reload, as the control socket answers
// it.
type reloadResult struct {
	PID        int    `json:"pid,omitempty"`
	Generation int    `json:"generation,omitempty"`
	Error      string `json:"error,omitempty"`
}

// reloadQueue holds the reload requests waiting for the reload under way:
// one reload's result answers every request made while it ran. It belongs
// to the master's loop.
type reloadQueue struct {
	pending []reloadRequest
}

// add queues req and reports whether a reload must start for it (none is
// under way).
func (q *reloadQueue) add(req reloadRequest) bool {
	q.pending = append(q.pending, req)
	return len(q.pending) == 1
}

// busy reports whether a reload is under way.
func (q *reloadQueue) busy() bool { return len(q.pending) > 0 }

// answer sends res to every queued request and empties the queue.
func (q *reloadQueue) answer(res reloadResult) {
	for _, p := range q.pending {
		p.reply <- res
	}
	q.pending = nil
}
