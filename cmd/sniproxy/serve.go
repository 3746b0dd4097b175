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

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/supervise"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/master"
	"github.com/sniproxy/sniproxy/worker/process"
)

// cmdRun runs the master until it stops; with keep, or as PID 1, it runs
// the supervisor that keeps this process for the life of the proxy.
func cmdRun(path string, keep bool, sigs <-chan os.Signal, stderr io.Writer) int {
	cfg, err := loadConfig(path)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid:\n%s\n", indentErrors(err))
		return 1
	}
	log, _ := newLogger(cfg, stderr)
	if keep || os.Getpid() == 1 {
		return cmdSupervise(path, cfg, sigs, log)
	}
	sw := testswitch.Read() // the zero value unless built for the e2e tests
	opts := master.Options{Config: cfg, Log: log, Signals: sigs, Version: version,
		ConfigPath: config.Resolve(path, nil, nil),
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
		return 1
	}
	return 0
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
	return cmd
}

// cmdWorker is the worker process a master starts: fd 3 is its IPC pair,
// fds 4 on are its listening sockets, named by --sockets in order. It is not
// meant to be run by hand. Signals are left to the master: a worker retires
// when the master says so and drains when the master is gone.
func cmdWorker(a workerArgs, stderr io.Writer) int {
	lv := new(slog.LevelVar)
	if l, err := logging.ParseLevel(a.level); err == nil {
		lv.Set(l)
	}
	log := logging.New(stderr, a.format, lv).With("worker", a.slot, "pid", os.Getpid())

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
	err = process.Run(process.Options{Log: log, Conn: conn, Slot: a.slot, Generation: a.generation, Files: files,
		Switches: testswitch.Read()})
	if err != nil {
		log.Error("worker failed", "err", err)
		return 1
	}
	return 0
}
