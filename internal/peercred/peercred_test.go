package peercred

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as nobody: %v\n%s", err, out)
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
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello\n"))
			c.Close()
		}
	}()
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
