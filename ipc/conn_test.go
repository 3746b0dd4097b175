package ipc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/stats"
)

// fullSnapshot returns a Snapshot with every field, array element included,
// set to a distinct non-zero value (Active negative), found by reflection so
// that a field added to stats.Snapshot is covered without editing this.
func fullSnapshot() stats.Snapshot {
	var s stats.Snapshot
	v := reflect.ValueOf(&s).Elem()
	n := uint64(1)
	var set func(f reflect.Value)
	set = func(f reflect.Value) {
		switch f.Kind() {
		case reflect.Array:
			for i := range f.Len() {
				set(f.Index(i))
			}
		case reflect.Int64:
			f.SetInt(-int64(n) * 1000003)
		case reflect.Uint64:
			f.SetUint(n<<40 | n)
		default:
			panic("fullSnapshot: unhandled field kind " + f.Kind().String())
		}
		n++
	}
	for i := range v.NumField() {
		set(v.Field(i))
	}
	return s
}

// bodies is one or more values of every Body type.
func bodies() []Body {
	big := bytes.Repeat([]byte("routes:\n  - name: \"*.example.com\"\n"), 20000) // ~700 KB
	return []Body{
		Hello{Proto: Version, Slot: 3, PID: 12345, Generation: 42},
		Hello{Proto: Version, Slot: 0, PID: 1, Generation: -1},
		Ready{},
		Config{YAML: []byte("listen_addrs: [\"127.0.0.1:8443\"]\n")},
		Config{YAML: big},
		LeaseRequest{Want: 64},
		LeaseRequest{Want: 0},
		LeaseRequest{Want: 8, Urgent: true},
		LeaseGrant{N: 64},
		LeaseGrant{N: 1<<31 - 1},
		LeaseReturn{N: 17},
		Stats{},
		Stats{Delta: fullSnapshot()},
		Retire{},
		Retire{Deadline: time.Unix(1_900_000_000, 123456789)},
		Stop{},
		Ping{Seq: 1},
		Ping{Seq: 1<<64 - 1},
		Pong{Seq: 1<<64 - 1},
		Listeners{},
		Move{},
		Revoke{},
		Stopped{},
		Health{},
		Health{Table: []byte("H\x01\x01\x0e127.0.0.1:1 tcp\x00\x00\x00\x00\x03\x00")},
		DialReport{},
		DialReport{Results: []DialResult{
			{Key: "10.0.0.6:443 tcp", OK: true, Count: 7, Last: time.Unix(1_900_000_000, 5)},
			{Key: "10.0.0.7:443 tls app.example.com", Count: 3, Reason: "connection refused"},
			{Key: "10.0.0.6:443 tcp", Count: 1, Reason: "timeout"},
		}},
		BackendStats{},
		BackendStats{Deltas: []BackendDelta{
			{Route: "*.api.example.com", Backend: "10.0.0.6:443", Connections: 12, Active: 3},
			{Route: "~[a-z]+\\.example\\.net", Backend: "[::1]:443", Connections: 1<<64 - 1, Active: -5},
		}},
		PerIP{Key: netip.MustParseAddr("192.0.2.7"), Conns: 4, Tokens: 1},
		PerIP{Key: netip.MustParseAddr("2001:db8::"), Tokens: 16},
		PerIP{Key: netip.MustParseAddr("192.0.2.7"), Conns: 3, Return: true},
		PerIPGrant{Key: netip.MustParseAddr("192.0.2.7"), Conns: 4, Tokens: 1},
		PerIPGrant{Key: netip.MustParseAddr("2001:db8::"), Retry: 250 * time.Millisecond},
	}
}

// sameBody compares bodies, times with Equal.
func sameBody(a, b Body) bool {
	if da, ok := a.(Retire); ok {
		db, ok := b.(Retire)
		return ok && da.Deadline.Equal(db.Deadline)
	}
	return reflect.DeepEqual(a, b)
}

func TestRoundTrip(t *testing.T) {
	master, worker := pair(t)
	for i, b := range bodies() {
		t.Run(fmt.Sprintf("%d/%v", i, b.Type()), func(t *testing.T) {
			for _, dir := range []struct {
				name     string
				from, to *Conn
			}{{"master→worker", master, worker}, {"worker→master", worker, master}} {
				errc := make(chan error, 1)
				go func() { errc <- dir.from.SendBody(b) }()
				m, err := dir.to.Recv()
				if err != nil {
					t.Fatalf("%s: Recv: %v", dir.name, err)
				}
				if err := <-errc; err != nil {
					t.Fatalf("%s: Send: %v", dir.name, err)
				}
				if m.Type != b.Type() || len(m.Files) != 0 {
					t.Fatalf("%s: got type %v with %d files; want %v with 0", dir.name, m.Type, len(m.Files), b.Type())
				}
				got, err := Decode(m)
				if err != nil {
					t.Fatalf("%s: Decode: %v", dir.name, err)
				}
				if !sameBody(got, b) {
					t.Fatalf("%s: got %.200v; want %.200v", dir.name, got, b)
				}
			}
		})
	}
}

func TestStatsEncodingCoversSnapshot(t *testing.T) {
	// Every field of stats.Snapshot is 8 bytes: the payload is a fixed
	// prefix and the struct's size. A field of another size or kind, or
	// one the encoder forgot, fails here or in fullSnapshot's round trip.
	if got, want := statsSize, 4+int(reflect.TypeFor[stats.Snapshot]().Size()); got != want {
		t.Fatalf("statsSize = %d; want %d (4 + sizeof(stats.Snapshot))", got, want)
	}
	s := Stats{Delta: fullSnapshot()}
	p, _ := s.AppendBinary(nil)
	var got Stats
	if err := got.UnmarshalBinary(p); err != nil {
		t.Fatal(err)
	}
	if got != s {
		t.Fatalf("got %+v; want %+v", got, s)
	}
}

func TestFilePassing(t *testing.T) {
	master, worker := pair(t)

	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	lnRC, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if !nonblocking(t, lnRC) {
		t.Fatal("listener is not non-blocking to start with")
	}
	lnFile, err := ln.File() // a dup; shares the open file description
	if err != nil {
		t.Fatal(err)
	}
	defer lnFile.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()

	names := []string{"reuseport/127.0.0.1:0/2", "pipe"}
	if err := master.SendBody(Listeners{Names: names}, lnFile, pr); err != nil {
		t.Fatalf("Send: %v", err)
	}
	// Send must not have touched the description's flags (File.Fd would
	// have made it blocking for every process sharing it).
	if !nonblocking(t, lnRC) {
		t.Fatal("after Send, the listener's description is blocking")
	}

	m, b := recvDecoded(t, worker)
	defer m.CloseFiles()
	if got := b.(Listeners).Names; !reflect.DeepEqual(got, names) {
		t.Fatalf("names = %q; want %q", got, names)
	}
	if len(m.Files) != 2 {
		t.Fatalf("got %d files; want 2", len(m.Files))
	}
	for i, f := range m.Files {
		if !cloexec(t, f) {
			t.Errorf("received file %d is not close-on-exec", i)
		}
	}

	// The listening socket works on the receiving side.
	rln, err := net.FileListener(m.Files[0])
	if err != nil {
		t.Fatalf("FileListener: %v", err)
	}
	defer rln.Close()
	if got, want := rln.Addr().String(), ln.Addr().String(); got != want {
		t.Fatalf("received listener on %s; want %s", got, want)
	}
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	rln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := rln.Accept()
	if err != nil {
		t.Fatalf("Accept on received listener: %v", err)
	}
	got, _ := io.ReadAll(c)
	c.Close()
	if string(got) != "hi" {
		t.Fatalf("read %q; want %q", got, "hi")
	}

	// The pipe works too.
	if _, err := pw.Write([]byte("through the pipe")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := m.Files[1].Read(buf)
	if err != nil || string(buf[:n]) != "through the pipe" {
		t.Fatalf("pipe read %q, %v; want %q", buf[:n], err, "through the pipe")
	}
}

// recvDecoded receives one message and decodes it; the caller closes its
// files.
func recvDecoded(t *testing.T, c *Conn) (Message, Body) {
	t.Helper()
	m, err := c.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	b, err := Decode(m)
	if err != nil {
		m.CloseFiles()
		t.Fatalf("Decode: %v", err)
	}
	return m, b
}

// TestConnectionKey: a Connection's client key (none, IPv4, IPv6)
// survives encoding, and its payload re-encodes to the same bytes.
func TestConnectionKey(t *testing.T) {
	for _, c := range []Connection{
		{State: []byte(`{"moves":1}`)},
		{Key: netip.MustParseAddr("192.0.2.7")},
		{Key: netip.MustParseAddr("2001:db8::"), State: []byte(`{}`)},
	} {
		p, err := c.AppendBinary(nil)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		var got Connection
		if err := got.UnmarshalBinary(p); err != nil {
			t.Fatalf("%+v: decode: %v", c, err)
		}
		if got.Key != c.Key || !bytes.Equal(got.State, c.State) {
			t.Fatalf("got %+v; want %+v", got, c)
		}
		if again, _ := got.AppendBinary(nil); !bytes.Equal(again, p) {
			t.Fatalf("%+v re-encodes to %q, not %q", c, again, p)
		}
	}
	if _, err := (Connection{Key: netip.MustParseAddr("fe80::1%eth0")}).AppendBinary(nil); !errors.Is(err, ErrBadPayload) {
		t.Errorf("a key with a zone: %v; want ErrBadPayload", err)
	}
}

func TestConnectionPassing(t *testing.T) {
	master, worker := pair(t)
	// Two pipes stand for the client and backend sockets: what matters
	// is that each arrives, in order, with its frame.
	var reads, writes []*os.File
	for range 2 {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		defer pw.Close()
		reads, writes = append(reads, pr), append(writes, pw)
	}
	state := []byte(`{"listener":"127.0.0.1:443","in":12}`)
	key := netip.MustParseAddr("2001:db8:1:2::")
	if err := worker.SendBody(Connection{Key: key, State: state}, reads...); err != nil {
		t.Fatalf("Send: %v", err)
	}
	if err := worker.SendBody(Connection{State: state}, reads[0]); !errors.Is(err, ErrBadPayload) {
		t.Fatalf("Send with one file: %v; want ErrBadPayload", err)
	}
	m, b := recvDecoded(t, master)
	defer m.CloseFiles()
	if got := b.(Connection); !bytes.Equal(got.State, state) || got.Key != key {
		t.Fatalf("state %q, key %v; want %q, %v", got.State, got.Key, state, key)
	}
	for i, w := range writes {
		msg := fmt.Sprintf("file %d", i)
		w.Write([]byte(msg))
		buf := make([]byte, 16)
		n, err := m.Files[i].Read(buf)
		if err != nil || string(buf[:n]) != msg {
			t.Fatalf("file %d read %q, %v", i, buf[:n], err)
		}
	}
}

func TestPairDescriptors(t *testing.T) {
	master, wf, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	defer wf.Close()
	if !cloexec(t, wf) {
		t.Error("worker file is not close-on-exec")
	}
	rc, err := wf.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if nonblocking(t, rc) {
		t.Error("worker file is non-blocking; want blocking so that os.StartProcess's Fd changes nothing")
	}
	mrc, err := master.uc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	mrc.Control(func(fd uintptr) { flags, _ = unix.FcntlInt(fd, unix.F_GETFD, 0) })
	if flags&unix.FD_CLOEXEC == 0 {
		t.Error("master end is not close-on-exec")
	}
}

func TestFileConnRejects(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	if c, err := FileConn(pr); err == nil {
		c.Close()
		t.Error("FileConn(pipe) succeeded; want error")
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f0, f1 := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	defer f0.Close()
	defer f1.Close()
	if c, err := FileConn(f0); err == nil {
		c.Close()
		t.Error("FileConn(seqpacket) succeeded; want error")
	}
}

func TestConcurrentSend(t *testing.T) {
	master, worker := pair(t)
	const senders, each = 16, 200
	var wg sync.WaitGroup
	errc := make(chan error, senders)
	for g := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				var m Message
				switch i % 10 {
				case 0:
					// A large frame: partial writes while others wait.
					m = Message{Type: TypeConfig, Payload: bytes.Repeat([]byte{byte(g)}, 150_000+g*1000+i)}
				case 5:
					// A frame with a descriptor: a pipe holding the
					// frame's name, so the reader can check the pair.
					r, w := pipe(t)
					name := fmt.Sprintf("g%d/i%d", g, i)
					unix.Write(w, []byte(name))
					unix.Close(w)
					f := os.NewFile(uintptr(r), "pipe")
					var err error
					m, err = Encode(Listeners{Names: []string{name}}, f)
					if err == nil {
						err = master.Send(m)
					}
					f.Close()
					if err != nil {
						errc <- err
						return
					}
					continue
				default:
					m, _ = Encode(Ping{Seq: uint64(g)<<32 | uint64(i)})
				}
				if err := master.Send(m); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	next := make([]int, senders) // next i expected per sender
	for n := 0; n < senders*each; n++ {
		m, err := worker.Recv()
		if err != nil {
			t.Fatalf("Recv %d: %v", n, err)
		}
		var g, i int
		switch m.Type {
		case TypeConfig:
			g = int(m.Payload[0])
			i = len(m.Payload) - 150_000 - g*1000
			if !bytes.Equal(m.Payload, bytes.Repeat([]byte{byte(g)}, len(m.Payload))) {
				t.Fatalf("frame %d: config payload mixed with another frame", n)
			}
		case TypePing:
			b, err := Decode(m)
			if err != nil {
				t.Fatalf("frame %d: %v", n, err)
			}
			seq := b.(Ping).Seq
			g, i = int(seq>>32), int(seq&0xffffffff)
		case TypeListeners:
			b, err := Decode(m)
			if err != nil {
				t.Fatalf("frame %d: %v", n, err)
			}
			name := b.(Listeners).Names[0]
			buf := make([]byte, 64)
			k, _ := m.Files[0].Read(buf)
			m.CloseFiles()
			if string(buf[:k]) != name {
				t.Fatalf("frame %d: listeners %q came with the pipe of %q", n, name, buf[:k])
			}
			fmt.Sscanf(name, "g%d/i%d", &g, &i)
		default:
			t.Fatalf("frame %d: unexpected type %v", n, m.Type)
		}
		if g < 0 || g >= senders || i != next[g] {
			t.Fatalf("frame %d: from sender %d seq %d; want seq %d", n, g, i, next[g])
		}
		next[g]++
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("Send: %v", err)
	}
}

// hdr builds a header field by field.
func hdr(magic string, version, typ, nfds, reserved byte, length uint32) []byte {
	return append([]byte(magic), version, typ, nfds, reserved,
		byte(length>>24), byte(length>>16), byte(length>>8), byte(length))
}

func TestRecvGarbage(t *testing.T) {
	ping := encoded(t, Ping{Seq: 7}, 0)
	stop := encoded(t, Stop{}, 0)
	lst := encoded(t, Listeners{Names: []string{"x"}}, 1)
	tests := []struct {
		name  string
		sends [][]byte // one sendmsg each
		fds   []int    // descriptors attached to each send
		close bool     // close the peer after sending
		msgs  int      // messages Recv returns before the error
		want  error
	}{
		{name: "clean close", close: true, want: io.EOF},
		{name: "frames then clean close", sends: [][]byte{ping, stop}, close: true, msgs: 2, want: io.EOF},
		{name: "truncated mid-header", sends: [][]byte{ping[:7]}, close: true, want: io.ErrUnexpectedEOF},
		{name: "truncated after a frame", sends: [][]byte{ping, ping[:11]}, close: true, msgs: 1, want: io.ErrUnexpectedEOF},
		{name: "truncated mid-payload", sends: [][]byte{ping[:15]}, close: true, want: io.ErrUnexpectedEOF},
		{name: "header only", sends: [][]byte{ping[:HeaderSize]}, close: true, want: io.ErrUnexpectedEOF},
		{name: "wrong first byte, peer still open", sends: [][]byte{{'G'}}, want: ErrBadFrame},
		{name: "http request", sends: [][]byte{[]byte("GET / HTTP/1.1\r\n\r\n")}, want: ErrBadFrame},
		{name: "bad magic", sends: [][]byte{hdr("SNIQ", Version, byte(TypePing), 0, 0, 8)}, want: ErrBadFrame},
		{name: "bad magic after a frame", sends: [][]byte{ping, hdr("XNIP", Version, byte(TypePing), 0, 0, 8)}, msgs: 1, want: ErrBadFrame},
		{name: "next version, peer still open", sends: [][]byte{[]byte("SNIP" + string(rune(Version+1)))}, want: ErrVersion},
		{name: "version 0", sends: [][]byte{hdr("SNIP", 0, byte(TypeHello), 0, 0, 32)}, want: ErrVersion},
		{name: "type 0", sends: [][]byte{hdr("SNIP", Version, 0, 0, 0, 0)}, want: ErrBadFrame},
		{name: "first invalid type", sends: [][]byte{hdr("SNIP", Version, byte(numTypes), 0, 0, 0)}, want: ErrBadFrame},
		{name: "type 255", sends: [][]byte{hdr("SNIP", Version, 255, 0, 0, 0)}, want: ErrBadFrame},
		{name: "reserved byte", sends: [][]byte{hdr("SNIP", Version, byte(TypeStop), 0, 1, 0)}, want: ErrBadFrame},
		{name: "length over cap by one, tiny body, peer open", sends: [][]byte{append(hdr("SNIP", Version, byte(TypeConfig), 0, 0, MaxPayload+1), 'x')}, want: ErrTooLarge},
		{name: "length 4 GiB, peer open", sends: [][]byte{hdr("SNIP", Version, byte(TypeConfig), 0, 0, 0xffffffff)}, want: ErrTooLarge},
		{name: "length at cap, tiny body, close", sends: [][]byte{append(hdr("SNIP", Version, byte(TypeConfig), 0, 0, MaxPayload), "abc"...)}, close: true, want: io.ErrUnexpectedEOF},
		{name: "254 descriptors claimed", sends: [][]byte{hdr("SNIP", Version, byte(TypeListeners), 254, 0, 2)}, want: ErrTooLarge},
		{name: "descriptors claimed on ping", sends: [][]byte{hdr("SNIP", Version, byte(TypePing), 1, 0, 8)}, want: ErrBadFrame},
		{name: "descriptor claimed, none sent", sends: [][]byte{lst}, want: ErrBadFrame},
		{name: "one claimed, two sent", sends: [][]byte{lst}, fds: []int{2}, want: ErrBadFrame},
		{name: "descriptor with a frame declaring none", sends: [][]byte{ping, stop}, fds: []int{1, 0}, want: ErrBadFrame},
		{name: "descriptor with the second frame declaring none", sends: [][]byte{ping, stop}, fds: []int{0, 1}, msgs: 1, want: ErrBadFrame},
		{name: "descriptor with the last frame declaring none, then close", sends: [][]byte{ping}, fds: []int{1}, close: true, want: ErrBadFrame},
		{name: "descriptor inside a payload, peer open", sends: [][]byte{hdr("SNIP", Version, byte(TypeConfig), 0, 0, 100), make([]byte, 10)}, fds: []int{0, 1}, want: ErrBadFrame},
		{name: "good listeners, then garbage", sends: [][]byte{lst, []byte("junk")}, fds: []int{1, 0}, msgs: 1, want: ErrBadFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, raw, closeRaw := rawPair(t)
			pr, pw := pipe(t)
			defer unix.Close(pw)
			for i, b := range tt.sends {
				var oob []byte
				if i < len(tt.fds) && tt.fds[i] > 0 {
					fds := make([]int, tt.fds[i])
					for k := range fds {
						fds[k] = pr
					}
					oob = unix.UnixRights(fds...)
				}
				if err := unix.Sendmsg(raw, b, oob, nil, unix.MSG_NOSIGNAL); err != nil {
					t.Fatalf("sendmsg: %v", err)
				}
			}
			unix.Close(pr) // in flight or received copies only from here
			if tt.close {
				closeRaw()
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			start := time.Now()
			var err error
			for n := 0; ; n++ {
				var m Message
				m, err = c.Recv()
				if err != nil {
					if n != tt.msgs {
						t.Errorf("got %d messages before the error; want %d", n, tt.msgs)
					}
					break
				}
				if _, derr := Decode(m); derr != nil {
					t.Errorf("message %d (%v): Decode: %v", n, m.Type, derr)
				}
				m.CloseFiles()
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("Recv hung (%v): %v", time.Since(start), err)
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Recv error = %v; want %v", err, tt.want)
			}
			t.Logf("error: %v", err)
			if _, again := c.Recv(); again == nil || again.Error() != err.Error() {
				t.Errorf("second Recv error = %v; want the same %v", again, err)
			}
			c.Close()
			closeRaw()
			if !readersGone(t, pw) {
				t.Errorf("a received descriptor was leaked")
			}
		})
	}
}

// TestRecvHugeClaimAllocation checks that a header claiming MaxPayload bytes
// followed by a few does not allocate the claimed length.
func TestRecvHugeClaimAllocation(t *testing.T) {
	c, raw, closeRaw := rawPair(t)
	unix.Write(raw, append(hdr("SNIP", Version, byte(TypeConfig), 0, 0, MaxPayload), "abc"...))
	closeRaw()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := c.Recv()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Recv error = %v; want %v", err, io.ErrUnexpectedEOF)
	}
	// The Conn's 64 KiB buffer and a 64 KiB start of the payload.
	if got := after.TotalAlloc - before.TotalAlloc; got > 256<<10 {
		t.Fatalf("Recv allocated %d bytes for a %d-byte claim with 3 bytes sent; want < 256 KiB", got, MaxPayload)
	}
}

func TestPeerVanishes(t *testing.T) {
	t.Run("closed while Recv waits", func(t *testing.T) {
		master, worker := pair(t)
		errc := make(chan error, 1)
		go func() {
			_, err := worker.Recv()
			errc <- err
		}()
		// Deliberate: give Recv time to block first, so the close most
		// likely finds it waiting (the test holds either way).
		time.Sleep(50 * time.Millisecond)
		master.Close()
		select {
		case err := <-errc:
			if err != io.EOF {
				t.Fatalf("Recv error = %v; want io.EOF", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("Recv did not return within 2s of the peer closing")
		}
	})
	t.Run("closed with our data unread", func(t *testing.T) {
		// The peer dies with frames of ours unread: Linux reports
		// ECONNRESET after its last frame. Recv must deliver every frame
		// the peer sent, then io.EOF.
		master, worker := pair(t)
		for i := range 3 {
			if err := master.SendBody(Ping{Seq: uint64(i)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := worker.SendBody(Stats{Delta: fullSnapshot()}); err != nil {
			t.Fatal(err)
		}
		if err := worker.SendBody(Pong{Seq: 9}); err != nil {
			t.Fatal(err)
		}
		worker.Close()
		for _, want := range []Type{TypeStats, TypePong} {
			m, err := master.Recv()
			if err != nil || m.Type != want {
				t.Fatalf("Recv = %v, %v; want a %v", m.Type, err, want)
			}
		}
		if _, err := master.Recv(); err != io.EOF {
			t.Fatalf("Recv error = %v; want io.EOF", err)
		}
		if err := master.SendBody(Ping{}); !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("Send to a closed peer = %v; want EPIPE or ECONNRESET", err)
		} else {
			t.Logf("Send to a closed peer: %v", err)
		}
	})
	t.Run("own Close while Recv waits", func(t *testing.T) {
		master, _ := pair(t)
		errc := make(chan error, 1)
		go func() {
			_, err := master.Recv()
			errc <- err
		}()
		// Deliberate: give Recv time to block first, so the close most
		// likely finds it waiting (the test holds either way).
		time.Sleep(50 * time.Millisecond)
		master.Close()
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Recv error = %v; want net.ErrClosed", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("Recv did not return within 2s of Close")
		}
		if err := master.SendBody(Ping{}); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Send after Close = %v; want net.ErrClosed", err)
		}
	})
}

func TestReadDeadlineResumes(t *testing.T) {
	c, raw, _ := rawPair(t)
	pr, pw := pipe(t)
	defer unix.Close(pw)
	cfg := bytes.Repeat([]byte("y"), 150_000)
	lst := encoded(t, Listeners{Names: []string{"a"}}, 1)
	f := append(lst, frame(TypeConfig, 0, cfg)...)
	// Cut mid-header and mid-payload of each frame.
	cuts := []int{3, HeaderSize + 2, len(lst) + 5, len(lst) + HeaderSize + 1000, 60_000, len(f)}
	var got []Message
	timeouts, done := 0, 0
	for i, cut := range cuts {
		var oob []byte
		if i == 0 {
			oob = unix.UnixRights(pr)
		}
		chunk := f[done:cut]
		done = cut
		if i == len(cuts)-1 {
			// The rest does not fit the socket buffer: send it while
			// Recv reads.
			go unix.Sendmsg(raw, chunk, nil, nil, unix.MSG_NOSIGNAL)
			c.SetReadDeadline(time.Time{})
		} else {
			if err := unix.Sendmsg(raw, chunk, oob, nil, unix.MSG_NOSIGNAL); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		}
		for {
			m, err := c.Recv()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				timeouts++
				break
			}
			if err != nil {
				t.Fatalf("cut %d: Recv: %v", i, err)
			}
			got = append(got, m)
			if i == len(cuts)-1 && len(got) == 2 {
				break
			}
		}
	}
	unix.Close(pr)
	if timeouts != len(cuts)-1 {
		t.Errorf("%d Recv calls timed out; want %d", timeouts, len(cuts)-1)
	}
	if len(got) != 2 || got[0].Type != TypeListeners || len(got[0].Files) != 1 || got[1].Type != TypeConfig || !bytes.Equal(got[1].Payload, cfg) {
		t.Fatalf("got %d messages; want the listeners frame with its file, then the config", len(got))
	}
	got[0].CloseFiles()
	if !readersGone(t, pw) {
		t.Error("the descriptor sent with the listeners frame is still open")
	}
}

func TestCloseReleasesPendingFiles(t *testing.T) {
	c, raw, _ := rawPair(t)
	pr, pw := pipe(t)
	defer unix.Close(pw)
	lst := encoded(t, Listeners{Names: []string{"pending"}}, 1)
	// Half a frame with its descriptor: Recv takes the descriptor and
	// waits for the rest.
	if err := unix.Sendmsg(raw, lst[:HeaderSize+2], unix.UnixRights(pr), nil, unix.MSG_NOSIGNAL); err != nil {
		t.Fatal(err)
	}
	unix.Close(pr)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := c.Recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv = %v; want a deadline error", err)
	}
	if readersGone(t, pw) {
		t.Fatal("descriptor closed before Close")
	}
	c.Close()
	if !readersGone(t, pw) {
		t.Fatal("Close left the pending descriptor open")
	}
}

func TestSendRejects(t *testing.T) {
	master, _ := pair(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	many := make([]*os.File, MaxFiles+1)
	for i := range many {
		many[i] = pr
	}
	tests := []struct {
		name string
		m    Message
		want error
	}{
		{"type 0", Message{}, ErrBadFrame},
		{"unknown type", Message{Type: numTypes}, ErrBadFrame},
		{"over the cap", Message{Type: TypeConfig, Payload: make([]byte, MaxPayload+1)}, ErrTooLarge},
		{"files on a ping", Message{Type: TypePing, Payload: make([]byte, 8), Files: []*os.File{pr}}, ErrBadFrame},
		{"too many files", Message{Type: TypeListeners, Files: many}, ErrTooLarge},
		{"nil file", Message{Type: TypeListeners, Files: []*os.File{nil}}, ErrBadFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := master.Send(tt.m); !errors.Is(err, tt.want) {
				t.Fatalf("Send = %v; want %v", err, tt.want)
			}
		})
	}
}

func TestMaxPayloadFrame(t *testing.T) {
	master, worker := pair(t)
	p := make([]byte, MaxPayload)
	for i := range p {
		p[i] = byte(i * 7)
	}
	errc := make(chan error, 1)
	go func() { errc <- master.Send(Message{Type: TypeConfig, Payload: p}) }()
	m, err := worker.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.Payload, p) {
		t.Fatal("payload at the cap arrived changed")
	}
	if cap(m.Payload) != MaxPayload {
		t.Errorf("payload cap = %d; want exactly %d (no over-allocation)", cap(m.Payload), MaxPayload)
	}
}

func TestWriteDeadline(t *testing.T) {
	master, worker := pair(t)
	// Nobody reads worker: fill the socket buffers until Send times out.
	master.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	p := make([]byte, 1<<20)
	var err error
	for range 64 {
		if err = master.Send(Message{Type: TypeConfig, Payload: p}); err != nil {
			break
		}
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Send = %v; want a deadline error", err)
	}
	// A 1 MiB frame cannot fit in the buffers: it was partly written, so
	// the Conn refuses to write the next frame into the middle of it.
	master.SetWriteDeadline(time.Time{})
	if err := master.SendBody(Ping{}); err == nil {
		t.Fatal("Send after a partly written frame succeeded")
	}
	_ = worker
}

// TestRecvOutOfDescriptors checks that descriptors the kernel could not
// install (the receiver is at RLIMIT_NOFILE: MSG_CTRUNC) give ErrBadFrame,
// not a frame with files missing.
func TestRecvOutOfDescriptors(t *testing.T) {
	c, raw, _ := rawPair(t)
	pr, pw := pipe(t)
	defer unix.Close(pw)
	defer unix.Close(pr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := unix.Sendmsg(raw, encoded(t, Listeners{Names: []string{"a"}}, 1), unix.UnixRights(pr), nil, unix.MSG_NOSIGNAL); err != nil {
		t.Fatal(err)
	}
	// The lowest free descriptor number: with the soft limit there, no
	// new descriptor can be allocated.
	lowest, err := unix.Dup(0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(lowest)
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = uint64(lowest)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	_, err = c.Recv()
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(err, ErrBadFrame) {
		t.Fatalf("Recv = %v; want ErrBadFrame (descriptors lost)", err)
	}
	t.Logf("error: %v", err)
}
