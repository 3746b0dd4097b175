package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// benchEnv is the state shared by every mode.
type benchEnv struct {
	opt    *options
	dir    string
	hello  []byte
	tls    *tlsPair
	limit  uint64
	stderr io.Writer

	// idleN is the number of idle connections actually used, idleNote
	// why (the fd limit).
	idleN    int
	idleNote string

	bins     map[string]string // target -> binary
	versions map[string]string // target -> version line

	mu   sync.Mutex
	live map[*peer]struct{}
	seq  int
}

// peer is one running target: a proxy process routing bench.test to the
// backend, or, for "direct", just the backend's address.
type peer struct {
	name string
	addr string // where clients connect
	desc string // configuration summary for the report

	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

// pid returns the root process's PID, 0 for direct.
func (p *peer) pid() int {
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// resolveBinaries finds (or builds) every target's binary and reads its
// version.
func (e *benchEnv) resolveBinaries(ctx context.Context) error {
	e.bins = map[string]string{}
	e.versions = map[string]string{}
	e.live = map[*peer]struct{}{}
	for _, t := range e.opt.targets {
		var bin string
		var verArgs []string
		switch t {
		case "direct":
			e.versions[t] = "Go " + runtime.Version() + " client and backend, no proxy"
			continue
		case "sniproxy":
			bin = e.opt.sniproxy
			if bin == "" {
				var err error
				if bin, err = buildSniproxy(ctx, e.dir, e.stderr); err != nil {
					return err
				}
			}
			verArgs = []string{"version"}
		case "nginx":
			bin, verArgs = e.opt.nginx, []string{"-v"}
		case "haproxy":
			bin, verArgs = e.opt.haproxy, []string{"-v"}
		case "dlundquist":
			bin, verArgs = e.opt.dlundquist, []string{"-V"}
		}
		if _, err := os.Stat(bin); err != nil {
			return fmt.Errorf("target %s: %w (see bench/README.md for how to install it)", t, err)
		}
		e.bins[t] = bin
		vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, _ := exec.CommandContext(vctx, bin, verArgs...).CombinedOutput()
		cancel()
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		e.versions[t] = line
	}
	return nil
}

// buildSniproxy builds ./cmd/sniproxy of the enclosing module into dir.
func buildSniproxy(ctx context.Context, dir string, stderr io.Writer) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "sniproxy")
	bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(bctx, "go", "build", "-o", out, "./cmd/sniproxy")
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = stderr, stderr
	fmt.Fprintf(stderr, "proxybench: building sniproxy from %s\n", root)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build sniproxy: %w", err)
	}
	return out, nil
}

// moduleRoot walks up from the working directory to the go.mod of
// github.com/sniproxy/sniproxy.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/sniproxy/sniproxy\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the github.com/sniproxy/sniproxy module: run from its root or pass -sniproxy")
		}
		dir = parent
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Listener kinds a peer is configured for (see peerConfig).
const (
	// protoTLS: route the TLS ClientHello's SNI bench.test.
	protoTLS = "tls"
	// protoHTTP: route the HTTP/1 Host header bench.test, where the peer
	// can.
	protoHTTP = "http"
)

// startPeer starts target t routing bench.test (as SNI for protoTLS, as
// HTTP Host for protoHTTP) to backendAddr, waits until it listens, and
// registers it so stopAll can kill it.
func (e *benchEnv) startPeer(ctx context.Context, t, backendAddr, proto string) (*peer, error) {
	if t == "direct" {
		return &peer{name: t, addr: backendAddr, desc: "client connects straight to the backend"}, nil
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.seq++
	dir := filepath.Join(e.dir, fmt.Sprintf("%s-%d", t, e.seq))
	e.mu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("%s: %w", t, err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	conf, args, desc := e.peerConfig(t, dir, listen, backendAddr, proto)
	confPath := filepath.Join(dir, "config")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, fmt.Errorf("%s: write config: %w", t, err)
	}
	args = append(args, confPath)

	p := &peer{name: t, addr: listen, desc: desc, logPath: filepath.Join(dir, "output.log"), exited: make(chan struct{})}
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", t, err)
	}
	defer logf.Close() // the child has its own copy
	p.cmd = exec.Command(e.bins[t], args...)
	p.cmd.Dir = dir
	if env := e.opt.peerEnv[t]; len(env) > 0 {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	// If this program dies without cleaning up, the kernel kills the peer.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start: %w", t, err)
	}
	e.mu.Lock()
	e.live[p] = struct{}{}
	e.mu.Unlock()
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()

	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := waitListening(wctx, p.pid(), port, p.exited); err != nil {
		e.stopPeer(p)
		return nil, fmt.Errorf("%s: %w; its output:\n%s", t, err, p.output())
	}
	return p, nil
}

// output returns the tail of the peer's stdout and stderr.
func (p *peer) output() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// stopPeer ends p's process tree: SIGTERM to the root, then SIGKILL to
// every process of the tree still alive, each by its PID (checked against
// its start time, so a recycled PID is never hit).
func (e *benchEnv) stopPeer(p *peer) error {
	if p == nil || p.cmd == nil {
		return nil
	}
	e.mu.Lock()
	delete(e.live, p)
	e.mu.Unlock()
	procs := tree(p.pid())
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.exited:
	case <-time.After(3 * time.Second):
	}
	// Children may outlive the root (orphaned nginx worker, dlundquist's
	// binder): kill whatever of the tree is left, root included.
	procs = append(procs, tree(p.pid())...)
	for _, pr := range procs {
		if pr.alive() {
			syscall.Kill(pr.PID, syscall.SIGKILL)
		}
	}
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%s: pid %d did not exit after SIGKILL", p.name, p.pid())
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pr := range procs {
		for pr.alive() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if pr.alive() && !zombie(pr.PID) {
			return fmt.Errorf("%s: pid %d still alive after SIGKILL", p.name, pr.PID)
		}
	}
	return nil
}

// zombie reports whether pid has exited and waits to be reaped by a
// parent that is not this program.
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// stopAll stops every peer still running (on error or interrupt).
func (e *benchEnv) stopAll() {
	e.mu.Lock()
	ps := make([]*peer, 0, len(e.live))
	for p := range e.live {
		ps = append(ps, p)
	}
	e.mu.Unlock()
	for _, p := range ps {
		if err := e.stopPeer(p); err != nil {
			fmt.Fprintln(e.stderr, "proxybench:", err)
		}
	}
}

// proxyConns is how many proxied connections a peer is configured for:
// above the idle count, and never below what the rate mode needs.
func (e *benchEnv) proxyConns() int {
	return max(e.idleN, e.opt.clients) + 20
}

// peerConfig returns target t's config file for one listener of kind
// proto, its arguments before the config path, and a one-line summary.
// Every peer runs -workers workers or threads where it has that notion.
func (e *benchEnv) peerConfig(t, dir, listen, backendAddr, proto string) (conf string, args []string, desc string) {
	n := e.proxyConns()
	w := e.opt.workers
	defer func() {
		if env := e.opt.peerEnv[t]; len(env) > 0 {
			desc += "; env " + strings.Join(env, " ")
		}
	}()
	switch t {
	case "sniproxy":
		metricsPort, err := freePort()
		if err != nil {
			metricsPort = 0
		}
		// One listener sniffs TLS, HTTP/1 and h2c per connection: the same
		// config serves both kinds.
		lst := fmt.Sprintf("listen_addrs: [%q]", listen)
		if e.opt.shared {
			lst = fmt.Sprintf("listeners:\n  - address: %q\n    reuseport: false", listen)
		}
		conf = fmt.Sprintf(`# generated by proxybench
%s
workers: %d
routes:
  - match: %q
    backend: %q
max_connections: %d
shutdown_timeout: 1s
timeouts:
  connect: 5s
  client_hello: 5s
  idle: 600s
metrics:
  enabled: true
  address: "127.0.0.1:%d"
log:
  level: warn
  format: text
  access: false
control_socket: %q
`, lst, w, sniName, backendAddr, n+1000, metricsPort, filepath.Join(dir, "sniproxy.sock"))
		desc = fmt.Sprintf("a master and workers: %d (-workers) on %s, each worker's GOMAXPROCS its share of the %d CPUs (%d) unless set with -peer-env, max_connections %d, metrics on, log warn, no access log, control socket in the temp dir",
			w, map[bool]string{false: "one SO_REUSEPORT socket per worker", true: "one listening socket shared by the workers (-sniproxy-shared)"}[e.opt.shared], runtime.NumCPU(), max(1, (runtime.NumCPU()+w-1)/max(w, 1)), n+1000)
		if proto == protoHTTP {
			desc = "the same config and listener: sniproxy sniffs TLS or HTTP/1 per connection and routes the Host header bench.test"
		}
		return conf, []string{"-c"}, desc

	case "nginx":
		load := ""
		if mod := filepath.Join(e.opt.nginxMods, "ngx_stream_module.so"); fileExists(mod) {
			load = fmt.Sprintf("load_module %s;\n", mod)
		}
		server := fmt.Sprintf(`    upstream bench_backend {
        server %s;
    }
    map $ssl_preread_server_name $bench_upstream {
        %s bench_backend;
        default 127.0.0.1:1;
    }
    server {
        listen %s backlog=4096;
        ssl_preread on;
        preread_timeout 5s;
        proxy_pass $bench_upstream;
        proxy_connect_timeout 5s;
        proxy_timeout 600s;
    }`, backendAddr, sniName, listen)
		desc = fmt.Sprintf("master + worker_processes %d (-workers), worker_connections %d, worker_rlimit_nofile %d, "+
			"stream ssl_preread → map → upstream, proxy_buffer_size 16k (default), no access log", w, e.limit, e.limit)
		if proto == protoHTTP {
			// nginx's stream module cannot read an HTTP Host header.
			server = fmt.Sprintf(`    server {
        listen %s backlog=4096;
        proxy_pass %s;
        proxy_connect_timeout 5s;
        proxy_timeout 600s;
    }`, listen, backendAddr)
			desc = "NO Host routing (the stream module cannot read HTTP): a second stream server with a plain proxy_pass straight to the backend"
		}
		conf = fmt.Sprintf(`# generated by proxybench
%sdaemon off;
master_process on;
worker_processes %d;
worker_rlimit_nofile %d;
pid %s/nginx.pid;
error_log %s/error.log warn;
events {
    worker_connections %d;
}
stream {
%s
}
`, load, w, e.limit, dir, dir, e.limit, server)
		return conf, []string{"-c"}, desc

	case "haproxy":
		maxconn := min(n, (int(e.limit)-e.opt.fdReserve)/2)
		rules := fmt.Sprintf(`    tcp-request content accept if { req_ssl_hello_type 1 }
    use_backend bench_be if { req_ssl_sni -i %s }`, sniName)
		desc = fmt.Sprintf("one process, nbthread %d (-workers), maxconn %d, mode tcp, inspect-delay 5s, req_ssl_sni, "+
			"tune.bufsize 16k (default), no logging", w, maxconn)
		if proto == protoHTTP {
			// In mode tcp HAProxy parses the buffered request on the fly
			// for HTTP fetches, then copies raw bytes like the others.
			rules = fmt.Sprintf(`    tcp-request content accept if HTTP
    use_backend bench_be if { hdr(host) -i %s }`, sniName)
			desc = "a second frontend, still mode tcp: tcp-request content accept if HTTP, use_backend if { hdr(host) -i bench.test } " +
				"(HAProxy parses the buffered request for the fetch, then copies raw bytes; no mode http)"
		}
		conf = fmt.Sprintf(`# generated by proxybench
global
    nbthread %d
    maxconn %d

defaults
    mode tcp
    maxconn %d
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend bench_fe
    bind %s
    tcp-request inspect-delay 5s
%s

backend bench_be
    server s1 %s
`, w, maxconn, maxconn, listen, rules, backendAddr)
		return conf, []string{"-db", "-f"}, desc

	case "dlundquist":
		conf = fmt.Sprintf(`# generated by proxybench
user root
pidfile %s/sniproxy.pid

error_log {
    filename %s/error.log
    priority warning
}

listener %s {
    protocol %s
    table bench
}

table bench {
    ^%s$ %s
}
`, dir, dir, listen, proto, strings.ReplaceAll(sniName, ".", `\.`), backendAddr)
		desc = fmt.Sprintf("one event-loop process (+ its binder child; it has no worker setting), listener protocol tls, table ^bench\\.test$, -n %d, no access log", e.limit)
		if proto == protoHTTP {
			desc = "a second listener with protocol http (routes the Host header), same table"
		}
		return conf, []string{"-f", "-n", fmt.Sprint(e.limit), "-c"}, desc
	}
	panic("unknown target " + t)
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
