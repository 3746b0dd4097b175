package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/lease"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/testswitch"
	"github.com/sniproxy/sniproxy/ipc"
)

// StatsInterval is how often a worker process pushes counter deltas.
const StatsInterval = time.Second

// NamedFile is a listening socket a worker process inherited, with the
// master's name for it: "reuseport/<address>/<index>" or "shared/<address>".
type NamedFile struct {
	Name string
	File *os.File
}

// ListenerAddress returns the config address a socket name refers to.
func ListenerAddress(name string) (string, error) {
	kind, rest, ok := strings.Cut(name, "/")
	switch {
	case ok && kind == "shared":
		return rest, nil
	case ok && kind == "reuseport":
		if i := strings.LastIndexByte(rest, '/'); i > 0 {
			return rest[:i], nil
		}
	}
	return "", fmt.Errorf("worker: bad socket name %q", name)
}

// Process is a worker process: it serves the sockets its master handed it,
// with the config the master sent, takes connection permits from the
// master's lease pool and pushes its counts to the master, all over one
// ipc.Conn. When that connection ends (the master is gone, even killed) it
// drains and exits: a worker never outlives its master.
type Process struct {
	Log        *slog.Logger
	Conn       *ipc.Conn
	Slot       int
	Generation int
	Files      []NamedFile
	// Switches are the e2e tests' switches (package testswitch); the zero
	// value in production.
	Switches testswitch.Switches

	mu       sync.Mutex
	waiters  []chan int // lease requests awaiting a grant, in order
	dead     bool
	lease    *lease.Client
	migrated atomic.Bool // set by the first migrate
}

// Request implements lease.Transport: it asks the master for permits and
// waits for the grant. Grants come back in request order.
//
// Once the master is gone the worker only drains: its listeners are closing,
// and a connection it accepted in that instant is served rather than reset,
// with a permit granted locally (the global count cannot be consulted).
func (p *Process) Request(want int, urgent bool) (int, error) {
	ch := make(chan int, 1)
	p.mu.Lock()
	if p.dead {
		p.mu.Unlock()
		return 1, nil
	}
	p.waiters = append(p.waiters, ch)
	// Sent under the lock so the order of sends is the order of waiters.
	err := p.Conn.SendBody(ipc.LeaseRequest{Want: want, Urgent: urgent})
	if err != nil {
		p.waiters = p.waiters[:len(p.waiters)-1]
	}
	p.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n, ok := <-ch
	if !ok {
		return 1, nil // the master went away meanwhile: see above
	}
	return n, nil
}

// Return implements lease.Transport. Once requests fail (the master is
// gone, or told this worker to stop), permits are local and nothing goes
// back: the master takes back what it granted when this worker exits.
func (p *Process) Return(n int) {
	p.mu.Lock()
	dead := p.dead
	p.mu.Unlock()
	if dead {
		return
	}
	if err := p.Conn.SendBody(ipc.LeaseReturn{N: n}); err != nil {
		p.Log.Debug("returning permits failed", "n", n, "err", err)
	}
}

// grant hands a LeaseGrant to the oldest waiter.
func (p *Process) grant(n int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.waiters) == 0 {
		return errors.New("worker: lease grant with no request outstanding")
	}
	ch := p.waiters[0]
	p.waiters = p.waiters[1:]
	ch <- n
	return nil
}

// failWaiters wakes every waiter with no grant; later requests fail.
func (p *Process) failWaiters() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dead = true
	for _, ch := range p.waiters {
		close(ch)
	}
	p.waiters = nil
}

// Run says hello, waits for the config, serves until told to drain or stop
// or until the master is gone, and returns once every connection has ended.
func (p *Process) Run() error {
	if err := p.Conn.SendBody(ipc.Hello{Proto: ipc.Version, Slot: p.Slot, PID: os.Getpid(), Generation: p.Generation}); err != nil {
		return fmt.Errorf("worker: hello: %w", err)
	}
	cfg, err := p.recvConfig()
	if err != nil {
		return err
	}
	lns, err := p.listeners(cfg)
	if err != nil {
		return err
	}

	var counters stats.Counters
	workers := max(cfg.Workers, 1)
	client := lease.NewClient(p, lease.BlockSize(cfg.MaxConnections, workers))
	p.lease = client
	srv, err := New(cfg, p.Log, &counters, client)
	if err != nil {
		return err
	}
	if p.Switches.FreshSockets {
		// The reload negative control (see master.Options.FreshSockets).
		srv.LingerOnStop = 300 * time.Millisecond
	}
	ctx, stopAccepting := context.WithCancel(context.Background())
	defer stopAccepting()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, lns) }()

	pushDone := make(chan struct{})
	stopPush := make(chan struct{})
	go func() {
		defer close(pushDone)
		p.pushStats(&counters, stopPush)
	}()
	if err := p.Conn.SendBody(ipc.Ready{}); err != nil {
		return fmt.Errorf("worker: ready: %w", err)
	}
	p.Log.Debug("worker ready", "slot", p.Slot, "listeners", len(lns))

	// Read the master's messages until drain, stop or EOF.
	drainBy, migrate, err := p.loop(srv)
	if err != nil {
		p.failWaiters()
	}
	if d := p.Switches.StopDelay; d > 0 && err == nil {
		// Test-only: a worker slow to stop accepting, so that the e2e
		// test can show a reload is answered only after it has.
		time.Sleep(d)
	}
	stopAccepting()
	if serr := <-served; serr != nil {
		p.Log.Error("serving failed", "err", serr)
	}
	// Accepting no more: spare permits go back for the next generation,
	// and the master hears it (a reload is answered once the old workers
	// have stopped accepting).
	client.Drain()
	if err == nil {
		p.Conn.SendBody(ipc.Stopped{})
	}
	if err != nil {
		// The master is gone: drain on our own within the configured
		// limit, as a graceful stop would.
		if !errors.Is(err, io.EOF) {
			p.Log.Warn("lost the master", "err", err)
		}
		drainBy = time.Now().Add(cfg.ShutdownTimeout)
	}
	dctx, cancel := context.WithDeadline(context.Background(), drainBy)
	if err == nil {
		// Keep listening to the master while draining: a Stop (a second
		// signal) ends the drain at once, a Migrate after the handover;
		// if the master dies, the drain lasts at most shutdown_timeout
		// more. Lease grants still come: a connection accepted just
		// before the listeners closed may be waiting for one.
		go p.whileDraining(srv, cancel, drainBy, cfg.ShutdownTimeout)
	}
	if migrate {
		// Told to hand over while still serving.
		p.migrate(srv, drainBy)
		cancel()
	}
	closed := srv.Drain(dctx)
	cancel()
	if closed > 0 {
		p.Log.Warn("drain deadline reached; closed connections", "closed", closed)
	}
	close(stopPush)
	<-pushDone
	return nil
}

// recvConfig waits for the master's Config.
func (p *Process) recvConfig() (*config.Config, error) {
	m, err := p.Conn.Recv()
	if err != nil {
		return nil, fmt.Errorf("worker: waiting for config: %w", err)
	}
	b, err := ipc.Decode(m)
	m.CloseFiles()
	if err != nil {
		return nil, fmt.Errorf("worker: waiting for config: %w", err)
	}
	c, ok := b.(ipc.Config)
	if !ok {
		return nil, fmt.Errorf("worker: waiting for config, got %v", m.Type)
	}
	// No environment: the master already applied it, and validated.
	cfg, err := config.Parse(c.YAML, []string{})
	if err != nil {
		return nil, fmt.Errorf("worker: config from master: %w", err)
	}
	return cfg, nil
}

// listeners turns the inherited sockets into Listeners with their config.
func (p *Process) listeners(cfg *config.Config) ([]Listener, error) {
	byAddr := map[string]config.Listener{}
	for _, l := range cfg.Listeners {
		byAddr[l.Address] = l
	}
	var lns []Listener
	for _, nf := range p.Files {
		addr, err := ListenerAddress(nf.Name)
		if err != nil {
			return nil, err
		}
		lcfg, ok := byAddr[addr]
		if !ok {
			return nil, fmt.Errorf("worker: socket %s is for no configured listener", nf.Name)
		}
		ln, err := net.FileListener(nf.File)
		if err != nil {
			return nil, fmt.Errorf("worker: socket %s: %w", nf.Name, err)
		}
		nf.File.Close()
		tl, ok := ln.(*net.TCPListener)
		if !ok {
			ln.Close()
			return nil, fmt.Errorf("worker: socket %s is not TCP", nf.Name)
		}
		lns = append(lns, Listener{Config: lcfg, Ln: tl})
	}
	return lns, nil
}

// noDeadline stands for a drain without deadline (shutdown_timeout 0).
const noDeadline = 100 * 365 * 24 * time.Hour

// loop handles the master's messages. It returns the drain deadline when
// told to drain or stop (and migrate, when told to hand its connections
// over first), or an error when the connection ends.
func (p *Process) loop(srv *Server) (drainBy time.Time, migrate bool, err error) {
	for {
		m, err := p.Conn.Recv()
		if err != nil {
			return time.Time{}, false, err
		}
		b, err := ipc.Decode(m)
		if err != nil {
			m.CloseFiles()
			return time.Time{}, false, err
		}
		switch b := b.(type) {
		case ipc.LeaseGrant:
			if err := p.grant(b.N); err != nil {
				return time.Time{}, false, err
			}
		case ipc.Ping:
			p.Conn.SendBody(ipc.Pong(b))
		case ipc.Revoke:
			p.revoke()
		case ipc.Connection:
			// Inline, not on a goroutine: the connection must be tracked
			// before a Drain that follows it is handled.
			if err := srv.Adopt(b.State, m.Files[0], m.Files[1]); err != nil {
				p.Log.Warn("could not take over a connection", "err", err)
			}
		case ipc.Drain:
			p.Log.Info("draining", "slot", p.Slot, "active", srv.Active(), "deadline", b.Deadline)
			if b.Deadline.IsZero() {
				// No deadline: until the connections end or a Stop.
				return time.Now().Add(noDeadline), false, nil
			}
			return b.Deadline, false, nil
		case ipc.Migrate:
			return time.Now().Add(srv.cfg.ShutdownTimeout), true, nil
		case ipc.Stop:
			return time.Now(), false, nil
		default:
			m.CloseFiles()
			p.Log.Warn("unexpected message from master", "type", m.Type.String())
		}
	}
}

// revoke gives every spare permit back to the master's pool, for a
// sibling that found it dry.
func (p *Process) revoke() {
	if p.lease != nil {
		p.lease.Revoke(p.lease.Spare())
	}
}

// migrateTimeout bounds how long a worker tries to hand its connections
// over: the next generation waits for this one to exit.
const migrateTimeout = 5 * time.Second

// migrate hands every proxied connection to the master, which passes it to
// the next generation (see Server.Migrate).
func (p *Process) migrate(srv *Server, drainBy time.Time) {
	if !p.migrated.CompareAndSwap(false, true) {
		return // under way (its write deadline must stand)
	}
	if time.Until(drainBy) > noDeadline/2 {
		drainBy = time.Time{}
	}
	active := srv.Active()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), migrateTimeout)
	defer cancel()
	// A master that stops reading must not hold this worker past the
	// time its successor waits for this generation to exit.
	p.Conn.SetWriteDeadline(time.Now().Add(migrateTimeout + time.Second))
	defer p.Conn.SetWriteDeadline(time.Time{})
	moved, closed := srv.Migrate(ctx, drainBy, func(state []byte, client, backend *os.File) error {
		return p.Conn.SendBody(ipc.Connection{State: state}, client, backend)
	})
	p.Log.Info("handed connections to the next generation", "slot", p.Slot, "active", active,
		"moved", moved, "closed", closed, "took", time.Since(t0))
}

// whileDraining reads the master's messages during a drain: Stop cancels
// the drain at once; Migrate hands the connections over, then ends it;
// losing the master ends it within limit from then (sooner if the master's
// deadline comes first).
//
// Permits are still granted while draining: a connection accepted just
// before the listeners closed may need one.
func (p *Process) whileDraining(srv *Server, cancel context.CancelFunc, drainBy time.Time, limit time.Duration) {
	defer p.failWaiters()
	for {
		m, err := p.Conn.Recv()
		if err != nil {
			time.AfterFunc(limit, cancel)
			return
		}
		b, err := ipc.Decode(m)
		m.CloseFiles() // a Connection now would come too late: Drain may be done
		if err != nil {
			time.AfterFunc(limit, cancel)
			return
		}
		switch b := b.(type) {
		case ipc.Connection:
			p.Log.Warn("a connection handed over to a draining worker was closed")
		case ipc.Migrate:
			p.migrate(srv, drainBy)
			cancel()
			return
		case ipc.Stop:
			cancel()
			return
		case ipc.LeaseGrant:
			p.grant(b.N)
		case ipc.Revoke:
			p.revoke()
		case ipc.Ping:
			p.Conn.SendBody(ipc.Pong(b))
		}
	}
}

// pushStats sends counter deltas every StatsInterval and a last one when
// stop is closed.
func (p *Process) pushStats(c *stats.Counters, stop <-chan struct{}) {
	var prev stats.Snapshot
	t := time.NewTicker(StatsInterval)
	defer t.Stop()
	push := func() {
		cur := c.Snapshot()
		d := cur.Sub(prev)
		if d == (stats.Snapshot{}) {
			return
		}
		if err := p.Conn.SendBody(ipc.Stats{Delta: d}); err == nil {
			prev = cur
		}
	}
	for {
		select {
		case <-t.C:
			push()
		case <-stop:
			push()
			return
		}
	}
}
