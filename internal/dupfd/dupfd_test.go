package dupfd

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFileKeepsNonBlockingAndSetsCloexec(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := File(ln, "listener")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Name() != "listener" {
		t.Errorf("name %q; want %q", f.Name(), "listener")
	}
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fl, fdfl int
	var ferr error
	rc.Control(func(fd uintptr) {
		fl, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0)
		if ferr == nil {
			fdfl, ferr = unix.FcntlInt(fd, unix.F_GETFD, 0)
		}
	})
	if ferr != nil {
		t.Fatal(ferr)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Error("duplicate is in blocking mode; want the original's non-blocking mode kept")
	}
	if fdfl&unix.FD_CLOEXEC == 0 {
		t.Error("duplicate is not close-on-exec")
	}
	// The duplicate is the same socket: a connection to the original
	// address is accepted through it.
	fl2, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	defer fl2.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := fl2.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
}

func TestFdOfClosedConn(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if fd, err := Fd(f); err == nil || fd != -1 {
		t.Errorf("Fd of a closed file = %d, %v; want -1 and an error", fd, err)
	}
}
