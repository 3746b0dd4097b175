package e2e

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cpuTicks returns a process's user+system CPU time in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ut + st
}

// TestOutOfFileDescriptors runs sniproxy under a low fd limit
// (RLIMIT_NOFILE 64, set with prlimit, soft and hard, so it cannot raise
// it): at the limit, a worker backs off instead of spinning on accept
// (EMFILE), and once connections close it serves the ones that waited.
func TestOutOfFileDescriptors(t *testing.T) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatal("prlimit (util-linux) is not installed")
	}
	echo := echoBackend(t)
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echo)
	cfg = strings.Replace(cfg, "workers: 2", "workers: 1", 1)
	cfg = strings.Replace(cfg, "client_hello: 3", "client_hello: 10", 1)
	p := startProxyArgv(t, binary, cfg, func(path string) []string {
		return []string{prlimit, "--nofile=64:64", "--", binary, "-c", path}
	})
	worker := p.workers(t, 1)[0]

	// Silent clients: each costs the worker one fd while it waits for
	// their hello (client_hello is 10s here), until accept fails with
	// EMFILE; the rest wait in the listen queue.
	var waiting []net.Conn
	defer func() {
		for _, c := range waiting {
			c.Close()
		}
	}()
	for range 80 {
		c, err := net.DialTimeout("tcp", p.addr, 2*time.Second)
		if err != nil {
			break
		}
		waiting = append(waiting, c)
	}
	// The worker must not spin while it cannot accept.
	time.Sleep(500 * time.Millisecond) // deliberate: let it hit EMFILE
	before := cpuTicks(t, worker)
	time.Sleep(2 * time.Second) // deliberate: the interval CPU is measured over
	used := cpuTicks(t, worker) - before
	if used > 50 { // clock ticks are 1/100 s: half a second of CPU in 2 s
		t.Errorf("worker used %d ticks of CPU in 2s at EMFILE; it spins", used)
	}
	if !strings.Contains(p.logs.String(), "too many open files") {
		t.Errorf("no EMFILE in the log; the limit did not bite:\n%s", p.logs)
	}
	// Workers accept in their event loop (raw accept4); Go's listener
	// would say "accept tcp ADDR: accept4: …".
	if strings.Contains(p.logs.String(), "accept tcp") {
		t.Errorf("EMFILE met by Go's listener, not by the event loop: the loop is off?\n%s", p.logs)
	}
	// Free the fds: new connections are served again.
	for _, c := range waiting {
		c.Close()
	}
	waiting = nil
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := openEcho(p.addr, "echo.test", 2*time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served 15s after the fds were freed: %v", err)
		}
	}
}
