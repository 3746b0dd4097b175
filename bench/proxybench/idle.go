package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// idleClientArg makes this program the idle-client helper: a separate
// process holding the client ends of the idle connections, so that this
// process (holding the backend ends) and the helper each need only N fds.
const idleClientArg = "internal-idle-client"

// runIdle measures, for each proxy target and run, the memory and fds a
// fresh proxy process tree adds per idle connection.
func runIdle(ctx context.Context, e *benchEnv) (*idleReport, error) {
	defer e.stopAll()
	helloPath := filepath.Join(e.dir, "clienthello.bin")
	if err := os.WriteFile(helloPath, e.hello, 0o644); err != nil {
		return nil, fmt.Errorf("write hello: %w", err)
	}
	rep := &idleReport{Requested: e.opt.conns, Conns: e.idleN, Note: e.idleNote, Runs: e.opt.runs, Settle: e.opt.settle.String()}
	runs := map[string][]idleRun{}
	for r := 1; r <= e.opt.runs; r++ {
		for _, t := range e.opt.targets {
			if t == "direct" {
				continue
			}
			res, err := measureIdle(ctx, e, t, helloPath)
			if err != nil {
				return nil, fmt.Errorf("%s run %d: %w", t, r, err)
			}
			fmt.Fprintf(e.stderr, "idle run %d %-10s %6.2f KiB/conn  %.3f fds/conn  (%d conns, RSS %d → %d KiB, fds %d → %d, pipes %d; load %s)\n",
				r, t, res.KiBPerConn, res.FDsPerConn, res.Conns, res.Base.RSSKiB, res.Loaded.RSSKiB, res.Base.FDs, res.Loaded.FDs, res.Loaded.Pipes, loadAvg())
			runs[t] = append(runs[t], res)
		}
	}
	for _, t := range e.opt.targets {
		if t == "direct" {
			continue
		}
		rep.Rows = append(rep.Rows, newIdleRow(t, runs[t]))
	}
	return rep, nil
}

// idleRun is one idle measurement of one target.
type idleRun struct {
	// Conns is how many connections the backend accepted through the
	// proxy, which the per-connection figures divide by; Short says how
	// many of those requested did not get through (0 normally).
	Conns      int       `json:"conns"`
	Short      int       `json:"short,omitempty"`
	ShortWhy   string    `json:"short_why,omitempty"`
	Base       treeUsage `json:"baseline"`
	Loaded     treeUsage `json:"loaded"`
	KiBPerConn float64   `json:"rss_kib_per_conn"`
	AnonPerCon float64   `json:"rss_anon_kib_per_conn"`
	FDsPerConn float64   `json:"fds_per_conn"`
	SockPerCon float64   `json:"sockets_per_conn"`
	// Active is sniproxy's own sniproxy_connections_active gauge, read
	// after /proc (sniproxy only; -1 when it could not be read).
	Active float64 `json:"sniproxy_connections_active,omitempty"`
}

// idleBatch is how many connections the helper opens before waiting for
// the backend to have accepted them: far below every listen backlog, so a
// proxy slow to accept under load is not flooded into dropping SYNs.
const idleBatch = 500

// measureIdle starts a fresh backend and peer, reads the baseline, opens
// the idle connections from a helper process in batches, each time waiting
// until the backend has accepted them, settles, and reads the tree again.
func measureIdle(ctx context.Context, e *benchEnv, t, helloPath string) (idleRun, error) {
	var res idleRun
	be, err := startBackend(e.hello, modeHold, e.opt.timeout)
	if err != nil {
		return res, err
	}
	defer be.close()
	p, err := e.startPeer(ctx, t, be.addr(), protoTLS)
	if err != nil {
		return res, err
	}
	defer func() {
		if err := e.stopPeer(p); err != nil {
			fmt.Fprintln(e.stderr, "proxybench:", err)
		}
	}()
	if err := sleepCtx(ctx, e.opt.settle); err != nil {
		return res, err
	}
	if res.Base, err = usage(p.pid()); err != nil {
		return res, fmt.Errorf("baseline: %w", err)
	}

	n := e.idleN
	helper, err := startIdleClient(p.addr, helloPath)
	if err != nil {
		return res, err
	}
	defer helper.stop()
	wctx, cancel := context.WithTimeout(ctx, e.opt.timeout)
	defer cancel()
	var failed int
	for sent := 0; sent < n; {
		k := min(idleBatch, n-sent)
		rep, err := helper.dial(wctx, k)
		if err != nil {
			return res, err
		}
		sent += k
		if rep.Failed > 0 && failed == 0 {
			res.ShortWhy = "client dial: " + rep.FirstErr
		}
		failed += rep.Failed
		if err := be.waitProgress(wctx, int64(sent-failed), 15*time.Second); err != nil {
			return res, fmt.Errorf("%w (backend errors: %s)", err, be.lastError())
		}
	}
	if err := sleepCtx(ctx, e.opt.settle); err != nil {
		return res, err
	}
	if res.Loaded, err = usage(p.pid()); err != nil {
		return res, fmt.Errorf("loaded: %w", err)
	}
	got := int(be.accepted.Load())
	if got == 0 {
		return res, errors.New("no connection reached the backend")
	}
	res.Conns, res.Short = got, n-got
	if res.Short > 0 && res.ShortWhy == "" {
		res.ShortWhy = "the proxy did not pass them on (see its log)"
	}
	if res.Short > n/100 {
		return res, fmt.Errorf("only %d of %d connections reached the backend: %s", got, n, res.ShortWhy)
	}
	res.KiBPerConn = float64(res.Loaded.RSSKiB-res.Base.RSSKiB) / float64(got)
	res.AnonPerCon = float64(res.Loaded.AnonKiB-res.Base.AnonKiB) / float64(got)
	res.FDsPerConn = float64(res.Loaded.FDs-res.Base.FDs) / float64(got)
	res.SockPerCon = float64(res.Loaded.Sockets-res.Base.Sockets) / float64(got)
	if t == "sniproxy" {
		res.Active = sniproxyActive(ctx, p)
	}
	return res, nil
}

// sniproxyActive reads sniproxy_connections_active from the peer's metrics
// endpoint (-1 if unavailable). It runs after /proc is read, so its own
// connection is not counted.
func sniproxyActive(ctx context.Context, p *peer) float64 {
	conf, err := os.ReadFile(filepath.Join(filepath.Dir(p.logPath), "config"))
	if err != nil {
		return -1
	}
	var addr string
	for _, line := range strings.Split(string(conf), "\n") {
		if a, ok := strings.CutPrefix(strings.TrimSpace(line), "address: "); ok {
			addr = strings.Trim(a, `"`)
		}
	}
	if addr == "" {
		return -1
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return -1
	}
	cl := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := cl.Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "sniproxy_connections_active "); ok {
			var f float64
			if _, err := fmt.Sscanf(v, "%g", &f); err == nil {
				return f
			}
		}
	}
	return -1
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// idleClient is the running helper process. The parent writes "dial K"
// lines to its stdin; it answers each with one JSON line (helperReport)
// once those K connections are open and have sent their ClientHello. When
// its stdin closes it closes every connection and exits.
type idleClient struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	exited chan struct{}
}

// helperReport is the helper's answer to one "dial K".
type helperReport struct {
	Dialed   int    `json:"dialed"`
	Failed   int    `json:"failed"`
	FirstErr string `json:"first_error,omitempty"`
}

// startIdleClient starts this program as the idle-client helper.
func startIdleClient(addr, helloPath string) (*idleClient, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("idle client: own executable: %w", err)
	}
	cmd := exec.Command(self, idleClientArg, "-addr", addr, "-hello", helloPath)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("idle client: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("idle client: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("idle client: start: %w", err)
	}
	h := &idleClient{cmd: cmd, stdin: stdin, lines: make(chan string, 16), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		cmd.Wait()
		close(h.exited)
	}()
	return h, nil
}

// dial asks the helper for k more connections and waits for its report.
func (h *idleClient) dial(ctx context.Context, k int) (helperReport, error) {
	var r helperReport
	if _, err := fmt.Fprintf(h.stdin, "dial %d\n", k); err != nil {
		return r, fmt.Errorf("idle client: %w", err)
	}
	select {
	case line := <-h.lines:
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return r, fmt.Errorf("idle client: bad report %q: %w", line, err)
		}
		return r, nil
	case <-h.exited:
		return r, errors.New("idle client: exited before reporting")
	case <-ctx.Done():
		return r, fmt.Errorf("idle client: waiting for its connections: %w", ctx.Err())
	}
}

// stop closes the helper's stdin (it then closes its connections and
// exits) and kills it by PID if it has not exited within a few seconds.
func (h *idleClient) stop() {
	h.stdin.Close()
	select {
	case <-h.exited:
		return
	case <-time.After(10 * time.Second):
	}
	h.cmd.Process.Kill()
	select {
	case <-h.exited:
	case <-time.After(5 * time.Second):
	}
}

// idleClientMain is the helper (see idleClient). It exits after -hold
// whatever happens.
func idleClientMain(args []string) int {
	fs := flag.NewFlagSet(idleClientArg, flag.ContinueOnError)
	addr := fs.String("addr", "", "target address")
	helloPath := fs.String("hello", "", "file holding the ClientHello")
	hold := fs.Duration("hold", 15*time.Minute, "exit after this long whatever happens")
	parallel := fs.Int("parallel", 32, "dials in flight")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	raiseNoFile()
	hello, err := os.ReadFile(*helloPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "idle client:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *hold)
	defer cancel()

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	cmds := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			cmds <- sc.Text()
		}
		close(cmds)
	}()
	for {
		var line string
		var ok bool
		select {
		case line, ok = <-cmds:
		case <-ctx.Done():
		}
		if !ok {
			return 0
		}
		var k int
		if _, err := fmt.Sscanf(line, "dial %d", &k); err != nil {
			fmt.Fprintf(os.Stderr, "idle client: bad command %q\n", line)
			return 2
		}
		opened, rep := dialBatch(ctx, *addr, hello, k, *parallel)
		conns = append(conns, opened...)
		b, _ := json.Marshal(rep)
		fmt.Println(string(b))
	}
}

// dialBatch opens k connections, parallel at a time, each sending the
// ClientHello.
func dialBatch(ctx context.Context, addr string, hello []byte, k, parallel int) ([]net.Conn, helperReport) {
	var (
		mu    sync.Mutex
		conns = make([]net.Conn, 0, k)
		rep   helperReport
		wg    sync.WaitGroup
	)
	jobs := make(chan struct{})
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var d net.Dialer
			for range jobs {
				c, err := dialHello(ctx, &d, addr, hello)
				mu.Lock()
				if err != nil {
					rep.Failed++
					if rep.FirstErr == "" {
						rep.FirstErr = err.Error()
					}
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	for range k {
		jobs <- struct{}{}
	}
	close(jobs)
	wg.Wait()
	rep.Dialed = len(conns)
	return conns, rep
}

// dialHello connects and sends the ClientHello, within 10 seconds.
func dialHello(ctx context.Context, d *net.Dialer, addr string, hello []byte) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	if err := setConnDeadline(dctx, c); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Write(hello); err != nil {
		c.Close()
		return nil, fmt.Errorf("write ClientHello: %w", err)
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		c.Close()
		return nil, fmt.Errorf("clear deadline: %w", err)
	}
	return c, nil
}
