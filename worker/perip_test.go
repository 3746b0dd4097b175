package worker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
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
