// Package clienthello makes a real TLS ClientHello for the benchmarks:
// the bytes crypto/tls itself sends first as a client.
package clienthello

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Generate returns what crypto/tls writes first as a client asking for
// serverName: one handshake record holding the ClientHello, written in a
// single flush. It runs a real tls.Client over a net.Pipe and captures that
// record; the handshake is then abandoned.
func Generate(ctx context.Context, serverName string) ([]byte, error) {
	cli, srv := net.Pipe()
	defer cli.Close()
	defer srv.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(10 * time.Second)
	}
	if err := srv.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("hello: set deadline: %w", err)
	}

	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		conn := tls.Client(cli, &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12})
		done <- conn.HandshakeContext(hctx)
	}()

	hdr := make([]byte, 5)
	if _, err := io.ReadFull(srv, hdr); err != nil {
		return nil, fmt.Errorf("hello: read record header: %w", err)
	}
	if hdr[0] != 0x16 {
		return nil, fmt.Errorf("hello: first record has type %#x, want handshake (0x16)", hdr[0])
	}
	rec := make([]byte, 5+int(binary.BigEndian.Uint16(hdr[3:5])))
	copy(rec, hdr)
	if _, err := io.ReadFull(srv, rec[5:]); err != nil {
		return nil, fmt.Errorf("hello: read record body: %w", err)
	}
	if len(rec) < 6 || rec[5] != 0x01 {
		return nil, errors.New("hello: first record is not a ClientHello")
	}
	if !bytes.Contains(rec, []byte(serverName)) {
		return nil, fmt.Errorf("hello: ClientHello does not carry %q", serverName)
	}

	// End the handshake and wait for its goroutine.
	cancel()
	srv.Close()
	cli.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		return nil, errors.New("hello: tls.Client did not stop")
	}
	return rec, nil
}
