package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// contextSwitches returns the context switches (voluntary and not) of
// every thread of pid so far.
func contextSwitches(t *testing.T, pid int) int {
	t.Helper()
	tasks, err := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/status")
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	sum := 0
	for _, path := range tasks {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // a thread that just exited
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if ok && (k == "voluntary_ctxt_switches" || k == "nonvoluntary_ctxt_switches") {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				sum += n
			}
		}
	}
	return sum
}

// masterWakes makes n connections through the proxy, one after the other,
// and returns how often the master pid was switched in meanwhile.
func masterWakes(t *testing.T, p *proxyProc, pid, n int) int {
	t.Helper()
	// Warm up: the workers have their first permits, the connections
	// below are the only thing going on.
	for range 10 {
		c, err := openEcho(p.addr, "load.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	before := contextSwitches(t, pid)
	for range n {
		c, err := openEcho(p.addr, "load.test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	return contextSwitches(t, pid) - before
}

// The master never accepts, so a connection must not wake it: it holds
// the listening sockets outside the Go runtime's poller (a socket in its
// epoll wakes it for every connection queued on it). Its first
// generation binds them; a successor inherits them over the state socket.
// Checked with reuseport sockets and with a shared one.
func TestMasterNotWokenByConnections(t *testing.T) {
	const n = 300
	for _, reuse := range []bool{true, false} {
		t.Run("reuseport="+strconv.FormatBool(reuse), func(t *testing.T) {
			p := startProxy(t, reloadCfg(echoBackend(t), 2, reuse))
			first := p.cmd.Process.Pid
			// Permits, stats pushes and timers wake the master a few
			// times a second; a listening socket in its epoll wakes it
			// at least once per connection.
			limit := n / 5
			if w := masterWakes(t, p, first, n); w >= limit {
				t.Errorf("first master: %d context switches for %d connections; want < %d", w, n, limit)
			} else {
				t.Logf("first master: %d context switches for %d connections", w, n)
			}
			pid, _ := p.reload(t)
			if w := masterWakes(t, p, pid, n); w >= limit {
				t.Errorf("successor: %d context switches for %d connections; want < %d", w, n, limit)
			} else {
				t.Logf("successor: %d context switches for %d connections", w, n)
			}
		})
	}
}
