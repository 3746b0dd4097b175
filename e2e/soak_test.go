package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	binenc "encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestSoak's size. CI runs the default; the full size is
// `go test -count=1 -run TestSoak ./e2e -soak.n 100000 -soak.c 48`.
var (
	soakN    = flag.Int("soak.n", 3000, "connections in TestSoak's chaos phase (full size: 100000)")
	soakConc = flag.Int("soak.c", 24, "concurrent clients in TestSoak")
	soakSeed = flag.Uint64("soak.seed", 1, "seed of TestSoak's mix of client and backend behaviours")
)

// soakConfig: two workers on SO_REUSEPORT sockets, short timeouts so that
// the faults end quickly, and one route per backend behaviour. Names
// outside the routes are refused by the allowlist (no DNS).
const soakConfig = `
listeners: [{address: "LISTEN", reuseport: true}]
metrics: {enabled: true, address: "METRICS"}
timeouts: {connect: 2s, client_hello: 2s, idle: 2s}
shutdown_timeout: 5
log: {level: info, format: json}
workers: 2
control_socket: "CTLSOCK"
pid_file: "PIDFILE"
allowlist: ["localhost"]
routes:
  - {match: "*.echo.soak.test", backend: "ECHO"}
  - {match: "*.tls.soak.test", backend: "TLSB"}
  - {match: "*.refuse.soak.test", backend: "REFUSED"}
  - {match: "*.hole.soak.test", backend: "HOLE"}
  - {match: "*.die.soak.test", backend: "DIE"}
`

// soakKind is one client behaviour (with the backend behaviour its name
// routes to).
type soakKind uint8

const (
	soakEcho    soakKind = iota // HTTP/1 upload echoed back: verified
	soakServe                   // HTTP/1 download of a seeded payload: verified
	soakTLS                     // TLS end to end, echo: verified
	soakSilent                  // half-close, silence, then read the echo: verified
	soakReset                   // client resets mid-stream
	soakSlow                    // slowloris: the head a byte at a time, never finished
	soakGarbage                 // bytes that are no protocol
	soakEmpty                   // connect, close at once
	soakDenied                  // a name the allowlist refuses
	soakRefused                 // the backend refuses connections
	soakHole                    // the backend accepts and never reads
	soakDie                     // the backend dies mid-transfer
)

// soakMix is the weight of each behaviour (per 1000) and the access log
// "result" values its line may carry.
var soakMix = []struct {
	kind    soakKind
	name    string
	weight  int
	results []string
}{
	{soakEcho, "echo", 380, []string{"ok"}},
	{soakServe, "serve", 200, []string{"ok"}},
	{soakTLS, "tls", 60, []string{"ok"}},
	{soakSilent, "half-close+silence", 60, []string{"ok"}},
	{soakReset, "client reset", 70, []string{"ok", "reset", "error", "sniff_error"}},
	{soakSlow, "slowloris", 10, []string{"sniff_timeout"}},
	{soakGarbage, "garbage", 60, []string{"sniff_error"}},
	{soakEmpty, "empty", 30, []string{"sniff_error"}},
	{soakDenied, "denied", 30, []string{"denied"}},
	{soakRefused, "backend refuses", 40, []string{"dial_error"}},
	{soakHole, "backend never reads", 10, []string{"idle", "backend_error"}},
	{soakDie, "backend dies", 50, []string{"ok", "reset", "error"}},
}

// soakPick returns the behaviour of connection i: the same for a seed.
func soakPick(seed uint64, i int) (soakKind, *rand.Rand) {
	r := rand.New(rand.NewPCG(seed, uint64(i)))
	x := r.IntN(1000)
	for _, m := range soakMix {
		if x < m.weight {
			return m.kind, r
		}
		x -= m.weight
	}
	panic("soakMix weights do not add up to 1000")
}

// soakPayload returns n bytes seeded by seed and i.
func soakPayload(seed uint64, i, n int) []byte {
	var key [32]byte
	binenc.LittleEndian.PutUint64(key[:], seed)
	binenc.LittleEndian.PutUint64(key[8:], uint64(i))
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

// soakSize picks a transfer size: mostly small, some up to 1 MiB.
func soakSize(r *rand.Rand) int {
	switch x := r.IntN(100); {
	case x < 70:
		return r.IntN(8 << 10)
	case x < 98:
		return 8<<10 + r.IntN(120<<10)
	default:
		return 128<<10 + r.IntN(896<<10)
	}
}

// soakIP is connection i's own source address in 127.0.0.0/8, so that its
// access-log line (the "client" field) names it whatever port it got.
func soakIP(i int) net.IP {
	return net.IPv4(127, byte(10+i>>16), byte(i>>8), byte(i))
}

// soakRec is what a client saw of its connection.
type soakRec struct {
	kind     soakKind
	client   string // the local address; "" if the dial failed
	start    time.Time
	end      time.Time
	verified bool  // a transfer completed with the right SHA-256
	bytes    int   // bytes verified
	unmet    error // the behaviour's expectation not met: only a killed worker excuses it
	corrupt  error // bytes other than those sent or served: never excused
}

// soakKill is one SIGKILL of a worker: the kill syscall ran between at and
// done; the worker died (and its sockets closed) soon after.
type soakKill struct {
	pid      int
	at, done time.Time
}

// soakChaos kills workers at random and runs the reloads; errors are
// collected for the test goroutine.
type soakChaos struct {
	mu      sync.Mutex
	kills   []soakKill
	reloads []string
	errs    []error
}

func (c *soakChaos) fail(err error) {
	c.mu.Lock()
	c.errs = append(c.errs, err)
	c.mu.Unlock()
}

// soakEnv is what the clients need.
type soakEnv struct {
	proxy string
	seed  uint64
	pool  *x509.CertPool
}

// TestSoak drives connections with a seeded mix of client and backend
// faults through the proxy (two workers) while workers are SIGKILLed at
// random and two reloads happen, then checks that:
//   - every transfer that completed has the SHA-256 of what was sent or
//     served, and no client ever got a byte that was not;
//   - every connection a client made has exactly one access-log line with a
//     result its behaviour allows, or none and was open when a worker was
//     killed (a SIGKILLed worker writes no line for what it held); a hurry
//     may close connections still sniffed or dialled (soakCheckConns);
//   - the counters balance: during the chaos within the bounds the kills
//     allow (a killed worker loses its last second of counts, see
//     soakCheckCounters); in a final phase without kills exactly: accepted
//     (sum of sniproxy_connections_total) = the connections made = their
//     access-log lines = finished (lines of proxied connections) + rejected
//     (sum of sniproxy_connections_rejected_total = rejection lines), and
//     the byte counters = the lines' bytes;
//   - the processes come back to their baseline (soakBack): every fd but
//     pipes exactly, threads and RSS within a bound. (The binary exposes no
//     goroutine count; threads stand in for it.)
//
// Size: -soak.n (default 3,000, for CI: ~25 s here), -soak.c concurrent
// clients, -soak.seed.
func TestSoak(t *testing.T) {
	seed, n, conc := *soakSeed, *soakN, *soakConc
	env := &soakEnv{seed: seed}
	echo := rawBackend(t, func(c net.Conn) { soakBackend(c, seed, false) })
	die := rawBackend(t, func(c net.Conn) { soakBackend(c, seed, true) })
	hole := rawBackend(t, func(c net.Conn) {
		select { // accept, never read; hold until the test ends or 15 s pass
		case <-t.Context().Done():
		case <-time.After(15 * time.Second):
		}
	})
	tlsb := startTLSBackend(t, "soak", "*.tls.soak.test")
	env.pool = tlsb.pool
	cfg := strings.NewReplacer("ECHO", echo, "TLSB", tlsb.addr, "REFUSED", fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		"HOLE", hole, "DIE", die).Replace(soakConfig)
	p := startProxy(t, cfg)
	env.proxy = p.addr
	// The baseline is a successor's: the first master, started by hand,
	// holds a different set of fds (stdin, tableflip's copies) than every
	// generation after it, which all hold the same.
	p.reload(t)

	// Index ranges of the phases: each connection has its own source IP.
	warm, clean := 200, max(n/10, 300)
	chaosFrom, cleanFrom := warm, warm+n
	t0 := time.Now()
	recs := make([]soakRec, warm+n+clean)

	// The time bound of the whole load: 60 s plus 20 ms a connection
	// (3,000: 2 min; 100,000: 34 min); a client's own deadline is 20 s.
	deadline := time.Now().Add(60*time.Second + time.Duration(warm+n+clean)*20*time.Millisecond)

	// Warm up with 200 connections of the same mix, then the baseline.
	soakLoad(env, recs, 0, warm, conc, nil, deadline)
	soakQuiet(t, p, 30*time.Second)
	base := soakProcs(t, p)

	// Chaos.
	chaos := &soakChaos{}
	var started atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { soakKiller(p, chaos, seed, stop) })
	wg.Go(func() { soakReloader(p, chaos, &started, n, stop) })
	tc := time.Now()
	soakLoad(env, recs, chaosFrom, n, conc, &started, deadline)
	chaosTime := time.Since(tc)
	close(stop)
	wg.Wait()
	for _, err := range chaos.errs {
		t.Error(err)
	}
	if len(chaos.reloads) != 2 {
		t.Errorf("%d reloads ran; want 2", len(chaos.reloads))
	}
	if len(chaos.kills) == 0 {
		t.Errorf("no worker was killed")
	}
	m1 := soakQuiet(t, p, 30*time.Second)

	// The clean phase: no kills, no reloads: the counters must balance exactly.
	soakLoad(env, recs, cleanFrom, clean, conc, nil, deadline)
	m2 := soakQuiet(t, p, 30*time.Second)
	total := time.Since(t0)

	lines, hurries := soakLines(t, p)
	soakCheckConns(t, recs, lines, chaos.kills, hurries)
	soakCheckCounters(t, recs, lines, chaos.kills, m1, m2, cleanFrom)
	after := soakBack(t, p, base, conc)
	soakReport(t, recs, lines, chaos, m2, base, after, chaosTime, total, n)
}

// soakLoad runs connections from..from+n on conc clients; started counts
// the connections begun. Past the deadline it starts no more: they stay
// unstarted, and the test fails on them.
func soakLoad(env *soakEnv, recs []soakRec, from, n, conc int, started *atomic.Int64, deadline time.Time) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for i := range next {
				soakClient(env, i, &recs[i])
			}
		})
	}
	for i := from; i < from+n; i++ {
		if time.Now().After(deadline) {
			recs[i].unmet = errors.New("not started: the soak's time bound passed")
			continue
		}
		if started != nil {
			started.Add(1)
		}
		next <- i
	}
	close(next)
	wg.Wait()
}

// soakClient runs connection i with its behaviour and records what it saw.
func soakClient(env *soakEnv, i int, rec *soakRec) {
	kind, r := soakPick(env.seed, i)
	rec.kind = kind
	rec.start = time.Now()
	defer func() { rec.end = time.Now() }()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: soakIP(i)}}
	nc, err := d.Dial("tcp", env.proxy)
	if err != nil {
		rec.unmet = fmt.Errorf("dial: %w", err)
		return
	}
	c := nc.(*net.TCPConn)
	defer c.Close()
	rec.client = c.LocalAddr().String()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	head := func(method, path, domain string) []byte {
		return fmt.Appendf(nil, "%s %s HTTP/1.1\r\nHost: c%d.%s\r\n\r\n", method, path, i, domain)
	}
	switch kind {
	case soakEcho:
		payload := soakPayload(env.seed, i, soakSize(r))
		got, err := soakExchange(c, c, c.CloseWrite, head("POST", "/echo", "echo.soak.test"), payload)
		rec.judge(payload, got, err, true)
	case soakServe:
		size := soakSize(r)
		want := soakPayload(env.seed, i, size)
		got, err := soakExchange(c, c, c.CloseWrite, head("GET", fmt.Sprintf("/serve/%d/%d", size, i), "echo.soak.test"), nil)
		rec.judge(want, got, err, true)
	case soakTLS:
		payload := soakPayload(env.seed, i, r.IntN(64<<10))
		name := fmt.Sprintf("c%d.tls.soak.test", i)
		tc := tls.Client(c, &tls.Config{ServerName: name, RootCAs: env.pool})
		if err := tc.Handshake(); err != nil {
			rec.unmet = fmt.Errorf("tls handshake: %w", err)
			return
		}
		br := bufio.NewReader(tc)
		line, err := br.ReadString('\n')
		if err != nil {
			rec.unmet = fmt.Errorf("greeting: %w", err)
			return
		}
		if line != "soak "+name+"\n" {
			rec.corrupt = fmt.Errorf("greeting %q; want %q", line, "soak "+name)
			return
		}
		got, err := soakExchange(tc, br, tc.CloseWrite, nil, payload)
		rec.judge(payload, got, err, true)
	case soakSilent:
		payload := soakPayload(env.seed, i, r.IntN(8<<10))
		if _, err := c.Write(append(head("POST", "/echo", "echo.soak.test"), payload...)); err != nil {
			rec.unmet = fmt.Errorf("write: %w", err)
			return
		}
		c.CloseWrite()
		<-time.After(time.Duration(r.IntN(400)) * time.Millisecond) // the behaviour: silence, reading nothing
		got, err := io.ReadAll(c)
		rec.judge(payload, got, err, true)
	case soakReset:
		payload := soakPayload(env.seed, i, soakSize(r))
		c.Write(append(head("POST", "/echo", "echo.soak.test"), payload[:r.IntN(len(payload)+1)]...))
		c.SetLinger(0)
		c.Close() // RST
	case soakSlow:
		soakSlowloris(c, head("GET", "/", "echo.soak.test"), rec)
	case soakGarbage:
		b := soakPayload(env.seed, i, 1+r.IntN(512))
		b[0] = byte(r.IntN(0x16)) // not 0x16 (TLS) nor a letter (HTTP)
		c.Write(b)
		rec.expectClose(c, 3*time.Second)
	case soakEmpty:
	case soakDenied:
		c.Write(head("GET", "/", "nowhere.test"))
		rec.expectClose(c, 3*time.Second)
	case soakRefused:
		c.Write(head("GET", "/", "refuse.soak.test"))
		rec.expectClose(c, 5*time.Second)
	case soakHole:
		go func() { // the backend reads nothing: writes stall, the idle timeout ends it
			c.Write(head("POST", "/echo", "hole.soak.test"))
			c.Write(make([]byte, 1<<20))
		}()
		rec.expectClose(c, 8*time.Second)
	case soakDie:
		size := 16<<10 + soakSize(r)
		want := soakPayload(env.seed, i, size)
		got, err := soakExchange(c, c, c.CloseWrite, head("GET", fmt.Sprintf("/serve/%d/%d", size, i), "die.soak.test"), nil)
		rec.judge(want, got, err, false)
	}
}

// soakExchange writes head and payload (then closes the write side) while
// reading everything that comes back until EOF.
func soakExchange(w io.Writer, r io.Reader, closeWrite func() error, head, payload []byte) ([]byte, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := w.Write(append(head, payload...))
		if err == nil {
			err = closeWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(r)
	if err := <-werr; err != nil && rerr == nil {
		rerr = fmt.Errorf("write: %w", err)
	}
	return got, rerr
}

// judge records a transfer that should have delivered want: got must be a
// prefix of want (else corrupt); complete says a whole, clean transfer is
// expected (else unmet); a backend that dies mid-transfer delivers a prefix.
func (rec *soakRec) judge(want, got []byte, err error, complete bool) {
	if len(got) > len(want) || !bytes.Equal(got, want[:len(got)]) {
		rec.corrupt = fmt.Errorf("%d bytes back are not a prefix of the %d expected", len(got), len(want))
		return
	}
	if !complete {
		if len(got) == len(want) {
			rec.corrupt = fmt.Errorf("all %d bytes came from a backend that sends half", len(got))
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			rec.unmet = err
		}
		rec.verified, rec.bytes = true, len(got)
		return
	}
	if err != nil || sha256.Sum256(got) != sha256.Sum256(want) {
		rec.unmet = fmt.Errorf("got %d of %d bytes: %v", len(got), len(want), err)
		return
	}
	rec.verified, rec.bytes = true, len(got)
}

// expectClose expects the proxy to close c within d without sending a byte.
func (rec *soakRec) expectClose(c net.Conn, d time.Duration) {
	c.SetReadDeadline(time.Now().Add(d))
	n, err := io.Copy(io.Discard, c)
	switch {
	case n > 0:
		rec.corrupt = fmt.Errorf("proxy sent %d bytes; want none", n)
	case err != nil && !errors.Is(err, syscall.ECONNRESET):
		rec.unmet = fmt.Errorf("not closed within %v: %w", d, err)
	}
}

// soakSlowloris sends head a byte every 150 ms until the proxy closes the
// connection, which it must do at the sniff timeout (2 s) without a byte.
func soakSlowloris(c *net.TCPConn, head []byte, rec *soakRec) {
	closed := make(chan struct{})
	go func() {
		rec.expectClose(c, 6*time.Second)
		close(closed)
	}()
	tick := time.NewTicker(150 * time.Millisecond)
	defer tick.Stop()
	for _, b := range head[:len(head)-2] {
		select {
		case <-closed:
			if d := time.Since(rec.start); d < 1900*time.Millisecond && rec.unmet == nil {
				rec.unmet = fmt.Errorf("closed after %v, before the 2s sniff timeout", d)
			}
			return
		case <-tick.C:
			c.Write([]byte{b})
		}
	}
	<-closed
	rec.unmet = errors.New("the whole slow head was sent before a close")
}

// soakBackend serves one HTTP/1 connection: "POST /echo" echoes the body
// until EOF; "GET /serve/SIZE/I" sends soakPayload(seed, I, SIZE) and reads
// until EOF. With die, it sends half of it and dies: a reset or a close.
func soakBackend(c net.Conn, seed uint64, die bool) {
	r := bufio.NewReader(c)
	first, err := r.ReadString('\n')
	if err != nil {
		return
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if line == "\r\n" {
			break
		}
	}
	f := strings.Fields(first)
	if len(f) < 2 {
		return
	}
	tc := c.(*net.TCPConn)
	if f[1] == "/echo" {
		io.Copy(c, r)
		tc.CloseWrite()
		return
	}
	var size, i int
	if _, err := fmt.Sscanf(f[1], "/serve/%d/%d", &size, &i); err != nil {
		return
	}
	payload := soakPayload(seed, i, size)
	if die {
		c.Write(payload[:size/2])
		if i%2 == 0 {
			tc.SetLinger(0) // a reset
		}
		return
	}
	c.Write(payload)
	tc.CloseWrite()
	io.Copy(io.Discard, r)
}

// soakKiller SIGKILLs a random worker of the current master every 0.6 to
// 1.8 s until stop. A worker younger than 5 s counts as a crash in the
// master's budget (more than 10 a minute stop it), so such kills are held
// to 5 a minute.
func soakKiller(p *proxyProc, chaos *soakChaos, seed uint64, stop <-chan struct{}) {
	r := rand.New(rand.NewPCG(seed, 1<<62))
	var young []time.Time
	for {
		select {
		case <-stop:
			return
		case <-time.After(600*time.Millisecond + time.Duration(r.IntN(1200))*time.Millisecond):
		}
		// Workers only: during a reload the master's children include
		// its successor (tableflip forks it), whose death fails the
		// reload; that is not the fault this test injects.
		kids := slices.DeleteFunc(procChildren(p.pid()), func(pid int) bool { return !isWorkerProc(pid) })
		if len(kids) == 0 {
			continue
		}
		pid := kids[r.IntN(len(kids))]
		now := time.Now()
		if age, ok := procAge(pid); !ok || age < 5500*time.Millisecond {
			young = slices.DeleteFunc(young, func(at time.Time) bool { return now.Sub(at) > time.Minute })
			if !ok || len(young) >= 5 {
				continue
			}
			young = append(young, now)
		}
		at := time.Now()
		syscall.Kill(pid, syscall.SIGKILL)
		done := time.Now()
		chaos.mu.Lock()
		chaos.kills = append(chaos.kills, soakKill{pid: pid, at: at, done: done})
		chaos.mu.Unlock()
	}
}

// soakReloader runs `sniproxy reload` once a third and once two thirds of
// the n connections have started.
func soakReloader(p *proxyProc, chaos *soakChaos, started *atomic.Int64, n int, stop <-chan struct{}) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for _, at := range []int64{int64(n / 3), int64(2 * n / 3)} {
		for started.Load() < at {
			select {
			case <-stop:
				chaos.fail(fmt.Errorf("the load ended before the reload at connection %d", at))
				return
			case <-tick.C:
			}
		}
		out, err := exec.Command(p.bin, "reload", "-c", p.cfgPath).CombinedOutput()
		if err != nil || !regexp.MustCompile(`pid \d+, generation \d+`).Match(out) {
			chaos.fail(fmt.Errorf("sniproxy reload: %v: %s", err, out))
			return
		}
		chaos.mu.Lock()
		chaos.reloads = append(chaos.reloads, strings.TrimSpace(string(out)))
		chaos.mu.Unlock()
	}
}

// isWorkerProc reports whether pid is a sniproxy worker (argv[1] is
// "worker").
func isWorkerProc(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 1 && args[1] == "worker"
}

// procChildren returns the live children of pid.
func procChildren(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil || pid <= 0 {
		return nil
	}
	var out []int
	for _, e := range ents {
		cpid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f := procStat(cpid); len(f) > 1 && f[1] == strconv.Itoa(pid) && f[0] != "Z" {
			out = append(out, cpid)
		}
	}
	return out
}

// procStat returns the fields of /proc/pid/stat after the command name
// (state first), or nil.
func procStat(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	s := string(b)
	return strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
}

// procAge returns how long pid has run.
func procAge(pid int) (time.Duration, bool) {
	f := procStat(pid)
	up, err := os.ReadFile("/proc/uptime")
	if len(f) < 20 || err != nil {
		return 0, false
	}
	start, err1 := strconv.ParseFloat(f[19], 64) // starttime, in clock ticks (100 Hz)
	now, err2 := strconv.ParseFloat(strings.Fields(string(up))[0], 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration((now - start/100) * float64(time.Second)), true
}

// soakMetrics is a scrape, summed by metric name.
type soakMetrics struct {
	accepted, rejected, active, bytesIn, bytesOut float64
}

// soakScrape reads /metrics once.
func soakScrape(t *testing.T, p *proxyProc) soakMetrics {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m soakMetrics
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		series, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(series, "#") {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			continue
		}
		name, _, _ := strings.Cut(series, "{")
		switch {
		case name == "sniproxy_connections_total":
			m.accepted += v
		case name == "sniproxy_connections_rejected_total":
			m.rejected += v
		case name == "sniproxy_connections_active":
			m.active += v
		case series == `sniproxy_bytes_total{direction="in"}`:
			m.bytesIn += v
		case series == `sniproxy_bytes_total{direction="out"}`:
			m.bytesOut += v
		}
	}
	return m
}

// soakQuiet waits until no connection is open, only the current
// generation runs, and the counters have not moved for 2.5 s (workers push
// their counts every second), and returns them.
func soakQuiet(t *testing.T, p *proxyProc, d time.Duration) soakMetrics {
	t.Helper()
	deadline := time.Now().Add(d)
	last, since := soakScrape(t, p), time.Now()
	for {
		time.Sleep(250 * time.Millisecond) // poll the condition until the deadline
		m := soakScrape(t, p)
		if m != last {
			last, since = m, time.Now()
		}
		if m.active == 0 && time.Since(since) >= 2500*time.Millisecond && len(soakMasters(p)) == 1 {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("not quiet after %v: %+v, masters %v", d, m, soakMasters(p))
		}
	}
}

// soakMasters returns the live sniproxy masters: the current one and any
// predecessor still draining (the processes whose command line names the
// config file; workers' do not, and reload's is excluded).
func soakMasters(p *proxyProc) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !alive(pid) {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
		if slices.Contains(args, p.cfgPath) && !slices.Contains(args, "reload") {
			out = append(out, pid)
		}
	}
	return out
}

// soakProc is one process's resources.
type soakProc struct {
	pid, fds, threads int
	rss               int64          // bytes
	kinds             map[string]int // fds by what they are: socket, pipe, anon_inode:..., or the path
}

// soakProcs returns the current master's resources and its workers'.
func soakProcs(t *testing.T, p *proxyProc) []soakProc {
	t.Helper()
	master := p.pid()
	var out []soakProc
	for _, pid := range append([]int{master}, procChildren(master)...) {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatalf("fds of %d: %v", pid, err)
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		sp := soakProc{pid: pid, fds: len(fds), kinds: map[string]int{}}
		for _, fd := range fds {
			target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			kind, _, _ := strings.Cut(target, ":[")
			if strings.HasPrefix(target, "anon_inode:") {
				kind = target
			}
			sp.kinds[kind]++
		}
		for _, line := range strings.Split(string(status), "\n") {
			k, v, _ := strings.Cut(line, ":")
			f := strings.Fields(v)
			if len(f) == 0 {
				continue
			}
			n, _ := strconv.ParseInt(f[0], 10, 64)
			switch k {
			case "VmRSS":
				sp.rss = n << 10
			case "Threads":
				sp.threads = int(n)
			}
		}
		out = append(out, sp)
	}
	return out
}

// soakLine is one access-log line.
type soakLine struct {
	Time     time.Time `json:"time"`
	PID      int       `json:"pid"`
	Client   string    `json:"client"`
	Result   string    `json:"result"`
	BytesIn  int64     `json:"bytes_in"`
	BytesOut int64     `json:"bytes_out"`
	Moves    int       `json:"moves"`
}

// soakHurried is the log line of a generation hurried by a reload.
const soakHurried = "next generation reloads again: moving the remaining connections to it"

// soakLines returns the access-log lines by client address and the times
// a generation was hurried.
func soakLines(t *testing.T, p *proxyProc) (map[string][]soakLine, []time.Time) {
	t.Helper()
	f, err := os.Open(string(p.logs))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]soakLine{}
	var hurries []time.Time
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if bytes.Contains(sc.Bytes(), []byte(soakHurried)) {
			var l soakLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Fatalf("log line %s: %v", sc.Bytes(), err)
			}
			hurries = append(hurries, l.Time)
		}
		if !bytes.Contains(sc.Bytes(), []byte(`"msg":"connection"`)) {
			continue
		}
		var l soakLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("access log line %s: %v", sc.Bytes(), err)
		}
		out[l.Client] = append(out[l.Client], l)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out, hurries
}

// soakRejected reports whether an access-log result is a rejection
// (counted in sniproxy_connections_rejected_total).
func soakRejected(result string) bool {
	switch result {
	case "limit", "per_ip_limit", "proxy_header", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error":
		return true
	}
	return false
}

// soakCheckConns checks every connection against its access-log line. Two
// events excuse a connection that did not get what its behaviour expects:
// a SIGKILL of a worker while it was open (then it has no line), and a
// hurry while it was open, which closes the connections of the hurried
// generation still being sniffed or dialled (then its line says
// sniff_error or closed, written after the hurry; see README, Reload).
func soakCheckConns(t *testing.T, recs []soakRec, lines map[string][]soakLine, kills []soakKill, hurries []time.Time) {
	t.Helper()
	errs := 0
	report := func(format string, args ...any) {
		if errs++; errs <= 20 {
			t.Errorf(format, args...)
		}
	}
	known := map[string]bool{}
	for i, rec := range recs {
		name := soakMix[rec.kind].name
		if rec.corrupt != nil {
			report("conn %d (%s): %v", i, name, rec.corrupt)
		}
		if rec.client == "" {
			report("conn %d (%s): %v", i, name, rec.unmet)
			continue
		}
		known[rec.client] = true
		ls := lines[rec.client]
		switch {
		case len(ls) > 1:
			report("conn %d (%s, %s): %d access-log lines", i, name, rec.client, len(ls))
		case len(ls) == 1 && soakHurriedDuring(hurries, rec, ls[0]):
			// closed by a hurry: any client outcome but corrupt bytes
		case len(ls) == 1:
			if !slices.Contains(soakMix[rec.kind].results, ls[0].Result) {
				report("conn %d (%s): access-log result %q; want one of %v", i, name, ls[0].Result, soakMix[rec.kind].results)
			}
			if rec.unmet != nil {
				report("conn %d (%s): %v, though its worker logged it (%s) and was not killed", i, name, rec.unmet, ls[0].Result)
			}
		case !soakKilledDuring(kills, rec):
			report("conn %d (%s, %s, %v): no access-log line, and no worker was killed while it was open (unmet: %v)",
				i, name, rec.client, rec.end.Sub(rec.start), rec.unmet)
		}
	}
	for client, ls := range lines {
		if !known[client] {
			report("access-log line for a client no test connection had: %+v", ls[0])
		}
	}
	if errs > 20 {
		t.Errorf("... %d problems in all", errs)
	}
}

// soakHurriedDuring reports whether a hurry while rec was open closed it:
// its line says it was closed while sniffed or dialled, after the hurry.
func soakHurriedDuring(hurries []time.Time, rec soakRec, l soakLine) bool {
	if l.Result != "sniff_error" && l.Result != "closed" {
		return false
	}
	for _, h := range hurries {
		if !h.Before(rec.start) && !h.After(rec.end) && !l.Time.Before(h) {
			return true
		}
	}
	return false
}

// soakKilledDuring reports whether a worker was killed while rec was open
// in it: the connection began before the worker died (at most 50 ms after
// the kill syscall returned: a loaded box may still run it that long) and
// the worker was done with it after the kill began. The worker ends a
// connection (and writes its line) just after the client saw the end: a
// kill up to 250 ms after it may still lose the line of a transfer the
// client verified.
func soakKilledDuring(kills []soakKill, rec soakRec) bool {
	for _, k := range kills {
		if !rec.start.After(k.done.Add(50*time.Millisecond)) && !rec.end.Add(250*time.Millisecond).Before(k.at) {
			return true
		}
	}
	return false
}

// soakCheckCounters checks the counters against the access log.
//
// Every accepted connection is counted once in sniproxy_connections_total
// (under the protocol sniffed, unknown if none) and writes one access-log
// line when it ends; a rejected one is also counted in
// sniproxy_connections_rejected_total just before its line. Workers push
// their counts every second, so a SIGKILLed worker loses what it counted
// since its last push, and writes no line for the connections it held. So
// over the warm-up and chaos phases, with L lines (Lrej of them
// rejections), K connections without a line (killed) and U lines a killed
// worker wrote in the 2 s before its kill (Urej rejections):
//
//	L - U <= accepted <= L + K    and    Lrej - Urej <= rejected <= Lrej + K
//
// In the clean phase nothing is killed and the counts are exact: the
// accepted and rejected counters rise by the connections made and the
// rejection lines, accepted = finished + rejected, and the byte counters
// rise by the lines' bytes.
func soakCheckCounters(t *testing.T, recs []soakRec, lines map[string][]soakLine, kills []soakKill, m1, m2 soakMetrics, cleanFrom int) {
	t.Helper()
	killedAt := map[int]time.Time{}
	for _, k := range kills {
		killedAt[k.pid] = k.at
	}
	var l, lrej, u, urej, k int
	var cl, clrej, cfin int
	var cin, cout int64
	for i, rec := range recs {
		ls := lines[rec.client]
		if rec.client == "" {
			continue
		}
		if i >= cleanFrom {
			cl += len(ls)
			for _, ln := range ls {
				if soakRejected(ln.Result) {
					clrej++
				} else {
					cfin++
				}
				cin += ln.BytesIn
				cout += ln.BytesOut
			}
			continue
		}
		if len(ls) == 0 {
			k++
		}
		for _, ln := range ls {
			rej := soakRejected(ln.Result)
			l++
			if rej {
				lrej++
			}
			if at, ok := killedAt[ln.PID]; ok && !ln.Time.After(at) && at.Sub(ln.Time) <= 2*time.Second {
				u++
				if rej {
					urej++
				}
			}
		}
	}
	acc, rej := int(m1.accepted), int(m1.rejected)
	t.Logf("counters before the clean phase: accepted %d, rejected %d; lines %d (rejections %d), unlogged %d, lines within 2 s before a kill %d (rejections %d)",
		acc, rej, l, lrej, k, u, urej)
	if acc < l-u || acc > l+k {
		t.Errorf("accepted %d outside [L-U, L+K] = [%d, %d]", acc, l-u, l+k)
	}
	if rej < lrej-urej || rej > lrej+k {
		t.Errorf("rejected %d outside [Lrej-Urej, Lrej+K] = [%d, %d]", rej, lrej-urej, lrej+k)
	}

	n := len(recs) - cleanFrom
	dAcc, dRej := int(m2.accepted-m1.accepted), int(m2.rejected-m1.rejected)
	dIn, dOut := int64(m2.bytesIn-m1.bytesIn), int64(m2.bytesOut-m1.bytesOut)
	t.Logf("clean phase: %d connections, accepted +%d, rejected +%d, finished (lines) %d, rejection lines %d, bytes in +%d (lines %d), out +%d (lines %d)",
		n, dAcc, dRej, cfin, clrej, dIn, cin, dOut, cout)
	if dAcc != n || cl != n || dRej != clrej || dAcc != cfin+dRej {
		t.Errorf("clean phase does not balance: %d connections, %d lines, accepted +%d, finished %d, rejected +%d (lines %d)",
			n, cl, dAcc, cfin, dRej, clrej)
	}
	if dIn != cin || dOut != cout {
		t.Errorf("clean phase bytes: counters in +%d out +%d; access log in %d out %d", dIn, dOut, cin, cout)
	}
}

// soakBack waits until the processes are back at the baseline (see
// soakCompare): the same number of workers, each process with the
// baseline's fds (once no connection is open, the master and every worker
// hold only their listeners, ipc, log and runtime fds), threads within 4
// of it and RSS within 64 MiB of it (the Go heap grew under load and is
// returned to the OS lazily; the bound catches a leak of a few hundred
// bytes per connection at full size).
func soakBack(t *testing.T, p *proxyProc, base []soakProc, conc int) []soakProc {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		now := soakProcs(t, p)
		problem := soakCompare(base, now, conc)
		if problem == "" {
			return now
		}
		if time.Now().After(deadline) {
			t.Errorf("not back at the baseline: %s\nbaseline %+v\nnow      %+v", problem, base, now)
			return now
		}
		time.Sleep(250 * time.Millisecond) // poll the condition until the deadline
	}
}

// soakCompare returns what differs between the baseline and now, or "".
// Workers are compared in the order of their fds (their PIDs change).
// Every fd but pipes must be back exactly; a worker's pipes include Go's
// pool of splice pipes (a pair per concurrent copy, closed when the GC
// empties the pool), so they may exceed the baseline by two per client.
func soakCompare(base, now []soakProc, conc int) string {
	if len(now) != len(base) {
		return fmt.Sprintf("%d processes; baseline %d", len(now), len(base))
	}
	byFDs := func(a, b soakProc) int { return (a.fds - a.kinds["pipe"]) - (b.fds - b.kinds["pipe"]) }
	base = append(base[:1:1], base[1:]...)
	now = append(now[:1:1], now[1:]...)
	slices.SortFunc(base[1:], byFDs)
	slices.SortFunc(now[1:], byFDs)
	for j := range now {
		b, n := base[j], now[j]
		what := "master"
		if j > 0 {
			what = "worker"
		}
		for kind, c := range n.kinds {
			if kind != "pipe" && c != b.kinds[kind] {
				return fmt.Sprintf("%s %d has %d fds %s; baseline %d", what, n.pid, c, kind, b.kinds[kind])
			}
		}
		for kind, c := range b.kinds {
			if kind != "pipe" && c != n.kinds[kind] {
				return fmt.Sprintf("%s %d has %d fds %s; baseline %d", what, n.pid, n.kinds[kind], kind, c)
			}
		}
		switch {
		case n.kinds["pipe"] > b.kinds["pipe"]+2*conc:
			return fmt.Sprintf("%s %d has %d pipe fds; baseline %d", what, n.pid, n.kinds["pipe"], b.kinds["pipe"])
		case n.threads > b.threads+4:
			return fmt.Sprintf("%s %d has %d threads; baseline %d", what, n.pid, n.threads, b.threads)
		case n.rss > b.rss+64<<20:
			return fmt.Sprintf("%s %d has %d MiB RSS; baseline %d MiB", what, n.pid, n.rss>>20, b.rss>>20)
		}
	}
	return ""
}

// soakReport logs the figures.
func soakReport(t *testing.T, recs []soakRec, lines map[string][]soakLine, chaos *soakChaos, m soakMetrics,
	base, after []soakProc, chaosTime, total time.Duration, n int) {
	t.Helper()
	type tally struct {
		conns, verified, unlogged, unmet int
		bytes                            int64
		results                          map[string]int
	}
	by := make([]tally, len(soakMix))
	var verified int
	var vbytes int64
	for _, rec := range recs {
		tl := &by[rec.kind]
		tl.conns++
		if rec.verified {
			tl.verified++
			tl.bytes += int64(rec.bytes)
			verified++
			vbytes += int64(rec.bytes)
		}
		if rec.unmet != nil {
			tl.unmet++
		}
		ls := lines[rec.client]
		if len(ls) == 0 {
			tl.unlogged++
			continue
		}
		if tl.results == nil {
			tl.results = map[string]int{}
		}
		tl.results[ls[0].Result]++
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "soak: seed %d, %d chaos connections in %v (%.0f/s), %d in all in %v; %d workers killed, reloads: %q\n",
		*soakSeed, n, chaosTime.Round(time.Millisecond), float64(n)/chaosTime.Seconds(), len(recs), total.Round(time.Millisecond), len(chaos.kills), chaos.reloads)
	fmt.Fprintf(&sb, "transfers verified by SHA-256: %d (%d MiB); counters: accepted %v, rejected %v, bytes in %v out %v\n",
		verified, vbytes>>20, m.accepted, m.rejected, m.bytesIn, m.bytesOut)
	for j, tl := range by {
		fmt.Fprintf(&sb, "  %-20s %6d conns, %6d verified (%4d MiB), %4d unmet (killed), %4d unlogged (killed), results %v\n",
			soakMix[j].name, tl.conns, tl.verified, tl.bytes>>20, tl.unmet, tl.unlogged, tl.results)
	}
	fmt.Fprintf(&sb, "baseline %+v\nafter    %+v", base, after)
	t.Log(sb.String())
}
