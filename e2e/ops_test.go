package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// opsConfig is a proxy with an echo route and no control_socket: the
// default applies.
const opsConfig = `
listen_addrs: ["LISTEN"]
metrics: {enabled: true, address: "METRICS"}
shutdown_timeout: 5
log: {level: info, format: json}
workers: 2
allowlist: ["localhost"]
routes: [{match: "echo.test", backend: "ECHO"}]
`

// runEnv runs the binary with exactly env (no inherited environment but
// PATH) and returns stdout, stderr and the exit code.
func runEnv(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestStatusFindsTheDefaultSocket: with no control_socket in the config,
// `status` finds the master from a shell with the unit's environment
// ($RUNTIME_DIRECTORY, as systemd's RuntimeDirectory= sets it) and from a
// clean one (then the temp dir, since /run/sniproxy does not exist here).
func TestStatusFindsTheDefaultSocket(t *testing.T) {
	cfg := strings.ReplaceAll(opsConfig, "ECHO", echoBackend(t))
	t.Run("unit environment", func(t *testing.T) {
		rt := t.TempDir()
		p := startProxyEnv(t, cfg, "RUNTIME_DIRECTORY="+rt)
		if _, err := os.Stat(filepath.Join(rt, "sniproxy.sock")); err != nil {
			t.Fatalf("no socket in $RUNTIME_DIRECTORY: %v", err)
		}
		out, errs, code := runEnv(t, []string{"RUNTIME_DIRECTORY=" + rt}, "status", "-c", p.cfgPath)
		if code != 0 || !strings.Contains(out, fmt.Sprintf("master pid %d", p.cmd.Process.Pid)) {
			t.Errorf("status with the unit's environment: exit %d\n%s%s", code, out, errs)
		}
	})
	t.Run("clean shell", func(t *testing.T) {
		if _, err := os.Stat("/run/sniproxy"); err == nil {
			t.Fatal("/run/sniproxy exists on this machine (an installed sniproxy?): the default this test checks would be shared with it; remove the directory to run it")
		}
		tmp := t.TempDir()
		p := startProxyEnv(t, cfg, "RUNTIME_DIRECTORY=", "TMPDIR="+tmp)
		out, errs, code := runEnv(t, []string{"TMPDIR=" + tmp}, "status", "-c", p.cfgPath)
		if code != 0 || !strings.Contains(out, fmt.Sprintf("master pid %d", p.cmd.Process.Pid)) {
			t.Errorf("status from a clean shell: exit %d\n%s%s", code, out, errs)
		}
	})
}

// TestStatusWithBrokenConfig: the config on disk no longer validates;
// status says so and still shows the master.
func TestStatusWithBrokenConfig(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	b, err := os.ReadFile(p.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	broken := string(b) + "\nmax_connections: lots\nfrobnicate: yes\n"
	if err := os.WriteFile(p.cfgPath, []byte(broken), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errs, code := runSplit(t, nil, "status", "-c", p.cfgPath)
	if code != 0 || !strings.Contains(out, "generation 1") || !strings.Contains(out, "SLOT") {
		t.Errorf("status with a broken config: exit %d\n%s", code, out)
	}
	if !strings.Contains(errs, "invalid") || !strings.Contains(errs, "frobnicate: unknown key") {
		t.Errorf("status does not say the config is invalid:\n%s", errs)
	}
}

// TestPIDFile: the PID file names the master, then its successor after a
// reload, and is gone after a stop; reload --pid-file never signals a
// process that is not a sniproxy master.
func TestPIDFile(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"pid_file: PIDFILE\n")
	waitFor(t, "the PID file", func() bool { return p.pid() == p.cmd.Process.Pid })
	pid, _ := p.reload(t)
	if got := p.pid(); got != pid {
		t.Fatalf("PID file says %d after the reload; new master %d", got, pid)
	}
	waitGone(t, p.cmd.Process.Pid, "the old master")
	if _, err := os.Stat(p.pidFile); err != nil {
		t.Fatalf("the PID file is gone after a reload: %v", err)
	}
	syscall.Kill(pid, syscall.SIGTERM)
	waitGone(t, pid, "the master")
	if _, err := os.Stat(p.pidFile); !os.IsNotExist(err) {
		t.Errorf("PID file still there after the stop: %v", err)
	}

	// A stale PID file naming another process: reload refuses to signal it.
	sleeper := exec.Command("sleep", "30")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	stale := filepath.Join(t.TempDir(), "stale.pid")
	os.WriteFile(stale, []byte(strconv.Itoa(sleeper.Process.Pid)+"\n"), 0o600)
	out, code := run(t, nil, "reload", "-c", p.cfgPath, "--pid-file", stale)
	if code != 1 || !strings.Contains(out, "is not sniproxy") {
		t.Errorf("reload with a stale PID file: exit %d\n%s", code, out)
	}
	if !alive(sleeper.Process.Pid) {
		t.Errorf("reload signalled process %d, which is not sniproxy", sleeper.Process.Pid)
	}
}

// lines returns the JSON records of the file whose msg is msg.
func (f logFile) lines(msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(f.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// withLog returns cfg (baseConfig's log line in it) with log: section.
func withLog(cfg, section string) string {
	const line = "log: {level: info, format: json}\n"
	if !strings.Contains(cfg, line) {
		panic("withLog: no log line in the config")
	}
	return strings.Replace(cfg, line, "log: "+section+"\n", 1)
}

// TestLogReopen: with log.file and log.access_file, SIGUSR1 after a rename
// (what logrotate does) makes the master and the workers write to new
// files; the old ones stop growing.
func TestLogReopen(t *testing.T) {
	dir := t.TempDir()
	mainLog, accessLog := filepath.Join(dir, "main.log"), filepath.Join(dir, "access.log")
	cfg := withLog(strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)),
		fmt.Sprintf("{level: info, format: json, file: %q, access_file: %q}", mainLog, accessLog))
	p := startProxy(t, cfg)
	kids := p.workers(t, 2)
	if len(logFile(mainLog).lines("sniproxy started")) != 1 {
		t.Fatalf("no start line in %s:\n%s", mainLog, logFile(mainLog).String())
	}
	for _, path := range []string{mainLog, accessLog} {
		if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o640 {
			t.Errorf("%s: %v, mode %v; want 0640", path, err, st.Mode().Perm())
		}
	}
	connect := func() {
		c, err := openEcho(p.addr, "echo.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	connect()
	waitFor(t, "an access line", func() bool { return len(logFile(accessLog).lines("connection")) == 1 })
	if n := len(logFile(mainLog).lines("connection")); n != 0 {
		t.Errorf("%d access lines in the main log", n)
	}

	os.Rename(mainLog, mainLog+".1")
	os.Rename(accessLog, accessLog+".1")
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGUSR1)
	waitFor(t, "the reopen line in the new main log", func() bool { return len(logFile(mainLog).lines("SIGUSR1: log files reopened")) == 1 })
	oldMain := logFile(mainLog + ".1").String()
	connect()
	connect()
	waitFor(t, "access lines in the new access log", func() bool { return len(logFile(accessLog).lines("connection")) == 2 })
	if n := len(logFile(accessLog + ".1").lines("connection")); n != 1 {
		t.Errorf("the old access log has %d lines; want the 1 from before the reopen", n)
	}
	if err := p.stop(syscall.SIGTERM, 20*time.Second); err != nil {
		t.Fatalf("stop: %v", err)
	}
	waitAllGone(t, 10*time.Second, kids...)
	if got := logFile(mainLog + ".1").String(); got != oldMain {
		t.Errorf("the old main log grew after the reopen:\n%s", strings.TrimPrefix(got, oldMain))
	}
	fromWorkers := map[float64]bool{}
	for _, l := range logFile(mainLog).lines("drained; exiting") {
		if w, ok := l["worker"].(float64); ok {
			fromWorkers[w] = true
		}
	}
	if len(fromWorkers) != 2 || len(logFile(mainLog).lines("sniproxy stopped")) != 1 {
		t.Errorf("the new main log lacks the lines of the master or of both workers:\n%s", logFile(mainLog).String())
	}
}

// TestAccessLogSwitches: log.level error still writes access lines;
// log.access false writes none. JSON durations are seconds.
func TestAccessLogSwitches(t *testing.T) {
	echo := echoBackend(t)
	for _, c := range []struct {
		name   string
		log    string
		access bool
	}{
		{"level error", "{level: error, format: json}", true},
		{"access off", "{level: info, format: json, access: false}", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := startProxy(t, withLog(strings.ReplaceAll(masterConfig, "ECHO", echo), c.log))
			conn, err := openEcho(p.addr, "echo.test", 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
			p.waitMetric(t, `sniproxy_connections_total{protocol="http"}`, 1)
			p.waitMetric(t, "sniproxy_connections_active", 0)
			if !c.access {
				// The line is written before the connection is counted
				// as closed: none by now means none.
				if n := len(p.logLines("connection")); n != 0 {
					t.Errorf("%d access lines with log.access false", n)
				}
				return
			}
			waitFor(t, "the access line", func() bool { return len(p.logLines("connection")) == 1 })
			d, ok := p.logLines("connection")[0]["duration"].(float64)
			if !ok || d <= 0 || d > 10 {
				t.Errorf("duration %v: want seconds as a number", p.logLines("connection")[0]["duration"])
			}
			if n := len(p.logLines("sniproxy started")); n != 0 {
				t.Errorf("info lines at level error")
			}
		})
	}
}

// TestWorkersNamedSniproxy: workers run /proc/self/exe, but ps, top and
// pgrep see "sniproxy".
func TestWorkersNamedSniproxy(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	for _, pid := range p.workers(t, 2) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != "sniproxy" {
			t.Errorf("worker %d: comm %q; want sniproxy", pid, got)
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if argv0, _, _ := strings.Cut(string(cmdline), "\x00"); argv0 != "sniproxy" {
			t.Errorf("worker %d: argv[0] %q; want sniproxy", pid, argv0)
		}
	}
}

// TestCheckFindsEverything: one run reports decode and semantic problems,
// each once, a metrics address that clashes with a listener, and warns
// (exit 0) when the fd limit cannot hold max_connections.
func TestCheckFindsEverything(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte(`listen_addrs: ["127.0.0.1:8443", "127.0.0.1:8443", "127.0.0.1:8443", "0.0.0.0:9000"]
metrics: {address: "127.0.0.1:9000"}
max_connections: many
workers: -1
colour: red
`), 0o600)
	out, code := run(t, nil, "check", "-c", bad)
	if code != 1 {
		t.Errorf("check: exit %d; want 1\n%s", code, out)
	}
	for _, want := range []string{
		"colour: unknown key",
		"max_connections: cannot parse",
		"workers: -1 is negative",
		"listen_addrs[1]: address 127.0.0.1:8443 is already listed",
		"listen_addrs[2]: address 127.0.0.1:8443 is already listed",
		"metrics.address: 127.0.0.1:9000 clashes with listen_addrs[3]",
	} {
		if n := strings.Count(out, want); n != 1 {
			t.Errorf("%q: %d times; want once\n%s", want, n, out)
		}
	}
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("listen_addrs: [\"127.0.0.1:8443\"]\nmax_connections: 5000\n"), 0o600)
	cmd := exec.Command("sh", "-c", `ulimit -n 1024 && exec "$0" check -c "$1"`, binary, good)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("check under ulimit -n 1024: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "warning: max_connections 5000 needs about") {
		t.Errorf("no fd limit warning:\n%s", stderr.String())
	}
	if !strings.Contains(stdout.String(), "is valid") {
		t.Errorf("check output:\n%s", stdout.String())
	}
}

// TestReloadOtherConfigRefused: reload -c FILE with a FILE that is not the
// master's config is refused, and the master is not reloaded.
func TestReloadOtherConfigRefused(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"pid_file: PIDFILE\n")
	b, _ := os.ReadFile(p.cfgPath)
	other := filepath.Join(t.TempDir(), "other.yaml")
	os.WriteFile(other, b, 0o600)
	out, code := run(t, nil, "reload", "-c", other)
	if code != 1 || !strings.Contains(out, "not reloading") || !strings.Contains(out, p.cfgPath) {
		t.Errorf("reload -c other.yaml: exit %d\n%s", code, out)
	}
	if pid, gen := statusOf(t, p.cfgPath); pid != p.cmd.Process.Pid || gen != 1 {
		t.Errorf("master %d generation %d after a refused reload; want %d, 1", pid, gen, p.cmd.Process.Pid)
	}
	// The same file by a relative path is the master's.
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(wd, p.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if out, code := run(t, nil, "reload", "-c", rel); code != 0 {
		t.Errorf("reload -c %s: exit %d\n%s", rel, code, out)
	}
}

// TestSecondInstanceRefused: a second instance (other metrics and control
// socket) on the same listen address refuses to start, unless
// --share-ports.
func TestSecondInstanceRefused(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	dir := t.TempDir()
	cfg := fmt.Sprintf("listen_addrs: [%q]\nworkers: 1\nmetrics: {address: \"127.0.0.1:%d\"}\ncontrol_socket: %q\nlog: {format: json}\n",
		p.addr, freePort(t), filepath.Join(dir, "ctl.sock"))
	path := filepath.Join(dir, "second.yaml")
	os.WriteFile(path, []byte(cfg), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary, "run", "-c", path).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "another process listens") {
		t.Errorf("second instance: %v\n%s", err, out)
	}

	second := exec.Command(binary, "run", "--share-ports", "-c", path)
	logs := filepath.Join(dir, "second.log")
	lf, _ := os.Create(logs)
	defer lf.Close()
	second.Stdout, second.Stderr = lf, lf
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- second.Wait() }()
	waitFor(t, "the second instance with --share-ports to start", func() bool {
		select {
		case err := <-done:
			t.Fatalf("second instance exited: %v\n%s", err, logFile(logs).String())
		default:
		}
		return len(logFile(logs).lines("sniproxy started")) == 1
	})
	second.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("second instance: %v", err)
		}
	case <-time.After(20 * time.Second):
		second.Process.Kill()
		t.Fatal("second instance did not stop")
	}
}

// TestReloadLogLines: master lines carry pid and generation; a reload
// whose predecessor has exited says so instead of hurrying a generation
// that no longer drains.
func TestReloadLogLines(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"pid_file: PIDFILE\n")
	pids := []int{p.cmd.Process.Pid}
	for i := range 2 {
		pid, gen := p.reload(t)
		if gen != i+2 {
			t.Fatalf("reload %d: generation %d", i+1, gen)
		}
		pids = append(pids, pid)
		// The new master has counted the old one out.
		waitFor(t, "the previous generation's exit", func() bool {
			return len(p.logLines("previous generation exited")) == i+1
		})
	}
	if n := len(p.logLines("previous generation still draining: hurrying it before reloading")); n != 0 {
		t.Errorf("%d hurry lines with nothing draining", n)
	}
	if n := len(p.logLines("previous generation has exited; reloading")); n != 1 {
		t.Errorf("%d lines saying the predecessor has exited; want 1 (the second reload)", n)
	}
	started := p.logLines("sniproxy started")
	if len(started) != 3 {
		t.Fatalf("%d start lines; want 3", len(started))
	}
	for i, l := range started {
		if l["pid"] != float64(pids[i]) || l["generation"] != float64(i+1) {
			t.Errorf("start line %d: pid %v generation %v; want %d, %d", i, l["pid"], l["generation"], pids[i], i+1)
		}
	}
	for _, l := range p.logLines("new config is valid; starting the next generation") {
		if l["pid"] == nil || l["generation"] == nil {
			t.Errorf("master line without pid or generation: %v", l)
		}
	}
}

// TestSupervisorForwardsUSR1: under run --supervise the started process
// passes USR1 on to the current master, which reopens its log file.
func TestSupervisorForwardsUSR1(t *testing.T) {
	dir := t.TempDir()
	mainLog := filepath.Join(dir, "main.log")
	cfg := withLog(strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)), fmt.Sprintf("{format: json, file: %q}", mainLog)) +
		"pid_file: PIDFILE\n"
	p := startProxyArgv(t, binary, cfg, func(path string) []string {
		return []string{binary, "run", "--supervise", "-c", path}
	})
	waitFor(t, "the master's start line", func() bool { return len(logFile(mainLog).lines("sniproxy started")) == 1 })
	os.Rename(mainLog, mainLog+".1")
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGUSR1)
	waitFor(t, "the reopen line in the new file", func() bool {
		return len(logFile(mainLog).lines("SIGUSR1: log files reopened")) == 1
	})
	select {
	case <-p.done:
		t.Fatalf("the supervisor exited on USR1: %v", p.err)
	default:
	}
}

// TestWorkersLogMasterLoss: after kill -9 of the master each worker says
// the master is gone, with its drain deadline, and that its drain ended.
func TestWorkersLogMasterLoss(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	kids := p.workers(t, 2)
	p.cmd.Process.Kill()
	<-p.done
	waitAllGone(t, 10*time.Second, kids...)
	for what, msg := range map[string]string{"loss": "master is gone; draining", "end": "drained; exiting"} {
		seen := map[float64]bool{}
		for _, l := range p.logLines(msg) {
			pid, _ := l["pid"].(float64)
			seen[pid] = true
			if what == "loss" {
				if d, ok := l["deadline"].(string); !ok || d == "" {
					t.Errorf("%q line without a deadline: %v", msg, l)
				}
			}
		}
		for _, k := range kids {
			if !seen[float64(k)] {
				t.Errorf("worker %d did not log %q:\n%s", k, msg, p.logs.String())
			}
		}
	}
}
