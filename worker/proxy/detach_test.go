package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// moving is a pair that can be detached and resumed over and over, as a
// reload moves it from process to process (here within one process: the
// files are what would cross SCM_RIGHTS).
type moving struct {
	t      *testing.T
	poller *Poller
	idle   time.Duration
	mu     sync.Mutex
	h      *Pair
	ends   chan error // done's error, one per Start/Resume
	in     int64      // bytes counted by count, across every resume
	out    int64
}

func (m *moving) count(in, out int64) {
	m.mu.Lock()
	m.in += in
	m.out += out
	m.mu.Unlock()
}

func (m *moving) start(client, backend *net.TCPConn, st State) {
	m.ends = make(chan error, 1)
	ends := m.ends
	m.h = resume(client, backend, st, m.idle, m.poller, m.count, func(r Result, err error) {
		if r.In < st.In || r.Out < st.Out {
			m.t.Errorf("result %+v counts less than the resumed state %+v", r, st)
		}
		ends <- err
	})
}

// move detaches the pair and resumes it from the files.
func (m *moving) move() State {
	m.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := m.h.Detach(ctx)
	if err != nil {
		m.t.Fatalf("detach: %v", err)
	}
	select {
	case err := <-m.ends:
		if !errors.Is(err, ErrDetached) {
			m.t.Fatalf("done after detach: %v; want ErrDetached", err)
		}
	default:
		m.t.Fatal("done not called before Detach returned")
	}
	client, backend := fileTCP(m.t, d.Client), fileTCP(m.t, d.Backend)
	m.start(client, backend, d.State)
	return d.State
}

// waitProgress waits until the pair counted more bytes both ways than st.
func (m *moving) waitProgress(st State) {
	m.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m.mu.Lock()
		in, out := m.in, m.out
		m.mu.Unlock()
		if in > st.In && out > st.Out {
			return
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("no bytes moved both ways since %+v (counted %d in, %d out)", st, in, out)
		}
		time.Sleep(time.Millisecond) // poll the condition until the deadline
	}
}

// waitParked waits until p holds n parked directions.
func waitParked(t *testing.T, p *Poller, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := p.parkedCount()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d directions parked; want %d", got, n)
		}
		time.Sleep(time.Millisecond) // poll the condition until the deadline
	}
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// waitStalled waits until the byte count that count reads has moved and
// then stopped for 100 ms. Counting what a client wrote towards a backend
// that reads nothing, that is when every buffer on the way is full and the
// pair's up direction is blocked writing.
func waitStalled(t *testing.T, count func() int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	last, still := int64(0), 0
	for still < 10 {
		if time.Now().After(deadline) {
			t.Fatalf("bytes still moving (or none moved: %d) after 10 s; want a blocked writer", last)
		}
		time.Sleep(10 * time.Millisecond) // poll the condition until the deadline
		n := count()
		if n > 0 && n == last {
			still++
		} else {
			still = 0
		}
		last = n
	}
}

// fileTCP turns a detached socket back into a connection.
func fileTCP(t *testing.T, f *os.File) *net.TCPConn {
	t.Helper()
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// pattern writes n bytes of a known sequence in random-sized chunks.
func pattern(w io.Writer, n int) error { return patternSteps(w, n, 1, nil) }

// patternSteps is pattern in steps equal parts: before each part but the
// first it waits for a token from next, so that the stream cannot end
// before the reader of next is done with it.
func patternSteps(w io.Writer, n, steps int, next <-chan struct{}) error {
	buf := make([]byte, 64<<10)
	part := n / steps
	for off := 0; off < n; {
		if off > 0 && off%part == 0 && off/part < steps {
			<-next
		}
		k := min(len(buf), n-off, 1+(off*7919)%len(buf), part-off%part)
		for i := range k {
			buf[i] = byte((off + i) % 251)
		}
		if _, err := w.Write(buf[:k]); err != nil {
			return err
		}
		off += k
	}
	return nil
}

// checkPattern reads until EOF and checks the sequence and length.
func checkPattern(r io.Reader, n int) error {
	buf := make([]byte, 32<<10)
	got := 0
	for {
		k, err := r.Read(buf)
		for i := range k {
			if buf[i] != byte((got+i)%251) {
				return fmt.Errorf("byte %d is %d, want %d", got+i, buf[i], byte((got+i)%251))
			}
		}
		got += k
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("after %d bytes: %w", got, err)
		}
	}
	if got != n {
		return fmt.Errorf("got %d bytes, want %d", got, n)
	}
	return nil
}

func TestDetachMidStreamLosesNothing(t *testing.T) {
	for _, withPoller := range []bool{true, false} {
		t.Run(fmt.Sprintf("poller=%v", withPoller), func(t *testing.T) {
			m := &moving{t: t, idle: time.Minute}
			if withPoller {
				m.poller = newPoller(t)
			}
			client, proxyC := tcpPair(t)
			proxyB, backend := tcpPair(t)
			defer client.Close()
			defer backend.Close()
			m.start(proxyC, proxyB, State{})

			// Both ways at once, while the pair moves ten times. Each
			// side writes in eleven parts and starts the next part only
			// after a move, and each move waits until bytes moved both
			// ways since the last one: every move is mid-stream.
			const moves = 10
			const n = (moves + 1) << 22
			errs := make(chan error, 4)
			nextUp, nextDown := make(chan struct{}, moves), make(chan struct{}, moves)
			go func() { errs <- patternSteps(client, n, moves+1, nextUp); client.CloseWrite() }()
			go func() { errs <- patternSteps(backend, n, moves+1, nextDown); backend.CloseWrite() }()
			go func() { errs <- checkPattern(backend, n) }()
			go func() { errs <- checkPattern(client, n) }()
			var last State
			for range moves {
				m.waitProgress(last)
				last = m.move()
				nextUp <- struct{}{}
				nextDown <- struct{}{}
			}
			if last.In == 0 || last.Out == 0 {
				t.Errorf("state after moves %+v; want bytes counted both ways", last)
			}
			client.SetDeadline(time.Now().Add(60 * time.Second))
			backend.SetDeadline(time.Now().Add(60 * time.Second))
			for range 4 {
				select {
				case err := <-errs:
					if err != nil {
						t.Fatal(err)
					}
				case <-time.After(60 * time.Second):
					t.Fatal("transfer did not finish")
				}
			}
			select {
			case err := <-m.ends:
				if err != nil {
					t.Errorf("pair ended with %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("pair did not finish")
			}
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.in != n || m.out != n {
				t.Errorf("counted %d in, %d out across moves; want %d each", m.in, m.out, n)
			}
		})
	}
}

func TestDetachIdleAndHalfClosed(t *testing.T) {
	p := newPoller(t)
	m := &moving{t: t, poller: p, idle: time.Minute}
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	m.start(proxyC, proxyB, State{})

	echo := func() {
		t.Helper()
		buf := make([]byte, 4)
		client.Write([]byte("ping"))
		backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(backend, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("up: %q %v", buf, err)
		}
		backend.Write([]byte("pong"))
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
			t.Fatalf("down: %q %v", buf, err)
		}
	}
	echo()
	waitParked(t, p, 2) // both directions park
	m.move()
	echo()

	// Bytes sent while nothing runs wait in the socket for the resumed pair.
	client.Write([]byte("queued"))
	m.move()
	buf := make([]byte, 6)
	backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(backend, buf); err != nil || string(buf) != "queued" {
		t.Fatalf("queued bytes: %q %v", buf, err)
	}

	// The client's FIN has passed; the backend still answers after moves.
	client.CloseWrite()
	backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := backend.Read(buf); err != io.EOF {
		t.Fatalf("backend read after client FIN: %v", err)
	}
	st := m.move()
	if !st.UpDone || st.DownDone {
		t.Fatalf("state %+v; want only the up direction done", st)
	}
	st = m.move()
	if !st.UpDone {
		t.Fatalf("a resumed ended direction came back: %+v", st)
	}
	backend.Write([]byte("late"))
	backend.CloseWrite()
	if got := readAll(t, client); got != "late" {
		t.Fatalf("client read %q after moves; want \"late\"", got)
	}
	select {
	case err := <-m.ends:
		if err != nil {
			t.Errorf("pair ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pair did not finish")
	}
}

func TestDetachBlockedWriterTimesOut(t *testing.T) {
	m := &moving{t: t, idle: time.Minute}
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	m.start(proxyC, proxyB, State{})
	// The backend reads nothing: the up direction ends up blocked writing.
	w := &countingWriter{w: client}
	go pattern(w, 64<<20)
	waitStalled(t, w.n.Load)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	d, err := m.h.Detach(ctx)
	if err == nil {
		d.Close()
		t.Fatal("detached a pair blocked writing; want the deadline's error")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("detach: %v; want context.DeadlineExceeded", err)
	}
	select {
	case err := <-m.ends:
		// Closed as by Close: no error of its own, but not detached.
		if errors.Is(err, ErrDetached) {
			t.Errorf("done after a failed detach: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pair did not finish after a failed detach")
	}
	expectEOF(t, client)
}

func TestDetachEndedPair(t *testing.T) {
	m := &moving{t: t, idle: time.Minute}
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	m.start(proxyC, proxyB, State{})
	m.h.Close()
	<-m.ends
	if _, err := m.h.Detach(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("detach of a closed pair: %v; want ErrClosed", err)
	}
}

func TestResumeKeepsIdleClock(t *testing.T) {
	m := &moving{t: t, idle: time.Minute}
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	// Silent for 59.7 s already: the resumed pair idles out in 0.3 s.
	m.start(proxyC, proxyB, State{Last: time.Now().Add(-time.Minute + 300*time.Millisecond)})
	select {
	case err := <-m.ends:
		if !errors.Is(err, ErrIdle) {
			t.Fatalf("resumed pair ended with %v; want ErrIdle", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("resumed pair did not idle out")
	}
}

// expectEOF reads until the connection ends, which it must within 5 s.
func expectEOF(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection still open")
	}
}

func TestResumeAlreadyIdle(t *testing.T) {
	// The idle timer fires at once and aborts while Resume sets up: with
	// -race this checks that setup is done first.
	p := newPoller(t)
	for range 50 {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		done := make(chan error, 1)
		resume(proxyC, proxyB, State{Last: time.Now().Add(-time.Hour)}, time.Millisecond, p, nil, func(_ Result, err error) { done <- err })
		select {
		case err := <-done:
			if !errors.Is(err, ErrIdle) {
				t.Fatalf("long-idle resumed pair ended with %v; want ErrIdle", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("long-idle resumed pair did not end")
		}
		client.Close()
		backend.Close()
	}
}

func TestBeginDetachMany(t *testing.T) {
	// Stopping many pairs at once: the idle ones stop at once even when
	// one is blocked writing, and a stopped pair is handed out by Detach
	// even after its deadline passed.
	p := newPoller(t)
	const idle = 20
	stopped := make(chan int, idle+1)
	var pairs []*Pair
	var ends []chan error
	for i := range idle + 1 {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		defer client.Close()
		defer backend.Close()
		end := make(chan error, 1)
		ends = append(ends, end)
		pairs = append(pairs, start(proxyC, proxyB, time.Minute, p, nil, func(_ Result, err error) { end <- err }))
		if i == idle {
			// The last one's backend reads nothing: it blocks writing.
			w := &countingWriter{w: client}
			go pattern(w, 64<<20)
			waitStalled(t, w.n.Load)
		}
	}
	for i, h := range pairs {
		if !h.BeginDetach(func() { stopped <- i }) {
			t.Fatalf("pair %d: BeginDetach refused a live pair", i)
		}
	}
	for range idle {
		select {
		case i := <-stopped:
			if i == idle {
				t.Fatal("the blocked pair reported stopped")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("idle pairs did not stop while one was blocked")
		}
	}
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	for i, h := range pairs[:idle] {
		d, err := h.Detach(expired)
		if err != nil {
			t.Fatalf("pair %d stopped, yet Detach with a done context: %v", i, err)
		}
		d.Close()
	}
	_, err := pairs[idle].Detach(expired)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("blocked pair: Detach %v; want context.Canceled", err)
	}
	select {
	case i := <-stopped:
		if i != idle {
			t.Fatalf("pair %d reported twice", i)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked pair did not report after it was closed")
	}
	if err := <-ends[idle]; err == nil || errors.Is(err, ErrDetached) {
		t.Errorf("blocked pair closed by the deadline ended with %v; want the detach error", err)
	}
	if pairs[0].BeginDetach(func() { t.Error("stopped called for a detached pair") }) {
		t.Error("BeginDetach accepted a pair already detached")
	}
}

// newPoller returns a Poller closed when the test ends.
func newPoller(t *testing.T) *Poller {
	t.Helper()
	p, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}
