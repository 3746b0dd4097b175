// Package master runs sniproxy's master process: it holds every listening
// socket (through cloudflare/tableflip, so they outlive the process across
// an upgrade), starts one worker process per slot and hands each its
// sockets, restarts workers that die, grants connection permits from the
// global limit (package lease), owns the cumulative counters the workers
// push, and serves /metrics, /healthz and the control socket. It never
// proxies a connection itself.
package master

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/lease"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/ipc"
)

// Options configure a master.
type Options struct {
	// Config is the validated config.
	Config *config.Config
	// Log receives the master's logs; workers log to the same stderr.
	Log *slog.Logger
	// Signals delivers SIGHUP, SIGTERM and SIGINT.
	Signals <-chan os.Signal
	// Version is the build's version string.
	Version string
	// Executable is the binary workers are started from; "" means
	// /proc/self/exe: the very binary this master runs, even after a
	// package upgrade replaced the file on disk (a worker must speak its
	// master's protocol version).
	Executable string
	// ReadyTimeout bounds the wait for every worker to accept; 0 means 30s.
	ReadyTimeout time.Duration
	// ConfigPath is the file a reload reads ("" = the embedded default).
	ConfigPath string
	// LoadConfig loads the config for a reload; nil means config.Load.
	LoadConfig func(path string) (*config.Config, error)
	// UpgradeTimeout bounds a reload: a successor not ready by then is
	// killed and the reload fails; 0 means one minute.
	UpgradeTimeout time.Duration

	// Test-only switches, wrong on purpose, for the negative controls of
	// the e2e tests (they must produce failures, so that a zero means
	// something); and a hook to make a successor hang.

	// ReplaceDeadSockets makes the master shut down a dead worker's
	// reuseport sockets and bind new ones: queued connections are reset.
	ReplaceDeadSockets bool
	// FreshSockets makes the master bind new reuseport sockets instead of
	// inheriting its parent's, which are closed under their queues when
	// the parent's workers stop.
	FreshSockets bool
	// NoMigration makes a hurried generation close its connections
	// instead of handing them over (the policy before migration).
	NoMigration bool
	// HangBeforeReady, if it returns true, makes a successor hang instead
	// of signalling readiness.
	HangBeforeReady func() bool
}

// Crash policy: a worker that dies within crashWindow of its start crashed.
// Restarts back off from 0 to maxBackoff; more than crashBudget crashes
// within budgetWindow stop the master, so systemd can act.
const (
	crashWindow  = 5 * time.Second
	maxBackoff   = 5 * time.Second
	crashBudget  = 10
	budgetWindow = time.Minute
)

// ControlSocketPath returns the control socket path for cfg: the configured
// one, else sniproxy.sock in $RUNTIME_DIRECTORY (set by systemd), else in
// the temporary directory.
func ControlSocketPath(cfg *config.Config) string {
	if cfg.ControlSocket != "" {
		return cfg.ControlSocket
	}
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		return filepath.Join(d, "sniproxy.sock")
	}
	return filepath.Join(os.TempDir(), "sniproxy.sock")
}

// Master is a running master process. Create it with Run.
type Master struct {
	opts       Options
	cfg        *config.Config
	log        *slog.Logger
	exe        string
	upg        *tableflip.Upgrader
	socks      *socketSet
	pool       *lease.Pool
	n          int
	generation int
	start      time.Time
	events     chan *child // a child exited and its messages are drained

	reloads chan reloadRequest
	servers []*http.Server // metrics and control

	// parent is the handover to the previous generation while it drains;
	// nil for a first master or once the parent is gone.
	parent *handover
	// parentActive is the parent's live connections, as counted.
	parentActive int64
	// parentDone is closed once every message of the parent is applied.
	parentDone chan struct{}
	// successor is the handover to the next generation once upgraded.
	successor *handover
	// successorMig carries this generation's connections to the next
	// one when it hurries this one (see hurry); set with successor.
	successorMig *ipc.Conn
	// parentMigDone is closed once every connection the parent handed
	// over has been passed to a worker (or the parent sent none).
	parentMigDone chan struct{}
	// nextAdopter is the slot the next handed-over connection goes to.
	nextAdopter int
	// adoptMu orders handed-over connections against Drain: once stopAll
	// has set stopping under it, no worker gets one (it could arrive
	// after the worker's last read).
	adoptMu sync.Mutex
	// serving counts the serveChild loops still reading a worker, which
	// may pass connections on to the successor.
	serving sync.WaitGroup
	// reserveMu makes reading and sending the reserve one step.
	reserveMu sync.Mutex

	mu            sync.Mutex
	children      []*child // by slot; nil while a slot restarts
	totals        stats.Snapshot
	restarts      uint64
	slotRestarts  []uint64 // by slot
	reloadsOK     uint64
	reloadsFailed uint64
	nextHolder    int
	stopping      bool
	crashes       []time.Time
}

// reloadRequest asks the master's loop for a reload; the result comes back
// on reply.
type reloadRequest struct {
	reply chan reloadResult
}

// reloadResult is the outcome of a reload.
type reloadResult struct {
	PID        int    `json:"pid,omitempty"`
	Generation int    `json:"generation,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Run starts the master and its workers and serves until stopped by
// SIGTERM or SIGINT (graceful: workers drain for at most shutdown_timeout)
// or until the workers crash beyond the budget (an error).
func Run(opts Options) error {
	cfg := opts.Config
	m := &Master{
		opts:       opts,
		cfg:        cfg,
		log:        opts.Log,
		n:          cfg.Workers,
		generation: 1,
		start:      time.Now(),
		events:     make(chan *child, 16),
		pool:       lease.NewPool(cfg.MaxConnections),
		reloads:    make(chan reloadRequest),
	}
	if opts.LoadConfig == nil {
		m.opts.LoadConfig = func(path string) (*config.Config, error) { return config.Load(path, nil) }
	}
	if m.opts.UpgradeTimeout <= 0 {
		m.opts.UpgradeTimeout = time.Minute
	}
	if m.n <= 0 {
		m.n = runtime.NumCPU()
	}
	m.exe = opts.Executable
	if m.exe == "" {
		m.exe = "/proc/self/exe"
	}
	upg, err := tableflip.New(tableflip.Options{PIDFile: cfg.PIDFile, UpgradeTimeout: m.opts.UpgradeTimeout})
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	defer upg.Stop()
	m.upg = upg
	if err := m.takeHandover(); err != nil {
		return err
	}
	if m.parent != nil {
		defer m.parent.close()
	}

	suffix := ""
	if opts.FreshSockets {
		suffix = fmt.Sprintf("@%d", m.generation)
	}
	m.socks, err = openSockets(upg, cfg, m.n, suffix)
	if err != nil {
		return err
	}
	defer m.socks.close()

	defer m.closeServers()
	if cfg.Metrics.Enabled {
		ln, err := upg.Listen("tcp", cfg.Metrics.Address)
		if err != nil {
			return fmt.Errorf("master: metrics listener: %w", err)
		}
		col := stats.NewCollector(m.snapshot, m.process, opts.Version, runtime.Version())
		s := &http.Server{Handler: stats.Handler(col, m.healthy), ReadHeaderTimeout: 5 * time.Second}
		m.servers = append(m.servers, s)
		go s.Serve(ln)
	}
	ctlPath := ControlSocketPath(cfg)
	ctl, err := upg.ListenWithCallback("unix", ctlPath, listenControl)
	if err != nil {
		return fmt.Errorf("master: control socket %s: %w", ctlPath, err)
	}
	cs := &http.Server{Handler: m.controlHandler(), ReadHeaderTimeout: 5 * time.Second}
	m.servers = append(m.servers, cs)
	go cs.Serve(ctl)

	m.children = make([]*child, m.n)
	m.slotRestarts = make([]uint64, m.n)
	for slot := range m.n {
		if err := m.spawn(slot); err != nil {
			m.stopAll(time.Now())
			return err
		}
	}
	if err := m.waitReady(); err != nil {
		m.stopAll(time.Now())
		return err
	}
	if m.parent != nil {
		if opts.HangBeforeReady != nil && opts.HangBeforeReady() {
			m.log.Warn("test hook: hanging before ready")
			select {}
		}
		m.mu.Lock()
		m.reloadsOK++
		m.mu.Unlock()
		// The parent answers `sniproxy reload` with this.
		m.parent.send(handoverMsg{Ready: &readyInfo{PID: os.Getpid(), Generation: m.generation}})
	}
	// Ready writes the PID file, then tells the parent.
	if err := upg.Ready(); err != nil {
		m.stopAll(time.Now())
		return fmt.Errorf("master: %w", err)
	}
	if err := sdNotify(fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid())); err != nil {
		m.log.Warn("telling systemd we are ready failed", "err", err)
	}
	m.log.Info("sniproxy started", "version", opts.Version, "config", cfg.Source, "pid", os.Getpid(),
		"generation", m.generation, "workers", m.n, "listeners", m.socks.order, "control_socket", ctlPath)
	return m.loop()
}

// takeHandover picks up the parent's state when this master is an upgrade.
func (m *Master) takeHandover() error {
	f, err := m.upg.File(handoverName)
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	if f == nil {
		return nil
	}
	h, err := newHandover(f)
	if err != nil {
		return err
	}
	msg, err := h.recv()
	if err != nil || msg.State == nil {
		h.close()
		return fmt.Errorf("master: no state from the previous generation: %v", err)
	}
	st := msg.State
	m.parent = h
	m.generation = st.Generation + 1
	m.totals = st.Totals
	m.parentActive = st.Totals.Active
	m.restarts, m.reloadsOK, m.reloadsFailed = st.Restarts, st.ReloadsOK, st.ReloadsFailed
	m.pool.SetReserve(st.Reserve)
	m.parentDone = make(chan struct{})
	go m.readParent(h)
	m.parentMigDone = make(chan struct{})
	mf, err := m.upg.File(migrateName)
	if err != nil || mf == nil {
		// A parent of an older build: it has no connections to hand over.
		close(m.parentMigDone)
		return nil
	}
	mc, err := ipc.FileConn(mf)
	mf.Close()
	if err != nil {
		close(m.parentMigDone)
		m.log.Warn("previous generation's migration socket is unusable", "err", err)
		return nil
	}
	go m.readMigrations(mc)
	return nil
}

// readMigrations passes each connection the hurried parent hands over to
// one of this generation's workers, until the parent exits.
func (m *Master) readMigrations(mc *ipc.Conn) {
	defer close(m.parentMigDone)
	defer mc.Close()
	n := 0
	for {
		msg, err := mc.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				m.log.Warn("receiving connections from the previous generation failed", "err", err)
			}
			break
		}
		if _, err := ipc.Decode(msg); err != nil || msg.Type != ipc.TypeConnection {
			msg.CloseFiles()
			m.log.Warn("unexpected message on the migration socket", "type", msg.Type.String(), "err", err)
			continue
		}
		if m.adopt(msg) {
			n++
		}
		msg.CloseFiles()
	}
	if n > 0 {
		m.log.Info("took over the previous generation's connections", "connections", n)
	}
}

// adoptSendTimeout bounds handing one connection to a worker.
const adoptSendTimeout = 5 * time.Second

// adopt sends a handed-over connection to a ready worker, round robin; false
// if none took it (the connection is then closed).
func (m *Master) adopt(msg ipc.Message) bool {
	m.adoptMu.Lock()
	defer m.adoptMu.Unlock()
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		m.log.Warn("a connection from the previous generation came after this one began to stop; it is closed")
		return false
	}
	kids := append([]*child(nil), m.children...)
	start := m.nextAdopter
	m.nextAdopter++
	m.mu.Unlock()
	for i := range kids {
		c := kids[(start+i)%len(kids)]
		if c == nil || !c.isReady() {
			continue
		}
		// Bounded: adoptMu is held, and a Drain waits for it. A worker
		// that reads nothing for that long is broken: its IPC is closed,
		// so it drains and exits as on a lost master and is replaced, and
		// the next worker gets the connection.
		c.conn.SetWriteDeadline(time.Now().Add(adoptSendTimeout))
		err := c.conn.Send(msg)
		c.conn.SetWriteDeadline(time.Time{})
		if err == nil {
			return true
		}
		m.log.Error("a worker did not take a connection from the previous generation; cutting it off", "slot", c.slot, "pid", c.pid(), "err", err)
		c.conn.Close()
	}
	m.log.Warn("no worker could take over a connection from the previous generation; it is closed")
	return false
}

// readParent applies the draining parent's deltas until it exits; its
// connections still count against max_connections until they close.
func (m *Master) readParent(h *handover) {
	for {
		msg, err := h.recv()
		if err != nil {
			break
		}
		if msg.Delta != nil {
			m.mu.Lock()
			m.totals.Add(*msg.Delta)
			m.parentActive += msg.Delta.Active
			m.mu.Unlock()
		}
		if msg.Reserve != nil {
			m.pool.SetReserve(*msg.Reserve)
		}
	}
	// The parent is gone, and its connections with it.
	m.mu.Lock()
	m.totals.Active -= m.parentActive
	m.parentActive = 0
	m.mu.Unlock()
	m.pool.SetReserve(0)
	close(m.parentDone)
	m.log.Info("previous generation exited")
}

// listenControl binds the control socket. A socket file left by a master
// that died (kill -9) would block the bind: when nothing answers on it, it
// is removed first. A live master's socket is never touched.
func listenControl(network, path string) (net.Listener, error) {
	ln, err := net.Listen(network, path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return ln, err
	}
	c, derr := net.DialTimeout(network, path, time.Second)
	if derr == nil {
		c.Close()
		return nil, fmt.Errorf("%w (another master is running there)", err)
	}
	if !errors.Is(derr, syscall.ECONNREFUSED) {
		return nil, err
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("%w; removing the stale socket: %w", err, rerr)
	}
	return net.Listen(network, path)
}

// closeServers closes the metrics and control servers, letting requests
// under way finish (a `sniproxy reload` waits for its answer) for at most
// five seconds.
func (m *Master) closeServers() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range m.servers {
		if s.Shutdown(ctx) != nil {
			s.Close()
		}
	}
	m.servers = nil
}

// spawn starts the worker of slot.
func (m *Master) spawn(slot int) error {
	m.mu.Lock()
	m.nextHolder++
	holder := m.nextHolder
	m.mu.Unlock()
	c, err := startChild(m.exe, slot, m.generation, holder, m.socks.forSlot(slot, m.n), m.cfg.Log)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.children[slot] = c
	m.mu.Unlock()
	m.log.Debug("worker started", "slot", slot, "pid", c.pid())
	m.serving.Add(1)
	go m.serveChild(c)
	return nil
}

// childList returns a copy of the children by slot (nil where a slot
// restarts).
func (m *Master) childList() []*child {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]*child(nil), m.children...)
}

// waitReady waits until every worker has said Ready.
func (m *Master) waitReady() error {
	timeout := m.opts.ReadyTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	deadline := time.After(timeout)
	kids := m.childList()
	for _, c := range kids {
		select {
		case <-c.ready:
		case <-c.exited:
			return fmt.Errorf("master: worker %d (pid %d) exited before it was ready: %s", c.slot, c.pid(), c.exitStatus())
		case <-deadline:
			return fmt.Errorf("master: worker %d not ready within %v", c.slot, timeout)
		}
	}
	return nil
}

// serveChild handles one worker's messages until its connection ends, then
// reports the child's exit.
func (m *Master) serveChild(c *child) {
	defer func() {
		<-c.exited
		m.events <- c
	}()
	defer m.serving.Done() // first: the loop has ended
	cfgYAML, err := m.cfg.YAML()
	if err != nil {
		m.log.Error("cannot encode config for workers", "err", err)
		c.cmd.Process.Kill()
		return
	}
	for {
		msg, err := c.conn.Recv()
		if err != nil {
			c.conn.Close()
			return
		}
		body, err := ipc.Decode(msg)
		if err != nil {
			msg.CloseFiles()
			m.log.Error("bad message from worker; killing it", "slot", c.slot, "pid", c.pid(), "err", err)
			c.cmd.Process.Kill()
			continue
		}
		if msg.Type == ipc.TypeConnection {
			m.passOn(msg)
		}
		msg.CloseFiles()
		switch b := body.(type) {
		case ipc.Hello:
			if err := c.conn.SendBody(ipc.Config{YAML: cfgYAML}); err != nil {
				m.log.Warn("sending config to worker failed", "slot", c.slot, "err", err)
			}
		case ipc.Stopped:
			c.stoppedOnce.Do(func() { close(c.stopped) })
		case ipc.Ready:
			close(c.ready)
		case ipc.LeaseRequest:
			n := m.pool.Grant(c.holder, b.Want)
			if n == 0 && b.Want > 0 && b.Urgent && m.revokeFor(c) {
				// Siblings give their spares back; the grant waits a
				// moment for them (off this loop, which must read on).
				go func() {
					n := m.grantAfterRevoke(c.holder, b.Want)
					select {
					case <-c.exited:
						// reap may have dropped its permits already.
						if n > 0 {
							m.pool.Return(c.holder, n)
						}
						return
					default:
					}
					if n > 0 {
						m.sendReserve()
					}
					c.conn.SendBody(ipc.LeaseGrant{N: n})
				}()
				continue
			}
			if n > 0 {
				// The successor, if any, learns of it before the worker
				// can use it.
				m.sendReserve()
			}
			c.conn.SendBody(ipc.LeaseGrant{N: n})
		case ipc.LeaseReturn:
			if err := m.pool.Return(c.holder, b.N); err != nil {
				m.log.Error("worker returned permits it does not hold", "slot", c.slot, "err", err)
			}
			m.sendReserve()
		case ipc.Stats:
			m.mu.Lock()
			m.totals.Add(b.Delta)
			succ := m.successor
			m.mu.Unlock()
			if succ != nil {
				d := b.Delta
				succ.send(handoverMsg{Delta: &d})
			}
			c.mu.Lock()
			c.totals.Add(b.Delta)
			c.mu.Unlock()
		case ipc.Pong, ipc.Connection:
		default:
			m.log.Warn("unexpected message from worker", "slot", c.slot, "type", msg.Type.String())
		}
	}
}

// reap accounts for a worker that exited: its permits and its open
// connections are gone with it.
func (m *Master) reap(c *child) {
	freed := m.pool.Drop(c.holder)
	m.sendReserve()
	c.mu.Lock()
	lost := c.totals.Active
	c.mu.Unlock()
	m.mu.Lock()
	m.totals.Active -= lost
	if m.children[c.slot] == c {
		m.children[c.slot] = nil
	}
	succ := m.successor
	m.mu.Unlock()
	if succ != nil && lost != 0 {
		succ.send(handoverMsg{Delta: &stats.Snapshot{Active: -lost}})
	}
	if m.opts.ReplaceDeadSockets && !m.isStopping() {
		if err := m.socks.rebind(m.upg, c.slot, m.n); err != nil {
			m.log.Error("negative control: rebinding sockets failed", "err", err)
		}
	}
	if lost != 0 || freed != 0 {
		m.log.Debug("worker accounted", "slot", c.slot, "connections_lost", lost, "permits_freed", freed)
	}
}

// revokeWait bounds how long a request that found the pool dry waits for
// the spares revokeFor asked back.
const revokeWait = 50 * time.Millisecond

// revokeFor asks every other ready worker holding permits to give its
// spares back, and reports whether it asked any. A worker's spares are
// invisible to its siblings: without this, one worker could refuse
// connections at the limit while another sits on permits it does not use.
// (Which ones are spares the master cannot tell: its connection counts are
// up to a stats interval old.)
func (m *Master) revokeFor(c *child) bool {
	_, held := m.pool.Held()
	kids := m.childList()
	asked := false
	for _, k := range kids {
		if k == nil || k == c || !k.isReady() || held[k.holder] == 0 {
			continue
		}
		if k.conn.SendBody(ipc.Revoke{}) == nil {
			asked = true
		}
	}
	return asked
}

// grantAfterRevoke retries a grant until permits come back or revokeWait
// passes.
func (m *Master) grantAfterRevoke(holder, want int) int {
	deadline := time.Now().Add(revokeWait)
	for {
		if n := m.pool.Grant(holder, want); n > 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond)
	}
}

// passOn sends a connection a worker handed over (after a hurry) to the
// successor, which gives it to one of its workers.
func (m *Master) passOn(msg ipc.Message) {
	m.mu.Lock()
	mig := m.successorMig
	m.mu.Unlock()
	err := errors.New("no successor")
	if mig != nil {
		err = mig.Send(msg)
	}
	if err != nil {
		m.log.Warn("handing a connection to the next generation failed; it is closed", "err", err)
	}
}

// sendReserve tells the successor, if any, how many permits this
// generation still holds. Reading the count and sending it is one step
// (reserveMu): two callers must not send their readings out of order, or
// the successor would be left with a count already too low.
func (m *Master) sendReserve() {
	m.mu.Lock()
	succ := m.successor
	m.mu.Unlock()
	if succ != nil {
		m.reserveMu.Lock()
		defer m.reserveMu.Unlock()
		held, _ := m.pool.Held()
		succ.send(handoverMsg{Reserve: &held})
	}
}

// loop runs until stopped, or until a reload succeeded and this
// generation has drained.
func (m *Master) loop() error {
	respawn := make(chan int, m.n)
	upgraded := make(chan upgradeOutcome, 1)
	var pending []reloadRequest // waiting for the reload under way
	reload := func(req *reloadRequest) {
		if req != nil {
			pending = append(pending, *req)
		}
		if len(pending) > 1 || (req == nil && len(pending) > 0) {
			return // one is under way; its result answers this one too
		}
		if err := m.startReload(upgraded); err != nil {
			m.failReload(err)
			for _, p := range pending {
				p.reply <- reloadResult{Error: err.Error()}
			}
			pending = nil
		}
	}
	for {
		select {
		case sig := <-m.opts.Signals:
			switch sig {
			case syscall.SIGHUP:
				m.log.Info("SIGHUP: reloading")
				if len(pending) == 0 {
					// A signal has nobody to answer: a placeholder.
					reload(&reloadRequest{reply: make(chan reloadResult, 1)})
				}
			default:
				m.log.Info("stopping: draining workers", "signal", sig.String(), "active", m.snapshot().Active, "shutdown_timeout", m.cfg.ShutdownTimeout)
				sdNotify("STOPPING=1")
				m.stopAll(time.Now().Add(m.cfg.ShutdownTimeout))
				m.log.Info("sniproxy stopped")
				return nil
			}
		case req := <-m.reloads:
			reload(&req)
		case out := <-upgraded:
			res := reloadResult{PID: out.ready.PID, Generation: out.ready.Generation}
			if out.err != nil {
				m.failReload(out.err)
				res = reloadResult{Error: out.err.Error()}
			}
			var kids []*child
			deadline := time.Now().Add(m.cfg.ShutdownTimeout)
			if out.err == nil {
				// The workers stop accepting before `sniproxy reload`
				// returns: a client that connects after it reaches the
				// new generation, whose permits do not yet know of a
				// connection an old worker would take.
				kids = m.beginStop(deadline)
			}
			for _, p := range pending {
				p.reply <- res
			}
			pending = nil
			if out.err == nil {
				return m.drainAsParent(out, kids, deadline)
			}
		case c := <-m.events:
			m.reap(c)
			delay, err := m.crashed(c)
			if err != nil {
				m.stopAll(time.Now())
				return err
			}
			m.log.Warn("worker died; restarting", "slot", c.slot, "pid", c.pid(), "status", c.exitStatus(), "restart_in", delay)
			m.mu.Lock()
			m.restarts++
			m.slotRestarts[c.slot]++
			m.mu.Unlock()
			slot := c.slot
			time.AfterFunc(delay, func() { respawn <- slot })
		case slot := <-respawn:
			if err := m.spawn(slot); err != nil {
				m.log.Error("restarting worker failed", "slot", slot, "err", err)
				time.AfterFunc(maxBackoff, func() { respawn <- slot })
			}
		}
	}
}

// upgradeOutcome is what a reload attempt came to.
type upgradeOutcome struct {
	err   error
	ready readyInfo
	h     *handover
}

// startReload validates the config on disk and starts the upgrade in the
// background; the outcome arrives on done. A reload while the previous
// generation still drains first hurries it (see hurry): its connections
// move to this generation's workers and it exits, since tableflip cannot
// start a new successor while this master's parent lives, and there are
// never more than two generations.
func (m *Master) startReload(done chan<- upgradeOutcome) error {
	cfg, err := m.opts.LoadConfig(m.opts.ConfigPath)
	if err != nil {
		return fmt.Errorf("new config is invalid, nothing changed: %w", err)
	}
	m.log.Info("new config is valid; starting the next generation", "config", cfg.Source)
	parent := m.parent
	go func() {
		out := upgradeOutcome{}
		defer func() { done <- out }()
		if parent != nil {
			// Hurry the draining parent: it closes what it still has.
			m.log.Info("previous generation still draining: hurrying it before upgrading")
			parent.send(handoverMsg{Hurry: true})
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			err := m.upg.WaitForParent(ctx)
			cancel()
			if err != nil {
				out.err = fmt.Errorf("previous generation did not exit: %w", err)
				return
			}
			// Its last counts must be in the totals handed on, and the
			// connections it handed over must be with our workers before
			// they are told to drain.
			select {
			case <-m.parentDone:
			case <-time.After(5 * time.Second):
			}
			// The parent has exited, so the migration socket ends
			// (EOF) as soon as what it sent is read.
			select {
			case <-m.parentMigDone:
			case <-time.After(30 * time.Second):
				m.log.Error("connections from the previous generation still arriving after 30s; upgrading anyway")
			}
		}
		h, err := newHandoverPair(m.upg)
		if err != nil {
			out.err = err
			return
		}
		mig, err := newMigratePair(m.upg)
		if err != nil {
			h.close()
			out.err = err
			return
		}
		// From the snapshot on, every delta goes to the successor too:
		// under m.mu, so none is counted twice or lost, and the State goes
		// first.
		m.mu.Lock()
		held, _ := m.pool.Held()
		st := handoverState{Generation: m.generation, Totals: m.totals, Restarts: m.restarts, ReloadsOK: m.reloadsOK, ReloadsFailed: m.reloadsFailed, Reserve: held}
		err = h.send(handoverMsg{State: &st})
		if err == nil {
			m.successor, m.successorMig = h, mig
		}
		m.mu.Unlock()
		if err != nil {
			h.close()
			mig.Close()
			out.err = err
			return
		}
		// The successor's Ready message arrives before Upgrade returns.
		readyc := make(chan readyInfo, 1)
		go func() {
			for {
				msg, err := h.recv()
				if err != nil {
					return
				}
				if msg.Ready != nil {
					readyc <- *msg.Ready
				}
				if msg.Hurry {
					m.hurry()
				}
			}
		}()
		err = m.upg.Upgrade()
		for i := 0; parent != nil && err != nil && err.Error() == "parent hasn't exited" && i < 100; i++ {
			// tableflip learns of the parent's exit in its own goroutine,
			// a moment after WaitForParent returns (it selects between
			// that and our request at random): ask again.
			time.Sleep(5 * time.Millisecond)
			err = m.upg.Upgrade()
		}
		if err != nil {
			m.mu.Lock()
			m.successor, m.successorMig = nil, nil
			m.mu.Unlock()
			h.close()
			mig.Close()
			out.err = fmt.Errorf("new generation failed, old one keeps serving: %w", err)
			return
		}
		select {
		case out.ready = <-readyc:
		case <-time.After(5 * time.Second):
		}
		out.h = h
	}()
	return nil
}

// failReload records a failed reload.
func (m *Master) failReload(err error) {
	m.mu.Lock()
	m.reloadsFailed++
	m.mu.Unlock()
	m.log.Error("reload failed", "err", err)
}

// hurry runs when the next generation must upgrade again while this one
// still drains: tableflip allows no upgrade while a parent lives, and there
// are never more than two generations. The workers hand their proxied
// connections over (they go to the next generation's workers through
// successorMig) and exit; the rest are closed.
func (m *Master) hurry() {
	// After every connection adopt is passing on: a Connection frame
	// that reached a worker after its Migrate would be closed.
	m.adoptMu.Lock()
	m.mu.Lock()
	m.stopping = true
	kids := append([]*child(nil), m.children...)
	mig := m.successorMig
	m.mu.Unlock()
	m.adoptMu.Unlock()
	var body ipc.Body = ipc.Migrate{}
	if mig == nil || m.opts.NoMigration {
		body = ipc.Stop{}
	}
	m.log.Info("next generation upgrades again: handing the remaining connections over", "active", m.snapshot().Active)
	for _, c := range kids {
		if c != nil {
			c.conn.SendBody(body)
		}
	}
}

// drainAsParent runs after a successful upgrade: the new generation
// serves; this one stops accepting, forwards its counts while its
// connections drain (at most shutdown_timeout), and exits.
func (m *Master) drainAsParent(out upgradeOutcome, kids []*child, deadline time.Time) error {
	m.log.Info("new generation ready; draining this one", "new_pid", out.ready.PID, "new_generation", out.ready.Generation,
		"active", m.snapshot().Active, "shutdown_timeout", m.cfg.ShutdownTimeout)
	// The new generation serves metrics and the control socket now; they
	// share the listening sockets, so closing ours refuses nobody.
	m.closeServers()
	m.finishStop(kids, deadline)
	out.h.close()
	// Every connection a worker handed over must be passed on before the
	// migration socket closes.
	served := make(chan struct{})
	go func() {
		m.serving.Wait()
		close(served)
	}()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		m.log.Error("workers' messages still being read 10s after they exited")
	}
	m.mu.Lock()
	if m.successorMig != nil {
		m.successorMig.Close()
	}
	m.mu.Unlock()
	m.log.Info("generation drained; exiting", "generation", m.generation)
	return nil
}

// crashed records a worker death and returns how long to wait before the
// restart, or an error when crashes exceed the budget.
func (m *Master) crashed(c *child) (time.Duration, error) {
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if now.Sub(c.started) >= crashWindow {
		return 0, nil
	}
	recent := m.crashes[:0]
	for _, t := range m.crashes {
		if now.Sub(t) < budgetWindow {
			recent = append(recent, t)
		}
	}
	m.crashes = append(recent, now)
	if len(m.crashes) > crashBudget {
		return 0, fmt.Errorf("master: workers crashed %d times within %v (last: slot %d, %s); giving up", len(m.crashes), budgetWindow, c.slot, c.exitStatus())
	}
	// 0, 100ms, 200ms, 400ms ... up to maxBackoff.
	n := len(m.crashes) - 1
	if n == 0 {
		return 0, nil
	}
	return min(100*time.Millisecond<<(n-1), maxBackoff), nil
}

// stopAll tells every worker to drain until deadline, waits for them (a
// second signal makes them stop at once), and kills any left a few seconds
// after the deadline.
func (m *Master) stopAll(deadline time.Time) {
	m.finishStop(m.beginStop(deadline), deadline)
}

// beginStop tells every worker to drain until deadline and returns them.
func (m *Master) beginStop(deadline time.Time) []*child {
	m.adoptMu.Lock()
	m.mu.Lock()
	m.stopping = true
	var kids []*child
	for _, c := range m.children {
		if c != nil {
			kids = append(kids, c)
		}
	}
	m.mu.Unlock()
	m.adoptMu.Unlock()
	for _, c := range kids {
		c.conn.SendBody(ipc.Drain{Deadline: deadline})
	}
	// Until each has closed its listeners (or died), briefly: after a
	// reload is answered, only the new generation accepts.
	wait := time.NewTimer(stopAckTimeout)
	defer wait.Stop()
	for _, c := range kids {
		select {
		case <-c.stopped:
		case <-c.exited:
		case <-wait.C:
			m.log.Warn("workers slow to stop accepting", "slot", c.slot, "pid", c.pid())
			return kids
		}
	}
	return kids
}

// stopAckTimeout bounds the wait for workers told to drain to stop
// accepting.
const stopAckTimeout = 2 * time.Second

// finishStop closes this master's sockets and waits for the workers
// beginStop told to drain.
func (m *Master) finishStop(kids []*child, deadline time.Time) {
	// Stop listening for good: with the master's and tableflip's copies
	// closed, the sockets close once the workers close theirs, so new
	// clients are refused rather than queued where nobody will accept.
	m.socks.close()
	m.upg.Stop()
	hard := time.NewTimer(time.Until(deadline) + 5*time.Second)
	defer hard.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for _, c := range kids {
	wait:
		for {
			select {
			case <-c.exited:
				break wait
			case sig := <-m.opts.Signals:
				if sig == syscall.SIGHUP {
					continue
				}
				m.log.Warn("second signal: stopping workers now", "signal", sig.String())
				for _, k := range kids {
					k.conn.SendBody(ipc.Stop{})
				}
			case <-tick.C:
				m.log.Info("draining", "active", m.snapshot().Active)
			case <-hard.C:
				m.log.Error("workers did not exit after the drain deadline; killing them")
				for _, k := range kids {
					k.cmd.Process.Kill()
				}
			}
		}
	}
	// Drain the exit events so the final counts are in the totals.
	for range kids {
		select {
		case c := <-m.events:
			m.reap(c)
		case <-time.After(5 * time.Second):
		}
	}
}

func (m *Master) isStopping() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopping
}

// snapshot returns the cumulative totals.
func (m *Master) snapshot() stats.Snapshot {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.totals
}

// process returns the master-level values for /metrics.
func (m *Master) process() stats.Process {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := stats.Process{WorkerRestarts: m.restarts, ReloadsOK: m.reloadsOK, ReloadsFailed: m.reloadsFailed, WorkerActive: make([]int64, len(m.children))}
	for i, c := range m.children {
		if c != nil && c.isReady() {
			p.Workers++
			p.WorkerActive[i] = c.active()
		}
	}
	return p
}

// healthy reports whether every worker slot has a ready worker.
func (m *Master) healthy() bool {
	p := m.process()
	return p.Workers == m.n
}
