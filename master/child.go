package master

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/ipc"
)

// scrubbed are environment variables a worker must not inherit: tableflip's
// marker would make the worker think it is a successor master, and systemd's
// notify socket belongs to the master alone.
var scrubbed = []string{"TABLEFLIP_HAS_PARENT_7DIU3", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"}

// workerEnv returns env without the scrubbed variables.
func workerEnv(env []string) []string {
	out := make([]string, 0, len(env))
next:
	for _, kv := range env {
		for _, s := range scrubbed {
			if strings.HasPrefix(kv, s+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}

// child is one worker process.
type child struct {
	slot    int
	id      int // worker id: the permit broker's name for this process
	cmd     *exec.Cmd
	conn    *ipc.Conn
	started time.Time
	ready   chan struct{} // closed on the first Ready
	// readyOnce guards closing ready: a second Ready (a broken or hostile
	// worker) must not panic the master.
	readyOnce sync.Once
	// stopped is closed when the worker, told to retire, says it has
	// stopped accepting.
	stopped     chan struct{}
	stoppedOnce sync.Once
	exited      chan struct{} // closed when the process has been reaped
	waitErr     error

	mu     sync.Mutex
	totals stats.Snapshot // everything this process reported
}

// workerLogs are the files a worker logs to at start.
type workerLogs struct {
	stderr *os.File // never nil
	access *os.File // nil: access lines go to stderr
}

// startChild starts a worker process for slot with its sockets: names[i]
// is socks[i]'s name. The socket descriptors go through ExtraFiles (fd 4
// on; the IPC pair is fd 3); socks are F_DUPFD_CLOEXEC duplicates made
// for this start (see socketSet.filesForSlot), which startChild closes
// whatever happens.
//
// The worker runs exe, normally /proc/self/exe, so the kernel would name it
// "exe": its argv[0] is "sniproxy" (ps, pgrep -f) and it sets its own comm
// (ps, top, ss, pgrep) at start. Its stderr is lf.stderr: the master's, or
// the main log file; the access log file, if any, follows the sockets
// (--access-log-fd). With cred, the worker runs as that user and groups: a
// root master's capabilities are not passed on (the kernel clears them when
// a process changes from uid 0 at exec).
func startChild(exe string, slot, generation, id int, names []string, socks []*os.File, log config.Log, lf workerLogs, cred *syscall.Credential) (*child, error) {
	// Once the worker has its copies, these leave the runtime's epoll.
	defer closeFiles(socks)
	conn, wf, err := ipc.Pair()
	if err != nil {
		return nil, err
	}
	files := append([]*os.File{wf}, socks...)
	args := []string{"worker",
		"--slot", strconv.Itoa(slot),
		"--generation", strconv.Itoa(generation),
		"--sockets", strings.Join(names, ","),
		"--log-level", log.Level,
		"--log-format", log.Format}
	if lf.access != nil {
		args = append(args, "--access-log-fd", strconv.Itoa(3+len(files)))
		files = append(files, lf.access)
	}
	cmd := exec.Command(exe, args...)
	cmd.Args[0] = "sniproxy"
	cmd.Env = workerEnv(os.Environ())
	cmd.Stdout, cmd.Stderr = os.Stdout, lf.stderr
	cmd.ExtraFiles = files
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	if err := cmd.Start(); err != nil {
		wf.Close()
		conn.Close()
		return nil, fmt.Errorf("master: start worker %d: %w", slot, err)
	}
	// Our copy of the worker's end must go, or EOF never reaches us when
	// the worker dies.
	wf.Close()
	c := &child{
		slot: slot, id: id, cmd: cmd, conn: conn, started: time.Now(),
		ready: make(chan struct{}), exited: make(chan struct{}), stopped: make(chan struct{}),
	}
	go c.wait()
	return c, nil
}

// wait reaps the process; the only place its Wait is called. It leaves
// the IPC connection alone: the worker's last frames (its final counts) may
// still be unread, and the supervisor's reader reads them up to EOF, then closes it.
func (c *child) wait() {
	c.waitErr = c.cmd.Wait()
	close(c.exited)
}

// pid returns the worker's process ID (0 for a child without a process,
// in tests).
func (c *child) pid() int {
	if c.cmd == nil || c.cmd.Process == nil {
		return 0
	}
	return c.cmd.Process.Pid
}

// active returns the worker's connections open, as last reported.
func (c *child) active() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.totals.Active
}

// isReady reports whether the worker said Ready.
func (c *child) isReady() bool {
	select {
	case <-c.ready:
		return true
	default:
		return false
	}
}

// exitStatus describes how the process ended.
func (c *child) exitStatus() string {
	if c.waitErr == nil {
		return "exit status 0"
	}
	var ee *exec.ExitError
	if errors.As(c.waitErr, &ee) {
		return ee.ProcessState.String()
	}
	return c.waitErr.Error()
}

// kill kills the worker process (a child without one, in tests, is left
// alone).
func (c *child) kill() {
	if c.cmd != nil && c.cmd.Process != nil {
		c.cmd.Process.Kill()
	}
}

// addStats adds a stats push to what this worker reported.
func (c *child) addStats(d stats.Snapshot) {
	c.mu.Lock()
	c.totals.Add(d)
	c.mu.Unlock()
}
