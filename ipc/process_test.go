package ipc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
)

// workerEnv makes the test binary act as a worker (testWorker).
const workerEnv = "SNIPROXY_IPC_TEST_WORKER"

// countSockets is a Ping.Seq the test worker answers with a Pong giving the
// number of sockets it has open.
const countSockets = 1 << 63

func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) != "" {
		os.Exit(testWorker())
	}
	os.Exit(m.Run())
}

// testWorker is a worker: it says hello on fd 3, answers what the master
// sends, and exits 0 at EOF (the lifeline).
func testWorker() int {
	f := os.NewFile(3, "ipc")
	c, err := FileConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 10
	}
	if err := c.SendBody(Hello{Proto: Version, Slot: 2, PID: os.Getpid(), Generation: 7}); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 11
	}
	for {
		m, err := c.Recv()
		if err == io.EOF {
			return 0
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			return 12
		}
		b, err := Decode(m)
		if err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			return 13
		}
		switch b := b.(type) {
		case Config:
			err = c.SendBody(Stats{Delta: stats.Snapshot{BytesIn: uint64(len(b.YAML))}})
		case Ping:
			if b.Seq == countSockets {
				b.Seq = uint64(openSockets())
			}
			err = c.SendBody(Pong(b))
		case Listeners:
			for i, f := range m.Files {
				err = serveOnce(f, b.Names[i])
				if err != nil {
					break
				}
			}
			m.CloseFiles()
			if err == nil {
				err = c.SendBody(Ready{})
			}
		case Stop:
			return 3
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			return 14
		}
	}
}

// serveOnce accepts one connection on the listening socket f and writes
// name to it.
func serveOnce(f *os.File, name string) error {
	ln, err := net.FileListener(f)
	if err != nil {
		return err
	}
	defer ln.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(name))
	return err
}

// openSockets counts the sockets among the process's descriptors.
func openSockets() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		if t, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(t, "socket:") {
			n++
		}
	}
	return n
}

// startWorker starts the test binary as a worker on a new Pair.
func startWorker(t *testing.T) (*Conn, *exec.Cmd, *bytes.Buffer) {
	t.Helper()
	master, wf, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), workerEnv+"=1")
	cmd.ExtraFiles = []*os.File{wf}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	wf.Close()
	t.Cleanup(func() {
		master.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	m, err := master.Recv()
	if err != nil {
		t.Fatalf("Recv hello: %v (worker stderr: %s)", err, &stderr)
	}
	b, err := Decode(m)
	if err != nil {
		t.Fatalf("Decode hello: %v", err)
	}
	if want := (Hello{Proto: Version, Slot: 2, PID: cmd.Process.Pid, Generation: 7}); b != want {
		t.Fatalf("hello = %+v; want %+v", b, want)
	}
	return master, cmd, &stderr
}

// exchange sends b and returns the decoded answer.
func exchange(t *testing.T, c *Conn, b Body, files ...*os.File) Body {
	t.Helper()
	if err := c.SendBody(b, files...); err != nil {
		t.Fatalf("Send %v: %v", b.Type(), err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := c.Recv()
	if err != nil {
		t.Fatalf("Recv after %v: %v", b.Type(), err)
	}
	r, err := Decode(m)
	if err != nil {
		t.Fatalf("Decode after %v: %v", b.Type(), err)
	}
	return r
}

// TestWorkerProcess runs a real worker process over a Pair: hello, config,
// ping, a listening socket sent over, and the lifeline (the worker exits
// when the master's end closes).
func TestWorkerProcess(t *testing.T) {
	// A sibling's pair, open while the worker starts: close-on-exec must
	// keep it out of the worker.
	sibling, siblingFile, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer sibling.Close()
	defer siblingFile.Close()

	master, cmd, stderr := startWorker(t)

	// FileConn's duplicate of fd 3 (closed since); nothing inherited.
	if got := exchange(t, master, Ping{Seq: countSockets}); got != (Pong{Seq: 1}) {
		t.Errorf("worker has %v sockets open; want 1 (its end of the pair)", got)
	}
	cfg := bytes.Repeat([]byte("- name: x.example\n"), 30000) // 540 KB
	if got := exchange(t, master, Config{YAML: cfg}); got.(Stats).Delta.BytesIn != uint64(len(cfg)) {
		t.Errorf("worker got a config of %d bytes; want %d", got.(Stats).Delta.BytesIn, len(cfg))
	}
	if got := exchange(t, master, Ping{Seq: 99}); got != (Pong{Seq: 99}) {
		t.Errorf("got %v; want Pong 99", got)
	}

	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	lf, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	const name = "reuseport/127.0.0.1:0/2"
	if err := master.SendBody(Listeners{Names: []string{name}}, lf); err != nil {
		t.Fatal(err)
	}
	lf.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	c.Close()
	if string(got) != name {
		t.Fatalf("connection to the handed-over socket read %q, %v; want %q (worker stderr: %s)", got, err, name, stderr)
	}
	if m, err := master.Recv(); err != nil || m.Type != TypeReady {
		t.Fatalf("Recv = %v, %v; want ready", m.Type, err)
	}

	// Lifeline: the master's end closes, the worker sees EOF and exits 0.
	master.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("worker exited with %v; want 0 (stderr: %s)", err, stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("worker still running 10s after the master's end closed")
	}
}

// TestWorkerKilled checks that the master's Recv returns io.EOF promptly
// when its worker is SIGKILLed.
func TestWorkerKilled(t *testing.T) {
	master, cmd, _ := startWorker(t)
	errc := make(chan error, 1)
	go func() {
		_, err := master.Recv()
		errc <- err
	}()
	// Deliberate: give Recv time to block first, so the kill most likely
	// finds it waiting (the test holds either way).
	time.Sleep(20 * time.Millisecond)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("Recv = %v; want io.EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Recv did not return within 5s of the worker's death")
	}
}
