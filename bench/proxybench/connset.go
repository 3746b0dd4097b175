package main

import (
	"errors"
	"net"
	"sync"
	"time"
)

// connSet is a backend's open connections and running goroutines (its
// accept loop and handlers), so that close can end them all. The zero
// value is ready to use.
type connSet struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// add records an accepted connection.
func (s *connSet) add(c net.Conn) {
	s.mu.Lock()
	if s.conns == nil {
		s.conns = map[net.Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
}

// forget closes c and drops it.
func (s *connSet) forget(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// close closes ln and every connection, and waits for the goroutines
// counted in wg (at most a few seconds); what names the backend in the
// error.
func (s *connSet) close(ln net.Listener, what string) error {
	ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-time.After(5 * time.Second):
		return errors.New(what + ": handlers did not stop")
	}
}
