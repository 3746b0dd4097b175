package master

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/net/netutil"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/peercred"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/internal/statuspage"
)

// status builds the current Status: what the control socket's GET
// /status and the status page show.
func (m *Master) status() status.Status {
	now := time.Now()
	t, rates, history, reloads := m.counters.view(now)
	cfg := m.cfg
	st := status.Status{
		PID:           os.Getpid(),
		Generation:    m.succession.generation,
		Version:       m.opts.Version,
		GoVersion:     runtime.Version(),
		Config:        cfg.Source,
		Started:       m.start,
		UptimeSeconds: now.Sub(m.start).Seconds(),
		Stopping:      m.stopping.Load(),
		Restarts:      m.counters.process().WorkerRestarts,
		Totals:        t,
		Rates:         rates,
		History:       history,
		Reloads:       reloads,
		Limits: status.Limits{
			MaxConnections:     cfg.MaxConnections,
			PerIPConnections:   cfg.Limits.PerIPConnections,
			PerIPRate:          cfg.Limits.PerIPRate,
			Workers:            m.sup.n,
			ClientHelloSeconds: cfg.Timeouts.ClientHello.Seconds(),
			ConnectSeconds:     cfg.Timeouts.Connect.Seconds(),
			IdleSeconds:        cfg.Timeouts.Idle.Seconds(),
			ShutdownSeconds:    cfg.ShutdownTimeout.Seconds(),
		},
		Backends: m.health.statuses(),
	}
	if st.Reloads == nil {
		st.Reloads = []status.Reload{}
	}
	restarts := m.sup.restarts()
	for slot, c := range m.sup.list() {
		w := status.Worker{Slot: slot, Restarts: restarts[slot]}
		if c != nil {
			w.PID, w.Ready, w.Active, w.Started = c.pid(), c.isReady(), c.active(), c.started
		}
		st.Workers = append(st.Workers, w)
	}
	return st
}

// sampleEvery records the counters in the status history every interval
// until done is closed.
func (m *Master) sampleEvery(interval time.Duration, done <-chan struct{}) {
	m.counters.sample(time.Now())
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			m.counters.sample(now)
		case <-done:
			return
		}
	}
}

// metricsHandler serves the metrics address: GET /metrics, GET /healthz
// and the status page (GET / and GET /status.json).
func (m *Master) metricsHandler() http.Handler {
	col := stats.NewCollector(m.counters.snapshot, m.process, m.opts.Version, runtime.Version())
	col.Backends = m.health.metrics
	h := stats.Handler(col, m.healthy)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /healthz", h)
	mux.Handle("/", statuspage.Handler(m.status, m.log))
	return mux
}

// process returns the master-level values for /metrics.
func (m *Master) process() stats.Process {
	p := m.counters.process()
	kids := m.sup.list()
	p.WorkerActive = make([]int64, len(kids))
	for i, c := range kids {
		if c != nil && c.isReady() {
			p.Workers++
			p.WorkerActive[i] = c.active()
		}
	}
	return p
}

// healthy reports whether every worker slot has a ready worker and no stop
// has begun.
func (m *Master) healthy() bool {
	return !m.stopping.Load() && m.process().Workers == m.sup.n
}

// controlHandler serves the control socket: GET /status, and POST /reload,
// which answers once the new generation is ready (its PID and generation)
// or the reload failed (the reason).
func (m *Master) controlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(m.status())
	})
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, r *http.Request) {
		req := reloadRequest{reply: make(chan reloadResult, 1)}
		var res reloadResult
		select {
		case m.reloads <- req:
			select {
			case res = <-req.reply:
			case <-r.Context().Done():
				return
			}
		case <-time.After(controlBusyWait):
			res.Error = "master is busy (stopping or draining)"
		}
		w.Header().Set("Content-Type", "application/json")
		if res.Error != "" {
			w.WriteHeader(http.StatusInternalServerError)
		}
		json.NewEncoder(w).Encode(res)
	})
	return mux
}

// controlBusyWait bounds how long POST /reload waits for the master's loop
// to take the request.
const controlBusyWait = 10 * time.Second

// endpointsCloseWait bounds how long closing the endpoints lets requests
// under way finish (a `sniproxy reload` waits for its answer).
const endpointsCloseWait = 5 * time.Second

// endpoints is the part that serves /metrics, /healthz and the control
// socket. It belongs to the master's loop (no lock).
type endpoints struct {
	servers []*http.Server
}

// endpointLimits bound what one client of an endpoint can hold: the
// metrics address may be reachable by more than its scraper, and neither
// it nor the control socket may be tied up by clients that connect and
// send nothing, or never finish.
type endpointLimits struct {
	// conns caps the connections served at once; more wait in the
	// listen queue until one ends.
	conns int
	// header bounds reading a request's headers; idle a kept-alive
	// connection between requests; write the response to a request
	// (0: none, for the control socket, whose reload answers only once
	// the reload is over).
	header, idle, write time.Duration
}

// The limits of the metrics address and of the control socket.
var (
	metricsLimits = endpointLimits{conns: 64, header: 5 * time.Second, idle: 30 * time.Second, write: 30 * time.Second}
	controlLimits = endpointLimits{conns: 16, header: 5 * time.Second, idle: 30 * time.Second}
)

// serve serves h on ln in the background until close, within lim.
func (e *endpoints) serve(ln net.Listener, h http.Handler, lim endpointLimits) {
	s := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.header,
		IdleTimeout:       lim.idle,
		WriteTimeout:      lim.write,
		MaxHeaderBytes:    16 << 10,
	}
	e.servers = append(e.servers, s)
	go s.Serve(netutil.LimitListener(ln, lim.conns))
}

// close closes the servers, letting requests under way finish for at
// most endpointsCloseWait.
func (e *endpoints) close() {
	ctx, cancel := context.WithTimeout(context.Background(), endpointsCloseWait)
	defer cancel()
	for _, s := range e.servers {
		if s.Shutdown(ctx) != nil {
			s.Close()
		}
	}
	e.servers = nil
}

// listenControl binds the control socket, mode 0600 whatever the umask
// (controlAccess may then open it to a group; the master serves only the
// peers its policy allows: see peercred). In
// this user's private temp directory (the last default) it makes the
// directory first. A socket file left by a master that died (kill -9)
// would block the bind: when nothing answers on it, it is removed first. A
// live socket at the path is never taken over, and a path that is not a
// socket is never removed: both are errors.
func listenControl(network, path string) (net.Listener, error) {
	if filepath.Dir(path) == peercred.UserTempDir() {
		if err := peercred.PrivateDir(filepath.Dir(path)); err != nil {
			return nil, err
		}
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != fs.ModeSocket {
		return nil, fmt.Errorf("%s exists and is not a socket (%v); not removing it", path, fi.Mode().Type())
	}
	ln, err := listenPrivate(network, path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return ln, err
	}
	c, derr := net.DialTimeout(network, path, time.Second)
	if derr == nil {
		c.Close()
		return nil, fmt.Errorf("%w (something is listening there: another master?)", err)
	}
	if !errors.Is(derr, syscall.ECONNREFUSED) {
		return nil, err
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("%w; removing the stale socket: %w", err, rerr)
	}
	return listenPrivate(network, path)
}

// listenPrivate binds a Unix socket at path with mode 0600: created under a
// umask that leaves nobody else a bit (the master is starting: no other
// goroutine creates files yet), then chmod'ed in case the umask was not
// applied.
func listenPrivate(network, path string) (net.Listener, error) {
	old := syscall.Umask(0o177)
	ln, err := net.Listen(network, path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return ln, nil
}

// controlGroup is the group whose members the control socket serves
// besides root and the master's own user: the configured `group`, when
// the master runs as root (euid) and so runs its workers with it (cred);
// nil otherwise. Only an explicit `group` counts, not the user's primary
// group: a user's own group would open the socket to whoever shares it.
// The workers' user is never served (Except): a worker runs with the
// group too, and must not drive its master.
func controlGroup(cfg *config.Config, cred *syscall.Credential, euid int) *peercred.Group {
	if euid != 0 || cfg.Group == "" || cred == nil {
		return nil
	}
	return &peercred.Group{GID: int(cred.Gid), Except: int(cred.Uid)}
}

// controlAccess gives the control socket at path its group and mode and
// returns the policy its listener enforces. Without a group (g nil): 0600,
// serving root and the master's user. With one: 0660 owned by the group,
// whose members are served too, when they can reach the socket: the
// master lets the group into a default directory ($RUNTIME_DIRECTORY,
// /run/sniproxy; configured false) that keeps it out, when it may (see
// peercred.OpenToGroup); the per-user temp directory stays private, and a
// configured control_socket's directory is the operator's. When the group
// cannot reach the socket it stays 0600, with a warning that says why.
// It runs on every start, an inherited socket's included, so that a
// reload that sets, changes or drops `group` applies it.
func controlAccess(log *slog.Logger, path string, g *peercred.Group, groupName string, configured bool) peercred.Policy {
	pol := peercred.OwnerOnly()
	private := func() peercred.Policy {
		if err := peercred.SetSocketMode(path, os.Getegid(), 0o600); err != nil {
			log.Warn("control socket: making it 0600 failed", "control_socket", path, "err", err)
		}
		return pol
	}
	if g == nil {
		return private()
	}
	dir := filepath.Dir(path)
	var err error
	if dir == peercred.UserTempDir() {
		err = fmt.Errorf("%s is private to this user; set control_socket, or create %s", dir, RunDir)
	} else {
		var changed bool
		changed, err = peercred.OpenToGroup(dir, g.GID, !configured)
		if changed {
			log.Info("control socket: let the group into its directory", "dir", dir, "group", groupName, "gid", g.GID)
		}
	}
	if err != nil {
		log.Warn("control socket: kept 0600 (root and this user only): the group cannot reach it",
			"control_socket", path, "group", groupName, "gid", g.GID, "err", err)
		return private()
	}
	if err := peercred.SetSocketMode(path, g.GID, 0o660); err != nil {
		log.Warn("control socket: kept 0600 (root and this user only): opening it to the group failed",
			"control_socket", path, "group", groupName, "gid", g.GID, "err", err)
		return private()
	}
	pol.Group = g
	log.Info("control socket: open to a group (0660); the workers' user is refused",
		"control_socket", path, "group", groupName, "gid", g.GID, "workers_uid", g.Except)
	return pol
}

// controlRefusal returns what the control socket tells a peer pol
// refuses: an HTTP 403 whose JSON body says why ({"error": ...}, which
// `sniproxy reload` and `status` print), instead of a dropped connection.
func controlRefusal(pol peercred.Policy) func(peercred.Cred) []byte {
	return func(cr peercred.Cred) []byte {
		why := fmt.Sprintf("control socket: uid %d may not use it: the master serves root and uid %d", cr.UID, pol.Self)
		switch g := pol.Group; {
		case g != nil && cr.UID == g.Except:
			why = fmt.Sprintf("control socket: uid %d is the workers' user, which may never drive the master", cr.UID)
		case g != nil:
			why += fmt.Sprintf(" and members of gid %d", g.GID)
		}
		body, _ := json.Marshal(map[string]string{"error": why})
		return fmt.Appendf(nil, "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
	}
}
