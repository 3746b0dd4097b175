package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// statusOf asks the master behind cfgPath's control socket for its status.
func statusOf(t *testing.T, cfgPath string) (pid, generation int) {
	t.Helper()
	out, err := exec.Command(binary, "status", "--json", "-c", cfgPath).Output()
	if err != nil {
		t.Fatalf("sniproxy status: %v", err)
	}
	var st struct {
		PID        int `json:"pid"`
		Generation int `json:"generation"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("sniproxy status: %v\n%s", err, out)
	}
	return st.PID, st.Generation
}

// reloadVia runs `sniproxy reload -c cfgPath` and fails the test if it
// fails.
func reloadVia(t *testing.T, cfgPath string) {
	t.Helper()
	if out, err := exec.Command(binary, "reload", "-c", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("sniproxy reload: %v\n%s", err, out)
	}
}

// waitAllGone waits up to d for every pid to be gone (reaped or a zombie).
func waitAllGone(t *testing.T, d time.Duration, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(d)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("process %d still alive after %v", pid, d)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// descendants returns every live descendant of pid.
func descendants(t *testing.T, pid int) []int {
	t.Helper()
	var out []int
	for _, c := range children(t, pid) {
		out = append(out, c)
		out = append(out, descendants(t, c)...)
	}
	return out
}

const superviseConfig = `
listen_addrs: ["LISTEN"]
workers: 1
metrics: {address: "METRICS"}
control_socket: "CTLSOCK"
shutdown_timeout: 5
routes:
  - match: "app.example.com"
    backend: "BACKEND"
`

// TestSupervisedRunKeepsItsPID: `run --supervise` is what runit, s6,
// supervisord or a shell see: the started process stays through reloads
// (signalled to it, as a supervisor would), the PID file names the current
// master, and a TERM to it stops the proxy with exit status 0.
func TestSupervisedRunKeepsItsPID(t *testing.T) {
	be := startTLSBackend(t, "b1", "app.example.com")
	cfg := strings.ReplaceAll(superviseConfig, "BACKEND", be.addr) + "pid_file: \"PIDFILE\"\n"
	p := startProxyArgv(t, binary, cfg, func(path string) []string {
		return []string{binary, "run", "--supervise", "-c", path}
	})
	keeper := p.cmd.Process.Pid
	if got, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil || got != "b1 app.example.com" {
		t.Fatalf("through the supervised proxy: got %q, %v", got, err)
	}
	first, gen := statusOf(t, p.cfgPath)
	if first == keeper {
		t.Fatalf("the master is the started process (%d); want it to be its child", keeper)
	}
	var masters []int
	for i := range 3 {
		syscall.Kill(keeper, syscall.SIGHUP)
		deadline := time.Now().Add(30 * time.Second)
		for {
			pid, g := statusOf(t, p.cfgPath)
			if g == gen+1 && p.pid() == pid {
				masters = append(masters, pid)
				gen = g
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("reload %d: generation %d (pid %d, pid file %d); want %d", i+1, g, pid, p.pid(), gen+1)
			}
			time.Sleep(50 * time.Millisecond)
		}
		select {
		case <-p.done:
			t.Fatalf("the started process exited at reload %d: %v", i+1, p.err)
		default:
		}
		if got, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil || got != "b1 app.example.com" {
			t.Fatalf("after reload %d: got %q, %v", i+1, got, err)
		}
	}
	// Every generation is the keeper's descendant: the retired ones exit
	// and are reaped by it, the current one was adopted.
	waitAllGone(t, 20*time.Second, first, masters[0], masters[1])
	found := false
	for _, d := range descendants(t, keeper) {
		found = found || d == masters[2]
	}
	if !found {
		t.Errorf("current master %d is not a descendant of the supervisor %d", masters[2], keeper)
	}
	all := append(descendants(t, keeper), keeper)
	if err := p.stop(syscall.SIGTERM, 20*time.Second); err != nil {
		t.Errorf("supervisor after TERM: %v; want exit status 0", err)
	}
	waitAllGone(t, 10*time.Second, all...)
}

// TestSupervisorAsPID1 runs sniproxy as PID 1 of a fresh PID namespace, as
// a container does: it supervises without being asked, keeps proxying
// through three reloads, reaps the generations it adopts, and exits 0 when
// TERM (docker stop) reaches it.
func TestSupervisorAsPID1(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatal("unshare (util-linux) is not installed")
	}
	be := startTLSBackend(t, "b1", "app.example.com")
	// No pid_file: it would hold pids of the namespace, meaningless (and
	// dangerous to signal) outside it.
	cfg := strings.ReplaceAll(superviseConfig, "BACKEND", be.addr)
	p := startProxyArgv(t, binary, cfg, func(path string) []string {
		return []string{unshare, "--pid", "--fork", "--mount-proc", "--kill-child", binary, "-c", path}
	})
	var keeper int
	for deadline := time.Now().Add(10 * time.Second); keeper == 0; {
		if kids := children(t, p.cmd.Process.Pid); len(kids) == 1 {
			keeper = kids[0]
		} else if time.Now().After(deadline) {
			t.Fatalf("unshare has children %v; want one", kids)
		}
	}
	if ns := nsPID(t, keeper); ns != 1 {
		t.Fatalf("sniproxy is pid %d in its namespace; want 1", ns)
	}
	if len(p.logLines("supervising")) != 1 {
		t.Errorf("PID 1 did not say it supervises:\n%s", p.logs)
	}
	if got, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil || got != "b1 app.example.com" {
		t.Fatalf("through sniproxy as PID 1: got %q, %v", got, err)
	}
	_, gen := statusOf(t, p.cfgPath)
	for i := range 3 {
		reloadVia(t, p.cfgPath)
		_, g := statusOf(t, p.cfgPath)
		if g != gen+1 {
			t.Fatalf("reload %d: generation %d; want %d", i+1, g, gen+1)
		}
		gen = g
		if !alive(keeper) {
			t.Fatalf("PID 1 exited at reload %d:\n%s", i+1, p.logs)
		}
		if got, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil || got != "b1 app.example.com" {
			t.Fatalf("after reload %d: got %q, %v", i+1, got, err)
		}
	}
	// The retired generations are reaped, not left as zombies: PID 1 has
	// one master child (and nothing else) once they have drained.
	deadline := time.Now().Add(20 * time.Second)
	for {
		kids := children(t, keeper)
		if len(kids) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("PID 1 has children %v after the reloads; want only the current master", kids)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if z := zombies(t, keeper); len(z) > 0 {
		t.Errorf("zombies left under PID 1: %v", z)
	}
	all := append(descendants(t, keeper), keeper)
	syscall.Kill(keeper, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("PID 1 did not exit within 20s of TERM:\n%s", p.logs)
	}
	if p.err != nil {
		t.Errorf("exit after TERM: %v; want status 0", p.err)
	}
	waitAllGone(t, 10*time.Second, all...)
}

// nsPID returns pid's pid in its own (innermost) PID namespace.
func nsPID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			n, _ := strconv.Atoi(f[len(f)-1])
			return n
		}
	}
	t.Fatalf("/proc/%d/status has no NSpid", pid)
	return 0
}

// zombies returns pid's children that are zombies.
func zombies(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			n, _ := strconv.Atoi(e.Name())
			out = append(out, n)
		}
	}
	return out
}
