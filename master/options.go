package master

import (
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/sniproxy/sniproxy/config"
)

// Options configure a master.
type Options struct {
	// Config is the validated config.
	Config *config.Config
	// Log receives the master's logs; workers log to the same stderr.
	Log *slog.Logger
	// Signals delivers SIGHUP, SIGTERM and SIGINT.
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

// ControlSocketPath returns the control socket path for cfg: the configured
// one, else sniproxy.sock in $RUNTIME_DIRECTORY (set by systemd), else in
// the temporary directory.
func ControlSocketPath(cfg *config.Config) string {
	if cfg.ControlSocket != "" {
		return cfg.ControlSocket
	}
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		return filepath.Join(d, "sniproxy.sock")
	}
	return filepath.Join(os.TempDir(), "sniproxy.sock")
}
