// Command idleprofile explains where sniproxy's memory per idle connection
// goes. It runs sniproxy's own worker.Server in this process (the code the
// binary runs, with a generated config), holds -conns idle connections
// through it, and reports the Go runtime's memory classes
// (runtime/metrics) and goroutines added per connection, and writes a heap
// profile of every allocation still live.
//
// The clients and the backend run in this process too, so their sockets
// are measured first on their own (the same number of connections straight
// to the backend) and subtracted.
//
//	go run ./bench/idleprofile -conns 4000 -heapprofile /tmp/idle.pprof
//	go tool pprof -top -sample_index=inuse_space /tmp/idle.pprof
//
// Four fds per connection live in this one process (client, proxy's two,
// backend), so -conns is at most a quarter of RLIMIT_NOFILE.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/sniproxy/sniproxy/bench/internal/clienthello"
	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/worker"
)

func main() {
	conns := flag.Int("conns", 4000, "idle connections to hold")
	heapProfile := flag.String("heapprofile", "", "write a heap profile (every allocation sampled) with the connections open")
	flag.Parse()
	// Sample every allocation: the profile is exact, not estimated.
	runtime.MemProfileRate = 1
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *conns, *heapProfile, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "idleprofile:", err)
		os.Exit(1)
	}
}

// holdBackend accepts and holds connections, reading nothing.
type holdBackend struct {
	ln       *net.TCPListener
	accepted atomic.Int64
	mu       sync.Mutex
	conns    []net.Conn
	done     chan struct{}
}

func newHoldBackend() (*holdBackend, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, fmt.Errorf("backend listen: %w", err)
	}
	b := &holdBackend{ln: ln, done: make(chan struct{})}
	go func() {
		defer close(b.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
			b.accepted.Add(1)
		}
	}()
	return b, nil
}

// closeConns closes every held connection.
func (b *holdBackend) closeConns() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.conns {
		c.Close()
	}
	b.conns = nil
}

func (b *holdBackend) close() {
	b.ln.Close()
	<-b.done
	b.closeConns()
}

// waitFor polls cond every 10 ms until it holds or ctx ends.
func waitFor(ctx context.Context, what string, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// dialAll opens n connections to addr, each sending hello.
func dialAll(ctx context.Context, addr string, hello []byte, n int) ([]net.Conn, error) {
	out := make([]net.Conn, 0, n)
	var d net.Dialer
	for range n {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			closeAll(out)
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
		if _, err := c.Write(hello); err != nil {
			c.Close()
			closeAll(out)
			return nil, fmt.Errorf("write hello: %w", err)
		}
		out = append(out, c)
	}
	return out, nil
}

func closeAll(cs []net.Conn) {
	for _, c := range cs {
		c.Close()
	}
}

// memClasses reads every /memory/classes/ metric (they add up to all the
// memory the Go runtime has mapped) after two GCs.
func memClasses() map[string]uint64 {
	runtime.GC()
	runtime.GC()
	var samples []metrics.Sample
	for _, d := range metrics.All() {
		if len(d.Name) > len("/memory/classes/") && d.Name[:len("/memory/classes/")] == "/memory/classes/" {
			samples = append(samples, metrics.Sample{Name: d.Name})
		}
	}
	metrics.Read(samples)
	out := map[string]uint64{}
	for _, s := range samples {
		if s.Value.Kind() == metrics.KindUint64 {
			out[s.Name] = s.Value.Uint64()
		}
	}
	return out
}

func run(ctx context.Context, n int, heapProfile string, stdout io.Writer) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		if most := int(lim.Cur-100) / 4; n > most {
			return fmt.Errorf("-conns %d needs %d fds here; RLIMIT_NOFILE is %d: use at most %d", n, 4*n+100, lim.Cur, most)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	hello, err := clienthello.Generate(ctx, "bench.test")
	if err != nil {
		return err
	}

	be, err := newHoldBackend()
	if err != nil {
		return err
	}
	defer be.close()

	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	yaml := fmt.Sprintf(`listen_addrs: [%q]
workers: 1
routes:
  - match: "bench.test"
    backend: %q
max_connections: %d
timeouts: {connect: 5s, client_hello: 5s, idle: 600s}
metrics: {enabled: false}
log: {level: warn}
`, ln.Addr().String(), be.ln.Addr().String(), n+1000)
	cfg, err := config.Parse([]byte(yaml), nil)
	if err != nil {
		ln.Close()
		return fmt.Errorf("config: %w", err)
	}
	var counters stats.Counters
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := worker.New(cfg, log, &counters, worker.NewLocalLimiter(cfg.MaxConnections))
	if err != nil {
		ln.Close()
		return fmt.Errorf("worker: %w", err)
	}
	sctx, stopServe := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, []worker.Listener{{Config: cfg.Listeners[0], Ln: ln}}) }()
	defer func() {
		stopServe()
		<-served
		dctx, c := context.WithTimeout(context.Background(), time.Second)
		srv.Drain(dctx)
		c()
	}()

	base := memClasses()
	g0 := runtime.NumGoroutine()

	// Reference: the same sockets in this process without the proxy.
	direct, err := dialAll(ctx, be.ln.Addr().String(), hello, n)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, "direct accepts", func() bool { return be.accepted.Load() >= int64(n) }); err != nil {
		closeAll(direct)
		return err
	}
	ref := memClasses()
	gRef := runtime.NumGoroutine()
	closeAll(direct)
	be.closeConns()
	time.Sleep(500 * time.Millisecond)
	base2 := memClasses()

	// Through sniproxy.
	proxied, err := dialAll(ctx, ln.Addr().String(), hello, n)
	if err != nil {
		return err
	}
	defer closeAll(proxied)
	if err := waitFor(ctx, "proxied accepts", func() bool {
		return be.accepted.Load() >= int64(2*n) && srv.Active() >= n
	}); err != nil {
		return err
	}
	time.Sleep(time.Second)
	loaded := memClasses()
	g1 := runtime.NumGoroutine()
	if heapProfile != "" {
		f, err := os.Create(heapProfile)
		if err != nil {
			return fmt.Errorf("heap profile: %w", err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			f.Close()
			return fmt.Errorf("heap profile: %w", err)
		}
		if err := f.Close(); err != nil {
			return fmt.Errorf("heap profile: %w", err)
		}
	}

	fmt.Fprintf(stdout, "idleprofile: %d idle connections through sniproxy's worker.Server (in process, %s, GOMAXPROCS %d)\n",
		n, runtime.Version(), runtime.GOMAXPROCS(0))
	fmt.Fprintf(stdout, "goroutines: %d before, %d with direct connections, %d with proxied ones → %.2f per proxied connection\n\n",
		g0, gRef, g1, float64(g1-gRef)/float64(n))
	names := make([]string, 0, len(loaded))
	for k := range loaded {
		names = append(names, k)
	}
	sort.Strings(names)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "runtime/metrics class\tdirect B/conn\tproxied B/conn\tsniproxy's own B/conn\t")
	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	for _, k := range names {
		d := per(ref[k], base[k])
		p := per(loaded[k], base2[k])
		if d == 0 && p == 0 {
			continue
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.0f\t\n", k, d, p, p-d)
	}
	tw.Flush()
	if heapProfile != "" {
		fmt.Fprintf(stdout, "\nheap profile: %s (go tool pprof -top -sample_index=inuse_space %s)\n", heapProfile, heapProfile)
	}
	if counters.Active() != int64(n) {
		return errors.New("sniproxy's active count does not match the connections opened")
	}
	return nil
}
