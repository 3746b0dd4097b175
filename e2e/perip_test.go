package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/status"
)

// openEchoFrom is openEcho from the loopback source address src.
func openEchoFrom(proxy, src string) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", proxy)
	if err != nil {
		return nil, err
	}
	req := "GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		c.Close()
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(req))); err != nil {
		c.Close()
		return nil, err
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

// openManyFrom opens n connections from src at once and returns those that
// reached the backend and how many did not.
func openManyFrom(t *testing.T, proxy, src string, n int) (held []net.Conn, refused int) {
	t.Helper()
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			c, err := openEchoFrom(proxy, src)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				refused++
				return
			}
			held = append(held, c)
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	return held, refused
}

const perIPRejected = `sniproxy_connections_rejected_total{reason="per_ip_limit"}`

// TestPerIPConnectionsAcrossWorkers: limits.per_ip_connections holds across
// both workers: of 10 connections from one client, exactly 3 are served,
// the rest refused and counted per_ip_limit, while another client still
// gets in; a client permit comes back when a connection closes.
func TestPerIPConnectionsAcrossWorkers(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"limits: {per_ip_connections: 3}\n")
	p.workers(t, 2)
	held, refused := openManyFrom(t, p.addr, "127.0.0.2", 10)
	if len(held) != 3 || refused != 7 {
		t.Fatalf("%d connections from 127.0.0.2 served, %d refused; want exactly 3 and 7", len(held), refused)
	}
	p.waitMetric(t, perIPRejected, 7)
	other, refused := openManyFrom(t, p.addr, "127.0.0.3", 3)
	if len(other) != 3 || refused != 0 {
		t.Fatalf("127.0.0.3: %d served, %d refused; want 3 and 0", len(other), refused)
	}
	refusedLogged := 0
	byWorker := map[any]int{} // connections from 127.0.0.2 each worker saw
	for _, l := range p.logLines("connection") {
		if client, _ := l["client"].(string); strings.HasPrefix(client, "127.0.0.2:") {
			byWorker[l["worker"]]++
			if l["result"] == "per_ip_limit" {
				refusedLogged++
			}
		}
	}
	if refusedLogged != 7 {
		t.Errorf("%d access-log lines of refusals; want 7", refusedLogged)
	}
	t.Logf("access-log lines of 127.0.0.2 (the refusals; the 3 served are still open) by worker: %v", byWorker)
	held[0].Close()
	p.waitMetric(t, `sniproxy_connections_active`, 5)
	waitAdmitted(t, p.addr, "127.0.0.2")
}

// waitAdmitted waits until a connection from src is served (a client permit freed
// in one worker reaches the others within perip.SpareTTL) and keeps it
// open until the test ends.
func waitAdmitted(t *testing.T, proxy, src string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := openEchoFrom(proxy, src)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection from %s served within 10s: %v", src, err)
		}
		time.Sleep(50 * time.Millisecond) // poll the condition until the deadline
	}
}

// TestPerIPRate: limits.per_ip_rate 0.2 (a burst of 1, a token every 5 s):
// of 5 connections in quick succession from one client one is served, the
// rest refused; another client is not affected.
func TestPerIPRate(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))+"limits: {per_ip_rate: 0.2}\n")
	p.workers(t, 2)
	served := 0
	for range 5 {
		if c, err := openEchoFrom(p.addr, "127.0.0.2"); err == nil {
			served++
			c.Close()
		}
	}
	if served != 1 {
		t.Fatalf("%d of 5 connections served at 0.2/s; want 1", served)
	}
	p.waitMetric(t, perIPRejected, 4)
	var st struct {
		Limits status.Limits `json:"limits"`
	}
	resp, err := http.Get("http://" + p.metrics + "/status.json")
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil || st.Limits.PerIPRate != 0.2 || st.Limits.PerIPConnections != 0 {
		t.Errorf("status.json limits %+v, %v; want per_ip_rate 0.2", st.Limits, err)
	}
	c, err := openEchoFrom(p.addr, "127.0.0.3")
	if err != nil {
		t.Fatalf("another client refused: %v", err)
	}
	c.Close()
}

// TestPerIPKeptAcrossReload: the successor counts the connections the
// predecessor's workers still hold: with 3 open from a client, a 4th after
// a reload is refused; once one of the 3 closes, the client gets in.
func TestPerIPKeptAcrossReload(t *testing.T) {
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)) + "limits: {per_ip_connections: 3}\n"
	cfg = strings.Replace(cfg, "shutdown_timeout: 5", "shutdown_timeout: 60", 1)
	p := startProxy(t, cfg)
	p.workers(t, 2)
	held, refused := openManyFrom(t, p.addr, "127.0.0.2", 3)
	if len(held) != 3 || refused != 0 {
		t.Fatalf("before the reload: %d served, %d refused; want 3 and 0", len(held), refused)
	}
	_, gen := p.reload(t)
	if gen != 2 {
		t.Fatalf("reload made generation %d", gen)
	}
	if c, err := openEchoFrom(p.addr, "127.0.0.2"); err == nil {
		c.Close()
		t.Fatal("a 4th connection after the reload was served")
	}
	p.waitMetric(t, perIPRejected, 1)
	if c, err := openEchoFrom(p.addr, "127.0.0.3"); err != nil {
		t.Fatalf("another client refused after the reload: %v", err)
	} else {
		c.Close()
	}
	held[0].Close()
	waitAdmitted(t, p.addr, "127.0.0.2")
}

// TestPerIPFreedWhenDrainingWorkerDies: a worker of the draining
// generation killed with a client's connections gives their client
// permits back at once (its master reaps it as it exits), not when the
// last worker of that generation has drained: with 3 of a client's
// connections held across a reload and the other old worker still
// draining, killing the old worker that holds some lets the client in.
func TestPerIPFreedWhenDrainingWorkerDies(t *testing.T) {
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)) + "limits: {per_ip_connections: 3}\n"
	cfg = strings.Replace(cfg, "shutdown_timeout: 5", "shutdown_timeout: 60", 1)
	p := startProxy(t, cfg)
	old := p.workers(t, 2)
	// Both old workers hold a connection of some client, so that the
	// generation drains for as long as one of them lives.
	var others []net.Conn
	for i := 3; i < 40 && !(holdsFrom(t, old[0], "") > 0 && holdsFrom(t, old[1], "") > 0); i++ {
		c, err := openEchoFrom(p.addr, fmt.Sprintf("127.0.0.%d", i))
		if err != nil {
			t.Fatal(err)
		}
		others = append(others, c)
	}
	defer func() {
		for _, c := range others {
			c.Close()
		}
	}()
	held, refused := openManyFrom(t, p.addr, "127.0.0.2", 3)
	if len(held) != 3 || refused != 0 {
		t.Fatalf("before the reload: %d served, %d refused; want 3 and 0", len(held), refused)
	}
	victim := old[0]
	if holdsFrom(t, victim, "127.0.0.2") == 0 {
		victim = old[1]
	}
	if _, gen := p.reload(t); gen != 2 {
		t.Fatalf("reload made generation %d", gen)
	}
	if c, err := openEchoFrom(p.addr, "127.0.0.2"); err == nil {
		c.Close()
		t.Fatal("a 4th connection after the reload was served")
	}
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitAdmitted(t, p.addr, "127.0.0.2")
}

// holdsFrom counts the established TCP sockets of process pid whose
// peer address is src ("": any peer).
func holdsFrom(t *testing.T, pid int, src string) int {
	t.Helper()
	inodes := map[string]bool{}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != "01" || !inodes[f[9]] { // 01: ESTABLISHED
			continue
		}
		if src == "" {
			n++
			continue
		}
		a := netip.MustParseAddr(src).As4()
		if f[2][:8] == fmt.Sprintf("%02X%02X%02X%02X", a[3], a[2], a[1], a[0]) {
			n++
		}
	}
	return n
}

// TestPerIPKeptAcrossHurry: connections moved by a hurry keep counting
// against their client's limits.per_ip_connections. With a limit of 2
// and 2 long connections from one client, a reload while the previous
// generation still drains moves them (and a third moves them again): a
// 3rd connection from that client is refused after each, counted
// per_ip_limit, while the 2 moved ones still echo; once they close, the
// client gets in. Before, the moved connections took no client permit
// where they went and their old ones came back, so the client could open
// 2 more.
func TestPerIPKeptAcrossHurry(t *testing.T) {
	cfg := strings.ReplaceAll(masterConfig, "ECHO", longEchoBackend(t)) + "limits: {per_ip_connections: 2}\n"
	cfg = strings.Replace(cfg, "shutdown_timeout: 5", "shutdown_timeout: 60", 1)
	p := startProxy(t, cfg)
	p.workers(t, 2)
	held, refused := openManyFrom(t, p.addr, "127.0.0.2", 2)
	if len(held) != 2 || refused != 0 {
		t.Fatalf("before the reloads: %d served, %d refused; want 2 and 0", len(held), refused)
	}
	if _, gen := p.reload(t); gen != 2 { // generation 1 drains with the 2
		t.Fatalf("first reload made generation %d", gen)
	}
	for i, wantGen := range []int{3, 4} {
		// Generation wantGen-1 hurries wantGen-2: the 2 move to it, and
		// it drains with them while wantGen serves.
		if _, gen := p.reload(t); gen != wantGen {
			t.Fatalf("reload made generation %d; want %d", gen, wantGen)
		}
		if c, err := openEchoFrom(p.addr, "127.0.0.2"); err == nil {
			c.Close()
			t.Fatalf("after hurry %d: a 3rd connection of a client at per_ip_connections 2 was served", i+1)
		}
		p.waitMetric(t, perIPRejected, float64(i+1))
		for j, c := range held {
			msg := fmt.Sprintf("moved %d, hurry %d\n", j, i+1)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(c, msg); err != nil {
				t.Fatalf("moved connection %d after hurry %d: %v", j, i+1, err)
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				t.Fatalf("moved connection %d after hurry %d: %q, %v", j, i+1, buf, err)
			}
			c.SetDeadline(time.Time{})
		}
		if c, err := openEchoFrom(p.addr, "127.0.0.3"); err != nil {
			t.Fatalf("another client refused after hurry %d: %v", i+1, err)
		} else {
			c.Close()
		}
	}
	for _, c := range held {
		c.Close()
	}
	waitAdmitted(t, p.addr, "127.0.0.2")
	// One closed connection is enough to admit the client again; the
	// other's access-log line may come a little later.
	moves := 0
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		moves = 0
		for _, l := range p.logLines("connection") {
			if client, _ := l["client"].(string); strings.HasPrefix(client, "127.0.0.2:") {
				if m, ok := l["moves"].(float64); ok && m == 2 {
					moves++
				}
			}
		}
		if moves >= 2 || time.Now().After(deadline) {
			break
		}
	}
	if moves != 2 {
		t.Errorf("%d access-log lines of 127.0.0.2 with moves=2; want the 2 long connections, moved by both hurries", moves)
	}
}
