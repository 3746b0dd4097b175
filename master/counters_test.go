package master

import (
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/status"
)

// Once a successor is attached it gets the succession state first, then
// every change; nothing before the state is sent twice.
func TestCountersSuccessorGetsStateThenDeltas(t *testing.T) {
	var c counters
	c.add(stats.Snapshot{Active: 3, BytesIn: 100})
	c.workerRestarted()
	c.reloaded(status.Reload{Result: "ok", Generation: 2})
	c.reloaded(status.Reload{Result: "failed", Error: "bad config"})
	c.sample(time.Unix(1000, 0))
	mine, theirs := stateSocketPair(t)
	began := time.Unix(2000, 0)
	if err := c.attachSuccessor(mine, 7, 2, began); err != nil {
		t.Fatal(err)
	}
	m := recvState(t, theirs)
	if st := m.State; st == nil || st.Generation != 7 || st.Reserve != 2 || st.Totals.Active != 3 || st.Totals.BytesIn != 100 ||
		st.Restarts != 1 || st.ReloadsOK != 1 || st.ReloadsFailed != 1 {
		t.Fatalf("state %+v", m.State)
	}
	if st := m.State; len(st.Reloads) != 2 || st.Reloads[0].Result != "failed" || len(st.History) != 1 ||
		st.History[0].BytesIn != 100 || !st.ReloadBegan.Equal(began) {
		t.Errorf("state lacks the status history: reloads %+v, history %+v, began %v", st.Reloads, st.History, st.ReloadBegan)
	}
	c.add(stats.Snapshot{BytesOut: 5})
	if m := recvState(t, theirs); m.Delta == nil || m.Delta.BytesOut != 5 {
		t.Errorf("got %+v; want the delta", m)
	}
	c.lost(2) // a worker died with 2 open
	if m := recvState(t, theirs); m.Delta == nil || m.Delta.Active != -2 {
		t.Errorf("got %+v; want active -2", m)
	}
	if s := c.snapshot(); s.Active != 1 || s.BytesOut != 5 {
		t.Errorf("totals %+v", s)
	}
	c.detachSuccessor()
	c.add(stats.Snapshot{BytesOut: 1})
	theirs.conn.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if m, err := theirs.recv(); err == nil {
		t.Errorf("detached successor got %+v", m)
	}
}
