package master

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"github.com/cloudflare/tableflip"
	"github.com/libp2p/go-reuseport"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/dupfd"
)

// socket is one listening socket the master owns for its workers.
type socket struct {
	name string   // tableflip key: "reuseport/<addr>/<i>" or "shared/<addr>"
	addr string   // the listener's config address
	file *os.File // the master's descriptor; never accepted on here
}

// socketSet is every proxy listening socket, by listener address.
type socketSet struct {
	byAddr map[string][]socket
	order  []string // listener addresses in config order
}

// openSockets gets every proxy socket from the Upgrader, inherited from the
// previous generation when it had it, else bound now. A reuseport listener
// gets count sockets in one SO_REUSEPORT group; a shared one gets one.
// suffix is appended to reuseport socket names: "" always, except in the
// FreshSockets negative control, where it keeps names from matching the
// predecessor's.
//
// Every socket comes from tableflip's Fds so that it survives a reload: a
// socket bound any other way would get EADDRINUSE in the next generation.
//
// With exclusive (a first master, not told to share), a reuseport
// listener's address is first checked to be free: another
// process listening there with SO_REUSEPORT (another sniproxy instance,
// say with another metrics port) would otherwise silently take part of the
// traffic.
func openSockets(upg *tableflip.Upgrader, cfg *config.Config, count int, suffix string, exclusive bool) (*socketSet, error) {
	set := &socketSet{byAddr: map[string][]socket{}}
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
			f, err := fileSocket(upg, name, l.Address, false)
			if err != nil {
				set.close()
				return nil, err
			}
			set.byAddr[l.Address] = []socket{{name: name, addr: l.Address, file: f}}
			continue
		}
		for i := range count {
			name := fmt.Sprintf("reuseport/%s/%d%s", l.Address, i, suffix)
			f, err := fileSocket(upg, name, l.Address, true)
			if err != nil {
				set.close()
				return nil, err
			}
			set.byAddr[l.Address] = append(set.byAddr[l.Address], socket{name: name, addr: l.Address, file: f})
		}
		// A previous generation with more workers had more sockets in the
		// group. Closing one would reset the connections queued on it, so
		// keep them all; forSlot spreads them over the workers.
		for i := count; ; i++ {
			name := fmt.Sprintf("reuseport/%s/%d%s", l.Address, i, suffix)
			f, err := upg.File(name)
			if err != nil {
				set.close()
				return nil, fmt.Errorf("master: inherit %s: %w", name, err)
			}
			if f == nil {
				break
			}
			set.byAddr[l.Address] = append(set.byAddr[l.Address], socket{name: name, addr: l.Address, file: f})
		}
	}
	return set, nil
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
	ln, err := net.Listen("tcp", addr)
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

// fileSocket returns the inherited socket called name, or binds a new one
// and registers it with the Upgrader under that name.
func fileSocket(upg *tableflip.Upgrader, name, addr string, reuse bool) (*os.File, error) {
	f, err := upg.File(name)
	if err != nil {
		return nil, fmt.Errorf("master: inherit %s: %w", name, err)
	}
	if f != nil {
		return f, nil
	}
	lc := net.ListenConfig{}
	if reuse {
		lc.Control = reuseport.Control
	}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("master: listen %s: %w", addr, err)
	}
	defer ln.Close()
	// Not ln.File: see dupfd.
	f, err = dupfd.File(ln.(*net.TCPListener), name)
	if err != nil {
		return nil, fmt.Errorf("master: %s: %w", name, err)
	}
	if err := upg.AddFile(name, f); err != nil {
		f.Close()
		return nil, fmt.Errorf("master: register %s: %w", name, err)
	}
	return f, nil
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

// close closes the master's descriptors. Sockets stay open while workers or
// the Upgrader hold copies.
func (s *socketSet) close() {
	for _, socks := range s.byAddr {
		for _, sk := range socks {
			sk.file.Close()
		}
	}
}

// rebind shuts down every reuseport socket served by slot and binds a fresh
// socket in its place. It exists only for the negative control of the e2e
// tests (Options.ReplaceDeadSockets): it does what closing the last copy of
// the socket would do (tableflip holds a copy of its own, so a close alone
// would not): the kernel resets every connection queued on it, which the
// master must never do.
func (s *socketSet) rebind(upg *tableflip.Upgrader, slot, n int) error {
	for _, addr := range s.order {
		socks := s.byAddr[addr]
		for i := range socks {
			sk := &socks[i]
			if i%n != slot || sk.name == "shared/"+addr {
				continue
			}
			if rc, err := sk.file.SyscallConn(); err == nil {
				rc.Control(func(fd uintptr) { syscall.Shutdown(int(fd), syscall.SHUT_RDWR) })
			}
			sk.file.Close()
			lc := net.ListenConfig{Control: reuseport.Control}
			ln, err := lc.Listen(context.Background(), "tcp", addr)
			if err != nil {
				return fmt.Errorf("master: rebind %s: %w", sk.name, err)
			}
			f, err := dupfd.File(ln.(*net.TCPListener), sk.name)
			ln.Close()
			if err != nil {
				return fmt.Errorf("master: %s: %w", sk.name, err)
			}
			if err := upg.AddFile(sk.name, f); err != nil {
				f.Close()
				return fmt.Errorf("master: rebind %s: %w", sk.name, err)
			}
			sk.file = f
		}
	}
	return nil
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
