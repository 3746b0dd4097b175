package process

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/lease"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/worker"
)

// statsInterval is how often a worker process pushes counter deltas.
const statsInterval = time.Second

// moveTimeout bounds how long a worker tries to move its connections: the
// next generation waits for this one to exit.
const moveTimeout = 5 * time.Second

// phase is where a worker process is in its life.
type phase uint8

const (
	// serving: accepting, and resuming the connections the master moves
	// here.
	serving phase = iota
	// stopping: told to retire, move or stop (or the master is gone); the
	// listeners are closing.
	stopping
	// draining: accepting no more; waiting for the connections to end,
	// or moving them first.
	draining
)

// moveState is how far moving the connections is.
type moveState uint8

const (
	moveNone    moveState = iota
	moveWanted            // the master said Move; starts once accepting stopped
	moveRunning           // Server.Move runs
	moveDone
)

// inbound is one message from the master as the reader goroutine passes it
// to the loop, or the error that ended reading.
type inbound struct {
	msg  ipc.Message
	body ipc.Body
	err  error
}

// loop is a worker process's control loop. Its fields below the line are
// owned by the goroutine in run; the rest is set up before and read only.
type loop struct {
	log *slog.Logger
	// accessOut queues the access log's lines for its file, if it has
	// one of its own (accessLog).
	accessOut *logging.Async
	conn      *ipc.Conn
	slot      int
	switches  testswitch.Switches
	cfg       *config.Config
	srv       *worker.Server
	counters  *stats.Counters
	leases    *leases
	client    *lease.Client
	// perIP and perIPLeases enforce the per-client limits; nil when
	// both are off.
	perIP       *perip.Client
	perIPLeases *perIPLeases
	// access is the access log's output when it has a file of its own.
	access *logging.Output

	// Events for the loop, each sent by one goroutine.
	inbox   chan inbound  // the reader
	served  chan error    // Server.Serve returned
	moved   chan struct{} // move returned
	drained chan int      // Server.Drain returned: connections it closed
	done    chan struct{} // closed when run returns

	// ----- owned by run's goroutine -----
	phase         phase
	masterLost    bool
	stopAccepting context.CancelFunc // ends Serve
	acceptStopped bool               // stopAccepting was called
	serveEnded    bool               // Serve returned
	stopDelay     <-chan time.Time   // test switch StopDelay: stop accepting then
	move          moveState
	// drainBy is when the drain ends at the latest; zero: no deadline
	// (until the connections end, a Stop or the master is gone).
	drainBy     time.Time
	deadline    *time.Timer // fires at drainBy once draining; nil if none
	cancelDrain context.CancelFunc
	stopNow     bool // end the drain at once: Stop, or the connections moved
	prev        stats.Snapshot
	backends    backends
}

// newLoop makes the loop and its server for cfg.
func newLoop(o Options, cfg *config.Config) (*loop, error) {
	l := &loop{
		log:      o.Log,
		access:   o.Access,
		conn:     o.Conn,
		slot:     o.Slot,
		switches: o.Switches,
		cfg:      cfg,
		counters: new(stats.Counters),
		leases:   newLeases(o.Conn, o.Log),
		inbox:    make(chan inbound),
		served:   make(chan error, 1),
		moved:    make(chan struct{}, 1),
		drained:  make(chan int, 1),
		done:     make(chan struct{}),
	}
	l.client = lease.NewClient(l.leases, lease.BlockSize(cfg.MaxConnections, max(cfg.Workers, 1)))
	srv, err := worker.New(cfg, o.Log, l.counters, l.client)
	if err != nil {
		return nil, fmt.Errorf("process: %w", err)
	}
	srv.AccessLog, l.accessOut = accessLog(o, cfg)
	// The event loop holds a P while it waits: only with another for
	// everything else (GOMAXPROCS=1 in the environment turns it off).
	srv.EventLoop = runtime.GOMAXPROCS(0) >= 2
	if lim := cfg.Limits; lim.On() {
		l.perIPLeases = newPerIPLeases(o.Conn, o.Log)
		l.perIP = perip.NewClient(l.perIPLeases, perip.Limits{Conns: lim.PerIPConnections, Rate: lim.PerIPRate},
			lim.IPv6Prefix, workersOf(cfg), nil)
		srv.PerIP = l.perIP
	}
	if o.Switches.FreshSockets {
		// The reload negative control (see testswitch.Switches).
		srv.LingerOnStop = 300 * time.Millisecond
	}
	l.srv = srv
	return l, nil
}

// accessLog returns the access logger of cfg's log section: nil when
// log.access is off; else at info (debug if log.level is) whatever
// log.level says otherwise, to o.Access (through an Async, returned too,
// for run to close: the event loop writes a line per connection, and
// must not wait on the file) or where o.Log writes (asynchronous already:
// cmdWorker).
func accessLog(o Options, cfg *config.Config) (*slog.Logger, *logging.Async) {
	if !cfg.Log.Access {
		return nil, nil
	}
	level := slog.LevelInfo
	if l, err := logging.ParseLevel(cfg.Log.Level); err == nil {
		level = min(l, slog.LevelInfo)
	}
	if o.Access == nil {
		return slog.New(logging.WithLevel(o.Log.Handler(), level)), nil
	}
	lv := new(slog.LevelVar)
	lv.Set(level)
	out := logging.NewAsync(o.Access, logging.AsyncQueue)
	return logging.New(out, cfg.Log.Format, lv).With("worker", o.Slot, "pid", os.Getpid()), out
}

// reopenLogs takes the log files the master reopened: the main one
// becomes stderr (so that a crash's output goes there too), the access
// one replaces the access log's file.
func (l *loop) reopenLogs(b ipc.LogFiles, files []*os.File) {
	i := 0
	if b.Main {
		f := files[i]
		i++
		err := unix.Dup3(int(f.Fd()), 2, 0)
		f.Close()
		if err != nil {
			l.log.Error("taking the reopened log file failed", "err", err)
		}
	}
	if b.Access {
		f := files[i]
		if l.access == nil {
			f.Close()
			l.log.Warn("the master sent an access log file, but this worker has none")
		} else {
			l.access.Swap(f)
		}
	}
	l.log.Debug("log files reopened", "main", b.Main, "access", b.Access)
}

// run serves lns, says Ready and handles events until the drain is over.
func (l *loop) run(lns []worker.Listener) error {
	defer close(l.done)
	if l.accessOut != nil {
		defer l.accessOut.Close() // what is queued is written before the worker exits
	}
	// Whatever happens, no connection waits for a grant that will not
	// come once the loop is gone.
	defer l.leases.lose()
	go l.leases.sendReturns(l.done)
	defer l.leases.send.now(l.leases.sendReturnsLocked)
	if l.perIP != nil {
		defer l.perIPLeases.lose()
		go l.perIPLeases.sendReturns(l.done)
		// Returns still owed leave before the worker does (and before
		// lose drops them): the master counts a client's permits held
		// until they come, across a reload too.
		defer l.perIPLeases.send.now(l.perIPLeases.sendReturnsLocked)
		go l.perIP.Run(l.done)
	}
	ctx, stopAccepting := context.WithCancel(context.Background())
	defer stopAccepting()
	l.stopAccepting = stopAccepting
	go l.serve(ctx, lns)
	if err := l.conn.SendBody(ipc.Ready{}); err != nil {
		return fmt.Errorf("process: ready: %w", err)
	}
	l.log.Debug("worker ready", "slot", l.slot, "listeners", len(lns))
	go l.read()

	tick := time.NewTicker(statsInterval)
	defer tick.Stop()
	dials := time.NewTicker(DialReportInterval)
	defer dials.Stop()
	for {
		var deadline <-chan time.Time
		if l.deadline != nil {
			deadline = l.deadline.C
		}
		select {
		case in := <-l.inbox:
			if in.err != nil {
				l.lose(in.err)
				continue
			}
			l.handle(in.msg, in.body)
		case err := <-l.served:
			l.serveEnded = true
			if err != nil {
				l.log.Error("serving failed", "err", err)
			}
			if l.acceptStopped {
				l.startDrain()
			}
		case <-l.stopDelay:
			l.stopDelay = nil
			l.closeListeners()
		case <-l.moved:
			l.move = moveDone
			// What could not be moved is closed now.
			l.endDrain()
		case <-deadline:
			l.deadline = nil
			l.endDrain()
		case closed := <-l.drained:
			if l.deadline != nil {
				l.deadline.Stop()
			}
			if l.move == moveRunning {
				// Drain waited for the move; its log line is next.
				<-l.moved
			}
			if closed > 0 {
				l.log.Warn("drain deadline reached; closed connections", "closed", closed)
			} else {
				l.log.Info("drained; exiting", "slot", l.slot)
			}
			l.pushStats()
			return nil
		case <-tick.C:
			l.pushStats()
		case <-dials.C:
			l.reportDials()
		}
	}
}

// serve runs the server's accept loops until ctx is done.
func (l *loop) serve(ctx context.Context, lns []worker.Listener) {
	l.served <- l.srv.Serve(ctx, lns)
}

// read passes the master's messages to the loop until reading fails (the
// master is gone, or sent what cannot be decoded), which it passes on
// last. It does nothing else, so the loop alone acts on them.
func (l *loop) read() {
	for {
		m, err := l.conn.Recv()
		var b ipc.Body
		if err == nil {
			if b, err = ipc.Decode(m); err != nil {
				m.CloseFiles()
			}
		}
		select {
		case l.inbox <- inbound{msg: m, body: b, err: err}:
		case <-l.done:
			if err == nil {
				m.CloseFiles()
			}
			return
		}
		if err != nil {
			return
		}
	}
}

// handle acts on one message from the master. It closes the message's
// files unless it hands them on.
func (l *loop) handle(m ipc.Message, b ipc.Body) {
	if l.masterLost {
		// Only after a message broke the protocol: the rest is ignored.
		m.CloseFiles()
		return
	}
	switch b := b.(type) {
	case ipc.LeaseGrant:
		if err := l.leases.grant(b.N); err != nil && l.phase == serving {
			l.lose(err)
		}
	case ipc.PerIPGrant:
		if l.perIPLeases == nil {
			l.lose(errNoPerIPRequest)
		} else if err := l.perIPLeases.grant(b); err != nil && l.phase == serving {
			l.lose(err)
		}
	case ipc.Ping:
		l.conn.SendBody(ipc.Pong(b))
	case ipc.Health:
		l.setHealth(b)
	case ipc.Revoke:
		// Every spare goes back to the pool, for a sibling that found it
		// dry; and the permits of connections past this worker's sniff
		// share that have sent no hello for too long, evicted first.
		l.srv.EvictSlowSniffers()
		l.client.Revoke(l.client.Spare())
	case ipc.Connection:
		// The master granted the connection's permit with it (it counted
		// against max_connections all the way from the old generation).
		l.client.Adopt()
		if l.phase != serving {
			// Draining may be over before it could be served.
			m.CloseFiles()
			l.client.Release()
			if l.perIP != nil {
				// Its client permit too, if the master granted one.
				if k := l.perIP.Key(b.Key); b.Key.IsValid() && l.perIP.Adopt(k) {
					l.perIP.Release(k)
				}
			}
			l.log.Warn("a connection moved to a retiring worker was closed")
			return
		}
		// Here, not on a goroutine: the connection must be tracked before
		// a retire that follows it is handled. Resume adopts its client
		// permit, and gives both permits back if it fails.
		if err := l.srv.Resume(b.State, m.Files[0], m.Files[1], true, b.Key); err != nil {
			l.log.Warn("could not resume a moved connection", "err", err)
		}
	case ipc.Retire: // retire
		m.CloseFiles()
		if l.phase != serving {
			return
		}
		l.log.Info("retiring", "slot", l.slot, "active", l.srv.Active(), "deadline", b.Deadline)
		l.drainBy = b.Deadline
		l.retire()
	case ipc.Move: // move
		m.CloseFiles()
		switch {
		case l.phase == serving:
			// A hurry before any retire: moved connections keep a
			// deadline of shutdown_timeout from now.
			l.drainBy = time.Now().Add(l.cfg.ShutdownTimeout)
			l.move = moveWanted
			l.retire()
		case l.move == moveNone:
			l.move = moveWanted
			if l.phase == draining {
				l.startMove()
			}
		}
	case ipc.Stop:
		m.CloseFiles()
		l.stopNow = true
		if l.phase == serving {
			l.retire()
		} else {
			l.endDrain()
		}
	case ipc.LogFiles:
		l.reopenLogs(b, m.Files)
	default:
		m.CloseFiles()
		l.log.Warn("unexpected message from master", "type", m.Type.String())
	}
}

// retire begins the end: stop accepting (after the test switch's delay,
// if the master said so), then drain.
func (l *loop) retire() {
	l.phase = stopping
	if d := l.switches.StopDelay; d > 0 && !l.masterLost {
		// Test-only: a worker slow to stop accepting, so that the e2e
		// test can show a reload is answered only after it has.
		l.stopDelay = time.After(d)
		return
	}
	l.closeListeners()
}

// closeListeners stops accepting; once Serve has returned, startDrain.
func (l *loop) closeListeners() {
	if l.acceptStopped {
		return
	}
	l.acceptStopped = true
	l.stopAccepting()
	if l.serveEnded {
		l.startDrain()
	}
}

// startDrain runs once accepting has stopped: spare permits go back for
// the next generation, the master hears it (a reload is answered once the
// old workers have stopped accepting), and the connections are moved
// first if the master asked, then drained.
func (l *loop) startDrain() {
	if l.phase == draining {
		return
	}
	l.phase = draining
	l.client.Drain()
	if l.perIP != nil {
		l.perIP.Drain()
	}
	if !l.masterLost {
		l.conn.SendBody(ipc.Stopped{})
	}
	if l.move == moveWanted {
		// Drain starts when the move is over (endDrain), so that its
		// deadline cannot close a connection being moved.
		l.startMove()
		return
	}
	l.runDrain()
}

// runDrain starts Server.Drain, ended by endDrain or at drainBy.
func (l *loop) runDrain() {
	ctx, cancel := context.WithCancel(context.Background())
	l.cancelDrain = cancel
	if l.stopNow {
		cancel()
	} else {
		l.armDeadline()
	}
	go func() {
		defer cancel()
		l.drained <- l.srv.Drain(ctx)
	}()
}

// armDeadline sets the drain's timer to drainBy, or none for the zero
// time.
func (l *loop) armDeadline() {
	if l.deadline != nil {
		l.deadline.Stop()
		l.deadline = nil
	}
	if !l.drainBy.IsZero() {
		l.deadline = time.NewTimer(time.Until(l.drainBy))
	}
}

// endDrain ends the drain now: the connections left are closed. A drain
// not started yet (a move under way) starts ended.
func (l *loop) endDrain() {
	l.stopNow = true
	switch {
	case l.cancelDrain != nil:
		l.cancelDrain()
	case l.phase == draining && l.move != moveRunning:
		l.runDrain()
	}
}

// startMove moves every proxied connection to the master, which sends it
// on to the next generation (see worker.Server.Move); the loop hears
// moved when it is over.
func (l *loop) startMove() {
	l.move = moveRunning
	go l.moveConnections(l.drainBy)
}

// moveConnections runs Server.Move with the ipc connection as the way out.
func (l *loop) moveConnections(drainBy time.Time) {
	defer func() { l.moved <- struct{}{} }()
	active := l.srv.Active()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), moveTimeout)
	defer cancel()
	// A master that stops reading must not hold this worker past the
	// time its successor waits for this generation to exit.
	l.conn.SetWriteDeadline(time.Now().Add(moveTimeout + time.Second))
	defer l.conn.SetWriteDeadline(time.Time{})
	moved, closed := l.srv.Move(ctx, drainBy, func(key netip.Addr, state []byte, client, backend *os.File) error {
		return l.conn.SendBody(ipc.Connection{Key: key, State: state}, client, backend)
	})
	l.log.Info("moved connections to the next generation", "slot", l.slot, "active", active,
		"moved", moved, "closed", closed, "took", time.Since(t0))
}

// lose handles the end of the lifeline (or a message that breaks the
// protocol): permits become local, and the worker drains on its own,
// within shutdown_timeout from now at most, as a graceful stop would.
func (l *loop) lose(err error) {
	if l.masterLost {
		return
	}
	l.masterLost = true
	l.leases.lose()
	if l.perIPLeases != nil {
		l.perIPLeases.lose()
	}
	if by := time.Now().Add(l.cfg.ShutdownTimeout); l.drainBy.IsZero() || by.Before(l.drainBy) {
		l.drainBy = by
		if l.cancelDrain != nil && !l.stopNow {
			l.armDeadline()
		}
	}
	attrs := []any{"slot", l.slot, "active", l.srv.Active(), "deadline", l.drainBy}
	if !errors.Is(err, io.EOF) {
		attrs = append(attrs, "err", err)
	}
	if l.phase == serving {
		l.log.Warn("master is gone; draining", attrs...)
	} else {
		l.log.Info("master is gone; still draining", attrs...)
	}
	switch l.phase {
	case serving:
		l.retire()
	case stopping:
		// Told already; the delay of the test switch no longer applies.
		if l.stopDelay != nil {
			l.stopDelay = nil
			l.closeListeners()
		}
	}
}

// pushStats sends the counters' delta since the last push, if any, and
// the pool backends' (pushBackendStats).
func (l *loop) pushStats() {
	l.pushBackendStats()
	cur := l.counters.Snapshot()
	d := cur.Sub(l.prev)
	if d == (stats.Snapshot{}) {
		return
	}
	if err := l.conn.SendBody(ipc.Stats{Delta: d}); err == nil {
		l.prev = cur
	}
}

// setProcs sets this worker's GOMAXPROCS to its share of the CPUs the
// runtime found, plus one for the event loop (procsFor), unless the
// operator set GOMAXPROCS in the environment. With one worker per CPU
// (workers: 0) each runs its goroutines on one thread, like an nginx
// worker: a Go runtime free to use every CPU in every worker spends the
// difference handing goroutines between threads (measured: ~18% more CPU
// per short connection; see README, Performance). The event loop holds
// the extra P while it waits for work (worker.Server.EventLoop), which
// is why it runs only with 2 or more.
func setProcs(cfg *config.Config) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(procsFor(runtime.GOMAXPROCS(0), workersOf(cfg)))
}

// procsFor is a worker's share of cpus among workers, rounded up (at
// least 1), plus one for the event loop.
func procsFor(cpus, workers int) int {
	w := max(workers, 1)
	return max(1, (cpus+w-1)/w) + 1
}

// workersOf is the number of workers cfg starts (workers: 0 is one per
// CPU, as the master counts them).
func workersOf(cfg *config.Config) int {
	if cfg.Workers > 0 {
		return cfg.Workers
	}
	return runtime.NumCPU()
}
