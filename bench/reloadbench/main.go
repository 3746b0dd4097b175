// Command reloadbench measures sniproxy's reloads with the real binary on
// loopback: how long `sniproxy reload` takes with no connections, and how
// long it takes when the previous generation still drains N long-lived
// connections and must hand them over to the current one (see
// master.hurry), and whether every one of them still echoes afterwards.
//
// Usage (from the module root):
//
//	go run ./bench/reloadbench -conns 4000 -reloads 10
//
// The proxy runs as its own process group and is killed by PID (its PID
// file) and by group when the tool ends, also on error or interrupt.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	conns := flag.Int("conns", 4000, "long-lived connections held through the reloads")
	reloads := flag.Int("reloads", 10, "reloads per phase")
	workers := flag.Int("workers", 2, "worker processes")
	bin := flag.String("sniproxy", "", "sniproxy binary (default: go build ./cmd/sniproxy into a temp dir)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *conns, *reloads, *workers, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "reloadbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, n, reloads, workers int, bin string) error {
	raiseNoFile()
	dir, err := os.MkdirTemp("", "reloadbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if bin == "" {
		bin = filepath.Join(dir, "sniproxy")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/sniproxy")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build (run from the module root): %w", err)
		}
	}
	backend, err := echoBackend()
	if err != nil {
		return err
	}
	defer backend.Close()
	port, err := freePort()
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cfgPath := filepath.Join(dir, "config.yaml")
	pidFile := filepath.Join(dir, "sniproxy.pid")
	cfg := fmt.Sprintf(`listen_addrs: [%q]
workers: %d
max_connections: %d
shutdown_timeout: 3600
timeouts: {connect: 5, client_hello: 5, idle: 3600}
log: {level: warn, format: json}
control_socket: %q
pid_file: %q
metrics: {enabled: false}
allowlist: ["localhost"]
routes: [{match: "bench.test", backend: %q}]
`, addr, workers, 2*n+1000, filepath.Join(dir, "ctl.sock"), pidFile, backend.Addr().String())
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(dir, "sniproxy.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "run", "-c", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	pgid := cmd.Process.Pid
	go cmd.Wait()
	defer func() {
		if b, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		syscall.Kill(-pgid, syscall.SIGKILL)
	}()
	if err := waitListening(ctx, addr); err != nil {
		return err
	}

	reload := func() (time.Duration, error) {
		t0 := time.Now()
		out, err := exec.CommandContext(ctx, bin, "reload", "-c", cfgPath).CombinedOutput()
		d := time.Since(t0)
		if err != nil {
			return d, fmt.Errorf("reload: %w: %s", err, out)
		}
		return d, nil
	}

	fmt.Printf("sniproxy %s, %d workers, loopback; %d reloads per phase\n\n", addr, workers, reloads)
	var empty []time.Duration
	for range reloads {
		d, err := reload()
		if err != nil {
			return err
		}
		empty = append(empty, d)
	}
	report("reload, no connections", empty, "")

	held, err := openAll(ctx, addr, n)
	if err != nil {
		return err
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	fmt.Printf("\n%d connections open and echoing\n", len(held))
	// The first reload only starts the drain; from the second on, each
	// one hands all N over.
	var moving []time.Duration
	lost := 0
	for i := range reloads + 1 {
		d, err := reload()
		if err != nil {
			return err
		}
		if i > 0 {
			moving = append(moving, d)
		}
		bad := echoAll(held, fmt.Sprintf("after reload %d", i+1))
		lost += bad
		fmt.Printf("reload %2d: %8.1f ms, %d of %d connections failed to echo\n", i+1, ms(d), bad, len(held))
	}
	report(fmt.Sprintf("reload moving %d connections", len(held)), moving, fmt.Sprintf("%d echo failures in total", lost))
	if lost > 0 {
		return fmt.Errorf("%d echo failures", lost)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func report(what string, ds []time.Duration, extra string) {
	s := slices.Clone(ds)
	slices.Sort(s)
	fmt.Printf("%-40s median %8.1f ms  min %8.1f  max %8.1f  (n=%d) %s\n", what+":", ms(s[len(s)/2]), ms(s[0]), ms(s[len(s)-1]), len(s), extra)
}

// openAll opens n connections through the proxy and waits for each echo.
func openAll(ctx context.Context, addr string, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	var firstErr atomic.Value
	sem := make(chan struct{}, 64)
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err == nil {
				req := "GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err = io.WriteString(c, req)
				if err == nil {
					_, err = io.ReadFull(c, make([]byte, len(req)))
				}
				c.SetDeadline(time.Time{})
			}
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				if c != nil {
					c.Close()
				}
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		return nil, fmt.Errorf("opening connections: %w", err)
	}
	return conns, ctx.Err()
}

// echoAll sends a line on every connection and counts those that do not
// echo it within 10 s.
func echoAll(conns []net.Conn, what string) int {
	var bad atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			msg := fmt.Sprintf("%d %s\n", i, what)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, err := io.WriteString(c, msg)
			if err == nil {
				buf := make([]byte, len(msg))
				_, err = io.ReadFull(c, buf)
				if err == nil && string(buf) != msg {
					err = errors.New("wrong echo")
				}
			}
			if err != nil {
				bad.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(bad.Load())
}

// echoBackend echoes every connection.
func echoBackend() (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, bufio.NewReader(c))
			}()
		}
	}()
	return ln, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func waitListening(ctx context.Context, addr string) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("sniproxy not listening on %s", addr)
}

// raiseNoFile raises the soft fd limit to the hard one (this process and
// the proxy it starts each hold two per connection).
func raiseNoFile() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}
