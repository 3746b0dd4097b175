package e2e

import (
	"io"
	"os"
	"os/exec"
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
