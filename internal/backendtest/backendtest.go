// Package backendtest runs loopback servers that stand in for backends in
// tests: plain TCP with any handler, an echo, a handler that starts after
// an HTTP request head, and a TLS backend with a self-signed certificate.
//
// Every server listens on 127.0.0.1 on a free port and lives as long as the
// test: when it ends, the listener and every connection still open are
// closed and the handlers are waited for.
package backendtest

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"
)

// Serve accepts connections and runs serve on its own goroutine for each;
// the connection is closed when serve returns. serve must return once its
// connection is closed or t.Context() is done. Serve returns the address.
func Serve(t testing.TB, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return run(t, ln, serve)
}

// run serves ln as Serve does.
func run(t testing.TB, ln net.Listener, serve func(net.Conn)) string {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				serve(c)
			})
		}
	})
	return ln.Addr().String()
}

// Echo serves connections that echo every byte until EOF, which they pass
// on as a half-close.
func Echo(t testing.TB) string {
	t.Helper()
	return Serve(t, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

// AfterHead reads each connection's HTTP request head (up to the empty
// line), then hands the connection and the rest of its input to serve. A
// connection that ends before its head is closed.
func AfterHead(t testing.TB, serve func(c net.Conn, r *bufio.Reader)) string {
	t.Helper()
	return Serve(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if line == "\r\n" {
				break
			}
		}
		serve(c, r)
	})
}

// TLS serves TLS with a self-signed certificate for names: each connection
// gets the line "id sni\n" (sni being the name the client asked for), then
// an echo until EOF. Connections end after 30 s at most. TLS returns the
// address and a pool that trusts the certificate.
func TLS(t testing.TB, id string, names ...string) (addr string, pool *x509.CertPool) {
	t.Helper()
	cert, pool := Cert(t, names...)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	addr = run(t, ln, func(c net.Conn) {
		tc := c.(*tls.Conn)
		tc.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			return
		}
		fmt.Fprintf(tc, "%s %s\n", id, tc.ConnectionState().ServerName)
		io.Copy(tc, tc)
		tc.CloseWrite()
	})
	return addr, pool
}

// Cert returns a self-signed ECDSA certificate for names (the first is
// also its common name) and a pool that trusts it.
func Cert(t testing.TB, names ...string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: names[0]},
		DNSNames:              names,
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
