package e2e

import (
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// publicBinary copies the sniproxy binary into a directory any user may
// enter (the test's own temp dirs are 0700) and returns its path.
func publicBinary(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sniproxy-pub-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "sniproxy")
	src, err := os.Open(binary)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	dst.Close()
	return bin
}

// TestControlSocketUnderUmask000: the control socket is 0600 even when
// the master starts with umask 000 (before, an unprivileged user could
// then reload a root master).
func TestControlSocketUnderUmask000(t *testing.T) {
	p := startProxyArgv(t, binary, masterConfig, func(path string) []string {
		return []string{"/bin/sh", "-c", `umask 000; exec "$0" -c "$1"`, binary, path}
	})
	sock := strings.TrimSuffix(p.cfgPath, "config.yaml") + "ctl.sock"
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v under umask 000; want 0600", fi.Mode().Perm())
	}
}

// TestReloadTrustsOnlyRootOrItself: a socket at the control path served by
// another user (here a whole sniproxy run by nobody) is not trusted by
// root's `sniproxy reload` or `status`: before, reload printed whatever
// the squatter answered ("reloaded: new master pid 4242") and exited 0.
func TestReloadTrustsOnlyRootOrItself(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test runs a squatter as another user (CI and the dev machine run as root)")
	}
	bin := publicBinary(t)
	dir, err := os.MkdirTemp("", "sniproxy-squat-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o1777) // like /tmp
	cfg := filepath.Join(dir, "config.yaml")
	sock := filepath.Join(dir, "ctl.sock")
	os.WriteFile(cfg, []byte("listen_addrs: [\"127.0.0.1:"+strconv.Itoa(freePort(t))+"\"]\nworkers: 1\nmetrics: {enabled: false}\ncontrol_socket: \""+sock+"\"\n"), 0o644)
	squatter := exec.Command(bin, "-c", cfg)
	squatter.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	logs, _ := os.Create(filepath.Join(t.TempDir(), "squatter.log"))
	squatter.Stdout, squatter.Stderr = logs, logs
	if err := squatter.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		squatter.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { squatter.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			squatter.Process.Kill()
		}
		killAllOf(t, cfg) // a successor, had a reload reached it
	})
	for deadline := time.Now().Add(15 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logs.Name())
			t.Fatalf("the squatter never made its socket:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, args := range [][]string{{"reload", "-c", cfg}, {"status", "-c", cfg}} {
		out, err := exec.Command(binary, args...).CombinedOutput()
		if err == nil || strings.Contains(string(out), "reloaded") {
			t.Errorf("%v: %v; want a refusal\n%s", args, err, out)
		}
		if !strings.Contains(string(out), "uid 65534") {
			t.Errorf("%v does not say who answered:\n%s", args, out)
		}
	}
}

// runAs runs the sniproxy binary at bin with args as the user and groups
// of cred, with env added, and returns its output and error.
func runAs(t *testing.T, bin string, cred *syscall.Credential, env []string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestControlSocketGroup: a root master with `group` set (here adm, with
// the workers running as nobody) creates its control socket 0660, owned
// by root and that group, and serves the group's members, by primary or
// supplementary group, with `status` and `reload`; another user is
// refused by the socket's mode, and the workers' user, which has the
// group too, by the master (SO_PEERCRED). In a default directory
// ($RUNTIME_DIRECTORY) that keeps the group out, the master lets the
// group in (0700 becomes 0710), and a member's `status` finds the socket
// there.
func TestControlSocketGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test starts sniproxy as root and clients as other users (CI and the dev machine run as root)")
	}
	adm, err := user.LookupGroup("adm") // in every Debian (base-passwd)
	if err != nil {
		t.Fatalf("the test needs the group adm: %v", err)
	}
	gid, _ := strconv.Atoi(adm.Gid)
	bin := publicBinary(t)
	echo := echoBackend(t)
	const other, workers = 65533, 65534 // 65534 is nobody, the workers' user
	var (
		byGID      = &syscall.Credential{Uid: other, Gid: uint32(gid)}
		bySupp     = &syscall.Credential{Uid: other, Gid: other, Groups: []uint32{uint32(gid)}}
		notMember  = &syscall.Credential{Uid: other, Gid: other}
		asWorkers  = &syscall.Credential{Uid: workers, Gid: uint32(gid), Groups: []uint32{uint32(gid)}}
		cfgForUser = strings.ReplaceAll(masterConfig, "ECHO", echo) + "user: nobody\ngroup: adm\npid_file: \"PIDFILE\"\n"
	)
	socketMode := func(t *testing.T, path string) (os.FileMode, uint32, uint32) {
		t.Helper()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		return fi.Mode().Perm(), st.Uid, st.Gid
	}

	t.Run("configured path", func(t *testing.T) {
		dir, err := os.MkdirTemp("", "sniproxy-ctl-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		os.Chmod(dir, 0o755)
		sock := filepath.Join(dir, "ctl.sock")
		p := startProxyBin(t, bin, strings.ReplaceAll(cfgForUser, "CTLSOCK", sock))
		if perm, uid, g := socketMode(t, sock); perm != 0o660 || uid != 0 || g != uint32(gid) {
			t.Fatalf("control socket %v uid %d gid %d; want 0660 uid 0 gid %d", perm, uid, g, gid)
		}
		env := []string{"SNIPROXY_CONTROL_SOCKET=" + sock}
		for name, cred := range map[string]*syscall.Credential{"member by gid": byGID, "member by a supplementary group": bySupp} {
			out, err := runAs(t, bin, cred, env, "status")
			if err != nil || !strings.Contains(out, "master pid "+strconv.Itoa(p.cmd.Process.Pid)) {
				t.Errorf("%s: status: %v; want the master's answer\n%s", name, err, out)
			}
		}
		// The master's config (in the test's 0700 directory) is root's:
		// status says it cannot read it, not that it is invalid.
		out, err := runAs(t, bin, bySupp, env, "status", "-c", p.cfgPath)
		if err != nil || !strings.Contains(out, "permission denied; looking for the master without it") || strings.Contains(out, "invalid") {
			t.Errorf("member: status -c (a config it may not read): %v\n%s", err, out)
		}
		out, err = runAs(t, bin, bySupp, env, "reload", "-c", p.cfgPath)
		if err == nil || !strings.Contains(out, "cannot read the config, not reloading") {
			t.Errorf("member: reload -c (a config it may not read): %v; want a refusal that says why\n%s", err, out)
		}
		out, err = runAs(t, bin, notMember, env, "status")
		if err == nil || !strings.Contains(out, "permission denied") {
			t.Errorf("another user: status: %v; want permission denied\n%s", err, out)
		}
		out, err = runAs(t, bin, asWorkers, env, "status")
		if err == nil || strings.Contains(out, "master pid") || !strings.Contains(out, "403 Forbidden: control socket: uid "+strconv.Itoa(int(asWorkers.Uid))+" is the workers' user") {
			t.Errorf("the workers' user: status: %v; want a refusal that says why\n%s", err, out)
		}
		out, err = runAs(t, bin, asWorkers, env, "reload")
		if err == nil || strings.Contains(out, "reloaded") || !strings.Contains(out, "the workers' user, which may never drive the master") {
			t.Errorf("the workers' user: reload: %v; want a refusal that says why\n%s", err, out)
		}
		if !p.logsSoon("control socket: refused a connection from the workers' user", func(rec map[string]any) bool {
			return rec["peer_uid"] == float64(workers)
		}) {
			t.Error("the master did not log the workers' user's refusal")
		}
		// A member may reload; the next generation keeps the socket 0660.
		out, err = runAs(t, bin, bySupp, env, "reload")
		if err != nil || !strings.Contains(out, "reloaded: new master pid") {
			t.Fatalf("member: reload: %v\n%s", err, out)
		}
		if perm, _, g := socketMode(t, sock); perm != 0o660 || g != uint32(gid) {
			t.Errorf("after the reload: control socket %v gid %d; want 0660 gid %d", perm, g, gid)
		}
		if out, err := runAs(t, bin, bySupp, env, "status"); err != nil || !strings.Contains(out, "generation 2") {
			t.Errorf("member: status after the reload: %v\n%s", err, out)
		}
	})

	t.Run("runtime directory", func(t *testing.T) {
		dir, err := os.MkdirTemp("", "sniproxy-run-") // 0700, root's
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		cfg := strings.Replace(cfgForUser, `control_socket: "CTLSOCK"`, "", 1)
		env := []string{"RUNTIME_DIRECTORY=" + dir}
		p := startProxyBin(t, bin, cfg, env...)
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if perm, g := fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid; perm != 0o710 || g != uint32(gid) {
			t.Errorf("runtime directory %v gid %d; want 0710 gid %d", perm, g, gid)
		}
		if perm, _, g := socketMode(t, filepath.Join(dir, "sniproxy.sock")); perm != 0o660 || g != uint32(gid) {
			t.Errorf("control socket %v gid %d; want 0660 gid %d", perm, g, gid)
		}
		out, err := runAs(t, bin, bySupp, env, "status")
		if err != nil || !strings.Contains(out, "master pid "+strconv.Itoa(p.cmd.Process.Pid)) {
			t.Errorf("member: status: %v; want the master's answer\n%s", err, out)
		}
		out, err = runAs(t, bin, notMember, env, "status")
		if err == nil || !strings.Contains(out, "permission denied") {
			t.Errorf("another user: status: %v; want permission denied\n%s", err, out)
		}
	})
}
