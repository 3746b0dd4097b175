package e2e

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/backendtest"
)

// idBackend is a plain TCP backend that answers each connection with its
// id on a line, then reads until EOF. It can be stopped (its listener
// closed: a dead backend; connections it accepted finish) and started
// again on the same address.
type idBackend struct {
	t        *testing.T
	id       string
	addr     string
	accepted atomic.Int64

	mu sync.Mutex
	ln net.Listener
}

func startIDBackend(t *testing.T, id string) *idBackend {
	t.Helper()
	b := &idBackend{t: t, id: id, addr: "127.0.0.1:0"}
	b.start()
	t.Cleanup(b.stop)
	return b
}

// start listens on b.addr (again).
func (b *idBackend) start() {
	b.t.Helper()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if ln, err = net.Listen("tcp", b.addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // the port is in TIME_WAIT use: try again
	}
	if err != nil {
		b.t.Fatal(err)
	}
	b.mu.Lock()
	b.ln, b.addr = ln, ln.Addr().String()
	b.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepted.Add(1)
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				fmt.Fprintf(c, "%s\n", b.id)
				io.Copy(io.Discard, c)
			}()
		}
	}()
}

// stop closes the listener.
func (b *idBackend) stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ln != nil {
		b.ln.Close()
		b.ln = nil
	}
}

// askFrom sends an HTTP request for host through the proxy from local
// address from (nil: any) and returns the id of the backend that answered;
// keep leaves the connection open (the caller closes it).
func askFrom(proxy, host string, from *net.TCPAddr) (string, net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != nil {
		d.LocalAddr = from
	}
	c, err := d.Dial("tcp", proxy)
	if err != nil {
		return "", nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", host); err != nil {
		c.Close()
		return "", nil, err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		return "", nil, fmt.Errorf("reading the backend's id: %w", err)
	}
	c.SetDeadline(time.Time{})
	return strings.TrimSpace(line), c, nil
}

// ask is askFrom from any address, closing the connection.
func ask(proxy, host string) (string, error) {
	id, c, err := askFrom(proxy, host, nil)
	if c != nil {
		c.Close()
	}
	return id, err
}

// counts asks n times and counts the answers by backend id.
func counts(t *testing.T, proxy, host string, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		id, err := ask(proxy, host)
		if err != nil {
			t.Fatalf("ask %s: %v", host, err)
		}
		got[id]++
	}
	return got
}

const poolConfig = `
listen_addrs: ["LISTEN"]
metrics: {enabled: true, address: "METRICS"}
timeouts: {connect: 5, client_hello: 2, idle: 60}
shutdown_timeout: 5
log: {level: info, format: json}
control_socket: "CTLSOCK"
allowlist: ["localhost"]
`

// TestPoolRoundRobinWeights: weights 3 and 1 split connections 3:1
// exactly within a worker (smooth weighted round robin), and the
// per-backend connection counter says so.
func TestPoolRoundRobinWeights(t *testing.T) {
	a, b := startIDBackend(t, "A"), startIDBackend(t, "B")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 1
routes:
  - {match: pool.test, backends: [{address: %q, weight: 3}, %q]}
`, a.addr, b.addr))
	got := counts(t, p.addr, "pool.test", 40)
	if got["A"] != 30 || got["B"] != 10 {
		t.Errorf("got %v; want A 30, B 10", got)
	}
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_connections_total{backend=%q,route="pool.test"}`, a.addr), 30)
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_connections_total{backend=%q,route="pool.test"}`, b.addr), 10)
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_up{backend=%q,route="pool.test"}`, a.addr), 1)
}

// TestPoolLeastConn: with connections held open, least_conn sends each new
// one to the backend with the fewest (weights 2 and 1: twice as many to
// A), and the active gauge counts them.
func TestPoolLeastConn(t *testing.T) {
	a, b := startIDBackend(t, "A"), startIDBackend(t, "B")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 1
routes:
  - {match: pool.test, balance: least_conn, backends: [{address: %q, weight: 2}, %q]}
`, a.addr, b.addr))
	got := map[string]int{}
	for range 9 {
		id, c, err := askFrom(p.addr, "pool.test", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		got[id]++
	}
	if got["A"] != 6 || got["B"] != 3 {
		t.Errorf("held connections %v; want A 6, B 3", got)
	}
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_connections_active{backend=%q,route="pool.test"}`, a.addr), 6)
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_connections_active{backend=%q,route="pool.test"}`, b.addr), 3)
}

// TestPoolSourceHashAcrossWorkers: the same client address reaches the
// same backend whichever of two workers accepts it; clients from distinct
// loopback addresses (127.0.0.2...) spread over the backends.
func TestPoolSourceHashAcrossWorkers(t *testing.T) {
	bs := []*idBackend{startIDBackend(t, "A"), startIDBackend(t, "B"), startIDBackend(t, "C")}
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 2
routes:
  - {match: pool.test, balance: source_hash, backends: [%q, %q, %q]}
`, bs[0].addr, bs[1].addr, bs[2].addr))
	p.workers(t, 2)
	used := map[string]int{}
	for i := 2; i < 26; i++ {
		from := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i))}
		first := ""
		for range 6 {
			id, c, err := askFrom(p.addr, "pool.test", from)
			if err != nil {
				t.Fatalf("from %v: %v", from.IP, err)
			}
			c.Close()
			if first == "" {
				first = id
			} else if id != first {
				t.Fatalf("client %v reached %s, then %s", from.IP, first, id)
			}
		}
		used[first]++
	}
	if len(used) < 2 {
		t.Errorf("24 client addresses all reached %v; want a spread", used)
	}
	// Some client address was served by both workers: the same backend
	// from each (checked above).
	var lines []map[string]any
	waitFor(t, "access log lines", func() bool { lines = p.logLines("connection"); return len(lines) >= 24*6 })
	workersOf := map[string]map[any]bool{}
	for _, l := range lines {
		host, _, _ := net.SplitHostPort(fmt.Sprint(l["client"]))
		if workersOf[host] == nil {
			workersOf[host] = map[any]bool{}
		}
		workersOf[host][l["pid"]] = true
	}
	both := 0
	for _, w := range workersOf {
		if len(w) == 2 {
			both++
		}
	}
	if both == 0 {
		t.Errorf("no client address was served by both workers: %v", workersOf)
	}
	t.Logf("backends by client count: %v; client addresses served by both workers: %d of %d", used, both, len(workersOf))
}

// TestPoolFailoverNoClientErrors: looping clients see no failure while a
// backend of the pool is stopped and started again; the backend goes down
// and comes back up (logged), and serves again.
func TestPoolFailoverNoClientErrors(t *testing.T) {
	a, b := startIDBackend(t, "A"), startIDBackend(t, "B")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 2
routes:
  - match: pool.test
    backends: [%q, %q]
    health_check: {type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}
`, a.addr, b.addr))
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := loopClients(4, func() {
		if _, err := ask(p.addr, "pool.test"); err != nil {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, err.Error())
		} else {
			ok.Add(1)
		}
	})
	waitFor(t, "traffic", func() bool { return ok.Load() > 50 })
	b.stop()
	waitFor(t, "B down", func() bool { return len(downLines(p, b.addr)) > 0 })
	before := ok.Load()
	waitFor(t, "traffic with B down", func() bool { return ok.Load() > before+50 })
	ups := len(upLines(p, b.addr))
	b.start()
	waitFor(t, "B up again", func() bool { return len(upLines(p, b.addr)) > ups })
	served := b.accepted.Load()
	waitFor(t, "B serving again", func() bool { return b.accepted.Load() > served+10 })
	stop()
	// Stopping a backend resets the connections in its accept queue (the
	// kernel does, when the listener closes): those reached it before it
	// stopped, and no proxy can save them. Every other request must succeed: no client is refused for
	// want of a backend, none reaches the stopped one after it stopped.
	killed := 0
	for _, l := range p.logLines("connection") {
		if l["result"] == "dial_error" {
			t.Errorf("a client was refused: %v", l)
		}
		if l["backend"] == b.addr && (l["result"] == "reset" || l["result"] == "error") && l["bytes_out"] == 0.0 {
			killed++
		}
	}
	if f := failed.Load(); f > int64(killed) {
		t.Errorf("%d of %d requests failed (first: %v); the stopped backend reset %d", f, ok.Load()+f, firstErr.Load(), killed)
	}
	t.Logf("%d requests, %d failed, %d of them reset by the backend as it stopped", ok.Load()+failed.Load(), failed.Load(), killed)
}

// downLines and upLines return the log lines of backend addr going down
// or up.
func downLines(p *proxyProc, addr string) []map[string]any {
	return stateLines(p, "backend down", addr)
}
func upLines(p *proxyProc, addr string) []map[string]any { return stateLines(p, "backend up", addr) }

func stateLines(p *proxyProc, msg, addr string) []map[string]any {
	var out []map[string]any
	for _, l := range p.logLines(msg) {
		if l["backend"] == addr {
			out = append(out, l)
		}
	}
	return out
}

// TestHealthProbesOncePerInterval: with three workers the backend sees
// one check per interval, from the master, not one per worker.
func TestHealthProbesOncePerInterval(t *testing.T) {
	b := startIDBackend(t, "A")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 3
routes:
  - {match: a.test, backends: [%q], health_check: {type: tcp, interval: 200ms, timeout: 100ms}}
  - {match: b.test, backends: [%q], health_check: {type: tcp, interval: 200ms, timeout: 100ms}}
`, b.addr, b.addr))
	p.workers(t, 3)
	n0, t0 := b.accepted.Load(), time.Now()
	waitFor(t, "15 checks", func() bool { return b.accepted.Load() >= n0+15 })
	elapsed := time.Since(t0)
	// One prober at 200ms ±10%: at most elapsed/180ms + 1 checks. One per
	// worker or per route would be three or two times as many.
	n := b.accepted.Load() - n0
	if most := int64(elapsed/(180*time.Millisecond)) + 2; n > most {
		t.Errorf("%d checks in %v; want at most %d (one per interval)", n, elapsed, most)
	}
	if least := int64(elapsed / (250 * time.Millisecond)); n < least {
		t.Errorf("%d checks in %v; want at least %d", n, elapsed, least)
	}
	t.Logf("%d checks in %v", n, elapsed.Round(time.Millisecond))
}

// TestHealthKeptAcrossReload: a backend that accepts TCP but fails the TLS
// check is down, and right after a reload the new generation has it down
// too: every connection goes to the healthy backend.
func TestHealthKeptAcrossReload(t *testing.T) {
	good := startTLSBackend(t, "G", "app.test")
	bad := rawBackend(t, func(c net.Conn) { fmt.Fprintf(c, "not tls\n") })
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 2
pid_file: "PIDFILE"
routes:
  - match: app.test
    backends: [%q, %q]
    health_check: {type: tls, interval: 300ms, timeout: 200ms, rise: 100, fall: 1}
`, bad, good.addr))
	series := fmt.Sprintf(`sniproxy_backend_up{backend=%q,route="app.test"}`, bad)
	p.waitMetric(t, series, 0)
	check := func(when string) {
		t.Helper()
		for i := range 20 {
			line, err := tlsHello(t, p.addr, "app.test", good.pool)
			if err != nil || line != "G app.test" {
				t.Fatalf("%s: connection %d: got %q, %v; want G", when, i, line, err)
			}
		}
	}
	check("before the reload")
	_, gen := p.reload(t)
	if gen != 2 {
		t.Fatalf("generation %d after the reload", gen)
	}
	if v := p.metric(t, series); v != 0 {
		t.Errorf("right after the reload %s = %v; want 0", series, v)
	}
	check("right after the reload")
	if n := len(upLines(p, bad)); n != 0 {
		t.Errorf("the bad backend went up %d times", n)
	}
	if got := len(downLines(p, bad)); got != 1 {
		t.Errorf("%d 'backend down' lines for it; want 1 (the new generation inherits the state)", got)
	}
	// sniproxy status, text and JSON, lists both backends with their state.
	out, code := run(t, nil, "status", "-c", p.cfgPath)
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	for _, want := range []string{"ROUTE", bad + "  ", good.addr + "  ", "down", "tls handshake"} {
		if !strings.Contains(out, want) {
			t.Errorf("status does not say %q:\n%s", want, out)
		}
	}
	out, code = run(t, nil, "status", "-c", p.cfgPath, "--json")
	var st struct {
		Backends []struct {
			Route       string    `json:"route"`
			Address     string    `json:"address"`
			LastError   string    `json:"last_error"`
			Up          bool      `json:"up"`
			Since       time.Time `json:"since"`
			Connections uint64    `json:"connections"`
		} `json:"backends"`
	}
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil {
		t.Fatalf("status --json: exit %d, %v\n%s", code, err, out)
	}
	if len(st.Backends) != 2 {
		t.Fatalf("status --json lists %d backends; want 2:\n%s", len(st.Backends), out)
	}
	b, g := st.Backends[0], st.Backends[1]
	if b.Address != bad || b.Up || b.Since.IsZero() || !strings.Contains(b.LastError, "tls handshake") {
		t.Errorf("bad backend in status: %+v", b)
	}
	if g.Address != good.addr || !g.Up {
		t.Errorf("good backend in status: %+v; want up", g)
	}
	// The connections of both generations: the old one's draining workers
	// push their last counts through the state socket.
	p.waitMetric(t, fmt.Sprintf(`sniproxy_backend_connections_total{backend=%q,route="app.test"}`, good.addr), 40)
}

// TestPoolBackups: a backup serves only while no primary is up.
func TestPoolBackups(t *testing.T) {
	a, k := startIDBackend(t, "A"), startIDBackend(t, "K")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 2
routes:
  - match: pool.test
    backends: [%q, {address: %q, backup: true}]
    health_check: {type: tcp, interval: 200ms, timeout: 100ms, rise: 1, fall: 1}
`, a.addr, k.addr))
	if got := counts(t, p.addr, "pool.test", 10); got["A"] != 10 {
		t.Errorf("primary up: %v; want all to A", got)
	}
	a.stop()
	if got := counts(t, p.addr, "pool.test", 10); got["K"] != 10 {
		t.Errorf("primary stopped: %v; want all to the backup", got)
	}
	ups := len(upLines(p, a.addr))
	a.start()
	waitFor(t, "A up again", func() bool { return len(upLines(p, a.addr)) > ups })
	if got := counts(t, p.addr, "pool.test", 10); got["A"] != 10 {
		t.Errorf("primary back: %v; want all to A", got)
	}
}

// TestDefaultBackend: SSH (no known protocol), a TLS hello without SNI and
// a name that finds no route go to the default backend with their bytes
// unchanged; a silent client is still sniff_timeout, a denylisted name is
// still denied.
func TestDefaultBackend(t *testing.T) {
	var got sync.Map
	ssh := rawBackend(t, func(c net.Conn) {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return
		}
		got.Store(line, true)
		fmt.Fprintf(c, "SSH-2.0-backend\r\n")
	})
	p := startProxy(t, strings.Replace(poolConfig, "client_hello: 2", "client_hello: 1", 1)+fmt.Sprintf(`workers: 2
denylist: ["evil.test"]
default_backend: %q
`, ssh))
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "SSH-2.0-OpenSSH_9.6\r\n")
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "SSH-2.0-backend\r\n" {
		t.Fatalf("ssh: got %q, %v; want the backend's banner", line, err)
	}
	if _, ok := got.Load("SSH-2.0-OpenSSH_9.6\r\n"); !ok {
		t.Error("the backend did not get the client's banner unchanged")
	}

	// A TLS hello without SNI: a TLS default backend answers it.
	tb := startTLSBackend(t, "D", "default.test")
	p2 := startProxy(t, poolConfig+fmt.Sprintf(`workers: 1
default_backend: %q
denylist: ["evil.test"]
`, tb.addr))
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", p2.addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("tls without sni: %v", err)
	}
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if line, err := bufio.NewReader(tc).ReadString('\n'); err != nil || line != "D \n" {
		t.Errorf("tls without sni: got %q, %v; want the default backend", line, err)
	}
	tc.Close()
	// A name not in the allowlist: the default backend too.
	if line, err := tlsHello(t, p2.addr, "default.test", tb.pool); err != nil || line != "D default.test" {
		t.Errorf("no route: got %q, %v; want the default backend", line, err)
	}
	// A denylisted name: refused, never the default.
	dc, err := net.Dial("tcp", p2.addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(dc, "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
	expectClosed(t, dc, 5*time.Second)
	dc.Close()
	p2.waitMetric(t, `sniproxy_connections_rejected_total{reason="denied"}`, 1)

	// A client that sends nothing: sniff_timeout, not the default.
	sc, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	expectClosed(t, sc, 5*time.Second)
	sc.Close()
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="sniff_timeout"}`, 1)
	p.waitMetric(t, `sniproxy_connections_total{protocol="unknown"}`, 2)
}

// alpnBackend is a TLS backend that offers protos and greets each client
// with "id alpn\n".
func alpnBackend(t *testing.T, id string, protos ...string) string {
	t.Helper()
	cert, _ := backendtest.Cert(t, "app.test")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: protos})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				tc.SetDeadline(time.Now().Add(10 * time.Second))
				if tc.Handshake() != nil {
					return
				}
				fmt.Fprintf(tc, "%s %s\n", id, tc.ConnectionState().NegotiatedProtocol)
			}()
		}
	}()
	return ln.Addr().String()
}

// alpnHello connects with SNI name offering protos and returns the greeting.
func alpnHello(proxy, name string, protos ...string) (string, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", proxy,
		&tls.Config{ServerName: name, NextProtos: protos, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// TestALPNAndRegexRoutes: acme-tls/1 and h2 go to their own backends, the
// rest of the name's traffic to the site; a ~regex route matches whole
// names only.
func TestALPNAndRegexRoutes(t *testing.T) {
	acme := alpnBackend(t, "ACME", "acme-tls/1")
	h2 := alpnBackend(t, "H2", "h2")
	site := alpnBackend(t, "SITE", "http/1.1")
	re := alpnBackend(t, "RE", "http/1.1")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 2
routes:
  - {match: app.test, alpn: ["acme-tls/1"], backend: %q}
  - {match: app.test, alpn: ["h2"], backend: %q}
  - {match: app.test, backend: %q}
  - {match: '~web-[0-9]+\.test', backend: %q}
`, acme, h2, site, re))
	for _, tt := range []struct {
		name   string
		protos []string
		want   string
	}{
		{"app.test", []string{"acme-tls/1"}, "ACME acme-tls/1"},
		{"app.test", []string{"h2", "http/1.1"}, "H2 h2"},
		{"app.test", []string{"http/1.1"}, "SITE http/1.1"},
		{"app.test", nil, "SITE"},
		{"web-12.test", []string{"http/1.1"}, "RE http/1.1"},
	} {
		if got, err := alpnHello(p.addr, tt.name, tt.protos...); err != nil || got != tt.want {
			t.Errorf("%s offering %v: got %q, %v; want %q", tt.name, tt.protos, got, err, tt.want)
		}
	}
	// Not a whole-name match: no route (and not in the allowlist).
	if got, err := alpnHello(p.addr, "web-12.test.evil", "http/1.1"); err == nil {
		t.Errorf("web-12.test.evil reached %q; want refused", got)
	}
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="denied"}`, 1)
}

// TestRouteIdleTimeout: a route's own idle timeout closes its idle pairs;
// another route keeps the global one.
func TestRouteIdleTimeout(t *testing.T) {
	b := startIDBackend(t, "A")
	p := startProxy(t, poolConfig+fmt.Sprintf(`workers: 1
routes:
  - {match: short.test, backend: %q, timeouts: {idle: 1s}}
  - {match: long.test, backend: %q}
`, b.addr, b.addr))
	_, short, err := askFrom(p.addr, "short.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer short.Close()
	_, long, err := askFrom(p.addr, "long.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	t0 := time.Now()
	short.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := short.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("short.test: read %d, %v; want EOF", n, err)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("short.test still open after 5s; want closed after 1s idle")
	}
	if d := time.Since(t0); d < 700*time.Millisecond || d > 3*time.Second {
		t.Errorf("short.test closed after %v; want about 1s", d)
	}
	// The other route's pair is still open (global idle: 60s).
	long.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := long.Read(make([]byte, 1)); err == nil {
		t.Fatal("long.test: got a byte")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Errorf("long.test closed (%v); want open", err)
	}
}
