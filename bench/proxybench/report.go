package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// report is everything one invocation measured; it is also the JSON
// written by -json.
type report struct {
	Started    time.Time         `json:"started"`
	Finished   time.Time         `json:"finished"`
	Host       hostInfo          `json:"host"`
	HelloBytes int               `json:"client_hello_bytes"`
	SNI        string            `json:"sni"`
	Targets    []targetConfig    `json:"targets"`
	Throughput *throughputReport `json:"throughput,omitempty"`
	Idle       *idleReport       `json:"idle,omitempty"`
	Rate       *rateReport       `json:"rate,omitempty"`
	TLS        *rateReport       `json:"tls,omitempty"`
	HTTP       *rateReport       `json:"http,omitempty"`
	PingPong   *pingReport       `json:"pingpong,omitempty"`
	Summary    *summary          `json:"summary,omitempty"`
	runs       int
}

// hostInfo describes the machine and its load.
type hostInfo struct {
	CPUs      int    `json:"cpus"`
	Kernel    string `json:"kernel"`
	Go        string `json:"go"`
	LoadStart string `json:"loadavg_start"`
	LoadEnd   string `json:"loadavg_end"`
	Sched     string `json:"scheduling"`
	FDLimit   uint64 `json:"rlimit_nofile"`
}

// targetConfig says what a target is and how it was configured.
type targetConfig struct {
	Target  string `json:"target"`
	Version string `json:"version"`
	Config  string `json:"config"`
	// HTTPConfig is the listener of the HTTP Host workload.
	HTTPConfig string `json:"http_config"`
}

// row is one figure for one target over the runs.
type row struct {
	Target string    `json:"target"`
	Unit   string    `json:"unit"`
	Runs   []float64 `json:"runs"`
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	// Spread is (max-min)/median: how noisy the runs were.
	Spread float64 `json:"spread"`
	// Ratio is median / direct's median (0 when there is no direct row).
	Ratio float64 `json:"ratio_to_direct,omitempty"`
}

func newRow(target, unit string, runs []float64) row {
	r := row{Target: target, Unit: unit, Runs: runs}
	if len(runs) == 0 {
		return r
	}
	s := slices.Clone(runs)
	slices.Sort(s)
	r.Min, r.Max, r.Median = s[0], s[len(s)-1], median(s)
	if r.Median != 0 {
		r.Spread = (r.Max - r.Min) / r.Median
	}
	return r
}

// median of a sorted slice.
func median(s []float64) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// rowMedian returns the median of target's row in rows.
func rowMedian(rows []row, target string) (float64, bool) {
	for _, r := range rows {
		if r.Target == target && len(r.Runs) > 0 {
			return r.Median, true
		}
	}
	return 0, false
}

// setRatios fills Ratio of each row relative to the "direct" row.
func setRatios(rows []row) {
	var direct float64
	for _, r := range rows {
		if r.Target == "direct" {
			direct = r.Median
		}
	}
	if direct == 0 {
		return
	}
	for i := range rows {
		rows[i].Ratio = rows[i].Median / direct
	}
}

func newReport(e *benchEnv) *report {
	osr, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	r := &report{
		Started: time.Now(),
		Host: hostInfo{
			CPUs:      runtime.NumCPU(),
			Kernel:    strings.TrimSpace(string(osr)),
			Go:        runtime.Version(),
			LoadStart: loadAvg(),
			Sched:     schedInfo(),
			FDLimit:   e.limit,
		},
		HelloBytes: len(e.hello),
		SNI:        sniName,
		runs:       e.opt.runs,
	}
	for _, t := range e.opt.targets {
		desc, hdesc := "client connects straight to the backend", "client connects straight to the backend"
		if t != "direct" {
			_, _, desc = e.peerConfig(t, "DIR", "127.0.0.1:PORT", "127.0.0.1:BACKEND", protoTLS)
			_, _, hdesc = e.peerConfig(t, "DIR", "127.0.0.1:PORT", "127.0.0.1:BACKEND", protoHTTP)
		}
		r.Targets = append(r.Targets, targetConfig{Target: t, Version: e.versions[t], Config: desc, HTTPConfig: hdesc})
	}
	return r
}

func (r *report) finish() {
	r.Finished = time.Now()
	r.Host.LoadEnd = loadAvg()
}

// header describes the setup.
func (r *report) header() string {
	var b strings.Builder
	fmt.Fprintf(&b, "proxybench %s — %d CPUs, Linux %s, %s, load average %s, RLIMIT_NOFILE %d, %s (inherited by the peers)\n",
		r.Started.Format(time.RFC3339), r.Host.CPUs, r.Host.Kernel, r.Host.Go, r.Host.LoadStart, r.Host.FDLimit, r.Host.Sched)
	fmt.Fprintf(&b, "every client sends a %d-byte TLS ClientHello (crypto/tls, SNI %s); the backend is plain TCP on 127.0.0.1\n",
		r.HelloBytes, r.SNI)
	fmt.Fprintf(&b, "figures are the median of %d runs; spread = (max-min)/median\n\n", r.runs)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tversion\tconfiguration")
	for _, t := range r.Targets {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", t.Target, t.Version, t.Config)
	}
	tw.Flush()
	fmt.Fprintln(&b, "\nHTTP Host workload (mode http), listener per target:")
	for _, t := range r.Targets {
		fmt.Fprintf(&b, "  %-10s %s\n", t.Target, t.HTTPConfig)
	}
	return b.String()
}

// rowsTable prints one figure's rows.
func rowsTable(b *strings.Builder, title string, rows []row, format string) {
	fmt.Fprintf(b, "\n%s\n", title)
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tmedian\tmin\tmax\tspread\t× direct\truns\t")
	for _, r := range rows {
		runs := make([]string, len(r.Runs))
		for i, v := range r.Runs {
			runs[i] = fmt.Sprintf(format, v)
		}
		ratio := "—"
		if r.Ratio != 0 {
			ratio = fmt.Sprintf("%.2f", r.Ratio)
		}
		fmt.Fprintf(tw, "%s\t"+format+"\t"+format+"\t"+format+"\t%.0f%%\t%s\t%s\t\n",
			r.Target, r.Median, r.Min, r.Max, 100*r.Spread, ratio, strings.Join(runs, " "))
	}
	tw.Flush()
}

// throughputReport is the throughput mode's result.
type throughputReport struct {
	Bytes    int64 `json:"bytes"`
	Runs     int   `json:"runs"`
	Streams  int   `json:"streams"`
	Upload   []row `json:"upload"`
	Download []row `json:"download"`
	// Multi is the download over Streams concurrent connections sharing
	// Bytes, with the same CPU figures as the single streams.
	Multi        []row `json:"multi_download"`
	MultiCPU     []row `json:"multi_download_proxy_cpu_s_per_gb"`
	MultiSys     []row `json:"multi_download_proxy_sys_share"`
	MultiSelfCPU []row `json:"multi_download_client_backend_cpu_s_per_gb"`
	// UploadCPU and DownloadCPU are the CPU seconds (user + system) the
	// proxy's process tree used per 10^9 bytes moved; the Sys rows the
	// share of it spent in the kernel.
	UploadCPU   []row `json:"upload_proxy_cpu_s_per_gb"`
	DownloadCPU []row `json:"download_proxy_cpu_s_per_gb"`
	UploadSys   []row `json:"upload_proxy_sys_share"`
	DownloadSys []row `json:"download_proxy_sys_share"`
	// UploadSelfCPU and DownloadSelfCPU are the same for this program's
	// process (the client and the backend), for every target.
	UploadSelfCPU   []row `json:"upload_client_backend_cpu_s_per_gb"`
	DownloadSelfCPU []row `json:"download_client_backend_cpu_s_per_gb"`
}

func (t *throughputReport) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n== throughput: one connection, %s per run and direction, MB/s (10^6 bytes/s), clock from dial to the last byte ==\n", sizeString(t.Bytes))
	rowsTable(&b, "upload (client → backend):", t.Upload, "%.0f")
	rowsTable(&b, "download (backend → client):", t.Download, "%.0f")
	if t.Streams > 1 {
		rowsTable(&b, fmt.Sprintf("download over %d concurrent connections sharing %s (clock from the first dial to the last byte):",
			t.Streams, sizeString(t.Bytes)), t.Multi, "%.0f")
	}
	fmt.Fprintln(&b, "\nCPU per GB moved, medians (user + system seconds, 10 ms ticks): the proxy's process tree (sys = kernel share),\n"+
		"and this program's process, i.e. the client and the backend together:")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "target\tproxy up s/GB\tsys\tproxy down s/GB\tsys\tproxy down×%d s/GB\tsys\tclient+backend up s/GB\tdown s/GB\tdown×%d s/GB\t\n",
		t.Streams, t.Streams)
	for _, r := range t.UploadSelfCPU {
		proxy := "—\t—\t—\t—\t—\t—"
		for i, c := range t.UploadCPU {
			if c.Target == r.Target {
				multi := "—\t—"
				if t.Streams > 1 {
					multi = fmt.Sprintf("%.2f\t%.0f%%", t.MultiCPU[i].Median, 100*t.MultiSys[i].Median)
				}
				proxy = fmt.Sprintf("%.2f\t%.0f%%\t%.2f\t%.0f%%\t%s", c.Median, 100*t.UploadSys[i].Median,
					t.DownloadCPU[i].Median, 100*t.DownloadSys[i].Median, multi)
			}
		}
		down, _ := rowMedian(t.DownloadSelfCPU, r.Target)
		multi := "—"
		if m, ok := rowMedian(t.MultiSelfCPU, r.Target); ok {
			multi = fmt.Sprintf("%.2f", m)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.2f\t%s\t\n", r.Target, proxy, r.Median, down, multi)
	}
	tw.Flush()
	return b.String()
}

func sizeString(n int64) string {
	switch {
	case n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// idleReport is the idle mode's result.
type idleReport struct {
	Requested int       `json:"requested_conns"`
	Conns     int       `json:"conns"`
	Note      string    `json:"note"`
	Runs      int       `json:"runs"`
	Settle    string    `json:"settle"`
	Rows      []idleRow `json:"targets"`
}

// idleRow is one target's idle figures over the runs.
type idleRow struct {
	Target         string    `json:"target"`
	KiBPerConn     row       `json:"rss_kib_per_conn"`
	AnonPerConn    row       `json:"rss_anon_kib_per_conn"`
	FDsPerConn     row       `json:"fds_per_conn"`
	SocketsPerConn row       `json:"sockets_per_conn"`
	Runs           []idleRun `json:"runs"`
}

func newIdleRow(t string, runs []idleRun) idleRow {
	var kib, anon, fds, socks []float64
	for _, r := range runs {
		kib = append(kib, r.KiBPerConn)
		anon = append(anon, r.AnonPerCon)
		fds = append(fds, r.FDsPerConn)
		socks = append(socks, r.SockPerCon)
	}
	return idleRow{
		Target:         t,
		KiBPerConn:     newRow(t, "KiB", kib),
		AnonPerConn:    newRow(t, "KiB", anon),
		FDsPerConn:     newRow(t, "fds", fds),
		SocketsPerConn: newRow(t, "sockets", socks),
		Runs:           runs,
	}
}

// medianRun is the run whose KiB/conn is the median (the lower middle one
// for an even count), for the absolute figures shown beside it.
func (r idleRow) medianRun() idleRun {
	s := slices.Clone(r.Runs)
	slices.SortFunc(s, func(a, b idleRun) int {
		switch {
		case a.KiBPerConn < b.KiBPerConn:
			return -1
		case a.KiBPerConn > b.KiBPerConn:
			return 1
		}
		return 0
	})
	return s[(len(s)-1)/2]
}

func (t *idleReport) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n== idle: %d connections held open through the proxy (requested %d), settle %s ==\n", t.Conns, t.Requested, t.Settle)
	fmt.Fprintf(&b, "%s\n", t.Note)
	fmt.Fprintf(&b, "RSS = VmRSS summed over the proxy's process tree; per connection = (RSS with N idle − RSS listening with none) / N;\n"+
		"anon = the same for RssAnon (heap and stacks, without mapped code); fds and pipes are counted over the tree\n\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tKiB/conn\tmin\tmax\tspread\tanon KiB/conn\tfds/conn\tsockets/conn\tprocs\tRSS idle→loaded (KiB)\tfds idle→loaded\tpipes\tother fds (loaded)\t")
	for _, r := range t.Rows {
		m := r.medianRun()
		fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%.2f\t%.0f%%\t%.2f\t%.3f\t%.3f\t%d\t%d → %d\t%d → %d\t%d → %d\t%d\t\n",
			r.Target, r.KiBPerConn.Median, r.KiBPerConn.Min, r.KiBPerConn.Max, 100*r.KiBPerConn.Spread,
			r.AnonPerConn.Median, r.FDsPerConn.Median, r.SocketsPerConn.Median, m.Loaded.Procs,
			m.Base.RSSKiB, m.Loaded.RSSKiB, m.Base.FDs, m.Loaded.FDs, m.Base.Pipes, m.Loaded.Pipes, m.Loaded.Other)
	}
	tw.Flush()
	for _, r := range t.Rows {
		for i, run := range r.Runs {
			if run.Short > 0 {
				fmt.Fprintf(&b, "note: %s run %d: %d of %d connections did not reach the backend (%s); figures divide by %d\n",
					r.Target, i+1, run.Short, run.Short+run.Conns, run.ShortWhy, run.Conns)
			}
		}
	}
	fmt.Fprintln(&b, "\nnon-socket, non-pipe fds of the median run (loaded):")
	for _, r := range t.Rows {
		m := r.medianRun()
		fmt.Fprintf(&b, "  %-10s %s\n", r.Target, sortedKinds(m.Loaded.OtherKinds))
	}
	for _, r := range t.Rows {
		if r.Target != "sniproxy" {
			continue
		}
		maxPipes, addedPipes := 0, 0
		var active []string
		for _, run := range r.Runs {
			maxPipes = max(maxPipes, run.Loaded.Pipes)
			addedPipes = max(addedPipes, run.Loaded.Pipes-run.Base.Pipes)
			active = append(active, fmt.Sprintf("%.0f", run.Active))
		}
		verdict := fmt.Sprintf("met: %d pipes open, none added; only the client and backend sockets", maxPipes)
		if maxPipes > 0 || addedPipes > 0 || r.FDsPerConn.Max > 2.001 || r.SocketsPerConn.Min < 1.999 {
			verdict = fmt.Sprintf("NOT MET: %d pipes open (%d added), up to %.3f fds/conn", maxPipes, addedPipes, r.FDsPerConn.Max)
		}
		fmt.Fprintf(&b, "\nsniproxy: expected 2 fds per idle connection and no pipes — %s; sniproxy_connections_active per run: %s\n",
			verdict, strings.Join(active, ", "))
	}
	return b.String()
}

// rateReport is the rate mode's result.
type rateReport struct {
	// Mode is rate (raw ClientHello), tls (full handshake) or http (HTTP
	// Host); Title describes one connection.
	Mode     string `json:"mode"`
	Title    string `json:"workload"`
	Clients  int    `json:"clients"`
	Duration string `json:"duration"`
	MaxCount int64  `json:"max_count"`
	Runs     int    `json:"runs"`
	PerSec   []row  `json:"conns_per_sec"`
	P50      []row  `json:"p50_us"`
	P99      []row  `json:"p99_us"`
	// ProxyCPU is the CPU µs the proxy's tree used per connection; SelfCPU
	// the same for this program (clients and backend).
	ProxyCPU      []row       `json:"proxy_cpu_us_per_conn"`
	SelfCPU       []row       `json:"client_backend_cpu_us_per_conn"`
	Failed        []int64     `json:"failed"`
	RunsRaw       [][]rateRun `json:"runs_raw"`
	BackendErrors string      `json:"backend_errors,omitempty"`
}

func (t *rateReport) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n== %s: %d client loops of %s, %s per run ==\n", t.Mode, t.Clients, t.Title, t.Duration)
	rowsTable(&b, "connections per second:", t.PerSec, "%.0f")
	rowsTable(&b, "p50 latency, µs (connect to reply):", t.P50, "%.0f")
	rowsTable(&b, "p99 latency, µs:", t.P99, "%.0f")
	rowsTable(&b, "proxy CPU per connection, µs (user + system of its process tree, 10 ms ticks):", t.ProxyCPU, "%.1f")
	rowsTable(&b, "client + backend CPU per connection, µs (this program):", t.SelfCPU, "%.1f")
	var failed []string
	for i, r := range t.PerSec {
		if t.Failed[i] > 0 {
			failed = append(failed, fmt.Sprintf("%s %d", r.Target, t.Failed[i]))
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(&b, "failed connections (all runs): %s\n", strings.Join(failed, ", "))
	}
	if t.BackendErrors != "" {
		fmt.Fprintf(&b, "backend errors: %s\n", t.BackendErrors)
	}
	return b.String()
}

// writeJSON writes the report to path.
func (r *report) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("json: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
