package master

import (
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/ipc"
)

// A stop: the workers are told to retire with the deadline and acknowledge
// (stop accepting); the sockets close; a second signal makes them stop
// now; once they exit each is reaped.
func TestShutdownStopThenStopNow(t *testing.T) {
	p := newParts(t, 2)
	signals := make(chan os.Signal, 1)
	var mu sync.Mutex
	var reaped []*child
	socketsClosed := make(chan struct{})
	s := &shutdown{log: quietLog(), sup: p.sup, relay: p.relay, signals: signals,
		closeSockets: func() { close(socketsClosed) },
		active:       func() int64 { return 0 },
		reap: func(c *child) {
			mu.Lock()
			reaped = append(reaped, c)
			mu.Unlock()
		}}
	deadline := time.Now().Add(time.Hour)
	// Each worker: acknowledge the retire, then on Stop end and exit.
	for _, w := range p.fs.made {
		go func() {
			for {
				msg, err := w.w.Recv()
				if err != nil {
					return
				}
				switch b, _ := ipc.Decode(msg); b := b.(type) {
				case ipc.Retire:
					if !b.Deadline.Equal(deadline) {
						t.Errorf("retire deadline %v; want %v", b.Deadline, deadline)
					}
					w.w.SendBody(ipc.Stopped{})
				case ipc.Stop:
					w.w.Close()
					w.exit()
					return
				}
			}
		}()
	}
	kids := s.retire(deadline)
	if len(kids) != 2 {
		t.Fatalf("retired %d workers; want 2", len(kids))
	}
	for _, c := range kids {
		if !closed(c.stopped) {
			t.Errorf("retire returned before worker %d stopped accepting", c.id)
		}
	}
	if !p.sup.isRetiring() || p.relay.toWorker(ipc.Message{Type: ipc.TypeConnection}, netip.Addr{}) {
		t.Error("supervisor or relay not retiring")
	}
	drained := make(chan struct{})
	go func() {
		s.drain(kids, deadline)
		close(drained)
	}()
	<-socketsClosed
	signals <- syscall.SIGHUP // not a stop: ignored while draining
	signals <- syscall.SIGTERM
	select {
	case <-drained:
	case <-time.After(waitLimit):
		t.Fatal("drain did not end after the second signal")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reaped) != 2 {
		t.Errorf("reaped %d workers; want 2", len(reaped))
	}
}
