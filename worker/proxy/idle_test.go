package proxy

import (
	"errors"
	"math/rand/v2"
	"testing"
	"time"
)

// TestIdleClockSharedByPairs: pairs started with one Poller share its idle
// clock. Each ends with ErrIdle no sooner than its own timeout, a pair that
// keeps moving bytes outlives its timeout, a pair closed first leaves the
// clock at once, and the clock holds nothing once every pair has ended.
func TestIdleClockSharedByPairs(t *testing.T) {
	poller, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	defer poller.Close()
	clockLen := func() int {
		poller.clock.mu.Lock()
		defer poller.clock.mu.Unlock()
		return len(poller.clock.heap)
	}
	type ended struct {
		err error
		at  time.Time
	}
	idles := []time.Duration{450 * time.Millisecond, 150 * time.Millisecond, 300 * time.Millisecond}
	start0 := time.Now()
	ends := make([]chan ended, len(idles))
	for i, idle := range idles {
		client, proxyC := tcpPair(t)
		proxyB, backend := tcpPair(t)
		defer client.Close()
		defer backend.Close()
		ends[i] = make(chan ended, 1)
		start(proxyC, proxyB, idle, poller, nil, func(_ Result, err error) { ends[i] <- ended{err, time.Now()} })
	}
	// A pair closed before its timeout leaves the clock.
	client, proxyC := tcpPair(t)
	proxyB, backend := tcpPair(t)
	defer client.Close()
	defer backend.Close()
	closed := make(chan error, 1)
	h := start(proxyC, proxyB, time.Hour, poller, nil, func(_ Result, err error) { closed <- err })
	if n := clockLen(); n != len(idles)+1 {
		t.Fatalf("clock holds %d pairs; want %d", n, len(idles)+1)
	}
	h.Close()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("closed pair did not end")
	}
	if n := clockLen(); n != len(idles) {
		t.Fatalf("clock holds %d pairs after a Close; want %d", n, len(idles))
	}
	// A pair that moves a byte every third of its timeout is not idle.
	client, proxyC = tcpPair(t)
	proxyB, backend = tcpPair(t)
	defer client.Close()
	defer backend.Close()
	busy := make(chan error, 1)
	const busyIdle = 300 * time.Millisecond
	start(proxyC, proxyB, busyIdle, poller, nil, func(_ Result, err error) { busy <- err })
	// It moves bytes for longer than the longest timeout of the others.
	buf := make([]byte, 1)
	for range 5 {
		time.Sleep(busyIdle / 3) // deliberate: the trickle being tested
		if _, err := client.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := backend.Read(buf); err != nil {
			t.Fatalf("busy pair: %v", err)
		}
	}
	for i := range idles {
		select {
		case e := <-ends[i]:
			if !errors.Is(e.err, ErrIdle) {
				t.Errorf("pair %d ended with %v; want ErrIdle", i, e.err)
			}
			if d := e.at.Sub(start0); d < idles[i] {
				t.Errorf("pair %d (idle %v) ended after %v", i, idles[i], d)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("pair %d (idle %v) did not end", i, idles[i])
		}
	}
	select {
	case err := <-busy:
		t.Fatalf("busy pair ended with %v", err)
	default:
	}
	select {
	case err := <-busy:
		if !errors.Is(err, ErrIdle) {
			t.Errorf("busy pair, then quiet, ended with %v; want ErrIdle", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("busy pair, then quiet, did not end")
	}
	if n := clockLen(); n != 0 {
		t.Errorf("clock holds %d pairs once all ended; want 0", n)
	}
}

// TestIdleClockHeap adds and removes pairs in a random order and checks
// the heap's order and every pair's index after each step.
func TestIdleClockHeap(t *testing.T) {
	c := newIdleClock()
	defer c.timer.Stop()
	far := time.Now().Add(time.Hour).UnixNano()
	rng := rand.New(rand.NewPCG(1, 2))
	var in []*pair
	check := func(step int) {
		t.Helper()
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.heap) != len(in) {
			t.Fatalf("step %d: heap holds %d; want %d", step, len(c.heap), len(in))
		}
		for i, e := range c.heap {
			if int(e.p.clockIdx) != i {
				t.Fatalf("step %d: entry %d has index %d", step, i, e.p.clockIdx)
			}
			if i > 0 && c.heap[(i-1)/2].due > e.due {
				t.Fatalf("step %d: entry %d due before its parent", step, i)
			}
		}
	}
	for step := range 2000 {
		if len(in) > 0 && rng.IntN(3) == 0 {
			i := rng.IntN(len(in))
			c.remove(in[i])
			if in[i].clockIdx != clockDone {
				t.Fatalf("step %d: removed pair has index %d", step, in[i].clockIdx)
			}
			c.add(in[i], far) // finished: not queued again
			in = append(in[:i], in[i+1:]...)
		} else {
			p := &pair{clockIdx: notQueued}
			c.add(p, far+rng.Int64N(1000))
			in = append(in, p)
		}
		check(step)
	}
	for _, p := range in {
		c.remove(p)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.heap != nil || c.at != 0 {
		t.Errorf("empty clock keeps %d entries (cap %d), timer armed for %d", len(c.heap), cap(c.heap), c.at)
	}
}
