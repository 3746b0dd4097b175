package master

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/ipc"
)

func TestWorkerEnvScrubbed(t *testing.T) {
	got := workerEnv([]string{"PATH=/bin", "TABLEFLIP_HAS_PARENT_7DIU3=1", "NOTIFY_SOCKET=/run/x", "SNIPROXY_WORKERS=2", "LISTEN_FDS=3"})
	want := []string{"PATH=/bin", "SNIPROXY_WORKERS=2"}
	if !slices.Equal(got, want) {
		t.Errorf("got %v; want %v", got, want)
	}
}

func TestForSlot(t *testing.T) {
	s := &socketSet{byAddr: map[string][]socket{}, order: []string{"a:1", "b:2"}}
	for i := range 3 {
		s.byAddr["a:1"] = append(s.byAddr["a:1"], socket{name: "reuseport/a:1/" + string(rune('0'+i))})
	}
	s.byAddr["b:2"] = []socket{{name: "shared/b:2"}}
	names := func(socks []socket) string {
		var n []string
		for _, sk := range socks {
			n = append(n, sk.name)
		}
		return strings.Join(n, " ")
	}
	// Three reuseport sockets over two workers: none left unserved.
	for _, tc := range []struct {
		slot, n int
		want    string
	}{
		{0, 2, "reuseport/a:1/0 reuseport/a:1/2 shared/b:2"},
		{1, 2, "reuseport/a:1/1 shared/b:2"},
		{0, 3, "reuseport/a:1/0 shared/b:2"},
		{0, 1, "reuseport/a:1/0 reuseport/a:1/1 reuseport/a:1/2 shared/b:2"},
	} {
		if got := names(s.forSlot(tc.slot, tc.n)); got != tc.want {
			t.Errorf("forSlot(%d, %d) = %q; want %q", tc.slot, tc.n, got, tc.want)
		}
	}
}

func TestControlSocketPath(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "/run/sniproxy")
	if got := ControlSocketPath(&config.Config{}); got != "/run/sniproxy/sniproxy.sock" {
		t.Errorf("got %q", got)
	}
	if got := ControlSocketPath(&config.Config{ControlSocket: "/x.sock"}); got != "/x.sock" {
		t.Errorf("got %q", got)
	}
	yes := func(string) bool { return true }
	no := func(string) bool { return false }
	for _, c := range []struct {
		configured, runtime string
		writable            func(string) bool
		want                string
	}{
		{"/x.sock", "/r", yes, "/x.sock"},
		{"", "/r:/s", yes, "/r/sniproxy.sock"},
		{"", "", yes, "/run/sniproxy/sniproxy.sock"},
		{"", "", no, filepath.Join(os.TempDir(), fmt.Sprintf("sniproxy-%d", os.Geteuid()), "sniproxy.sock")},
	} {
		if got := DefaultControlSocket(c.configured, c.runtime, c.writable); got != c.want {
			t.Errorf("DefaultControlSocket(%q, %q) = %q; want %q", c.configured, c.runtime, got, c.want)
		}
	}
}

// newTestMaster composes a Master as Run does, over workers without
// processes that run play, and a fake tableflip.
func newTestMaster(t *testing.T, play func(*fakeWorker)) (*Master, *fakeStarts, *fakeFlipper, chan os.Signal) {
	t.Helper()
	cfg, err := config.Parse([]byte("listen_addrs: [\"127.0.0.1:8443\"]\nworkers: 2\nmax_connections: 10\nshutdown_timeout: 5s\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	sigs := make(chan os.Signal, 1)
	opts := withDefaults(Options{Config: cfg, Log: quietLog(), Signals: sigs,
		LoadConfig: func(string) (*config.Config, error) { return cfg, nil }})
	m := &Master{opts: opts, cfg: cfg, log: opts.Log, start: time.Now(), reloads: make(chan reloadRequest)}
	fs := &fakeStarts{t: t, run: play}
	flip := newFakeFlipper(t)
	if err := m.compose(flip, fs.start, func() {}); err != nil {
		t.Fatal(err)
	}
	m.sup.after = func(d time.Duration, f func()) { f() } // restarts due at once
	return m, fs, flip, sigs
}

// playWorker is a well-behaved worker: ready at once; told to retire, it
// stops accepting and, with nothing open, exits; told to stop, it exits.
func playWorker(w *fakeWorker) {
	w.w.SendBody(ipc.Ready{})
	for {
		msg, err := w.w.Recv()
		if err != nil {
			return
		}
		b, _ := ipc.Decode(msg)
		msg.CloseFiles()
		switch b.(type) {
		case ipc.Retire:
			w.w.SendBody(ipc.Stopped{})
			w.w.Close()
			w.exit()
			return
		case ipc.Stop:
			w.w.Close()
			w.exit()
			return
		}
	}
}

// The master's loop over its parts: reload requests made while one runs
// get its result; a worker that dies with permits gives them back and is
// restarted in its slot; SIGTERM retires the workers and ends the loop.
func TestMasterLoop(t *testing.T) {
	m, fs, flip, sigs := newTestMaster(t, playWorker)
	if err := m.startWorkers(); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	flip.upgrade = func(int) error {
		<-release
		return errors.New("no successor today")
	}
	errc := make(chan error, 1)
	go func() { errc <- m.loop() }()

	// Two reload requests, the second while the first runs: one Upgrade.
	r1 := reloadRequest{reply: make(chan reloadResult, 1)}
	r2 := reloadRequest{reply: make(chan reloadResult, 1)}
	m.reloads <- r1
	waitUntil(t, "the Upgrade", func() bool { return slices.Contains(flip.callList(), "Upgrade") })
	m.reloads <- r2
	close(release)
	for _, r := range []reloadRequest{r1, r2} {
		if res := <-r.reply; !strings.Contains(res.Error, "no successor today") {
			t.Errorf("reload answered %+v; want the Upgrade's error", res)
		}
	}
	if n := strings.Count(strings.Join(flip.callList(), " "), "Upgrade"); n != 1 {
		t.Errorf("%d Upgrades for two requests; want 1", n)
	}
	if p := m.counters.process(); p.ReloadsFailed != 1 {
		t.Errorf("reloads failed %d; want 1", p.ReloadsFailed)
	}

	// Worker of slot 1 takes permits, then dies.
	dead := fs.made[1]
	dead.w.SendBody(ipc.LeaseRequest{Want: 3})
	waitUntil(t, "the grant", func() bool { return m.broker.pool.Free() == 7 })
	dead.w.Close()
	dead.exit()
	waitUntil(t, "the restart", func() bool { return fs.count() == 3 })
	waitUntil(t, "the permits back", func() bool { return m.broker.pool.Free() == 10 })
	waitUntil(t, "the new worker in slot 1", func() bool {
		c := m.sup.list()[1]
		return c != nil && c != dead.c && c.isReady()
	})
	if p := m.process(); p.WorkerRestarts != 1 || p.Workers != 2 {
		t.Errorf("process %+v; want 1 restart, 2 workers", p)
	}

	sigs <- syscall.SIGTERM
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("loop: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("loop did not end on SIGTERM")
	}
	for _, c := range m.sup.list() {
		if c != nil {
			t.Errorf("worker of slot %d not reaped", c.slot)
		}
	}
}

// parseListening parses y after a listen_addrs line, failing t on error.
func parseListening(t *testing.T, y string) *config.Config {
	t.Helper()
	c, err := config.Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\n"+y), []string{})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestWorkerCredential(t *testing.T) {
	parse := func(y string) *config.Config { return parseListening(t, y) }
	if cr, err := workerCredential(parse(""), 0); cr != nil || err != nil {
		t.Errorf("no user: %+v, %v; want workers as the master", cr, err)
	}
	cr, err := workerCredential(parse("user: \"65534\"\ngroup: \"65534\"\n"), 0)
	if err != nil || cr == nil || cr.Uid != 65534 || cr.Gid != 65534 {
		t.Errorf("root master, user 65534: %+v, %v", cr, err)
	}
	if cr, err := workerCredential(parse("user: \"65534\"\n"), 65534); cr != nil || err != nil {
		t.Errorf("master already that user: %+v, %v; want nil, nil", cr, err)
	}
	if _, err := workerCredential(parse("user: \"65534\"\n"), 1000); err == nil {
		t.Error("a non-root master may not start workers as another user")
	}
}

// The control socket is 0600 whatever the umask; a path that is not a
// socket is never removed; a live socket is never taken over; a stale one
// is.
func TestListenControl(t *testing.T) {
	dir := t.TempDir()
	old := syscall.Umask(0)
	defer syscall.Umask(old)

	path := filepath.Join(dir, "ctl.sock")
	ln, err := listenControl("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v) under umask 000; want 0600", fi.Mode().Perm(), err)
	}
	// Live: refused, and left alone.
	if ln2, err := listenControl("unix", path); err == nil {
		ln2.Close()
		t.Error("took over a live socket")
	}
	ln.Close() // net.UnixListener.Close removes the file; make a stale one:
	if l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"}); err == nil {
		l.SetUnlinkOnClose(false)
		l.Close()
	}
	ln, err = listenControl("unix", path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln.Close()

	file := filepath.Join(dir, "precious")
	os.WriteFile(file, []byte("keep me"), 0o600)
	if ln, err := listenControl("unix", file); err == nil {
		ln.Close()
		t.Error("listened on a path that is a regular file")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Errorf("the regular file at the control socket path was touched: %q, %v", b, err)
	}
}

// The endpoints bound what a client can hold: a request whose headers never
// end is dropped after the header timeout, and connections over the cap
// wait instead of being served.
func TestEndpointLimits(t *testing.T) {
	serve := func(lim endpointLimits) (string, *endpoints) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var e endpoints
		e.serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) }), lim)
		t.Cleanup(e.close)
		return ln.Addr().String(), &e
	}

	addr, _ := serve(endpointLimits{conns: 4, header: 300 * time.Millisecond, idle: time.Second})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n")) // and never the end of the headers
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	io.Copy(io.Discard, c)
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("a request with unfinished headers held its connection %v; want about the 300ms header timeout", d)
	}

	addr, _ = serve(endpointLimits{conns: 2, header: 5 * time.Second, idle: 5 * time.Second})
	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	client := &http.Client{Timeout: 300 * time.Millisecond}
	if resp, err := client.Get("http://" + addr + "/"); err == nil {
		resp.Body.Close()
		t.Fatal("a third connection was served with the cap of 2 taken")
	}
	idle[0].Close()
	client.Timeout = 5 * time.Second
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("once a connection closed: %v", err)
	}
	resp.Body.Close()
	idle[1].Close()
}

// A port some client socket happens to use as its local port is not
// "another instance listening": only a listening socket is.
func TestCheckPortFree(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if !portListened(uint16(port)) {
		t.Errorf("portListened(%d) false with a listener on it", port)
	}
	if err := checkPortFree(fmt.Sprintf("127.0.0.1:%d", port)); !errors.Is(err, ErrPortShared) {
		t.Errorf("checkPortFree with a listener: %v; want ErrPortShared", err)
	}
	// A connection whose client side has the port as its local port.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, _ := ln.Accept()
	defer s.Close()
	local := c.LocalAddr().(*net.TCPAddr).Port
	ln.Close()
	if err := checkPortFree(fmt.Sprintf("[::]:%d", local)); err != nil {
		t.Errorf("checkPortFree on a port only a client socket uses: %v; want nil", err)
	}
}
