package master

import (
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// stopAckTimeout bounds the wait for workers told to retire to stop
// accepting.
const stopAckTimeout = 2 * time.Second

// killGrace is how long after the drain deadline workers still running
// are killed.
const killGrace = 5 * time.Second

// exitWait bounds the wait for one exited worker's last messages.
const exitWait = 5 * time.Second

// shutdown is the part that retires this generation's workers: on a stop
// (stop accepting, drain, stop now on a second signal) and after a
// reload. It has no state of its own beyond what it is given.
type shutdown struct {
	log   *slog.Logger
	sup   *supervisor
	relay *relay
	// signals delivers the operator's signals: a second TERM/INT/QUIT
	// while draining means stop now.
	signals <-chan os.Signal
	// closeSockets closes this master's copies of the listening sockets
	// (and tableflip's).
	closeSockets func()
	// active returns the connections open, for the drain's progress log.
	active func() int64
	// reap accounts for an exited worker.
	reap func(*child)
	// reopenLogs reopens the log files on SIGUSR1 while draining; nil
	// ignores it.
	reopenLogs func()
}

// stop retires every worker with deadline and waits for them to drain.
func (s *shutdown) stop(deadline time.Time) {
	s.drain(s.retire(deadline), deadline)
}

// retire tells every worker to retire with deadline, waits (at most
// stopAckTimeout) until each has stopped accepting, and returns them.
func (s *shutdown) retire(deadline time.Time) []*child {
	s.relay.retire()
	kids := s.sup.retire()
	for _, c := range kids {
		c.conn.SendBody(ipc.Retire{Deadline: deadline})
	}
	// Until each has closed its listeners (or died), briefly: after a
	// reload is answered, only the new generation accepts.
	wait := time.NewTimer(stopAckTimeout)
	defer wait.Stop()
	for _, c := range kids {
		select {
		case <-c.stopped:
		case <-c.exited:
		case <-wait.C:
			s.log.Warn("workers slow to stop accepting", "slot", c.slot, "pid", c.pid())
			return kids
		}
	}
	return kids
}

// drain closes this master's listening sockets and waits for the workers
// retire returned to exit: a second signal makes them stop now, and any
// left killGrace after the deadline are killed.
func (s *shutdown) drain(kids []*child, deadline time.Time) {
	// Stop listening for good: with the master's and tableflip's copies
	// closed, the sockets close once the workers close theirs, so new
	// clients are refused rather than queued where nobody will accept.
	s.closeSockets()
	hard := time.NewTimer(time.Until(deadline) + killGrace)
	defer hard.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	reaped := make(map[*child]bool, len(kids))
	for _, c := range kids {
	wait:
		for {
			select {
			case <-c.exited:
				break wait
			case e := <-s.sup.exits:
				// Each as it exits: its permits and client permits go
				// back now (to the successor's reserves too), not once
				// the last worker of the generation has drained.
				s.reap(e)
				reaped[e] = true
			case sig := <-s.signals:
				if sig == syscall.SIGHUP {
					continue
				}
				if sig == syscall.SIGUSR1 {
					if s.reopenLogs != nil {
						s.reopenLogs()
					}
					continue
				}
				s.log.Warn("second signal: stopping workers now", "signal", sig.String())
				for _, k := range kids {
					k.conn.SendBody(ipc.Stop{})
				}
			case <-tick.C:
				s.log.Info("draining", "active", s.active())
			case <-hard.C:
				s.log.Error("workers did not exit after the drain deadline; killing them")
				for _, k := range kids {
					k.kill()
				}
			}
		}
	}
	// Take the exit reports still to come, so that the final counts are
	// in the totals.
	left := 0
	for _, c := range kids {
		if !reaped[c] {
			left++
		}
	}
	for range left {
		select {
		case c := <-s.sup.exits:
			s.reap(c)
		case <-time.After(exitWait):
		}
	}
}
