package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// runThroughput measures bulk throughput through every target: one
// connection upload, one connection download, then -streams concurrent
// download connections sharing -bytes; -runs rounds. Targets are
// interleaved within each round so that background load hits them alike.
func runThroughput(ctx context.Context, e *benchEnv) (*throughputReport, error) {
	be, err := startBackend(e.hello, modeSink, e.opt.timeout)
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
	time.Sleep(e.opt.settle)

	rep := &throughputReport{Bytes: e.opt.bytes, Runs: e.opt.runs, Streams: e.opt.streams}
	up, down, multi := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	upCPU, downCPU, multiCPU := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	upSys, downSys, multiSys := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	upSelf, downSelf, multiSelf := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	dirs := []string{"upload", "download"}
	if e.opt.streams > 1 {
		dirs = append(dirs, "multi")
	}
	for r := 1; r <= e.opt.runs; r++ {
		for _, t := range e.opt.targets {
			p := peers[t]
			for _, dir := range dirs {
				mctx, cancel := context.WithTimeout(ctx, e.opt.timeout)
				var u0, s0 time.Duration
				if p.pid() != 0 {
					u0, s0 = cpuTime(p.pid())
				}
				su0, ss0 := procCPU(os.Getpid())
				var d time.Duration
				moved := e.opt.bytes
				switch dir {
				case "upload":
					d, err = measureUpload(mctx, p.addr, e.hello, be, e.opt.bytes)
				case "download":
					d, err = measureDownload(mctx, p.addr, e.hello, be, e.opt.bytes)
				default:
					moved = e.opt.bytes / int64(e.opt.streams) * int64(e.opt.streams)
					d, err = measureStreams(mctx, p.addr, e.hello, be, e.opt.bytes/int64(e.opt.streams), e.opt.streams)
				}
				cancel()
				if err != nil {
					return nil, fmt.Errorf("%s %s run %d: %w", t, dir, r, err)
				}
				mbps := float64(moved) / d.Seconds() / 1e6
				// CPU the proxy's tree, and this process (client and
				// backend), spent per GB moved (10 ms ticks).
				gb := float64(moved) / 1e9
				su1, ss1 := procCPU(os.Getpid())
				selfPerGB := ((su1 - su0) + (ss1 - ss0)).Seconds() / gb
				var cpuPerGB, sysShare float64
				if p.pid() != 0 {
					u1, s1 := cpuTime(p.pid())
					used := (u1 - u0) + (s1 - s0)
					cpuPerGB = used.Seconds() / gb
					if used > 0 {
						sysShare = float64(s1-s0) / float64(used)
					}
				}
				label := dir
				switch dir {
				case "upload":
					up[t] = append(up[t], mbps)
					upCPU[t] = append(upCPU[t], cpuPerGB)
					upSys[t] = append(upSys[t], sysShare)
					upSelf[t] = append(upSelf[t], selfPerGB)
				case "download":
					down[t] = append(down[t], mbps)
					downCPU[t] = append(downCPU[t], cpuPerGB)
					downSys[t] = append(downSys[t], sysShare)
					downSelf[t] = append(downSelf[t], selfPerGB)
				default:
					label = fmt.Sprintf("down×%d", e.opt.streams)
					multi[t] = append(multi[t], mbps)
					multiCPU[t] = append(multiCPU[t], cpuPerGB)
					multiSys[t] = append(multiSys[t], sysShare)
					multiSelf[t] = append(multiSelf[t], selfPerGB)
				}
				fmt.Fprintf(e.stderr, "throughput run %d %-10s %-8s %8.1f MB/s (%v; CPU s/GB: proxy %.2f (%.0f%% sys), client+backend %.2f; load %s)\n",
					r, t, label, mbps, d.Round(time.Millisecond), cpuPerGB, 100*sysShare, selfPerGB, loadAvg())
			}
		}
	}
	for _, t := range e.opt.targets {
		rep.Upload = append(rep.Upload, newRow(t, "MB/s", up[t]))
		rep.Download = append(rep.Download, newRow(t, "MB/s", down[t]))
		rep.Multi = append(rep.Multi, newRow(t, "MB/s", multi[t]))
		rep.MultiSelfCPU = append(rep.MultiSelfCPU, newRow(t, "CPU s/GB", multiSelf[t]))
		rep.UploadSelfCPU = append(rep.UploadSelfCPU, newRow(t, "CPU s/GB", upSelf[t]))
		rep.DownloadSelfCPU = append(rep.DownloadSelfCPU, newRow(t, "CPU s/GB", downSelf[t]))
		if t != "direct" {
			rep.UploadCPU = append(rep.UploadCPU, newRow(t, "CPU s/GB", upCPU[t]))
			rep.DownloadCPU = append(rep.DownloadCPU, newRow(t, "CPU s/GB", downCPU[t]))
			rep.UploadSys = append(rep.UploadSys, newRow(t, "sys share", upSys[t]))
			rep.DownloadSys = append(rep.DownloadSys, newRow(t, "sys share", downSys[t]))
			rep.MultiCPU = append(rep.MultiCPU, newRow(t, "CPU s/GB", multiCPU[t]))
			rep.MultiSys = append(rep.MultiSys, newRow(t, "sys share", multiSys[t]))
		}
	}
	setRatios(rep.Upload)
	setRatios(rep.Download)
	setRatios(rep.Multi)
	return rep, nil
}

// setConnDeadline applies ctx's deadline to c.
func setConnDeadline(ctx context.Context, c net.Conn) error {
	if dl, ok := ctx.Deadline(); ok {
		if err := c.SetDeadline(dl); err != nil {
			return fmt.Errorf("set deadline: %w", err)
		}
	}
	return nil
}

// measureUpload connects to addr, sends the hello and n bytes, and returns
// the time from starting to dial until the backend has received them all.
func measureUpload(ctx context.Context, addr string, hello []byte, be *backend, n int64) (time.Duration, error) {
	be.prepare(modeSink, n)
	t0 := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := setConnDeadline(ctx, c); err != nil {
		return 0, err
	}
	if _, err := c.Write(hello); err != nil {
		return 0, fmt.Errorf("write ClientHello: %w", err)
	}
	buf := make([]byte, chunk)
	for left := n; left > 0; {
		m, err := c.Write(buf[:min(int64(len(buf)), left)])
		left -= int64(m)
		if err != nil {
			return 0, fmt.Errorf("write: %d bytes left: %w", left, err)
		}
	}
	r, err := be.result(ctx)
	if err != nil {
		return 0, err
	}
	return r.at.Sub(t0), nil
}

// measureDownload connects to addr, sends the hello, and returns the time
// from starting to dial until it has received n bytes from the backend.
func measureDownload(ctx context.Context, addr string, hello []byte, be *backend, n int64) (time.Duration, error) {
	be.prepare(modeSource, n)
	t0 := time.Now()
	if err := downloadOne(ctx, addr, hello, be, n); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// downloadOne connects to addr, sends the hello and reads n bytes.
func downloadOne(ctx context.Context, addr string, hello []byte, be *backend, n int64) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := setConnDeadline(ctx, c); err != nil {
		return err
	}
	if _, err := c.Write(hello); err != nil {
		return fmt.Errorf("write ClientHello: %w", err)
	}
	buf := make([]byte, chunk)
	var got int64
	for got < n {
		m, err := c.Read(buf)
		got += int64(m)
		if err == io.EOF && got < n {
			return fmt.Errorf("read: EOF after %d of %d bytes (backend: %s)", got, n, be.lastError())
		}
		if err != nil && got < n {
			return fmt.Errorf("read: %d of %d bytes: %w (backend: %s)", got, n, err, be.lastError())
		}
	}
	return nil
}

// measureStreams opens n connections to addr at once, each sending the
// hello and receiving per bytes from the backend, and returns the time
// from starting to dial until the last byte of the last stream arrived.
func measureStreams(ctx context.Context, addr string, hello []byte, be *backend, per int64, n int) (time.Duration, error) {
	be.prepare(modeSource, per)
	t0 := time.Now()
	errs := make(chan error, n)
	for range n {
		go func() {
			errs <- downloadOne(ctx, addr, hello, be, per)
		}()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return 0, first
	}
	return time.Since(t0), nil
}
