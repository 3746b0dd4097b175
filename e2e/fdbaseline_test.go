package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fdKinds counts a process's open fds by kind: "socket", "pipe", the
// anon_inode name ("anon_inode:[eventpoll]") or the path of a file.
func fdKinds(pid int) (map[string]int, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("listing fds of %d: %w", pid, err)
	}
	kinds := map[string]int{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed since the listing
		}
		kind := target
		for _, p := range []string{"socket:", "pipe:"} {
			if strings.HasPrefix(target, p) {
				kind = strings.TrimSuffix(p, ":")
			}
		}
		kinds[kind]++
	}
	return kinds, nil
}

// fdDiff describes how after differs from before, kind by kind ("" when
// they are equal).
func fdDiff(before, after map[string]int) string {
	var keys []string
	for k := range before {
		keys = append(keys, k)
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		if before[k] != after[k] {
			fmt.Fprintf(&b, " %s %d→%d", k, before[k], after[k])
		}
	}
	return b.String()
}

// socketDetails lists pid's sockets that are TCP, with their addresses and
// state from /proc/PID/net/tcp, for a failure message.
func socketDetails(pid int) string {
	dir := "/proc/" + strconv.Itoa(pid)
	inodes := map[string]bool{}
	ents, _ := os.ReadDir(dir + "/fd")
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, "fd", e.Name()))
		if s, ok := strings.CutPrefix(target, "socket:["); ok {
			inodes[strings.TrimSuffix(s, "]")] = true
		}
	}
	var b strings.Builder
	unseen := len(inodes)
	for _, f := range []string{"tcp", "tcp6"} {
		data, _ := os.ReadFile(dir + "/net/" + f)
		for _, line := range strings.Split(string(data), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) > 9 && inodes[fs[9]] {
				fmt.Fprintf(&b, "\n    %s local %s remote %s state %s", f, fs[1], fs[2], fs[3])
				unseen--
			}
		}
	}
	fmt.Fprintf(&b, "\n    %d other sockets (unix, netlink)", unseen)
	return b.String()
}

// TestFdsBackToBaseline makes a bounded mixed load of short connections
// (TLS, HTTP, garbage, a refused backend, an unknown name, a client that
// leaves at once), 8 at a time, and checks that the master and every
// worker are back at the fds they held at rest within 10 s of the last
// close: nothing leaks, and pooled splice pipes are let go once the
// workers are quiet.
func TestFdsBackToBaseline(t *testing.T) {
	tlsb := startTLSBackend(t, "T", "tls.test")
	echo := echoBackend(t)
	refused := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := startProxy(t, baseConfig+fmt.Sprintf(`
allowlist: ["localhost"]
routes:
  - {match: "tls.test", backend: "%s"}
  - {match: "echo.test", backend: "%s"}
  - {match: "refused.test", backend: "%s"}
`, tlsb.addr, echo, refused))
	// The health probe's keep-alive connection would count as a master fd.
	http.DefaultClient.CloseIdleConnections()
	procs := append([]int{p.cmd.Process.Pid}, p.workers(t, 2)...)

	kinds := []func() error{
		func() error { // TLS through to the backend: a full handshake, one line
			d := &net.Dialer{Timeout: 5 * time.Second}
			c, err := tls.DialWithDialer(d, "tcp", p.addr, &tls.Config{ServerName: "tls.test", RootCAs: tlsb.pool})
			if err != nil {
				return fmt.Errorf("tls: %w", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
				return fmt.Errorf("tls: %w", err)
			}
			return nil
		},
		func() error { // HTTP: a request, its echo, then the client closes
			c, err := openEcho(p.addr, "echo.test", 10*time.Second)
			if err != nil {
				return fmt.Errorf("http: %w", err)
			}
			return c.Close()
		},
		func() error { // HTTP with a body, half-closed by the client, drained
			c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
			if err != nil {
				return fmt.Errorf("http half-close: %w", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			req := "POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 65536\r\n\r\n" + strings.Repeat("x", 65536)
			if _, err := io.WriteString(c, req); err != nil {
				return fmt.Errorf("http half-close: %w", err)
			}
			c.(*net.TCPConn).CloseWrite()
			n, err := io.Copy(io.Discard, c)
			if err != nil || n != int64(len(req)) {
				return fmt.Errorf("http half-close: echoed %d of %d bytes: %v", n, len(req), err)
			}
			return nil
		},
		func() error { return refusedBy(p.addr, "\x16\x03\x01garbage that is not a hello\r\n\r\n") },
		func() error { return refusedBy(p.addr, "GET / HTTP/1.1\r\nHost: refused.test\r\n\r\n") },
		func() error { return refusedBy(p.addr, "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n") },
		func() error { // a client that resets in the middle of its hello
			c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
			if err != nil {
				return fmt.Errorf("reset: %w", err)
			}
			io.WriteString(c, "GET / HTTP/1.1\r\nHo")
			c.(*net.TCPConn).SetLinger(0)
			return c.Close()
		},
		func() error { // a client that leaves at once
			c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
			if err != nil {
				return fmt.Errorf("leave: %w", err)
			}
			return c.Close()
		},
	}
	// Warm up: one of each, so what a worker opens once for good (its
	// poller) is in the baseline.
	for _, k := range kinds {
		if err := k(); err != nil {
			t.Fatal(err)
		}
	}
	// At rest: the counts every process holds unchanged for 3 s (longer
	// than a free splice pipe lingers).
	base := map[int]map[string]int{}
	stable := time.Now()
	settle := time.Now().Add(20 * time.Second)
	for {
		changed := false
		for _, pid := range procs {
			k, err := fdKinds(pid)
			if err != nil {
				t.Fatal(err)
			}
			if base[pid] == nil || fdDiff(base[pid], k) != "" {
				base[pid], changed = k, true
			}
		}
		if changed {
			stable = time.Now()
		}
		if time.Since(stable) >= 3*time.Second {
			break
		}
		if time.Now().After(settle) {
			t.Fatalf("fds still changing 20s after the warm-up: %v", base)
		}
		time.Sleep(250 * time.Millisecond) // poll the fds until they settle
	}
	for _, pid := range procs {
		t.Logf("pid %d at rest: %v", pid, base[pid])
	}

	const total, parallel = 2000, 8
	start := time.Now()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		fails []error
	)
	for g := range parallel {
		wg.Go(func() {
			for i := g; i < total; i += parallel {
				if err := kinds[i%len(kinds)](); err != nil {
					mu.Lock()
					fails = append(fails, err)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	lastClose := time.Now()
	t.Logf("%d connections, %d at a time, in %v", total, parallel, lastClose.Sub(start).Round(time.Millisecond))
	if len(fails) > 0 {
		t.Errorf("%d of %d connections failed; first: %v", len(fails), total, fails[0])
	}

	for _, pid := range procs {
		for {
			now, err := fdKinds(pid)
			if err != nil {
				t.Fatal(err)
			}
			diff := fdDiff(base[pid], now)
			if diff == "" {
				t.Logf("pid %d back at its %d fds %v after the last close", pid, sum(now), time.Since(lastClose).Round(100*time.Millisecond))
				break
			}
			if time.Since(lastClose) > 10*time.Second {
				t.Errorf("pid %d not back at baseline 10s after the last close:%s%s", pid, diff, socketDetails(pid))
				break
			}
			time.Sleep(100 * time.Millisecond) // poll the fds until the deadline
		}
	}
}

// refusedBy sends msg and expects the proxy to close the connection
// without a byte from a backend.
func refusedBy(proxy, msg string) error {
	c, err := net.DialTimeout("tcp", proxy, 5*time.Second)
	if err != nil {
		return fmt.Errorf("refused %q: %w", msg[:8], err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return nil // closed before all was written: refused
	}
	n, _ := io.Copy(io.Discard, c)
	if n > 0 {
		return fmt.Errorf("refused %q: proxy sent %d bytes", msg[:8], n)
	}
	return nil
}

// sum adds up the counts of kinds.
func sum(kinds map[string]int) int {
	n := 0
	for _, v := range kinds {
		n += v
	}
	return n
}
