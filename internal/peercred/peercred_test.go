package peercred

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// As a helper process (run as another user by the tests), dial the socket
// named in PEERCRED_DIAL, read a line and print it.
func TestMain(m *testing.M) {
	if sock := os.Getenv("PEERCRED_DIAL"); sock != "" {
		c, err := net.DialTimeout("unix", sock, 5*time.Second)
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(0)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		fmt.Printf("read %q %v\n", line, err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// asNobody runs this test binary as uid/gid 65534 in helper mode with env.
func asNobody(t *testing.T, env ...string) string {
	t.Helper()
	return asUser(t, &syscall.Credential{Uid: 65534, Gid: 65534}, env...)
}

// asUser runs this test binary with the credentials cred in helper mode
// with env.
func asUser(t *testing.T, cred *syscall.Credential, env ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root to run a process as another user (CI and the dev machine run as root)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary's own directory is private to root: copy it out.
	dir, err := os.MkdirTemp("", "peercred-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "helper")
	src, _ := os.Open(exe)
	dst, _ := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	io.Copy(dst, src)
	src.Close()
	dst.Close()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as %+v: %v\n%s", cred, err, out)
	}
	return string(out)
}

// A Listener serves root and its own user, and closes a connection from
// another user without a byte.
func TestListenerRefusesOtherUsers(t *testing.T) {
	dir, err := os.MkdirTemp("", "peercred-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755) // others may reach the socket: the check must hold
	sock := filepath.Join(dir, "ctl.sock")
	raw, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sock, 0o666)
	ln := NewListener(raw, nil)
	defer ln.Close()
	go serveHello(ln)
	// Root (this process): served.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if line != "hello\n" {
		t.Errorf("root got %q; want hello", line)
	}
	// Another user: closed without a byte.
	out := asNobody(t, "PEERCRED_DIAL="+sock)
	if !strings.Contains(out, `read ""`) {
		t.Errorf("nobody got %q; want the connection closed without a byte", out)
	}
}

// Check refuses a server of another user: a squatter cannot forge the
// master's answers.
func TestCheckRefusesOtherUsersServer(t *testing.T) {
	a, b, err := socketpairAs(t)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	cr, err := Check(a)
	if err != nil || cr.UID != os.Geteuid() || cr.PID != os.Getpid() {
		t.Errorf("own socketpair: %+v, %v", cr, err)
	}
	if !Trusted(0, 1000) || !Trusted(1000, 1000) || Trusted(65534, 0) || Trusted(65534, 1000) {
		t.Error("Trusted: want root and the same user only")
	}
}

func socketpairAs(t *testing.T) (*net.UnixConn, *net.UnixConn, error) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return nil, nil, err
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conv(fds[0]), conv(fds[1]), nil
}

func TestPrivateDir(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "mine")
	if err := PrivateDir(dir); err != nil {
		t.Fatalf("new dir: %v", err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("mode %v; want 0700", fi.Mode().Perm())
	}
	if err := PrivateDir(dir); err != nil {
		t.Errorf("existing private dir: %v", err)
	}
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := PrivateDir(open); err == nil {
		t.Error("accepted a directory others may write to")
	}
	link := filepath.Join(base, "link")
	os.Symlink(dir, link)
	if err := PrivateDir(link); err == nil {
		t.Error("accepted a symlink")
	}
	if os.Geteuid() == 0 {
		theirs := filepath.Join(base, "theirs")
		os.Mkdir(theirs, 0o700)
		os.Chown(theirs, 65534, 65534)
		if err := PrivateDir(theirs); err == nil {
			t.Error("accepted another user's directory")
		}
	}
}

// The peer decision: root and the listener's own user always; with a
// group, its members by effective gid or supplementary group, never the
// workers' user; nobody else.
func TestPolicyAllows(t *testing.T) {
	const self, member, other, workers, gid = 1000, 2000, 3000, 4000, 50
	owner := Policy{Self: self}
	group := Policy{Self: self, Group: &Group{GID: gid, Except: workers}}
	for _, tc := range []struct {
		name string
		pol  Policy
		cr   Cred
		want bool
	}{
		{"root", owner, Cred{UID: 0, GID: 0}, true},
		{"itself", owner, Cred{UID: self, GID: 7}, true},
		{"another user", owner, Cred{UID: other, GID: other}, false},
		{"a member, but no group configured", owner, Cred{UID: member, GID: gid}, false},
		{"root, with a group", group, Cred{UID: 0, GID: 0}, true},
		{"itself, with a group", group, Cred{UID: self, GID: self}, true},
		{"member by gid", group, Cred{UID: member, GID: gid}, true},
		{"member by a supplementary group", group, Cred{UID: member, GID: member, Groups: []int{27, gid}}, true},
		{"not a member", group, Cred{UID: other, GID: other, Groups: []int{27}}, false},
		{"the workers' user, with the group as gid", group, Cred{UID: workers, GID: gid, Groups: []int{gid}}, false},
		{"the workers' user, a supplementary member", group, Cred{UID: workers, GID: workers, Groups: []int{gid}}, false},
	} {
		if got := tc.pol.Allows(tc.cr); got != tc.want {
			t.Errorf("%s: Allows(%+v) = %v; want %v", tc.name, tc.cr, got, tc.want)
		}
	}
}

// Of reads the peer's supplementary groups as the kernel recorded them.
func TestOfGroups(t *testing.T) {
	a, b, err := socketpairAs(t)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	cr, err := Of(a)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cr.Groups, want) {
		t.Errorf("Groups %v; want this process's %v", cr.Groups, want)
	}
}

// A Listener with a group serves real processes of its members (by gid or
// supplementary group) and closes, without a byte, those of other users
// and of the workers' user.
func TestListenerServesGroup(t *testing.T) {
	const gid, workers = 4242, 65534
	dir, err := os.MkdirTemp("", "peercred-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "ctl.sock")
	raw, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sock, 0o666) // the file mode is not what is tested here
	ln := NewListener(raw, nil)
	ln.Policy.Group = &Group{GID: gid, Except: workers}
	ln.Refusal = func(cr Cred) []byte { return fmt.Appendf(nil, "refused uid %d\n", cr.UID) }
	defer ln.Close()
	go serveHello(ln)
	for _, tc := range []struct {
		name string
		cred *syscall.Credential
		want string
	}{
		{"member by gid", &syscall.Credential{Uid: 65533, Gid: gid}, `read "hello\n"`},
		{"member by a supplementary group", &syscall.Credential{Uid: 65533, Gid: 65533, Groups: []uint32{gid}}, `read "hello\n"`},
		// Refused peers are told why (Refusal), then closed.
		{"another user", &syscall.Credential{Uid: 65533, Gid: 65533}, `read "refused uid 65533\n"`},
		{"the workers' user", &syscall.Credential{Uid: workers, Gid: gid, Groups: []uint32{gid}}, `read "refused uid 65534\n"`},
	} {
		if out := asUser(t, tc.cred, "PEERCRED_DIAL="+sock); !strings.Contains(out, tc.want) {
			t.Errorf("%s: %q; want %s", tc.name, out, tc.want)
		}
	}
}

// SetSocketMode opens a socket of this user to a group and closes it
// again, and touches nothing else: not a regular file, not what a
// symlink points to.
func TestSetSocketMode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to give a file to any group (CI and the dev machine run as root)")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	os.Chmod(sock, 0o600)
	mode := func(path string) (os.FileMode, uint32) {
		t.Helper()
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid
	}
	if err := SetSocketMode(sock, 4242, 0o660); err != nil {
		t.Fatal(err)
	}
	if perm, gid := mode(sock); perm != 0o660 || gid != 4242 {
		t.Errorf("opened: %v gid %d; want 0660 gid 4242", perm, gid)
	}
	if err := SetSocketMode(sock, os.Getegid(), 0o600); err != nil {
		t.Fatal(err)
	}
	if perm, gid := mode(sock); perm != 0o600 || gid != uint32(os.Getegid()) {
		t.Errorf("closed: %v gid %d; want 0600 gid %d", perm, gid, os.Getegid())
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	link := filepath.Join(dir, "link")
	os.Symlink(sock, link)
	for _, p := range []string{file, link} {
		if err := SetSocketMode(p, 4242, 0o660); err == nil {
			t.Errorf("%s: no error; want a refusal", p)
		}
	}
	if perm, gid := mode(file); perm != 0o600 || gid == 4242 {
		t.Errorf("the regular file was changed: %v gid %d", perm, gid)
	}
	if perm, gid := mode(sock); perm != 0o600 || gid == 4242 {
		t.Errorf("the symlink's target was changed: %v gid %d", perm, gid)
	}
}

// OpenToGroup: a directory the group may search already is left alone; a
// private one of this user is opened to the group (g+x) only with fix; a
// directory that gives another group access, or under one the group may
// not search, is refused.
func TestOpenToGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to give a directory to any group (CI and the dev machine run as root)")
	}
	const gid = 4242
	base, err := os.MkdirTemp("", "peercred-dir-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	mk := func(name string, perm os.FileMode, group int) string {
		t.Helper()
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, perm); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, perm)
		os.Chown(p, 0, group)
		return p
	}
	stat := func(p string) (os.FileMode, uint32) {
		fi, _ := os.Stat(p)
		return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid
	}
	open := mk("open", 0o755, 0)
	if changed, err := OpenToGroup(open, gid, true); changed || err != nil {
		t.Errorf("0755: changed %v, %v; want left alone", changed, err)
	}
	private := mk("private", 0o700, 0)
	if changed, err := OpenToGroup(private, gid, false); changed || err == nil {
		t.Errorf("0700 without fix: changed %v, %v; want an error", changed, err)
	}
	if perm, g := stat(private); perm != 0o700 || g != 0 {
		t.Errorf("0700 without fix became %v gid %d", perm, g)
	}
	if changed, err := OpenToGroup(private, gid, true); !changed || err != nil {
		t.Errorf("0700 with fix: changed %v, %v; want changed", changed, err)
	}
	if perm, g := stat(private); perm != 0o710 || g != gid {
		t.Errorf("0700 with fix became %v gid %d; want 0710 gid %d", perm, g, gid)
	}
	theirs := mk("theirs", 0o750, 27)
	if changed, err := OpenToGroup(theirs, gid, true); changed || err == nil {
		t.Errorf("0750 of group 27: changed %v, %v; want an error", changed, err)
	}
	if perm, g := stat(theirs); perm != 0o750 || g != 27 {
		t.Errorf("0750 of group 27 became %v gid %d", perm, g)
	}
	closed := mk("closed", 0o700, 0)
	inner := filepath.Join(closed, "inner")
	os.Mkdir(inner, 0o755)
	if changed, err := OpenToGroup(inner, gid, true); changed || err == nil {
		t.Errorf("under a 0700 directory: changed %v, %v; want an error", changed, err)
	}
	if perm, _ := stat(closed); perm != 0o700 {
		t.Errorf("the 0700 directory above became %v", perm)
	}
}

// serveHello answers "hello" to every connection ln accepts, until it is
// closed.
func serveHello(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("hello\n"))
		c.Close()
	}
}
