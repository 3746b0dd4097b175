package sniff

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// dripConn is a net.Conn whose reads return the bytes of r at most chunk
// at a time, then io.EOF. Deadlines are accepted and ignored: the reads
// never block.
type dripConn struct {
	net.Conn // nil: only the methods below are called
	r        *bytes.Reader
	chunk    int
}

func (c *dripConn) Read(p []byte) (int, error) {
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	return c.r.Read(p)
}

func (c *dripConn) SetReadDeadline(time.Time) error { return nil }

// dripHello returns a ClientHello handshake message of exactly size bytes
// (header included) naming name: the padding extension fills it up.
func dripHello(tb testing.TB, name string, size int) []byte {
	tb.Helper()
	h := tlsTestHello{exts: []tlsTestExt{tlsSNI(name), tlsALPN("h2", "http/1.1"), {typ: 21}}}
	pad := size - len(h.msg())
	if pad < 0 {
		tb.Fatalf("a hello of %d bytes is too small", size)
	}
	h.exts[2].data = make([]byte, pad)
	msg := h.msg()
	if len(msg) != size {
		tb.Fatalf("hello of %d bytes; want %d", len(msg), size)
	}
	return msg
}

// dripInputs are connection starts of about 16 KiB, each a whole decision:
// what a client trickling its hello a byte at a time makes Read parse.
func dripInputs(tb testing.TB) []struct {
	name string
	b    []byte
} {
	tb.Helper()
	msg := dripHello(tb, "drip.example", tlsMaxRecordLen)
	var head strings.Builder
	head.WriteString("GET /drip HTTP/1.1\r\nHost: drip.example\r\n")
	for i := 0; head.Len() < MaxHTTP1Bytes-200; i++ {
		fmt.Fprintf(&head, "X-Pad-%03d: %s\r\n", i, strings.Repeat("p", 100))
	}
	head.WriteString("\r\n")
	long := "GET /drip HTTP/1.1\r\nHost: drip.example\r\nCookie: " + strings.Repeat("c", MaxHTTP1Bytes-100) + "\r\n\r\n"
	h2c := h2cConn(tb, func(fr *http2.Framer) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		for range 20 {
			fr.WritePing(false, [8]byte{})
		}
		fr.WriteWindowUpdate(0, 1<<20)
		// A header block of about 14 KiB (no Huffman code is shorter for
		// these bytes): HEADERS and two CONTINUATIONs.
		block := h2cBlock(":method", "GET", ":scheme", "http", ":path", "/", ":authority", "drip.example",
			"x-a", strings.Repeat("!#%&", 1750), "x-b", strings.Repeat("{}~^", 1750))
		third := len(block) / 3
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:third], EndStream: true})
		fr.WriteContinuation(1, false, block[third:2*third])
		fr.WriteContinuation(1, true, block[2*third:])
	})
	return []struct {
		name string
		b    []byte
	}{
		{"tls-one-record", tlsFrameEvery([2]byte{3, 1}, msg, tlsMaxRecordLen)},
		{"tls-100-byte-records", tlsFrameEvery([2]byte{3, 1}, msg, 100)},
		{"tls-1-byte-records", tlsFrameEvery([2]byte{3, 1}, msg, 1)},
		{"http1-many-lines", []byte(head.String())},
		{"http1-one-long-line", []byte(long)},
		{"h2c", h2c},
	}
}

// BenchmarkReadDripFed measures Read over a client that sends its 16 KiB
// hello a byte per read.
//
//	go test -run XXX -bench ReadDripFed -benchtime 3x ./worker/sniff/
func BenchmarkReadDripFed(b *testing.B) {
	for _, in := range dripInputs(b) {
		b.Run(in.name, func(b *testing.B) {
			b.SetBytes(int64(len(in.b)))
			for b.Loop() {
				_, buf, err := Read(&dripConn{r: bytes.NewReader(in.b), chunk: 1}, nil, time.Time{}, nil)
				buf.Release()
				if err != nil && !errors.Is(err, ErrNoName) {
					b.Fatal(err)
				}
			}
		})
	}
}
