package ipc

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// pair returns the two ends of a Pair, as a master and a worker would hold
// them.
func pair(tb testing.TB) (master, worker *Conn) {
	tb.Helper()
	master, wf, err := Pair()
	if err != nil {
		tb.Fatalf("Pair: %v", err)
	}
	worker, err = FileConn(wf)
	wf.Close()
	if err != nil {
		master.Close()
		tb.Fatalf("FileConn: %v", err)
	}
	tb.Cleanup(func() {
		master.Close()
		worker.Close()
	})
	return master, worker
}

// rawPair returns a Conn and the raw, blocking descriptor of its peer, for
// writing arbitrary bytes. The caller closes raw (closeRaw is safe to call
// twice through the returned func).
func rawPair(tb testing.TB) (c *Conn, raw int, closeRaw func()) {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatalf("socketpair: %v", err)
	}
	f := os.NewFile(uintptr(fds[0]), "test")
	c, err = FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		tb.Fatalf("FileConn: %v", err)
	}
	closed := false
	closeRaw = func() {
		if !closed {
			closed = true
			unix.Close(fds[1])
		}
	}
	tb.Cleanup(func() {
		c.Close()
		closeRaw()
	})
	return c, fds[1], closeRaw
}

// frame returns the bytes of a frame, as Send writes them.
func frame(t Type, nfds int, payload []byte) []byte {
	return append(appendHeader(nil, t, nfds, len(payload)), payload...)
}

// encoded returns the frame bytes of b.
func encoded(tb testing.TB, b Body, nfds int) []byte {
	tb.Helper()
	p, err := b.AppendBinary(nil)
	if err != nil {
		tb.Fatalf("%T.AppendBinary: %v", b, err)
	}
	return frame(b.Type(), nfds, p)
}

// pipe returns a pipe's read and write ends as raw close-on-exec descriptors.
func pipe(tb testing.TB) (r, w int) {
	tb.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		tb.Fatalf("pipe2: %v", err)
	}
	return p[0], p[1]
}

// readersGone reports whether every copy of the read end of the pipe whose
// write end is w is closed (the kernel then flags the write end POLLERR).
func readersGone(tb testing.TB, w int) bool {
	tb.Helper()
	pfd := []unix.PollFd{{Fd: int32(w), Events: unix.POLLOUT}}
	if _, err := unix.Poll(pfd, 0); err != nil {
		tb.Fatalf("poll: %v", err)
	}
	return pfd[0].Revents&unix.POLLERR != 0
}

// cloexec reports whether f's descriptor has FD_CLOEXEC set.
func cloexec(tb testing.TB, f *os.File) bool {
	tb.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		tb.Fatalf("SyscallConn: %v", err)
	}
	var flags int
	var ferr error
	if err := rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFD, 0) }); err != nil || ferr != nil {
		tb.Fatalf("F_GETFD: %v %v", err, ferr)
	}
	return flags&unix.FD_CLOEXEC != 0
}

// nonblocking reports whether the file description of f has O_NONBLOCK.
func nonblocking(tb testing.TB, rc interface {
	Control(func(fd uintptr)) error
}) bool {
	tb.Helper()
	var flags int
	var ferr error
	if err := rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0) }); err != nil || ferr != nil {
		tb.Fatalf("F_GETFL: %v %v", err, ferr)
	}
	return flags&unix.O_NONBLOCK != 0
}
