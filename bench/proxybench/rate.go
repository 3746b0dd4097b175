package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// shotFunc is one short connection of a workload, against addr.
type shotFunc func(ctx context.Context, d *net.Dialer, addr string) error

// shortBackend is the backend of a short-connection workload.
type shortBackend interface {
	addr() string
	close() error
	errorCount() int64
	lastError() string
}

// workload is one short-connection workload of the rate modes.
type workload struct {
	// mode is the -mode name: rate, tls or http.
	mode string
	// title describes one connection for the report.
	title string
	// proto is the kind of listener the peers are configured with.
	proto string
	// start starts the backend.
	start func() (shortBackend, error)
	shot  shotFunc
}

// workload returns the short-connection workload of mode (rate, tls or
// http).
func (e *benchEnv) workload(mode string) workload {
	switch mode {
	case "tls":
		return workload{
			mode:  mode,
			title: "connect → full TLS handshake (crypto/tls, ECDSA P-256, no resumption) → 1 byte of application data → close",
			proto: protoTLS,
			start: func() (shortBackend, error) { return startTLSBackend(e.tls.server, 30*time.Second) },
			shot:  tlsShot(e.tls.client),
		}
	case "http":
		return workload{
			mode:  mode,
			title: fmt.Sprintf("connect → %q → %d-byte HTTP response → close", httpRequest, len(httpResponse)),
			proto: protoHTTP,
			start: func() (shortBackend, error) { return startBackend([]byte(httpRequest), modeHTTPReply, 30*time.Second) },
			shot:  httpShot,
		}
	}
	hello := e.hello
	return workload{
		mode:  "rate",
		title: "connect → raw ClientHello → 1-byte reply → close",
		proto: protoTLS,
		start: func() (shortBackend, error) { return startBackend(hello, modeReply, 30*time.Second) },
		shot: func(ctx context.Context, d *net.Dialer, addr string) error {
			return oneShot(ctx, d, addr, hello)
		},
	}
}

// runRate measures short connections of workload wl: -clients loops of
// one connection after another, for -duration or -max-count connections,
// whichever comes first. Targets are interleaved within each round.
func runRate(ctx context.Context, e *benchEnv, wl workload) (*rateReport, error) {
	be, err := wl.start()
	if err != nil {
		return nil, err
	}
	defer be.close()
	defer e.stopAll()

	peers := map[string]*peer{}
	for _, t := range e.opt.targets {
		p, err := e.startPeer(ctx, t, be.addr(), wl.proto)
		if err != nil {
			return nil, err
		}
		peers[t] = p
	}
	if err := sleepCtx(ctx, e.opt.settle); err != nil {
		return nil, err
	}

	rep := &rateReport{Mode: wl.mode, Title: wl.title, Clients: e.opt.clients, Duration: e.opt.duration.String(), MaxCount: e.opt.maxCount, Runs: e.opt.runs}
	runs := map[string][]rateRun{}
	for r := 1; r <= e.opt.runs; r++ {
		for _, t := range e.opt.targets {
			var u0, s0 time.Duration
			if pid := peers[t].pid(); pid != 0 {
				u0, s0 = cpuTime(pid)
			}
			su0, ss0 := procCPU(os.Getpid())
			res, err := measureRate(ctx, peers[t].addr, wl.shot, e.opt.clients, e.opt.duration, e.opt.maxCount)
			if err != nil {
				return nil, fmt.Errorf("%s run %d: %w (backend errors: %d, first: %s)", t, r, err, be.errorCount(), be.lastError())
			}
			// CPU per connection (10 ms ticks), of the proxy's tree and of
			// this process (clients and backend).
			su1, ss1 := procCPU(os.Getpid())
			res.SelfCPUPerConn = ((su1 - su0) + (ss1 - ss0)) / time.Duration(res.OK+res.Failed)
			if pid := peers[t].pid(); pid != 0 {
				u1, s1 := cpuTime(pid)
				res.ProxyCPUPerConn = ((u1 - u0) + (s1 - s0)) / time.Duration(res.OK+res.Failed)
			}
			fmt.Fprintf(e.stderr, "%s run %d %-10s %8.0f conn/s  p50 %v  p99 %v  CPU/conn proxy %v client+backend %v  (%d ok, %d failed%s; load %s; %d in TIME_WAIT)\n",
				wl.mode, r, t, res.PerSec, res.P50.Round(time.Microsecond), res.P99.Round(time.Microsecond),
				res.ProxyCPUPerConn, res.SelfCPUPerConn, res.OK, res.Failed, errSuffix(res.FirstErr), loadAvg(), timeWait())
			runs[t] = append(runs[t], res)
			// Let the last connections close before the next target.
			if err := sleepCtx(ctx, time.Second); err != nil {
				return nil, err
			}
		}
	}
	for _, t := range e.opt.targets {
		var perSec, p50, p99, pcpu, scpu []float64
		var failed int64
		for _, r := range runs[t] {
			perSec = append(perSec, r.PerSec)
			pcpu = append(pcpu, float64(r.ProxyCPUPerConn.Nanoseconds())/1e3)
			scpu = append(scpu, float64(r.SelfCPUPerConn.Nanoseconds())/1e3)
			p50 = append(p50, float64(r.P50.Microseconds()))
			p99 = append(p99, float64(r.P99.Microseconds()))
			failed += r.Failed
		}
		rep.PerSec = append(rep.PerSec, newRow(t, "conn/s", perSec))
		rep.P50 = append(rep.P50, newRow(t, "µs", p50))
		rep.P99 = append(rep.P99, newRow(t, "µs", p99))
		rep.SelfCPU = append(rep.SelfCPU, newRow(t, "CPU µs/conn", scpu))
		if t != "direct" {
			rep.ProxyCPU = append(rep.ProxyCPU, newRow(t, "CPU µs/conn", pcpu))
		}
		rep.Failed = append(rep.Failed, failed)
		rep.RunsRaw = append(rep.RunsRaw, runs[t])
	}
	setRatios(rep.PerSec)
	setRatios(rep.P50)
	setRatios(rep.P99)
	if n := be.errorCount(); n > 0 {
		rep.BackendErrors = fmt.Sprintf("%d, first: %s", n, be.lastError())
	}
	return rep, nil
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return "; first: " + s
}

// rateRun is one rate measurement of one target.
type rateRun struct {
	OK       int64         `json:"ok"`
	Failed   int64         `json:"failed"`
	FirstErr string        `json:"first_error,omitempty"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	PerSec   float64       `json:"conns_per_sec"`
	P50      time.Duration `json:"p50_ns"`
	P99      time.Duration `json:"p99_ns"`
	Max      time.Duration `json:"max_ns"`
	// ProxyCPUPerConn is the CPU (user + system) the proxy's process tree
	// used per connection; SelfCPUPerConn the same for this process.
	ProxyCPUPerConn time.Duration `json:"proxy_cpu_ns_per_conn"`
	SelfCPUPerConn  time.Duration `json:"client_backend_cpu_ns_per_conn"`
}

// measureRate runs the client loops against addr. Each loop stops when
// the duration has passed or the shared count reaches maxCount; every
// connection has a 5-second deadline.
func measureRate(ctx context.Context, addr string, shot shotFunc, clients int, dur time.Duration, maxCount int64) (rateRun, error) {
	var (
		res     rateRun
		issued  atomic.Int64
		failed  atomic.Int64
		errOnce sync.Once
		wg      sync.WaitGroup
	)
	lat := make([][]time.Duration, clients)
	start := time.Now()
	end := start.Add(dur)
	rctx, cancel := context.WithDeadline(ctx, end.Add(10*time.Second))
	defer cancel()
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var d net.Dialer
			for time.Now().Before(end) && issued.Add(1) <= maxCount && rctx.Err() == nil {
				t0 := time.Now()
				err := shot(rctx, &d, addr)
				if err != nil {
					failed.Add(1)
					errOnce.Do(func() { res.FirstErr = err.Error() })
					continue
				}
				lat[i] = append(lat[i], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("interrupted: %w", err)
	}
	res.Elapsed = time.Since(start)
	all := slices.Concat(lat...)
	slices.Sort(all)
	res.OK = int64(len(all))
	res.Failed = failed.Load()
	if res.OK == 0 {
		return res, fmt.Errorf("no connection succeeded (%d failed; first: %s)", res.Failed, res.FirstErr)
	}
	res.PerSec = float64(res.OK) / res.Elapsed.Seconds()
	res.P50 = percentile(all, 0.50)
	res.P99 = percentile(all, 0.99)
	res.Max = all[len(all)-1]
	return res, nil
}

// oneShot is one short connection: dial, hello, read one byte, close.
func oneShot(ctx context.Context, d *net.Dialer, addr string, hello []byte) error {
	one := make([]byte, 1)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(cctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := setConnDeadline(cctx, c); err != nil {
		return err
	}
	if _, err := c.Write(hello); err != nil {
		return fmt.Errorf("write ClientHello: %w", err)
	}
	if _, err := io.ReadFull(c, one); err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	return nil
}

// httpShot is one short connection of the HTTP Host workload: dial, send
// the request, read the whole response, close.
func httpShot(ctx context.Context, d *net.Dialer, addr string) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(cctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := setConnDeadline(cctx, c); err != nil {
		return err
	}
	if _, err := io.WriteString(c, httpRequest); err != nil {
		return fmt.Errorf("write request: %w", err)
	}
	resp := make([]byte, len(httpResponse))
	if _, err := io.ReadFull(c, resp); err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	if string(resp) != httpResponse {
		return fmt.Errorf("unexpected response %q", resp)
	}
	return nil
}

// percentile returns the p-quantile of sorted (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
