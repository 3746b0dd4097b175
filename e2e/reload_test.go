package e2e

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// reloadConfig routes one TLS name; workers and reuseport come from the
// test.
const reloadConfig = `
listeners: [{address: "LISTEN", reuseport: REUSE}]
metrics: {enabled: true, address: "METRICS"}
timeouts: {connect: 5, client_hello: 5, idle: 60}
shutdown_timeout: 10
log: {level: info, format: json}
workers: WORKERS
control_socket: "CTLSOCK"
pid_file: "PIDFILE"
allowlist: ["localhost"]
routes: [{match: "load.test", backend: "BACKEND"}]
`

func reloadCfg(backend string, workers int, reuse bool) string {
	r := strings.NewReplacer("WORKERS", strconv.Itoa(workers), "REUSE", strconv.FormatBool(reuse), "BACKEND", backend)
	return r.Replace(reloadConfig)
}

// reload runs `sniproxy reload` and returns the new master's PID and
// generation.
func (p *proxyProc) reload(t *testing.T) (pid, gen int) {
	t.Helper()
	out, err := exec.Command(p.bin, "reload", "-c", p.cfgPath).CombinedOutput()
	if err != nil {
		t.Fatalf("sniproxy reload: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`pid (\d+), generation (\d+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("sniproxy reload said %q", out)
	}
	pid, _ = strconv.Atoi(m[1])
	gen, _ = strconv.Atoi(m[2])
	return pid, gen
}

// setWorkers rewrites the workers key of the proxy's config file.
func (p *proxyProc) setWorkers(t *testing.T, n int) {
	t.Helper()
	b, err := os.ReadFile(p.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	b = regexp.MustCompile(`(?m)^workers: \d+$`).ReplaceAll(b, []byte("workers: "+strconv.Itoa(n)))
	if err := os.WriteFile(p.cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// loadResult counts a load run's connections by outcome.
type loadResult struct {
	mu    sync.Mutex
	ok    int
	kinds map[string]int
	first map[string]string
}

func (r *loadResult) add(kind string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if kind == "" {
		r.ok++
		return
	}
	if r.kinds == nil {
		r.kinds, r.first = map[string]int{}, map[string]string{}
	}
	r.kinds[kind]++
	if _, ok := r.first[kind]; !ok && err != nil {
		r.first[kind] = err.Error()
	}
}

func (r *loadResult) failed() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, v := range r.kinds {
		n += v
	}
	return n
}

func (r *loadResult) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var keys []string
	for k := range r.kinds {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	s := fmt.Sprintf("%d ok", r.ok)
	for _, k := range keys {
		s += fmt.Sprintf(", %d %s (first: %s)", r.kinds[k], k, r.first[k])
	}
	return s
}

// classify names the way a connection failed.
func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof before reply"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// tlsLoad runs clients loops of short TLS connections for name until stop
// is closed (or maxPer connections each), expecting the greeting want.
func tlsLoad(proxy, name, want string, pool *tlsBackend, clients int, stop <-chan struct{}) (*loadResult, *sync.WaitGroup) {
	res := &loadResult{}
	var wg sync.WaitGroup
	const maxPer = 20000
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &net.Dialer{Timeout: 5 * time.Second}
			for i := 0; i < maxPer; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c, err := tls.DialWithDialer(d, "tcp", proxy, &tls.Config{ServerName: name, RootCAs: pool.pool})
				if err != nil {
					res.add(classify(err), err)
					continue
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				c.Close()
				switch {
				case err != nil:
					res.add(classify(err), err)
				case strings.TrimSpace(line) != want:
					res.add("wrong backend", fmt.Errorf("got %q", line))
				default:
					res.add("", nil)
				}
			}
		}()
	}
	return res, &wg
}

// reloadUnderLoad reloads the proxy n times while 8 clients loop short
// TLS connections, changing workers per the sequence if not nil.
func reloadUnderLoad(t *testing.T, p *proxyProc, b *tlsBackend, n int, workers []int) *loadResult {
	t.Helper()
	stop := make(chan struct{})
	res, wg := tlsLoad(p.addr, "load.test", "B load.test", b, 8, stop)
	time.Sleep(300 * time.Millisecond) // deliberate: load before, between and after the reloads
	var took []time.Duration
	lastGen := 1
	for i := range n {
		if workers != nil {
			p.setWorkers(t, workers[i%len(workers)])
		}
		start := time.Now()
		pid, gen := p.reload(t)
		took = append(took, time.Since(start))
		if gen != lastGen+1 {
			t.Errorf("reload %d: generation %d; want %d", i, gen, lastGen+1)
		}
		lastGen = gen
		if got := p.pid(); got != pid {
			t.Errorf("reload %d: PID file names %d; want the new master %d", i, got, pid)
		}
		if workers != nil {
			if kids := p.workersOf(t, pid, workers[i%len(workers)]); len(kids) != workers[i%len(workers)] {
				t.Errorf("reload %d: %d workers", i, len(kids))
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	t.Logf("%d reloads: median %v from `sniproxy reload` to the new generation ready (max %v); load: %s", n, took[len(took)/2], took[len(took)-1], res)
	return res
}

// workersOf waits until pid has n children.
func (p *proxyProc) workersOf(t *testing.T, pid, n int) []int {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		kids := children(t, pid)
		if len(kids) == n {
			return kids
		}
		if time.Now().After(deadline) {
			t.Fatalf("master %d has %d children; want %d", pid, len(kids), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReloadUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		reuse   bool
		workers []int
	}{
		{"reuseport", true, nil},
		{"reuseport, workers change", true, []int{3, 1, 2, 3, 2, 1}},
		{"shared socket", false, nil},
		{"shared socket, workers change", false, []int{3, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startTLSBackend(t, "B", "load.test")
			// Two long connections are moved at every reload after
			// the first, while the short ones come and go.
			cfg := strings.Replace(reloadCfg(b.addr, 2, tc.reuse), `routes: [`,
				fmt.Sprintf(`routes: [{match: "echo.test", backend: %q}, `, longEchoBackend(t)), 1)
			// Moved connections keep the first drain's deadline: long
			// enough for 10 reloads on a slow machine.
			cfg = strings.Replace(cfg, "shutdown_timeout: 10", "shutdown_timeout: 300", 1)
			p := startProxy(t, cfg)
			var longs []*echoer
			for range 2 {
				c, err := openEcho(p.addr, "echo.test", 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				longs = append(longs, &echoer{c: c})
			}
			res := reloadUnderLoad(t, p, b, 10, tc.workers)
			if f := res.failed(); f != 0 {
				t.Errorf("%d connections failed during 10 reloads: %s", f, res)
			}
			for i, e := range longs {
				e.echo(t, fmt.Sprintf("long %d after 10 reloads", i))
				e.c.Close()
			}
			waitFor(t, "both long connections in the access log", func() bool { return len(movedLines(p)) == 2 })
			for _, m := range movedLines(p) {
				if m != 9 {
					t.Errorf("a long connection moved %v times in 10 reloads; want 9", m)
				}
			}
			if res.ok < 200 {
				t.Errorf("only %d connections succeeded; the load proved little", res.ok)
			}
			// Counters carried over every generation.
			p.waitMetric(t, `sniproxy_connections_total{protocol="tls"}`, float64(res.ok))
			if got := p.metric(t, `sniproxy_reloads_total{result="ok"}`); got != 10 {
				t.Errorf("reloads_total{ok} = %v; want 10", got)
			}
		})
	}
}

func TestReloadNegativeControl(t *testing.T) {
	// Each generation binds fresh reuseport sockets and the old ones close
	// under their queues when the old workers stop: connections must fail,
	// or the zeros above prove nothing.
	b := startTLSBackend(t, "B", "load.test")
	p := startProxyEnv(t, reloadCfg(b.addr, 2, true), "SNIPROXYTEST_FRESH_SOCKETS=1")
	res := reloadUnderLoad(t, p, b, 20, nil)
	t.Logf("negative control: %s", res)
	if res.failed() == 0 {
		t.Errorf("no connection failed with sockets closed on drain; the reload test cannot fail")
	}
}

func TestReloadKeepsLongConnection(t *testing.T) {
	echo := echoBackend(t)
	cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1)
	p := startProxy(t, cfg)
	first := p.cmd.Process.Pid
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce := func(what string) {
		msg := "ping " + what
		c.Write([]byte(msg))
		buf := make([]byte, len(msg))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
			t.Fatalf("%s: echo %q, %v", what, buf, err)
		}
	}
	p.reload(t)
	// The first generation drains: its connection goes on, for as long as
	// it lasts within shutdown_timeout (10s here).
	for i := range 5 {
		echoOnce(fmt.Sprintf("after the reload, %d", i))
		time.Sleep(200 * time.Millisecond) // deliberate: the connection lives on for a second
	}
	if !alive(first) {
		t.Fatal("first master exited while its connection was open")
	}
	p.waitMetric(t, "sniproxy_connections_active", 1)
	c.Close()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("first generation did not exit after its last connection closed")
	}
	p.waitMetric(t, "sniproxy_connections_active", 0)
}

// echoer echoes numbered lines through a connection.
type echoer struct {
	c net.Conn
	n int
}

func (e *echoer) echo(t *testing.T, what string) {
	t.Helper()
	e.n++
	msg := fmt.Sprintf("%d %s\n", e.n, what)
	e.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := e.c.Write([]byte(msg)); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(e.c, buf); err != nil || string(buf) != msg {
		t.Fatalf("%s: echo %q, %v", what, buf, err)
	}
}

// longEchoBackend echoes every connection until EOF, however long it
// lasts (echoBackend's connections end after 30 s).
func longEchoBackend(t *testing.T) string {
	return rawBackend(t, func(c net.Conn) {
		c.SetDeadline(time.Time{})
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

func TestReloadMovesLongConnections(t *testing.T) {
	// A reload while the previous generation still drains hurries it: its
	// connections move to the current generation's workers and it exits,
	// so never more than two generations live and a long connection
	// echoes through every reload.
	echo := longEchoBackend(t)
	cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1)
	cfg = strings.Replace(cfg, "shutdown_timeout: 10", "shutdown_timeout: 120", 1)
	p := startProxy(t, cfg)
	masters := []int{p.cmd.Process.Pid}
	var longs []*echoer
	for range 3 {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		longs = append(longs, &echoer{c: c})
	}
	// One more streams all the time, reloads or not.
	busy, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	stop, streamed := make(chan struct{}), make(chan error, 1)
	lines := 0
	go func() {
		e := &echoer{c: busy}
		for {
			select {
			case <-stop:
				streamed <- nil
				return
			default:
			}
			e.n++
			msg := fmt.Sprintf("%d busy\n", e.n)
			busy.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := busy.Write([]byte(msg)); err != nil {
				streamed <- fmt.Errorf("busy line %d: %w", e.n, err)
				return
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(busy, buf); err != nil || string(buf) != msg {
				streamed <- fmt.Errorf("busy line %d: %q, %v", e.n, buf, err)
				return
			}
			lines = e.n
		}
	}()

	const reloads = 6
	for i := 1; i <= reloads; i++ {
		if i%2 == 0 {
			p.setWorkers(t, 1+i%3) // 1, 3, 2 ...
		}
		pid, gen := p.reload(t)
		masters = append(masters, pid)
		if gen != i+1 {
			t.Fatalf("reload %d made generation %d", i, gen)
		}
		for j, e := range longs {
			e.echo(t, fmt.Sprintf("long %d after reload %d", j, i))
		}
		// The generation before the previous one handed its connections
		// over and exited before this one started: two generations.
		if i >= 2 {
			waitGone(t, masters[i-2], fmt.Sprintf("generation %d after reload %d", i-1, i))
		}
		if !alive(masters[i-1]) {
			t.Fatalf("after reload %d, generation %d (holding the long connections) exited", i, i)
		}
	}
	close(stop)
	select {
	case err := <-streamed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("busy connection stuck")
	}
	t.Logf("%d lines echoed on the busy connection across %d reloads", lines, reloads)
	p.waitMetric(t, "sniproxy_connections_active", 4)

	// Once they close, the last draining generation exits.
	for _, e := range longs {
		e.c.Close()
	}
	busy.Close()
	waitGone(t, masters[reloads-1], "the draining generation after its connections closed")
	p.waitMetric(t, "sniproxy_connections_active", 0)
	moved := movedLines(p)
	if len(moved) != 4 {
		t.Fatalf("access log has %d lines with moves for the 4 moved connections: %v", len(moved), moved)
	}
	for _, m := range moved {
		if m != reloads-1 {
			t.Errorf("a connection logged %v moves; want %d", m, reloads-1)
		}
	}
}

func TestReloadMoveNegativeControl(t *testing.T) {
	// Without moving (the test switch restores the old policy), the
	// second reload hurries the first generation by closing its
	// connections: the long connection must die, or the test above proves
	// nothing.
	echo := echoBackend(t)
	cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1)
	p := startProxyEnv(t, cfg, "SNIPROXYTEST_NO_MOVE=1")
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	e := &echoer{c: c}
	p.reload(t)
	e.echo(t, "after the first reload")
	p.reload(t)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("after the second reload\n"))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("without moving, the connection survived the hurry: %v", err)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// movedLines returns the moves of every access-log line of a connection to
// echo.test (the tests' long connections) that has them.
func movedLines(p *proxyProc) []float64 {
	var moved []float64
	for _, l := range p.logLines("connection") {
		// Only the long connections: a short one of the load that a
		// hurry catches proxied (a slow machine makes that likely) is
		// moved too, once, and logs moves=1.
		if l["name"] != "echo.test" {
			continue
		}
		if m, ok := l["moves"].(float64); ok {
			moved = append(moved, m)
		}
	}
	return moved
}

func TestReloadAnsweredAfterOldWorkersStop(t *testing.T) {
	// Once `sniproxy reload` has answered, only the new generation
	// accepts: every connection opened right after it is served by one
	// of the new workers, though the old ones are still alive (draining
	// a long connection). The old workers are made slow to stop
	// accepting (200 ms, a test switch), so a reload answered before
	// they have would show.
	echo := longEchoBackend(t)
	cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1)
	cfg = strings.Replace(cfg, "shutdown_timeout: 10", "shutdown_timeout: 120", 1)
	p := startProxyEnv(t, cfg, "SNIPROXYTEST_STOP_DELAY=200ms")
	long, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	type probe struct {
		client string
		want   []int // the new generation's workers
	}
	var probes []probe
	for i := range 5 {
		pid, _ := p.reload(t)
		var batch []string
		for range 20 {
			c, err := openEcho(p.addr, "echo.test", 5*time.Second)
			if err != nil {
				t.Fatalf("after reload %d: %v", i+1, err)
			}
			batch = append(batch, c.LocalAddr().String())
			c.Close()
		}
		kids := p.workersOf(t, pid, 2)
		for _, b := range batch {
			probes = append(probes, probe{b, kids})
		}
	}
	served := map[string]int{}
	waitFor(t, "an access-log line for every probe", func() bool {
		for _, l := range p.logLines("connection") {
			if c, ok := l["client"].(string); ok {
				if pid, ok := l["pid"].(float64); ok {
					served[c] = int(pid)
				}
			}
		}
		for _, pr := range probes {
			if _, ok := served[pr.client]; !ok {
				return false
			}
		}
		return true
	})
	old := 0
	for _, pr := range probes {
		if !slices.Contains(pr.want, served[pr.client]) {
			old++
		}
	}
	if old > 0 {
		t.Errorf("%d of %d connections opened right after a reload were served by an older generation", old, len(probes))
	}
}

// waitGone waits up to 20 s for the process pid to exit.
func waitGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still alive", what, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReloadDrainDeadline(t *testing.T) {
	// A connection outliving shutdown_timeout is closed by the old
	// generation at the deadline; moving does not extend it: a connection
	// moved is closed at the deadline of the reload that first
	// retired it.
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		reloads int
	}{
		{"drained", 2 * time.Second, 1},
		{"moved by a second reload", 6 * time.Second, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			echo := echoBackend(t)
			cfg := strings.Replace(reloadCfg(echo, 1, true), "shutdown_timeout: 10", fmt.Sprintf("shutdown_timeout: %v", tc.timeout), 1)
			cfg = strings.Replace(cfg, `"load.test"`, `"echo.test"`, 1)
			p := startProxy(t, cfg)
			c, err := openEcho(p.addr, "echo.test", 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			e := &echoer{c: c}
			start := time.Now()
			for i := range tc.reloads {
				if i > 0 {
					time.Sleep(500 * time.Millisecond) // deliberate: reloads spaced in time
				}
				p.reload(t)
				e.echo(t, fmt.Sprintf("after reload %d", i+1))
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = c.Read(make([]byte, 1))
			if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("connection not closed at shutdown_timeout: %v", err)
			}
			if d := time.Since(start); d < tc.timeout*3/4 || d > tc.timeout+4*time.Second {
				t.Errorf("closed %v after the first reload; want about shutdown_timeout (%v)", d, tc.timeout)
			}
			waitGone(t, p.cmd.Process.Pid, "the first generation")
		})
	}
}

func TestReloadEdgeCases(t *testing.T) {
	b := startTLSBackend(t, "B", "load.test")

	t.Run("no traffic", func(t *testing.T) {
		p := startProxy(t, reloadCfg(b.addr, 2, true))
		for i := range 3 {
			pid, gen := p.reload(t)
			if gen != i+2 || p.pid() != pid {
				t.Fatalf("reload %d: pid %d gen %d, PID file %d", i, pid, gen, p.pid())
			}
			if got, err := tlsHello(t, p.addr, "load.test", b.pool); err != nil || got != "B load.test" {
				t.Fatalf("after reload %d: %q, %v", i, got, err)
			}
		}
	})

	t.Run("broken config", func(t *testing.T) {
		p := startProxy(t, reloadCfg(b.addr, 2, true))
		good, _ := os.ReadFile(p.cfgPath)
		os.WriteFile(p.cfgPath, append(good, []byte("not_a_key: 1\n")...), 0o600)
		out, err := exec.Command(p.bin, "reload", "-c", p.cfgPath).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "not_a_key") {
			t.Errorf("reload with a broken config: %v\n%s; want failure naming the key", err, out)
		}
		// The CLI refuses before asking; a SIGHUP reaches the master, which
		// must refuse too and keep serving.
		p.cmd.Process.Signal(syscall.SIGHUP)
		p.waitMetric(t, `sniproxy_reloads_total{result="failed"}`, 1)
		if p.pid() != p.cmd.Process.Pid {
			t.Errorf("PID file names %d; want the old master %d", p.pid(), p.cmd.Process.Pid)
		}
		if got, err := tlsHello(t, p.addr, "load.test", b.pool); err != nil || got != "B load.test" {
			t.Errorf("old generation not serving after a failed reload: %q, %v", got, err)
		}
		if !strings.Contains(p.logs.String(), "not_a_key") {
			t.Errorf("log does not say why the reload failed")
		}
	})

	t.Run("successor hangs", func(t *testing.T) {
		flag := filepath.Join(t.TempDir(), "hang")
		p := startProxyEnv(t, reloadCfg(b.addr, 2, true), "SNIPROXYTEST_UPGRADE_TIMEOUT=3s", "SNIPROXYTEST_HANG_IF_FILE="+flag)
		os.WriteFile(flag, nil, 0o600)
		start := time.Now()
		out, err := exec.Command(p.bin, "reload", "-c", p.cfgPath).CombinedOutput()
		if err == nil {
			t.Fatalf("reload with a hanging successor succeeded:\n%s", out)
		}
		t.Logf("reload failed after %v: %s", time.Since(start), strings.TrimSpace(string(out)))
		if got := p.metric(t, `sniproxy_reloads_total{result="failed"}`); got != 1 {
			t.Errorf("reloads_total{failed} = %v; want 1", got)
		}
		if p.pid() != p.cmd.Process.Pid {
			t.Errorf("PID file names %d; want the old master %d", p.pid(), p.cmd.Process.Pid)
		}
		if got, err := tlsHello(t, p.addr, "load.test", b.pool); err != nil || got != "B load.test" {
			t.Errorf("old generation not serving: %q, %v", got, err)
		}
		// The killed successor's workers must not linger: only the old
		// master's two workers are sniproxy workers now.
		deadline := time.Now().Add(10 * time.Second)
		for {
			n := countWorkers(t, p.bin, p.addr)
			if n == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d worker processes of this binary; want the old master's 2", n)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// And the next reload works.
		os.Remove(flag)
		if _, gen := p.reload(t); gen != 2 {
			t.Errorf("reload after a failed one: generation %d; want 2", gen)
		}
	})

	t.Run("back to back during a drain", func(t *testing.T) {
		echo := echoBackend(t)
		cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1)
		p := startProxy(t, cfg)
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, g1 := p.reload(t) // generation 1 drains c
		_, g2 := p.reload(t) // hurries generation 1, then upgrades
		if g1 != 2 || g2 != 3 {
			t.Errorf("generations %d, %d; want 2, 3", g1, g2)
		}
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Fatal("generation 1 still alive after being hurried")
		}
		if c2, err := openEcho(p.addr, "echo.test", 5*time.Second); err != nil {
			t.Errorf("after two quick reloads: %v", err)
		} else {
			c2.Close()
		}
	})
}

// countWorkers counts live `worker` processes running bin for the proxy
// listening on addr.
func countWorkers(t *testing.T, bin, addr string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		pid, _ := strconv.Atoi(e.Name())
		// This proxy's workers only (their --sockets name its listen
		// address): another test's may still be draining.
		if len(args) > 1 && args[1] == "worker" && strings.Contains(string(b), addr) && alive(pid) {
			if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && strings.TrimSuffix(exe, " (deleted)") == bin {
				n++
			}
		}
	}
	return n
}

func TestBinaryUpgrade(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "sniproxy")
	build := func(version string) {
		tmp := bin + ".new"
		out, err := exec.Command("go", "build", "-tags", "sniproxytest", "-o", tmp, "-ldflags", "-X main.version="+version, "../cmd/sniproxy").CombinedOutput()
		if err != nil {
			t.Fatalf("build %s: %v\n%s", version, err, out)
		}
		// Swap the file as a package manager does: rename over it.
		if err := os.Rename(tmp, bin); err != nil {
			t.Fatal(err)
		}
	}
	build("v1.0.0-e2e")
	b := startTLSBackend(t, "B", "load.test")
	p := startProxyBin(t, bin, reloadCfg(b.addr, 2, true))
	if got := p.metric(t, `sniproxy_build_info{goversion="`+goVersion(t)+`",version="v1.0.0-e2e"}`); got != 1 {
		t.Fatalf("build_info before: %v", got)
	}
	build("v2.0.0-e2e")
	stop := make(chan struct{})
	res, wg := tlsLoad(p.addr, "load.test", "B load.test", b, 4, stop)
	p.reload(t)
	time.Sleep(300 * time.Millisecond) // deliberate: load after the upgrade
	close(stop)
	wg.Wait()
	if res.failed() != 0 {
		t.Errorf("connections failed during the binary upgrade: %s", res)
	}
	if got := p.metric(t, `sniproxy_build_info{goversion="`+goVersion(t)+`",version="v2.0.0-e2e"}`); got != 1 {
		t.Errorf("build_info after the upgrade does not name v2.0.0-e2e")
	}
	out, err := exec.Command(bin, "status", "-c", p.cfgPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sniproxy v2.0.0-e2e") {
		t.Errorf("status after the upgrade: %v\n%s", err, out)
	}
}

func goVersion(t *testing.T) string {
	out, err := exec.Command("go", "env", "GOVERSION").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// startLimited starts a proxy of 2 workers with max_connections limit in
// front of an echo backend and opens n long connections through it; they
// are closed when the test ends.
func startLimited(t *testing.T, limit, n int) (*proxyProc, []net.Conn) {
	t.Helper()
	echo := echoBackend(t)
	cfg := strings.Replace(reloadCfg(echo, 2, true), `"load.test"`, `"echo.test"`, 1) + fmt.Sprintf("max_connections: %d\n", limit)
	p := startProxy(t, cfg)
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	for range n {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	return p, held
}

func TestReloadHoldsMaxConnections(t *testing.T) {
	p, held := startLimited(t, 6, 4)
	defer func() {
		for _, c := range held[4:] {
			c.Close()
		}
	}()
	p.reload(t)
	// The old generation's 4 still count: 2 more fit, not 6.
	ok := 0
	for range 4 {
		c, err := openEcho(p.addr, "echo.test", 3*time.Second)
		if err == nil {
			ok++
			held = append(held, c)
		}
	}
	if ok != 2 {
		t.Errorf("%d new connections admitted with 4 old ones open and max_connections 6; want 2", ok)
	}
	p.waitMetric(t, "sniproxy_connections_active", 6)
}

// TestReloadHurryHoldsMaxConnections: connections moved by a hurry keep
// counting against max_connections. Before, the hurried generation's
// permits came back before the moved connections took new ones (and they
// were served without), so with a limit of 4 and 4 long connections moved,
// new ones were admitted: 5 and more open at once.
func TestReloadHurryHoldsMaxConnections(t *testing.T) {
	p, held := startLimited(t, 4, 4)
	defer func() { // what got in beyond the first 4 (startLimited closes those)
		for _, c := range held[4:] {
			c.Close()
		}
	}()
	p.reload(t) // generation 1 drains with the 4
	// Clients keep trying while generation 2 hurries generation 1 (the 4
	// move to generation 2, which then drains): none may get in, at any
	// moment of the move.
	var mu sync.Mutex
	admitted := 0
	stop := loopClients(4, func() {
		if c, err := openEcho(p.addr, "echo.test", time.Second); err == nil {
			mu.Lock()
			admitted++
			held = append(held, c)
			mu.Unlock()
		}
	})
	p.reload(t)
	time.Sleep(500 * time.Millisecond) // deliberate: clients keep trying just after the reload too
	stop()
	if admitted > 0 {
		t.Errorf("%d new connections admitted during and after the hurry, with 4 open and max_connections 4", admitted)
	}
	for _, c := range held[4:] {
		c.Close()
	}
	held = held[:4]
	for i, c := range held {
		msg := fmt.Sprintf("still here %d\n", i)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("long connection %d after the hurry: %v", i, err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
			t.Fatalf("long connection %d after the hurry: %q, %v", i, buf, err)
		}
		c.SetDeadline(time.Time{})
	}
	for i := range 4 {
		if c, err := openEcho(p.addr, "echo.test", 2*time.Second); err == nil {
			held = append(held, c)
			t.Errorf("new connection %d admitted with 4 moved ones open and max_connections 4", i+1)
		}
	}
	p.waitMetric(t, "sniproxy_connections_active", 4)
}

func TestSystemdNotify(t *testing.T) {
	dir := t.TempDir()
	sockPath := filepath.Join(dir, "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	msgs := make(chan string, 32)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := ln.ReadFromUnix(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	b := startTLSBackend(t, "B", "load.test")
	p := startProxyEnv(t, reloadCfg(b.addr, 2, true), "NOTIFY_SOCKET="+sockPath)
	next := func() string {
		select {
		case m := <-msgs:
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("no sd_notify message")
			return ""
		}
	}
	if m := next(); m != fmt.Sprintf("MAINPID=%d\nREADY=1", p.cmd.Process.Pid) {
		t.Errorf("first notify %q", m)
	}
	pid, _ := p.reload(t)
	if m := next(); m != fmt.Sprintf("MAINPID=%d\nREADY=1", pid) {
		t.Errorf("notify after reload %q; want MAINPID=%d", m, pid)
	}
	// Workers never get the notify socket.
	for _, k := range p.workersOf(t, pid, 2) {
		env, _ := os.ReadFile("/proc/" + strconv.Itoa(k) + "/environ")
		if strings.Contains(string(env), "NOTIFY_SOCKET") {
			t.Errorf("worker %d has NOTIFY_SOCKET", k)
		}
	}
	syscall.Kill(pid, syscall.SIGTERM)
	if m := next(); m != "STOPPING=1" {
		t.Errorf("notify on stop %q; want STOPPING=1", m)
	}
}
