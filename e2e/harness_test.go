// Package e2e builds the sniproxy binary and runs it as an operator would:
// a real process with a config file, real sockets on loopback, real
// signals. All traffic stays on 127.0.0.1.
package e2e

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/backendtest"
)

// binary is the sniproxy binary built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		// Every test here runs the real binary, most with external tools
		// (curl, openssl, systemd-analyze, unshare, dpkg-deb): none is a
		// unit test. Build nothing and run nothing.
		fmt.Fprintln(os.Stderr, "e2e: skipped under -short")
		flag.Set("test.skip", ".")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "sniproxy-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "sniproxy")
	build := exec.Command("go", "build", "-tags", "sniproxytest", "-o", binary, "../cmd/sniproxy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building sniproxy:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// logFile is the path of a process's output file.
type logFile string

// String returns the output so far.
func (f logFile) String() string {
	b, _ := os.ReadFile(string(f))
	return string(b)
}

// proxyProc is a running sniproxy.
type proxyProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	addr    string // first listener
	metrics string
	logs    logFile
	done    chan struct{}
	err     error
	cfgPath string
	pidFile string
	bin     string
}

// pid returns the master PID in the PID file, or 0.
func (p *proxyProc) pid() int {
	b, err := os.ReadFile(p.pidFile)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// startProxy writes cfg (YAML; "LISTEN" and "METRICS" are replaced by free
// loopback addresses) to a file, starts sniproxy on it and waits until its
// /healthz answers.
func startProxy(t *testing.T, cfg string) *proxyProc {
	t.Helper()
	return startProxyEnv(t, cfg)
}

// startProxyEnv is startProxy with extra environment variables.
func startProxyEnv(t *testing.T, cfg string, env ...string) *proxyProc {
	t.Helper()
	return startProxyBin(t, binary, cfg, env...)
}

// startProxyBin is startProxyEnv running the binary at bin. "PIDFILE" in
// cfg becomes a path in the test's directory; after reloads the master
// named there is the one stopped at the end.
func startProxyBin(t *testing.T, bin, cfg string, env ...string) *proxyProc {
	t.Helper()
	return startProxyArgv(t, bin, cfg, func(path string) []string { return []string{bin, "-c", path} }, env...)
}

// startProxyArgv is startProxyBin with the command line argv(config path)
// instead of "bin -c path" (a supervisor, a PID namespace).
func startProxyArgv(t *testing.T, bin, cfg string, argv func(cfgPath string) []string, env ...string) *proxyProc {
	t.Helper()
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg = strings.ReplaceAll(cfg, "LISTEN", listen)
	cfg = strings.ReplaceAll(cfg, "METRICS", metrics)
	dir := t.TempDir()
	cfg = strings.ReplaceAll(cfg, "CTLSOCK", filepath.Join(dir, "ctl.sock"))
	pidFile := filepath.Join(dir, "sniproxy.pid")
	cfg = strings.ReplaceAll(cfg, "PIDFILE", pidFile)
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Output goes to a file, not a pipe: upgraded masters inherit it, and
	// Wait would otherwise wait for the last of them to close the pipe.
	logPath := filepath.Join(dir, "sniproxy.log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	p := &proxyProc{t: t, addr: listen, metrics: metrics, logs: logFile(logPath), done: make(chan struct{}), cfgPath: path, pidFile: pidFile, bin: bin}
	args := argv(path)
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.Env = append(append(os.Environ(), "SNIPROXY_LOG_FORMAT=json"), env...)
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		// Graceful first, so workers are drained and reaped by the master;
		// then by force. After a reload the master is another process:
		// the one the PID file names.
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
		if pid := p.pid(); pid > 0 && pid != p.cmd.Process.Pid {
			kids := children(t, pid)
			syscall.Kill(pid, syscall.SIGTERM)
			for deadline := time.Now().Add(15 * time.Second); alive(pid); {
				if time.Now().After(deadline) {
					syscall.Kill(pid, syscall.SIGKILL)
				}
				time.Sleep(10 * time.Millisecond)
			}
			for _, k := range kids {
				for deadline := time.Now().Add(10 * time.Second); alive(k); {
					if time.Now().After(deadline) {
						syscall.Kill(k, syscall.SIGKILL)
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
		}
		// Whatever is left of this proxy (a successor the config named no
		// PID file for, its workers, a supervisor's orphans): every
		// process whose command line names this test's config or its
		// listen address.
		killAllOf(t, p.cfgPath, listen)
		if t.Failed() {
			t.Logf("sniproxy output:\n%s", p.logs.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + metrics + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case <-p.done:
			t.Fatalf("sniproxy exited early: %v\n%s", p.err, p.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sniproxy not healthy after 15s:\n%s", p.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// signal sends sig to the proxy and waits up to d for it to exit.
func (p *proxyProc) stop(sig syscall.Signal, d time.Duration) error {
	p.t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		p.t.Fatalf("sniproxy did not exit within %v of %v", d, sig)
		return nil
	}
}

// metric returns the value of the sample whose name and labels are
// exactly series, e.g. `sniproxy_connections_rejected_total{reason="limit"}`.
func (p *proxyProc) metric(t *testing.T, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if name, val, ok := strings.Cut(line, " "); ok && name == series {
			f, err := strconv.ParseFloat(val, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("metric %s not found", series)
	return 0
}

// waitMetric polls until series reaches want (counters are updated when a
// connection ends, which may be just after the client saw the close).
func (p *proxyProc) waitMetric(t *testing.T, series string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := p.metric(t, series)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v; want %v", series, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logLines returns the proxy's JSON log records whose msg is msg.
func (p *proxyProc) logLines(msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(p.logs.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// logsSoon reports whether a JSON log record with msg matching match
// appears within 10 seconds: a connection's access-log line is written
// when it ends, which can come after the metric or reply a test saw.
func (p *proxyProc) logsSoon(msg string, match func(rec map[string]any) bool) bool {
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		for _, rec := range p.logLines(msg) {
			if match(rec) {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// tlsBackend is a TLS server that greets each client with "id sni\n" and
// then echoes until EOF.
type tlsBackend struct {
	id   string
	addr string
	pool *x509.CertPool
}

func startTLSBackend(t *testing.T, id string, names ...string) *tlsBackend {
	t.Helper()
	addr, pool := backendtest.TLS(t, id, names...)
	return &tlsBackend{id: id, addr: addr, pool: pool}
}

// tlsHello dials the proxy with SNI name, trusting pool, and returns the
// backend's greeting line. A nil pool accepts any certificate: use it to
// assert that a name is refused, since with a pool a backend whose
// certificate does not name it would fail the handshake whether or not the
// proxy routed it.
func tlsHello(t *testing.T, proxy, name string, pool *x509.CertPool) (string, error) {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", proxy, &tls.Config{ServerName: name, RootCAs: pool, InsecureSkipVerify: pool == nil})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// expectClosed reports whether the server closes c, without sending a byte,
// within d.
func expectClosed(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		t.Fatalf("proxy sent %q; want a close without a byte", buf[:n])
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("connection still open after %v", d)
	}
}

// waitRefused waits until addr refuses new connections: the proxy has
// stopped accepting.
func waitRefused(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts 10s after the stop began", addr)
		}
		time.Sleep(10 * time.Millisecond) // poll the condition until the deadline
	}
}

// rawBackend accepts plain TCP connections and hands each to serve, with a
// 30 s deadline.
func rawBackend(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	return backendtest.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		serve(c)
	})
}

// killAllOf ends every process whose command line contains one of marks:
// TERM, then KILL after 10 s.
func killAllOf(t *testing.T, marks ...string) {
	t.Helper()
	find := func() []int {
		var pids []int
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil {
				continue
			}
			for _, m := range marks {
				if strings.Contains(string(b), m) && alive(pid) {
					pids = append(pids, pid)
					break
				}
			}
		}
		return pids
	}
	left := find()
	if len(left) == 0 {
		return
	}
	t.Logf("ending processes left by the test: %v", left)
	for _, pid := range left {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		left = find()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, pid := range left {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loopClients runs each of n goroutines calling once in a loop until the
// returned stop is called; stop waits for them.
func loopClients(n int, once func()) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				once()
			}
		}()
	}
	return func() {
		close(done)
		wg.Wait()
	}
}
