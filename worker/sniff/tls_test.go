package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"
)

// tlsCaptures is the golden table for testdata/tls (see capture_tls_test.go).
var tlsCaptures = []struct {
	file string
	name string
	alpn string
	ech  bool
	err  error
}{
	{file: "go-tls13-default.bin", name: "www.example.com"},
	{file: "go-tls12-only.bin", name: "tls12.example.com"},
	{file: "go-tls13-alpn-h2-http11.bin", name: "h2.example.com", alpn: "h2,http/1.1"},
	{file: "go-tls13-alpn-two-records-split-sni.bin", name: "h2.example.com", alpn: "h2,http/1.1"},
	{file: "go-no-sni.bin", err: ErrNoName},
	{file: "go-tls13-ech-outer.bin", name: "public.example.com", ech: true},
	{file: "go-tls13-resumption-psk.bin", name: "resume.example.com"},
	{file: "openssl-s_client.bin", name: "www.example.org"},
	{file: "openssl-s_client-alpn-mixed-case.bin", name: "api.example.com", alpn: "h2,http/1.1"},
	{file: "openssl-s_client-tls12.bin", name: "legacy.example.org"},
	{file: "curl.bin", name: "curl.example.net", alpn: "h2,http/1.1"},
	{file: "curl-http11.bin", name: "curl.example.net", alpn: "http/1.1"},
}

// tlsReadCaptures returns every capture in testdata/tls by file name, and
// fails if the directory and the golden table disagree.
func tlsReadCaptures(tb testing.TB) map[string][]byte {
	tb.Helper()
	files, err := filepath.Glob(filepath.Join(tlsCaptureDir, "*.bin"))
	if err != nil {
		tb.Fatal(err)
	}
	caps := make(map[string][]byte)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			tb.Fatal(err)
		}
		caps[filepath.Base(f)] = b
	}
	for _, c := range tlsCaptures {
		if caps[c.file] == nil {
			tb.Errorf("capture %s missing from %s", c.file, tlsCaptureDir)
		}
	}
	if len(caps) != len(tlsCaptures) {
		tb.Errorf("%s holds %d captures; the golden table has %d", tlsCaptureDir, len(caps), len(tlsCaptures))
	}
	return caps
}

func TestParseTLSCaptures(t *testing.T) {
	caps := tlsReadCaptures(t)
	for _, tt := range tlsCaptures {
		t.Run(tt.file, func(t *testing.T) {
			b := caps[tt.file]
			if b == nil {
				t.Fatalf("capture %s missing; regenerate with -update-tls", tt.file)
			}
			check := func(t *testing.T, b []byte) {
				t.Helper()
				res, err := ParseTLS(b)
				if !errors.Is(err, tt.err) { // errors.Is(err, nil) means err == nil
					t.Fatalf("ParseTLS: got error %v; want %v", err, tt.err)
				}
				want := Result{Protocol: TLS, Name: tt.name, ALPN: tt.alpn, ECH: tt.ech}
				if res != want {
					t.Fatalf("ParseTLS: got %+v; want %+v", res, want)
				}
			}
			check(t, b)

			t.Run("prefixes", func(t *testing.T) {
				for n := range len(b) {
					res, err := ParseTLS(b[:n])
					if !errors.Is(err, ErrNeedMore) {
						t.Fatalf("ParseTLS(first %d of %d bytes): got error %v; want ErrNeedMore", n, len(b), err)
					}
					if n > 0 && res != (Result{Protocol: TLS}) {
						t.Fatalf("ParseTLS(first %d of %d bytes): got %+v; want only Protocol TLS", n, len(b), res)
					}
				}
			})
			t.Run("reframed", func(t *testing.T) {
				msg, vers := tlsHandshakeOf(t, b)
				for _, size := range []int{1, 2, 3, 7, 100, 512, 16384} {
					check(t, tlsFrameEvery(vers, msg, size))
				}
				// Only whole records have been checked above: split 1-byte
				// records at every byte, too.
				one := tlsFrameEvery(vers, msg, 1)
				for n := range len(one) {
					if _, err := ParseTLS(one[:n]); !errors.Is(err, ErrNeedMore) {
						t.Fatalf("ParseTLS(first %d of %d bytes, 1-byte records): got error %v; want ErrNeedMore", n, len(one), err)
					}
				}
			})
			t.Run("followed by other records", func(t *testing.T) {
				// Early data, a change_cipher_spec or the next read: nothing
				// after the ClientHello matters.
				ccs := []byte{0x14, 0x03, 0x03, 0x00, 0x01, 0x01}
				appData := []byte{0x17, 0x03, 0x03, 0x00, 0x03, 'a', 'b', 'c'}
				check(t, slices.Concat(b, ccs, appData))
				check(t, slices.Concat(b, []byte("GET / HTTP/1.1\r\n")))
			})
			t.Run("crypto/tls", func(t *testing.T) {
				name, accepted := tlsOracle(b)
				if !accepted {
					t.Fatal("crypto/tls did not accept the capture")
				}
				if got := strings.ToLower(name); got != tt.name {
					t.Fatalf("crypto/tls ServerName: got %q; want %q", got, tt.name)
				}
				tlsCheckOracle(t, b)
			})
		})
	}
}

// tlsTestHello builds ClientHellos for tests: zero values give a minimal
// valid hello with no extensions block.
type tlsTestHello struct {
	vers        uint16
	sessionID   []byte
	suites      []byte
	compression []byte
	exts        []tlsTestExt // nil: no extensions block unless extsBlock or rawExts
	extsBlock   bool         // write an extensions block even if exts is empty
	rawExts     []byte       // the extensions block's contents, if not nil
	trailing    []byte       // bytes after the extensions block
}

type tlsTestExt struct {
	typ  uint16
	data []byte
}

// body returns the ClientHello body (without the handshake header).
func (h tlsTestHello) body() []byte {
	var b cryptobyte.Builder
	if h.vers == 0 {
		h.vers = tls.VersionTLS12
	}
	if h.suites == nil {
		h.suites = []byte{0x13, 0x01, 0xc0, 0x2f}
	}
	if h.compression == nil {
		h.compression = []byte{0}
	}
	b.AddUint16(h.vers)
	b.AddBytes(make([]byte, 32))
	b.AddUint8(uint8(len(h.sessionID)))
	b.AddBytes(h.sessionID)
	b.AddUint16(uint16(len(h.suites)))
	b.AddBytes(h.suites)
	b.AddUint8(uint8(len(h.compression)))
	b.AddBytes(h.compression)
	if h.exts != nil || h.extsBlock || h.rawExts != nil {
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			b.AddBytes(h.rawExts)
			for _, e := range h.exts {
				b.AddUint16(e.typ)
				b.AddUint16(uint16(len(e.data)))
				b.AddBytes(e.data)
			}
		})
	}
	b.AddBytes(h.trailing)
	return b.BytesOrPanic()
}

// msg returns the handshake message: header and body.
func (h tlsTestHello) msg() []byte { return tlsHandshakeMsg(1, h.body()) }

// bytes returns the message in one record.
func (h tlsTestHello) bytes() []byte { return tlsFrameEvery([2]byte{3, 1}, h.msg(), tlsMaxRecordLen) }

func tlsHandshakeMsg(typ uint8, body []byte) []byte {
	n := len(body)
	return append([]byte{typ, byte(n >> 16), byte(n >> 8), byte(n)}, body...)
}

// tlsSNI returns a server_name extension with one entry per name, of type 0.
func tlsSNI(names ...string) tlsTestExt {
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, n := range names {
			b.AddUint8(0)
			b.AddUint16(uint16(len(n)))
			b.AddBytes([]byte(n))
		}
	})
	return tlsTestExt{0, b.BytesOrPanic()}
}

// tlsALPN returns an ALPN extension offering protos.
func tlsALPN(protos ...string) tlsTestExt {
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, p := range protos {
			b.AddUint8(uint8(len(p)))
			b.AddBytes([]byte(p))
		}
	})
	return tlsTestExt{16, b.BytesOrPanic()}
}

// tlsHandshakeOf returns the first handshake message carried by the records
// of capture and the version bytes of its first record.
func tlsHandshakeOf(tb testing.TB, capture []byte) (msg []byte, vers [2]byte) {
	tb.Helper()
	msg, vers, ok := tlsHandshakeOfOK(capture)
	if !ok {
		tb.Fatal("no complete handshake message in capture")
	}
	return msg, vers
}

// tlsHandshakeOfOK is tlsHandshakeOf for inputs that may be anything: it
// concatenates the payloads of the leading handshake records (the last one
// possibly cut short) until they hold a whole message.
func tlsHandshakeOfOK(b []byte) (msg []byte, vers [2]byte, ok bool) {
	if len(b) >= 3 {
		vers = [2]byte{b[1], b[2]}
	}
	for len(b) >= 5 && b[0] == 0x16 {
		n := int(b[3])<<8 | int(b[4])
		msg = append(msg, b[5:min(5+n, len(b))]...)
		b = b[min(5+n, len(b)):]
		if len(msg) >= 4 {
			if l := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])); len(msg) >= l {
				return msg[:l], vers, true
			}
		}
	}
	return nil, vers, false
}

// tlsFrameEvery frames msg into handshake records of at most size bytes.
func tlsFrameEvery(vers [2]byte, msg []byte, size int) []byte {
	cuts := make([]int, 0, len(msg)/size)
	for i := size; i < len(msg); i += size {
		cuts = append(cuts, i)
	}
	return tlsFrame(vers, msg, cuts...)
}

// tlsFrame frames msg into handshake records split at the offsets cuts.
func tlsFrame(vers [2]byte, msg []byte, cuts ...int) []byte {
	out := make([]byte, 0, len(msg)+5*(len(cuts)+1))
	prev := 0
	for _, c := range append(cuts, len(msg)) {
		out = append(out, 0x16, vers[0], vers[1], byte((c-prev)>>8), byte(c-prev))
		out = append(out, msg[prev:c]...)
		prev = c
	}
	return out
}

func TestParseTLSNotTLS(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   []byte
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")},
		{"http one byte", []byte("G")},
		{"h2c preface", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")},
		{"alert record first", []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00}},
		{"application data record", []byte{0x17, 0x03, 0x03, 0x00, 0x01, 0x00}},
		{"sslv2 hello", []byte{0x80, 0x2e, 0x01, 0x00, 0x02}},
		{"ssh", []byte("SSH-2.0-OpenSSH_9.6\r\n")},
		{"record version 2.0", []byte{0x16, 0x02, 0x00, 0x00, 0x04}},
		{"record version 0", []byte{0x16, 0x00}},
		{"record version 0x16", []byte{0x16, 0x16, 0x16}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res, err := ParseTLS(tt.in)
			if !errors.Is(err, ErrNotProtocol) {
				t.Fatalf("got error %v; want ErrNotProtocol", err)
			}
			if res != (Result{}) {
				t.Fatalf("got %+v; want zero Result", res)
			}
		})
	}
}

func TestParseTLSNeedMore(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"type byte", []byte{0x16}},
		{"type and major", []byte{0x16, 0x03}},
		{"record header", []byte{0x16, 0x03, 0x01, 0x02, 0x00}},
		{"handshake type", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}},
		{"handshake header", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc}},
		{"largest hello, header only", []byte{0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x00, 0x00}},
		{"second record type", append(tlsFrameEvery([2]byte{3, 1}, tlsTestHello{}.msg()[:10], 5), 0x16)},
		{"second record version", append(tlsFrameEvery([2]byte{3, 1}, tlsTestHello{}.msg()[:10], 5), 0x16, 0x03)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res, err := ParseTLS(tt.in)
			if !errors.Is(err, ErrNeedMore) {
				t.Fatalf("got error %v; want ErrNeedMore", err)
			}
			if want := (Result{Protocol: TLS}); len(tt.in) > 0 && res != want {
				t.Fatalf("got %+v; want %+v", res, want)
			}
		})
	}
}

func TestParseTLSMalformed(t *testing.T) {
	valid := tlsTestHello{exts: []tlsTestExt{tlsSNI("example.com")}}
	record := func(typ byte, payload ...byte) []byte {
		return append([]byte{typ, 3, 3, byte(len(payload) >> 8), byte(len(payload))}, payload...)
	}
	msg := valid.msg()
	half := tlsFrame([2]byte{3, 1}, msg[:20]) // the first record of a two-record hello
	manyHigh := make([]tlsTestExt, 0, 41)
	for i := range 40 {
		manyHigh = append(manyHigh, tlsTestExt{typ: 0x1000 + uint16(i)})
	}
	hugeHello := tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, make([]byte, tlsMaxHandshakeLen)), 1)

	for _, tt := range []struct {
		name string
		in   []byte
	}{
		{"server hello", tlsFrameEvery([2]byte{3, 3}, tlsHandshakeMsg(2, valid.body()), 1<<14)},
		{"server hello type byte only", []byte{0x16, 0x03, 0x03, 0x00, 0x50, 0x02}},
		{"hello request", tlsFrameEvery([2]byte{3, 3}, tlsHandshakeMsg(0, nil), 1<<14)},
		{"empty handshake record", []byte{0x16, 0x03, 0x01, 0x00, 0x00}},
		{"empty second record", slices.Concat(half, []byte{0x16, 0x03, 0x01, 0x00, 0x00})},
		{"record over 16384", []byte{0x16, 0x03, 0x01, 0x40, 0x01}},
		{"record 0xffff", []byte{0x16, 0x03, 0x01, 0xff, 0xff, 0x01}},
		{"handshake over 65536", []byte{0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x01}},
		{"handshake 0xffffff", []byte{0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff}},
		{"handshake over 65536 across records", tlsFrameEvery([2]byte{3, 1}, []byte{0x01, 0x01, 0x00, 0x01}, 1)},
		{"hello cannot fit MaxTLSBytes", hugeHello[:MaxTLSBytes]},
		{"alert record mid-hello", slices.Concat(half, record(0x15, 0x01, 0x00))},
		{"alert header mid-hello", slices.Concat(half, []byte{0x15})},
		{"change cipher spec mid-hello", slices.Concat(half, record(0x14, 0x01))},
		{"application data mid-hello", slices.Concat(half, record(0x17, 0x01))},
		{"second record version 2.x", slices.Concat(half, []byte{0x16, 0x02})},
		{"empty hello", tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, nil), 100)},
		{"hello cut in random", tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, valid.body()[:20]), 100)},
		{"hello cut in session id", tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, tlsTestHello{sessionID: make([]byte, 32)}.body()[:40]), 100)},
		{"hello cut in extensions", tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, valid.body()[:len(valid.body())-1]), 100)},
		{"session id 33 bytes", tlsTestHello{sessionID: make([]byte, 33)}.bytes()},
		{"odd cipher suites", tlsTestHello{suites: []byte{0x13, 0x01, 0x00}}.bytes()},
		{"one byte after compression", tlsTestHello{trailing: []byte{0}}.bytes()},
		{"trailing bytes after extensions", tlsTestHello{exts: valid.exts, trailing: []byte{0}}.bytes()},
		{"extensions block overruns", tlsTestHello{trailing: []byte{0x00, 0x64, 0x00, 0x00, 0x00}}.bytes()},
		{"extension type only", tlsTestHello{rawExts: []byte{0x00, 0x10}}.bytes()},
		{"extension cut short", tlsTestHello{rawExts: []byte{0x00, 0x10, 0x00}}.bytes()},
		{"extension data overruns", tlsTestHello{rawExts: []byte{0x00, 0x10, 0x00, 0x05, 'h'}}.bytes()},
		{"duplicate server_name", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsSNI("a.example")}}.bytes()},
		{"duplicate alpn", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN("h2"), tlsALPN("h2")}}.bytes()},
		{"duplicate unknown low", tlsTestHello{exts: []tlsTestExt{{typ: 0x17}, tlsSNI("a.example"), {typ: 0x17}}}.bytes()},
		{"duplicate grease", tlsTestHello{exts: []tlsTestExt{{typ: 0x0a0a}, tlsSNI("a.example"), {typ: 0x0a0a, data: []byte{0}}}}.bytes()},
		{"duplicate ech", tlsTestHello{exts: []tlsTestExt{{typ: 0xfe0d}, tlsSNI("a.example"), {typ: 0xfe0d}}}.bytes()},
		{"duplicate after 40 high types", tlsTestHello{exts: append(slices.Clone(manyHigh), tlsSNI("a.example"), tlsTestExt{typ: 0x1027})}.bytes()},
		{"duplicate among first high types", tlsTestHello{exts: append(slices.Clone(manyHigh), tlsTestExt{typ: 0x1001})}.bytes()},
		{"server_name empty", tlsTestHello{exts: []tlsTestExt{{typ: 0}}}.bytes()},
		{"server_name empty list", tlsTestHello{exts: []tlsTestExt{tlsSNI()}}.bytes()},
		{"server_name empty name", tlsTestHello{exts: []tlsTestExt{tlsSNI("")}}.bytes()},
		{"server_name two host_names", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example", "b.example")}}.bytes()},
		{"server_name trailing byte", tlsTestHello{exts: []tlsTestExt{{0, append(tlsSNI("a.example").data, 0)}}}.bytes()},
		{"server_name list overruns", tlsTestHello{exts: []tlsTestExt{{0, []byte{0, 5, 0, 0, 1, 'a'}}}}.bytes()},
		{"alpn empty", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), {typ: 16}}}.bytes()},
		{"alpn empty list", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN()}}.bytes()},
		{"alpn empty protocol", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN("h2", "")}}.bytes()},
		{"alpn trailing byte", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), {16, append(tlsALPN("h2").data, 0)}}}.bytes()},
		{"alpn protocol overruns", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), {16, []byte{0, 3, 5, 'h', '2'}}}}.bytes()},
		{"bad alpn without sni", tlsTestHello{exts: []tlsTestExt{tlsALPN("")}}.bytes()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res, err := ParseTLS(tt.in)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("got error %v; want ErrMalformed", err)
			}
			if !strings.HasPrefix(err.Error(), "sniff: tls: ") {
				t.Errorf("error %q lacks the sniff: tls: prefix", err)
			}
			if want := (Result{Protocol: TLS}); res != want {
				t.Fatalf("got %+v; want %+v", res, want)
			}
			tlsCheckOracle(t, tt.in)
		})
	}
}

func TestParseTLSMaxBytes(t *testing.T) {
	// A ClientHello of the largest size crypto/tls takes, in 1-byte records,
	// cannot fit: ParseTLS must say so before the caller's buffer is full.
	huge := tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, make([]byte, tlsMaxHandshakeLen)), 1)
	last := -1
	for n := 1; n <= MaxTLSBytes; n += 97 {
		_, err := ParseTLS(huge[:n])
		if errors.Is(err, ErrMalformed) {
			last = n
			break
		}
		if !errors.Is(err, ErrNeedMore) {
			t.Fatalf("ParseTLS(first %d bytes): got error %v; want ErrNeedMore or ErrMalformed", n, err)
		}
	}
	if last < 0 {
		t.Fatal("ParseTLS returned ErrNeedMore up to MaxTLSBytes")
	}
	// A ClientHello of the largest size in 8-byte records fits.
	msg := tlsTestHello{exts: []tlsTestExt{tlsSNI("big.example"), {typ: 0xffff, data: make([]byte, tlsMaxHandshakeLen-69)}}}.msg()
	if len(msg) != 4+tlsMaxHandshakeLen {
		t.Fatalf("test hello is %d bytes; want %d", len(msg), 4+tlsMaxHandshakeLen)
	}
	b := tlsFrameEvery([2]byte{3, 1}, msg, 8)
	if len(b) > MaxTLSBytes {
		t.Fatalf("test framing too big: %d", len(b))
	}
	res, err := ParseTLS(b)
	if err != nil || res.Name != "big.example" {
		t.Fatalf("got %+v, %v; want big.example, nil", res, err)
	}
	tlsCheckOracle(t, b)
	// One byte more is over crypto/tls's bound.
	msg = tlsTestHello{exts: []tlsTestExt{tlsSNI("big.example"), {typ: 0xffff, data: make([]byte, tlsMaxHandshakeLen-68)}}}.msg()
	if _, err := ParseTLS(tlsFrameEvery([2]byte{3, 1}, msg, tlsMaxRecordLen)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("65537-byte hello: got error %v; want ErrMalformed", err)
	}
}

func TestParseTLSName(t *testing.T) {
	label63 := strings.Repeat("a", 63)
	name253 := strings.Join([]string{label63, label63, label63, strings.Repeat("b", 61)}, ".")
	for _, tt := range []struct {
		sni  string
		want string // "" means ErrMalformed
	}{
		{"example.com", "example.com"},
		{"Example.COM", "example.com"},
		{"WWW.EXAMPLE.COM.", "www.example.com"},
		{"localhost", "localhost"},
		{"_acme-challenge.example.com", "_acme-challenge.example.com"},
		{"-leading.example", "-leading.example"},
		{"trailing-.example", "trailing-.example"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"192.0.2.1", "192.0.2.1"},
		{"a", "a"},
		{label63 + ".example", label63 + ".example"},
		{name253, name253},
		{name253 + ".", name253},
		{strings.ToUpper(name253), name253},

		{".", ""},
		{"..", ""},
		{"example.com..", ""},
		{".example.com", ""},
		{"a..example", ""},
		{label63 + "a.example", ""},
		{name253 + "b", ""},
		{name253 + "b.", ""},
		{"exa mple.com", ""},
		{"*.example.com", ""},
		{"example.com:443", ""},
		{"::1", ""},
		{"[::1]", ""},
		{"exa\x00mple.com", ""},
		{"ex\xc3\xa4mple.com", ""},
		{"example.com/", ""},
		{"ex%41mple.com", ""},
		{"example\\.com", ""},
		{"example.com\r\n", ""},
	} {
		t.Run(tt.sni, func(t *testing.T) {
			in := tlsTestHello{exts: []tlsTestExt{tlsSNI(tt.sni)}}.bytes()
			res, err := ParseTLS(in)
			if tt.want == "" {
				if !errors.Is(err, ErrMalformed) || res.Name != "" {
					t.Fatalf("got %q, %v; want ErrMalformed", res.Name, err)
				}
			} else if err != nil || res.Name != tt.want {
				t.Fatalf("got %q, %v; want %q, nil", res.Name, err, tt.want)
			}
			tlsCheckOracle(t, in)
		})
	}
}

func TestParseTLSExtensions(t *testing.T) {
	long := strings.Repeat("x", 100)
	manyHigh := []tlsTestExt{tlsSNI("a.example")}
	for i := range 40 {
		manyHigh = append(manyHigh, tlsTestExt{typ: 0x1000 + uint16(i)})
	}
	for _, tt := range []struct {
		name string
		h    tlsTestHello
		want Result
		err  error
	}{
		{"no extensions block", tlsTestHello{}, Result{}, ErrNoName},
		{"empty extensions block", tlsTestHello{extsBlock: true}, Result{}, ErrNoName},
		{"alpn without sni", tlsTestHello{exts: []tlsTestExt{tlsALPN("h2")}}, Result{ALPN: "h2"}, ErrNoName},
		{"ech without sni", tlsTestHello{exts: []tlsTestExt{{typ: 0xfe0d, data: []byte{1}}}}, Result{ECH: true}, ErrNoName},
		{"only other name types", tlsTestHello{exts: []tlsTestExt{{0, []byte{0, 4, 1, 0, 1, 'x'}}}}, Result{}, ErrNoName},
		{"host_name after another name type", tlsTestHello{exts: []tlsTestExt{{0, []byte{0, 9, 1, 0, 1, 'x', 0, 0, 2, 'a', 'b'}}}}, Result{Name: "ab"}, nil},
		{"empty session id", tlsTestHello{sessionID: []byte{}, exts: []tlsTestExt{tlsSNI("a.example")}}, Result{Name: "a.example"}, nil},
		{"32-byte session id", tlsTestHello{sessionID: make([]byte, 32), exts: []tlsTestExt{tlsSNI("a.example")}}, Result{Name: "a.example"}, nil},
		{"no cipher suites", tlsTestHello{suites: []byte{}, exts: []tlsTestExt{tlsSNI("a.example")}}, Result{Name: "a.example"}, nil},
		{"no compression methods", tlsTestHello{compression: []byte{}, exts: []tlsTestExt{tlsSNI("a.example")}}, Result{Name: "a.example"}, nil},
		{"ech", tlsTestHello{exts: []tlsTestExt{tlsSNI("public.example"), {typ: 0xfe0d}}}, Result{Name: "public.example", ECH: true}, nil},
		{"unknown extensions", tlsTestHello{exts: []tlsTestExt{{typ: 0x0a0a}, {typ: 0xffff, data: []byte{1, 2, 3}}, tlsSNI("a.example"), {typ: 0xfafa}}}, Result{Name: "a.example"}, nil},
		{"40 high extension types", tlsTestHello{exts: manyHigh}, Result{Name: "a.example"}, nil},
		{"alpn", tlsTestHello{exts: []tlsTestExt{tlsALPN("h2", "http/1.1"), tlsSNI("a.example")}}, Result{Name: "a.example", ALPN: "h2,http/1.1"}, nil},
		{"alpn cut at boundary", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN(strings.Repeat("p", 30), strings.Repeat("q", 30), "r", "s")}},
			Result{Name: "a.example", ALPN: strings.Repeat("p", 30) + "," + strings.Repeat("q", 30) + ",r"}, nil},
		{"alpn 64 bytes exactly", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN(strings.Repeat("p", 62), "r")}},
			Result{Name: "a.example", ALPN: strings.Repeat("p", 62) + ",r"}, nil},
		{"alpn first protocol too long", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN(long, "h2")}},
			Result{Name: "a.example", ALPN: long[:64]}, nil},
		{"alpn unprintable", tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN("a,b", "\x00\xff c", "\x0a\x0a")}},
			Result{Name: "a.example", ALPN: "a?b,???c,??"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			in := tt.h.bytes()
			res, err := ParseTLS(in)
			if !errors.Is(err, tt.err) { // errors.Is(err, nil) means err == nil
				t.Fatalf("got error %v; want %v", err, tt.err)
			}
			tt.want.Protocol = TLS
			if res != tt.want {
				t.Fatalf("got %+v; want %+v", res, tt.want)
			}
			tlsCheckOracle(t, in)
		})
	}
}

// The differential oracle: crypto/tls's server reads the same bytes.

// errTLSOracleStop ends the crypto/tls handshake once it has the ClientHello.
var errTLSOracleStop = errors.New("oracle: stop")

// tlsOracleConn is a net.Conn that reads b, then io.EOF, and discards writes.
type tlsOracleConn struct{ r *bytes.Reader }

func (c tlsOracleConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c tlsOracleConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c tlsOracleConn) Close() error                     { return nil }
func (c tlsOracleConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c tlsOracleConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c tlsOracleConn) SetDeadline(time.Time) error      { return nil }
func (c tlsOracleConn) SetReadDeadline(time.Time) error  { return nil }
func (c tlsOracleConn) SetWriteDeadline(time.Time) error { return nil }

// tlsOracleHello feeds b to a crypto/tls server and returns the ClientHello
// it accepted, or nil if it rejected the bytes before GetConfigForClient.
func tlsOracleHello(b []byte) *tls.ClientHelloInfo {
	var hello *tls.ClientHelloInfo
	srv := tls.Server(tlsOracleConn{bytes.NewReader(b)}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = h
			return nil, errTLSOracleStop
		},
	})
	srv.Handshake()
	return hello
}

// tlsOracle returns the ServerName crypto/tls saw in b and whether it
// accepted the ClientHello.
func tlsOracle(b []byte) (name string, accepted bool) {
	h := tlsOracleHello(b)
	if h == nil {
		return "", false
	}
	return h.ServerName, true
}

// tlsDivergence reports why ParseTLS may legitimately reject b although
// crypto/tls accepts it, or "" if it must not. These are the documented
// divergences; ParseTLS is stricter in each:
//   - crypto/tls takes records of any version below 0x1000 and drops warning
//     alerts before and between ClientHello fragments; ParseTLS wants only
//     handshake records of version 3.x.
//   - crypto/tls takes a session ID of any length up to 255; RFC 8446 and
//     ParseTLS allow 32 bytes.
//   - crypto/tls reads a ClientHello spread over more than MaxTLSBytes.
//
// Host names crypto/tls takes that ParseTLS refuses are handled by
// tlsCheckOracle (it wants ErrMalformed).
func tlsDivergence(b []byte) string {
	var hdr []byte // the handshake header
	got := 0       // handshake bytes before the current record
	for off := 0; off+5 <= len(b); {
		typ, major, n := b[off], b[off+1], int(b[off+3])<<8|int(b[off+4])
		if typ != 0x16 || major != 3 {
			return "non-handshake or non-3.x record before the ClientHello is complete"
		}
		payload := b[off+5 : min(off+5+n, len(b))]
		if len(hdr) < 4 {
			hdr = append(hdr, payload[:min(len(payload), 4-len(hdr))]...)
		}
		if len(hdr) == 4 {
			need := 4 + (int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3]))
			if got+len(payload) >= need {
				if off+5+need-got > MaxTLSBytes {
					return "ClientHello ends beyond MaxTLSBytes"
				}
				if msg, _, ok := tlsHandshakeOfOK(b); ok && len(msg) > 4+2+32 && msg[4+2+32] > 32 {
					return "session ID over 32 bytes"
				}
				return ""
			}
		}
		got += len(payload)
		off += 5 + n
	}
	return ""
}

// tlsValidName reports whether crypto/tls's ServerName name is one ParseTLS
// accepts, restating ParseTLS's rules independently.
func tlsValidName(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// tlsWantALPN restates tlsAppendALPN over crypto/tls's SupportedProtos.
func tlsWantALPN(protos []string) string {
	var out string
	for i, p := range protos {
		q := []byte(p)
		for j, c := range q {
			if c <= ' ' || c > '~' || c == ',' {
				q[j] = '?'
			}
		}
		if i == 0 {
			out = string(q[:min(len(q), 64)])
			continue
		}
		if len(out)+1+len(q) > 64 {
			break
		}
		out += "," + string(q)
	}
	return out
}

// tlsCheckOracle checks ParseTLS against crypto/tls on b: whenever crypto/tls
// accepts a ClientHello, ParseTLS must agree on the name (lowercased), ALPN
// and ECH, barring the divergences in tlsDivergence.
func tlsCheckOracle(tb testing.TB, b []byte) {
	tb.Helper()
	h := tlsOracleHello(b)
	if h == nil {
		return // crypto/tls rejected b; ParseTLS may accept more (see ParseTLS)
	}
	res, err := ParseTLS(b)
	if why := tlsDivergence(b); why != "" {
		if err == nil || errors.Is(err, ErrNoName) {
			tb.Fatalf("ParseTLS accepted a ClientHello with a known divergence (%s): %+v", why, res)
		}
		return
	}
	if h.ServerName != "" && !tlsValidName(h.ServerName) {
		if !errors.Is(err, ErrMalformed) {
			tb.Fatalf("crypto/tls took ServerName %q, which ParseTLS must refuse; got %+v, %v", h.ServerName, res, err)
		}
		return
	}
	want := Result{
		Protocol: TLS,
		Name:     strings.ToLower(h.ServerName),
		ALPN:     tlsWantALPN(h.SupportedProtos),
		ECH:      slices.Contains(h.Extensions, 0xfe0d),
	}
	var wantErr error
	if want.Name == "" {
		wantErr = ErrNoName
	}
	if !errors.Is(err, wantErr) || res != want {
		tb.Fatalf("crypto/tls took the ClientHello: ParseTLS got %+v, %v; want %+v, %v", res, err, want, wantErr)
	}
}

// TestParseTLSCryptoTLSDivergences pins down, case by case, where ParseTLS
// and crypto/tls's server knowingly disagree (see ParseTLS).
func TestParseTLSCryptoTLSDivergences(t *testing.T) {
	hello := tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example")}}
	msg := hello.msg()
	first, rest := tlsFrame([2]byte{3, 1}, msg[:20]), tlsFrame([2]byte{3, 1}, msg[20:])
	warning := []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 100} // warning: no_renegotiation
	for _, tt := range []struct {
		name      string
		in        []byte
		cryptoTLS bool // crypto/tls reaches GetConfigForClient
		wantName  string
		wantErr   error
	}{
		{
			name: "warning alert between fragments", in: slices.Concat(first, warning, rest),
			cryptoTLS: true, wantErr: ErrMalformed,
		},
		{
			name: "warning alert before the hello", in: slices.Concat(warning, hello.bytes()),
			cryptoTLS: true, wantErr: ErrNotProtocol,
		},
		{
			name: "second record version 0.0", in: slices.Concat(first, tlsFrame([2]byte{0, 0}, msg[20:])),
			cryptoTLS: true, wantErr: ErrMalformed,
		},
		{
			name: "session id of 33 bytes", in: tlsTestHello{sessionID: make([]byte, 33), exts: hello.exts}.bytes(),
			cryptoTLS: true, wantErr: ErrMalformed,
		},
		{
			name: "host name with a space", in: tlsTestHello{exts: []tlsTestExt{tlsSNI("a b.example")}}.bytes(),
			cryptoTLS: true, wantErr: ErrMalformed,
		},
		{
			name: "host name with a trailing dot", in: tlsTestHello{exts: []tlsTestExt{tlsSNI("A.Example.")}}.bytes(),
			cryptoTLS: false, wantName: "a.example",
		},
		{
			name: "malformed key_share", in: tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), {typ: 51, data: []byte{0}}}}.bytes(),
			cryptoTLS: false, wantName: "a.example",
		},
		{
			name: "pre_shared_key not last", in: tlsTestHello{exts: []tlsTestExt{{typ: 41, data: []byte{0, 0, 0, 0}}, tlsSNI("a.example")}}.bytes(),
			cryptoTLS: false, wantName: "a.example",
		},
		{
			name: "malformed encrypted_client_hello", in: tlsTestHello{exts: []tlsTestExt{tlsSNI("a.example"), {typ: 0xfe0d, data: []byte{0, 0}}}}.bytes(),
			cryptoTLS: false, wantName: "a.example",
		},
		{
			name: "last record claims more than the hello", in: tlsFrame([2]byte{3, 1}, append(slices.Clone(msg), 0, 0, 0))[:5+len(msg)],
			cryptoTLS: false, wantName: "a.example",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, accepted := tlsOracle(tt.in); accepted != tt.cryptoTLS {
				t.Errorf("crypto/tls accepted: got %v; want %v", accepted, tt.cryptoTLS)
			}
			res, err := ParseTLS(tt.in)
			if !errors.Is(err, tt.wantErr) || res.Name != tt.wantName {
				t.Fatalf("ParseTLS: got %q, %v; want %q, %v", res.Name, err, tt.wantName, tt.wantErr)
			}
			tlsCheckOracle(t, tt.in)
		})
	}
}
