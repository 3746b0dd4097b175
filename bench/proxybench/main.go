// Command proxybench measures sniproxy as a whole proxy, side by side with
// a direct connection and with three other SNI-routing proxies (nginx
// stream + ssl_preread, HAProxy in TCP mode, and Debian's sniproxy 0.6 by
// dlundquist), all on loopback:
//
//   - rate, tls, http: short connections from -clients loops for
//     -duration: connect, then a raw ClientHello and a 1-byte reply (rate),
//     a full TLS handshake with a crypto/tls backend and 1 byte of
//     application data (tls), or an HTTP/1.1 request routed by its Host
//     header and a small response (http); then close. Connections per
//     second, latency percentiles, and the proxy's CPU per connection.
//   - pingpong: one connection; 1 byte out and its echo back, -pingpongs
//     times; the round trip's p50 and p99 and what the proxy adds to them.
//   - throughput: one connection streams -bytes through the proxy, client
//     to backend (upload) and backend to client (download), then -streams
//     connections download -bytes between them; MB/s and proxy CPU per GB.
//   - idle: -conns connections sit idle through the proxy; memory (VmRSS of
//     the proxy's process tree) and file descriptors added per connection.
//   - all: every mode, then one Markdown summary table with sniproxy's
//     ratio to the best peer for each figure.
//
// Except in tls and http, every client opens with a real TLS ClientHello
// for bench.test made by crypto/tls and the backend is a plain TCP program
// that never speaks TLS, so each proxy only peeks the hello and then
// copies raw bytes.
//
// Every peer is started by this program with a generated config in a
// temporary directory, on free loopback ports, in the foreground, and is
// killed by PID when the mode ends (also on error or interrupt).
//
// Run from the module root:
//
//	go run ./bench/proxybench -mode all
//	go run ./bench/proxybench -mode throughput -bytes 1GiB
//	go run ./bench/proxybench -mode idle -conns 10000
//	go run ./bench/proxybench -mode rate,tls,http -duration 10s
//
// See bench/README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/bench/internal/clienthello"
)

// sniName is the name every peer routes to the backend.
const sniName = "bench.test"

// options are the command-line settings.
type options struct {
	modes     []string
	targets   []string
	runs      int
	bytes     int64
	conns     int
	settle    time.Duration
	fdReserve int
	duration  time.Duration
	clients   int
	maxCount  int64
	workers   int
	streams   int
	pingpongs int
	timeout   time.Duration
	jsonPath  string
	keep      bool

	sniproxy string
	// shared makes sniproxy's listener one socket shared by its workers
	// (reuseport: false) instead of one SO_REUSEPORT socket per worker.
	shared     bool
	nginx      string
	haproxy    string
	dlundquist string
	nginxMods  string
	// peerEnv holds extra environment variables per target.
	peerEnv map[string][]string
}

var allTargets = []string{"direct", "sniproxy", "nginx", "haproxy", "dlundquist"}

// allModes is what -mode all runs, in this order.
var allModes = []string{"rate", "tls", "http", "pingpong", "throughput", "idle"}

func main() {
	closeInheritedOnExec()
	if len(os.Args) > 1 && os.Args[1] == idleClientArg {
		os.Exit(idleClientMain(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// closeInheritedOnExec marks every fd above stderr close-on-exec, so fds
// this program inherited (from a shell or job runner) do not leak into the
// peers and distort their fd counts. Go's own fds already are.
func closeInheritedOnExec() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}

// run parses args, runs the chosen modes and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	opt, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "proxybench:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := runModes(ctx, opt, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "proxybench:", err)
		return 1
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("proxybench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	opt := &options{}
	mode := fs.String("mode", "throughput", "comma-separated modes: throughput, idle, rate (raw ClientHello), tls (full handshake), http (HTTP Host), pingpong, or all (every one, then a summary table)")
	targets := fs.String("targets", strings.Join(allTargets, ","), "comma-separated targets: "+strings.Join(allTargets, ", "))
	size := fs.String("bytes", "1GiB", "throughput: bytes per run and direction, and shared by the -streams connections (suffixes K, M, G, KiB, MiB, GiB)")
	fs.IntVar(&opt.streams, "streams", 8, "throughput: concurrent download connections of the multi-stream measurement (1: none)")
	fs.IntVar(&opt.pingpongs, "pingpongs", 20000, "pingpong: round trips per run (also ends after -duration)")
	fs.IntVar(&opt.workers, "workers", 1, "worker processes (sniproxy workers, nginx worker_processes) or threads (HAProxy nbthread) of every peer; dlundquist has no such setting and always runs one event loop")
	fs.IntVar(&opt.runs, "runs", 3, "repetitions of each measurement; the median is reported")
	fs.IntVar(&opt.conns, "conns", 10000, "idle: connections to hold open (lowered, and said so, if the fd limit cannot fit them)")
	fs.DurationVar(&opt.settle, "settle", 2*time.Second, "idle: wait after the listener is up and after all connections are accepted, before reading /proc")
	fs.IntVar(&opt.fdReserve, "fd-reserve", 100, "idle: fds kept free in each process for its listeners, logs, epoll…")
	fs.DurationVar(&opt.duration, "duration", 5*time.Second, "rate, tls, http: length of each run; pingpong: longest run")
	fs.IntVar(&opt.clients, "clients", 32, "rate, tls, http: concurrent client loops")
	fs.Int64Var(&opt.maxCount, "max-count", 2_000_000, "rate, tls, http: most connections per run, whatever the duration")
	fs.DurationVar(&opt.timeout, "timeout", 3*time.Minute, "limit for any single measurement")
	fs.StringVar(&opt.jsonPath, "json", "", "also write machine-readable results to this file")
	fs.BoolVar(&opt.keep, "keep", false, "keep the temporary directory with the generated configs and peer logs")
	fs.StringVar(&opt.sniproxy, "sniproxy", "", "sniproxy binary under test (default: build ./cmd/sniproxy of this module into the temp dir)")
	fs.BoolVar(&opt.shared, "sniproxy-shared", false, "sniproxy: listen on one socket shared by the workers (listeners: reuseport: false), as nginx's generated config does, instead of one SO_REUSEPORT socket per worker (the default)")
	fs.StringVar(&opt.nginx, "nginx", "/usr/sbin/nginx", "nginx binary")
	fs.StringVar(&opt.nginxMods, "nginx-modules", "/usr/lib/nginx/modules", "directory holding ngx_stream_module.so (load_module), if stream is not built in")
	fs.StringVar(&opt.haproxy, "haproxy", "/usr/sbin/haproxy", "haproxy binary")
	fs.StringVar(&opt.dlundquist, "dlundquist", "/usr/sbin/sniproxy", "Debian's sniproxy 0.6 (dlundquist) binary")
	opt.peerEnv = map[string][]string{}
	fs.Func("peer-env", "TARGET:KEY=VALUE: extra environment for a peer, repeatable (e.g. sniproxy:GODEBUG=gctrace=1, sniproxy:GOMAXPROCS=1)", func(s string) error {
		t, kv, ok := strings.Cut(s, ":")
		if !ok || !contains(allTargets, t) || t == "direct" || !strings.Contains(kv, "=") {
			return fmt.Errorf("want TARGET:KEY=VALUE with a proxy target, got %q", s)
		}
		opt.peerEnv[t] = append(opt.peerEnv[t], kv)
		return nil
	})
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./bench/proxybench [flags]\n\n"+
			"Measures direct, sniproxy, nginx, haproxy and dlundquist sniproxy side by side on loopback.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	n, err := parseSize(*size)
	if err != nil {
		return nil, fmt.Errorf("-bytes: %w", err)
	}
	opt.bytes = n
	for _, m := range splitList(*mode) {
		switch m {
		case "all":
			opt.modes = append(opt.modes, allModes...)
		case "throughput", "idle", "rate", "tls", "http", "pingpong":
			opt.modes = append(opt.modes, m)
		default:
			return nil, fmt.Errorf("-mode: unknown mode %q", m)
		}
	}
	if len(opt.modes) == 0 {
		return nil, errors.New("-mode: no mode given")
	}
	for _, t := range splitList(*targets) {
		if !contains(allTargets, t) {
			return nil, fmt.Errorf("-targets: unknown target %q", t)
		}
		opt.targets = append(opt.targets, t)
	}
	if len(opt.targets) == 0 {
		return nil, errors.New("-targets: no target given")
	}
	switch {
	case opt.runs < 1:
		return nil, errors.New("-runs must be at least 1")
	case opt.conns < 1:
		return nil, errors.New("-conns must be at least 1")
	case opt.clients < 1:
		return nil, errors.New("-clients must be at least 1")
	case opt.bytes < 1:
		return nil, errors.New("-bytes must be at least 1")
	case opt.workers < 1:
		return nil, errors.New("-workers must be at least 1")
	case opt.streams < 1 || int64(opt.streams) > opt.bytes:
		return nil, errors.New("-streams must be at least 1 and at most -bytes")
	case opt.pingpongs < 1:
		return nil, errors.New("-pingpongs must be at least 1")
	}
	return opt, nil
}

// parseSize parses "1GiB", "512M", "1000000".
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mul    int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
	}
	mul := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mul = strings.TrimSuffix(s, u.suffix), u.mul
			break
		}
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil {
		return 0, fmt.Errorf("bad size %q: %w", s, err)
	}
	return n * mul, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// runModes sets up the shared state (fd limit, hello, temp dir, binaries)
// and runs each mode in turn, printing its table as soon as it is done.
func runModes(ctx context.Context, opt *options, stdout, stderr io.Writer) error {
	limit, limitNote := raiseNoFile()
	dir, err := os.MkdirTemp("", "proxybench-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	if opt.keep {
		fmt.Fprintf(stderr, "proxybench: keeping %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	hello, err := clienthello.Generate(hctx, sniName)
	cancel()
	if err != nil {
		return err
	}

	pair, err := newTLSPair()
	if err != nil {
		return err
	}
	env := &benchEnv{
		opt:    opt,
		dir:    dir,
		hello:  hello,
		tls:    pair,
		limit:  limit,
		stderr: stderr,
	}
	env.idleN, env.idleNote = idleConns(opt.conns, limit, opt.fdReserve, limitNote)
	if err := env.resolveBinaries(ctx); err != nil {
		return err
	}

	rep := newReport(env)
	fmt.Fprint(stdout, rep.header())
	for _, m := range opt.modes {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		var err error
		switch m {
		case "throughput":
			rep.Throughput, err = runThroughput(ctx, env)
			if rep.Throughput != nil {
				fmt.Fprint(stdout, rep.Throughput.table())
			}
		case "idle":
			rep.Idle, err = runIdle(ctx, env)
			if rep.Idle != nil {
				fmt.Fprint(stdout, rep.Idle.table())
			}
		case "rate", "tls", "http":
			var rr *rateReport
			rr, err = runRate(ctx, env, env.workload(m))
			if rr != nil {
				fmt.Fprint(stdout, rr.table())
			}
			switch m {
			case "rate":
				rep.Rate = rr
			case "tls":
				rep.TLS = rr
			default:
				rep.HTTP = rr
			}
		case "pingpong":
			rep.PingPong, err = runPingPong(ctx, env)
			if rep.PingPong != nil {
				fmt.Fprint(stdout, rep.PingPong.table())
			}
		}
		if err != nil {
			return fmt.Errorf("mode %s: %w", m, err)
		}
	}
	rep.finish()
	if len(opt.modes) > 1 {
		rep.Summary = rep.buildSummary(opt.targets)
		fmt.Fprint(stdout, rep.Summary.markdown())
	}
	if opt.jsonPath != "" {
		if err := rep.writeJSON(opt.jsonPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\nJSON written to %s\n", opt.jsonPath)
	}
	return nil
}

// raiseNoFile raises RLIMIT_NOFILE: first to fs.nr_open (works only with
// CAP_SYS_RESOURCE), else the soft limit to the hard one. Children inherit
// it. It returns the soft limit in force and a note on what happened.
func raiseNoFile() (uint64, string) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024, fmt.Sprintf("getrlimit: %v", err)
	}
	note := "soft limit raised to the hard limit"
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		var nrOpen uint64
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &nrOpen); err == nil && nrOpen > lim.Max {
			want := syscall.Rlimit{Cur: nrOpen, Max: nrOpen}
			err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want)
			if err == nil {
				return nrOpen, fmt.Sprintf("raised to fs.nr_open %d", nrOpen)
			}
			note = fmt.Sprintf("hard limit %d cannot be raised (%v); soft limit raised to it", lim.Max, err)
		}
	}
	soft := lim.Cur
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return soft, fmt.Sprintf("setrlimit to the hard limit %d: %v", lim.Max, err)
	}
	return lim.Max, note
}

// idleConns returns how many idle connections fit: a proxy holds two fds
// per connection (client and backend socket) in one process, plus reserve.
func idleConns(want int, limit uint64, reserve int, limitNote string) (int, string) {
	most := (int(limit) - reserve) / 2
	if want <= most {
		return want, fmt.Sprintf("RLIMIT_NOFILE %d (%s)", limit, limitNote)
	}
	return most, fmt.Sprintf("%d idle connections are impossible here: RLIMIT_NOFILE is %d (%s) and a "+
		"single-process proxy needs 2 fds per connection plus ~%d of its own, so %d connections are used",
		want, limit, limitNote, reserve, most)
}
