package sniff

import (
	"bytes"
	"context"
	"flag"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

var updateHTTP = flag.Bool("update-http", false, "regenerate testdata/http1 and testdata/h2c from real HTTP clients (curl, net/http)")

// The capture directories hold what a client sent on a fresh TCP connection
// until it went quiet. The golden expectations are http1Captures in
// http1_test.go and h2cCaptures in h2c_test.go.
const (
	http1CaptureDir = "testdata/http1"
	h2cCaptureDir   = "testdata/h2c"
)

// httpCaptureIdle is how long a client must stay quiet before a capture
// ends. Every client here writes its request in one go.
const httpCaptureIdle = 500 * time.Millisecond

// TestCaptureHTTP captures requests from real HTTP clients (curl, net/http)
// over 127.0.0.1 and checks each one against http1Captures with ParseHTTP1
// or h2cCaptures with ParseH2C. It needs curl (with HTTP/2 support) in PATH.
// The captures go to temporary directories unless -update-http is given,
// which regenerates testdata/http1 and testdata/h2c instead:
//
//	go test ./worker/sniff/ -run TestCaptureHTTP -update-http
//
// Captures are not byte-for-byte reproducible (ports, user agents); the
// golden tables must still hold after a run, and this test checks that they
// do.
func TestCaptureHTTP(t *testing.T) {
	captureNeedTools(t, "curl")
	http1Out := newCaptureOut(t, *updateHTTP, http1CaptureDir)
	h2cOut := newCaptureOut(t, *updateHTTP, h2cCaptureDir)

	curl := func(args ...string) func(addr string) error {
		// -q, which must come first, keeps any ~/.curlrc out of the
		// captures.
		args = append([]string{"-q", "-sS", "-o", "/dev/null", "--max-time", "5"}, args...)
		return func(addr string) error {
			return captureRun("curl", captureExpand(addr, args)...)
		}
	}
	// goClient requests url with rt, every connection dialled to the
	// capture listener whatever the URL's host.
	goClient := func(newRT func(dial func(context.Context) (net.Conn, error)) http.RoundTripper, method, url, ctype string, body []byte) func(addr string) error {
		return func(addr string) error {
			url := strings.ReplaceAll(url, "$PORT", addr[strings.LastIndexByte(addr, ':')+1:])
			ctx, cancel := context.WithTimeout(context.Background(), captureClientTimeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
			if err != nil {
				return err
			}
			if ctype != "" {
				req.Header.Set("Content-Type", ctype)
				req.Header.Set("Te", "trailers")
			}
			rt := newRT(func(ctx context.Context) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			})
			resp, err := rt.RoundTrip(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			return nil
		}
	}
	h1 := func(dial func(context.Context) (net.Conn, error)) http.RoundTripper {
		return &http.Transport{
			Proxy:       nil,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		}
	}
	// h2 is HTTP/2 with prior knowledge over TCP: net/http's bundled copy
	// of golang.org/x/net/http2 (x/net's own Transport is deprecated).
	h2 := func(dial func(context.Context) (net.Conn, error)) http.RoundTripper {
		var protos http.Protocols
		protos.SetUnencryptedHTTP2(true)
		return &http.Transport{
			Proxy:       nil,
			Protocols:   &protos,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		}
	}
	grpcBody := []byte("\x00\x00\x00\x00\x07\x0a\x05world") // gRPC length-prefixed HelloRequest{name: "world"}

	for _, c := range []struct {
		name   string
		client func(addr string) error
	}{
		{"curl-get-resolve.bin", curl("--resolve", "www.example.com:$PORT:$HOST", "http://www.example.com:$PORT/index.html")},
		{"curl-get-host-header-mixed-case-dot.bin", curl("-H", "Host: WWW.Example.ORG.", "http://$ADDR/path?q=1")},
		{"curl-get-host-ipv6.bin", curl("-H", "Host: [::1]:8080", "http://$ADDR/")},
		{"curl-http10-no-host.bin", curl("-0", "-H", "Host:", "http://$ADDR/")},
		{"curl-post-jsonrpc.bin", curl("--resolve", "rpc.example.com:$PORT:$HOST",
			"-H", "Content-Type: application/json",
			"--data-binary", `{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":1}`,
			"http://rpc.example.com:$PORT/")},
		{"curl-websocket.bin", curl("--resolve", "ws.example.com:$PORT:$HOST",
			"-H", "Upgrade: websocket", "-H", "Connection: Upgrade",
			"-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
			"http://ws.example.com:$PORT/chat")},
		{"curl-socketio-polling.bin", curl("--resolve", "io.example.com:$PORT:$HOST",
			"http://io.example.com:$PORT/socket.io/?EIO=4&transport=polling&t=OkXQp1a")},
		{"curl-soap11.bin", curl("--resolve", "soap.example.com:$PORT:$HOST",
			"-H", "Content-Type: text/xml; charset=utf-8",
			"-H", `SOAPAction: "http://tempuri.org/Add"`,
			"--data-binary", `<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><Add xmlns="http://tempuri.org/"><intA>1</intA><intB>2</intB></Add></soap:Body></soap:Envelope>`,
			"http://soap.example.com:$PORT/calculator.asmx")},
		{"curl-grpc-web-text.bin", curl("--resolve", "grpcweb.example.com:$PORT:$HOST",
			"-H", "Content-Type: application/grpc-web-text", "-H", "X-Grpc-Web: 1",
			"--data-binary", "AAAAAAcKBXdvcmxk",
			"http://grpcweb.example.com:$PORT/helloworld.Greeter/SayHello")},
		{"curl-proxy-absolute-form.bin", curl("-x", "http://$ADDR", "http://Proxied.Example.NET:8080/x?y=1")},
		{"curl-proxy-absolute-form-other-host.bin", curl("-x", "http://$ADDR", "-H", "Host: other.example", "http://target.example.net/")},
		{"curl-upgrade-h2c.bin", curl("--http2", "--resolve", "up.example.com:$PORT:$HOST", "http://up.example.com:$PORT/")},
		{"go-get.bin", goClient(h1, "GET", "http://go.example.com:$PORT/", "", nil)},
	} {
		http1Out.write(c.name, httpCaptureOne(t, false, c.client))
	}

	bigCookie := "Cookie: big=" + strings.Repeat("x", 20000)
	for _, c := range []struct {
		name   string
		client func(addr string) error
	}{
		{"go-get.bin", goClient(h2, "GET", "http://h2.example.com:$PORT/", "", nil)},
		{"go-grpc.bin", goClient(h2, "POST", "http://grpc.example.com:$PORT/helloworld.Greeter/SayHello", "application/grpc", grpcBody)},
		{"curl-prior-knowledge.bin", curl("--http2-prior-knowledge", "--resolve", "curl.example.com:$PORT:$HOST", "http://curl.example.com:$PORT/")},
		{"curl-prior-knowledge-mixed-case.bin", curl("--http2-prior-knowledge", "http://$ADDR/", "-H", "Host: Mixed.Example.COM.")},
		{"curl-prior-knowledge-big-cookie.bin", curl("--http2-prior-knowledge", "--resolve", "big.example.com:$PORT:$HOST", "-H", bigCookie, "http://big.example.com:$PORT/")},
	} {
		h2cOut.write(c.name, httpCaptureOne(t, true, c.client))
	}

	// The comparisons TestParseHTTP1Captures and TestParseH2CCaptures make
	// on testdata/http1 and testdata/h2c.
	names := make([]string, len(http1Captures))
	for i, c := range http1Captures {
		names[i] = c.file
	}
	t.Run("http1", func(t *testing.T) {
		http1Out.check(t, names, func(t *testing.T, i int, b []byte) {
			c := http1Captures[i]
			res, err := ParseHTTP1(b)
			if got := httpSentinel(err); got != c.err {
				t.Fatalf("ParseHTTP1 error = %v; want %v", err, c.err)
			}
			want := Result{Protocol: HTTP, Name: c.name, Class: c.class}
			if res != want {
				t.Errorf("ParseHTTP1 = %+v; want %+v", res, want)
			}
		})
	})
	names = make([]string, len(h2cCaptures))
	for i, c := range h2cCaptures {
		names[i] = c.file
	}
	t.Run("h2c", func(t *testing.T) {
		h2cOut.check(t, names, func(t *testing.T, i int, b []byte) {
			c := h2cCaptures[i]
			res, err := ParseH2C(b)
			if got := httpSentinel(err); got != c.err {
				t.Fatalf("ParseH2C error = %v; want %v", err, c.err)
			}
			want := Result{Protocol: H2C, Name: c.name, Class: c.class}
			if res != want {
				t.Errorf("ParseH2C = %+v; want %+v", res, want)
			}
		})
	})
}

// httpCaptureOne runs client against a loopback listener and returns what
// it sent until it was quiet for httpCaptureIdle. For h2 the server sends
// its SETTINGS after the client preface, as a server would; for HTTP/1 it
// answers 204. The client's error is expected for h2 and only logged.
func httpCaptureOne(t *testing.T, h2 bool, client func(addr string) error) []byte {
	t.Helper()
	ln := captureListen(t)
	clientErr := make(chan error, 1)
	go func() { clientErr <- client(ln.Addr().String()) }()

	c := captureAccept(t, ln, clientErr)
	defer c.Close()
	var got bytes.Buffer
	if h2 {
		c.SetReadDeadline(time.Now().Add(captureClientTimeout))
		if _, err := io.CopyN(&got, c, int64(len(http2.ClientPreface))); err != nil {
			t.Fatalf("reading client preface: %v", err)
		}
		if err := http2.NewFramer(c, nil).WriteSettings(); err != nil {
			t.Fatalf("writing SETTINGS: %v", err)
		}
	}
	buf := make([]byte, 64<<10)
	for end := time.Now().Add(captureClientTimeout); ; {
		if time.Now().After(end) {
			t.Fatalf("client still sending after %v", captureClientTimeout)
		}
		c.SetReadDeadline(time.Now().Add(httpCaptureIdle))
		n, err := c.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			break
		}
	}
	if !h2 {
		io.WriteString(c, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
	}
	c.Close()
	if err := <-clientErr; err != nil {
		t.Logf("client ended with: %v", err)
	}
	return got.Bytes()
}
