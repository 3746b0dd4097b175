package master

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/peercred"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/ipc"
)

// defaultReadyTimeout is Options.ReadyTimeout's default.
const defaultReadyTimeout = 30 * time.Second

// readersWait bounds how long a retired generation waits, after its
// workers exited, for their last messages (connections to move on) to be
// read.
const readersWait = 10 * time.Second

// Master is a running master process: the parts, composed. Create it with
// Run.
type Master struct {
	opts  Options
	cfg   *config.Config
	log   *slog.Logger
	exe   string
	upg   *tableflip.Upgrader
	socks *socketSet
	start time.Time
	// reloads carries the control socket's reload requests to the loop.
	reloads chan reloadRequest
	// reloadBegan is when the reload under way began (the loop's).
	reloadBegan time.Time
	// stopping is set when a stop begins: /healthz answers 503 from then
	// on, so that load balancers stop sending before the ports close.
	stopping atomic.Bool
	// generation is this master's generation once known (after
	// inherit), for the generation attribute of its log lines.
	generation atomic.Int64

	// workerCred is who the workers run as (config user/group); nil:
	// as the master.
	workerCred *syscall.Credential

	sup        *supervisor
	broker     *broker
	perip      *perIP
	counters   *counters
	relay      *relay
	succession *succession
	shutdown   *shutdown
	health     *healthPart
	endpoints  endpoints
}

// Run starts the master and its workers and serves until stopped by
// SIGTERM or SIGINT (graceful: workers drain for at most shutdown_timeout)
// or until the workers crash beyond the budget (an error).
func Run(opts Options) error {
	opts = withDefaults(opts)
	upg, err := tableflip.New(tableflip.Options{PIDFile: opts.Config.PIDFile, UpgradeTimeout: opts.UpgradeTimeout})
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	defer upg.Stop()
	m, err := newMaster(opts, upg)
	if err != nil {
		return err
	}
	if err := m.succession.inherit(); err != nil {
		return err
	}
	m.generation.Store(int64(m.succession.generation))
	defer m.succession.close()
	defer m.removePIDFile()
	m.health.inherit(m.succession.inherited)
	m.health.start()
	defer m.health.stop()
	suffix := ""
	if opts.FreshSockets {
		suffix = fmt.Sprintf("@%d", m.succession.generation)
	}
	// A successor shares its predecessor's ports by design; a first
	// master must not join another instance's.
	exclusive := !opts.SharePorts && m.succession.predecessor == nil
	m.socks, err = openSockets(upg, m.succession.takeSockets(), m.cfg, m.sup.n, suffix, exclusive)
	if err != nil {
		return err
	}
	defer m.socks.close()
	m.succession.socks = m.socks
	defer m.endpoints.close()
	ctlPath, err := m.serveEndpoints()
	if err != nil {
		return err
	}
	sampling := make(chan struct{})
	defer close(sampling)
	go m.sampleEvery(status.SampleInterval, sampling)
	go m.perip.sweepEvery(perIPSweep, sampling)
	if err := m.startWorkers(); err != nil {
		return err
	}
	if err := m.ready(ctlPath); err != nil {
		return err
	}
	return m.loop()
}

// withDefaults fills in the defaults of opts.
func withDefaults(opts Options) Options {
	if opts.LoadConfig == nil {
		opts.LoadConfig = func(path string) (*config.Config, error) { return config.Load(path, nil) }
	}
	if opts.UpgradeTimeout <= 0 {
		opts.UpgradeTimeout = time.Minute
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = defaultReadyTimeout
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Executable == "" {
		opts.Executable = "/proc/self/exe"
	}
	return opts
}

// newMaster composes the parts.
func newMaster(opts Options, upg *tableflip.Upgrader) (*Master, error) {
	m := &Master{opts: opts, cfg: opts.Config, exe: opts.Executable, upg: upg, start: time.Now(),
		reloads: make(chan reloadRequest)}
	cred, err := workerCredential(opts.Config, os.Geteuid())
	if err != nil {
		return nil, err
	}
	m.workerCred = cred
	m.log = slog.New(&generationHandler{Handler: opts.Log.With("pid", os.Getpid()).Handler(), gen: &m.generation})
	if err := m.compose(upg, m.startWorker, func() { m.socks.close(); m.upg.Stop() }); err != nil {
		return nil, err
	}
	m.shutdown.reopenLogs = m.reopenLogs
	return m, nil
}

// generationHandler adds the master's generation to every line, once it
// is known: the handler is made before the generation is (a successor
// learns it from its predecessor).
type generationHandler struct {
	slog.Handler
	gen *atomic.Int64
}

// Handle implements slog.Handler.
func (h *generationHandler) Handle(ctx context.Context, r slog.Record) error {
	if g := h.gen.Load(); g > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int64("generation", g))
	}
	return h.Handler.Handle(ctx, r)
}

// WithAttrs implements slog.Handler.
func (h *generationHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &generationHandler{Handler: h.Handler.WithAttrs(as), gen: h.gen}
}

// WithGroup implements slog.Handler.
func (h *generationHandler) WithGroup(name string) slog.Handler {
	return &generationHandler{Handler: h.Handler.WithGroup(name), gen: h.gen}
}

// removePIDFile removes the PID file when it names this master: on a
// stop, not after a reload (the successor owns the file then).
func (m *Master) removePIDFile() {
	path := m.cfg.PIDFile
	if path == "" {
		return
	}
	b, err := os.ReadFile(path)
	if err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		return
	}
	if err := os.Remove(path); err != nil {
		m.log.Warn("removing the PID file failed", "pid_file", path, "err", err)
	}
}

// reopenLogs reopens the log files (SIGUSR1, after logrotate renamed
// them) and hands the new ones to the workers.
func (m *Master) reopenLogs() {
	if m.opts.Logs == nil {
		m.log.Info("SIGUSR1: no log files to reopen (logging to stderr)")
		return
	}
	if err := m.opts.Logs.Reopen(); err != nil {
		m.log.Error("SIGUSR1: reopening the log files failed; still writing to the old ones", "err", err)
	}
	kids := m.sup.list()
	for _, c := range kids {
		m.sendLogFiles(c)
	}
	m.log.Info("SIGUSR1: log files reopened", "file", m.cfg.Log.File, "access_file", m.cfg.Log.AccessFile, "workers", len(kids))
}

// sendLogFiles gives worker c the reopened log files. It sends nothing
// when every line goes to stderr. (A worker starts with them: see
// startWorker.)
func (m *Master) sendLogFiles(c *child) {
	if m.opts.Logs == nil {
		return
	}
	var body ipc.LogFiles
	var files []*os.File
	if m.opts.Logs.Main.Path() != "" {
		body.Main = true
		files = append(files, m.opts.Logs.Main.File())
	}
	if m.opts.Logs.AccessOut != m.opts.Logs.Main && m.opts.Logs.AccessOut.Path() != "" {
		body.Access = true
		files = append(files, m.opts.Logs.AccessOut.File())
	}
	if len(files) == 0 {
		return
	}
	if err := c.conn.SendBody(body, files...); err != nil {
		m.log.Warn("sending the log files to a worker failed", "slot", c.slot, "err", err)
	}
}

// compose makes the parts over flip (tableflip's Upgrader), starting
// workers with start; closeSockets closes the listening sockets when the
// workers retire.
func (m *Master) compose(flip flipper, start func(slot, id int) (*child, error), closeSockets func()) error {
	cfgYAML, err := m.cfg.YAML()
	if err != nil {
		return fmt.Errorf("master: encoding the config for workers: %w", err)
	}
	n := m.cfg.Workers
	if n <= 0 {
		n = runtime.NumCPU()
	}
	m.counters = &counters{}
	m.sup = newSupervisor(m.log, n, start, cfgYAML, m.handleWorker)
	m.broker = newBroker(m.log, m.cfg.MaxConnections, m.sup.list)
	m.perip = newPerIP(m.log, m.cfg)
	m.relay = newRelay(m.log, m.sup.list, m.broker)
	m.relay.clients = m.perip
	m.succession = newSuccession(m.log, flip, m.counters, m.broker, m.relay, m.sup, m.opts.NoMove)
	m.health = newHealthPart(m.log, m.cfg, m.sup.list)
	m.health.succession = m.counters.withSuccessor
	m.succession.health = m.health
	m.sup.welcome = m.health.welcome
	m.counters.fill = m.health.fill
	m.succession.perip = m.perip
	m.shutdown = &shutdown{log: m.log, sup: m.sup, relay: m.relay, signals: m.opts.Signals,
		closeSockets: closeSockets,
		active:       func() int64 { return m.counters.snapshot().Active },
		reap:         m.reap}
	return nil
}

// startWorker starts the worker process of slot under worker id.
func (m *Master) startWorker(slot, id int) (*child, error) {
	// The worker's stderr is the main log file; the access file, when
	// there is one, comes as a descriptor too.
	lf := workerLogs{stderr: os.Stderr}
	if l := m.opts.Logs; l != nil {
		lf.stderr = l.Main.File()
		if l.AccessOut != l.Main {
			lf.access = l.AccessOut.File()
		}
	}
	names, socks, err := m.socks.filesForSlot(slot, m.sup.n)
	if err != nil {
		return nil, err
	}
	return startChild(m.exe, slot, m.succession.generation, id, names, socks, m.cfg.Log, lf, m.workerCred)
}

// serveEndpoints starts the metrics server (if enabled) and the control
// socket, and returns the control socket's path.
func (m *Master) serveEndpoints() (string, error) {
	if m.cfg.Metrics.Enabled {
		ln, err := m.upg.Listen("tcp", m.cfg.Metrics.Address)
		if err != nil {
			return "", fmt.Errorf("master: metrics listener: %w", err)
		}
		m.endpoints.serve(ln, m.metricsHandler(), metricsLimits)
	}
	ctlPath := ControlSocketPath(m.cfg)
	ctl, err := m.upg.ListenWithCallback("unix", ctlPath, listenControl)
	if err != nil {
		return "", fmt.Errorf("master: control socket %s: %w", ctlPath, err)
	}
	// Only root, this master's own user and, with `group`, that group's
	// members are served (SO_PEERCRED): the socket's mode alone would rest
	// on the umask and the directory.
	ln := peercred.NewListener(ctl, m.log)
	ln.Policy = controlAccess(m.log, ctlPath, controlGroup(m.cfg, m.workerCred, os.Geteuid()), m.cfg.Group, m.cfg.ControlSocket != "")
	ln.Refusal = controlRefusal(ln.Policy)
	m.endpoints.serve(ln, m.controlHandler(), controlLimits)
	return ctlPath, nil
}

// startWorkers starts a worker in every slot and waits until all are
// ready.
func (m *Master) startWorkers() error {
	for slot := range m.sup.n {
		if err := m.sup.spawn(slot); err != nil {
			m.shutdown.stop(time.Now())
			return err
		}
	}
	if err := m.sup.waitReady(m.opts.ReadyTimeout); err != nil {
		m.shutdown.stop(time.Now())
		return err
	}
	return nil
}

// ready tells the predecessor, tableflip (which writes the PID file and
// tells the predecessor's tableflip) and systemd that this generation
// serves.
func (m *Master) ready(ctlPath string) error {
	if m.succession.predecessor != nil && m.opts.HangBeforeReady != nil && m.opts.HangBeforeReady() {
		m.log.Warn("test hook: hanging before ready")
		select {}
	}
	m.succession.announceReady()
	if err := m.upg.Ready(); err != nil {
		m.shutdown.stop(time.Now())
		return fmt.Errorf("master: %w", err)
	}
	if err := sdNotify(fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid())); err != nil {
		m.log.Warn("telling systemd we are ready failed", "err", err)
	}
	attrs := []any{"version", m.opts.Version, "config", m.cfg.Source,
		"workers", m.sup.n, "listeners", m.socks.order, "control_socket", ctlPath}
	if m.workerCred != nil {
		attrs = append(attrs, "worker_user", m.cfg.User, "worker_uid", m.workerCred.Uid, "worker_gid", m.workerCred.Gid)
	}
	m.log.Info("sniproxy started", attrs...)
	return nil
}

// handleWorker handles the worker messages the supervisor leaves to the
// other parts.
func (m *Master) handleWorker(c *child, msg ipc.Message, body ipc.Body) {
	switch b := body.(type) {
	case ipc.Connection:
		m.relay.toSuccessor(msg, b.Key)
	case ipc.LeaseRequest:
		m.broker.request(c, b.Want, b.Urgent)
	case ipc.LeaseReturn:
		m.broker.giveBack(c, b.N)
	case ipc.PerIP:
		m.perip.handle(c, b)
	case ipc.Stats:
		m.counters.add(b.Delta)
		c.addStats(b.Delta)
	case ipc.DialReport:
		m.health.dialResults(b)
	case ipc.BackendStats:
		m.health.addStats(c, b)
	default:
		m.log.Warn("unexpected message from worker", "slot", c.slot, "type", msg.Type.String())
	}
}

// reap accounts for a worker that exited: its permits and its open
// connections are gone with it.
func (m *Master) reap(c *child) {
	freed := m.broker.drop(c)
	m.perip.drop(c)
	lost := c.active()
	m.counters.lost(lost)
	m.health.lost(c)
	m.sup.remove(c)
	if m.opts.ReplaceDeadSockets && !m.sup.isRetiring() {
		if err := m.socks.rebind(c.slot, m.sup.n); err != nil {
			m.log.Error("negative control: rebinding sockets failed", "err", err)
		}
	}
	if lost != 0 || freed != 0 {
		m.log.Debug("worker accounted", "slot", c.slot, "worker_id", c.id, "connections_lost", lost, "permits_freed", freed)
	}
}

// loop runs until stopped, or until a reload succeeded and this
// generation has drained.
func (m *Master) loop() error {
	outcomes := make(chan reloadOutcome, 1)
	var queue reloadQueue
	for {
		select {
		case sig := <-m.opts.Signals:
			if sig == syscall.SIGUSR1 {
				m.reopenLogs()
				continue
			}
			if sig != syscall.SIGHUP {
				m.stop(sig)
				return nil
			}
			m.log.Info("SIGHUP: reloading")
			if !queue.busy() {
				// A signal has nobody to answer: a placeholder.
				m.requestReload(&queue, reloadRequest{reply: make(chan reloadResult, 1)}, outcomes)
			}
		case req := <-m.reloads:
			m.requestReload(&queue, req, outcomes)
		case out := <-outcomes:
			if out.err != nil {
				m.failReload(out.err)
				queue.answer(reloadResult{Error: out.err.Error()})
				continue
			}
			deadline := time.Now().Add(m.cfg.ShutdownTimeout)
			// The workers stop accepting before `sniproxy reload` returns:
			// a client that connects after it reaches the new generation,
			// whose permits do not yet know of a connection an old worker
			// would take.
			kids := m.shutdown.retire(deadline)
			queue.answer(reloadResult{PID: out.ready.PID, Generation: out.ready.Generation})
			m.retireGeneration(out, kids, deadline)
			return nil
		case c := <-m.sup.exits:
			m.reap(c)
			if err := m.sup.died(c); err != nil {
				m.shutdown.stop(time.Now())
				return err
			}
			m.counters.workerRestarted()
		case slot := <-m.sup.respawn:
			m.sup.restart(slot)
		}
	}
}

// requestReload queues req and, unless a reload is under way (whose
// result answers req too), validates the config on disk and starts one.
func (m *Master) requestReload(q *reloadQueue, req reloadRequest, outcomes chan<- reloadOutcome) {
	if !q.add(req) {
		return
	}
	m.reloadBegan = time.Now()
	cfg, err := m.opts.LoadConfig(m.opts.ConfigPath)
	if err != nil {
		err = fmt.Errorf("new config is invalid, nothing changed: %w", err)
		m.failReload(err)
		q.answer(reloadResult{Error: err.Error()})
		return
	}
	m.log.Info("new config is valid; starting the next generation", "config", cfg.Source)
	go m.succession.reload(m.reloadBegan, outcomes)
}

// failReload records a failed reload.
func (m *Master) failReload(err error) {
	m.counters.reloaded(status.Reload{Time: m.reloadBegan, Result: "failed",
		DurationSeconds: time.Since(m.reloadBegan).Seconds(), Error: err.Error()})
	m.log.Error("reload failed", "err", err)
}

// stop is the operator's stop: stop accepting, drain (a second signal:
// stop now), exit.
func (m *Master) stop(sig os.Signal) {
	m.stopping.Store(true)
	m.log.Info("stopping: draining workers", "signal", sig.String(), "active", m.counters.snapshot().Active, "shutdown_timeout", m.cfg.ShutdownTimeout)
	sdNotify("STOPPING=1")
	m.shutdown.stop(time.Now().Add(m.cfg.ShutdownTimeout))
	m.log.Info("sniproxy stopped")
}

// retireGeneration runs after a successful reload, once the workers were
// told to retire: the successor serves; this generation forwards its
// counts while its connections drain (at most shutdown_timeout), moves on
// any connection a hurry makes its workers move, and exits.
func (m *Master) retireGeneration(out reloadOutcome, kids []*child, deadline time.Time) {
	m.log.Info("new generation ready; draining this one", "new_pid", out.ready.PID, "new_generation", out.ready.Generation,
		"active", m.counters.snapshot().Active, "shutdown_timeout", m.cfg.ShutdownTimeout)
	// The successor serves metrics and the control socket now; they
	// share the listening sockets, so closing ours refuses nobody.
	m.endpoints.close()
	m.health.stop() // the successor checks the backends now
	m.shutdown.drain(kids, deadline)
	out.successor.close()
	// Every connection a worker moved must be sent on before the move
	// socket closes.
	if !m.sup.waitReaders(readersWait) {
		m.log.Error("workers' messages still being read after they exited", "waited", readersWait)
	}
	m.relay.closeSuccessor()
	m.log.Info("generation drained; exiting")
}

// workerCredential returns who the workers run as for cfg's user and group,
// in a master running as euid: nil when they run as the master does. A
// master that is not root can start workers only as itself.
func workerCredential(cfg *config.Config, euid int) (*syscall.Credential, error) {
	cr, err := cfg.WorkerCredentials()
	if err != nil || cr == nil {
		return nil, err
	}
	if euid != 0 {
		if cr.UID == uint32(euid) {
			return nil, nil
		}
		return nil, fmt.Errorf("master: user %q: workers can run as another user only when sniproxy starts as root (it runs as uid %d)", cr.Name, euid)
	}
	return &syscall.Credential{Uid: cr.UID, Gid: cr.GID, Groups: cr.Groups}, nil
}
