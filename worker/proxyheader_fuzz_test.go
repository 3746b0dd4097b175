package worker

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"
)

// fuzzProxyConn is a net.Conn whose reads return the bytes of r, at most
// chunk at a time, then io.EOF. Deadlines are accepted and ignored: the
// reads never block.
type fuzzProxyConn struct {
	net.Conn // nil: only the methods below are called
	r        *bytes.Reader
	chunk    int
}

func (c *fuzzProxyConn) Read(p []byte) (int, error) {
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	return c.r.Read(p)
}

func (c *fuzzProxyConn) SetReadDeadline(time.Time) error { return nil }

// FuzzReadProxyHeader feeds bytes to proxyHeaderLen and readProxyHeader
// (which hands the header to go-proxyproto): neither may panic, the length
// must be within the bytes and decided by them alone, a header read
// leaves exactly the bytes after it to the client's stream, and the client
// it names, written as our v1 and v2 headers, reads back the same.
//
//	go test -run XXX -fuzz FuzzReadProxyHeader -fuzztime 60s -parallel 1 ./worker
func FuzzReadProxyHeader(f *testing.F) {
	v2 := func(cmd, fam byte, addr []byte, tlvs ...byte) []byte {
		b := append([]byte{}, proxyV2Sig...)
		n := len(addr) + len(tlvs)
		b = append(b, cmd, fam, byte(n>>8), byte(n))
		b = append(b, addr...)
		return append(b, tlvs...)
	}
	ip4 := []byte{192, 0, 2, 1, 198, 51, 100, 2, 0x30, 0x39, 0x01, 0xbb}
	ip6 := append(bytes.Repeat([]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0}, 4), 0x30, 0x39, 0x01, 0xbb)
	for _, s := range [][]byte{
		[]byte("PROXY TCP4 192.0.2.1 198.51.100.2 12345 443\r\n\x16\x03\x01"),
		[]byte("PROXY TCP6 2001:db8::1 2001:db8::2 12345 443\r\nGET / HTTP/1.1\r\n"),
		[]byte("PROXY UNKNOWN\r\n"),
		[]byte("PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"),
		[]byte("PROXY TCP4 192.0.2.1 198.51.100.2 99999 443\r\n"),
		[]byte("PROXY TCP4 192.0.2.1"),
		[]byte("PROXY " + string(bytes.Repeat([]byte("x"), 120))),
		[]byte("GET / HTTP/1.1\r\n"),
		v2(0x21, 0x11, ip4),
		v2(0x21, 0x21, ip6, 0x02, 0x00, 0x0b, 'a', '.', 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'c'),
		v2(0x20, 0x00, nil),
		v2(0x21, 0x31, bytes.Repeat([]byte{'/'}, 216)),
		v2(0x21, 0x11, ip4[:4]),
		v2(0x21, 0x11, ip4, 0x04, 0xff, 0xff),
		append(v2(0x21, 0x11, ip4), 0x16, 0x03, 0x01, 0x00),
		proxyV2Sig[:7],
	} {
		f.Add(s, uint8(0))
		f.Add(s, uint8(1))
	}

	f.Fuzz(func(t *testing.T, b []byte, chunk uint8) {
		n, err := proxyHeaderLen(b)
		switch {
		case err != nil:
			if !errors.Is(err, errProxyHeader) || n != 0 {
				t.Fatalf("proxyHeaderLen = %d, %v; want 0 and an errProxyHeader", n, err)
			}
		case n > 0:
			if n > len(b) || n > proxyV2Max || (b[0] == 'P' && n > proxyV1Max) {
				t.Fatalf("proxyHeaderLen = %d for %d bytes", n, len(b))
			}
			// The length is decided by the header's own bytes.
			if m, err := proxyHeaderLen(b[:n]); m != n || err != nil {
				t.Fatalf("proxyHeaderLen(b[:%d]) = %d, %v; want %d", n, m, err, n)
			}
		default:
			// More bytes needed: then every prefix needs more too.
			if len(b) > proxyV2Max {
				t.Fatalf("proxyHeaderLen wants more than %d bytes", len(b))
			}
			if len(b) > 0 {
				if m, err := proxyHeaderLen(b[:len(b)-1]); m != 0 || err != nil {
					t.Fatalf("proxyHeaderLen(b[:len-1]) = %d, %v but more is needed for b", m, err)
				}
			}
		}

		// chunk 0 reads everything at once.
		size := len(b) + 1
		if chunk > 0 {
			size = int(chunk)
		}
		conn := &fuzzProxyConn{r: bytes.NewReader(b), chunk: size}
		h, rest, rerr := readProxyHeader(conn, time.Now().Add(time.Minute))
		if rerr != nil {
			if h != nil || rest != nil {
				t.Fatalf("readProxyHeader error %v with header %v and %d bytes", rerr, h, len(rest))
			}
			// The conn never times out and ends in io.EOF: every failure
			// is the header's.
			if !errors.Is(rerr, errProxyHeader) {
				t.Fatalf("readProxyHeader: %v; want an errProxyHeader", rerr)
			}
			return
		}
		if h == nil {
			t.Fatal("readProxyHeader: nil header and nil error")
		}
		if err != nil || n == 0 {
			t.Fatalf("readProxyHeader read a header where proxyHeaderLen says %d, %v", n, err)
		}
		// rest is what was read past the header: b[n:] up to what the
		// reads fetched.
		if !bytes.HasPrefix(b[n:], rest) {
			t.Fatalf("rest % x is not what follows the %d-byte header", rest, n)
		}
		// The client a header names is passed on unchanged.
		src, dst, ok, err := headerAddrs(h)
		if err != nil || !ok {
			return
		}
		for _, v := range []string{"v1", "v2"} {
			out, err := formatProxyHeader(v, src, dst, "a.example")
			if err != nil {
				t.Fatalf("%s header for %v -> %v: %v", v, src, dst, err)
			}
			h2, _, err := readProxyHeader(&fuzzProxyConn{r: bytes.NewReader(out), chunk: len(out)}, time.Now().Add(time.Minute))
			if err != nil {
				t.Fatalf("our %s header % x does not read back: %v", v, out, err)
			}
			if s2, d2, ok2, err := headerAddrs(h2); err != nil || !ok2 || s2 != src || d2 != dst {
				t.Fatalf("%s: %v -> %v read back as %v -> %v (%v, %v)", v, src, dst, s2, d2, ok2, err)
			}
		}
	})
}
