package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The PROXY protocol with real peers from Debian: HAProxy as the L4
// balancer in front of sniproxy (PROXY in), nginx and HAProxy as backends
// behind it (PROXY out). Their configs go in the test's directory, they
// run in the foreground on free loopback ports and are stopped by PID;
// their Debian services are neither started nor needed.

// ppConfig is a sniproxy config for these tests; %s is the rest.
const ppConfig = `
metrics: {enabled: true, address: "METRICS"}
timeouts: {connect: 5, client_hello: 10, idle: 60}
shutdown_timeout: 5
log: {level: info, format: json}
workers: 2
control_socket: "CTLSOCK"
%s`

// peer is a running HAProxy or nginx.
type peer struct {
	cmd  *exec.Cmd
	out  logFile // its stdout and stderr
	done chan struct{}
}

// startPeer runs bin with args (a foreground server), its output in a file
// under dir, and waits until it accepts on every one of addrs. It is
// stopped by its PID when the test ends.
func startPeer(t *testing.T, dir, bin string, args []string, addrs ...string) *peer {
	t.Helper()
	path, err := exec.LookPath(bin)
	if err != nil {
		t.Fatalf("%s is not installed; .ci/run installs it", bin)
	}
	outPath := filepath.Join(dir, bin+".out")
	f, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := &peer{cmd: exec.Command(path, args...), out: logFile(outPath), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", bin, p.out.String())
		}
	})
	for _, a := range addrs {
		deadline := time.Now().Add(10 * time.Second)
		for {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-p.done:
				t.Fatalf("%s exited: %v\n%s", bin, p.cmd.ProcessState, p.out.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not accept on %s after 10s:\n%s", bin, a, p.out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return p
}

// dialFrom connects from the loopback address src (any port) to dst.
func dialFrom(t *testing.T, src, dst string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", dst)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// httpGet sends a GET for host on c and returns the whole answer (the
// request asks the server to close).
func httpGet(t *testing.T, c net.Conn, host string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("GET %s: %v (read %q)", host, err, b)
	}
	return string(b)
}

// okBackend answers the first line of every connection with "ok\n".
func okBackend(t *testing.T) string {
	t.Helper()
	return rawBackend(t, func(c net.Conn) {
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			io.WriteString(c, "ok\n")
		}
	})
}

// logged reports whether the proxy's access log has a line for client
// with result, whose err contains errPart.
func logged(p *proxyProc, client, result, errPart string) bool {
	for _, rec := range p.logLines("connection") {
		if rec["client"] == client && rec["result"] == result && strings.Contains(fmt.Sprint(rec["err"]), errPart) {
			return true
		}
	}
	return false
}

// TestProxyProtocolFromHAProxy puts HAProxy (mode tcp, send-proxy and
// send-proxy-v2) in front of a listener that accepts PROXY headers from
// 127.0.0.1 only. A client on 127.0.0.2 is logged as itself, not as
// HAProxy; a client on 127.0.0.3 that connects directly is refused at
// once, counted proxy_header and logged.
func TestProxyProtocolFromHAProxy(t *testing.T) {
	backend := okBackend(t)
	p := startProxy(t, fmt.Sprintf(ppConfig, fmt.Sprintf(`
listeners: [{address: "LISTEN", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1/32]}]
routes: [{match: pp.test, backend: %q}]
`, backend)))

	dir := t.TempDir()
	v1 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	v2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(dir, "haproxy.cfg")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global
  log stdout format raw local0
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind %s
  default_backend v1
frontend v2
  bind %s
  default_backend v2
backend v1
  server s1 %s send-proxy
backend v2
  server s1 %s send-proxy-v2
`, v1, v2, p.addr, p.addr)), 0o600)
	startPeer(t, dir, "haproxy", []string{"-f", cfg, "-db"}, v1, v2)

	for _, tc := range []struct{ name, front string }{{"send-proxy", v1}, {"send-proxy-v2", v2}} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialFrom(t, "127.0.0.2", tc.front)
			want := c.LocalAddr().String()
			if got := httpGet(t, c, "pp.test"); got != "ok\n" {
				t.Fatalf("through HAProxy and sniproxy: %q; want ok", got)
			}
			c.Close()
			waitFor(t, "the access-log line of client "+want, func() bool { return logged(p, want, "ok", "") })
		})
	}
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="proxy_header"}`, 0)

	// Not from HAProxy: refused before a header is read, long before the
	// header timeout (3s) or client_hello (10s) could end it.
	c := dialFrom(t, "127.0.0.3", p.addr)
	t0 := time.Now()
	expectClosed(t, c, 2*time.Second)
	if d := time.Since(t0); d > time.Second {
		t.Errorf("untrusted client closed after %v; want at once", d)
	}
	p.waitMetric(t, `sniproxy_connections_rejected_total{reason="proxy_header"}`, 1)
	want := c.LocalAddr().String()
	waitFor(t, "the access-log line of the untrusted client", func() bool { return logged(p, want, "proxy_header", "trusted_proxies") })
}

// TestProxyProtocolToNginx sends sniproxy's v1 and v2 headers to nginx
// 1.22 (http, listen ... proxy_protocol), which logs $proxy_protocol_addr:
// the client on 127.0.0.2, not sniproxy. A dual-stack listener sees that
// client as ::ffff:127.0.0.2; nginx must still be told 127.0.0.2 (TCP4).
// (nginx 1.22 has no $proxy_protocol_tlv_*, added in 1.23.2: the
// authority TLV is checked with HAProxy, TestProxyProtocolAuthority.)
func TestProxyProtocolToNginx(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	conf := filepath.Join(dir, "nginx.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 64; }
http {
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  log_format pp '$proxy_protocol_addr $proxy_protocol_port $host';
  access_log %[1]s/access.log pp;
  server {
    listen 127.0.0.1:%[2]d proxy_protocol;
    location / { return 200 "nginx $proxy_protocol_addr\n"; }
  }
}
`, dir, port)), 0o600)
	nginxAddr := fmt.Sprintf("127.0.0.1:%d", port)
	startPeer(t, dir, "nginx", []string{"-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", conf, "-g", "daemon off;"}, nginxAddr)
	accessLog := logFile(filepath.Join(dir, "access.log"))

	for _, tc := range []struct {
		name, version string
		dualStack     bool
	}{
		{"v1", "v1", false},
		{"v2", "v2", false},
		{"v1 from a dual-stack listener", "v1", true},
		{"v2 from a dual-stack listener", "v2", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			listen := `listen_addrs: ["LISTEN"]`
			var dual string
			if tc.dualStack {
				dual = fmt.Sprintf("[::]:%d", freePort(t))
				listen = fmt.Sprintf("listeners: [{address: %q}]", dual)
			}
			p := startProxy(t, fmt.Sprintf(ppConfig, fmt.Sprintf(`%s
routes: [{match: nginx.test, backend: %q}]
backend: {proxy_protocol: %s}
`, listen, nginxAddr, tc.version)))
			addr := p.addr
			if tc.dualStack {
				_, port, _ := net.SplitHostPort(dual)
				addr = "127.0.0.1:" + port
			}
			c := dialFrom(t, "127.0.0.2", addr)
			_, cport, _ := net.SplitHostPort(c.LocalAddr().String())
			if got := httpGet(t, c, "nginx.test"); !strings.HasSuffix(got, "\r\n\r\nnginx 127.0.0.2\n") {
				t.Errorf("nginx answered %q; want it to name 127.0.0.2 as the PROXY client", got)
			}
			want := "127.0.0.2 " + cport + " nginx.test\n"
			waitFor(t, "nginx's access-log line "+strings.TrimSpace(want), func() bool { return strings.Contains(accessLog.String(), want) })
		})
	}
}

// TestProxyProtocolAuthority sends sniproxy's v2 header to HAProxy
// (accept-proxy), which logs the client and PP2_TYPE_AUTHORITY
// (fc_pp_authority): the name the client asked for, as routed (a Host
// header's name is lowercased and loses its port).
func TestProxyProtocolAuthority(t *testing.T) {
	backend := okBackend(t)
	dir := t.TempDir()
	front := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(dir, "haproxy.cfg")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global
  log stdout format raw local0
defaults
  mode tcp
  log global
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend pp
  bind %s accept-proxy
  log-format "pp client=%%ci authority=%%[fc_pp_authority]"
  default_backend b
backend b
  server s1 %s
`, front, backend)), 0o600)
	h := startPeer(t, dir, "haproxy", []string{"-f", cfg, "-db"}, front)
	p := startProxy(t, fmt.Sprintf(ppConfig, fmt.Sprintf(`listen_addrs: ["LISTEN"]
routes: [{match: "*.auth.test", backend: %q}]
backend: {proxy_protocol: v2}
`, front)))

	c := dialFrom(t, "127.0.0.2", p.addr)
	if got := httpGet(t, c, "Www.Auth.test:8080"); got != "ok\n" {
		t.Fatalf("through sniproxy and HAProxy: %q; want ok", got)
	}
	c.Close()
	want := "pp client=127.0.0.2 authority=www.auth.test\n"
	waitFor(t, "HAProxy's log line "+want, func() bool { return strings.Contains(h.out.String(), want) })
}
