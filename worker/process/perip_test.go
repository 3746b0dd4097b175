package process

import (
	"net/netip"
	"testing"

	"github.com/sniproxy/sniproxy/ipc"
)

// TestProcessPerIPLease: the first connection of a client waits for the
// master's per-client grant; the next ones, within the lease, are admitted
// without asking (they would wait for ever otherwise); past it, one more
// request, and a refusal closes the connection.
func TestProcessPerIPLease(t *testing.T) {
	m := startProcess(t, testConfig(echoBackend(t), "limits: {per_ip_connections: 8}\n"), true)
	key := netip.MustParseAddr("127.0.0.1")
	done := make(chan error, 1)
	go func() {
		c, _, err := tryEcho(m.addr)
		if c != nil {
			t.Cleanup(func() { c.Close() })
		}
		done <- err
	}()
	req, _ := expect[ipc.PerIP](m)
	if req.Return || req.Key != key || req.Conns != 4 || req.Tokens != 0 {
		t.Fatalf("request %+v; want 4 client permits of %v (a lease of 8/2 for one worker)", req, key)
	}
	m.send(ipc.PerIPGrant{Key: key, Conns: 4})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for range 3 {
		openEcho(t, m.addr) // no request: they come from the lease
	}
	go func() {
		c, _, err := tryEcho(m.addr)
		if c != nil {
			c.Close()
		}
		done <- err
	}()
	req, _ = expect[ipc.PerIP](m)
	if req.Return || req.Key != key {
		t.Fatalf("second request %+v", req)
	}
	m.send(ipc.PerIPGrant{Key: key})
	if err := <-done; err == nil {
		t.Fatal("the connection the master refused was served")
	}
}
