package sniff

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2cCaptures are the golden expectations for testdata/h2c, written by
// TestCaptureHTTP from real clients.
var h2cCaptures = []struct {
	file  string
	name  string
	class string
	err   error // the sentinel ParseH2C returns, or nil
}{
	{"go-get.bin", "h2.example.com", "", nil},
	{"go-grpc.bin", "grpc.example.com", "grpc", nil},
	{"curl-prior-knowledge.bin", "curl.example.com", "", nil},
	// curl turns "-H Host: Mixed.Example.COM." into :authority.
	{"curl-prior-knowledge-mixed-case.bin", "mixed.example.com", "", nil},
	// A 20000-byte cookie: HEADERS and CONTINUATION, over the header list
	// cap (the HPACK string alone is longer than 16 KiB).
	{"curl-prior-knowledge-big-cookie.bin", "", "", ErrMalformed},
}

// h2cBlockEnd returns the offset in b just past the first HEADERS or
// CONTINUATION frame with END_HEADERS, or -1. It is deliberately simpler
// than ParseH2C.
func h2cBlockEnd(b []byte) int {
	p := len(http2.ClientPreface)
	for p+9 <= len(b) {
		n := int(b[p])<<16 | int(b[p+1])<<8 | int(b[p+2])
		typ, flags := http2.FrameType(b[p+3]), http2.Flags(b[p+4])
		p += 9 + n
		if (typ == http2.FrameHeaders || typ == http2.FrameContinuation) && flags.Has(http2.FlagHeadersEndHeaders) {
			if p > len(b) {
				return -1
			}
			return p
		}
	}
	return -1
}

func TestParseH2CCaptures(t *testing.T) {
	var names []string
	for _, c := range h2cCaptures {
		names = append(names, c.file)
	}
	files := httpReadCaptures(t, h2cCaptureDir, names)
	for _, c := range h2cCaptures {
		t.Run(c.file, func(t *testing.T) {
			b, ok := files[c.file]
			if !ok {
				t.Fatal("capture missing; reported above")
			}
			res, err := ParseH2C(b)
			if got := httpSentinel(err); got != c.err {
				t.Fatalf("ParseH2C error = %v; want %v", err, c.err)
			}
			want := Result{Protocol: H2C, Name: c.name, Class: c.class}
			if res != want {
				t.Errorf("ParseH2C = %+v; want %+v", res, want)
			}

			// Every prefix that ends before the first header block does is
			// ErrNeedMore; every longer one is decided the same way.
			end := h2cBlockEnd(b)
			if end < 0 {
				t.Fatal("capture has no complete header block")
			}
			for i := 0; i <= len(b); i++ {
				r, err := ParseH2C(b[:i])
				if i < end {
					wantProto := H2C
					if i < len(http2.ClientPreface) {
						wantProto = Unknown
					}
					if !errors.Is(err, ErrNeedMore) || r != (Result{Protocol: wantProto}) {
						t.Fatalf("ParseH2C(b[:%d]) = %+v, %v; want ErrNeedMore", i, r, err)
					}
					continue
				}
				if httpSentinel(err) != c.err || r != want {
					t.Fatalf("ParseH2C(b[:%d]) = %+v, %v; want %+v, %v", i, r, err, want, c.err)
				}
			}
		})
	}
}

// TestParseH2CLeavesHTTP1 checks that ParseH2C rejects HTTP/1 requests on
// their first byte that differs from the preface ("POST" on 'O').
func TestParseH2CLeavesHTTP1(t *testing.T) {
	var names []string
	for _, c := range http1Captures {
		names = append(names, c.file)
	}
	for name, b := range httpReadCaptures(t, http1CaptureDir, names) {
		for i := 0; i <= len(b); i++ {
			res, err := ParseH2C(b[:i])
			want := ErrNotProtocol
			if strings.HasPrefix(http2.ClientPreface, string(b[:i])) {
				want = ErrNeedMore
			}
			if !errors.Is(err, want) || res != (Result{}) {
				t.Fatalf("%s: ParseH2C(b[:%d]) = %+v, %v; want %v", name, i, res, err, want)
			}
		}
	}
}

// h2cConn returns the client preface followed by the frames write writes.
func h2cConn(t testing.TB, write func(fr *http2.Framer)) []byte {
	t.Helper()
	var buf bytes.Buffer
	buf.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&buf, nil)
	fr.AllowIllegalWrites = true
	write(fr)
	return buf.Bytes()
}

// h2cBlock HPACK-encodes name, value pairs.
func h2cBlock(fields ...string) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for i := 0; i+1 < len(fields); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return buf.Bytes()
}

// h2cRequestConn is a well-formed connection start (SETTINGS,
// WINDOW_UPDATE) with one HEADERS frame holding fields.
func h2cRequestConn(t testing.TB, fields ...string) []byte {
	return h2cConn(t, func(fr *http2.Framer) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		fr.WriteWindowUpdate(0, 1<<20)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: h2cBlock(fields...), EndHeaders: true, EndStream: true})
	})
}

func TestParseH2C(t *testing.T) {
	get := []string{":method", "GET", ":scheme", "http", ":path", "/"}
	req := func(fields ...string) []string { return append(append([]string(nil), get...), fields...) }
	preface := []byte(http2.ClientPreface)
	block := h2cBlock(req(":authority", "a.example")...)
	settings := func(fr *http2.Framer) { fr.WriteSettings() }
	headers := func(fr *http2.Framer) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true})
	}
	frames := func(ws ...func(*http2.Framer)) func(*http2.Framer) {
		return func(fr *http2.Framer) {
			for _, w := range ws {
				w(fr)
			}
		}
	}
	manyFields := []string{}
	for range 1000 {
		manyFields = append(manyFields, "accept", "*/*")
	}

	tests := []struct {
		name  string
		in    []byte
		want  string // Result.Name
		class string
		err   error
	}{
		// The preface.
		{"empty", nil, "", "", ErrNeedMore},
		{"P", []byte("P"), "", "", ErrNeedMore},
		{"preface less one byte", preface[:len(preface)-1], "", "", ErrNeedMore},
		{"preface", preface, "", "", ErrNeedMore},
		{"GET", []byte("GET / HTTP/1.1\r\n"), "", "", ErrNotProtocol},
		{"POST decided on O", []byte("PO"), "", "", ErrNotProtocol},
		{"TLS", []byte("\x16\x03\x01"), "", "", ErrNotProtocol},
		{"PRI HTTP/1.1", []byte("PRI * HTTP/1.1\r\n"), "", "", ErrNotProtocol},
		{"bad preface tail", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"), "", "", ErrNotProtocol},

		// Well-formed starts.
		{"minimal", h2cConn(t, frames(settings, headers)), "a.example", "", nil},
		{"authority normalised", h2cRequestConn(t, req(":authority", "WWW.Example.COM.:8443")...), "www.example.com", "", nil},
		{"authority IPv6", h2cRequestConn(t, req(":authority", "[::1]:8443")...), "::1", "", nil},
		{"host fallback", h2cRequestConn(t, req("host", "Fallback.Example.")...), "fallback.example", "", nil},
		{"host matches authority", h2cRequestConn(t, req(":authority", "a.example:443", "host", "A.EXAMPLE")...), "a.example", "", nil},
		{"chatter before HEADERS", h2cConn(t, frames(settings,
			func(fr *http2.Framer) {
				fr.WriteWindowUpdate(0, 1<<30)
				fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
				fr.WritePriority(3, http2.PriorityParam{Weight: 200})
				fr.WritePing(false, [8]byte{1})
				fr.WritePriorityUpdate(1, "u=1")
				fr.WriteRawFrame(0xfa, 0xff, 0, []byte("unknown extension frame"))
				fr.WriteSettingsAck()
			}, headers)), "a.example", "", nil},
		{"padded prioritised HEADERS", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true,
				PadLength: 200, Priority: http2.PriorityParam{StreamDep: 0, Weight: 15, Exclusive: true}})
		})), "a.example", "", nil},
		{"CONTINUATION", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:3]})
			fr.WriteContinuation(1, false, block[3:7])
			fr.WriteContinuation(1, false, nil)
			fr.WriteContinuation(1, true, block[7:])
		})), "a.example", "", nil},
		{"stream 3", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block, EndHeaders: true})
		})), "a.example", "", nil},
		{"trailing garbage after the block", append(h2cConn(t, frames(settings, headers)), "garbage"...), "a.example", "", nil},

		// Names.
		{"no name", h2cRequestConn(t, get...), "", "", ErrNoName},
		{"empty host", h2cRequestConn(t, req("host", "")...), "", "", ErrNoName},
		{"two hosts", h2cRequestConn(t, req("host", "a", "host", "a")...), "", "", ErrMalformed},
		{"host differs from authority", h2cRequestConn(t, req(":authority", "a.example", "host", "b.example")...), "", "", ErrMalformed},
		{"invalid host beside authority", h2cRequestConn(t, req(":authority", "a.example", "host", "a b")...), "", "", ErrMalformed},
		{"bad authority", h2cRequestConn(t, req(":authority", "a b")...), "", "", ErrMalformed},
		{"authority userinfo", h2cRequestConn(t, req(":authority", "user@a.example")...), "", "", ErrMalformed},
		{"bad host", h2cRequestConn(t, req("host", "a/b")...), "", "", ErrMalformed},
		{"two authorities", h2cRequestConn(t, req(":authority", "a", ":authority", "a")...), "", "", ErrMalformed},

		// Classes.
		{"grpc", h2cRequestConn(t, req(":authority", "a", "content-type", "application/grpc+proto")...), "a", "grpc", nil},
		{"grpc-web", h2cRequestConn(t, req(":authority", "a", "content-type", "Application/gRPC-Web-Text")...), "a", "grpc-web", nil},
		{"not grpc", h2cRequestConn(t, req(":authority", "a", "content-type", "application/json")...), "a", "", nil},
		{"websocket extended CONNECT", h2cRequestConn(t, ":method", "CONNECT", ":protocol", "websocket", ":scheme", "http", ":path", "/chat", ":authority", "ws.example"), "ws.example", "websocket", nil},

		// Frame order and framing.
		{"HEADERS first", h2cConn(t, headers), "", "", ErrMalformed},
		{"WINDOW_UPDATE first", h2cConn(t, func(fr *http2.Framer) { fr.WriteWindowUpdate(0, 1) }), "", "", ErrMalformed},
		{"SETTINGS ACK first", h2cConn(t, func(fr *http2.Framer) { fr.WriteSettingsAck() }), "", "", ErrMalformed},
		{"wrong first frame header only", append(slices9(preface), 0, 0, 0, byte(http2.FrameHeaders), 4, 0, 0, 0, 1), "", "", ErrMalformed},
		{"DATA before HEADERS", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteData(1, false, []byte("x")) }, headers)), "", "", ErrMalformed},
		{"RST_STREAM before HEADERS", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteRSTStream(1, http2.ErrCodeCancel) })), "", "", ErrMalformed},
		{"GOAWAY before HEADERS", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteGoAway(0, 0, nil) })), "", "", ErrMalformed},
		{"PUSH_PROMISE", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: block, EndHeaders: true})
		})), "", "", ErrMalformed},
		{"CONTINUATION without HEADERS", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteContinuation(1, true, block) })), "", "", ErrMalformed},
		{"SETTINGS inside header block", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:3]})
			fr.WriteSettings()
		})), "", "", ErrMalformed},
		{"CONTINUATION on another stream", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:3]})
			fr.WriteContinuation(3, true, block[3:])
		})), "", "", ErrMalformed},
		{"HEADERS on stream 2", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: block, EndHeaders: true})
		})), "", "", ErrMalformed},
		{"HEADERS on stream 0", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 0, block)
		})), "", "", ErrMalformed},
		{"frame over 16384 bytes, header only", append(h2cConn(t, settings), 0, 0x40, 0x01, 0xfa, 0, 0, 0, 0, 0), "", "", ErrMalformed},
		{"65 frames", h2cConn(t, func(fr *http2.Framer) {
			for range 65 {
				fr.WriteSettings()
			}
		}), "", "", ErrMalformed},
		{"64 frames", h2cConn(t, func(fr *http2.Framer) {
			for range 63 {
				fr.WriteSettings()
			}
			headers(fr)
		}), "a.example", "", nil},
		{"SETTINGS bad length", h2cConn(t, func(fr *http2.Framer) { fr.WriteRawFrame(http2.FrameSettings, 0, 0, []byte{0, 1, 0}) }), "", "", ErrMalformed},
		{"SETTINGS bad length then HEADERS", h2cConn(t, frames(func(fr *http2.Framer) { fr.WriteRawFrame(http2.FrameSettings, 0, 0, []byte{0, 1, 0}) }, headers)), "", "", ErrMalformed},
		{"SETTINGS bad value", h2cConn(t, frames(func(fr *http2.Framer) {
			fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 2})
		}, headers)), "", "", ErrMalformed},
		{"SETTINGS on a stream", h2cConn(t, frames(func(fr *http2.Framer) { fr.WriteRawFrame(http2.FrameSettings, 0, 1, nil) }, headers)), "", "", ErrMalformed},
		{"WINDOW_UPDATE of 0", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteWindowUpdate(0, 0) }, headers)), "", "", ErrMalformed},
		{"PING on a stream", h2cConn(t, frames(settings, func(fr *http2.Framer) { fr.WriteRawFrame(http2.FramePing, 0, 1, make([]byte, 8)) }, headers)), "", "", ErrMalformed},

		// Header blocks.
		{"hpack garbage", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff, 0x0f}, EndHeaders: true})
		})), "", "", ErrMalformed},
		{"hpack truncated field", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:len(block)-2], EndHeaders: true})
		})), "", "", ErrMalformed},
		{"header list too large", h2cRequestConn(t, append(req(":authority", "a"), manyFields...)...), "", "", ErrMalformed},
		{"HPACK string over the cap", h2cConn(t, frames(settings, func(fr *http2.Framer) {
			b := h2cBlock(req(":authority", "a", "x-big", strings.Repeat("\x01", 16<<10+1))...)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:16384]})
			fr.WriteContinuation(1, true, b[16384:])
		})), "", "", ErrMalformed},
		{"response HEADERS", h2cRequestConn(t, ":status", "200"), "", "", ErrMalformed},
		{"request and response pseudo", h2cRequestConn(t, req(":status", "200", ":authority", "a")...), "", "", ErrMalformed},
		{"pseudo after regular", h2cRequestConn(t, ":method", "GET", "accept", "*/*", ":authority", "a"), "", "", ErrMalformed},
		{"uppercase field name", h2cRequestConn(t, req(":authority", "a", "Accept", "*/*")...), "", "", ErrMalformed},
		{"unknown pseudo", h2cRequestConn(t, req(":authority", "a", ":foo", "x")...), "", "", ErrMalformed},
		{"NUL in value", h2cRequestConn(t, req(":authority", "a", "x", "a\x00b")...), "", "", ErrMalformed},
		{"no :method", h2cRequestConn(t, ":authority", "a", ":path", "/"), "", "", ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := ParseH2C(tt.in)
			if got := httpSentinel(err); got != tt.err {
				t.Fatalf("ParseH2C error = %v; want %v", err, tt.err)
			}
			if res.Name != tt.want || res.Class != tt.class {
				t.Errorf("ParseH2C = %+v; want name %q, class %q", res, tt.want, tt.class)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "sniff: h2c: ") {
				t.Errorf("error %q lacks the \"sniff: h2c: \" prefix", err)
			}
			wantProto := H2C
			if errors.Is(err, ErrNotProtocol) || len(tt.in) < len(http2.ClientPreface) {
				wantProto = Unknown
			}
			if res.Protocol != wantProto {
				t.Errorf("Protocol = %v; want %v", res.Protocol, wantProto)
			}
			httpCheckPrefixes(t, "ParseH2C", ParseH2C, tt.in)
		})
	}
}

// slices9 returns a copy of b with room to append a frame header.
func slices9(b []byte) []byte { return append(make([]byte, 0, len(b)+9), b...) }

// TestParseH2CLimit checks MaxH2CBytes: a start whose header block is not
// complete within it is ErrMalformed, and one that ends exactly there is
// read.
func TestParseH2CLimit(t *testing.T) {
	block := h2cBlock(":method", "GET", ":scheme", "http", ":path", "/", ":authority", "limit.example")
	// SETTINGS, unknown frames padding up to the cap, HEADERS.
	build := func(total int) []byte {
		return h2cConn(t, func(fr *http2.Framer) {
			fr.WriteSettings()
			rest := total - len(http2.ClientPreface) - 9 - (9 + len(block))
			for rest > 0 {
				n := min(rest-9, 16384)
				fr.WriteRawFrame(0xfa, 0, 0, make([]byte, n))
				rest -= 9 + n
			}
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true})
		})
	}
	exact := build(MaxH2CBytes)
	if len(exact) != MaxH2CBytes {
		t.Fatalf("len = %d", len(exact))
	}
	if res, err := ParseH2C(exact); err != nil || res.Name != "limit.example" {
		t.Errorf("start of MaxH2CBytes: %+v, %v; want limit.example", res, err)
	}
	if _, err := ParseH2C(exact[:MaxH2CBytes-1]); !errors.Is(err, ErrNeedMore) {
		t.Errorf("start of MaxH2CBytes less one byte: %v; want ErrNeedMore", err)
	}
	over := build(MaxH2CBytes + 1)
	if _, err := ParseH2C(over); !errors.Is(err, ErrMalformed) {
		t.Errorf("start of MaxH2CBytes+1: %v; want ErrMalformed", err)
	}
	if _, err := ParseH2C(over[:MaxH2CBytes]); !errors.Is(err, ErrMalformed) {
		t.Errorf("start of MaxH2CBytes+1, first MaxH2CBytes bytes: %v; want ErrMalformed", err)
	}
}

func FuzzParseH2C(f *testing.F) {
	for _, c := range h2cCaptures {
		b, err := os.ReadFile(filepath.Join(h2cCaptureDir, c.file))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	block := h2cBlock(":method", "POST", ":scheme", "http", ":path", "/x", ":authority", "[::1]:80", "content-type", "application/grpc")
	f.Add(h2cConn(f, func(fr *http2.Framer) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:5]})
		fr.WriteContinuation(1, true, block[5:])
	}))
	f.Fuzz(func(t *testing.T, b []byte) {
		httpCheckInvariants(t, ParseH2C, H2C, b)
	})
}

func BenchmarkParseH2C(b *testing.B) {
	for _, c := range h2cCaptures {
		in, err := os.ReadFile(filepath.Join(h2cCaptureDir, c.file))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(strings.TrimSuffix(c.file, ".bin"), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				if _, err := ParseH2C(in); httpSentinel(err) != c.err {
					b.Fatal(err)
				}
			}
		})
	}
	// A start whose HEADERS has not arrived: only frame headers are read.
	in, err := os.ReadFile(filepath.Join(h2cCaptureDir, "go-get.bin"))
	if err != nil {
		b.Fatal(err)
	}
	in = in[:h2cBlockEnd(in)-1]
	b.Run("partial-block", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ParseH2C(in)
		}
	})
}
