// Package dupfd duplicates the descriptor of a socket or file without
// touching its blocking mode.
//
// (*net.TCPListener).File and (*os.File).Fd would put the descriptor into
// blocking mode, and that mode belongs to the open file description that
// every process sharing the socket sees: accept would then block in every
// worker. Here the descriptor is duplicated inside syscall.RawConn.Control
// with fcntl(F_DUPFD_CLOEXEC), which leaves O_NONBLOCK as it is and marks
// the copy close-on-exec, so it reaches another process only when passed on
// on purpose (ExtraFiles, SCM_RIGHTS).
package dupfd

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Fd returns a close-on-exec duplicate of c's descriptor. The caller owns
// it and must close it. c is left as it was.
func Fd(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("dup: %w", err)
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, fmt.Errorf("dup: %w", err)
	}
	if derr != nil {
		return -1, fmt.Errorf("dup: %w", derr)
	}
	return nfd, nil
}

// File is Fd as an *os.File named name, which the caller owns.
func File(c syscall.Conn, name string) (*os.File, error) {
	fd, err := Fd(c)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), name), nil
}
