package e2e

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// openFilesLimit returns the soft and hard "Max open files" of a process
// from /proc/pid/limits.
func openFilesLimit(t *testing.T, pid int) (soft, hard string) {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/limits")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) < 2 {
				t.Fatalf("/proc/%d/limits: %q", pid, line)
			}
			return f[0], f[1]
		}
	}
	t.Fatalf("/proc/%d/limits has no Max open files:\n%s", pid, b)
	return "", ""
}

// TestFDLimitRaisedAtStart: started with a soft RLIMIT_NOFILE of 256 under
// a hard one of 4096 (prlimit), the master raises the soft limit to the
// hard one, logs both, and its workers run with it. Without the raise
// master and workers would run at 4095, not 4096: every Go program raises
// its own soft limit to hard-1 at start (package syscall's init; os/exec
// gives a child back the soft limit the program started with, 256, unless
// the program set one itself, and the worker, a Go program too, raises
// that to 4095 again). So the difference the raise makes, and this test
// sees, is that last descriptor, and the log line.
func TestFDLimitRaisedAtStart(t *testing.T) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatal("prlimit (util-linux) is not installed")
	}
	for _, tc := range []struct {
		name  string
		extra string // config
		msg   string // the log line
	}{
		// 2 fds per connection plus 256: 456 fit in 4096.
		{"enough for max_connections", "max_connections: 100\n", "fd limit"},
		// The default 10000 needs 20256: the same values, as a warning.
		{"too low for max_connections", "", "the fd limit cannot hold max_connections"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)) + tc.extra
			p := startProxyArgv(t, binary, cfg, func(path string) []string {
				return []string{prlimit, "--nofile=256:4096", "--", binary, "-c", path}
			})
			lines := p.logLines(tc.msg)
			if len(lines) != 1 {
				t.Fatalf("%d log lines %q; want 1", len(lines), tc.msg)
			}
			if soft, hard := lines[0]["soft"], lines[0]["hard"]; soft != 4096.0 || hard != 4096.0 {
				t.Errorf("%q: soft %v, hard %v; want 4096 and 4096", tc.msg, soft, hard)
			}
			if soft, hard := openFilesLimit(t, p.cmd.Process.Pid); soft != "4096" || hard != "4096" {
				t.Errorf("master: Max open files %s/%s; want 4096/4096", soft, hard)
			}
			for _, w := range p.workers(t, 2) {
				if soft, hard := openFilesLimit(t, w); soft != "4096" || hard != "4096" {
					t.Errorf("worker %d: Max open files %s/%s; want 4096/4096", w, soft, hard)
				}
			}
		})
	}
}
