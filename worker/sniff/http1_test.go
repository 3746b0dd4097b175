package sniff

import (
	"bufio"
	"bytes"
	"errors"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// http1Captures are the golden expectations for testdata/http1, written by
// TestCaptureHTTP from real clients.
var http1Captures = []struct {
	file  string
	name  string
	class string
	err   error // the sentinel ParseHTTP1 returns, or nil
}{
	{"curl-get-resolve.bin", "www.example.com", "", nil},
	{"curl-get-host-header-mixed-case-dot.bin", "www.example.org", "", nil},
	{"curl-get-host-ipv6.bin", "::1", "", nil},
	{"curl-http10-no-host.bin", "", "", ErrNoName},
	{"curl-post-jsonrpc.bin", "rpc.example.com", "jsonrpc", nil},
	{"curl-websocket.bin", "ws.example.com", "websocket", nil},
	{"curl-socketio-polling.bin", "io.example.com", "socketio", nil},
	{"curl-soap11.bin", "soap.example.com", "soap", nil},
	{"curl-grpc-web-text.bin", "grpcweb.example.com", "grpc-web", nil},
	{"curl-proxy-absolute-form.bin", "proxied.example.net", "", nil},
	// An absolute-form target whose host differs from "Host: other.example"
	// is refused, as ParseH2C refuses a host that differs from :authority.
	{"curl-proxy-absolute-form-other-host.bin", "", "", ErrMalformed},
	// An h2c upgrade request is HTTP/1.1 until the server agrees.
	{"curl-upgrade-h2c.bin", "up.example.com", "", nil},
	{"go-get.bin", "go.example.com", "", nil},
}

// httpReadCaptures returns the files in dir, by name, and fails t if they
// are not exactly the files named in want.
func httpReadCaptures(t testing.TB, dir string, want []string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string][]byte)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = b
	}
	for _, name := range want {
		if _, ok := files[name]; !ok {
			t.Errorf("%s/%s: in the golden table but not on disk; run go test ./worker/sniff/ -run TestCaptureHTTP -update-http", dir, name)
		}
	}
	for name := range files {
		if !slices.Contains(want, name) {
			t.Errorf("%s/%s: on disk but not in the golden table", dir, name)
		}
	}
	return files
}

// httpSentinel returns the sniff sentinel err wraps, err itself if none,
// or nil.
func httpSentinel(err error) error {
	for _, s := range []error{ErrNeedMore, ErrNotProtocol, ErrMalformed, ErrNoName} {
		if errors.Is(err, s) {
			return s
		}
	}
	return err
}

// http1HeadEnd returns the offset just past the empty line that ends the
// request head in b, or -1. It is deliberately simpler than ParseHTTP1.
func http1HeadEnd(b []byte) int {
	for i := 0; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		if j := i + 1; j < len(b) && b[j] == '\n' {
			return j + 1
		}
		if j := i + 2; j < len(b) && b[j-1] == '\r' && b[j] == '\n' {
			return j + 1
		}
	}
	return -1
}

func TestParseHTTP1Captures(t *testing.T) {
	var names []string
	for _, c := range http1Captures {
		names = append(names, c.file)
	}
	files := httpReadCaptures(t, http1CaptureDir, names)
	for _, c := range http1Captures {
		t.Run(c.file, func(t *testing.T) {
			b, ok := files[c.file]
			if !ok {
				t.Fatal("capture missing; reported above")
			}
			res, err := ParseHTTP1(b)
			if got := httpSentinel(err); got != c.err {
				t.Fatalf("ParseHTTP1 error = %v; want %v", err, c.err)
			}
			want := Result{Protocol: HTTP, Name: c.name, Class: c.class}
			if res != want {
				t.Errorf("ParseHTTP1 = %+v; want %+v", res, want)
			}

			// Every prefix that ends before the head does is ErrNeedMore;
			// every longer one is decided the same way.
			end := http1HeadEnd(b)
			if end < 0 {
				t.Fatal("capture has no complete head")
			}
			for i := 0; i < len(b); i++ {
				r, err := ParseHTTP1(b[:i])
				if i < end {
					if !errors.Is(err, ErrNeedMore) || r.Name != "" {
						t.Fatalf("ParseHTTP1(b[:%d]) = %+v, %v; want ErrNeedMore", i, r, err)
					}
					continue
				}
				if httpSentinel(err) != c.err || r.Name != c.name {
					t.Fatalf("ParseHTTP1(b[:%d]) = %+v, %v; want name %q, %v", i, r, err, c.name, c.err)
				}
			}

			// Differential: net/http reads the same request and host
			// (it is more lenient: it does not compare Host with the
			// target's authority).
			if c.err == ErrMalformed {
				return
			}
			req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
			if err != nil {
				t.Fatalf("http.ReadRequest: %v", err)
			}
			if req.Host == "" {
				if c.name != "" {
					t.Errorf("net/http found no host; want %q", c.name)
				}
			} else if got, err := httpHostName(req.Host); err != nil || got != c.name {
				t.Errorf("net/http host %q normalises to %q, %v; want %q", req.Host, got, err, c.name)
			}
		})
	}
}

// TestParseHTTP1LeavesH2C checks that ParseHTTP1 never claims h2c prior
// knowledge bytes: it must wait while they could be a request line
// "PRI ..." and say ErrNotProtocol once they are "PRI * HTTP/2.0".
func TestParseHTTP1LeavesH2C(t *testing.T) {
	var names []string
	for _, c := range h2cCaptures {
		names = append(names, c.file)
	}
	for name, b := range httpReadCaptures(t, h2cCaptureDir, names) {
		for i := 0; i <= len(b); i++ {
			res, err := ParseHTTP1(b[:i])
			want := ErrNotProtocol
			if i < len(http1H2Preface) {
				want = ErrNeedMore
			}
			if !errors.Is(err, want) || res != (Result{}) {
				t.Fatalf("%s: ParseHTTP1(b[:%d]) = %+v, %v; want %v", name, i, res, err, want)
			}
		}
	}
}

func TestParseHTTP1(t *testing.T) {
	const (
		crlf = "\r\n"
		get  = "GET / HTTP/1.1\r\n"
	)
	long := func(n int) string { return strings.Repeat("a", n) }
	// head builds a GET request head with the given header lines.
	head := func(lines ...string) string { return get + strings.Join(lines, crlf) + crlf + crlf }
	tests := []struct {
		name  string
		in    string
		want  string // Result.Name
		class string
		err   error
	}{
		// Deciding early.
		{"empty", "", "", "", ErrNeedMore},
		{"one method byte", "G", "", "", ErrNeedMore},
		{"method without space", "OPTIONS", "", "", ErrNeedMore},
		{"method and space", "GET ", "", "", ErrNeedMore},
		{"lowercase method", "get / HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrNotProtocol},
		{"lowercase first byte", "g", "", "", ErrNotProtocol},
		{"mixed-case method", "Get / HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"digit in method", "GET1 / HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"hyphen first", "-GET / HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"leading space", " GET / HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"leading CRLF", "\r\nGET / HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"TLS record", "\x16\x03\x01\x02\x00\x01", "", "", ErrNotProtocol},
		{"SSH banner", "SSH-2.0-OpenSSH_9.2\r\n", "", "", ErrNotProtocol},
		{"NUL", "\x00", "", "", ErrNotProtocol},
		{"method too long", long(0) + strings.Repeat("A", 25), "", "", ErrNotProtocol},
		{"method of 24 bytes", strings.Repeat("A", 24) + " / HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"hyphenated method", "VERSION-CONTROL / HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"h2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "", "", ErrNotProtocol},
		{"h2 preface request line", "PRI * HTTP/2.0", "", "", ErrNotProtocol},
		{"h2 preface prefix", "PRI * HTTP/2.", "", "", ErrNeedMore},
		{"PRI over HTTP/1.1", "PRI / HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"PRI asterisk HTTP/1.1", "PRI * HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},

		// Request line.
		{"HTTP/1.0", "GET / HTTP/1.0\r\nHost: a\r\n\r\n", "a", "", nil},
		{"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"HTTP/2.0", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"HTTP/0.9 request", "GET /\r\n", "", "", ErrMalformed},
		{"HTTP/0.9 version", "GET / HTTP/0.9\r\n", "", "", ErrMalformed},
		{"lowercase version", "GET / http/1.1\r\n", "", "", ErrMalformed},
		{"version decided early", "GET / HTTP/3", "", "", ErrMalformed},
		{"space after version", "GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"two spaces", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"tab separator", "GET\t/ HTTP/1.1\r\n", "", "", ErrNotProtocol},
		{"control byte in target", "GET /\x01 HTTP/1.1\r\n", "", "", ErrMalformed},
		{"DEL in target", "GET /\x7f HTTP/1.1\r\n", "", "", ErrMalformed},
		{"bare CR after version", "GET / HTTP/1.1\rHost: a\r\n\r\n", "", "", ErrMalformed},
		{"request line incomplete", "GET / HTTP/1.1\r", "", "", ErrNeedMore},

		// Line endings.
		{"bare LF", "GET / HTTP/1.1\nHost: lf.example\nAccept: */*\n\n", "lf.example", "", nil},
		{"mixed endings", "GET / HTTP/1.1\r\nHost: mix.example\n\r\n", "mix.example", "", nil},
		{"bare CR in value", head("Host: a\rb"), "", "", ErrMalformed},
		{"bare CR ends head", get + "Host: a\r\n\r", "", "", ErrNeedMore},
		{"CR then garbage ends head", get + "Host: a\r\n\rX", "", "", ErrMalformed},

		// Header fields.
		{"obs-fold", head("Host: a", " folded"), "", "", ErrMalformed},
		{"tab fold", head("Host: a", "\tfolded"), "", "", ErrMalformed},
		{"space before colon", head("Host : a"), "", "", ErrMalformed},
		{"empty field name", head(": x", "Host: a"), "", "", ErrMalformed},
		{"NUL in value", head("Host: a", "X: a\x00b"), "", "", ErrMalformed},
		{"non-token name", head("Ho(st: a"), "", "", ErrMalformed},
		{"obs-text value", head("Host: a", "X: caf\xc3\xa9"), "a", "", nil},
		{"OWS around value", head("Host: \t spaced.example \t"), "spaced.example", "", nil},
		{"no space after colon", head("Host:nospace.example"), "nospace.example", "", nil},
		{"host name case", head("hOsT: a"), "a", "", nil},
		{"header decided early", get + "Bad Name: x", "", "", ErrMalformed},
		{"two Hosts decided early", get + "Host: a\r\nHost: a\r\n", "", "", ErrMalformed},
		{"bad Host decided early", get + "Host: a/b\r\n", "", "", ErrMalformed},
		{"asterisk decided early", "GET * HTTP/1.1\r\n", "", "", ErrMalformed},
		{"userinfo decided early", "GET http://u@a/ HTTP/1.1\r\n", "", "", ErrMalformed},

		// Host.
		{"HTTP/1.1 without Host", head("Accept: */*"), "", "", ErrMalformed},
		{"HTTP/1.0 without Host", "GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", "", "", ErrNoName},
		{"empty Host", head("Host:"), "", "", ErrNoName},
		{"blank Host", head("Host:   "), "", "", ErrNoName},
		{"two Hosts", head("Host: a", "Host: a"), "", "", ErrMalformed},
		{"two Hosts differing case", head("Host: a", "HOST: b"), "", "", ErrMalformed},
		{"port", head("Host: EXAMPLE.com.:443"), "example.com", "", nil},
		{"empty port", head("Host: a:"), "a", "", nil},
		{"max port", head("Host: a:65535"), "a", "", nil},
		{"port out of range", head("Host: a:65536"), "", "", ErrMalformed},
		{"long port", head("Host: a:0000080"), "", "", ErrMalformed},
		{"bad port", head("Host: a:8x"), "", "", ErrMalformed},
		{"two ports", head("Host: a:80:80"), "", "", ErrMalformed},
		{"IPv4", head("Host: 192.0.2.1:80"), "192.0.2.1", "", nil},
		{"IPv6", head("Host: [2001:DB8::0001]"), "2001:db8::1", "", nil},
		{"IPv6 port", head("Host: [::1]:8080"), "::1", "", nil},
		{"IPv4-mapped IPv6", head("Host: [::FFFF:192.0.2.1]"), "::ffff:192.0.2.1", "", nil},
		{"bare IPv6", head("Host: ::1"), "", "", ErrMalformed},
		{"unclosed IPv6", head("Host: [::1"), "", "", ErrMalformed},
		{"IPv6 zone", head("Host: [fe80::1%25eth0]"), "", "", ErrMalformed},
		{"IPv4 in brackets", head("Host: [192.0.2.1]"), "", "", ErrMalformed},
		{"IPvFuture", head("Host: [v1.fe]"), "", "", ErrMalformed},
		{"junk after IPv6", head("Host: [::1]x"), "", "", ErrMalformed},
		{"underscore", head("Host: my_host.internal"), "my_host.internal", "", nil},
		{"space in host", head("Host: exa mple.com"), "", "", ErrMalformed},
		{"slash in host", head("Host: a/b"), "", "", ErrMalformed},
		{"userinfo in host", head("Host: user@a"), "", "", ErrMalformed},
		{"percent in host", head("Host: a%2eb"), "", "", ErrMalformed},
		{"UTF-8 host", head("Host: caf\xc3\xa9.example"), "", "", ErrMalformed},
		{"empty label", head("Host: a..b"), "", "", ErrMalformed},
		{"two trailing dots", head("Host: a.."), "", "", ErrMalformed},
		{"leading dot", head("Host: .a"), "", "", ErrMalformed},
		{"only a dot", head("Host: ."), "", "", ErrMalformed},
		{"63-byte label", head("Host: " + long(63) + ".example"), long(63) + ".example", "", nil},
		{"64-byte label", head("Host: " + long(64) + ".example"), "", "", ErrMalformed},
		{"253-byte name", head("Host: " + strings.Repeat(long(62)+".", 4) + long(1) + "."), strings.Repeat(long(62)+".", 4) + long(1), "", nil},
		{"254-byte name", head("Host: " + strings.Repeat(long(62)+".", 4) + long(2)), "", "", ErrMalformed},

		// Request targets.
		{"OPTIONS asterisk", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"GET asterisk", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"CONNECT", "CONNECT Proxy.Example:443 HTTP/1.1\r\nHost: proxy.example:443\r\n\r\n", "proxy.example", "", nil},
		{"CONNECT without Host", "CONNECT proxy.example:443 HTTP/1.1\r\n\r\n", "proxy.example", "", nil},
		{"CONNECT bad authority", "CONNECT a/b:443 HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"CONNECT origin-form (net/rpc)", "CONNECT /_goRPC_ HTTP/1.0\r\n\r\n", "", "", ErrNoName},
		{"absolute-form", "GET HTTP://A.Example:8080/x HTTP/1.1\r\nHost: a.example:8080\r\n\r\n", "a.example", "", nil},
		{"absolute-form no path", "GET http://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", "", nil},
		{"absolute-form query only", "GET http://a.example?x HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", "", nil},
		{"absolute-form HTTP/1.0 no Host", "GET http://a.example/ HTTP/1.0\r\n\r\n", "a.example", "", nil},
		{"absolute-form HTTP/1.1 no Host", "GET http://a.example/ HTTP/1.1\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form userinfo", "GET http://good.example@evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form empty authority", "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form bad host", "GET http://a%2e/ HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form invalid Host", "GET http://a.example/ HTTP/1.1\r\nHost: b c\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form two Hosts", "GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", "", "", ErrMalformed},
		// The target's authority and a Host field must name the same host,
		// compared as names (port, case and a trailing dot ignored), as
		// ParseH2C compares host with :authority.
		{"absolute-form Host differs", "GET HTTP://A.Example:8080/x HTTP/1.1\r\nHost: b\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form Host differs HTTP/1.0", "GET http://a.example/ HTTP/1.0\r\nHost: b.example\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form Host is a subdomain", "GET http://a.example/ HTTP/1.1\r\nHost: x.a.example\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form Host other port", "GET http://a.example:8080/ HTTP/1.1\r\nHost: a.example:9090\r\n\r\n", "a.example", "", nil},
		{"absolute-form Host no port", "GET http://a.example:8080/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", "", nil},
		{"absolute-form Host case and dot", "GET http://a.example/ HTTP/1.1\r\nHost: A.EXAMPLE.\r\n\r\n", "a.example", "", nil},
		{"absolute-form target dot", "GET http://A.example.:80/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", "", nil},
		{"absolute-form IPv6 same", "GET http://[::1]:80/ HTTP/1.1\r\nHost: [0:0::1]\r\n\r\n", "::1", "", nil},
		{"absolute-form IPv6 differs", "GET http://[::1]/ HTTP/1.1\r\nHost: [::2]\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form IPv6 and name", "GET http://[::1]/ HTTP/1.1\r\nHost: localhost\r\n\r\n", "", "", ErrMalformed},
		{"absolute-form empty Host", "GET http://a.example/ HTTP/1.1\r\nHost:\r\n\r\n", "", "", ErrMalformed},
		{"CONNECT Host differs", "CONNECT a.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n", "", "", ErrMalformed},
		{"CONNECT Host same", "CONNECT A.example:443 HTTP/1.1\r\nHost: a.example.\r\n\r\n", "a.example", "", nil},
		{"no scheme slashes", "GET urn:isbn:1 HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},
		{"authority-form GET", "GET a.example:80 HTTP/1.1\r\nHost: a\r\n\r\n", "", "", ErrMalformed},

		// Classes.
		{"websocket mixed case", head("Host: a", "Upgrade: WebSocket", "Connection: upgrade"), "a", "websocket", nil},
		{"websocket in list", head("Host: a", "Upgrade: h2c , websocket"), "a", "websocket", nil},
		{"websocket second Upgrade", head("Host: a", "Upgrade: h2c", "Upgrade: websocket"), "a", "websocket", nil},
		{"websocket/13 is not websocket", head("Host: a", "Upgrade: websocket/13"), "a", "", nil},
		{"socket.io websocket", "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", "a", "socketio", nil},
		{"socket.io EIO later", "GET /socket.io/?transport=polling&EIO=3 HTTP/1.1\r\nHost: a\r\n\r\n", "a", "socketio", nil},
		{"socket.io absolute-form", "GET http://a/socket.io/?EIO=4 HTTP/1.1\r\nHost: a\r\n\r\n", "a", "socketio", nil},
		{"socket.io without EIO", "GET /socket.io/?transport=polling HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"socket.io EIO in path", "GET /socket.io/EIO=4 HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"not socket.io", "GET /socket.iox/?EIO=4 HTTP/1.1\r\nHost: a\r\n\r\n", "a", "", nil},
		{"soap action", head("Host: a", "SOAPAction:"), "a", "soap", nil},
		{"soap 1.2", head("Host: a", "Content-Type: Application/SOAP+XML; charset=utf-8; action=\"x\""), "a", "soap", nil},
		{"grpc-web", head("Host: a", "Content-Type: application/grpc-web+proto"), "a", "grpc-web", nil},
		{"grpc is not grpc-web", head("Host: a", "Content-Type: application/grpc"), "a", "", nil},
		{"jsonrpc", head("Host: a", "Content-Type: application/json; charset=utf-8") + `{"id":1, "jsonrpc" : "2.0"}`, "a", "jsonrpc", nil},
		{"jsonrpc +json", head("Host: a", "Content-Type: application/vnd.api+json") + "{\n\"jsonrpc\"\n:\"2.0\"}", "a", "jsonrpc", nil},
		{"jsonrpc body not here yet", head("Host: a", "Content-Type: application/json", "Content-Length: 40"), "a", "", nil},
		{"jsonrpc body partial", head("Host: a", "Content-Type: application/json") + `{"jsonr`, "a", "", nil},
		{"json without jsonrpc", head("Host: a", "Content-Type: application/json") + `{"jsonrpc_x":1,"v":"jsonrpc"}`, "a", "", nil},
		{"jsonrpc body but not json", head("Host: a", "Content-Type: text/plain") + `{"jsonrpc":"2.0"}`, "a", "", nil},
		{"first Content-Type counts", head("Host: a", "Content-Type: application/grpc-web", "Content-Type: text/plain"), "a", "grpc-web", nil},
		{"class with no name", "GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n", "", "websocket", ErrNoName},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := ParseHTTP1([]byte(tt.in))
			if got := httpSentinel(err); got != tt.err {
				t.Fatalf("ParseHTTP1(%q) error = %v; want %v", tt.in, err, tt.err)
			}
			if res.Name != tt.want || res.Class != tt.class {
				t.Errorf("ParseHTTP1(%q) = %+v; want name %q, class %q", tt.in, res, tt.want, tt.class)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "sniff: http: ") {
				t.Errorf("error %q lacks the \"sniff: http: \" prefix", err)
			}
			wantProto := HTTP
			if errors.Is(err, ErrNotProtocol) || errors.Is(err, ErrNeedMore) &&
				(!strings.Contains(tt.in, " ") || strings.HasPrefix(http1H2Preface, tt.in)) {
				wantProto = Unknown
			}
			if res.Protocol != wantProto {
				t.Errorf("Protocol = %v; want %v", res.Protocol, wantProto)
			}
			httpCheckPrefixes(t, "ParseHTTP1", ParseHTTP1, []byte(tt.in))
		})
	}
}

// TestParseHTTP1Limit checks MaxHTTP1Bytes at its edge: a head of exactly
// MaxHTTP1Bytes bytes is read, one more byte is ErrMalformed, and so is a
// head that is still going at MaxHTTP1Bytes, however many bytes follow.
func TestParseHTTP1Limit(t *testing.T) {
	const prefix = "GET / HTTP/1.1\r\nHost: limit.example\r\nX-Pad: "
	pad := func(n int) []byte {
		return []byte(prefix + strings.Repeat("p", n-len(prefix)-len("\r\n\r\n")) + "\r\n\r\n")
	}
	exact := pad(MaxHTTP1Bytes)
	if len(exact) != MaxHTTP1Bytes {
		t.Fatalf("len = %d", len(exact))
	}
	if res, err := ParseHTTP1(exact); err != nil || res.Name != "limit.example" {
		t.Errorf("head of MaxHTTP1Bytes: %+v, %v; want limit.example", res, err)
	}
	if _, err := ParseHTTP1(exact[:MaxHTTP1Bytes-1]); !errors.Is(err, ErrNeedMore) {
		t.Errorf("head of MaxHTTP1Bytes less its last byte: %v; want ErrNeedMore", err)
	}
	over := pad(MaxHTTP1Bytes + 1)
	for _, n := range []int{MaxHTTP1Bytes, MaxHTTP1Bytes + 1, len(over)} {
		if _, err := ParseHTTP1(over[:n]); !errors.Is(err, ErrMalformed) {
			t.Errorf("head of MaxHTTP1Bytes+1, first %d bytes: %v; want ErrMalformed", n, err)
		}
	}
	if _, err := ParseHTTP1(over[:MaxHTTP1Bytes-1]); !errors.Is(err, ErrNeedMore) {
		t.Errorf("head of MaxHTTP1Bytes+1, first MaxHTTP1Bytes-1 bytes: %v; want ErrNeedMore", err)
	}
	// A huge header block with a body after the cap: the body does not
	// count, the head does.
	withBody := append(slices.Clip(exact), bytes.Repeat([]byte("b"), 1<<20)...)
	if res, err := ParseHTTP1(withBody); err != nil || res.Name != "limit.example" {
		t.Errorf("head of MaxHTTP1Bytes with a 1 MiB body: %+v, %v", res, err)
	}
}

// httpCheckPrefixes checks the decisions parse makes on the prefixes of b
// against its decision on b: every prefix is ErrNeedMore or decided the
// same way (same sentinel, same name).
func httpCheckPrefixes(t *testing.T, fn string, parse func([]byte) (Result, error), b []byte) {
	t.Helper()
	full, ferr := parse(b)
	for i := 0; i < len(b); i++ {
		r, err := parse(b[:i])
		if errors.Is(err, ErrNeedMore) {
			continue
		}
		if httpSentinel(err) != httpSentinel(ferr) || r.Name != full.Name {
			t.Fatalf("%s(b[:%d]) = %+v, %v but %s(b) = %+v, %v", fn, i, r, err, fn, full, ferr)
		}
	}
}

// httpCheckInvariants is the fuzz oracle for ParseHTTP1 and ParseH2C.
func httpCheckInvariants(t *testing.T, parse func([]byte) (Result, error), proto Protocol, b []byte) (Result, error) {
	t.Helper()
	res, err := parse(b)
	s := httpSentinel(err)
	switch {
	case err == nil:
		if res.Name == "" {
			t.Fatalf("nil error with no name: %+v", res)
		}
		if strings.Contains(res.Name, ":") {
			if a, err := netip.ParseAddr(res.Name); err != nil || !a.Is6() || a.String() != res.Name {
				t.Fatalf("name %q is not a canonical IPv6 address", res.Name)
			}
		} else if n, err := httpHostName(res.Name); err != nil || n != res.Name || strings.HasSuffix(n, ".") {
			t.Fatalf("name %q is not normalised: %q, %v", res.Name, n, err)
		}
	case s != ErrNeedMore && s != ErrNotProtocol && s != ErrMalformed && s != ErrNoName:
		t.Fatalf("error %v wraps no sentinel", err)
	case res.Name != "":
		t.Fatalf("name %q with error %v", res.Name, err)
	}
	if (err == nil || s == ErrNoName || s == ErrMalformed) && res.Protocol != proto {
		t.Fatalf("Protocol = %v with error %v; want %v", res.Protocol, err, proto)
	}
	if s == ErrNotProtocol && res != (Result{}) {
		t.Fatalf("ErrNotProtocol with %+v", res)
	}

	// Decisions are final: more bytes never change a name or a sentinel.
	if s != ErrNeedMore {
		for _, extra := range [][]byte{[]byte("x"), []byte("\r\n\r\n"), b} {
			r2, err2 := parse(append(slices.Clip(b), extra...))
			if httpSentinel(err2) != s || r2.Name != res.Name {
				t.Fatalf("f(b) = %+v, %v but f(b+%q) = %+v, %v", res, err, extra, r2, err2)
			}
		}
	}
	if len(b) > 0 {
		if r0, err0 := parse(b[:len(b)-1]); !errors.Is(err0, ErrNeedMore) &&
			(httpSentinel(err0) != s || r0.Name != res.Name) {
			t.Fatalf("f(b[:len-1]) = %+v, %v but f(b) = %+v, %v", r0, err0, res, err)
		}
	}
	return res, err
}

func FuzzParseHTTP1(f *testing.F) {
	for _, c := range http1Captures {
		b, err := os.ReadFile(filepath.Join(http1CaptureDir, c.file))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{
		"GET http://a.example:80/x HTTP/1.1\r\nHost: b\r\n\r\n",
		"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
		"OPTIONS * HTTP/1.0\r\n\r\n",
		"GET / HTTP/1.1\nHost: [::1]:80\nUpgrade: websocket\n\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\r\n{\"jsonrpc\":\"2.0\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		res, err := httpCheckInvariants(t, ParseHTTP1, HTTP, b)
		if err != nil {
			return
		}
		// Differential: when net/http also reads the request, it must
		// find the same host. (It is more lenient than ParseHTTP1, and
		// stricter about Content-Length and Transfer-Encoding, so only
		// agreement on success is checked.)
		req, rerr := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
		if rerr != nil || req.Host == "" {
			return
		}
		if n, herr := httpHostName(req.Host); herr == nil && n != res.Name {
			t.Fatalf("ParseHTTP1 name %q; net/http host %q (%q)", res.Name, req.Host, n)
		}
	})
}

func BenchmarkParseHTTP1(b *testing.B) {
	for _, c := range http1Captures {
		in, err := os.ReadFile(filepath.Join(http1CaptureDir, c.file))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(strings.TrimSuffix(c.file, ".bin"), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				if _, err := ParseHTTP1(in); httpSentinel(err) != c.err {
					b.Fatal(err)
				}
			}
		})
	}
	// The dispatcher's other cases: a TLS record and a partial head.
	b.Run("not-http", func(b *testing.B) {
		b.ReportAllocs()
		in := []byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
		for b.Loop() {
			ParseHTTP1(in)
		}
	})
	b.Run("partial-head", func(b *testing.B) {
		b.ReportAllocs()
		in := []byte("GET /index.html HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/7.88.1\r\nAcc")
		for b.Loop() {
			ParseHTTP1(in)
		}
	})
}

// BenchmarkHTTP1ReadRequest is the alternative STYLE.md suggests:
// net/http's parser over the same bytes, for comparison with
// BenchmarkParseHTTP1.
func BenchmarkHTTP1ReadRequest(b *testing.B) {
	for _, c := range http1Captures {
		in, err := os.ReadFile(filepath.Join(http1CaptureDir, c.file))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(strings.TrimSuffix(c.file, ".bin"), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(in)))
			r := bytes.NewReader(in)
			for b.Loop() {
				r.Reset(in)
				if _, err := http.ReadRequest(bufio.NewReader(r)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
