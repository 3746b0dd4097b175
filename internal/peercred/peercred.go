// Package peercred guards sniproxy's control socket with the kernel's word
// on who is at the other end of a Unix socket (SO_PEERCRED): the master
// serves only root and its own user, and the CLI trusts an answer only from
// a process of root or its own user. File modes alone do not do: a umask of
// 000 at start, or a socket squatted at a path in a shared directory, would
// let another user reload the master or forge its answers.
package peercred

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// Cred is the process at the other end of a Unix socket, as the kernel
// recorded it when the connection was made.
type Cred struct {
	PID int
	UID int
	GID int
}

// Of returns the credentials of c's peer.
func Of(c *net.UnixConn) (Cred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	var u *unix.Ucred
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		u, uerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	if uerr != nil {
		return Cred{}, fmt.Errorf("peercred: SO_PEERCRED: %w", uerr)
	}
	return Cred{PID: int(u.Pid), UID: int(u.Uid), GID: int(u.Gid)}, nil
}

// Trusted reports whether a peer of uid may be trusted by a process whose
// effective uid is self: root, or the same user.
func Trusted(uid, self int) bool { return uid == 0 || uid == self }

// Listener accepts only connections whose peer is Trusted by this process's
// effective uid; others are closed at once and logged. It wraps a Unix
// listener.
type Listener struct {
	net.Listener
	Log  *slog.Logger
	self int
}

// NewListener wraps ln, which must be a Unix socket listener.
func NewListener(ln net.Listener, log *slog.Logger) *Listener {
	return &Listener{Listener: ln, Log: log, self: os.Geteuid()}
}

// Accept returns the next connection from a trusted peer.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			return nil, fmt.Errorf("peercred: not a Unix socket: %T", c)
		}
		cr, err := Of(uc)
		if err == nil && Trusted(cr.UID, l.self) {
			return c, nil
		}
		c.Close()
		if l.Log != nil {
			if err != nil {
				l.Log.Warn("control socket: refused a connection whose peer is unknown", "err", err)
			} else {
				l.Log.Warn("control socket: refused a connection from another user", "peer_pid", cr.PID, "peer_uid", cr.UID)
			}
		}
	}
}

// ErrUntrusted is returned by Check for a peer of another user.
var ErrUntrusted = errors.New("peercred: the peer is neither root nor this user")

// Check returns c's peer and an error wrapping ErrUntrusted unless it is
// Trusted by this process's effective uid.
func Check(c *net.UnixConn) (Cred, error) {
	cr, err := Of(c)
	if err != nil {
		return cr, err
	}
	if !Trusted(cr.UID, os.Geteuid()) {
		return cr, fmt.Errorf("%w: pid %d, uid %d", ErrUntrusted, cr.PID, cr.UID)
	}
	return cr, nil
}

// PrivateDir makes sure dir is a directory of this user's that nobody else
// may enter (0700), creating it if it does not exist: a socket in it
// cannot be squatted or replaced by another user. It refuses a symlink, a
// directory of another owner or one that others may write to.
func PrivateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("peercred: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("peercred: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("peercred: %s is not a directory (a symlink?)", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("peercred: %s: no owner", dir)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("peercred: %s belongs to uid %d, not this user (%d)", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("peercred: %s is mode %v: others may enter it", dir, fi.Mode().Perm())
	}
	return nil
}

// UserTempDir is the directory in the temp dir that holds this user's
// control socket when neither the config nor the runtime directory names
// one: per user, so that users of one host never share (or squat) a path.
func UserTempDir() string {
	return filepath.Join(os.TempDir(), fmt.Sprintf("sniproxy-%d", os.Geteuid()))
}
