package proxy

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestPipeBound runs many busy pairs through a Poller whose pool holds at
// most 4 pipes: the process never holds more than 4 pipes more than
// before, the streams that found no pipe still copy every byte, and once
// the pairs are quiet the pool closes its pipes.
func TestPipeBound(t *testing.T) {
	const (
		bound   = 4
		linger  = 100 * time.Millisecond
		pairs   = 16
		size    = 4 << 20
		chunk   = 64 << 10
		pipeFDn = 2 // fds per pipe
	)
	poller, err := newPollerPipes(bound, linger)
	if err != nil {
		t.Fatal(err)
	}
	defer poller.Close()
	before := pipeFDs(t)

	// Sample the pipe fds while the streams run.
	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if n := int64(pipeFDs(t) - before); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()

	// The readers wait until some transfer has gone over the bound:
	// until then every direction is stuck writing to a peer that does not
	// read, holding its pipe, so the rest must copy in user space.
	gate := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4*pairs)
	for i := range pairs {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		done := make(chan error, 1)
		start(proxyC, proxyB, time.Minute, poller, nil, func(_ Result, err error) { done <- err })
		defer client.Close()
		defer backend.Close()
		// Each byte says which pair and where in the stream it is, so a
		// lost, doubled or crossed chunk shows.
		up := bytes.Repeat([]byte{byte(i)}, size)
		for j := 0; j < size; j += chunk {
			up[j] = byte(j / chunk)
		}
		down := bytes.Repeat([]byte{byte(i + 100)}, size)
		wg.Go(func() { // client → backend
			if _, err := client.Write(up); err != nil {
				errs <- fmt.Errorf("pair %d: client write: %w", i, err)
			}
			client.CloseWrite()
		})
		wg.Go(func() { // backend → client
			if _, err := backend.Write(down); err != nil {
				errs <- fmt.Errorf("pair %d: backend write: %w", i, err)
			}
			backend.CloseWrite()
		})
		wg.Go(func() {
			<-gate
			backend.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, err := io.ReadAll(backend)
			if err != nil || !bytes.Equal(got, up) {
				errs <- fmt.Errorf("pair %d: backend got %d bytes (equal %v), want %d: %v", i, len(got), bytes.Equal(got, up), size, err)
			}
		})
		wg.Go(func() {
			<-gate
			client.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, err := io.ReadAll(client)
			if err != nil || !bytes.Equal(got, down) {
				errs <- fmt.Errorf("pair %d: client got %d bytes (equal %v), want %d: %v", i, len(got), bytes.Equal(got, down), size, err)
			}
			select {
			case err := <-done:
				if err != nil {
					errs <- fmt.Errorf("pair %d ended with %w", i, err)
				}
			case <-time.After(10 * time.Second):
				errs <- fmt.Errorf("pair %d did not finish", i)
			}
		})
	}
	deadline := time.Now().Add(10 * time.Second)
	for poller.pipes.overflow.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond) // poll the counter until the deadline
	}
	close(gate)
	wg.Wait()
	close(stop)
	<-sampled
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if p := peak.Load(); p > bound*pipeFDn {
		t.Errorf("%d pipe fds open at the peak; want at most %d (%d pipes)", p, bound*pipeFDn, bound)
	}
	if poller.pipes.overflow.Load() == 0 {
		t.Errorf("no transfer went over the bound of %d pipes with %d busy pairs: the fallback was not exercised", bound, pairs)
	}
	t.Logf("peak %d pipe fds, %d transfers copied in user space", peak.Load(), poller.pipes.overflow.Load())

	// Quiet: the free pipes are closed after linger.
	deadline = time.Now().Add(5 * time.Second)
	for pipeFDs(t) > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d pipe fds still open 5s after the pairs ended; want none (linger %v)", pipeFDs(t)-before, linger)
		}
		time.Sleep(10 * time.Millisecond) // poll the fds until the deadline
	}
}

// TestPipePool checks the pool's books: the bound counts lent and free
// pipes, a clean pipe is lent again, a dirty one is closed, and a closed
// pool lends nothing and closes what comes back.
func TestPipePool(t *testing.T) {
	before := pipeFDs(t)
	pp := newPipePool(2, time.Hour)
	a, b := pp.get(), pp.get()
	if a == nil || b == nil {
		t.Fatal("no pipe within the bound")
	}
	if c := pp.get(); c != nil {
		t.Fatal("a third pipe from a pool of 2")
	}
	if got := pp.overflow.Load(); got != 1 {
		t.Errorf("overflow %d; want 1", got)
	}
	if n := pipeFDs(t) - before; n != 4 {
		t.Errorf("%d pipe fds with 2 pipes lent; want 4", n)
	}
	pp.put(a, false)
	if again := pp.get(); again != a {
		t.Error("a free pipe was not lent again")
	}
	pp.put(a, true) // dirty: closed, and its place in the bound is free
	if n := pipeFDs(t) - before; n != 2 {
		t.Errorf("%d pipe fds after a dirty pipe came back; want 2", n)
	}
	c := pp.get()
	if c == nil {
		t.Fatal("no pipe after a dirty one was closed")
	}
	pp.put(c, false)
	pp.close()
	if n := pipeFDs(t) - before; n != 2 {
		t.Errorf("%d pipe fds after close with one pipe lent; want 2", n)
	}
	if d := pp.get(); d != nil {
		t.Error("a closed pool lent a pipe")
	}
	pp.put(b, false)
	if n := pipeFDs(t) - before; n != 0 {
		t.Errorf("%d pipe fds after the last pipe came back to a closed pool; want 0", n)
	}
}
