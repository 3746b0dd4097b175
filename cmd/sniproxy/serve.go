package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/master"
	"github.com/sniproxy/sniproxy/worker/process"
)

func cmdRun(args []string, sigs <-chan os.Signal, stderr io.Writer) int {
	path, err := configFlags("run", args, stderr)
	if err != nil {
		return 2
	}
	cfg, err := loadConfig(path)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid:\n%s\n", indentErrors(err))
		return 1
	}
	log, _ := newLogger(cfg, stderr)
	sw := testswitch.Read() // the zero value unless built for the e2e tests
	opts := master.Options{Config: cfg, Log: log, Signals: sigs, Version: version,
		ConfigPath: config.Resolve(path, nil, nil),
		// Switches for the e2e tests only; see master.Options.
		ReplaceDeadSockets: sw.ReplaceDeadSockets,
		FreshSockets:       sw.FreshSockets,
		NoMigration:        sw.NoMigration,
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

// cmdWorker is the worker process a master starts: fd 3 is its IPC pair,
// fds 4 on are its listening sockets, named by --sockets in order. It is not
// meant to be run by hand. Signals are left to the master: a worker retires
// when the master says so and drains when the master is gone.
func cmdWorker(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	slot := fs.Int("slot", 0, "worker slot")
	generation := fs.Int("generation", 0, "master generation")
	sockets := fs.String("sockets", "", "comma-separated names of the sockets at fds 4 on")
	level := fs.String("log-level", "info", "log level")
	format := fs.String("log-format", "auto", "log format")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	lv := new(slog.LevelVar)
	if l, err := logging.ParseLevel(*level); err == nil {
		lv.Set(l)
	}
	log := logging.New(stderr, *format, lv).With("worker", *slot, "pid", os.Getpid())

	f := os.NewFile(3, "ipc")
	conn, err := ipc.FileConn(f)
	f.Close()
	if err != nil {
		log.Error("worker: no IPC connection to a master (workers are started by `sniproxy run`)", "err", err)
		return 1
	}
	defer conn.Close()
	var files []process.NamedFile
	if *sockets != "" {
		for i, name := range strings.Split(*sockets, ",") {
			files = append(files, process.NamedFile{Name: name, File: os.NewFile(uintptr(4+i), "socket-"+strconv.Itoa(i))})
		}
	}
	err = process.Run(process.Options{Log: log, Conn: conn, Slot: *slot, Generation: *generation, Files: files,
		Switches: testswitch.Read()})
	if err != nil {
		log.Error("worker failed", "err", err)
		return 1
	}
	return 0
}
