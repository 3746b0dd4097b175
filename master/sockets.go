package master

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/libp2p/go-reuseport"
	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/dupfd"
)

// rawFD is a listening socket's descriptor as the master holds it: a
// plain number, never an *os.File. os.NewFile (and net.FileListener)
// registers a non-blocking descriptor in the Go runtime's epoll, and a
// listening socket in an epoll wakes that process for every connection
// queued on it (EPOLLET or not): the master, which never accepts, would
// be switched in once per proxied connection. O_NONBLOCK belongs to the
// open file description the workers share (their accept needs it), so
// the master cannot make its copy blocking instead; and the runtime
// cannot unregister a live *os.File. -1 is a closed rawFD.
type rawFD int

// closedFD is a rawFD that was closed (or never opened).
const closedFD rawFD = -1

// Close closes the descriptor once; a second Close does nothing (a
// descriptor number is reused by the next open: closing it twice could
// close someone else's).
func (fd *rawFD) Close() error {
	if *fd < 0 {
		return nil
	}
	err := unix.Close(int(*fd))
	*fd = closedFD
	return err
}

// dup returns a close-on-exec duplicate of fd, which the caller owns.
func (fd rawFD) dup() (rawFD, error) {
	if fd < 0 {
		return closedFD, fmt.Errorf("dup: %w", os.ErrClosed)
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return closedFD, fmt.Errorf("dup: %w", err)
	}
	return rawFD(nfd), nil
}

// file returns a duplicate of fd as an *os.File named name, for one use
// that needs a file (exec's ExtraFiles): it is in the runtime's epoll
// until the caller closes it, which it must do at once after that use.
func (fd rawFD) file(name string) (*os.File, error) {
	d, err := fd.dup()
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(d), name), nil
}

// rawFDOf returns a close-on-exec duplicate of c's descriptor as a rawFD
// (c is left as it was; the caller closes it).
func rawFDOf(c syscall.Conn) (rawFD, error) {
	fd, err := dupfd.Fd(c)
	if err != nil {
		return closedFD, err
	}
	return rawFD(fd), nil
}

// socket is one listening socket the master owns for its workers.
type socket struct {
	name string // "reuseport/<addr>/<i>" or "shared/<addr>"
	addr string // the listener's config address
	fd   rawFD  // the master's descriptor; never accepted on here
}

// socketSet is every proxy listening socket, by listener address.
//
// mu guards the descriptors (rebind replaces them, close closes them,
// while a reload sends them to the successor); byAddr's shape and order
// are fixed once opened. mu is a leaf: nothing else is taken under it.
type socketSet struct {
	mu     sync.Mutex
	byAddr map[string][]socket
	order  []string // listener addresses in config order
}

// openSockets gets every proxy socket: from inherited (the predecessor's
// sockets by name, received over the state socket; openSockets takes
// ownership of the map's descriptors and closes those it does not use),
// else from the Upgrader (a predecessor of an older build passed them
// through tableflip's Fds), else bound now. A reuseport listener gets
// count sockets in one SO_REUSEPORT group; a shared one gets one. suffix
// is appended to reuseport socket names: "" always, except in the
// FreshSockets negative control, where it keeps names from matching the
// predecessor's.
//
// A socket must pass from generation to generation: one bound anew in a
// successor would get EADDRINUSE (shared) or be a new socket of the
// group, and the predecessor's would reset what is queued on it when it
// closes.
//
// With exclusive (a first master, not told to share), a reuseport
// listener's address is first checked to be free: another
// process listening there with SO_REUSEPORT (another sniproxy instance,
// say with another metrics port) would otherwise silently take part of the
// traffic.
func openSockets(upg fileGetter, inherited map[string]rawFD, cfg *config.Config, count int, suffix string, exclusive bool) (*socketSet, error) {
	set := &socketSet{byAddr: map[string][]socket{}}
	defer func() {
		closeAll(inherited)
		clear(inherited)
	}()
	// take returns the socket called name from the predecessor, or
	// closedFD when it had none.
	take := func(name string) (rawFD, error) {
		if fd, ok := inherited[name]; ok {
			delete(inherited, name)
			return fd, nil
		}
		f, err := upg.File(name)
		if err != nil {
			return closedFD, fmt.Errorf("master: inherit %s: %w", name, err)
		}
		if f == nil {
			return closedFD, nil
		}
		// Not in this master's epoll beyond this call. (tableflip keeps
		// its own copy, in its epoll, for this generation's life: the
		// price of a reload from an older build, paid once.)
		defer f.Close()
		fd, err := rawFDOf(f)
		if err != nil {
			return closedFD, fmt.Errorf("master: inherit %s: %w", name, err)
		}
		return fd, nil
	}
	open := func(name, addr string, reuse bool) (rawFD, error) {
		fd, err := take(name)
		if err != nil || fd >= 0 {
			return fd, err
		}
		return bind(name, addr, reuse)
	}
	for _, l := range cfg.Listeners {
		set.order = append(set.order, l.Address)
		if exclusive && l.ReusePort() {
			if err := checkPortFree(l.Address); err != nil {
				set.close()
				return nil, err
			}
		}
		if !l.ReusePort() {
			name := "shared/" + l.Address
			fd, err := open(name, l.Address, false)
			if err != nil {
				set.close()
				return nil, err
			}
			set.byAddr[l.Address] = []socket{{name: name, addr: l.Address, fd: fd}}
			continue
		}
		for i := range count {
			name := fmt.Sprintf("reuseport/%s/%d%s", l.Address, i, suffix)
			fd, err := open(name, l.Address, true)
			if err != nil {
				set.close()
				return nil, err
			}
			set.byAddr[l.Address] = append(set.byAddr[l.Address], socket{name: name, addr: l.Address, fd: fd})
		}
		// A previous generation with more workers had more sockets in the
		// group. Closing one would reset the connections queued on it, so
		// keep them all; forSlot spreads them over the workers.
		for i := count; ; i++ {
			name := fmt.Sprintf("reuseport/%s/%d%s", l.Address, i, suffix)
			fd, err := take(name)
			if err != nil {
				set.close()
				return nil, err
			}
			if fd < 0 {
				break
			}
			set.byAddr[l.Address] = append(set.byAddr[l.Address], socket{name: name, addr: l.Address, fd: fd})
		}
	}
	return set, nil
}

// fileGetter gives the files a predecessor passed through tableflip
// (tableflip's File).
type fileGetter interface {
	File(name string) (*os.File, error)
}

// ErrPortShared is the error of a first master whose listen address
// another process already listens on.
var ErrPortShared = errors.New("another process listens on this address (another sniproxy instance?); " +
	"refusing to split its traffic with it (run --share-ports allows it)")

// checkPortFree returns ErrPortShared when another process listens on addr:
// a bind without SO_REUSEPORT fails then with EADDRINUSE. Only a first
// master checks (it inherits no socket: whoever listens is not this
// instance); a successor shares its predecessor's sockets by design.
//
// EADDRINUSE alone is not proof: a connected socket whose local port is
// the same (a client that got it as its ephemeral port) makes the test
// bind fail too, and does not stop the real one (SO_REUSEADDR). So the
// refusal also needs a listening socket on that port (/proc/net/tcp,
// tcp6).
func checkPortFree(addr string) error {
	ln, err := listenConfig(false).Listen(context.Background(), "tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		if ap, perr := netip.ParseAddrPort(addr); perr == nil && !portListened(ap.Port()) {
			return nil
		}
		return fmt.Errorf("master: listen %s: %w", addr, ErrPortShared)
	}
	if err != nil {
		return nil // the real bind reports it
	}
	ln.Close()
	return nil
}

// listenConfig is how the master binds: in a SO_REUSEPORT group with
// reuse, and always plain TCP. Go's ListenConfig makes Multipath TCP
// listeners by default where the kernel has it (since Go 1.24); the
// proxy's clients are plain TCP, which such a listener serves through its
// MPTCP fallback: a few per cent more CPU per short connection (measured
// in bench/README.md), and socket options the kernel refuses on it
// (SO_ATTACH_REUSEPORT_CBPF: EOPNOTSUPP). nginx and HAProxy listen on
// plain TCP too.
func listenConfig(reuse bool) *net.ListenConfig {
	lc := &net.ListenConfig{}
	lc.SetMultipathTCP(false)
	if reuse {
		lc.Control = reuseport.Control
	}
	return lc
}

// bind binds a new listening socket for addr (in a SO_REUSEPORT group
// with reuse) and returns its descriptor: the net.Listener, and with it
// its place in the runtime's epoll, is closed before bind returns.
func bind(name, addr string, reuse bool) (rawFD, error) {
	ln, err := listenConfig(reuse).Listen(context.Background(), "tcp", addr)
	if err != nil {
		return closedFD, fmt.Errorf("master: listen %s: %w", addr, err)
	}
	defer ln.Close()
	// Not ln.File: see dupfd.
	fd, err := rawFDOf(ln.(*net.TCPListener))
	if err != nil {
		return closedFD, fmt.Errorf("master: %s: %w", name, err)
	}
	return fd, nil
}

// forSlot returns the sockets worker slot serves out of n workers: every
// shared socket, and the reuseport sockets whose index is slot modulo n, so
// that every socket of a group is served even when there are more sockets
// than workers.
func (s *socketSet) forSlot(slot, n int) []socket {
	var out []socket
	for _, addr := range s.order {
		socks := s.byAddr[addr]
		if len(socks) == 1 && socks[0].name == "shared/"+addr {
			out = append(out, socks[0])
			continue
		}
		for i, sk := range socks {
			if i%n == slot {
				out = append(out, sk)
			}
		}
	}
	return out
}

// filesForSlot returns the names of the sockets worker slot serves out
// of n workers (forSlot) and a duplicate of each as an *os.File for its
// exec: the caller closes the files as soon as the worker is started.
func (s *socketSet) filesForSlot(slot, n int) ([]string, []*os.File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	socks := s.forSlot(slot, n)
	names := make([]string, len(socks))
	files := make([]*os.File, 0, len(socks))
	for i, sk := range socks {
		names[i] = sk.name
		f, err := sk.fd.file(sk.name)
		if err != nil {
			closeFiles(files)
			return nil, nil, fmt.Errorf("master: %s: %w", sk.name, err)
		}
		files = append(files, f)
	}
	return names, files, nil
}

// dups returns every socket's name and a duplicate of its descriptor (for
// the successor), which the caller closes.
func (s *socketSet) dups() ([]string, []rawFD, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	var fds []rawFD
	for _, addr := range s.order {
		for _, sk := range s.byAddr[addr] {
			d, err := sk.fd.dup()
			if err != nil {
				closeFDs(fds)
				return nil, nil, fmt.Errorf("master: %s: %w", sk.name, err)
			}
			names = append(names, sk.name)
			fds = append(fds, d)
		}
	}
	return names, fds, nil
}

// close closes the master's descriptors. Sockets stay open while workers,
// a successor or descriptors in flight to it hold copies. A second close
// does nothing.
func (s *socketSet) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, socks := range s.byAddr {
		for i := range socks {
			socks[i].fd.Close()
		}
	}
}

// rebind shuts down every reuseport socket served by slot and binds a fresh
// socket in its place. It exists only for the negative control of the e2e
// tests (Options.ReplaceDeadSockets): it does what closing the last copy of
// the socket would do (a close alone would not while another process,
// a draining predecessor say, holds a copy): the kernel resets every
// connection queued on it, which the master must never do.
func (s *socketSet) rebind(slot, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, addr := range s.order {
		socks := s.byAddr[addr]
		for i := range socks {
			sk := &socks[i]
			if i%n != slot || sk.name == "shared/"+addr || sk.fd < 0 {
				continue
			}
			unix.Shutdown(int(sk.fd), unix.SHUT_RDWR)
			sk.fd.Close()
			fd, err := bind(sk.name, addr, true)
			if err != nil {
				return fmt.Errorf("master: rebind %s: %w", sk.name, err)
			}
			sk.fd = fd
		}
	}
	return nil
}

// closeFiles closes every file of fs.
func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// closeFDs closes every descriptor of fds.
func closeFDs(fds []rawFD) {
	for i := range fds {
		fds[i].Close()
	}
}

// portListened reports whether some TCP socket of this host's network
// namespace listens on port, per /proc/net/tcp and tcp6 (true when they
// cannot be read: the caller then refuses, as it would have).
func portListened(port uint16) bool {
	want := fmt.Sprintf(":%04X", port)
	read := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		read++
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			// sl local_address rem_address st ...; st 0A is LISTEN.
			if len(fields) > 3 && fields[3] == "0A" && strings.HasSuffix(fields[1], want) {
				return true
			}
		}
	}
	return read == 0
}
