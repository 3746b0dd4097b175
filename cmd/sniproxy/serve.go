package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/supervise"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/master"
	"github.com/sniproxy/sniproxy/worker/process"
)

// runFlags are the flags of sniproxy run.
type runFlags struct {
	path       string
	keep       bool // --supervise
	sharePorts bool
}

// cmdRun runs the master until it stops; with keep, or as PID 1, it runs
// the supervisor that keeps this process for the life of the proxy.
func cmdRun(rf runFlags, sigs <-chan os.Signal, stderr io.Writer) int {
	// The config path is made absolute: status shows it, and reload -c
	// compares it with the file it is given.
	cfgPath := config.Resolve(rf.path, nil, nil)
	if cfgPath != "" {
		if abs, err := filepath.Abs(cfgPath); err == nil {
			cfgPath = abs
		}
	}
	cfg, err := config.Load(cfgPath, nil)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid:\n%s\n", indentErrors(err))
		return 1
	}
	if rf.keep || os.Getpid() == 1 {
		log, _ := newLogger(cfg, stderr)
		return cmdSupervise(rf.path, cfg, sigs, log)
	}
	errf, ok := stderr.(*os.File)
	if !ok {
		errf = os.Stderr
	}
	logs, err := logging.Open(logConfig(cfg.Log), errf)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: %v\n", err)
		return 1
	}
	defer logs.Close()
	log := logs.Log
	raiseFDLimit(log, cfg.MaxConnections)
	sw := testswitch.Read() // the zero value unless built for the e2e tests
	opts := master.Options{Config: cfg, Log: log, Logs: logs, Signals: sigs, Version: version,
		ConfigPath: cfgPath, SharePorts: rf.sharePorts,
		// Switches for the e2e tests only; see master.Options.
		ReplaceDeadSockets: sw.ReplaceDeadSockets,
		FreshSockets:       sw.FreshSockets,
		NoMove:             sw.NoMove,
		UpgradeTimeout:     sw.UpgradeTimeout,
	}
	if f := sw.HangIfFile; f != "" {
		opts.HangBeforeReady = func() bool { _, err := os.Stat(f); return err == nil }
	}
	if err := master.Run(opts); err != nil {
		log.Error("sniproxy stopped", "err", err)
		if cfg.Log.File != "" {
			// Whoever started it looks at the terminal first.
			fmt.Fprintf(stderr, "sniproxy: stopped: %v\n", err)
		}
		return 1
	}
	return 0
}

// logConfig is the logging package's view of the config's log section.
func logConfig(l config.Log) logging.Config {
	return logging.Config{Level: l.Level, Format: l.Format, File: l.File, Access: l.Access, AccessFile: l.AccessFile}
}

// fdsPerConnection is what a proxied connection costs in descriptors
// (client and backend); fdMargin covers the rest (listeners, the
// control socket, log files, DNS, a connection being dialled).
const (
	fdsPerConnection = 2
	fdMargin         = 256
)

// fdsNeeded is the RLIMIT_NOFILE a process needs to hold max_connections
// connections by itself (one worker may hold them all).
func fdsNeeded(maxConnections int) uint64 {
	return uint64(maxConnections)*fdsPerConnection + fdMargin
}

// raiseFDLimit raises the soft RLIMIT_NOFILE to the hard limit (workers
// inherit it) and logs both, with a warning when the hard limit cannot
// hold max_connections.
//
// By now the Go runtime has raised this process's soft limit to hard-1
// (package syscall's init) and would give each child the soft limit the
// process started with; setting it here, through syscall.Setrlimit, is
// what makes the workers inherit the hard limit. The limit the process
// started with is not known here any more: the log gives the limits in
// force.
func raiseFDLimit(log *slog.Logger, maxConnections int) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("reading the fd limit failed", "err", err)
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("raising the fd limit failed", "err", err)
			unix.Getrlimit(unix.RLIMIT_NOFILE, &lim)
		}
	}
	if need := fdsNeeded(maxConnections); lim.Max < need {
		log.Warn("the fd limit cannot hold max_connections", "soft", lim.Cur, "hard", lim.Max,
			"max_connections", maxConnections, "needed", need)
		return
	}
	log.Info("fd limit", "soft", lim.Cur, "hard", lim.Max)
}

// cmdSupervise runs the keeper (package supervise): the master runs as its
// child, `sniproxy run` without --supervise, from this same binary on disk
// (a reload starts successors from that path too).
func cmdSupervise(path string, cfg *config.Config, sigs <-chan os.Signal, log *slog.Logger) int {
	exe, err := os.Executable()
	if err != nil {
		log.Error("supervise: cannot find this binary", "err", err)
		return 1
	}
	args := []string{"run"}
	if path != "" {
		args = append(args, "--config", path)
	}
	env := os.Environ()
	pidFile := cfg.PIDFile
	if pidFile == "" {
		// The keeper follows the current master through the PID file;
		// when the config names none, every generation writes a private
		// one (the environment passes to successors).
		pidFile = filepath.Join(os.TempDir(), fmt.Sprintf("sniproxy-supervise-%d.pid", os.Getpid()))
		env = append(env, "SNIPROXY_PID_FILE="+pidFile)
		defer os.Remove(pidFile)
	}
	return supervise.Run(context.Background(), supervise.Options{
		Path: exe, Argv0: exe, Args: args, Env: env, PIDFile: pidFile, Log: log, Signals: sigs,
	})
}

// workerArgs are the flags a master starts a worker with (master/child.go).
type workerArgs struct {
	slot, generation       int
	sockets, level, format string
	accessFD               int
}

// workerCmd is the hidden worker command: not in help, completion or the
// man pages, since only a master runs it.
func workerCmd(stderr io.Writer) *cobra.Command {
	var a workerArgs
	cmd := &cobra.Command{
		Use:    "worker",
		Short:  "A worker process (started by the master, not by hand)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return codeErr(cmdWorker(a, stderr))
		},
	}
	f := cmd.Flags()
	f.IntVar(&a.slot, "slot", 0, "worker slot")
	f.IntVar(&a.generation, "generation", 0, "master generation")
	f.StringVar(&a.sockets, "sockets", "", "comma-separated names of the sockets at fds 4 on")
	f.StringVar(&a.level, "log-level", "info", "log level")
	f.StringVar(&a.format, "log-format", "auto", "log format")
	f.IntVar(&a.accessFD, "access-log-fd", 0, "descriptor of the access log file (0: stderr)")
	return cmd
}

// cmdWorker is the worker process a master starts: fd 3 is its IPC pair,
// fds 4 on are its listening sockets, named by --sockets in order. It is not
// meant to be run by hand. Signals are left to the master: a worker retires
// when the master says so and drains when the master is gone.
func cmdWorker(a workerArgs, stderr io.Writer) int {
	nameProcess()
	lv := new(slog.LevelVar)
	if l, err := logging.ParseLevel(a.level); err == nil {
		lv.Set(l)
	}
	// Lines are written from a goroutine of their own (logging.Async):
	// the event loop logs every connection it ends on its one thread, and
	// must not wait on a slow file or pipe (a stalled journal) meanwhile.
	out := logging.NewAsync(stderr, logging.AsyncQueue)
	defer out.Close()
	log := logging.New(out, a.format, lv).With("worker", a.slot, "pid", os.Getpid())

	f := os.NewFile(3, "ipc")
	conn, err := ipc.FileConn(f)
	f.Close()
	if err != nil {
		log.Error("worker: no IPC connection to a master (workers are started by `sniproxy run`)", "err", err)
		return 1
	}
	defer conn.Close()
	var files []process.NamedFile
	if a.sockets != "" {
		for i, name := range strings.Split(a.sockets, ",") {
			files = append(files, process.NamedFile{Name: name, File: os.NewFile(uintptr(4+i), "socket-"+strconv.Itoa(i))})
		}
	}
	var access *logging.Output
	if a.accessFD > 0 {
		access = logging.NewOutput(os.NewFile(uintptr(a.accessFD), "access-log"))
	}
	err = process.Run(process.Options{Log: log, Conn: conn, Slot: a.slot, Generation: a.generation, Files: files,
		Switches: testswitch.Read(), Access: access})
	if err != nil {
		log.Error("worker failed", "err", err)
		return 1
	}
	return 0
}

// nameProcess names this worker process "sniproxy" for ps, top, ss and
// pgrep: started from /proc/self/exe, the kernel named it "exe". It writes
// /proc/self/comm, which names the process (its main thread) whatever
// thread this goroutine runs on; prctl(PR_SET_NAME) would name only the
// calling thread.
func nameProcess() {
	os.WriteFile("/proc/self/comm", []byte("sniproxy"), 0)
}
