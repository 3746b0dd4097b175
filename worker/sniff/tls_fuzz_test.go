package sniff

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// FuzzParseTLS checks that ParseTLS never panics, that its results keep their
// contract, and that it agrees with crypto/tls (tlsCheckOracle) on every
// ClientHello crypto/tls accepts.
func FuzzParseTLS(f *testing.F) {
	caps := tlsReadCaptures(f)
	for _, tt := range tlsCaptures {
		b := caps[tt.file]
		f.Add(b)
		msg, vers := tlsHandshakeOf(f, b)
		f.Add(tlsFrameEvery(vers, msg, 100))
		if len(msg) < 512 {
			// 1-byte records make big inputs and slow executions: only
			// for the small hellos.
			f.Add(tlsFrameEvery(vers, msg, 1))
		}
	}
	for _, h := range []tlsTestHello{
		{},
		{extsBlock: true},
		{exts: []tlsTestExt{tlsSNI("Example.COM."), tlsALPN("h2", "http/1.1")}},
		{exts: []tlsTestExt{tlsSNI("exa mple.com"), {typ: 0xfe0d, data: []byte{0}}}},
		{exts: []tlsTestExt{tlsSNI("a..b")}},
		{exts: []tlsTestExt{tlsSNI("a", "b")}},
		{exts: []tlsTestExt{{0, []byte{0, 4, 1, 0, 1, 'x'}}}},
		{sessionID: make([]byte, 33), exts: []tlsTestExt{tlsSNI("a.example")}},
		{exts: []tlsTestExt{tlsSNI("a.example"), tlsALPN(strings.Repeat("x", 70), "\x00,")}},
		{exts: []tlsTestExt{{typ: 0x0a0a}, tlsSNI("a.example"), {typ: 0x0a0a}}},
	} {
		f.Add(h.bytes())
	}
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte{0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x01})
	f.Add([]byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00})

	f.Fuzz(func(t *testing.T, b []byte) {
		res, err := ParseTLS(b)
		tlsCheckContract(t, b, res, err)
		tlsCheckOracle(t, b)
	})
}

// tlsCheckContract checks what ParseTLS promises of any result.
func tlsCheckContract(t *testing.T, b []byte, res Result, err error) {
	t.Helper()
	sentinels := 0
	for _, s := range []error{ErrNeedMore, ErrNotProtocol, ErrMalformed, ErrNoName} {
		if errors.Is(err, s) {
			sentinels++
		}
	}
	if err != nil && sentinels != 1 {
		t.Fatalf("error %v wraps %d sentinels; want 1", err, sentinels)
	}
	if err != nil && !strings.HasPrefix(err.Error(), "sniff: tls: ") {
		t.Fatalf("error %q lacks the sniff: tls: prefix", err)
	}
	switch {
	case errors.Is(err, ErrNotProtocol):
		if res != (Result{}) {
			t.Fatalf("ErrNotProtocol with %+v; want zero Result", res)
		}
		if b[0] == 0x16 && (len(b) < 2 || b[1] == 3) {
			t.Fatalf("ErrNotProtocol for a handshake record header % x", b[:min(len(b), 5)])
		}
		return
	case len(b) == 0:
		if !errors.Is(err, ErrNeedMore) || res != (Result{}) {
			t.Fatalf("empty input: got %+v, %v; want zero Result, ErrNeedMore", res, err)
		}
		return
	case errors.Is(err, ErrNeedMore), errors.Is(err, ErrMalformed):
		if res != (Result{Protocol: TLS}) {
			t.Fatalf("%v with %+v; want only Protocol TLS", err, res)
		}
	case err == nil:
		if res.Name == "" || !tlsValidName(res.Name) || res.Name != strings.ToLower(res.Name) || strings.HasSuffix(res.Name, ".") {
			t.Fatalf("nil error with name %q", res.Name)
		}
	case errors.Is(err, ErrNoName):
		if res.Name != "" {
			t.Fatalf("ErrNoName with name %q", res.Name)
		}
	}
	if res.Protocol != TLS {
		t.Fatalf("got protocol %v; want tls", res.Protocol)
	}
	if len(res.ALPN) > tlsMaxALPNLen || strings.ContainsFunc(res.ALPN, func(r rune) bool { return r <= ' ' || r > '~' }) {
		t.Fatalf("ALPN %q: over %d bytes or unprintable", res.ALPN, tlsMaxALPNLen)
	}

	if errors.Is(err, ErrNeedMore) {
		if len(b) >= MaxTLSBytes {
			t.Fatalf("ErrNeedMore for %d bytes, over MaxTLSBytes", len(b))
		}
		// A prefix of a valid prefix is a valid prefix.
		if _, err := ParseTLS(b[:len(b)-1]); !errors.Is(err, ErrNeedMore) {
			t.Fatalf("ErrNeedMore for %d bytes but %v for one byte fewer", len(b), err)
		}
		return
	}
	// A decided result does not change with what comes next.
	for _, more := range [][]byte{{0x16}, {0x17, 0x03, 0x03, 0x00, 0x01, 0x00}, b} {
		res2, err2 := ParseTLS(slices.Concat(b, more))
		if res2 != res || !tlsSameSentinel(err, err2) {
			t.Fatalf("with % x appended: got %+v, %v; want %+v, %v", more, res2, err2, res, err)
		}
	}
	// A ClientHello is read the same in other records: 1 to 16 bytes long,
	// picked by the input (TestParseTLSCaptures covers 1-byte records of
	// every capture).
	if err == nil || errors.Is(err, ErrNoName) {
		msg, vers, ok := tlsHandshakeOfOK(b)
		if !ok {
			t.Fatalf("ParseTLS read a ClientHello the test cannot find")
		}
		size := 1 + int(msg[len(msg)-1]%16)
		if re := tlsFrameEvery(vers, msg, size); len(re) <= MaxTLSBytes {
			res2, err2 := ParseTLS(re)
			if res2 != res || !tlsSameSentinel(err, err2) {
				t.Fatalf("in %d-byte records: got %+v, %v; want %+v, %v", size, res2, err2, res, err)
			}
		}
	}
}

// tlsSameSentinel reports whether a and b are both nil or wrap the same
// sentinel.
func tlsSameSentinel(a, b error) bool {
	for _, s := range []error{ErrNeedMore, ErrNotProtocol, ErrMalformed, ErrNoName} {
		if errors.Is(a, s) {
			return errors.Is(b, s)
		}
	}
	return a == nil && b == nil
}
