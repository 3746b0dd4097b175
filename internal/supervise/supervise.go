// Package supervise keeps one process alive for the whole life of a
// sniproxy, across every reload and binary upgrade: what a container
// runtime (Docker, Kubernetes), runit, s6, supervisord or a plain shell
// expects of the process it started.
//
// Without it, the process the operator starts is the first master, and a
// reload replaces it: the successor is a tableflip child of the old master,
// which exits once drained, and the successor is re-parented to PID 1. Under
// systemd that is fine (NotifyAccess, PIDFile and MAINPID follow it); under
// anything else the supervisor sees its child exit 0 and considers the
// service stopped, and a container whose PID 1 exits is torn down.
//
// The keeper ([Run]) starts the master as its child, makes itself a child
// subreaper (prctl PR_SET_CHILD_SUBREAPER) so that every later generation is
// re-parented to it when its predecessor exits, forwards the signals it
// receives (HUP, TERM, INT, QUIT) to the current master, reaps every
// process that is re-parented to it (as PID 1 of a container it must reap
// every orphan), and exits when the last of its descendants has, with the
// exit status of the last master.
//
// The current master is the one the PID file names: tableflip writes it
// when a new generation is ready, before the old one retires. The keeper
// only trusts a PID that is alive and its own descendant.
package supervise

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// forwarded are the signals the keeper passes on to the current master.
var forwarded = []os.Signal{syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT}

// Options configure a keeper.
type Options struct {
	// Path is the executable to start; Args its arguments (not including
	// argv[0], which is Argv0).
	Path  string
	Argv0 string
	Args  []string
	// Env is the master's environment; nil means the keeper's.
	Env []string
	// PIDFile is where the masters write the current master's pid. It
	// must be set: without it the keeper could not tell the current
	// master after a reload.
	PIDFile string
	// Stdout and Stderr are the master's; nil means the keeper's.
	Stdout, Stderr io.Writer
	// Log receives the keeper's own lines.
	Log *slog.Logger
	// Signals, if not nil, replaces the keeper's own subscription to
	// forwarded (for tests).
	Signals <-chan os.Signal
}

// Run starts the master and keeps going until every descendant has exited
// or ctx is done (then it forwards SIGTERM once and keeps waiting). It
// returns the exit status to exit with: the last master's status (128+n
// when it was killed by signal n), or 1 when the master could not start.
func Run(ctx context.Context, opts Options) int {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.PIDFile == "" {
		log.Error("supervise: no pid file to follow the current master")
		return 1
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Error("supervise: cannot become a child subreaper", "err", err)
		return 1
	}
	sigs := opts.Signals
	if sigs == nil {
		ch := make(chan os.Signal, 8)
		signal.Notify(ch, forwarded...)
		defer signal.Stop(ch)
		sigs = ch
	}
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	defer signal.Stop(chld)

	// A stale file from an earlier run must not name the master.
	os.Remove(opts.PIDFile)
	cmd := exec.Command(opts.Path, opts.Args...)
	if opts.Argv0 != "" {
		cmd.Args[0] = opts.Argv0
	}
	cmd.Env = opts.Env
	cmd.Stdin = nil
	cmd.Stdout, cmd.Stderr = opts.Stdout, opts.Stderr
	if cmd.Stdout == nil {
		cmd.Stdout = os.Stdout
	}
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	// Start only: the keeper reaps with wait4(-1), which covers this child
	// and every process re-parented to it; cmd.Wait would race with it.
	if err := cmd.Start(); err != nil {
		log.Error("supervise: starting the master failed", "err", err)
		return 1
	}
	k := &keeper{log: log, pidFile: opts.PIDFile, self: os.Getpid(), first: cmd.Process.Pid,
		masters: map[int]bool{cmd.Process.Pid: true}, status: 1}
	log.Info("supervising", "pid", k.self, "master_pid", k.first, "pid_file", opts.PIDFile)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	done := ctx.Done()
	for {
		if k.reap() {
			log.Info("sniproxy exited; supervisor exiting", "status", k.status)
			return k.status
		}
		select {
		case sig := <-sigs:
			k.forward(sig)
		case <-done:
			done = nil
			k.forward(syscall.SIGTERM)
		case <-chld:
		case <-tick.C:
			// SIGCHLDs coalesce, and a master may have become current
			// without any: look again now and then.
			k.current()
		}
	}
}

// keeper is the state of Run's loop.
type keeper struct {
	log     *slog.Logger
	pidFile string
	self    int
	first   int

	mu      sync.Mutex
	masters map[int]bool // every pid known to have been a master
	last    int          // the current master as last seen
	status  int          // exit status of the last master that exited
}

// current returns the pid of the current master: the one the PID file
// names when that is a live descendant of the keeper, else the last one
// seen, else the first.
func (k *keeper) current() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if b, err := os.ReadFile(k.pidFile); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 && isDescendant(pid, k.self) {
			k.masters[pid] = true
			k.last = pid
		}
	}
	if k.last == 0 {
		k.last = k.first
	}
	return k.last
}

// forward sends sig to the current master.
func (k *keeper) forward(sig os.Signal) {
	pid := k.current()
	s, _ := sig.(syscall.Signal)
	if err := syscall.Kill(pid, s); err != nil {
		k.log.Warn("supervise: forwarding a signal failed", "signal", sig.String(), "pid", pid, "err", err)
		return
	}
	k.log.Debug("supervise: signal forwarded", "signal", sig.String(), "pid", pid)
}

// reap collects every exited child without blocking and reports whether
// none is left.
func (k *keeper) reap() bool {
	k.current() // learn of a new master before its predecessor is reaped
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ECHILD) {
			return true
		}
		if err != nil {
			k.log.Error("supervise: wait4", "err", err)
			return false
		}
		if pid == 0 {
			return false
		}
		k.mu.Lock()
		if k.masters[pid] {
			k.status = exitCode(ws)
			k.log.Debug("supervise: a master exited", "pid", pid, "status", k.status)
		}
		k.mu.Unlock()
	}
}

// exitCode is the shell's view of a wait status: the exit code, or 128+n
// for a death by signal n.
func exitCode(ws unix.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	default:
		return 1
	}
}

// isDescendant reports whether pid is alive and a descendant of ancestor,
// following parent pids in /proc.
func isDescendant(pid, ancestor int) bool {
	for range 64 {
		if pid <= 1 {
			return false
		}
		ppid, err := parentOf(pid)
		if err != nil {
			return false
		}
		if ppid == ancestor {
			return true
		}
		pid = ppid
	}
	return false
}

// parentOf reads pid's parent pid from /proc/pid/stat. The command name
// there is in parentheses and may itself contain spaces and parentheses,
// so the fields are counted from the last ')'.
func parentOf(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("supervise: /proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0, fmt.Errorf("supervise: /proc/%d/stat: too short", pid)
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, fmt.Errorf("supervise: %d is not alive", pid)
	}
	return strconv.Atoi(f[1])
}
