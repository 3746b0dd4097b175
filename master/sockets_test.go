package master

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
)

// polled returns the descriptors in this process's epoll sets (the Go
// runtime's poller): "tfd:" in /proc/self/fdinfo of each eventpoll.
func polled(t *testing.T) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]bool{}
	for _, e := range ents {
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || link != "anon_inode:[eventpoll]" {
			continue
		}
		b, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 1 && f[0] == "tfd:" {
				if n, err := strconv.Atoi(f[1]); err == nil {
					out[n] = true
				}
			}
		}
	}
	return out
}

// inode returns the inode of the socket fd refers to (0 when fd is not
// open).
func inode(fd rawFD) uint64 {
	var st unix.Stat_t
	if unix.Fstat(int(fd), &st) != nil {
		return 0
	}
	return st.Ino
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// listenersConfig returns a config of the listeners at addrs, reuseport
// or not.
func listenersConfig(addrs map[string]bool, order ...string) *config.Config {
	cfg := &config.Config{}
	for _, a := range order {
		reuse := addrs[a]
		cfg.Listeners = append(cfg.Listeners, config.Listener{Address: a, Reuseport: &reuse})
	}
	return cfg
}

// noFiles is a predecessor that passed nothing through tableflip.
type noFiles struct{}

func (noFiles) File(string) (*os.File, error) { return nil, nil }

// A first master binds its sockets as plain TCP and holds them outside
// the runtime's poller (in it, every connection queued would wake the master); the
// transient files made for a worker's exec are there only until closed,
// and accept there as the worker would.
func TestOpenSocketsBindsOutsideThePoller(t *testing.T) {
	ra, sa := freeAddr(t), freeAddr(t)
	set, err := openSockets(noFiles{}, map[string]rawFD{}, listenersConfig(map[string]bool{ra: true, sa: false}, ra, sa), 2, "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer set.close()
	var fds []rawFD
	for _, addr := range set.order {
		for _, sk := range set.byAddr[addr] {
			fds = append(fds, sk.fd)
		}
	}
	if len(fds) != 3 {
		t.Fatalf("%d sockets; want 2 reuseport and 1 shared", len(fds))
	}
	inPoller := polled(t)
	for _, fd := range fds {
		if inPoller[int(fd)] {
			t.Errorf("socket %d is in the runtime's epoll", fd)
		}
		if ok, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || ok != 1 {
			t.Errorf("socket %d does not listen: %v", fd, err)
		}
		// Plain TCP, as nginx and HAProxy listen: not the Multipath TCP
		// Go's ListenConfig picks by default where the kernel has it.
		if p, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL); err != nil || p != unix.IPPROTO_TCP {
			t.Errorf("socket %d: protocol %d (%v); want IPPROTO_TCP (%d)", fd, p, err, unix.IPPROTO_TCP)
		}
	}
	names, files, err := set.filesForSlot(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"reuseport/" + ra + "/0", "reuseport/" + ra + "/1", "shared/" + sa}; !slices.Equal(names, want) {
		t.Errorf("names %q; want %q", names, want)
	}
	// The shared socket accepts through the worker's copy.
	ln, err := net.FileListener(files[2])
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", sa)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(waitLimit))
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	transient := make([]int, len(files))
	for i, f := range files {
		transient[i] = int(f.Fd())
	}
	// They are in it while open: what polled sees.
	inPoller = polled(t)
	for _, fd := range transient {
		if !inPoller[fd] {
			t.Errorf("worker's copy %d not in the runtime's epoll while open; polled cannot see it", fd)
		}
	}
	closeFiles(files)
	inPoller = polled(t)
	for _, fd := range transient {
		if inPoller[fd] {
			t.Errorf("worker's copy %d still in the runtime's epoll after close", fd)
		}
	}
}

// A successor takes its predecessor's sockets by name: those it received
// over the state socket, those an older build passed through tableflip,
// and the extra reuseport sockets of a predecessor with more workers. It
// binds none of them and closes the ones it does not use.
func TestOpenSocketsInherits(t *testing.T) {
	ra, sa := freeAddr(t), freeAddr(t)
	pred, err := openSockets(noFiles{}, map[string]rawFD{}, listenersConfig(map[string]bool{ra: true, sa: false}, ra, sa), 3, "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer pred.close()
	names, fds, err := pred.dups()
	if err != nil {
		t.Fatal(err)
	}
	inherited := map[string]rawFD{}
	want := map[string]uint64{}
	for i, name := range names {
		want[name] = inode(fds[i])
		inherited[name] = fds[i]
	}
	// The shared socket comes through tableflip, as from an older build.
	shared := "shared/" + sa
	sf := os.NewFile(uintptr(inherited[shared]), shared)
	delete(inherited, shared)
	upg := newFakeFlipper(t)
	upg.inherited[shared] = sf
	// A socket of a listener no longer configured.
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gone.Close()
	goneFD, err := rawFDOf(gone.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	goneIno := inode(goneFD)
	inherited["reuseport/"+gone.Addr().String()+"/0"] = goneFD

	// exclusive is false for a successor: its predecessor listens there.
	set, err := openSockets(upg, inherited, listenersConfig(map[string]bool{ra: true, sa: false}, ra, sa), 2, "", false)
	if err != nil {
		t.Fatal(err)
	}
	defer set.close()
	got := map[string]uint64{}
	for _, addr := range set.order {
		for _, sk := range set.byAddr[addr] {
			got[sk.name] = inode(sk.fd)
		}
	}
	if len(got) != len(want) {
		t.Errorf("sockets %v; want %v", got, want)
	}
	for name, ino := range want {
		if got[name] != ino || ino == 0 {
			t.Errorf("%s: inode %d; want the predecessor's %d", name, got[name], ino)
		}
	}
	if ino := inode(goneFD); ino == goneIno {
		t.Errorf("the socket of a listener no longer configured is still open (%d)", goneFD)
	}
	if len(inherited) != 0 {
		t.Errorf("openSockets left %v in the inherited map", inherited)
	}
}

// close is idempotent: a second close must not close a descriptor that
// reuses a number the first one closed.
func TestSocketSetCloseTwice(t *testing.T) {
	addr := freeAddr(t)
	set, err := openSockets(noFiles{}, map[string]rawFD{}, listenersConfig(map[string]bool{addr: false}, addr), 1, "", false)
	if err != nil {
		t.Fatal(err)
	}
	set.close()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	set.close()
	if _, err := f.Stat(); err != nil {
		t.Fatalf("a file opened after the first close was closed by the second: %v", err)
	}
	if _, _, err := set.dups(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("dups of a closed set: %v; want os.ErrClosed", err)
	}
}

// The state socket carries the sockets by SCM_RIGHTS with their names,
// in several messages when there are more than one sendmsg takes, ahead
// of the succession state; they arrive close-on-exec and outside the
// runtime's poller.
func TestStateSocketCarriesSockets(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	want := inodeOfListener(t, ln)
	n := maxFDsPerMsg + 10
	var names []string
	var fds []rawFD
	for i := range n {
		fd, err := rawFDOf(ln.(*net.TCPListener))
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, fmt.Sprintf("reuseport/x/%d", i))
		fds = append(fds, fd)
	}
	defer closeFDs(fds)
	pred, succ := stateSocketPair(t)
	go func() {
		if err := pred.sendSockets(names, fds); err != nil {
			t.Error(err)
		}
		pred.send(stateMsg{State: &successionState{Generation: 4}})
	}()
	succ.conn.SetReadDeadline(time.Now().Add(waitLimit))
	got, next, err := succ.recvSockets()
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(got)
	if next.State == nil || next.State.Generation != 4 {
		t.Errorf("message after the sockets %+v; want the State", next)
	}
	if len(got) != n {
		t.Fatalf("%d sockets; want %d", len(got), n)
	}
	inPoller := polled(t)
	for _, name := range names {
		fd, ok := got[name]
		if !ok {
			t.Fatalf("no socket %s", name)
		}
		if inode(fd) != want {
			t.Errorf("%s is not the socket sent", name)
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s not close-on-exec: %v", name, err)
		}
		if inPoller[int(fd)] {
			t.Errorf("%s is in the runtime's epoll", name)
		}
	}
}

// inodeOfListener returns the inode of ln's socket.
func inodeOfListener(t *testing.T, ln net.Listener) uint64 {
	t.Helper()
	fd, err := rawFDOf(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	return inode(fd)
}

// A reload sends the sockets first on the state socket, then the
// succession state; a successor takes them before it opens its sockets.
func TestReloadPassesSockets(t *testing.T) {
	addr := freeAddr(t)
	set, err := openSockets(noFiles{}, map[string]rawFD{}, listenersConfig(map[string]bool{addr: true}, addr), 2, "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer set.close()
	p := newParts(t, 0)
	p.succession.socks = set
	var successor *os.File
	p.upg.upgrade = func(int) error {
		p.upg.mu.Lock()
		successor = p.upg.added[stateSocketName]
		delete(p.upg.added, stateSocketName)
		p.upg.mu.Unlock()
		return nil
	}
	p.succession.readyWait = time.Millisecond
	done := make(chan reloadOutcome, 1)
	go p.succession.reload(time.Now(), done)
	if out := <-done; out.err != nil {
		t.Fatal(out.err)
	}

	// The successor's side, as inherit reads it.
	next := newParts(t, 0)
	next.upg.inherited[stateSocketName] = successor
	if err := next.succession.inherit(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(next.succession.close)
	if next.succession.generation != 2 {
		t.Errorf("successor's generation %d; want 2", next.succession.generation)
	}
	got := next.succession.takeSockets()
	defer closeAll(got)
	for i, sk := range set.byAddr[addr] {
		if name := fmt.Sprintf("reuseport/%s/%d", addr, i); sk.name != name || inode(got[name]) != inode(sk.fd) {
			t.Errorf("successor's %s is not the predecessor's", name)
		}
	}
	if len(got) != 2 {
		t.Errorf("successor got %d sockets; want 2", len(got))
	}
}
