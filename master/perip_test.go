package master

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/ipc"
)

func perIPConfig(conns int) *config.Config {
	return &config.Config{MaxConnections: 100, Limits: config.Limits{PerIPConnections: conns, IPv6Prefix: 64}}
}

// TestPerIPGrantAndSuccession: a worker's request is answered over ipc;
// the successor gets the client permits held in the succession state, then every
// change in order, and counts them against each client's limit.
func TestPerIPGrantAndSuccession(t *testing.T) {
	w := newFakeWorker(t, 0, 1, true)
	p := newPerIP(quietLog(), perIPConfig(3))
	key := netip.MustParseAddr("127.0.0.2")
	p.handle(w.c, ipc.PerIP{Key: key, Conns: 2})
	_, b := w.recv(t)
	if g, ok := b.(ipc.PerIPGrant); !ok || g.Key != key || g.Conns != 2 {
		t.Fatalf("answer %#v; want a grant of 2 for %v", b, key)
	}

	mine, theirs := stateSocketPair(t)
	var cnt counters
	if err := p.attachSuccessor(mine, func(st *perip.State) error {
		return cnt.attachSuccessorWith(mine, 1, 0, time.Time{}, st)
	}); err != nil {
		t.Fatal(err)
	}
	m := recvState(t, theirs)
	if m.State == nil || m.State.PerIP == nil || m.State.PerIP.Held[key] != 2 {
		t.Fatalf("succession state %+v; want 2 client permits of %v", m.State, key)
	}
	succ := newPerIP(quietLog(), perIPConfig(3))
	succ.inherit(m.State.PerIP)
	if g := succ.t.Grant(9, key, 3, 0); g.Conns != 1 {
		t.Fatalf("successor granted %+v; want 1 (3 - 2 held by the predecessor)", g)
	}

	p.handle(w.c, ipc.PerIP{Key: key, Conns: 1})
	w.recv(t)
	if m := recvState(t, theirs); m.PerIP[key] != 3 {
		t.Fatalf("after a grant: %+v; want 3", m)
	}
	p.handle(w.c, ipc.PerIP{Key: key, Conns: 2, Return: true})
	m = recvState(t, theirs)
	if m.PerIP[key] != 1 {
		t.Fatalf("after a return: %+v; want 1", m)
	}
	succ.predecessorChanged(m.PerIP)
	if _, r := succ.t.Held(key); r != 1 {
		t.Errorf("successor's reserve %d; want 1", r)
	}
	if n := p.drop(w.c); n != 1 {
		t.Errorf("drop freed %d; want 1", n)
	}
	if m := recvState(t, theirs); m.PerIP[key] != 0 {
		t.Fatalf("after the worker died: %+v; want 0", m)
	}
	succ.predecessorGone()
	if _, r := succ.t.Held(key); r != 0 {
		t.Errorf("reserve %d after the predecessor exited", r)
	}
}

// TestPerIPLargeState: a succession state with 100,000 client keys (far
// over the state socket reader's buffer) arrives whole.
func TestPerIPLargeState(t *testing.T) {
	p := newPerIP(quietLog(), perIPConfig(1))
	for i := range uint32(100_000) {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], 0x0a000000+i)
		if g := p.t.Grant(1, netip.AddrFrom4(b), 1, 0); g.Conns != 1 {
			t.Fatalf("key %d refused", i)
		}
	}
	mine, theirs := stateSocketPair(t)
	var cnt counters
	done := make(chan error, 1)
	go func() {
		done <- p.attachSuccessor(mine, func(st *perip.State) error {
			return cnt.attachSuccessorWith(mine, 1, 0, time.Time{}, st)
		})
	}()
	m := recvState(t, theirs)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if m.State == nil || m.State.PerIP == nil || len(m.State.PerIP.Held) != 100_000 {
		t.Fatalf("got state %v; want 100000 keys", m.State != nil && m.State.PerIP != nil)
	}
}
