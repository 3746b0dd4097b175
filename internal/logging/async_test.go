package logging

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// gate is a writer that blocks until open is closed, and keeps what it is
// given; entered (if not nil) gets a value each time a Write begins.
type gate struct {
	open    chan struct{}
	entered chan struct{}
	mu      sync.Mutex
	b       bytes.Buffer
	writes  int
}

func (g *gate) Write(p []byte) (int, error) {
	if g.entered != nil {
		g.entered <- struct{}{}
	}
	<-g.open
	g.mu.Lock()
	defer g.mu.Unlock()
	g.writes++
	return g.b.Write(p)
}

func (g *gate) String() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.b.String()
}

// Records from many goroutines all arrive, each goroutine's in its order,
// written many at a time.
func TestAsyncOrderAndBatches(t *testing.T) {
	g := &gate{open: make(chan struct{})}
	close(g.open)
	a := NewAsync(g, AsyncQueue)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 1000 {
				fmt.Fprintf(a, "w%d %d\n", w, i)
			}
		})
	}
	wg.Wait()
	a.Close()
	next := make([]int, 4)
	for line := range strings.Lines(g.String()) {
		var w, i int
		if _, err := fmt.Sscanf(line, "w%d %d\n", &w, &i); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if i != next[w] {
			t.Fatalf("writer %d: record %d after %d", w, i, next[w]-1)
		}
		next[w]++
	}
	for w, n := range next {
		if n != 1000 {
			t.Errorf("writer %d: %d records; want 1000", w, n)
		}
	}
	if g.writes >= 4000 {
		t.Logf("%d writes for 4000 records (no batching this run)", g.writes)
	}
}

// A stalled file does not stall the writers until the queue is full; then
// they wait for room (nothing dropped), and go on once the file takes it.
func TestAsyncStalledWriter(t *testing.T) {
	g := &gate{open: make(chan struct{}), entered: make(chan struct{}, 10)}
	a := NewAsync(g, 100)
	rec := bytes.Repeat([]byte("x"), 30)
	// The goroutine takes the first record and blocks writing it; the
	// queue then holds 3 of 30 bytes, and the next one waits.
	a.Write(rec)
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the first record was never written")
	}
	for i := range 3 {
		done := make(chan struct{})
		go func() { a.Write(rec); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("write %d waited with room in the queue", i+2)
		}
	}
	blocked := make(chan struct{})
	go func() { a.Write(rec); close(blocked) }()
	select {
	case <-blocked:
		t.Fatal("a write over the queue's bound did not wait")
	case <-time.After(100 * time.Millisecond): // deliberate: it must still wait
	}
	close(g.open)
	select {
	case <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting write never went on once the file took the queue")
	}
	a.Close()
	if n := len(g.String()); n != 5*len(rec) {
		t.Errorf("%d bytes written; want %d", n, 5*len(rec))
	}
	// After Close, straight through.
	a.Write(rec)
	if n := len(g.String()); n != 6*len(rec) {
		t.Errorf("%d bytes after a write past Close; want %d", n, 6*len(rec))
	}
}
