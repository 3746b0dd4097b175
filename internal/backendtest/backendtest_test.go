package backendtest

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	c, err := net.Dial("tcp", Echo(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "ping")
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "ping" {
		t.Errorf("echo: got %q, %v; want %q and EOF", b, err, "ping")
	}
}

func TestAfterHead(t *testing.T) {
	addr := AfterHead(t, func(c net.Conn, r *bufio.Reader) {
		rest, _ := r.ReadString('\n')
		io.WriteString(c, "after head: "+rest)
	})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\nbody\n")
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "after head: body\n" {
		t.Errorf("got %q, %v; want %q", line, err, "after head: body\n")
	}
}

func TestTLS(t *testing.T) {
	addr, pool := TLS(t, "B", "a.test", "b.test")
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "b.test", RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || strings.TrimSpace(line) != "B b.test" {
		t.Errorf("greeting %q, %v; want %q", line, err, "B b.test")
	}
}

// TestCleanupClosesHeldConnections: a handler waiting on its connection
// ends with the test, and the client sees the close.
func TestCleanupClosesHeldConnections(t *testing.T) {
	var c net.Conn
	t.Run("server", func(t *testing.T) {
		addr := Serve(t, func(c net.Conn) {
			io.WriteString(c, "x")
			io.Copy(io.Discard, c)
		})
		var err error
		if c, err = net.Dial("tcp", addr); err != nil {
			t.Fatal(err)
		}
		// The handler runs: the connection is the server's to close.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
	})
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("read after the server's test ended: %d, %v; want EOF", n, err)
	}
}
