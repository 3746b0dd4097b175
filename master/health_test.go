package master

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/health"
	"github.com/sniproxy/sniproxy/ipc"
)

// countingBackend is a loopback listener that counts the connections it
// accepts and closes each at once (a tcp check passes, a tls one fails).
type countingBackend struct {
	ln       net.Listener
	accepted atomic.Int64
}

func newCountingBackend(t *testing.T) *countingBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &countingBackend{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepted.Add(1)
			c.Close()
		}
	}()
	return b
}

func (b *countingBackend) addr() string { return b.ln.Addr().String() }

// healthConfig parses a config with routes (YAML list items).
func healthConfig(t *testing.T, routes string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\nroutes:\n"+routes), nil)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// waitFor polls cond every 10ms until it holds, failing t after waitLimit.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, waitLimit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// recvTable returns the next health table the fake worker gets.
func recvTable(t *testing.T, w *fakeWorker) *health.Table {
	t.Helper()
	_, b := w.recv(t)
	h, ok := b.(ipc.Health)
	if !ok {
		t.Fatalf("got %T; want ipc.Health", b)
	}
	var tb health.Table
	if err := tb.UnmarshalBinary(h.Table); err != nil {
		t.Fatal(err)
	}
	return &tb
}

// TestHealthOneProberPerBackend: two routes checking one backend the same
// way share one prober: the backend sees one check per interval.
func TestHealthOneProberPerBackend(t *testing.T) {
	b := newCountingBackend(t)
	cfg := healthConfig(t, fmt.Sprintf(`
  - {match: a.test, backends: [%[1]q, "127.0.0.1:9"], health_check: {interval: 100ms, timeout: 50ms}}
  - {match: b.test, backends: [%[1]q], health_check: {interval: 100ms, timeout: 50ms}}
`, b.addr()))
	h := newHealthPart(quietLog(), cfg, func() []*child { return nil })
	if len(h.order) != 2 {
		t.Fatalf("%d targets; want 2 (one per backend and check)", len(h.order))
	}
	h.inherit(nil)
	h.start()
	t0 := time.Now()
	waitFor(t, "10 checks", func() bool { return b.accepted.Load() >= 10 })
	h.stop()
	elapsed := time.Since(t0)
	// One prober: about one check per 100ms (±10% jitter, first within
	// the first interval); two would double it.
	if n, most := b.accepted.Load(), int64(elapsed/(90*time.Millisecond))+2; n > most {
		t.Errorf("%d checks in %v; want at most %d (one prober)", n, elapsed, most)
	}
	if !h.up(cfg.Routes[0].HealthKey(b.addr())) {
		t.Error("a backend that accepts is down")
	}
}

// TestHealthCheckDownUpAndPush: a tls check of a backend that accepts TCP
// but speaks no TLS takes it down after fall checks; the change is logged,
// counted and pushed to a welcomed worker; a TLS backend stays up.
func TestHealthCheckDownUpAndPush(t *testing.T) {
	plain := newCountingBackend(t)
	tln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	if err != nil {
		t.Fatal(err)
	}
	defer tln.Close()
	go func() {
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			go func() {
				c.(*tls.Conn).Handshake()
				c.Close()
			}()
		}
	}()
	cfg := healthConfig(t, fmt.Sprintf(`
  - {match: app.test, backends: [%q, %q], health_check: {type: tls, interval: 50ms, timeout: 40ms, fall: 2, rise: 1}}
`, plain.addr(), tln.Addr().String()))
	w := newFakeWorker(t, 0, 1, true)
	h := newHealthPart(quietLog(), cfg, func() []*child { return []*child{w.c} })
	h.inherit(nil)
	h.welcome(w.c)
	if tb := recvTable(t, w); tb.Len() != 2 || !tb.Up(cfg.Routes[0].HealthKey(plain.addr())) {
		t.Fatalf("first table: %d backends, plain up %v; want 2, up", tb.Len(), tb.Up(cfg.Routes[0].HealthKey(plain.addr())))
	}
	h.start()
	defer h.stop()
	plainKey := cfg.Routes[0].HealthKey(plain.addr())
	if !strings.HasSuffix(plainKey, " tls app.test") {
		t.Errorf("key %q; want the address, tls and the match as sni", plainKey)
	}
	tb := recvTable(t, w)
	if tb.Up(plainKey) {
		t.Error("pushed table has the plain backend up")
	}
	if !tb.Up(cfg.Routes[0].HealthKey(tln.Addr().String())) {
		t.Error("pushed table has the TLS backend down")
	}
	st := h.statuses()
	if st[0].Up || !strings.Contains(st[0].LastError, "tls handshake") || st[0].Since.IsZero() {
		t.Errorf("status of the plain backend: %+v; want down with a tls handshake error", st[0])
	}
	if !st[1].Up {
		t.Errorf("status of the TLS backend: %+v; want up", st[1])
	}
	if m := h.metrics(); m[0].Changes != 1 || m[0].Up {
		t.Errorf("metrics %+v; want the plain backend down after 1 change", m[0])
	}
}

// TestHealthDialReports: dials refused fall times in a row take a backend
// down; a pool without an active check has its down backend tcp-checked
// by the master until it rises.
func TestHealthDialReports(t *testing.T) {
	// A port that refuses, then accepts once a listener takes it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := healthConfig(t, fmt.Sprintf(`
  - {match: app.test, backends: [%q, "127.0.0.1:9"]}
`, addr))
	key := cfg.Routes[0].HealthKey(addr)
	if key != addr+" dial" {
		t.Fatalf("key %q; want %q", key, addr+" dial")
	}
	h := newHealthPart(quietLog(), cfg, func() []*child { return nil })
	for _, tg := range h.order {
		tg.interval = 50 * time.Millisecond // the default 5s, shortened
	}
	h.inherit(nil)
	h.start()
	defer h.stop()
	h.dialResults(ipc.DialReport{Results: []ipc.DialResult{{Key: key, Count: 2, Reason: "connection refused"}}})
	if !h.up(key) {
		t.Fatal("down after 2 failures; fall is 3")
	}
	h.dialResults(ipc.DialReport{Results: []ipc.DialResult{
		{Key: key, OK: true, Count: 1},
		{Key: key, Count: 3, Reason: "connection refused"},
		{Key: "127.0.0.1:1 dial", Count: 9, Reason: "not in this config"},
	}})
	if h.up(key) {
		t.Fatal("up after 3 failures in a row")
	}
	if st := h.statuses(); st[0].LastError != "connection refused" {
		t.Errorf("last error %q", st[0].LastError)
	}
	b := newCountingBackendAt(t, addr)
	waitFor(t, "the master's tcp check brings the backend up", func() bool { return h.up(key) })
	n := b.accepted.Load()
	if n < 2 {
		t.Errorf("%d checks before up; want rise (2)", n)
	}
	// Up again: no more checks without an active health_check.
	time.Sleep(200 * time.Millisecond) // a span with no event: nothing may happen
	if m := b.accepted.Load(); m > n+1 {
		t.Errorf("%d more checks while up; want none", m-n)
	}
}

// newCountingBackendAt is newCountingBackend on a given address.
func newCountingBackendAt(t *testing.T, addr string) *countingBackend {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	b := &countingBackend{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepted.Add(1)
			c.Close()
		}
	}()
	return b
}

// TestHealthSuccession: a successor starts from the predecessor's table
// (through the JSON succession state) and counters; backends it keeps
// keep their state, new ones start up, dropped ones are forgotten.
func TestHealthSuccession(t *testing.T) {
	old := healthConfig(t, `
  - {match: app.test, backends: ["127.0.0.1:7001", "127.0.0.1:7002"]}
`)
	h := newHealthPart(quietLog(), old, func() []*child { return nil })
	h.inherit(nil)
	k1, k2 := old.Routes[0].HealthKey("127.0.0.1:7001"), old.Routes[0].HealthKey("127.0.0.1:7002")
	h.dialResults(ipc.DialReport{Results: []ipc.DialResult{{Key: k1, Count: 3, Reason: "timeout"}}})
	w := newFakeWorker(t, 0, 1, true)
	h.addStats(w.c, ipc.BackendStats{Deltas: []ipc.BackendDelta{{Route: "app.test", Backend: "127.0.0.1:7002", Connections: 5, Active: 2}}})
	var st successionState
	h.fill(&st)
	js, err := jsonRoundTrip(st)
	if err != nil {
		t.Fatal(err)
	}
	next := healthConfig(t, `
  - {match: app.test, backends: ["127.0.0.1:7001", "127.0.0.1:7003"]}
`)
	h2 := newHealthPart(quietLog(), next, func() []*child { return nil })
	h2.inherit(&js)
	if h2.up(k1) {
		t.Error("a backend down before the reload is up after it")
	}
	if h2.table.Len() != 2 {
		t.Errorf("table of %d backends; want 2 (7002 dropped, 7003 added)", h2.table.Len())
	}
	if _, ok := h2.table.Get(k2); ok {
		t.Error("a dropped backend is still in the table")
	}
	if !h2.up(next.Routes[0].HealthKey("127.0.0.1:7003")) {
		t.Error("a new backend starts down")
	}
	if m := h2.metrics(); m[0].Changes != 1 {
		t.Errorf("changes of 7001: %d; want 1 (inherited)", m[0].Changes)
	}
	if h2.conns[labels{"app.test", "127.0.0.1:7002"}] != 5 {
		t.Error("connections total not inherited")
	}
	h.lost(w.c)
	if a := h.active[labels{"app.test", "127.0.0.1:7002"}]; a != 0 {
		t.Errorf("active after the worker died: %d; want 0", a)
	}
}

// jsonRoundTrip sends st through JSON, as the state socket does.
func jsonRoundTrip(st successionState) (successionState, error) {
	var out successionState
	b, err := json.Marshal(st)
	if err != nil {
		return out, err
	}
	err = json.Unmarshal(b, &out)
	return out, err
}

// selfSigned returns a throwaway certificate for a TLS backend.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "app.test"}, DNSNames: []string{"app.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
