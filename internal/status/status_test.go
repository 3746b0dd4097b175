package status

import (
	"fmt"
	"math"
	"testing"
	"time"
)

func sampleAt(t0 time.Time, sec int, conns uint64) Sample {
	return Sample{
		Time:        t0.Add(time.Duration(sec) * time.Second),
		Connections: conns,
		Protocols:   map[string]uint64{"tls": conns},
		Rejected:    map[string]uint64{"limit": conns / 10},
		BytesIn:     conns * 100,
	}
}

func TestHistoryRing(t *testing.T) {
	var h History
	t0 := time.Unix(1000, 0)
	for i := range HistoryLength + 7 {
		h.Add(sampleAt(t0, 5*i, uint64(i)))
	}
	ss := h.Samples()
	if len(ss) != HistoryLength {
		t.Fatalf("got %d samples; want %d", len(ss), HistoryLength)
	}
	for i, s := range ss {
		if want := uint64(i + 7); s.Connections != want {
			t.Fatalf("sample %d: got %d; want %d (oldest first)", i, s.Connections, want)
		}
	}
}

func TestRates(t *testing.T) {
	var h History
	t0 := time.Unix(1000, 0)
	// 10 connections a second for 5 minutes, sampled every 5 s.
	for i := range 61 {
		h.Add(sampleAt(t0, 5*i, uint64(50*i)))
	}
	now := sampleAt(t0, 5*61, 50*61)
	r := h.Rates(now, time.Minute)
	if r.WindowSeconds != 60 {
		t.Errorf("window: got %v; want 60", r.WindowSeconds)
	}
	for name, got := range map[string]float64{"connections": r.Connections, "tls": r.Protocols["tls"], "bytes_in": r.BytesIn / 100} {
		if math.Abs(got-10) > 1e-9 {
			t.Errorf("%s rate: got %v; want 10", name, got)
		}
	}
	if got := r.Rejected["limit"]; math.Abs(got-1) > 0.1 {
		t.Errorf("limit rate: got %v; want about 1", got)
	}
}

func TestRatesEarlyAndBackwards(t *testing.T) {
	var h History
	t0 := time.Unix(1000, 0)
	if r := h.Rates(sampleAt(t0, 0, 5), time.Minute); r.WindowSeconds != 0 || r.Connections != 0 {
		t.Errorf("no history: got %+v; want zero rates", r)
	}
	h.Add(sampleAt(t0, 0, 100))
	r := h.Rates(sampleAt(t0, 2, 80), time.Minute)
	if r.Connections != 0 || r.WindowSeconds != 2 {
		t.Errorf("counter went backwards: got %v over %v; want 0 over 2", r.Connections, r.WindowSeconds)
	}
	if _, ok := r.Protocols["tls"]; !ok {
		t.Error("rates lack a protocol the totals have")
	}
}

func TestAddReload(t *testing.T) {
	var rs []Reload
	for i := range MaxReloads + 3 {
		rs = AddReload(rs, Reload{Generation: i})
	}
	if len(rs) != MaxReloads {
		t.Fatalf("got %d reloads; want %d", len(rs), MaxReloads)
	}
	for i, r := range rs {
		if want := MaxReloads + 2 - i; r.Generation != want {
			t.Errorf("reload %d: got generation %d; want %d (newest first)", i, r.Generation, want)
		}
	}
}

func TestSampleOfCopiesMaps(t *testing.T) {
	tot := Totals{Protocols: map[string]uint64{"tls": 1}, Rejected: map[string]uint64{"limit": 2}}
	s := SampleOf(tot, time.Now())
	tot.Protocols["tls"] = 9
	tot.Rejected["limit"] = 9
	if s.Protocols["tls"] != 1 || s.Rejected["limit"] != 2 {
		t.Errorf("sample shares the totals' maps: %v", fmt.Sprint(s))
	}
}
