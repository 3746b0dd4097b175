package process

import (
	"fmt"
	"time"

	"github.com/sniproxy/sniproxy/internal/health"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/worker"
)

// DialReportInterval is how often a worker process sends the master the
// outcomes of its dials to pool backends (when there are any): often
// enough that a backend refusing connections goes down for every worker
// within a fraction of a second, rarely enough to cost nothing.
const DialReportInterval = 250 * time.Millisecond

// backendKey names a pool backend by its metric labels.
type backendKey struct{ route, backend string }

// backends is what the loop keeps of the pool backends: the counts last
// pushed to the master.
type backends struct {
	prev map[backendKey]worker.BackendCount
}

// recvHealth waits for the health table the master sends right after the
// config, so that the first connection is served with it: a backend the
// previous generation found down is down here too from the start.
func recvHealth(c *ipc.Conn) (*health.Table, error) {
	m, err := c.Recv()
	if err != nil {
		return nil, fmt.Errorf("process: waiting for the health table: %w", err)
	}
	b, err := ipc.Decode(m)
	m.CloseFiles()
	if err != nil {
		return nil, fmt.Errorf("process: waiting for the health table: %w", err)
	}
	h, ok := b.(ipc.Health)
	if !ok {
		return nil, fmt.Errorf("process: waiting for the health table, got %v", m.Type)
	}
	return decodeHealth(h)
}

// decodeHealth decodes a Health message's table.
func decodeHealth(h ipc.Health) (*health.Table, error) {
	t := new(health.Table)
	if err := t.UnmarshalBinary(h.Table); err != nil {
		return nil, fmt.Errorf("process: health table from master: %w", err)
	}
	return t, nil
}

// setHealth applies a Health message from the master.
func (l *loop) setHealth(h ipc.Health) {
	t, err := decodeHealth(h)
	if err != nil {
		l.log.Warn("ignoring a bad health table", "err", err)
		return
	}
	l.srv.SetHealth(t)
}

// reportDials sends the master the dial outcomes since the last report.
func (l *loop) reportDials() {
	runs := l.srv.TakeDialRuns()
	for len(runs) > 0 {
		n := min(len(runs), ipc.MaxBackendEntries)
		rep := ipc.DialReport{Results: make([]ipc.DialResult, n)}
		for i, r := range runs[:n] {
			rep.Results[i] = ipc.DialResult{Key: r.Key, OK: r.OK, Count: r.Count, Reason: r.Reason, Last: r.Last}
		}
		runs = runs[n:]
		if err := l.conn.SendBody(rep); err != nil {
			l.log.Debug("sending dial report failed", "err", err)
			return
		}
	}
}

// pushBackendStats sends the change of every pool backend's counts since
// the last push, if any.
func (l *loop) pushBackendStats() {
	var deltas []ipc.BackendDelta
	cur := l.srv.BackendCounts()
	next := make(map[backendKey]worker.BackendCount, len(cur))
	for _, c := range cur {
		k := backendKey{c.Route, c.Backend}
		if old, dup := next[k]; dup {
			// Two routes with the same match share the labels.
			c.Connections += old.Connections
			c.Active += old.Active
		}
		next[k] = c
	}
	for k, c := range next {
		p := l.backends.prev[k]
		if d := (ipc.BackendDelta{Route: k.route, Backend: k.backend, Connections: c.Connections - p.Connections, Active: c.Active - p.Active}); d.Connections != 0 || d.Active != 0 {
			deltas = append(deltas, d)
		}
	}
	for len(deltas) > 0 {
		n := min(len(deltas), ipc.MaxBackendEntries)
		if err := l.conn.SendBody(ipc.BackendStats{Deltas: deltas[:n]}); err != nil {
			return // pushed again from the old counts next time
		}
		deltas = deltas[n:]
	}
	l.backends.prev = next
}
