package statuspage

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/status"
)

// example is a Status with every section filled, including text that
// would be markup if it were not escaped.
func example() status.Status {
	t0 := time.Date(2026, 12, 2, 8, 0, 0, 0, time.UTC)
	var h status.History
	for i := range 13 {
		h.Add(status.Sample{
			Time: t0.Add(time.Duration(i) * 5 * time.Second), Active: int64(i),
			Connections: uint64(100 * i),
			Protocols:   map[string]uint64{"tls": uint64(60 * i), "http": uint64(40 * i)},
			Rejected:    map[string]uint64{"limit": uint64(i)},
			BytesIn:     uint64(1000 * i), BytesOut: uint64(5000 * i),
		})
	}
	tot := status.Totals{
		Active: 12, Connections: 1200,
		Protocols: map[string]uint64{"tls": 720, "http": 480},
		Rejected:  map[string]uint64{"limit": 12, "sniff_error": 3},
		BytesIn:   12000, BytesOut: 60000,
	}
	now := status.SampleOf(tot, t0.Add(65*time.Second))
	return status.Status{
		PID: 4242, Generation: 3, Version: "1.2.3", GoVersion: "go1.26.8",
		Config: "/etc/sniproxy/<script>alert(1)</script>.yaml", Started: t0, UptimeSeconds: 3725,
		Workers: []status.Worker{
			{Slot: 0, PID: 5001, Ready: true, Active: 7, Restarts: 1, Started: t0},
			{Slot: 1, PID: 5002, Ready: false, Active: 5, Started: t0},
		},
		Restarts: 1, Totals: tot, Rates: h.Rates(now, time.Minute),
		Limits: status.Limits{MaxConnections: 10000, Workers: 2, ClientHelloSeconds: 5, ConnectSeconds: 10, IdleSeconds: 300, ShutdownSeconds: 30},
		Reloads: []status.Reload{
			{Time: t0, Result: "ok", DurationSeconds: 0.031, Generation: 3},
			{Time: t0.Add(-time.Minute), Result: "failed", DurationSeconds: 0.002, Error: "new config is invalid: <b>bad</b>"},
		},
		Backends: []status.Backend{
			{Route: "*.example.com", Address: "127.0.0.1:9443", Up: true, Since: t0, Active: 3, Connections: 99},
			{Route: "*.example.com", Address: "127.0.0.1:9444", Backup: true, Up: false, Since: t0, LastError: "connection refused"},
		},
		History: h.Samples(),
	}
}

func get(t *testing.T, h http.Handler, path string) *http.Response {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	return rec.Result()
}

func TestPageRendersEverySection(t *testing.T) {
	st := example()
	h := Handler(func() status.Status { return st }, nil)
	res := get(t, h, "/")
	if res.StatusCode != 200 {
		t.Fatalf("GET /: %s", res.Status)
	}
	b, _ := io.ReadAll(res.Body)
	page := string(b)
	for _, want := range []string{
		"generation <b id=\"generation\">3</b>", "4242", "1.2.3", "1h2m5s", // header
		"5001", "5002", "ready", "starting", // workers
		">720<", ">480<", "sniff_error", "per_ip_limit", // protocols and reasons
		"127.0.0.1:9443", "(backup)", "connection refused", ">down<", // backends
		"2026-12-02 08:00:00 UTC", ">failed<", "31ms", // reloads
		"10,000", "5s", "5m0s", // limits
		`id="chart-connections" d="M0.0 `, // a chart drawn on the server
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(page, "<script>alert(1)") || strings.Contains(page, "<b>bad</b>") {
		t.Error("text from the status reached the page unescaped")
	}
	if !strings.Contains(page, "&lt;script&gt;alert(1)&lt;/script&gt;") {
		t.Error("the config path is missing or not escaped as text")
	}
}

func TestPageIsSelfContained(t *testing.T) {
	h := Handler(func() status.Status { return example() }, nil)
	res := get(t, h, "/")
	b, _ := io.ReadAll(res.Body)
	page := string(b)
	for _, bad := range []string{"http://", "https://", "<link", "src=", "@import", "url("} {
		if strings.Contains(page, bad) {
			t.Errorf("page contains %q: it must load nothing from elsewhere", bad)
		}
	}
	csp := res.Header.Get("Content-Security-Policy")
	if !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "connect-src 'self'") {
		t.Errorf("Content-Security-Policy: got %q", csp)
	}
	// The nonce in the header is the one on the inline style and script,
	// and it changes per response.
	nonce := csp[strings.Index(csp, "'nonce-")+7:]
	nonce = nonce[:strings.IndexByte(nonce, '\'')]
	if !strings.Contains(page, `<script nonce="`+nonce+`">`) || !strings.Contains(page, `<style nonce="`+nonce+`">`) {
		t.Errorf("inline script/style do not carry the CSP nonce %q", nonce)
	}
	res2 := get(t, h, "/")
	if res2.Header.Get("Content-Security-Policy") == csp {
		t.Error("two responses share a nonce")
	}
}

func TestPageWithNothingYet(t *testing.T) {
	h := Handler(func() status.Status { return status.Status{Generation: 1} }, nil)
	res := get(t, h, "/")
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 {
		t.Fatalf("GET / on an empty status: %s\n%s", res.Status, b)
	}
	for _, want := range []string{"No route has a backend pool.", "No reload since"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("empty page lacks %q", want)
		}
	}
}

func TestJSONIsTheStatus(t *testing.T) {
	st := example()
	h := Handler(func() status.Status { return st }, nil)
	res := get(t, h, "/status.json")
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type: got %q", ct)
	}
	var got status.Status
	if err := json.NewDecoder(res.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.PID != st.PID || got.Totals.Protocols["tls"] != 720 || len(got.History) != len(st.History) || got.Backends[1].LastError != "connection refused" {
		t.Errorf("status.json does not round-trip the Status: %+v", got)
	}
}

func TestOtherPathsAreNotFound(t *testing.T) {
	h := Handler(func() status.Status { return example() }, nil)
	for _, p := range []string{"/x", "/status.json/", "/index.html"} {
		if res := get(t, h, p); res.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: got %s; want 404", p, res.Status)
		}
	}
}

func TestSparkPath(t *testing.T) {
	if got := sparkPath([]float64{1}); got != "" {
		t.Errorf("one point: got %q; want no line", got)
	}
	got := sparkPath([]float64{0, 5, 10})
	if got != "M0.0 58.0 L150.0 30.0 L300.0 2.0" {
		t.Errorf("got %q", got)
	}
	if got := sparkPath([]float64{0, 0}); got != "M0.0 58.0 L300.0 58.0" {
		t.Errorf("flat zero line: got %q", got)
	}
}

func TestHumanFormats(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{humanCount(0), "0"}, {humanCount(999), "999"}, {humanCount(1000), "1,000"}, {humanCount(1234567), "1,234,567"},
		{humanBytes(512), "512 B"}, {humanBytes(1536), "1.5 KiB"}, {humanBytes(3 << 30), "3.0 GiB"},
		{humanRate(0), "0"}, {humanRate(0.5), "0.50"}, {humanRate(42.25), "42.2"}, {humanRate(12345), "12,345"},
		{humanDuration(1500 * time.Millisecond), "1.5s"}, {humanDuration(3725 * time.Second), "1h2m5s"},
		{humanDuration(50 * time.Hour), "2d2h0m0s"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q; want %q", tt.got, tt.want)
		}
	}
}
