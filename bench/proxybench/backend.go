package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"time"
)

// backendMode is what the backend does with each connection after reading
// its preamble (the ClientHello, or the HTTP request).
type backendMode int32

const (
	// modeSink counts bytes until the expected number arrived, reports
	// the time, then discards the rest until EOF.
	modeSink backendMode = iota
	// modeSource writes the expected number of bytes, then half-closes.
	modeSource
	// modeReply writes one byte, then waits for EOF.
	modeReply
	// modeHold accepts and holds the connection, reading nothing.
	modeHold
	// modeEcho writes back every byte it reads, until EOF.
	modeEcho
	// modeHTTPReply writes httpResponse, then waits for EOF.
	modeHTTPReply
)

// httpRequest is what the HTTP Host workload's client sends, and
// httpResponse what the backend answers.
const (
	httpRequest  = "GET / HTTP/1.1\r\nHost: " + sniName + "\r\n\r\n"
	httpResponse = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
)

// chunk is the size of every read and write buffer of the client and the
// backend.
const chunk = 256 << 10

// backendResult is what a sink reports for one connection.
type backendResult struct {
	n   int64
	at  time.Time
	err error
}

// backend is the plain TCP server behind every target, in this process.
// It never speaks TLS: it checks that the bytes a proxy passed on start
// with the exact preamble the client sent (the ClientHello, or the HTTP
// request), then acts per its mode.
type backend struct {
	ln       *net.TCPListener
	preamble []byte
	mode     atomic.Int32
	want     atomic.Int64
	opLimit  time.Duration

	results  chan backendResult
	accepted atomic.Int64
	errs     atomic.Int64
	firstErr atomic.Value // string

	connSet
}

// startBackend listens on a free loopback port and serves in mode; every
// connection must start with preamble.
func startBackend(preamble []byte, mode backendMode, opLimit time.Duration) (*backend, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, fmt.Errorf("backend: listen: %w", err)
	}
	b := &backend{
		ln:       ln,
		preamble: preamble,
		opLimit:  opLimit,
		results:  make(chan backendResult, 1),
	}
	b.mode.Store(int32(mode))
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

// addr is the backend's address, which every peer routes bench.test to.
func (b *backend) addr() string { return b.ln.Addr().String() }

// prepare sets the mode and byte count for the next connection and drops
// any stale result.
func (b *backend) prepare(mode backendMode, want int64) {
	b.mode.Store(int32(mode))
	b.want.Store(want)
	for {
		select {
		case <-b.results:
		default:
			return
		}
	}
}

// result waits for the next sink result.
func (b *backend) result(ctx context.Context) (backendResult, error) {
	select {
	case r := <-b.results:
		return r, r.err
	case <-ctx.Done():
		return backendResult{}, fmt.Errorf("backend: waiting for the bytes: %w", ctx.Err())
	}
}

// waitProgress waits until n connections have been accepted in all. It
// gives up when ctx ends or when no connection arrived for stall.
func (b *backend) waitProgress(ctx context.Context, n int64, stall time.Duration) error {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	last, lastAt := b.accepted.Load(), time.Now()
	for {
		got := b.accepted.Load()
		if got >= n {
			return nil
		}
		if got != last {
			last, lastAt = got, time.Now()
		}
		if time.Since(lastAt) > stall {
			// Some connections may never come (the proxy failed them):
			// the caller decides whether the shortfall matters.
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("backend: %d of %d connections accepted: %w", got, n, ctx.Err())
		case <-tick.C:
		}
	}
}

// close stops accepting, closes every connection and waits for the
// handlers (at most a few seconds).
func (b *backend) close() error { return b.connSet.close(b.ln, "backend") }

func (b *backend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				b.fail(fmt.Errorf("backend: accept: %w", err))
				time.Sleep(10 * time.Millisecond)
				continue
			}
			b.fail(fmt.Errorf("backend: accept: %w", err))
			return
		}
		b.accepted.Add(1)
		b.add(c)
		if backendMode(b.mode.Load()) == modeHold {
			continue // held until close
		}
		b.wg.Add(1)
		go b.serve(c, backendMode(b.mode.Load()), b.want.Load())
	}
}

// fail records an error seen outside a measured connection.
func (b *backend) fail(err error) {
	b.errs.Add(1)
	b.firstErr.CompareAndSwap(nil, err.Error())
}

func (b *backend) serve(c *net.TCPConn, mode backendMode, want int64) {
	defer b.wg.Done()
	defer b.forget(c)
	if err := c.SetDeadline(time.Now().Add(b.opLimit)); err != nil {
		b.report(mode, backendResult{err: fmt.Errorf("backend: set deadline: %w", err)})
		return
	}
	got := make([]byte, len(b.preamble))
	if _, err := io.ReadFull(c, got); err != nil {
		b.report(mode, backendResult{err: fmt.Errorf("backend: read the first %d bytes: %w", len(got), err)})
		return
	}
	if !bytes.Equal(got, b.preamble) {
		b.report(mode, backendResult{err: errors.New("backend: the proxy did not pass the client's first bytes on unchanged")})
		return
	}
	switch mode {
	case modeSink:
		buf := make([]byte, chunk)
		var n int64
		for n < want {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				b.report(mode, backendResult{n: n, err: fmt.Errorf("backend: sink: %d of %d bytes: %w", n, want, err)})
				return
			}
		}
		b.report(mode, backendResult{n: n, at: time.Now()})
		io.Copy(io.Discard, c)
	case modeSource:
		buf := make([]byte, chunk)
		for left := want; left > 0; {
			m, err := c.Write(buf[:min(int64(len(buf)), left)])
			left -= int64(m)
			if err != nil {
				b.report(mode, backendResult{err: fmt.Errorf("backend: source: %d bytes left: %w", left, err)})
				return
			}
		}
		c.CloseWrite()
		io.Copy(io.Discard, c)
	case modeReply:
		if _, err := c.Write([]byte{'!'}); err != nil {
			b.fail(fmt.Errorf("backend: reply: %w", err))
			return
		}
		io.Copy(io.Discard, c)
	case modeHTTPReply:
		if _, err := io.WriteString(c, httpResponse); err != nil {
			b.fail(fmt.Errorf("backend: HTTP response: %w", err))
			return
		}
		io.Copy(io.Discard, c)
	case modeEcho:
		buf := make([]byte, 4096)
		for {
			m, err := c.Read(buf)
			if m > 0 {
				if _, werr := c.Write(buf[:m]); werr != nil {
					b.fail(fmt.Errorf("backend: echo: %w", werr))
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					b.fail(fmt.Errorf("backend: echo: %w", err))
				}
				return
			}
		}
	}
}

// report hands a sink's result to the waiting measurement; other modes
// only record errors.
func (b *backend) report(mode backendMode, r backendResult) {
	if mode != modeSink {
		if r.err != nil {
			b.fail(r.err)
		}
		return
	}
	select {
	case b.results <- r:
	default:
	}
}

func (b *backend) errorCount() int64 { return b.errs.Load() }

// lastError returns the first error the backend recorded outside a sink
// result, or "none".
func (b *backend) lastError() string {
	if s, ok := b.firstErr.Load().(string); ok {
		return s
	}
	return "none"
}
