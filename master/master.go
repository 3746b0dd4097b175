// Package master runs sniproxy's master process: it holds every listening
// socket (through cloudflare/tableflip, so they outlive the process across
// an upgrade), starts one worker process per slot and hands each its
// sockets, restarts workers that die, grants connection permits from the
// global limit (package lease), owns the cumulative counters the workers
// push, and serves /metrics, /healthz and the control socket. It never
// proxies a connection itself.
package master

import (
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/lease"
	"github.com/sniproxy/sniproxy/stats"
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
	// ReplaceDeadSockets makes the master close a dead worker's reuseport
	// sockets and bind new ones: wrong on purpose (queued connections are
	// reset), for the tests' negative control only.
	ReplaceDeadSockets bool
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

	mu           sync.Mutex
	children     []*child // by slot; nil while a slot restarts
	totals       stats.Snapshot
	restarts     uint64
	slotRestarts []uint64 // by slot
	nextHolder   int
	stopping     bool
	crashes      []time.Time
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
	}
	if m.n <= 0 {
		m.n = runtime.NumCPU()
	}
	m.exe = opts.Executable
	if m.exe == "" {
		m.exe = "/proc/self/exe"
	}
	upg, err := tableflip.New(tableflip.Options{PIDFile: cfg.PIDFile, UpgradeTimeout: time.Minute})
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	defer upg.Stop()
	m.upg = upg

	m.socks, err = openSockets(upg, cfg, m.n)
	if err != nil {
		return err
	}
	defer m.socks.close()

	var servers []*http.Server
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	if cfg.Metrics.Enabled {
		ln, err := upg.Listen("tcp", cfg.Metrics.Address)
		if err != nil {
			return fmt.Errorf("master: metrics listener: %w", err)
		}
		col := stats.NewCollector(m.snapshot, m.process, opts.Version, runtime.Version())
		s := &http.Server{Handler: stats.Handler(col, m.healthy), ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, s)
		go s.Serve(ln)
	}
	ctlPath := ControlSocketPath(cfg)
	ctl, err := upg.Listen("unix", ctlPath)
	if err != nil {
		return fmt.Errorf("master: control socket %s: %w", ctlPath, err)
	}
	cs := &http.Server{Handler: m.controlHandler(), ReadHeaderTimeout: 5 * time.Second}
	servers = append(servers, cs)
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
	if err := upg.Ready(); err != nil {
		m.stopAll(time.Now())
		return fmt.Errorf("master: %w", err)
	}
	m.log.Info("sniproxy started", "version", opts.Version, "config", cfg.Source, "pid", os.Getpid(),
		"workers", m.n, "listeners", m.socks.order, "control_socket", ctlPath)
	return m.loop()
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
	go m.serveChild(c)
	return nil
}

// waitReady waits until every worker has said Ready.
func (m *Master) waitReady() error {
	timeout := m.opts.ReadyTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	deadline := time.After(timeout)
	m.mu.Lock()
	kids := append([]*child(nil), m.children...)
	m.mu.Unlock()
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
		msg.CloseFiles()
		if err != nil {
			m.log.Error("bad message from worker; killing it", "slot", c.slot, "pid", c.pid(), "err", err)
			c.cmd.Process.Kill()
			continue
		}
		switch b := body.(type) {
		case ipc.Hello:
			if err := c.conn.SendBody(ipc.Config{YAML: cfgYAML}); err != nil {
				m.log.Warn("sending config to worker failed", "slot", c.slot, "err", err)
			}
		case ipc.Ready:
			close(c.ready)
		case ipc.LeaseRequest:
			n := m.pool.Grant(c.holder, b.Want)
			c.conn.SendBody(ipc.LeaseGrant{N: n})
		case ipc.LeaseReturn:
			if err := m.pool.Return(c.holder, b.N); err != nil {
				m.log.Error("worker returned permits it does not hold", "slot", c.slot, "err", err)
			}
		case ipc.Stats:
			m.mu.Lock()
			m.totals.Add(b.Delta)
			m.mu.Unlock()
			c.mu.Lock()
			c.totals.Add(b.Delta)
			c.mu.Unlock()
		case ipc.Pong:
		default:
			m.log.Warn("unexpected message from worker", "slot", c.slot, "type", msg.Type.String())
		}
	}
}

// reap accounts for a worker that exited: its permits and its open
// connections are gone with it.
func (m *Master) reap(c *child) {
	freed := m.pool.Drop(c.holder)
	c.mu.Lock()
	lost := c.totals.Active
	c.mu.Unlock()
	m.mu.Lock()
	m.totals.Active -= lost
	if m.children[c.slot] == c {
		m.children[c.slot] = nil
	}
	m.mu.Unlock()
	if m.opts.ReplaceDeadSockets && !m.isStopping() {
		if err := m.socks.rebind(m.upg, c.slot, m.n); err != nil {
			m.log.Error("negative control: rebinding sockets failed", "err", err)
		}
	}
	if lost != 0 || freed != 0 {
		m.log.Debug("worker accounted", "slot", c.slot, "connections_lost", lost, "permits_freed", freed)
	}
}

// loop runs until stopped.
func (m *Master) loop() error {
	var respawn = make(chan int, m.n)
	for {
		select {
		case sig := <-m.opts.Signals:
			switch sig {
			case syscall.SIGHUP:
				m.log.Warn("SIGHUP received: reload is not available in this build; restart to apply a new config")
			default:
				m.log.Info("stopping: draining workers", "signal", sig.String(), "active", m.snapshot().Active, "shutdown_timeout", m.cfg.ShutdownTimeout)
				m.stopAll(time.Now().Add(m.cfg.ShutdownTimeout))
				m.log.Info("sniproxy stopped")
				return nil
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
	m.mu.Lock()
	m.stopping = true
	var kids []*child
	for _, c := range m.children {
		if c != nil {
			kids = append(kids, c)
		}
	}
	m.mu.Unlock()
	for _, c := range kids {
		c.conn.SendBody(ipc.Drain{Deadline: deadline})
	}
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
	p := stats.Process{WorkerRestarts: m.restarts, WorkerActive: make([]int64, len(m.children))}
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
