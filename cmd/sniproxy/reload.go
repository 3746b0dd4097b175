package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/master"
)

// reloadTimeout bounds the wait for a reload: the master's upgrade timeout
// (a minute) plus the time to validate and hurry a draining generation.
const reloadTimeout = 2 * time.Minute

func reloadCmd(stdout, stderr io.Writer) *cobra.Command {
	var path, pidFile string
	cmd := &cobra.Command{
		Use:   "reload",
		Short: "Reload the running master with no downtime and wait",
		Long: `Reload asks the running master, over its control socket, to reload: a
successor master starts from the binary and the config now on disk,
inherits the listening sockets and takes over; the predecessor retires.
Reload waits and prints the new master's pid and generation (exit 0), or
the error (exit 1). When no master answers on the control socket it sends
SIGHUP to the pid in the PID file and waits for the file to name a new
master; it signals a PID only once it has checked that the process is
a sniproxy master.

The control socket and PID file are those the config names (see
` + "`sniproxy status --help`" + ` for the default socket). The master reloads
the file it was started with: with ` + "`-c FILE`" + `, reload refuses (exit 1)
when FILE is not that file.

` + configHelp,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			return codeErr(cmdReload(path, pidFile, stdout, stderr))
		},
	}
	addConfigFlag(cmd, &path)
	cmd.Flags().StringVar(&pidFile, "pid-file", "", "PID `FILE` of the master (default: the config's pid_file)")
	return cmd
}

// cmdReload asks the running master to upgrade itself (the binary and the
// config now on disk) and waits for the new generation or the error. Without
// a control socket it falls back to SIGHUP to the PID in the PID file and
// waits for the file to name a new master.
func cmdReload(path, pidFile string, stdout, stderr io.Writer) int {
	cfg, err := loadConfig(path)
	if errors.Is(err, fs.ErrPermission) {
		fmt.Fprintf(stderr, "sniproxy: cannot read the config, not reloading (a reload validates it first): %v\n", err)
		return 1
	}
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid, not reloading:\n%s\n", indentErrors(err))
		return 1
	}
	if pidFile == "" {
		pidFile = cfg.PIDFile
	}
	sock := master.FindControlSocket(cfg)
	if path != "" {
		if err := sameConfig(sock, path); err != nil {
			fmt.Fprintf(stderr, "sniproxy: not reloading: %v\n", err)
			return 1
		}
	}
	res, sent, err := postReload(sock)
	if err != nil && !sent && pidFile != "" {
		// Only when the request never reached a master: a second reload
		// must not follow one that is under way.
		fmt.Fprintf(stderr, "sniproxy: %v; signalling the PID in %s instead\n", err, pidFile)
		res, err = hupAndWait(pidFile)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: reload failed: %v\n", err)
		return 1
	}
	if res.Generation > 0 {
		fmt.Fprintf(stdout, "reloaded: new master pid %d, generation %d\n", res.PID, res.Generation)
	} else {
		fmt.Fprintf(stdout, "reloaded: new master pid %d\n", res.PID)
	}
	return 0
}

type reloadAnswer struct {
	PID        int    `json:"pid"`
	Generation int    `json:"generation"`
	Error      string `json:"error"`
}

// sameConfig returns an error when the master on sock runs another config
// than the file at path: a reload would read the master's file, not path.
// A master that does not answer is no error here (reload reports it).
func sameConfig(sock, path string) error {
	st, _, err := fetchStatus(sock)
	if err != nil {
		return nil
	}
	want := canonicalPath(path)
	if st.Config != config.EmbeddedSource && canonicalPath(st.Config) == want {
		return nil
	}
	return fmt.Errorf("the master (pid %d) runs %s, not %s; a reload reloads the master's own config "+
		"(edit that file, or stop the master and start one with -c %s)", st.PID, st.Config, want, path)
}

// canonicalPath returns path absolute, with symbolic links resolved when
// it exists.
func canonicalPath(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	return path
}

// postReload asks the master on the control socket to reload. sent says
// whether the request reached a master (then it must not be retried by
// other means).
func postReload(sock string) (ans reloadAnswer, sent bool, err error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	c := &http.Client{
		Timeout: reloadTimeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialControl(ctx, &d, sock)
		}},
	}
	resp, err := c.Post("http://sniproxy/reload", "application/json", nil)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return ans, false, fmt.Errorf("no master answers on %s: %w", sock, err)
		}
		return ans, true, fmt.Errorf("asking the master on %s: %w (see its log; `sniproxy status` shows the generation)", sock, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return ans, true, fmt.Errorf("reading the answer: %w", err)
	}
	if err := json.Unmarshal(body, &ans); err != nil {
		return ans, true, fmt.Errorf("bad answer %q: %w", strings.TrimSpace(string(body)), err)
	}
	if ans.Error != "" {
		return ans, true, fmt.Errorf("%s", ans.Error)
	}
	return ans, true, nil
}

// hupAndWait sends SIGHUP to the master in pidFile and waits until the file
// names another live process.
func hupAndWait(pidFile string) (reloadAnswer, error) {
	read := func() (int, error) {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(strings.TrimSpace(string(b)))
	}
	old, err := read()
	if err != nil {
		return reloadAnswer{}, fmt.Errorf("PID file: %w", err)
	}
	if err := isMaster(old); err != nil {
		return reloadAnswer{}, fmt.Errorf("not signalling the PID in %s: %w", pidFile, err)
	}
	if err := syscall.Kill(old, syscall.SIGHUP); err != nil {
		return reloadAnswer{}, fmt.Errorf("signal master %d: %w", old, err)
	}
	deadline := time.Now().Add(reloadTimeout)
	for time.Now().Before(deadline) {
		if pid, err := read(); err == nil && pid != old && syscall.Kill(pid, 0) == nil {
			return reloadAnswer{PID: pid}, nil
		}
		if syscall.Kill(old, 0) != nil {
			return reloadAnswer{}, fmt.Errorf("master %d exited and %s names no new one", old, pidFile)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return reloadAnswer{}, fmt.Errorf("no new master within %v (see the master's log)", reloadTimeout)
}

// isMaster returns nil when pid is a live sniproxy master: its executable
// or its argv[0] is named sniproxy and it is not a worker (`sniproxy
// worker`). A PID file left behind may name any process by now.
func isMaster(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("%d is not a process ID", pid)
	}
	dir := "/proc/" + strconv.Itoa(pid)
	cmdline, err := os.ReadFile(dir + "/cmdline")
	if err != nil || len(cmdline) == 0 {
		return fmt.Errorf("no process %d", pid)
	}
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	exe, _ := os.Readlink(dir + "/exe")
	named := func(p string) bool { return strings.HasPrefix(filepath.Base(p), "sniproxy") }
	if !named(args[0]) && !named(strings.TrimSuffix(exe, " (deleted)")) {
		return fmt.Errorf("process %d (%s) is not sniproxy", pid, args[0])
	}
	if len(args) > 1 && args[1] == "worker" {
		return fmt.Errorf("process %d is a sniproxy worker, not a master", pid)
	}
	return nil
}
