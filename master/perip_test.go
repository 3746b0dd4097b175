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

// Connections moved here by a hurried predecessor keep counting against
// their client's limits.per_ip_connections all the way, whatever order
// its readings (state socket) and the connections (move socket) arrive
// in: the limit is 2, the predecessor's workers hold 2 client permits of
// one client for 2 open connections and it moves both here; at no step
// may another connection of that client be granted one, and after the
// moves the worker that resumed them holds both. (Before, the
// predecessor's client permits came back as its connections moved, the
// moved ones took none here, and the client could open 2 more.)
func TestPerIPMovedConnectionsKeepTheirClientPermits(t *testing.T) {
	key := netip.MustParseAddr("192.0.2.9")
	type step struct {
		what string // "held" n, "moved" n, "arrival", "exit" (state socket EOF), "ended" (move socket EOF)
		n    int
	}
	orders := map[string][]step{
		"readings first": {
			{"moved", 1}, {"held", 1}, {"moved", 2}, {"held", 0},
			{"arrival", 0}, {"arrival", 0}, {"exit", 0}, {"ended", 0},
		},
		"arrivals first": {
			{"arrival", 0}, {"arrival", 0}, {"moved", 1}, {"held", 1}, {"moved", 2}, {"held", 0}, {"ended", 0}, {"exit", 0},
		},
		"interleaved": {
			{"moved", 1}, {"arrival", 0}, {"held", 1}, {"moved", 2}, {"held", 0}, {"exit", 0}, {"arrival", 0}, {"ended", 0},
		},
		"predecessor exits before the last arrives": {
			{"moved", 1}, {"held", 1}, {"arrival", 0}, {"moved", 2}, {"held", 0}, {"exit", 0}, {"arrival", 0}, {"ended", 0},
		},
	}
	for name, steps := range orders {
		t.Run(name, func(t *testing.T) {
			w := newFakeWorker(t, 0, 1, true)
			p := newPerIP(quietLog(), perIPConfig(2))
			p.inherit(&perip.State{Held: map[netip.Addr]int{key: 2}})
			for i, s := range steps {
				switch s.what {
				case "held":
					p.predecessorChanged(map[netip.Addr]int{key: s.n})
				case "moved":
					p.predecessorMoved(map[netip.Addr]int{key: s.n})
				case "arrival":
					p.arrived(w.c, key)
				case "exit":
					p.predecessorGone()
				case "ended":
					p.movesEnded()
				}
				if g := p.t.Grant(99, key, 1, 0); g.Conns != 0 {
					t.Fatalf("step %d (%+v): a 3rd connection of a client at its limit of 2 was granted a client permit", i, s)
				}
			}
			if held, reserve := p.t.Held(key); held != 2 || reserve != 0 {
				t.Errorf("after the moves: held %d, reserve %d; want the worker's 2 and no reserve", held, reserve)
			}
			// They end: the client permits come back, and new connections
			// may take them.
			p.handle(w.c, ipc.PerIP{Key: key, Conns: 2, Return: true})
			if g := p.t.Grant(99, key, 2, 0); g.Conns != 2 {
				t.Errorf("after they ended: granted %+v; want 2", g)
			}
		})
	}
}

// A moved connection no worker takes is no longer in flight; one lost on
// the way (the predecessor counted it, it never arrived) counts until the
// predecessor and its move socket are both gone, not for ever. An IPv6
// client's key is grouped under this generation's ipv6_prefix.
func TestPerIPMovedConnectionNotTaken(t *testing.T) {
	w := newFakeWorker(t, 0, 1, true)
	cfg := perIPConfig(1)
	cfg.Limits.IPv6Prefix = 48
	p := newPerIP(quietLog(), cfg)
	v4 := netip.MustParseAddr("192.0.2.9")
	v6 := netip.MustParseAddr("2001:db8:1:2::") // the predecessor's /64
	p.inherit(&perip.State{Held: map[netip.Addr]int{v4: 1, v6: 1}})
	p.predecessorMoved(map[netip.Addr]int{v4: 1, v6: 1})
	p.predecessorChanged(map[netip.Addr]int{v4: 0, v6: 0})
	p.arrived(w.c, v4)
	p.notArrived(w.c, v4) // the worker did not take it
	p.arrived(nil, v4)    // and no other did: it was closed
	if held, reserve := p.t.Held(v4); held != 0 || reserve != 0 {
		t.Errorf("a moved connection that was closed: held %d, reserve %d; want 0, 0", held, reserve)
	}
	p.arrived(w.c, v6)
	if held, reserve := p.t.Held(netip.MustParseAddr("2001:db8:1::")); held != 1 || reserve != 0 {
		t.Errorf("the IPv6 client's /48: held %d, reserve %d; want 1, 0", held, reserve)
	}
	if _, reserve := p.t.Held(v6); reserve != 0 {
		t.Errorf("the predecessor's /64 still reserves %d once its connection arrived", reserve)
	}

	lost := netip.MustParseAddr("192.0.2.10")
	p.predecessorMoved(map[netip.Addr]int{lost: 1})
	p.predecessorGone()
	if _, reserve := p.t.Held(lost); reserve != 1 {
		t.Fatalf("reserve %d of a connection still on its way after the predecessor exited; want 1", reserve)
	}
	p.movesEnded()
	if _, reserve := p.t.Held(lost); reserve != 0 {
		t.Errorf("reserve %d of a connection lost on the way after the move socket ended; want 0", reserve)
	}
}

// The predecessor's side: a connection a worker moves is counted per key
// and the successor hears of it before the lower count of the worker's
// client permits that follows.
func TestPerIPMovedCountBeforeReturn(t *testing.T) {
	w := newFakeWorker(t, 0, 1, true)
	p := newPerIP(quietLog(), perIPConfig(2))
	key := netip.MustParseAddr("192.0.2.9")
	p.handle(w.c, ipc.PerIP{Key: key, Conns: 2})
	w.recv(t)
	mine, theirs := stateSocketPair(t)
	var cnt counters
	if err := p.attachSuccessor(mine, func(st *perip.State) error {
		return cnt.attachSuccessorWith(mine, 1, 0, time.Time{}, st)
	}); err != nil {
		t.Fatal(err)
	}
	recvState(t, theirs)
	r := newRelay(quietLog(), workersOf(w), &countPermits{})
	r.clients = p
	mc, succ := movePair(t)
	r.setSuccessor(mc)
	for i := 1; i <= 2; i++ {
		r.toSuccessor(movedConnOf(t, key, "s"), key)
		p.handle(w.c, ipc.PerIP{Key: key, Conns: 1, Return: true})
		if m := recvState(t, theirs); m.PerIPMoved[key] != i || m.PerIP != nil {
			t.Fatalf("move %d: successor got %+v first; want %d moved of %v", i, m, i, key)
		}
		if m := recvState(t, theirs); m.PerIP[key] != 2-i {
			t.Fatalf("move %d: successor got %+v; want %d held", i, m, 2-i)
		}
		succ.SetReadDeadline(time.Now().Add(waitLimit))
		msg, err := succ.Recv()
		if err != nil {
			t.Fatal(err)
		}
		msg.CloseFiles()
		if b, err := ipc.Decode(msg); err != nil || b.(ipc.Connection).Key != key {
			t.Fatalf("move socket: %+v, %v; want a connection of %v", b, err, key)
		}
	}
}

// A successor whose predecessor moves a client's connections: the reserve
// it inherited for that client goes to its worker with them, through the
// state socket's readings and the move socket's connections, and stays
// after the predecessor exits.
func TestPerIPSuccessionMovesClientPermits(t *testing.T) {
	p := newParts(t, 1)
	w := p.fs.last()
	pi := newPerIP(quietLog(), perIPConfig(2))
	p.succession.perip = pi
	p.relay.clients = pi
	key := netip.MustParseAddr("192.0.2.9")
	pred := p.inheritFrom(t, successionState{Generation: 1, Reserve: 2,
		PerIP: &perip.State{Held: map[netip.Addr]int{key: 2}}})
	for i := 1; i <= 2; i++ {
		pred.state.send(stateMsg{PerIPMoved: map[netip.Addr]int{key: i}})
		if err := pred.move.Send(movedConnOf(t, key, "st")); err != nil {
			t.Fatal(err)
		}
		pred.state.send(stateMsg{PerIP: map[netip.Addr]int{key: 2 - i}})
		msg, b := w.recv(t)
		msg.CloseFiles()
		if c, ok := b.(ipc.Connection); !ok || c.Key != key {
			t.Fatalf("worker got %+v; want a connection of %v", b, key)
		}
	}
	pred.state.close()
	pred.move.Close()
	waitUntil(t, "the predecessor's exit", func() bool {
		return closed(p.succession.predecessorDone) && closed(p.relay.fromPredecessor)
	})
	if held, reserve := pi.t.Held(key); held != 2 || reserve != 0 {
		t.Fatalf("after the moves: held %d, reserve %d; want the worker's 2", held, reserve)
	}
	if g := pi.t.Grant(99, key, 1, 0); g.Conns != 0 {
		t.Fatal("a 3rd connection of a client at its limit of 2 was granted a client permit after the move")
	}
	if err := pi.t.Return(w.c.id, key, 2, 0); err != nil {
		t.Fatalf("the worker gives back the moved connections' client permits: %v", err)
	}
}

// movePair returns the two ends of a move socket.
func movePair(t *testing.T) (mine, theirs *ipc.Conn) {
	t.Helper()
	mc, wf, err := ipc.Pair()
	if err != nil {
		t.Fatal(err)
	}
	succ, err := ipc.FileConn(wf)
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		mc.Close()
		succ.Close()
	})
	return mc, succ
}
