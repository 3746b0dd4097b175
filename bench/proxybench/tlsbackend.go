package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"time"
)

// tlsPair is the certificate the TLS backend serves and the client
// configuration that trusts it, made once at start-up.
type tlsPair struct {
	server *tls.Config
	client *tls.Config
}

// newTLSPair generates a self-signed ECDSA P-256 certificate for sniName.
// Neither side keeps sessions: every handshake is a full one.
func newTLSPair() (*tlsPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tls: generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: sniName},
		DNSNames:              []string{sniName},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("tls: create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tls: parse certificate: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return &tlsPair{
		server: &tls.Config{
			Certificates:           []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}},
			SessionTicketsDisabled: true,
			MinVersion:             tls.VersionTLS12,
		},
		client: &tls.Config{
			ServerName: sniName,
			RootCAs:    pool,
			MinVersion: tls.VersionTLS12,
			// No ClientSessionCache: no resumption.
		},
	}, nil
}

// tlsBackend is a crypto/tls server in this process: for each connection
// it completes a full handshake, writes one byte of application data and
// waits for the client to close.
type tlsBackend struct {
	ln       net.Listener
	cfg      *tls.Config
	opLimit  time.Duration
	accepted atomic.Int64
	errs     atomic.Int64
	firstErr atomic.Value // string

	connSet
}

// startTLSBackend listens on a free loopback port.
func startTLSBackend(cfg *tls.Config, opLimit time.Duration) (*tlsBackend, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, fmt.Errorf("tls backend: listen: %w", err)
	}
	b := &tlsBackend{ln: ln, cfg: cfg, opLimit: opLimit}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

func (b *tlsBackend) addr() string { return b.ln.Addr().String() }

func (b *tlsBackend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			b.fail(fmt.Errorf("tls backend: accept: %w", err))
			time.Sleep(10 * time.Millisecond) // EMFILE and the like: back off
			continue
		}
		b.accepted.Add(1)
		b.add(c)
		b.wg.Add(1)
		go b.serve(c)
	}
}

func (b *tlsBackend) serve(c net.Conn) {
	defer b.wg.Done()
	defer b.forget(c)
	if err := c.SetDeadline(time.Now().Add(b.opLimit)); err != nil {
		b.fail(fmt.Errorf("tls backend: set deadline: %w", err))
		return
	}
	tc := tls.Server(c, b.cfg)
	if err := tc.Handshake(); err != nil {
		b.fail(fmt.Errorf("tls backend: handshake: %w", err))
		return
	}
	if _, err := tc.Write([]byte{'!'}); err != nil {
		b.fail(fmt.Errorf("tls backend: write: %w", err))
		return
	}
	io.Copy(io.Discard, tc)
}

func (b *tlsBackend) fail(err error) {
	b.errs.Add(1)
	b.firstErr.CompareAndSwap(nil, err.Error())
}

func (b *tlsBackend) errorCount() int64 { return b.errs.Load() }

// lastError returns the first error recorded, or "none".
func (b *tlsBackend) lastError() string {
	if s, ok := b.firstErr.Load().(string); ok {
		return s
	}
	return "none"
}

// close stops accepting, closes every connection and waits for the
// handlers (at most a few seconds).
func (b *tlsBackend) close() error { return b.connSet.close(b.ln, "tls backend") }

// tlsShot is one short connection of the full-handshake workload: dial, a
// full TLS handshake through the proxy, read one byte of application data,
// close.
func tlsShot(cfg *tls.Config) shotFunc {
	return func(ctx context.Context, d *net.Dialer, addr string) error {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		c, err := d.DialContext(cctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		defer c.Close()
		if err := setConnDeadline(cctx, c); err != nil {
			return err
		}
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(cctx); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
		if tc.ConnectionState().DidResume {
			return errors.New("handshake: resumed, want a full handshake")
		}
		one := make([]byte, 1)
		if _, err := io.ReadFull(tc, one); err != nil {
			return fmt.Errorf("read application data: %w", err)
		}
		tc.Close() // sends close_notify; the backend may already be gone
		return nil
	}
}
