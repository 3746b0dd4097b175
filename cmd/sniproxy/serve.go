package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/stats"
	"github.com/sniproxy/sniproxy/worker"
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
	if err := serveInProcess(cfg, log, sigs); err != nil {
		log.Error("sniproxy stopped", "err", err)
		return 1
	}
	return 0
}

// serveInProcess binds every listener and serves them with one in-process
// worker.Server until SIGTERM or SIGINT, then drains for at most
// shutdown_timeout (a second signal closes everything at once).
func serveInProcess(cfg *config.Config, log *slog.Logger, sigs <-chan os.Signal) error {
	var lc net.ListenConfig
	var lns []worker.Listener
	defer func() {
		for _, l := range lns {
			l.Ln.Close()
		}
	}()
	for _, lcfg := range cfg.Listeners {
		ln, err := lc.Listen(context.Background(), "tcp", lcfg.Address)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		lns = append(lns, worker.Listener{Config: lcfg, Ln: ln.(*net.TCPListener)})
	}

	var counters stats.Counters
	srv, err := worker.New(cfg, log, &counters, worker.NewLocalLimiter(cfg.MaxConnections))
	if err != nil {
		return err
	}

	if cfg.Metrics.Enabled {
		mln, err := lc.Listen(context.Background(), "tcp", cfg.Metrics.Address)
		if err != nil {
			return fmt.Errorf("metrics listen: %w", err)
		}
		col := stats.NewCollector(counters.Snapshot, func() stats.Process { return stats.Process{Workers: 1} }, version, runtime.Version())
		hs := &http.Server{Handler: stats.Handler(col, nil), ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(mln)
		defer hs.Close()
		log.Info("metrics listening", "address", mln.Addr().String())
	}

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, lns) }()
	addrs := make([]string, len(lns))
	for i, l := range lns {
		addrs[i] = l.Ln.Addr().String()
	}
	log.Info("sniproxy started", "version", version, "config", cfg.Source, "listeners", addrs, "pid", os.Getpid())

	for {
		select {
		case err := <-served:
			if err != nil {
				return err
			}
			return nil
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				log.Warn("SIGHUP ignored: this build serves in-process and cannot reload; restart to apply a new config")
				continue
			}
			log.Info("stopping: draining connections", "signal", sig.String(), "active", srv.Active(), "shutdown_timeout", cfg.ShutdownTimeout)
			stop()
			<-served
			return drain(srv, cfg.ShutdownTimeout, log, sigs)
		}
	}
}

// drain waits for connections to end, at most timeout, logging progress; a
// further TERM or INT ends it at once.
func drain(srv *worker.Server, timeout time.Duration, log *slog.Logger, sigs <-chan os.Signal) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	done := make(chan int, 1)
	go func() { done <- srv.Drain(ctx) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case n := <-done:
			if n > 0 {
				log.Warn("shutdown timeout reached; closed remaining connections", "closed", n)
			}
			log.Info("sniproxy stopped")
			return nil
		case <-tick.C:
			log.Info("draining", "active", srv.Active())
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				continue
			}
			log.Warn("second signal: closing every connection now", "signal", sig.String())
			cancel()
		}
	}
}
