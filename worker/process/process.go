// Package process is the worker process a master starts (`sniproxy
// worker`): it serves the sockets its master handed it with a
// worker.Server, with the config the master sent, takes connection permits
// from the master's lease pool and pushes its counts to the master, all
// over one ipc.Conn, the worker's lifeline. It retires, moves its
// connections or stops when the master says so; when the lifeline ends
// (the master is gone, even killed) it drains and exits: a worker never
// outlives its master.
//
// One goroutine, the control loop (see loop), owns the process's state and
// handles every event: the master's messages (read by a reader goroutine
// that does nothing else), the server's accept loops ending, a move or a
// drain finishing, the drain deadline, the stats tick. Whatever may take
// long (accepting, draining, moving) runs on its own goroutine and reports
// back to the loop, so the loop always reads the master on.
package process

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/worker"
)

// NamedFile is a listening socket a worker process inherited, with the
// master's name for it: "reuseport/<address>/<index>" or "shared/<address>".
type NamedFile struct {
	Name string
	File *os.File
}

// listenerAddress returns the config address a socket name refers to.
func listenerAddress(name string) (string, error) {
	kind, rest, ok := strings.Cut(name, "/")
	switch {
	case ok && kind == "shared":
		return rest, nil
	case ok && kind == "reuseport":
		if i := strings.LastIndexByte(rest, '/'); i > 0 {
			return rest[:i], nil
		}
	}
	return "", fmt.Errorf("process: bad socket name %q", name)
}

// Options is what a worker process is started with.
type Options struct {
	Log *slog.Logger
	// Conn is the ipc connection to the master. Run does not close it;
	// the caller closes it after Run returns (which ends the goroutine
	// reading it).
	Conn       *ipc.Conn
	Slot       int
	Generation int
	// Files are the listening sockets; Run owns them.
	Files []NamedFile
	// Switches are the e2e tests' switches (package testswitch); the zero
	// value in production.
	Switches testswitch.Switches
	// Access is where the access log goes when the config names an
	// access file (the master opened it); nil: with the other lines, on
	// stderr. SIGUSR1 at the master swaps it (ipc.LogFiles).
	Access *logging.Output
}

// Run is the life of a worker process: it says hello, waits for the
// config and the health table (which the master sends together), serves until told to retire, move or stop or until the master is
// gone, and returns once every connection has ended (or moved).
func Run(o Options) error {
	if err := o.Conn.SendBody(ipc.Hello{Proto: ipc.Version, Slot: o.Slot, PID: os.Getpid(), Generation: o.Generation}); err != nil {
		return fmt.Errorf("process: hello: %w", err)
	}
	cfg, err := recvConfig(o.Conn)
	if err != nil {
		return err
	}
	setProcs(cfg)
	table, err := recvHealth(o.Conn)
	if err != nil {
		return err
	}
	lns, err := listeners(cfg, o.Files)
	if err != nil {
		return err
	}
	l, err := newLoop(o, cfg)
	if err != nil {
		for _, ln := range lns {
			ln.Ln.Close()
		}
		return err
	}
	l.srv.SetHealth(table)
	return l.run(lns)
}

// recvConfig waits for the master's Config.
func recvConfig(c *ipc.Conn) (*config.Config, error) {
	m, err := c.Recv()
	if err != nil {
		return nil, fmt.Errorf("process: waiting for config: %w", err)
	}
	b, err := ipc.Decode(m)
	m.CloseFiles()
	if err != nil {
		return nil, fmt.Errorf("process: waiting for config: %w", err)
	}
	cm, ok := b.(ipc.Config)
	if !ok {
		return nil, fmt.Errorf("process: waiting for config, got %v", m.Type)
	}
	// No environment: the master already applied it, and validated.
	cfg, err := config.Parse(cm.YAML, []string{})
	if err != nil {
		return nil, fmt.Errorf("process: config from master: %w", err)
	}
	return cfg, nil
}

// listeners turns the inherited sockets into Listeners with their config.
// It closes the files.
func listeners(cfg *config.Config, files []NamedFile) (lns []worker.Listener, err error) {
	defer func() {
		for _, nf := range files {
			nf.File.Close()
		}
		if err != nil {
			for _, l := range lns {
				l.Ln.Close()
			}
			lns = nil
		}
	}()
	byAddr := map[string]config.Listener{}
	for _, l := range cfg.Listeners {
		byAddr[l.Address] = l
	}
	for _, nf := range files {
		addr, err := listenerAddress(nf.Name)
		if err != nil {
			return lns, err
		}
		lcfg, ok := byAddr[addr]
		if !ok {
			return lns, fmt.Errorf("process: socket %s is for no configured listener", nf.Name)
		}
		ln, err := net.FileListener(nf.File)
		if err != nil {
			return lns, fmt.Errorf("process: socket %s: %w", nf.Name, err)
		}
		tl, ok := ln.(*net.TCPListener)
		if !ok {
			ln.Close()
			return lns, fmt.Errorf("process: socket %s is not TCP", nf.Name)
		}
		lns = append(lns, worker.Listener{Config: lcfg, Ln: tl})
	}
	return lns, nil
}
