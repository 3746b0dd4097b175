// Package testswitch gathers the switches that let the end-to-end tests put
// the real binary into states a healthy deployment never reaches: a worker
// slow to stop, a successor that hangs before it is ready, the negative
// controls that undo a guarantee so that a test can show it matters.
//
// They are read from SNIPROXYTEST_* environment variables, and only in a
// binary built with the build tag "sniproxytest" (the e2e harness builds it
// so). In any other build [Read] returns the zero Switches and no variable is
// looked at: the production binary has no test switch.
//
// Production code asks for the switches once, at start, through [Read], and
// passes the values down as ordinary options; nothing else reads them.
package testswitch

import "time"

// Switches are the test-only behaviours. The zero value is production
// behaviour.
type Switches struct {
	// ReplaceDeadSockets makes the master close a dead worker's reuseport
	// sockets and bind fresh ones (SNIPROXYTEST_REPLACE_DEAD_SOCKETS=1): the
	// negative control for keeping a dead worker's queue.
	ReplaceDeadSockets bool
	// FreshSockets makes each generation bind new reuseport sockets instead
	// of inheriting them, and old workers linger briefly after closing
	// theirs (SNIPROXYTEST_FRESH_SOCKETS=1): the reload negative control.
	FreshSockets bool
	// NoMove makes a hurried generation close its connections instead of
	// moving them (SNIPROXYTEST_NO_MOVE=1).
	NoMove bool
	// UpgradeTimeout, when non-zero, replaces how long a master waits for
	// its successor to become ready (SNIPROXYTEST_UPGRADE_TIMEOUT=2s).
	UpgradeTimeout time.Duration
	// HangIfFile, when set, makes a new master hang before it is ready while
	// that file exists (SNIPROXYTEST_HANG_IF_FILE=/path).
	HangIfFile string
	// StopDelay makes a worker wait this long before it stops accepting
	// (SNIPROXYTEST_STOP_DELAY=200ms).
	StopDelay time.Duration
}
