package master

import (
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/status"
)

// counters is the part that owns the cumulative counters: the totals the
// workers push (and the predecessor's, while it drains), worker restarts
// and reloads. They survive a reload in the succession state; once a
// successor is attached, every change is sent on to it as a Delta.
type counters struct {
	mu            sync.Mutex
	totals        stats.Snapshot
	restarts      uint64
	reloadsOK     uint64
	reloadsFailed uint64
	// predecessorActive is the predecessor's live connections, as counted
	// in totals.
	predecessorActive int64
	// successor gets every Delta once attached.
	successor *stateSocket
	// history samples the totals every status.SampleInterval (for rates
	// and the status page's charts); reloads are the last reloads, newest
	// first. Both are inherited across reloads.
	history status.History
	reloads []status.Reload
	// fill, when set, adds the other parts' state (the health part's) to
	// the succession state; it is called under mu.
	fill func(*successionState)
}

// inherit starts from the predecessor's succession state.
func (c *counters) inherit(st successionState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.totals = st.Totals
	c.predecessorActive = st.Totals.Active
	c.restarts, c.reloadsOK, c.reloadsFailed = st.Restarts, st.ReloadsOK, st.ReloadsFailed
	for _, smp := range st.History {
		c.history.Add(smp)
	}
	c.reloads = st.Reloads
}

// add counts a worker's stats push, and sends it on to the successor.
func (c *counters) add(d stats.Snapshot) {
	c.mu.Lock()
	c.totals.Add(d)
	succ := c.successor
	c.mu.Unlock()
	// Sent outside mu: a successor slow to read must not stall /metrics.
	// The State was sent before successor was set, so it does not count d.
	if succ != nil {
		succ.send(stateMsg{Delta: &d})
	}
}

// lost takes a dead worker's n open connections off the count.
func (c *counters) lost(n int64) {
	if n != 0 {
		c.add(stats.Snapshot{Active: -n})
	}
}

// addPredecessor counts a Delta from the draining predecessor.
func (c *counters) addPredecessor(d stats.Snapshot) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.totals.Add(d)
	c.predecessorActive += d.Active
}

// predecessorGone takes the exited predecessor's connections off the count.
func (c *counters) predecessorGone() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.totals.Active -= c.predecessorActive
	c.predecessorActive = 0
}

// workerRestarted counts a worker restart.
func (c *counters) workerRestarted() {
	c.mu.Lock()
	c.restarts++
	c.mu.Unlock()
}

// reloaded counts a reload's outcome and keeps it for the status.
func (c *counters) reloaded(r status.Reload) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r.Result == "ok" {
		c.reloadsOK++
	} else {
		c.reloadsFailed++
	}
	c.reloads = status.AddReload(c.reloads, r)
}

// sample records the totals at now in the history.
func (c *counters) sample(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.history.Add(status.SampleOf(statusTotals(c.totals), now))
}

// view returns what the status shows of the counters at now: totals, rates
// over the last status.RateWindow, the sample history and the last
// reloads.
func (c *counters) view(now time.Time) (status.Totals, status.Rates, []status.Sample, []status.Reload) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := statusTotals(c.totals)
	r := c.history.Rates(status.SampleOf(t, now), status.RateWindow)
	return t, r, c.history.Samples(), append([]status.Reload(nil), c.reloads...)
}

// statusTotals names s's counters by their metric labels.
func statusTotals(s stats.Snapshot) status.Totals {
	t := status.Totals{Active: s.Active, BytesIn: s.BytesIn, BytesOut: s.BytesOut,
		Protocols: make(map[string]uint64, len(s.Conns)), Rejected: make(map[string]uint64, len(s.Rejected))}
	for i, n := range s.Conns {
		t.Connections += n
		t.Protocols[stats.Protocol(i).String()] = n
	}
	for i, n := range s.Rejected {
		t.Rejected[stats.Reason(i).String()] = n
	}
	return t
}

// snapshot returns the totals.
func (c *counters) snapshot() stats.Snapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.totals
}

// process returns the master-level counters for /metrics.
func (c *counters) process() stats.Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return stats.Process{WorkerRestarts: c.restarts, ReloadsOK: c.reloadsOK, ReloadsFailed: c.reloadsFailed}
}

// attachSuccessor sends the succession state of generation (with reserve,
// and when the reload began) to s and, if that worked, every later change: one step under mu, so no
// Delta is counted twice or lost, and the State goes first.
func (c *counters) attachSuccessor(s *stateSocket, generation, reserve int, began time.Time) error {
	return c.attachSuccessorWith(s, generation, reserve, began, nil)
}

// attachSuccessorWith is attachSuccessor with the per-client table's
// state in the succession state.
func (c *counters) attachSuccessorWith(s *stateSocket, generation, reserve int, began time.Time, perIP *perip.State) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := successionState{Generation: generation, Totals: c.totals, Restarts: c.restarts,
		ReloadsOK: c.reloadsOK, ReloadsFailed: c.reloadsFailed, Reserve: reserve,
		History: c.history.Samples(), Reloads: c.reloads, ReloadBegan: began, PerIP: perIP}
	if c.fill != nil {
		c.fill(&st)
	}
	if err := s.send(stateMsg{State: &st}); err != nil {
		return err
	}
	c.successor = s
	return nil
}

// withSuccessor runs f with the successor's state socket (nil when none is
// attached) under mu: what f counts is either in the succession state
// already sent or, when f sees the successor, for f to send it on (outside
// mu, as add does) — never both, never neither.
func (c *counters) withSuccessor(f func(succ *stateSocket)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(c.successor)
}

// detachSuccessor stops sending changes (the successor failed).
func (c *counters) detachSuccessor() {
	c.mu.Lock()
	c.successor = nil
	c.mu.Unlock()
}
