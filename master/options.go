package master

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/peercred"
)

// Options configure a master.
type Options struct {
	// Config is the validated config.
	Config *config.Config
	// Log receives the master's logs (the master adds its pid and
	// generation to every line). Workers log to stderr, or to Logs' files.
	Log *slog.Logger
	// Logs, when set, are the log files behind Log (and the access log):
	// SIGUSR1 reopens them, and the master hands them to its workers
	// (ipc.LogFiles). Nil: everything goes to stderr, and SIGUSR1 only
	// says so.
	Logs *logging.Logs
	// SharePorts lets a first master bind its reuseport listeners while
	// another process (another sniproxy instance) listens on the same
	// address; without it that is an error, since the kernel would split
	// the traffic between the two.
	SharePorts bool
	// Signals delivers SIGHUP, SIGUSR1, SIGTERM, SIGINT and SIGQUIT.
	Signals <-chan os.Signal
	// Version is the build's version string.
	Version string
	// Executable is the binary workers are started from; "" means
	// /proc/self/exe: the very binary this master runs, even after a
	// package upgrade replaced the file on disk (a worker must speak its
	// master's protocol version).
	Executable string
	// ReadyTimeout bounds the wait for every worker to accept; 0 means 30s.
	ReadyTimeout time.Duration
	// ConfigPath is the file a reload reads ("" = the embedded default).
	ConfigPath string
	// LoadConfig loads the config for a reload; nil means config.Load.
	LoadConfig func(path string) (*config.Config, error)
	// UpgradeTimeout bounds a reload (tableflip's Options.UpgradeTimeout):
	// a successor not ready by then is killed and the reload fails; 0
	// means one minute.
	UpgradeTimeout time.Duration

	// Test-only switches, wrong on purpose, for the negative controls of
	// the e2e tests (they must produce failures, so that a zero means
	// something); and a hook to make a successor hang.

	// ReplaceDeadSockets makes the master shut down a dead worker's
	// reuseport sockets and bind new ones: queued connections are reset.
	ReplaceDeadSockets bool
	// FreshSockets makes the master bind new reuseport sockets instead of
	// inheriting its predecessor's, which are closed under their queues when
	// the predecessor's workers stop.
	FreshSockets bool
	// NoMove makes a hurried generation close its connections instead
	// of moving them (the policy before connections moved).
	NoMove bool
	// HangBeforeReady, if it returns true, makes a successor hang instead
	// of signalling readiness.
	HangBeforeReady func() bool
}

// RunDir is the directory the control socket goes in, when it exists and
// is writable and neither the config nor $RUNTIME_DIRECTORY says
// otherwise: the RuntimeDirectory= of the shipped systemd unit, which an
// admin shell (with no $RUNTIME_DIRECTORY) finds too.
const RunDir = "/run/sniproxy"

// ControlSocketPath returns the control socket path for cfg: the configured
// one, else sniproxy.sock in $RUNTIME_DIRECTORY (set by systemd's
// RuntimeDirectory=; the first of its directories), else in RunDir when
// that exists and is writable, else in this user's private directory in the
// temp dir (peercred.UserTempDir).
func ControlSocketPath(cfg *config.Config) string {
	return DefaultControlSocket(cfg.ControlSocket, os.Getenv("RUNTIME_DIRECTORY"), writableDir)
}

// DefaultControlSocket is ControlSocketPath over configured (the config's
// control_socket), runtimeDir ($RUNTIME_DIRECTORY) and writable, which
// reports whether a directory exists and this process may create files
// in it.
func DefaultControlSocket(configured, runtimeDir string, writable func(dir string) bool) string {
	if configured != "" {
		return configured
	}
	if d, _, _ := strings.Cut(runtimeDir, ":"); d != "" {
		return filepath.Join(d, "sniproxy.sock")
	}
	if writable(RunDir) {
		return filepath.Join(RunDir, "sniproxy.sock")
	}
	// Not the shared temp dir itself: another user could squat the path.
	return filepath.Join(peercred.UserTempDir(), "sniproxy.sock")
}

// writableDir reports whether dir is a directory this process may create
// files in.
func writableDir(dir string) bool {
	st, err := os.Stat(dir)
	return err == nil && st.IsDir() && unix.Access(dir, unix.W_OK) == nil
}

// FindControlSocket is the control socket of the master cfg configures, as
// a client (`sniproxy status`, `reload`) finds it: ControlSocketPath, but
// a caller that may not write in RunDir, and has no socket of its own in
// its temp dir, uses the socket in RunDir when there is one: a master
// started as root put it there, and serves its `group`'s members.
func FindControlSocket(cfg *config.Config) string {
	return DefaultControlSocket(cfg.ControlSocket, os.Getenv("RUNTIME_DIRECTORY"), func(dir string) bool {
		return clientUsesDir(dir, writableDir, isSocket)
	})
}

// clientUsesDir reports whether a client looks for the control socket in
// the directory dir (RunDir): when it may create files there as a master
// would, or when dir holds a socket and the client's own temp directory
// (peercred.UserTempDir) does not.
func clientUsesDir(dir string, writable, isSocket func(string) bool) bool {
	if writable(dir) {
		return true
	}
	return !isSocket(filepath.Join(peercred.UserTempDir(), "sniproxy.sock")) && isSocket(filepath.Join(dir, "sniproxy.sock"))
}

// isSocket reports whether path is a Unix socket (symlinks followed).
func isSocket(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().Type() == os.ModeSocket
}
