package worker

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// startProcess runs a worker Process in-process over a real ipc pair, with
// one shared listening socket, and returns the master's end, the
// listener's address and Run's result.
func startProcess(t *testing.T, yaml string) (*ipc.Conn, string, chan error) {
	t.Helper()
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mc.Close() })
	wc, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	lf, err := ln.File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	p := &Process{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Conn: wc, Files: []NamedFile{{Name: "shared/" + addr, File: lf}}}
	ran := make(chan error, 1)
	go func() { ran <- p.Run() }()
	if _, ok := recvBody(t, mc).(ipc.Hello); !ok {
		t.Fatal("no hello")
	}
	if err := mc.SendBody(ipc.Config{YAML: []byte(fmt.Sprintf("listeners: [{address: %q}]\n%s", addr, yaml))}); err != nil {
		t.Fatal(err)
	}
	if _, ok := recvBody(t, mc).(ipc.Ready); !ok {
		t.Fatal("no ready")
	}
	return mc, addr, ran
}

func recvBody(t *testing.T, c *ipc.Conn) ipc.Body {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := c.Recv()
	if err != nil {
		t.Fatal(err)
	}
	m.CloseFiles()
	b, err := ipc.Decode(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestProcessMigrateWhileServing(t *testing.T) {
	// A hurry can reach a worker before its Drain: it must still read its
	// master (here a lease grant a connection waits for) and exit.
	mc, addr, ran := startProcess(t, "timeouts: {connect: 2, client_hello: 2, idle: 30}\nmax_connections: 8\nworkers: 1\nshutdown_timeout: 30\nroutes: [{match: a.test, backend: \"127.0.0.1:1\"}]\n")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for {
		if _, ok := recvBody(t, mc).(ipc.LeaseRequest); ok {
			break
		}
	}
	mc.SendBody(ipc.Migrate{})
	mc.SendBody(ipc.LeaseGrant{N: 1})
	go func() {
		for {
			if _, err := mc.Recv(); err != nil {
				return
			}
		}
	}()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("worker still running 8 s after Migrate")
	}
	expectEOF(t, c)
}
