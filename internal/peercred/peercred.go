// Package peercred guards sniproxy's control socket with the kernel's word
// on who is at the other end of a Unix socket (SO_PEERCRED, SO_PEERGROUPS):
// the master serves root, its own user and, when so configured, the members
// of one group (never the workers' user), and the CLI trusts an answer only
// from a process of root or its own user. File modes alone do not do: a
// umask of 000 at start, or a socket squatted at a path in a shared
// directory, would let another user reload the master or forge its
// answers.
package peercred

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Cred is the process at the other end of a Unix socket, as the kernel
// recorded it when the connection was made (connect(2) or socketpair(2)):
// a peer that changes its credentials later, or hands the socket on, does
// not change them.
type Cred struct {
	PID int
	UID int // effective uid
	GID int // effective gid
	// Groups are the peer's supplementary groups (SO_PEERGROUPS); nil
	// where the kernel cannot tell (before Linux 4.13), so that a Policy
	// then serves a group's members by their effective gid only.
	Groups []int
}

// Of returns the credentials of c's peer.
func Of(c *net.UnixConn) (Cred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	var u *unix.Ucred
	var groups []int
	var uerr, gerr error
	if err := rc.Control(func(fd uintptr) {
		u, uerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		groups, gerr = peerGroups(int(fd))
	}); err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	if uerr != nil {
		return Cred{}, fmt.Errorf("peercred: SO_PEERCRED: %w", uerr)
	}
	if gerr != nil && !errors.Is(gerr, unix.ENOPROTOOPT) {
		return Cred{}, fmt.Errorf("peercred: SO_PEERGROUPS: %w", gerr)
	}
	return Cred{PID: int(u.Pid), UID: int(u.Uid), GID: int(u.Gid), Groups: groups}, nil
}

// peerGroups returns the supplementary groups of the peer of the Unix
// socket fd, as recorded with its SO_PEERCRED (Linux 4.13). Unlike
// /proc/PID/status, they cannot belong to another process that reused the
// peer's PID.
func peerGroups(fd int) ([]int, error) {
	buf := make([]uint32, 32)
	for range 2 {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if errno == unix.ERANGE {
			// n is now the size needed.
			buf = make([]uint32, n/4+1)
			continue
		}
		if errno != 0 {
			return nil, errno
		}
		groups := make([]int, 0, n/4)
		for _, g := range buf[:n/4] {
			groups = append(groups, int(g))
		}
		return groups, nil
	}
	return nil, unix.ERANGE
}

// Trusted reports whether a peer of uid may be trusted by a process whose
// effective uid is self: root, or the same user.
func Trusted(uid, self int) bool { return uid == 0 || uid == self }

// Policy says whose connections a Listener serves: root's and Self's
// always; when Group is not nil, also those of Group's members.
type Policy struct {
	// Self is the listening process's effective uid.
	Self int
	// Group is nil unless the members of a group are served too.
	Group *Group
}

// Group is a group whose members a Policy serves: a peer whose effective
// gid or one of whose supplementary groups is GID, unless its uid is
// Except.
type Group struct {
	GID int
	// Except is the uid of the master's workers, which run with GID
	// among their groups: a worker must never drive its master.
	Except int
}

// OwnerOnly is the Policy that serves root and this process's effective
// user only.
func OwnerOnly() Policy { return Policy{Self: os.Geteuid()} }

// Allows reports whether p serves a peer with credentials cr.
func (p Policy) Allows(cr Cred) bool {
	if Trusted(cr.UID, p.Self) {
		return true
	}
	g := p.Group
	if g == nil || cr.UID == g.Except {
		return false
	}
	return cr.GID == g.GID || slices.Contains(cr.Groups, g.GID)
}

// Listener accepts only connections whose peer its Policy allows; others
// are closed at once and logged. It wraps a Unix listener.
type Listener struct {
	net.Listener
	Log *slog.Logger
	// Policy is set before the first Accept and not changed after.
	Policy Policy
	// Refusal, if set (before the first Accept), is what a refused peer
	// of known credentials is told before its connection closes (the
	// master answers HTTP 403), so that it learns why rather than
	// seeing the connection drop. At most maxRefusing peers are told at
	// once, each within refuseTime; any more are closed at once.
	Refusal func(Cred) []byte

	refusing atomic.Int32
}

const (
	// maxRefusing bounds the refused connections being told why.
	maxRefusing = 8
	// refuseTime bounds how long telling one takes.
	refuseTime = time.Second
)

// NewListener wraps ln, which must be a Unix socket listener, serving
// root and this process's effective user (OwnerOnly).
func NewListener(ln net.Listener, log *slog.Logger) *Listener {
	return &Listener{Listener: ln, Log: log, Policy: OwnerOnly()}
}

// Accept returns the next connection from a peer the Policy allows.
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
		if err == nil && l.Policy.Allows(cr) {
			return c, nil
		}
		if err == nil && l.Refusal != nil && l.refusing.Add(1) <= maxRefusing {
			go l.refuse(uc, l.Refusal(cr))
		} else {
			if err == nil && l.Refusal != nil {
				l.refusing.Add(-1)
			}
			c.Close()
		}
		if l.Log != nil {
			switch {
			case err != nil:
				l.Log.Warn("control socket: refused a connection whose peer is unknown", "err", err)
			case l.Policy.Group != nil && cr.UID == l.Policy.Group.Except:
				l.Log.Warn("control socket: refused a connection from the workers' user", "peer_pid", cr.PID, "peer_uid", cr.UID)
			default:
				l.Log.Warn("control socket: refused a connection from another user", "peer_pid", cr.PID, "peer_uid", cr.UID, "peer_gid", cr.GID)
			}
		}
	}
}

// refuse tells a refused peer msg, reads what it sent until it closes
// (a Unix socket closed with unread bytes resets the peer, which could
// then miss msg), and closes c, within refuseTime.
func (l *Listener) refuse(c *net.UnixConn, msg []byte) {
	defer l.refusing.Add(-1)
	defer c.Close()
	c.SetDeadline(time.Now().Add(refuseTime))
	if _, err := c.Write(msg); err != nil {
		return
	}
	c.CloseWrite()
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
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

// SetSocketMode gives the Unix socket file at path the group gid (-1:
// unchanged) and the permission bits perm. It acts only on a socket of
// this user (a symlink is not followed), and the file is never more open
// than before or after: the bits both allow come first, then the group,
// then perm.
func SetSocketMode(path string, gid int, perm os.FileMode) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("peercred: %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("peercred: %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("peercred: %s is not a socket", path)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("peercred: %s belongs to uid %d, not this user (%d)", path, st.Uid, os.Geteuid())
	}
	return setMode(fd, st, gid, uint32(perm.Perm()))
}

// setMode sets the group (gid -1: unchanged) and permission bits of the
// file open as fd (O_PATH), whose current state is st, never opening it
// wider than either: fchmod does not take an O_PATH descriptor, chmod on
// its /proc/self/fd link does.
func setMode(fd int, st unix.Stat_t, gid int, perm uint32) error {
	if st.Mode&0o7777 == perm && (gid < 0 || uint32(gid) == st.Gid) {
		return nil
	}
	proc := fmt.Sprintf("/proc/self/fd/%d", fd)
	if err := unix.Chmod(proc, st.Mode&perm&0o7777); err != nil {
		return fmt.Errorf("peercred: chmod: %w", err)
	}
	if gid >= 0 && uint32(gid) != st.Gid {
		if err := unix.Fchownat(fd, "", -1, gid, unix.AT_EMPTY_PATH); err != nil {
			return fmt.Errorf("peercred: chown to gid %d: %w", gid, err)
		}
	}
	if err := unix.Chmod(proc, perm); err != nil {
		return fmt.Errorf("peercred: chmod: %w", err)
	}
	return nil
}

// searchable reports whether members of gid who are not the owner may
// search (traverse) a directory of mode and group.
func searchable(mode, dirGID uint32, gid int) bool {
	return mode&0o001 != 0 || (int(dirGID) == gid && mode&0o010 != 0)
}

// OpenToGroup makes sure that members of the group gid can reach a socket
// in dir: dir and every directory above it must let them search it (x for
// others, or x for the group when it is gid). When dir itself does not and
// fix is set, and dir is this user's and gives no other group any access,
// dir becomes gid's with g+x added (a 0700 directory becomes 0710: members
// may reach a file whose name they know, not list the directory).
// changed says whether dir was changed; err says why members cannot reach
// dir.
func OpenToGroup(dir string, gid int, fix bool) (changed bool, err error) {
	if dir, err = filepath.Abs(dir); err == nil {
		dir, err = filepath.EvalSymlinks(dir)
	}
	if err != nil {
		return false, fmt.Errorf("peercred: %w", err)
	}
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return false, fmt.Errorf("peercred: %s: %w", p, err)
		}
		if !searchable(st.Mode, st.Gid, gid) {
			return false, fmt.Errorf("peercred: %s (mode %#o, gid %d) does not let group %d through", p, st.Mode&0o7777, st.Gid, gid)
		}
		if p == "/" {
			break
		}
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_NOFOLLOW|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("peercred: %s: %w", dir, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false, fmt.Errorf("peercred: %s: %w", dir, err)
	}
	if searchable(st.Mode, st.Gid, gid) {
		return false, nil
	}
	perm := st.Mode & 0o7777
	switch {
	case !fix:
		return false, fmt.Errorf("peercred: %s (mode %#o, gid %d) does not let group %d in", dir, perm, st.Gid, gid)
	case int(st.Uid) != os.Geteuid():
		return false, fmt.Errorf("peercred: %s (mode %#o) does not let group %d in, and belongs to uid %d, not this user", dir, perm, gid, st.Uid)
	case int(st.Gid) != gid && perm&0o070 != 0:
		return false, fmt.Errorf("peercred: %s (mode %#o) does not let group %d in, and gives group %d access: not changing its group", dir, perm, gid, st.Gid)
	}
	if err := setMode(fd, st, gid, perm|0o010); err != nil {
		return false, fmt.Errorf("%w (on %s)", err, dir)
	}
	return true, nil
}
