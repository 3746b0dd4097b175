package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"
)

// runPingPong measures the latency a proxy adds to a round trip on an
// established connection: one connection per target and run; after the
// ClientHello the client sends 1 byte and waits for the backend's echo,
// -pingpongs times or until -duration has passed. Targets are interleaved
// within each round.
func runPingPong(ctx context.Context, e *benchEnv) (*pingReport, error) {
	be, err := startBackend(e.hello, modeEcho, e.opt.timeout)
	if err != nil {
		return nil, err
	}
	defer be.close()
	defer e.stopAll()

	peers := map[string]*peer{}
	for _, t := range e.opt.targets {
		p, err := e.startPeer(ctx, t, be.addr(), protoTLS)
		if err != nil {
			return nil, err
		}
		peers[t] = p
	}
	if err := sleepCtx(ctx, e.opt.settle); err != nil {
		return nil, err
	}
	rep := &pingReport{Want: e.opt.pingpongs, Duration: e.opt.duration.String(), Runs: e.opt.runs}
	p50s, p99s, counts := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	for r := 1; r <= e.opt.runs; r++ {
		for _, t := range e.opt.targets {
			mctx, cancel := context.WithTimeout(ctx, e.opt.timeout)
			rtts, err := measurePingPong(mctx, peers[t].addr, e.hello, e.opt.pingpongs, e.opt.duration)
			cancel()
			if err != nil {
				return nil, fmt.Errorf("%s run %d: %w (backend: %s)", t, r, err, be.lastError())
			}
			slices.Sort(rtts)
			p50, p99 := percentile(rtts, 0.50), percentile(rtts, 0.99)
			fmt.Fprintf(e.stderr, "pingpong run %d %-10s %6d round trips  p50 %v  p99 %v  (load %s)\n",
				r, t, len(rtts), p50, p99, loadAvg())
			p50s[t] = append(p50s[t], float64(p50.Nanoseconds())/1e3)
			p99s[t] = append(p99s[t], float64(p99.Nanoseconds())/1e3)
			counts[t] = append(counts[t], float64(len(rtts)))
		}
	}
	for _, t := range e.opt.targets {
		rep.P50 = append(rep.P50, newRow(t, "µs", p50s[t]))
		rep.P99 = append(rep.P99, newRow(t, "µs", p99s[t]))
		rep.Count = append(rep.Count, newRow(t, "round trips", counts[t]))
	}
	setRatios(rep.P50)
	setRatios(rep.P99)
	return rep, nil
}

// measurePingPong dials addr, sends the hello, then times up to n
// one-byte round trips, stopping early after dur.
func measurePingPong(ctx context.Context, addr string, hello []byte, n int, dur time.Duration) ([]time.Duration, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := setConnDeadline(ctx, c); err != nil {
		return nil, err
	}
	if _, err := c.Write(hello); err != nil {
		return nil, fmt.Errorf("write ClientHello: %w", err)
	}
	rtts := make([]time.Duration, 0, n)
	b := []byte{0}
	end := time.Now().Add(dur)
	for i := 0; i < n; i++ {
		b[0] = byte(i)
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return nil, fmt.Errorf("round trip %d: write: %w", i, err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, fmt.Errorf("round trip %d: read: %w", i, err)
		}
		now := time.Now()
		if b[0] != byte(i) {
			return nil, fmt.Errorf("round trip %d: echoed %d, want %d", i, b[0], byte(i))
		}
		rtts = append(rtts, now.Sub(t0))
		if now.After(end) {
			break
		}
	}
	return rtts, nil
}

// pingReport is the pingpong mode's result.
type pingReport struct {
	Want     int    `json:"round_trips_wanted"`
	Duration string `json:"duration_limit"`
	Runs     int    `json:"runs"`
	// P50 and P99 are the round-trip percentiles of each run, µs.
	P50   []row `json:"p50_us"`
	P99   []row `json:"p99_us"`
	Count []row `json:"round_trips"`
}

// added returns target's median p50 and p99 minus direct's, and whether
// both are known.
func (p *pingReport) added(target string) (p50, p99 float64, ok bool) {
	d50, ok1 := rowMedian(p.P50, "direct")
	d99, ok2 := rowMedian(p.P99, "direct")
	t50, ok3 := rowMedian(p.P50, target)
	t99, ok4 := rowMedian(p.P99, target)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return 0, 0, false
	}
	return t50 - d50, t99 - d99, true
}

func (p *pingReport) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n== pingpong: one connection per target and run; after the ClientHello, 1 byte out and its echo back, %d times (or %s) ==\n",
		p.Want, p.Duration)
	rowsTable(&b, "round trip p50, µs:", p.P50, "%.1f")
	rowsTable(&b, "round trip p99, µs:", p.P99, "%.1f")
	fmt.Fprintln(&b, "\nadded by the proxy (target median − direct median), µs:")
	for _, r := range p.P50 {
		if r.Target == "direct" {
			continue
		}
		if a50, a99, ok := p.added(r.Target); ok {
			fmt.Fprintf(&b, "  %-10s p50 %+7.1f   p99 %+7.1f\n", r.Target, a50, a99)
		}
	}
	return b.String()
}
