package worker

import (
	"testing"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/health"
)

// TestDialRuns: outcomes of one key merge into runs in order; keys stay
// apart; a take empties the collector; a flapping key keeps its newest
// runs only.
func TestDialRuns(t *testing.T) {
	var d dialRuns
	d.add("a", true, "")
	d.add("a", true, "")
	d.add("b", false, "timeout")
	d.add("a", false, "connection refused")
	d.add("a", false, "connection refused")
	d.add("a", false, "timeout")
	got := d.take()
	want := []DialRun{
		{Key: "a", OK: true, Count: 2},
		{Key: "a", Count: 2, Reason: "connection refused"},
		{Key: "a", Count: 1, Reason: "timeout"},
		{Key: "b", Count: 1, Reason: "timeout"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v; want %+v", got, want)
	}
	for i := range want {
		g := got[i]
		if g.Last.IsZero() {
			t.Errorf("run %d has no time", i)
		}
		g.Last = want[i].Last
		if g != want[i] {
			t.Errorf("run %d: got %+v; want %+v", i, g, want[i])
		}
	}
	if rest := d.take(); len(rest) != 0 {
		t.Errorf("second take: %+v; want nothing", rest)
	}
	for i := range 3 * maxRunsPerKey {
		d.add("c", i%2 == 0, "")
	}
	got = d.take()
	if len(got) != maxRunsPerKey || got[len(got)-1].OK {
		t.Errorf("flapping key: %d runs, last OK %v; want %d, the newest (a failure) last", len(got), got[len(got)-1].OK, maxRunsPerKey)
	}
}

// TestServerPools: a server's pools follow the health table pushed to
// it, by health key, and count per backend.
func TestServerPools(t *testing.T) {
	cfg, err := config.Parse([]byte(`listen_addrs: ["127.0.0.1:1"]
routes:
  - {match: a.test, backends: ["127.0.0.1:7001", {address: "127.0.0.1:7002", backup: true}]}
  - {match: b.test, backend: "127.0.0.1:7003"}
  - {match: c.test, backend: "127.0.0.1:7004", health_check: {type: tcp}}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, pools, err := newRoutes(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if pools[0] == nil || pools[1] != nil || pools[2] == nil {
		t.Fatalf("pools %v; want routes 0 and 2 (a pool, a checked backend)", pools)
	}
	s := &Server{pools: pools}
	var tb health.Table
	key := cfg.Routes[0].HealthKey("127.0.0.1:7001")
	for range 3 {
		tb.Observe(key, health.Result{Source: health.Dial, Err: "timeout"}, health.Thresholds{Rise: 2, Fall: 3})
	}
	s.SetHealth(&tb)
	if pools[0].Up(0) || !pools[0].Up(1) || !pools[2].Up(0) {
		t.Errorf("after the table: up %v %v %v; want false true true", pools[0].Up(0), pools[0].Up(1), pools[2].Up(0))
	}
	counts := s.BackendCounts()
	if len(counts) != 3 || counts[0].Route != "a.test" || counts[0].Backend != "127.0.0.1:7001" || counts[2].Backend != "127.0.0.1:7004" {
		t.Errorf("counts %+v", counts)
	}
}
