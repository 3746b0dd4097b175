package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// baseConfig is a config with one listener, metrics, and an allowlist that
// keeps every DNS lookup on /etc/hosts (localhost): tests never query a
// name server.
const baseConfig = `
listen_addrs: ["LISTEN"]
metrics: {enabled: true, address: "METRICS"}
timeouts: {connect: 5, client_hello: 3, idle: 60}
shutdown_timeout: 5
log: {level: info, format: json}
workers: 2
control_socket: "CTLSOCK"
`

func TestTLSRoutingBySNI(t *testing.T) {
	a := startTLSBackend(t, "A", "a.test")
	b := startTLSBackend(t, "B", "x.b.test", "y.b.test")
	p := startProxy(t, baseConfig+fmt.Sprintf(`
allowlist: ["localhost"]
routes:
  - {match: "a.test", backend: "%s"}
  - {match: "*.b.test", backend: "%s"}
`, a.addr, b.addr))

	for _, tc := range []struct {
		name, want string
		pool       *tlsBackend
	}{
		{"a.test", "A a.test", a},
		{"x.b.test", "B x.b.test", b},
		{"Y.B.TEST", "B Y.B.TEST", b}, // routed case-insensitively, bytes unchanged
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tlsHello(t, p.addr, tc.name, tc.pool.pool)
			if err != nil {
				t.Fatalf("handshake through proxy: %v", err)
			}
			if got != tc.want {
				t.Errorf("backend said %q; want %q", got, tc.want)
			}
		})
	}
	// "b.test" does not match "*.b.test" and is not allowlisted.
	if got, err := tlsHello(t, p.addr, "b.test", nil); err == nil {
		t.Errorf("b.test was proxied (backend said %q); want refusal", got)
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="tls"}`, 4)
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="denied"}`, 1)
	if got := p.metric(t, `sniproxy_backend_connect_seconds_count`); got != 3 {
		t.Errorf("backend_connect_seconds_count = %v; want 3", got)
	}
	seen := p.logsSoon("connection", func(rec map[string]any) bool {
		return rec["name"] == "x.b.test" && rec["rule"] == "*.b.test" && rec["backend"] == b.addr && rec["protocol"] == "tls"
	})
	if !seen {
		t.Errorf("no access-log line for x.b.test naming rule and backend:\n%s", p.logs.String())
	}
}

// httpBackend answers every request with "id host proto".
func httpBackend(t *testing.T, id string) string {
	t.Helper()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s %s", id, r.Host, r.Proto)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &protos, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// viaProxy returns an HTTP client whose every connection goes to proxy.
func viaProxy(proxy string) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "tcp", proxy)
			},
			DisableKeepAlives: true,
		},
	}
}

// h2cViaProxy returns an HTTP/2 prior-knowledge client going to proxy.
func h2cViaProxy(proxy string) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	// net/http's HTTP/2 is golang.org/x/net/http2, bundled.
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Protocols: &protos,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "tcp", proxy)
			},
		},
	}
}

func get(t *testing.T, c *http.Client, url string) string {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestHTTPAndH2CRouting(t *testing.T) {
	web := httpBackend(t, "web")
	api := httpBackend(t, "api")
	p := startProxy(t, baseConfig+fmt.Sprintf(`
allowlist: ["localhost"]
routes:
  - {match: "web.test", backend: "%s"}
  - {match: "*.api.test", backend: "%s"}
`, web, api))
	_, port, _ := net.SplitHostPort(p.addr)

	if got := get(t, viaProxy(p.addr), "http://web.test:"+port+"/"); got != "web web.test:"+port+" HTTP/1.1" {
		t.Errorf("HTTP/1.1 web.test: got %q", got)
	}
	if got := get(t, viaProxy(p.addr), "http://v1.API.test/x"); got != "api v1.API.test HTTP/1.1" {
		t.Errorf("HTTP/1.1 v1.api.test: got %q", got)
	}
	if got := get(t, h2cViaProxy(p.addr), "http://v2.api.test:"+port+"/"); got != "api v2.api.test:"+port+" HTTP/2.0" {
		t.Errorf("h2c v2.api.test: got %q", got)
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="http"}`, 2)
	p.waitMetric(t, `sniproxy_connections_total{protocol="h2c"}`, 1)

	// Real peers: curl HTTP/1.1 and curl h2c prior knowledge.
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is not installed; .ci/run installs it")
	}
	for _, args := range [][]string{
		{"--resolve", "web.test:" + port + ":127.0.0.1", "http://web.test:" + port + "/"},
		{"--http2-prior-knowledge", "--resolve", "h.api.test:" + port + ":127.0.0.1", "http://h.api.test:" + port + "/"},
	} {
		out, err := exec.Command(curl, append([]string{"-sS", "--max-time", "10"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("curl %v: %v\n%s", args, err, out)
		}
		want := "web web.test:" + port + " HTTP/1.1"
		if args[0] == "--http2-prior-knowledge" {
			want = "api h.api.test:" + port + " HTTP/2.0"
		}
		if string(out) != want {
			t.Errorf("curl %v: got %q; want %q", args, out, want)
		}
	}
}

func TestDenyAllowAndPrivate(t *testing.T) {
	a := startTLSBackend(t, "A", "bad.test", "good.test", "localhost")
	_, bport, _ := net.SplitHostPort(a.addr)
	// second dials DNS-routed names at the backend's port.
	second := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := baseConfig + fmt.Sprintf(`
listeners: [{address: "%s", backend_port: %s}]
denylist: ["bad.test"]
allowlist: ["localhost", "good.test"]
routes:
  - {match: "bad.test", backend: "%s"}
  - {match: "good.test", backend: "%s"}
`, second, bport, a.addr, a.addr)

	t.Run("refused", func(t *testing.T) {
		p := startProxy(t, cfg)
		if got, err := tlsHello(t, p.addr, "good.test", a.pool); err != nil || got != "A good.test" {
			t.Errorf("good.test: %q, %v", got, err)
		}
		// Denylist beats an explicit route.
		if got, err := tlsHello(t, p.addr, "bad.test", nil); err == nil {
			t.Errorf("bad.test was proxied despite the denylist (backend said %q)", got)
		}
		// Not allowlisted.
		if got, err := tlsHello(t, p.addr, "other.test", nil); err == nil {
			t.Errorf("other.test was proxied despite the allowlist (backend said %q)", got)
		}
		p.waitMetric(t, `sniproxy_connections_rejected_total{reason="denied"}`, 2)
	})

	t.Run("private", func(t *testing.T) {
		// localhost is allowlisted and resolves (from /etc/hosts) to
		// 127.0.0.1: DNS routing must refuse it without allow_private.
		p := startProxy(t, cfg)
		if got, err := tlsHello(t, second, "localhost", nil); err == nil {
			t.Errorf("localhost reached a loopback backend through DNS without allow_private (it said %q)", got)
		}
		p.waitMetric(t, `sniproxy_connections_rejected_total{reason="denied"}`, 1)
	})

	t.Run("allow_private", func(t *testing.T) {
		p := startProxy(t, cfg+"backend: {allow_private: true}\n")
		got, err := tlsHello(t, second, "localhost", a.pool)
		if err != nil || got != "A localhost" {
			t.Errorf("localhost with allow_private: %q, %v; want the backend at backend_port %s", got, err, bport)
		}
		// The proxy's own listen address is never a DNS-routed target:
		// "localhost" on the first listener means 127.0.0.1:<its own port>.
		if got, err := tlsHello(t, p.addr, "localhost", nil); err == nil {
			t.Errorf("proxy dialled itself (and something answered %q)", got)
		}
	})
}

func TestGarbageAndSlowloris(t *testing.T) {
	p := startProxy(t, strings.Replace(baseConfig, "client_hello: 3", "client_hello: 1", 1)+"allowlist: [\"localhost\"]\n")

	t.Run("garbage", func(t *testing.T) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("\x00\x01\x02 this is no protocol at all\r\n\r\n"))
		start := time.Now()
		expectClosed(t, c, 3*time.Second)
		if d := time.Since(start); d > 4*time.Second {
			t.Errorf("garbage closed after %v; want at once", d)
		}
		p.waitMetric(t, `sniproxy_connections_rejected_total{reason="sniff_error"}`, 1)
		logged := p.logsSoon("connection", func(rec map[string]any) bool {
			return rec["result"] == "sniff_error" && strings.Contains(fmt.Sprint(rec["err"]), "000102")
		})
		if !logged {
			t.Errorf("sniff_error not logged with the first bytes in hex:\n%s", p.logs.String())
		}
	})

	t.Run("slowloris", func(t *testing.T) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		// A TLS record header, one byte at a time, never finishing.
		go func() {
			for _, b := range []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00} {
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(300 * time.Millisecond) // deliberate: the slowloris drip
			}
		}()
		expectClosed(t, c, 5*time.Second)
		if d := time.Since(start); d < 800*time.Millisecond || d > 5*time.Second {
			t.Errorf("slowloris closed after %v; want about client_hello (1s)", d)
		}
		p.waitMetric(t, `sniproxy_connections_rejected_total{reason="sniff_timeout"}`, 1)
	})

	t.Run("silent", func(t *testing.T) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		expectClosed(t, c, 5*time.Second)
		p.waitMetric(t, `sniproxy_connections_rejected_total{reason="sniff_timeout"}`, 2)
	})
}

func TestHalfClose(t *testing.T) {
	// clientFirst: the backend reads the whole request to EOF, then answers.
	clientFirst := rawBackend(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "read %d bytes after your FIN", len(b))
		c.(*net.TCPConn).CloseWrite()
	})
	// backendFirst: the backend says goodbye and half-closes at once, then
	// keeps reading, and reports what it read on a channel.
	got := make(chan string, 1)
	backendFirst := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil || line == "\r\n" {
				break
			}
		}
		c.Write([]byte("bye"))
		c.(*net.TCPConn).CloseWrite()
		rest, _ := io.ReadAll(br)
		got <- string(rest)
	})
	p := startProxy(t, baseConfig+fmt.Sprintf(`
allowlist: ["localhost"]
routes:
  - {match: "first.test", backend: "%s"}
  - {match: "second.test", backend: "%s"}
`, clientFirst, backendFirst))

	t.Run("client FIN first", func(t *testing.T) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		req := "POST / HTTP/1.1\r\nHost: first.test\r\nContent-Length: 5\r\n\r\nhello"
		c.Write([]byte(req))
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("read %d bytes after your FIN", len(req)); string(b) != want {
			t.Errorf("got %q; want %q", b, want)
		}
	})

	t.Run("backend FIN first", func(t *testing.T) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("GET / HTTP/1.1\r\nHost: second.test\r\n\r\n"))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c) // ends at the backend's FIN
		if err != nil || string(b) != "bye" {
			t.Fatalf("got %q, %v; want \"bye\" then EOF", b, err)
		}
		// Our direction is still open.
		c.Write([]byte("still here"))
		c.(*net.TCPConn).CloseWrite()
		select {
		case s := <-got:
			if s != "still here" {
				t.Errorf("backend read %q after its FIN; want %q", s, "still here")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("backend never saw the client's FIN")
		}
	})
}

// byteConn writes one byte per write(2), pausing between them.
type byteConn struct {
	net.Conn
}

func (c byteConn) Write(p []byte) (int, error) {
	for i := range p {
		if _, err := c.Conn.Write(p[i : i+1]); err != nil {
			return i, err
		}
		time.Sleep(100 * time.Microsecond) // deliberate: one byte per segment
	}
	return len(p), nil
}

func TestOneBytePerWriteClientHello(t *testing.T) {
	a := startTLSBackend(t, "A", "slow.test")
	p := startProxy(t, strings.Replace(baseConfig, "client_hello: 3", "client_hello: 20", 1)+fmt.Sprintf(`
allowlist: ["localhost"]
routes: [{match: "slow.test", backend: "%s"}]
`, a.addr))
	raw, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// The default crypto/tls hello carries an X25519MLKEM768 key share:
	// about 1.5 KB, so well over a thousand single-byte segments.
	c := tls.Client(byteConn{raw}, &tls.Config{ServerName: "slow.test", RootCAs: a.pool})
	c.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "A slow.test" {
		t.Fatalf("got %q, %v; want the backend's greeting", line, err)
	}
}

func TestSIGTERMExitsCleanly(t *testing.T) {
	p := startProxy(t, baseConfig+"allowlist: [\"localhost\"]\n")
	if err := p.stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Errorf("exit after SIGTERM: %v; want status 0", err)
	}
}
