package sniff

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// captureClientTimeout bounds every client a capture generator runs, and
// how long a capture listener waits for that client to connect.
const captureClientTimeout = 10 * time.Second

// captureOut is where a capture generator (TestCaptureTLS, TestCaptureHTTP)
// writes: the committed testdata directory when regenerating it, otherwise
// a fresh t.TempDir(), so that every run drives the real clients. Either way
// check then parses what was written and compares it with the golden table.
type captureOut struct {
	t   *testing.T
	dir string
}

// newCaptureOut returns a captureOut writing to testdata if update is set,
// or to a new temporary directory.
func newCaptureOut(t *testing.T, update bool, testdata string) captureOut {
	t.Helper()
	if !update {
		return captureOut{t: t, dir: t.TempDir()}
	}
	if err := os.MkdirAll(testdata, 0o755); err != nil {
		t.Fatal(err)
	}
	return captureOut{t: t, dir: testdata}
}

// write stores the capture b as name.
func (o captureOut) write(name string, b []byte) {
	o.t.Helper()
	path := filepath.Join(o.dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		o.t.Fatal(err)
	}
	o.t.Logf("wrote %s (%d bytes)", path, len(b))
}

// check reads the captures back and, for each file named in want (the
// golden table's file names, in order), calls check with its index in want
// and its bytes in a subtest of t named after the file. It fails t if the
// directory lacks a file want names or holds one it does not.
func (o captureOut) check(t *testing.T, want []string, check func(t *testing.T, i int, b []byte)) {
	t.Helper()
	entries, err := os.ReadDir(o.dir)
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string][]byte, len(entries))
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(o.dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = b
	}
	for name := range files {
		if !slices.Contains(want, name) {
			t.Errorf("%s/%s: captured but not in the golden table", o.dir, name)
		}
	}
	for i, name := range want {
		t.Run(name, func(t *testing.T) {
			b, ok := files[name]
			if !ok {
				t.Fatalf("%s/%s: in the golden table but not captured", o.dir, name)
			}
			check(t, i, b)
		})
	}
}

// captureNeedTools fails t unless every named program (a real client) is
// in PATH: .ci/run installs them.
func captureNeedTools(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			t.Fatalf("%s is needed to capture from real clients: %v; install it; .ci/run does", name, err)
		}
	}
}

// captureExpand replaces $HOST, $PORT and $ADDR in each of args with the
// parts of the listener address addr.
func captureExpand(addr string, args []string) []string {
	host, port, _ := net.SplitHostPort(addr)
	vars := map[string]string{"HOST": host, "PORT": port, "ADDR": addr}
	expanded := make([]string, len(args))
	for i, a := range args {
		expanded[i] = os.Expand(a, func(k string) string { return vars[k] })
	}
	return expanded
}

// captureRun runs the program name with args for at most
// captureClientTimeout, stdin empty (openssl s_client reads it) and no
// proxy settings from the environment, so that it talks to the loopback
// listener directly. The error holds the last line of its output, which
// says why.
func captureRun(name string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), captureClientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = nil
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return strings.HasSuffix(strings.ToLower(k), "_proxy")
	})
	out, err := cmd.CombinedOutput()
	if err != nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		return fmt.Errorf("%s: %v: %s", name, err, lines[len(lines)-1])
	}
	return nil
}

// captureListen returns a TCP listener on 127.0.0.1 whose Accept gives up
// after captureClientTimeout. It is closed when t ends.
func captureListen(t *testing.T) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := ln.SetDeadline(time.Now().Add(captureClientTimeout)); err != nil {
		t.Fatal(err)
	}
	return ln
}

// captureAccept returns the first connection on ln. If none comes, it fails
// t with what the client, which reports on clientErr, ended with.
func captureAccept(t *testing.T, ln *net.TCPListener, clientErr <-chan error) net.Conn {
	t.Helper()
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("no connection from the client: %v; client ended with: %v", err, <-clientErr)
	}
	return c
}
