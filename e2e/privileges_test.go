package e2e

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// statusField returns a "Key:" line's fields from /proc/pid/status.
func statusField(t *testing.T, pid int, key string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.Fields(rest)
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, key)
	return nil
}

// TestWorkersDropPrivileges: started as root with `user: nobody`, the
// workers run as nobody with no capabilities at all, and still proxy (they
// get their sockets from the master); the master stays root to bind on a
// reload.
func TestWorkersDropPrivileges(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test starts sniproxy as root (CI and the dev machine run as root)")
	}
	// The workers exec the master's binary as nobody: it must be in a
	// directory nobody may enter (the test's own temp dirs are 0700).
	bin := publicBinary(t)

	echo := echoBackend(t)
	p := startProxyBin(t, bin, strings.ReplaceAll(masterConfig, "ECHO", echo)+"user: nobody\ngroup: nogroup\n")
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatalf("proxying through workers running as nobody: %v", err)
	}
	c.Close()
	nobody := "65534"
	if uid := statusField(t, p.cmd.Process.Pid, "Uid"); uid[1] != "0" {
		t.Errorf("master euid %s; want 0 (root, to bind on reload)", uid[1])
	}
	for _, w := range p.workers(t, 2) {
		if uid := statusField(t, w, "Uid"); strings.Join(uid, " ") != strings.Repeat(nobody+" ", 3)+nobody {
			t.Errorf("worker %d uids %v; want all %s", w, uid, nobody)
		}
		if gid := statusField(t, w, "Gid"); gid[0] != nobody || gid[1] != nobody {
			t.Errorf("worker %d gids %v; want %s", w, gid, nobody)
		}
		for _, cap := range []string{"CapInh", "CapPrm", "CapEff", "CapAmb"} {
			if v := statusField(t, w, cap); v[0] != "0000000000000000" {
				t.Errorf("worker %d %s %s; want none", w, cap, v[0])
			}
		}
	}
	if out, err := exec.Command(bin, "check", "-c", p.cfgPath).CombinedOutput(); err != nil {
		t.Errorf("check: %v\n%s", err, out)
	}
}
