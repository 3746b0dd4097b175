package worker

import (
	"sort"
	"time"
)

// The sniff phase under pressure. Each connection takes a permit of the
// global limit at accept, and holds it while it sends its hello: clients
// that connect and send nothing (or drip) could hold every permit until
// timeouts.client_hello. A worker's sniff share (sniffLimitFor: three
// quarters of its share of max_connections) is how many of its
// connections may sit in the sniff phase undisturbed; past it, one that
// has sent no complete hello for evictAfter is evicted when its permit is
// needed: by a new connection that finds no permit free (admit), or by
// the master asking for spares for another worker (EvictSlowSniffers on
// ipc Revoke). A burst of clients that all send their hellos at once is
// never refused for the phase: its connections are young.

// evictAfterMax bounds how long a connection must have been sniffing to
// be evicted under pressure (half of timeouts.client_hello when that is
// shorter): far longer than a hello takes on any live link.
const evictAfterMax = 2 * time.Second

// evictAfter returns how long a connection must have been sniffing to be
// evicted.
func (s *Server) evictAfter() time.Duration {
	return min(evictAfterMax, s.cfg.Timeouts.ClientHello/2)
}

// addSniffer records c as being in the sniff phase.
func (s *Server) addSniffer(c *conn) {
	s.sniffMu.Lock()
	s.sniffers[c] = struct{}{}
	s.sniffMu.Unlock()
	s.sniffing.Add(1)
}

// removeSniffer records c's leaving the sniff phase, unless an eviction
// took it out already.
func (s *Server) removeSniffer(c *conn) {
	s.sniffMu.Lock()
	_, ok := s.sniffers[c]
	delete(s.sniffers, c)
	s.sniffMu.Unlock()
	if ok {
		s.sniffing.Add(-1)
	}
}

// stealSniffers evicts up to n connections that have been sniffing for
// evictAfter or longer, oldest first, as far as this worker has more
// connections in the sniff phase than its share, and takes their permits:
// giveBack returns them to the limiter at once (for the master's revoke),
// else the caller uses them (one for its own connection). It returns how
// many it took. Only connections holding a permit are taken.
func (s *Server) stealSniffers(n int, giveBack bool) int {
	if s.limiter == nil || n <= 0 {
		return 0
	}
	cutoff := time.Now().Add(-s.evictAfter())
	s.sniffMu.Lock()
	excess := len(s.sniffers) - int(s.sniffLimit)
	if excess <= 0 {
		s.sniffMu.Unlock()
		return 0
	}
	var old []*conn
	for c := range s.sniffers {
		if c.start.Before(cutoff) {
			old = append(old, c)
		}
	}
	sort.Slice(old, func(i, j int) bool { return old[i].start.Before(old[j].start) })
	old = old[:min(len(old), n, excess)]
	for _, c := range old {
		delete(s.sniffers, c)
		c.stolen.Store(true)
	}
	s.sniffMu.Unlock()
	for _, c := range old {
		s.sniffing.Add(-1)
		c.close() // its sniff read fails; it ends as an eviction, without its permit
		if giveBack {
			s.limiter.Release()
		}
	}
	if len(old) > 0 {
		s.log.Info("evicted connections with no complete hello to free their permits",
			"evicted", len(old), "sniffing", s.sniffing.Load(), "sniff_share", s.sniffLimit)
	}
	return len(old)
}

// EvictSlowSniffers evicts every connection past this worker's sniff
// share that has been sniffing for too long, and gives their permits back
// to the limiter, to be returned as spares: the master asks (ipc Revoke)
// when another worker needs permits the pool no longer has.
func (s *Server) EvictSlowSniffers() int {
	return s.stealSniffers(int(^uint(0)>>1), true)
}
