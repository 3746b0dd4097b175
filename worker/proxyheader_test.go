package worker

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestReadProxyHeaderCaptures reads the headers HAProxy 2.6 (Debian
// bookworm) sent with send-proxy, send-proxy-v2, proxy-v2-options
// unique-id,crc32c and a health check's check-send-proxy (LOCAL), each
// followed by the client's "hello\n", delivered at once and a byte at a time.
func TestReadProxyHeaderCaptures(t *testing.T) {
	for _, tc := range []struct {
		file     string
		src, dst string // "" for a header naming no client
	}{
		{"haproxy-v1tcp4.bin", "127.0.0.2:49269", "127.0.0.1:17001"},
		{"haproxy-v1tcp6.bin", "[::1]:47635", "[::1]:17003"},
		{"haproxy-v2tcp4.bin", "127.0.0.2:57687", "127.0.0.1:17002"},
		{"haproxy-v2tcp6.bin", "[::1]:42609", "[::1]:17004"},
		{"haproxy-v2tlv.bin", "127.0.0.2:60301", "127.0.0.1:17005"},
		{"haproxy-v2local.bin", "", ""},
	} {
		b, err := os.ReadFile(filepath.Join("testdata", "proxyheader", tc.file))
		if err != nil {
			t.Fatal(err)
		}
		for _, drip := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/drip=%v", tc.file, drip), func(t *testing.T) {
				client, server := tcpPair(t)
				go func() {
					if !drip {
						client.Write(b)
						return
					}
					for i := range b {
						if _, err := client.Write(b[i : i+1]); err != nil {
							return
						}
					}
				}()
				h, rest, err := readProxyHeader(server, time.Now().Add(5*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				src, dst, ok, err := headerAddrs(h)
				if err != nil {
					t.Fatal(err)
				}
				if ok != (tc.src != "") || (ok && (src.String() != tc.src || dst.String() != tc.dst)) {
					t.Errorf("header names %v -> %v (ok %v); want %q -> %q", src, dst, ok, tc.src, tc.dst)
				}
				// What follows the header is the client's: read until
				// the whole "hello\n" (LOCAL: nothing) is there.
				want := "hello\n"
				if tc.src == "" {
					want = ""
				}
				server.SetReadDeadline(time.Now().Add(5 * time.Second))
				got := append([]byte(nil), rest...)
				for len(got) < len(want) {
					buf := make([]byte, 64)
					n, err := server.Read(buf)
					got = append(got, buf[:n]...)
					if err != nil {
						break
					}
				}
				if string(got) != want {
					t.Errorf("stream after the header %q; want %q", got, want)
				}
			})
		}
	}
}

// TestReadProxyHeaderMalformed: every header that is not one is
// errProxyHeader, which the sniff phase counts as proxy_header.
func TestReadProxyHeaderMalformed(t *testing.T) {
	v2 := func(cmd, fam byte, addr []byte) []byte {
		b := append([]byte{}, proxyV2Sig...)
		b = append(b, cmd, fam, byte(len(addr)>>8), byte(len(addr)))
		return append(b, addr...)
	}
	ip4 := []byte{192, 0, 2, 1, 198, 51, 100, 2, 0x30, 0x39, 0x01, 0xbb}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"no header", []byte("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")},
		{"TLS without header", []byte{0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5}},
		{"v1 bad address", []byte("PROXY TCP4 192.0.2.300 198.51.100.2 1 2\r\nhello\n")},
		{"v1 v6 address as TCP4", []byte("PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\nhello\n")},
		{"v1 bad port", []byte("PROXY TCP4 192.0.2.1 198.51.100.2 99999 2\r\nhello\n")},
		{"v1 no CR", []byte("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\nhello\n" + strings.Repeat("x", 120))},
		{"v1 too long", []byte("PROXY TCP4 " + strings.Repeat("1", 120) + "\r\n")},
		// A long UNKNOWN line (see TestProxyHeaderLenV1Max).
		{"v1 UNKNOWN too long", []byte("PROXY UNKNOWN " + strings.Repeat("x", 120) + "\r\nhello\n")},
		{"v1 cut short", []byte("PROXY TCP4 192.0.2.1")},
		{"v2 UDP", append(v2(0x21, 0x12, ip4), "hello\n"...)},
		{"v2 bad command", append(v2(0x22, 0x11, ip4), "hello\n"...)},
		{"v2 short address", v2(0x21, 0x11, ip4[:6])},
		{"v2 PROXY without family", v2(0x21, 0x00, nil)},
		{"v2 cut short", proxyV2Sig[:9]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			client.Write(tc.b)
			client.CloseWrite()
			h, _, err := readProxyHeader(server, time.Now().Add(5*time.Second))
			if err == nil {
				_, _, _, err = headerAddrs(h)
			}
			if !errors.Is(err, errProxyHeader) {
				t.Errorf("got %v; want an errProxyHeader", err)
			}
		})
	}
}

// TestProxyHeaderLenV1Max is FuzzReadProxyHeader's crasher
// testdata/fuzz/FuzzReadProxyHeader/2bb7387923b9ffb6, shortened: a v1 line
// whose CRLF comes after the 107 bytes a v1 header may have was measured
// up to that CRLF (2,547 bytes there) instead of refused. go-proxyproto
// refused such a line in turn, so readProxyHeader's result did not change.
func TestProxyHeaderLenV1Max(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want int // 0 with wantErr: refused
	}{
		{"CRLF at byte 107", []byte("PROXY UNKNOWN " + strings.Repeat("x", 91) + "\r\n"), proxyV1Max},
		{"CRLF at byte 108", []byte("PROXY UNKNOWN " + strings.Repeat("x", 92) + "\r\n"), 0},
		{"crasher", []byte("PROXY UNKNOWN ff:fff.\x0f\x0f" + strings.Repeat("\xee", 2520) + "\r\n#"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := proxyHeaderLen(tc.b)
			if tc.want > 0 {
				if n != tc.want || err != nil {
					t.Fatalf("proxyHeaderLen = %d, %v; want %d", n, err, tc.want)
				}
				return
			}
			if n != 0 || !errors.Is(err, errProxyHeader) {
				t.Fatalf("proxyHeaderLen = %d, %v; want an errProxyHeader", n, err)
			}
		})
	}
}

// TestFormatProxyHeader checks what the backend is told: the families
// chosen (IPv4-mapped ends as IPv4), the bytes of v1, and v2's authority
// TLV read back by go-proxyproto and by our own reader.
func TestFormatProxyHeader(t *testing.T) {
	ap := func(s string) netip.AddrPort {
		if s == "" {
			return netip.AddrPort{}
		}
		return netip.MustParseAddrPort(s)
	}
	for _, tc := range []struct {
		name, src, dst string
		v1             string                              // the v1 line
		fam            proxyproto.AddressFamilyAndProtocol // v2's family
		wsrc, wdst     string                              // what our reader makes of v2
	}{
		{"v4", "192.0.2.1:5555", "198.51.100.2:443",
			"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n", proxyproto.TCPv4, "192.0.2.1:5555", "198.51.100.2:443"},
		{"v4-mapped both", "[::ffff:192.0.2.1]:5555", "[::ffff:198.51.100.2]:443",
			"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n", proxyproto.TCPv4, "192.0.2.1:5555", "198.51.100.2:443"},
		{"v4-mapped source", "[::ffff:192.0.2.1]:5555", "198.51.100.2:443",
			"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n", proxyproto.TCPv4, "192.0.2.1:5555", "198.51.100.2:443"},
		{"v6", "[2001:db8::1]:5555", "[2001:db8::2]:443",
			"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n", proxyproto.TCPv6, "[2001:db8::1]:5555", "[2001:db8::2]:443"},
		{"v4 to v6", "192.0.2.1:5555", "[2001:db8::2]:443",
			"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5555 443\r\n", proxyproto.TCPv6, "192.0.2.1:5555", "[2001:db8::2]:443"},
		{"v6 to v4", "[2001:db8::1]:5555", "198.51.100.2:443",
			"PROXY TCP6 2001:db8::1 ::ffff:198.51.100.2 5555 443\r\n", proxyproto.TCPv6, "[2001:db8::1]:5555", "198.51.100.2:443"},
		{"unknown", "", "198.51.100.2:443", "PROXY UNKNOWN\r\n", proxyproto.UNSPEC, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := ap(tc.src), ap(tc.dst)
			b, err := formatProxyHeader("v1", src, dst, "a.example")
			if err != nil || string(b) != tc.v1 {
				t.Errorf("v1: %q, %v; want %q", b, err, tc.v1)
			}

			b, err = formatProxyHeader("v2", src, dst, "a.example")
			if err != nil {
				t.Fatal(err)
			}
			h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
			if err != nil {
				t.Fatalf("go-proxyproto cannot read our v2 header % x: %v", b, err)
			}
			if h.TransportProtocol != tc.fam || h.Command.IsLocal() != (tc.wsrc == "") {
				t.Errorf("v2 family 0x%02x, command 0x%02x; want family 0x%02x", byte(h.TransportProtocol), byte(h.Command), byte(tc.fam))
			}
			tlvs, err := h.TLVs()
			if err != nil || len(tlvs) != 1 || tlvs[0].Type != proxyproto.PP2_TYPE_AUTHORITY || string(tlvs[0].Value) != "a.example" {
				t.Errorf("v2 TLVs %v, %v; want one PP2_TYPE_AUTHORITY a.example", tlvs, err)
			}
			client, server := tcpPair(t)
			client.Write(b)
			rh, rest, err := readProxyHeader(server, time.Now().Add(5*time.Second))
			if err != nil || len(rest) != 0 {
				t.Fatalf("our reader: %v, %d bytes after", err, len(rest))
			}
			s, d, ok, err := headerAddrs(rh)
			if err != nil || ok != (tc.wsrc != "") || (ok && (s.String() != tc.wsrc || d.String() != tc.wdst)) {
				t.Errorf("our reader: %v -> %v (ok %v, %v); want %q -> %q", s, d, ok, err, tc.wsrc, tc.wdst)
			}
		})
	}

	// No name, no TLV (a connection sent to a default_backend).
	b, err := formatProxyHeader("v2", ap("192.0.2.1:1"), ap("192.0.2.2:2"), "")
	if err != nil || len(b) != 16+12 {
		t.Errorf("v2 without a name: % x, %v; want the 28 bytes of a TCP4 header and no TLV", b, err)
	}
}

// ppServer serves one listener on ln with a config of listener options
// lopts and body, logging to an accessLog.
func ppServer(t *testing.T, ln *net.TCPListener, lopts, body string) (*stats.Counters, *accessLog) {
	t.Helper()
	yaml := fmt.Sprintf("listeners: [{address: %q%s}]\ntimeouts: {connect: 2, client_hello: 20, idle: 30}\n%s", ln.Addr(), lopts, body)
	cfg, err := config.Parse([]byte(yaml), []string{})
	if err != nil {
		t.Fatal(err)
	}
	var counters stats.Counters
	logs := &accessLog{}
	srv, err := New(cfg, slog.New(logs), &counters, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ctx, []Listener{{Config: cfg.Listeners[0], Ln: ln}})
	}()
	t.Cleanup(func() {
		cancel()
		<-served
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer dcancel()
		srv.Drain(dctx)
	})
	return &counters, logs
}

// headerBackend accepts connections, reads a PROXY header and the line
// after it from each, and reports both.
func headerBackend(t *testing.T) (string, chan headerSeen) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan headerSeen, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				br := bufio.NewReader(c)
				h, err := proxyproto.Read(br)
				line, _ := br.ReadString('\n')
				got <- headerSeen{h, line, err}
			}()
		}
	}()
	return ln.Addr().String(), got
}

type headerSeen struct {
	hdr  *proxyproto.Header
	line string
	err  error
}

func (s headerSeen) authority() string {
	if s.hdr == nil {
		return ""
	}
	tlvs, _ := s.hdr.TLVs()
	for _, tlv := range tlvs {
		if tlv.Type == proxyproto.PP2_TYPE_AUTHORITY {
			return string(tlv.Value)
		}
	}
	return ""
}

// TestProxyHeaderThrough sends HAProxy's captured headers through a worker
// and checks the client the access log and the backend's PROXY v2 header
// name: the header's for PROXY, the real peer for LOCAL.
func TestProxyHeaderThrough(t *testing.T) {
	backend, got := headerBackend(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	_, logs := ppServer(t, ln, ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.0/8]",
		fmt.Sprintf("routes: [{match: pp.test, backend: %q}]\nbackend: {proxy_protocol: v2}\n", backend))
	for i, tc := range []struct {
		file, client string // client "": the real peer
	}{
		{"haproxy-v2tcp6.bin", "[::1]:42609"},
		{"haproxy-v1tcp4.bin", "127.0.0.2:49269"},
		{"haproxy-v2local.bin", ""},
	} {
		b, err := os.ReadFile(filepath.Join("testdata", "proxyheader", tc.file))
		if err != nil {
			t.Fatal(err)
		}
		// Only the header: the client's own bytes are a request for pp.test.
		n, err := proxyHeaderLen(b)
		if err != nil || n == 0 {
			t.Fatalf("%s: %d, %v", tc.file, n, err)
		}
		c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		want := tc.client
		if want == "" {
			want = c.LocalAddr().String()
		}
		c.Write(b[:n])
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n")
		c.CloseWrite()
		select {
		case s := <-got:
			if s.err != nil {
				t.Fatalf("%s: backend: %v", tc.file, s.err)
			}
			if s.hdr.SourceAddr.String() != want || s.authority() != "pp.test" || s.line != "GET / HTTP/1.1\r\n" {
				t.Errorf("%s: backend told client %v, authority %q, then %q; want %s, pp.test, the request",
					tc.file, s.hdr.SourceAddr, s.authority(), s.line, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: backend got nothing", tc.file)
		}
		c.Close()
		waitFor(t, "the access-log line", func() bool { return len(logs.get()) == i+1 })
		if l := logs.get()[i]; l["client"] != want {
			t.Errorf("%s: access log client %q; want %q", tc.file, l["client"], want)
		}
	}
}

// TestProxyHeaderOwnTimeout: a trusted balancer that sends no header is
// closed after proxyHeaderTimeout although client_hello is 20s.
func TestProxyHeaderOwnTimeout(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	counters, logs := ppServer(t, ln, ", accept_proxy_protocol: true, trusted_proxies: [127.0.0.1]", "")
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "PROXY TCP4 192.0.2.1") // and nothing more
	t0 := time.Now()
	c.SetReadDeadline(t0.Add(15 * time.Second))
	io.Copy(io.Discard, c)
	if d := time.Since(t0); d < proxyHeaderTimeout-500*time.Millisecond || d > proxyHeaderTimeout+5*time.Second {
		t.Errorf("closed after %v; want about %v", d, proxyHeaderTimeout)
	}
	waitFor(t, "rejected{proxy_header}", func() bool { return counters.Snapshot().Rejected[stats.ProxyHeader] == 1 })
	waitFor(t, "the access-log line", func() bool { return len(logs.get()) == 1 })
	if l := logs.get()[0]; l["result"] != "proxy_header" || !strings.Contains(l["err"], "in time") {
		t.Errorf("logged %v; want result proxy_header, err about time", l)
	}
}

// TestProxyHeaderOutMapped: on a dual-stack listener an IPv4 client is
// ::ffff:a.b.c.d; the backend is told TCP4 and the log says a.b.c.d.
func TestProxyHeaderOutMapped(t *testing.T) {
	backend, got := headerBackend(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv6unspecified, Port: 0})
	if err != nil {
		t.Fatalf("no dual-stack listener ([::]:0 with IPv4 mapped) on this host: %v", err)
	}
	ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	ln, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv6unspecified, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	_, logs := ppServer(t, ln, "", fmt.Sprintf("routes: [{match: pp.test, backend: %q}]\nbackend: {proxy_protocol: v1}\n", backend))
	c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("no IPv4 through a dual-stack listener: %v", err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n")
	select {
	case s := <-got:
		if s.err != nil {
			t.Fatal(s.err)
		}
		if s.hdr.TransportProtocol != proxyproto.TCPv4 || s.hdr.SourceAddr.String() != c.LocalAddr().String() ||
			s.hdr.DestinationAddr.String() != c.RemoteAddr().String() {
			t.Errorf("backend told family 0x%02x, %v -> %v; want TCP4 %v -> %v",
				byte(s.hdr.TransportProtocol), s.hdr.SourceAddr, s.hdr.DestinationAddr, c.LocalAddr(), c.RemoteAddr())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend got nothing")
	}
	c.Close()
	waitFor(t, "the access-log line", func() bool { return len(logs.get()) == 1 })
	if l := logs.get()[0]; l["client"] != c.LocalAddr().String() {
		t.Errorf("access log client %q; want %q", l["client"], c.LocalAddr())
	}
}
