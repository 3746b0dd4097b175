package main

import (
	"fmt"
	"strings"
)

// summaryOrder is the column order of the summary table.
var summaryOrder = []string{"direct", "nginx", "haproxy", "dlundquist", "sniproxy"}

// peerTargets are the proxies sniproxy is compared with.
var peerTargets = []string{"nginx", "haproxy", "dlundquist"}

// summary is the one table of the whole run, in the shape of the README's
// performance table, with sniproxy's ratio to the best peer per row.
type summary struct {
	Columns []string     `json:"columns"`
	Rows    []summaryRow `json:"rows"`
}

// summaryRow is one figure for every target.
type summaryRow struct {
	Name string `json:"name"`
	// Values holds each target's median; a target without the figure is
	// absent (direct has no proxy CPU, for example).
	Values map[string]float64 `json:"values"`
	// Format prints a value.
	Format string `json:"-"`
	// Higher is true when a higher value is better.
	Higher bool `json:"higher_is_better"`
	// Exclude lists peers left out of the best peer of this row.
	Exclude []string `json:"excluded_peers,omitempty"`
	// DirectNote replaces direct's cell when set.
	DirectNote string `json:"direct_note,omitempty"`
	// Best is the best peer, Ratio sniproxy's value divided by its (0 when
	// there is none or it is not positive).
	Best  string  `json:"best_peer,omitempty"`
	Ratio float64 `json:"ratio_to_best_peer,omitempty"`
	// Goal is the target in words; Met whether it holds ("" when
	// it cannot be judged or there is none).
	Goal string `json:"goal,omitempty"`
	Met  string `json:"met,omitempty"`
	// check judges the goal from sniproxy's value and the ratio.
	check func(v, ratio float64) (bool, bool) `json:"-"`
}

// ratioAtMost and ratioAtLeast make the checks of ratio goals.
func ratioAtMost(x float64) func(v, ratio float64) (bool, bool) {
	return func(_, ratio float64) (bool, bool) { return ratio <= x, ratio > 0 }
}

func ratioAtLeast(x float64) func(v, ratio float64) (bool, bool) {
	return func(_, ratio float64) (bool, bool) { return ratio >= x, ratio > 0 }
}

// buildSummary gathers the rows from whatever modes ran.
func (r *report) buildSummary(targets []string) *summary {
	s := &summary{}
	for _, t := range summaryOrder {
		if contains(targets, t) {
			s.Columns = append(s.Columns, t)
		}
	}
	fromRows := func(rows []row) map[string]float64 {
		m := map[string]float64{}
		for _, x := range rows {
			if len(x.Runs) > 0 {
				m[x.Target] = x.Median
			}
		}
		return m
	}
	add := func(sr summaryRow) {
		if len(sr.Values) > 0 {
			s.Rows = append(s.Rows, sr)
		}
	}
	for _, w := range []struct {
		rep     *rateReport
		name    string
		exclude []string
	}{
		{r.Rate, "raw ClientHello", nil},
		{r.TLS, "full TLS handshake", nil},
		{r.HTTP, "HTTP Host", []string{"nginx"}},
	} {
		if w.rep == nil {
			continue
		}
		add(summaryRow{Name: "conn/s, " + w.name, Values: fromRows(w.rep.PerSec), Format: "%.0f", Higher: true,
			Exclude: w.exclude, Goal: "≥ 0.95× best peer", check: ratioAtLeast(0.95)})
		add(summaryRow{Name: "proxy CPU µs/conn, " + w.name, Values: fromRows(w.rep.ProxyCPU), Format: "%.0f",
			Exclude: w.exclude, Goal: "≤ 1.2× best peer", check: ratioAtMost(1.2)})
	}
	if p := r.PingPong; p != nil {
		a50, a99 := map[string]float64{}, map[string]float64{}
		for _, x := range p.P50 {
			if v50, v99, ok := p.added(x.Target); ok && x.Target != "direct" {
				a50[x.Target], a99[x.Target] = v50, v99
			}
		}
		d50, _ := rowMedian(p.P50, "direct")
		d99, _ := rowMedian(p.P99, "direct")
		add(summaryRow{Name: "ping-pong added p50 µs", Values: a50, Format: "%.1f",
			DirectNote: fmt.Sprintf("(RTT %.1f)", d50), Goal: "≤ 1.2× best peer", check: ratioAtMost(1.2)})
		add(summaryRow{Name: "ping-pong added p99 µs", Values: a99, Format: "%.1f",
			DirectNote: fmt.Sprintf("(RTT %.1f)", d99)})
	}
	if t := r.Throughput; t != nil {
		add(summaryRow{Name: "1 stream MB/s, download", Values: fromRows(t.Download), Format: "%.0f", Higher: true,
			Goal: "≥ 1.1× best peer", check: ratioAtLeast(1.1)})
		add(summaryRow{Name: "1 stream MB/s, upload", Values: fromRows(t.Upload), Format: "%.0f", Higher: true,
			Goal: "≥ 1.1× best peer", check: ratioAtLeast(1.1)})
		if t.Streams > 1 {
			add(summaryRow{Name: fmt.Sprintf("%d streams MB/s, download", t.Streams), Values: fromRows(t.Multi), Format: "%.0f", Higher: true,
				Goal: "≥ 1.1× best peer", check: ratioAtLeast(1.1)})
		}
		add(summaryRow{Name: "proxy CPU s/GB, 1 stream download", Values: fromRows(t.DownloadCPU), Format: "%.2f",
			Goal: "≤ 0.6× best peer", check: ratioAtMost(0.6)})
		if t.Streams > 1 {
			add(summaryRow{Name: fmt.Sprintf("proxy CPU s/GB, %d streams download", t.Streams), Values: fromRows(t.MultiCPU), Format: "%.2f",
				Goal: "≤ 0.6× best peer", check: ratioAtMost(0.6)})
		}
	}
	if id := r.Idle; id != nil {
		kib, fds := map[string]float64{}, map[string]float64{}
		for _, x := range id.Rows {
			kib[x.Target], fds[x.Target] = x.KiBPerConn.Median, x.FDsPerConn.Median
		}
		add(summaryRow{Name: "idle KiB/conn", Values: kib, Format: "%.2f", Goal: "≤ 4 KiB",
			check: func(v, _ float64) (bool, bool) { return v <= 4, true }})
		add(summaryRow{Name: "fds/conn (idle)", Values: fds, Format: "%.2f", Goal: "exactly 2",
			check: func(v, _ float64) (bool, bool) { return v > 1.999 && v < 2.001, true }})
	}
	for i := range s.Rows {
		s.Rows[i].judge()
	}
	return s
}

// judge finds the best peer and sniproxy's ratio to it, and checks the
// goal.
func (sr *summaryRow) judge() {
	for _, p := range peerTargets {
		v, ok := sr.Values[p]
		if !ok || contains(sr.Exclude, p) {
			continue
		}
		if b, ok := sr.Values[sr.Best]; sr.Best == "" || !ok || (sr.Higher && v > b) || (!sr.Higher && v < b) {
			sr.Best = p
		}
	}
	v, ok := sr.Values["sniproxy"]
	if !ok {
		return
	}
	if b := sr.Values[sr.Best]; sr.Best != "" && b > 0 && v >= 0 {
		sr.Ratio = v / b
	}
	if sr.check == nil {
		return
	}
	if met, known := sr.check(v, sr.Ratio); known {
		sr.Met = "no"
		if met {
			sr.Met = "yes"
		}
	}
}

// markdown prints the summary as one Markdown table, ready to paste.
func (s *summary) markdown() string {
	var b strings.Builder
	fmt.Fprintln(&b, "\n== summary (medians; paste into README.md) ==")
	fmt.Fprintln(&b)
	fmt.Fprintf(&b, "| figure | %s | sniproxy ÷ best peer | goal | met |\n", strings.Join(s.Columns, " | "))
	fmt.Fprintf(&b, "|---|%s---|---|---|\n", strings.Repeat("---|", len(s.Columns)))
	httpNginx := false
	for _, sr := range s.Rows {
		cells := make([]string, len(s.Columns))
		for i, t := range s.Columns {
			v, ok := sr.Values[t]
			switch {
			case t == "direct" && sr.DirectNote != "":
				cells[i] = sr.DirectNote
			case !ok:
				cells[i] = "—"
			default:
				cells[i] = fmt.Sprintf(sr.Format, v)
			}
			if ok && contains(sr.Exclude, t) {
				cells[i] += " *"
				httpNginx = true
			}
		}
		ratio := "—"
		if sr.Ratio > 0 {
			ratio = fmt.Sprintf("%.2f× (%s)", sr.Ratio, sr.Best)
		}
		goal, met := sr.Goal, sr.Met
		if goal == "" {
			goal = "—"
		}
		if met == "" {
			met = "—"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", sr.Name, strings.Join(cells, " | "), ratio, goal, met)
	}
	if httpNginx {
		fmt.Fprintln(&b, "\n\\* nginx's stream module cannot read an HTTP Host header: its HTTP listener is a plain proxy_pass to the backend "+
			"(no routing at all), so it is left out of the best peer of those rows.")
	}
	fmt.Fprintln(&b, "Best peer: the best of nginx, haproxy and dlundquist for that row; proxy CPU is user + system of the proxy's whole process tree; "+
		"ping-pong added = target median − direct median (direct's cell: its own round trip).")
	return b.String()
}
