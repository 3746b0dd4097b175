package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/stats"
)

// tableTransport answers a perip.Client from a Table in the same process.
type tableTransport struct{ t *perip.Table }

func (tt tableTransport) Request(key netip.Addr, conns, tokens int) (perip.Grant, error) {
	return tt.t.Grant(1, key, conns, tokens), nil
}

func (tt tableTransport) Return(key netip.Addr, conns, tokens int) {
	tt.t.Return(1, key, conns, tokens)
}

// closedAtOnce reports whether c is closed without an answer.
func closedAtOnce(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		return fmt.Errorf("read %d, %v; want it closed at once", n, err)
	}
	return nil
}

// TestPerIPLimit: a client over limits.per_ip_connections is closed at
// once and counted per_ip_limit; its client permit comes back when a connection
// ends; behind a PROXY header the client is the one the header names.
func TestPerIPLimit(t *testing.T) {
	for _, proxied := range []bool{false, true} {
		t.Run(fmt.Sprint("proxied=", proxied), func(t *testing.T) {
			backend, got := holdBackend(t)
			lim := perip.Limits{Conns: 2}
			table := perip.NewTable(lim, 100, nil)
			lopts := ""
			if proxied {
				lopts = `, accept_proxy_protocol: true, trusted_proxies: ["127.0.0.1"]`
			}
			srv, addr, counters, _, logs := phaseServer(t, fmt.Sprintf("routes: [{match: a.test, backend: %q}]\nlimits: {per_ip_connections: 2}\n", backend), lopts, 100,
				func(s *Server) { s.PerIP = perip.NewClient(tableTransport{table}, lim, 64, 1, nil) })
			dial := func(client string) net.Conn {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				if proxied {
					fmt.Fprintf(c, "PROXY TCP4 %s 127.0.0.1 1234 443\r\n", client)
				}
				fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
				return c
			}
			first := dial("192.0.2.1")
			dial("192.0.2.1")
			for range 2 {
				select {
				case <-got:
				case <-time.After(10 * time.Second):
					t.Fatal("a connection within the limit did not reach the backend")
				}
			}
			if err := closedAtOnce(dial("192.0.2.1")); err != nil {
				t.Fatalf("third connection: %v", err)
			}
			waitFor(t, "rejected{per_ip_limit}", func() bool { return counters.Snapshot().Rejected[stats.PerIPLimit] == 1 })
			waitFor(t, "the access-log line", func() bool {
				for _, l := range logs.get() {
					if l["result"] == "per_ip_limit" {
						return true
					}
				}
				return false
			})
			key := netip.MustParseAddr("127.0.0.1")
			if proxied {
				// Another client behind the same balancer gets in.
				dial("192.0.2.2")
				select {
				case <-got:
				case <-time.After(10 * time.Second):
					t.Fatal("another client did not reach the backend")
				}
				key = netip.MustParseAddr("192.0.2.1")
			}
			if h, _ := table.Held(key); h != 2 {
				t.Errorf("the master's table holds %d client permits of %v, want 2", h, key)
			}
			first.(*net.TCPConn).SetLinger(0)
			first.Close()
			waitFor(t, "the client permit back", func() bool { return srv.Active() == map[bool]int{false: 1, true: 2}[proxied] })
			dial("192.0.2.1")
			select {
			case <-got:
			case <-time.After(10 * time.Second):
				t.Fatalf("a connection after one ended did not reach the backend; log %v", logs.get())
			}
		})
	}
}

// workerTransport answers a perip.Client from a Table in the same process
// as the worker with the given id.
type workerTransport struct {
	t  *perip.Table
	id int
}

func (wt workerTransport) Request(key netip.Addr, conns, tokens int) (perip.Grant, error) {
	return wt.t.Grant(wt.id, key, conns, tokens), nil
}

func (wt workerTransport) Return(key netip.Addr, conns, tokens int) {
	if err := wt.t.Return(wt.id, key, conns, tokens); err != nil {
		panic(err)
	}
}

// TestMoveKeepsClientPermit: a moved connection is sent with its client
// key while its client permit is still held where it comes from; the
// server that resumes it counts the client permit the master granted with
// it, so the client stays at its limit, and gives it back when the
// connection closes.
func TestMoveKeepsClientPermit(t *testing.T) {
	backend := echoBackend(t)
	routes := fmt.Sprintf("routes: [{match: echo.test, backend: %q}]\nlimits: {per_ip_connections: 2}\n", backend)
	lim := perip.Limits{Conns: 2}
	table := perip.NewTable(lim, 100, nil)
	from := perip.NewClient(workerTransport{table, 1}, lim, 64, 1, nil)
	to := perip.NewClient(workerTransport{table, 2}, lim, 64, 1, nil)
	a := startServerWith(t, routes, nil, "", func(s *Server) { s.PerIP = from })
	b := startServerWith(t, routes, nil, "", func(s *Server) { s.PerIP = to })
	client := netip.MustParseAddr("127.0.0.1")

	type open struct {
		c net.Conn
		r *bufio.Reader
	}
	var conns []open
	for range 2 {
		c := dialHTTP(t, a.addr, "echo.test")
		r := bufio.NewReader(c)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if s, err := r.ReadString('\n'); err != nil || s != "hello\n" {
			t.Fatalf("first answer %q, %v", s, err)
		}
		conns = append(conns, open{c, r})
	}
	a.stop()
	from.Drain() // as a retiring worker process does
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	moved, closed := a.srv.Move(ctx, time.Time{}, func(key netip.Addr, state []byte, cl, be *os.File) error {
		if key != client {
			return fmt.Errorf("sent with key %v; want %v", key, client)
		}
		// Each one moved before counts once (transferred, given back).
		if h, _ := table.Held(client); h != 2 {
			return fmt.Errorf("at the send the master counts %d client permits; want 2 (this one's not given back yet)", h)
		}
		table.Transfer(2, key) // the master, as it gives the connection to a worker
		return b.srv.Resume(state, dup(t, cl), dup(t, be), false, key)
	})
	if moved != 2 || closed != 0 {
		t.Fatalf("moved %d, closed %d; want 2 and 0", moved, closed)
	}
	if h, _ := table.Held(client); h != 2 {
		t.Fatalf("after the move the master counts %d client permits; want the 2 moved", h)
	}
	for i, o := range conns {
		echoLine(t, o.r, o.c, fmt.Sprintf("moved %d", i))
	}
	if third := dialHTTP(t, b.addr, "echo.test"); closedAtOnce(third) != nil {
		t.Fatal("a third connection of a client at its limit of 2 was admitted after the move")
	}
	for _, o := range conns {
		o.c.Close()
	}
	waitFor(t, "the moved connections to end", func() bool { return b.srv.Active() == 0 })
	to.Drain()
	if h, _ := table.Held(client); h != 0 {
		t.Errorf("the master counts %d client permits after every connection closed", h)
	}
}
