package sniff

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"

	"github.com/sniproxy/sniproxy/internal/backendtest"
)

var updateTLS = flag.Bool("update-tls", false, "regenerate testdata/tls from real TLS clients (crypto/tls, openssl, curl)")

// tlsCaptureDir holds ClientHello captures: the exact bytes a client sent on
// a fresh TCP connection, up to the end of the record that completes its
// ClientHello. The golden expectations are tlsCaptures in tls_test.go.
const tlsCaptureDir = "testdata/tls"

// TestCaptureTLS captures ClientHellos from real TLS clients (crypto/tls,
// openssl s_client, curl) over 127.0.0.1 and checks each one against
// tlsCaptures with ParseTLS. It needs openssl and curl in PATH. The captures
// go to a temporary directory unless -update-tls is given, which regenerates
// testdata/tls instead (the package must come before the flag):
//
//	go test ./worker/sniff/ -run TestCaptureTLS -update-tls
//
// Captures are not byte-for-byte reproducible (randoms, key shares); the
// golden table must still hold after a run, and this test checks that it
// does.
func TestCaptureTLS(t *testing.T) {
	captureNeedTools(t, "openssl", "curl")
	out := newCaptureOut(t, *updateTLS, tlsCaptureDir)

	goClient := func(cfg *tls.Config) func(addr string) error {
		return func(addr string) error {
			ctx, cancel := context.WithTimeout(context.Background(), captureClientTimeout)
			defer cancel()
			c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
			if err == nil {
				c.Close()
			}
			return err
		}
	}
	command := func(name string, args ...string) func(addr string) error {
		return func(addr string) error {
			return captureRun(name, captureExpand(addr, args)...)
		}
	}

	defaultHello := tlsCaptureOne(t, goClient(&tls.Config{ServerName: "www.example.com"}))
	out.write("go-tls13-default.bin", defaultHello)
	out.write("go-tls12-only.bin", tlsCaptureOne(t, goClient(&tls.Config{
		ServerName: "tls12.example.com",
		MaxVersion: tls.VersionTLS12,
	})))
	alpnHello := tlsCaptureOne(t, goClient(&tls.Config{
		ServerName: "h2.example.com",
		NextProtos: []string{"h2", "http/1.1"},
	}))
	out.write("go-tls13-alpn-h2-http11.bin", alpnHello)
	out.write("go-no-sni.bin", tlsCaptureOne(t, goClient(&tls.Config{InsecureSkipVerify: true})))
	out.write("go-tls13-ech-outer.bin", tlsCaptureOne(t, goClient(&tls.Config{
		ServerName:                     "secret.example.com",
		MinVersion:                     tls.VersionTLS13,
		EncryptedClientHelloConfigList: tlsTestECHConfigList(t, "public.example.com"),
	})))
	out.write("go-tls13-resumption-psk.bin", tlsCaptureResumption(t, "resume.example.com"))

	// A real ClientHello re-framed into two records, split in the middle of
	// the host name so that the SNI spans the record boundary.
	msg, vers := tlsHandshakeOf(t, alpnHello)
	i := bytes.Index(msg, []byte("h2.example.com"))
	if i < 0 {
		t.Fatal("host name not found in the ALPN capture")
	}
	out.write("go-tls13-alpn-two-records-split-sni.bin", tlsFrame(vers, msg, i+len("h2.exa")))

	out.write("openssl-s_client.bin", tlsCaptureOne(t, command("openssl",
		"s_client", "-connect", "$HOST:$PORT", "-servername", "www.example.org")))
	out.write("openssl-s_client-alpn-mixed-case.bin", tlsCaptureOne(t, command("openssl",
		"s_client", "-connect", "$HOST:$PORT", "-servername", "API.Example.COM", "-alpn", "h2,http/1.1")))
	out.write("openssl-s_client-tls12.bin", tlsCaptureOne(t, command("openssl",
		"s_client", "-connect", "$HOST:$PORT", "-servername", "legacy.example.org", "-tls1_2")))
	// -q, which must come first, keeps any ~/.curlrc out of the captures.
	out.write("curl.bin", tlsCaptureOne(t, command("curl",
		"-q", "-sS", "-k", "--max-time", "5", "--resolve", "curl.example.net:$PORT:$HOST", "https://curl.example.net:$PORT/")))
	out.write("curl-http11.bin", tlsCaptureOne(t, command("curl",
		"-q", "-sS", "-k", "--http1.1", "--max-time", "5", "--resolve", "curl.example.net:$PORT:$HOST", "https://curl.example.net:$PORT/")))

	// The comparison TestParseTLSCaptures makes on testdata/tls.
	names := make([]string, len(tlsCaptures))
	for i, c := range tlsCaptures {
		names[i] = c.file
	}
	out.check(t, names, func(t *testing.T, i int, b []byte) {
		tt := tlsCaptures[i]
		res, err := ParseTLS(b)
		if !errors.Is(err, tt.err) { // errors.Is(err, nil) means err == nil
			t.Fatalf("ParseTLS: got error %v; want %v", err, tt.err)
		}
		want := Result{Protocol: TLS, Name: tt.name, ALPN: tt.alpn, ECH: tt.ech}
		if res != want {
			t.Fatalf("ParseTLS: got %+v; want %+v", res, want)
		}
	})
}

// tlsCaptureOne runs client against a loopback listener and returns the bytes
// it sent up to the end of its ClientHello. The server closes the connection
// right after, so client's error is expected and only logged.
func tlsCaptureOne(t *testing.T, client func(addr string) error) []byte {
	t.Helper()
	ln := captureListen(t)
	clientErr := make(chan error, 1)
	go func() { clientErr <- client(ln.Addr().String()) }()

	c := captureAccept(t, ln, clientErr)
	c.SetDeadline(time.Now().Add(captureClientTimeout))
	hello, err := tlsReadHelloRecords(c)
	c.Close()
	if err != nil {
		t.Fatalf("reading client hello: %v (client ended with: %v)", err, <-clientErr)
	}
	t.Logf("client ended with: %v", <-clientErr)
	return hello
}

// tlsReadHelloRecords reads handshake records from r until they hold a whole
// handshake message and returns the records read. It is written apart from
// ParseTLS so that a bug there cannot shape the captures.
func tlsReadHelloRecords(r io.Reader) ([]byte, error) {
	var raw, msg []byte
	for {
		hdr := make([]byte, 5)
		if _, err := io.ReadFull(r, hdr); err != nil {
			return nil, err
		}
		if hdr[0] != 0x16 {
			return nil, fmt.Errorf("record type %#x, want handshake", hdr[0])
		}
		payload := make([]byte, int(hdr[3])<<8|int(hdr[4]))
		if _, err := io.ReadFull(r, payload); err != nil {
			return nil, err
		}
		raw = append(append(raw, hdr...), payload...)
		msg = append(msg, payload...)
		if len(msg) >= 4 && len(msg) >= 4+(int(msg[1])<<16|int(msg[2])<<8|int(msg[3])) {
			return raw, nil
		}
	}
}

// tlsCaptureResumption makes a full TLS 1.3 handshake with a crypto/tls
// server to get a session ticket, then captures the resuming ClientHello
// (with pre_shared_key, which must be the last extension).
func tlsCaptureResumption(t *testing.T, name string) []byte {
	t.Helper()
	cert, pool := backendtest.Cert(t, name)
	cfg := &tls.Config{
		ServerName:         name,
		RootCAs:            pool,
		ClientSessionCache: tls.NewLRUClientSessionCache(1),
	}

	ln := captureListen(t)
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(captureClientTimeout))
		s := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		if err := s.Handshake(); err != nil {
			served <- err
			return
		}
		// The session ticket is sent after the handshake; the client takes
		// it in while reading this byte.
		_, err = s.Write([]byte("x"))
		s.Close()
		served <- err
	}()
	dial := func(addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), captureClientTimeout)
		defer cancel()
		return (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	}
	c, err := dial(ln.Addr().String())
	if err != nil {
		t.Fatalf("first connection: %v (server ended with: %v)", err, <-served)
	}
	c.SetDeadline(time.Now().Add(captureClientTimeout))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}

	hello := tlsCaptureOne(t, func(addr string) error {
		c, err := dial(addr)
		if err == nil {
			c.Close()
		}
		return err
	})
	msg, _ := tlsHandshakeOf(t, hello)
	if !bytes.Contains(msg, []byte{0x00, 0x29}) { // pre_shared_key
		t.Fatal("second ClientHello does not look like a resumption")
	}
	return hello
}

// tlsTestECHConfigList returns an ECHConfigList (draft-ietf-tls-esni-22,
// Section 4) with one DHKEM(X25519)/HKDF-SHA256/AES-128-GCM config whose
// public_name is publicName, so that crypto/tls clients send a real ECH outer
// ClientHello.
func tlsTestECHConfigList(t *testing.T, publicName string) []byte {
	t.Helper()
	key, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { // ECHConfigList
		b.AddUint16(0xfe0d) // version
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			b.AddUint8(7)       // config_id
			b.AddUint16(0x0020) // DHKEM(X25519, HKDF-SHA256)
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
				b.AddBytes(key.PublicKey().Bytes())
			})
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
				b.AddUint16(0x0001) // HKDF-SHA256
				b.AddUint16(0x0001) // AES-128-GCM
			})
			b.AddUint8(64) // maximum_name_length
			b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) {
				b.AddBytes([]byte(publicName))
			})
			b.AddUint16(0) // no extensions
		})
	})
	list, err := b.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return list
}
