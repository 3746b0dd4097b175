package main

import (
	"strings"
	"testing"
)

func TestSummaryJudge(t *testing.T) {
	cases := []struct {
		name      string
		row       summaryRow
		wantBest  string
		wantRatio float64
		wantMet   string
	}{
		{
			name: "higher is better",
			row: summaryRow{Values: map[string]float64{"direct": 9000, "nginx": 4000, "haproxy": 5000, "dlundquist": 3000, "sniproxy": 4800},
				Higher: true, check: ratioAtLeast(0.95)},
			wantBest: "haproxy", wantRatio: 0.96, wantMet: "yes",
		},
		{
			name: "lower is better",
			row: summaryRow{Values: map[string]float64{"nginx": 80, "haproxy": 100, "dlundquist": 90, "sniproxy": 200},
				check: ratioAtMost(1.2)},
			wantBest: "nginx", wantRatio: 2.5, wantMet: "no",
		},
		{
			name: "excluded peer is never best",
			row: summaryRow{Values: map[string]float64{"nginx": 9000, "haproxy": 5000, "dlundquist": 4000, "sniproxy": 5000},
				Higher: true, Exclude: []string{"nginx"}, check: ratioAtLeast(0.95)},
			wantBest: "haproxy", wantRatio: 1, wantMet: "yes",
		},
		{
			name: "non-positive best peer gives no ratio",
			row: summaryRow{Values: map[string]float64{"nginx": -2, "haproxy": 5, "sniproxy": 3},
				check: ratioAtMost(1.2)},
			wantBest: "nginx", wantRatio: 0, wantMet: "",
		},
		{
			name: "absolute goal",
			row: summaryRow{Values: map[string]float64{"haproxy": 3.3, "sniproxy": 3.9},
				check: func(v, _ float64) (bool, bool) { return v <= 4, true }},
			wantBest: "haproxy", wantRatio: 3.9 / 3.3, wantMet: "yes",
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := c.row
			r.judge()
			if r.Best != c.wantBest || r.Met != c.wantMet || !near(r.Ratio, c.wantRatio) {
				t.Errorf("best %q ratio %v met %q, want %q %v %q", r.Best, r.Ratio, r.Met, c.wantBest, c.wantRatio, c.wantMet)
			}
		})
	}
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

func TestSummaryMarkdown(t *testing.T) {
	r := &report{
		Rate: &rateReport{
			PerSec:   []row{newRow("direct", "conn/s", []float64{9000}), newRow("nginx", "conn/s", []float64{4000}), newRow("sniproxy", "conn/s", []float64{3000})},
			ProxyCPU: []row{newRow("nginx", "µs", []float64{80}), newRow("sniproxy", "µs", []float64{100})},
		},
		HTTP: &rateReport{
			PerSec:   []row{newRow("nginx", "conn/s", []float64{7000}), newRow("haproxy", "conn/s", []float64{3500}), newRow("sniproxy", "conn/s", []float64{3500})},
			ProxyCPU: []row{newRow("nginx", "µs", []float64{80}), newRow("haproxy", "µs", []float64{100}), newRow("sniproxy", "µs", []float64{110})},
		},
	}
	md := r.buildSummary([]string{"sniproxy", "direct", "nginx", "haproxy"}).markdown()
	for _, want := range []string{
		"| figure | direct | nginx | haproxy | sniproxy | sniproxy ÷ best peer | goal | met |",
		"| conn/s, raw ClientHello | 9000 | 4000 | — | 3000 | 0.75× (nginx) | ≥ 0.95× best peer | no |",
		"| proxy CPU µs/conn, raw ClientHello | — | 80 | — | 100 | 1.25× (nginx) | ≤ 1.2× best peer | no |",
		"| conn/s, HTTP Host | — | 7000 * | 3500 | 3500 | 1.00× (haproxy) | ≥ 0.95× best peer | yes |",
		"| proxy CPU µs/conn, HTTP Host | — | 80 * | 100 | 110 | 1.10× (haproxy) | ≤ 1.2× best peer | yes |",
		"nginx's stream module cannot read an HTTP Host header",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("summary lacks %q:\n%s", want, md)
		}
	}
}

func TestParseTimeWait(t *testing.T) {
	const stat = "sockets: used 10\nTCP: inuse 2 orphan 0 tw 28232 alloc 2 mem 182\nUDP: inuse 0 mem 0\n"
	if n := parseTimeWait(stat); n != 28232 {
		t.Errorf("parseTimeWait = %d; want 28232", n)
	}
	if n := parseTimeWait("sockets: used 1\n"); n != -1 {
		t.Errorf("parseTimeWait without a TCP line = %d; want -1", n)
	}
}
