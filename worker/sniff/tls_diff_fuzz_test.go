package sniff

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"
)

// FuzzClientHelloDifferential is the pure differential target: the same bytes
// go to ParseTLS and to a crypto/tls server (over a net.Pipe, stopped in
// GetConfigForClient), and the two must agree on accept-or-refuse, the host
// name and the ALPN list.
//
// crypto/tls accepting: ParseTLS accepts with the same name (lowercased, one
// trailing dot removed) and ALPN, unless the bytes hit a documented
// divergence (tlsDivergence) or crypto/tls took a name ParseTLS's rules
// refuse (then ErrMalformed).
//
// crypto/tls refusing while ParseTLS accepts: ParseTLS only frames the
// extensions other than server_name and ALPN, where crypto/tls parses their
// contents (supported_versions, key_share, encrypted_client_hello, ...), and
// it takes a host name with one trailing dot (dropping it), which crypto/tls
// refuses. So the hello is cut down to server_name and ALPN, the trailing dot
// dropped, and handed to crypto/tls again: it must accept that, with
// ParseTLS's name and ALPN, and ParseTLS's ECH must say whether the original
// had an encrypted_client_hello extension. Anything else means ParseTLS took
// framing, a name or an ALPN list crypto/tls would not.
func FuzzClientHelloDifferential(f *testing.F) {
	caps := tlsReadCaptures(f)
	for _, tt := range tlsCaptures {
		b := caps[tt.file]
		f.Add(b)
		msg, vers := tlsHandshakeOf(f, b)
		f.Add(tlsFrameEvery(vers, msg, 200))
	}
	for _, h := range []tlsTestHello{
		{},
		{extsBlock: true},
		{exts: []tlsTestExt{tlsSNI("Example.COM."), tlsALPN("h2", "http/1.1")}},
		{exts: []tlsTestExt{tlsSNI("a_b.-x-.example"), tlsALPN("\x00,", "h2")}},
		{exts: []tlsTestExt{tlsSNI("a.example"), {typ: 0xfe0d, data: []byte{0}}}},
		{exts: []tlsTestExt{tlsSNI("a.example"), {typ: 43, data: []byte{2, 3, 4}}}},
		{exts: []tlsTestExt{tlsSNI("127.0.0.1")}},
		{exts: []tlsTestExt{tlsSNI("a", "b")}},
		{sessionID: make([]byte, 32), exts: []tlsTestExt{tlsALPN("h2")}},
	} {
		f.Add(h.bytes())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		res, err := ParseTLS(b)
		ours := err == nil || errors.Is(err, ErrNoName)
		theirs, ok := tlsPipeHello(t, b)
		switch {
		case ok:
			tlsDiffAccepted(t, b, res, err, theirs)
		case ours:
			tlsDiffRefused(t, b, res)
		}
	})
}

// tlsDiffHello is what crypto/tls's server saw in a ClientHello.
type tlsDiffHello struct {
	name  string
	alpn  []string
	ech   bool
	valid bool // name passes ParseTLS's host name rules (or is empty)
}

// tlsDiffAccepted checks ParseTLS's res, err for bytes b crypto/tls took as
// the ClientHello h.
func tlsDiffAccepted(t *testing.T, b []byte, res Result, err error, h tlsDiffHello) {
	t.Helper()
	if why := tlsDivergence(b); why != "" {
		if err == nil || errors.Is(err, ErrNoName) {
			t.Fatalf("ParseTLS accepted bytes with a documented divergence (%s): %+v", why, res)
		}
		return
	}
	if !h.valid {
		if !errors.Is(err, ErrMalformed) {
			t.Fatalf("crypto/tls took ServerName %q, which ParseTLS must refuse; got %+v, %v", h.name, res, err)
		}
		return
	}
	want := Result{Protocol: TLS, Name: strings.ToLower(h.name), ALPN: tlsWantALPN(h.alpn), ECH: h.ech}
	var wantErr error
	if want.Name == "" {
		wantErr = ErrNoName
	}
	if res != want || !errors.Is(err, wantErr) {
		t.Fatalf("crypto/tls accepted: ParseTLS got %+v, %v; want %+v, %v", res, err, want, wantErr)
	}
}

// tlsDiffRefused checks a ClientHello ParseTLS accepted (as res) and
// crypto/tls refused: cut down to the extensions ParseTLS reads, crypto/tls
// must take it and see the same name and ALPN.
func tlsDiffRefused(t *testing.T, b []byte, res Result) {
	t.Helper()
	msg, vers, ok := tlsHandshakeOfOK(b)
	if !ok {
		t.Fatalf("ParseTLS accepted %d bytes without a whole handshake message", len(b))
	}
	cut, ech, ok := tlsDiffCut(msg)
	if !ok {
		t.Fatalf("ParseTLS accepted a ClientHello the test cannot reframe: % x", msg)
	}
	h, ok := tlsPipeHello(t, tlsFrameEvery(vers, cut, tlsMaxRecordLen))
	if !ok {
		t.Fatalf("ParseTLS accepted (%+v) a ClientHello crypto/tls refuses even cut down to server_name and ALPN: % x", res, cut)
	}
	if strings.ToLower(h.name) != res.Name || tlsWantALPN(h.alpn) != res.ALPN || ech != res.ECH {
		t.Fatalf("cut-down hello: crypto/tls saw name %q ALPN %q, ECH extension %v; ParseTLS %+v", h.name, h.alpn, ech, res)
	}
}

// tlsDiffCut returns the ClientHello handshake message msg with every
// extension but server_name (0) and ALPN (16) removed and one trailing dot
// dropped from each host_name, whether msg had an encrypted_client_hello
// extension (0xfe0d), and false if msg is not framed as a ClientHello.
func tlsDiffCut(msg []byte) (cut []byte, ech bool, ok bool) {
	s := cryptobyte.String(msg)
	var typ uint8
	var body cryptobyte.String
	if !s.ReadUint8(&typ) || typ != 1 || !s.ReadUint24LengthPrefixed(&body) || !s.Empty() {
		return nil, false, false
	}
	var vers uint16
	var random, sid, suites, comp, exts cryptobyte.String
	if !body.ReadUint16(&vers) || !body.ReadBytes((*[]byte)(&random), 32) ||
		!body.ReadUint8LengthPrefixed(&sid) || !body.ReadUint16LengthPrefixed(&suites) ||
		!body.ReadUint8LengthPrefixed(&comp) {
		return nil, false, false
	}
	hasExts := !body.Empty()
	if hasExts && (!body.ReadUint16LengthPrefixed(&exts) || !body.Empty()) {
		return nil, false, false
	}
	var out cryptobyte.Builder
	out.AddUint8(1)
	out.AddUint24LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint16(vers)
		b.AddBytes(random)
		b.AddUint8(uint8(len(sid)))
		b.AddBytes(sid)
		b.AddUint16(uint16(len(suites)))
		b.AddBytes(suites)
		b.AddUint8(uint8(len(comp)))
		b.AddBytes(comp)
		if !hasExts {
			return
		}
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			for !exts.Empty() {
				var et uint16
				var data cryptobyte.String
				if !exts.ReadUint16(&et) || !exts.ReadUint16LengthPrefixed(&data) {
					b.SetError(errors.New("extension framing"))
					return
				}
				switch et {
				case 0:
					b.AddUint16(et)
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { tlsDiffDropDot(b, data) })
				case 16:
					b.AddUint16(et)
					b.AddUint16(uint16(len(data)))
					b.AddBytes(data)
				case 0xfe0d:
					ech = true
				}
			}
		})
	})
	cut, err := out.Bytes()
	return cut, ech, err == nil
}

// tlsDiffDropDot adds the server_name extension data to b with one trailing
// dot dropped from each host_name entry; data it cannot read goes in as is.
func tlsDiffDropDot(b *cryptobyte.Builder, data cryptobyte.String) {
	orig := data
	var list cryptobyte.String
	if !data.ReadUint16LengthPrefixed(&list) || !data.Empty() {
		b.AddBytes(orig)
		return
	}
	var out cryptobyte.Builder
	out.AddUint16LengthPrefixed(func(out *cryptobyte.Builder) {
		for !list.Empty() {
			var typ uint8
			var name cryptobyte.String
			if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&name) {
				out.SetError(errors.New("server_name framing"))
				return
			}
			if typ == 0 {
				name = cryptobyte.String(strings.TrimSuffix(string(name), "."))
			}
			out.AddUint8(typ)
			out.AddUint16(uint16(len(name)))
			out.AddBytes(name)
		}
	})
	if nb, err := out.Bytes(); err == nil {
		b.AddBytes(nb)
		return
	}
	b.AddBytes(orig)
}

// tlsPipeHello writes b to a crypto/tls server over a net.Pipe and returns
// the ClientHello it reached GetConfigForClient with, or false if it refused
// the bytes first.
func tlsPipeHello(t *testing.T, b []byte) (tlsDiffHello, bool) {
	t.Helper()
	cli, srvConn := net.Pipe()
	deadline := time.Now().Add(10 * time.Second)
	_ = cli.SetDeadline(deadline)
	_ = srvConn.SetDeadline(deadline)
	var got *tls.ClientHelloInfo
	srv := tls.Server(srvConn, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			got = h
			return nil, errTLSOracleStop
		},
	})
	// The client writes b, then closes (EOF for a prefix), while it reads
	// whatever the server sends (an alert): net.Pipe is unbuffered, so a
	// server that stopped reading and writes its alert would otherwise
	// wait for a client still blocked writing the rest of b.
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(io.Discard, cli) })
	wg.Go(func() {
		_, _ = cli.Write(b)
		_ = cli.Close()
	})
	err := srv.Handshake()
	_ = srvConn.Close() // unblocks the writer if the server stopped reading early
	wg.Wait()
	if time.Now().After(deadline) {
		t.Fatalf("crypto/tls handshake did not end within the deadline: %v", err)
	}
	if got == nil {
		return tlsDiffHello{}, false
	}
	return tlsDiffHello{
		name:  got.ServerName,
		alpn:  slices.Clone(got.SupportedProtos),
		ech:   slices.Contains(got.Extensions, 0xfe0d),
		valid: got.ServerName == "" || tlsValidName(got.ServerName),
	}, true
}
