package ipc

import (
	"bytes"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// FuzzRecv writes arbitrary bytes into a socketpair, in chunks of chunk+1
// bytes, attaching a pipe descriptor to chunk i when bit i%64 of fdMask is
// set, then closes it. Recv must never panic or hang; it must return
// well-formed messages and then io.EOF or an error wrapping one of the
// package's sentinels or io.ErrUnexpectedEOF; every message that decodes
// must re-encode to the same payload; and no received descriptor may
// outlive the Conn unless Recv handed it out.
func FuzzRecv(f *testing.F) {
	var all []byte
	for _, b := range bodies() {
		if c, ok := b.(Config); ok && len(c.YAML) > 1000 {
			continue
		}
		fr := encoded(f, b, 0)
		f.Add(fr, uint16(len(fr)), uint64(0))
		f.Add(fr, uint16(0), uint64(0))
		all = append(all, fr...)
	}
	f.Add(all, uint16(4096), uint64(0))
	f.Add(all, uint16(6), uint64(0))
	lst := encoded(f, Listeners{Names: []string{"shared/0.0.0.0:443", "reuseport/0.0.0.0:443/2"}}, 2)
	f.Add(lst, uint16(len(lst)), uint64(1))
	f.Add(append(encoded(f, Ping{Seq: 1}, 0), lst...), uint16(19), uint64(3))
	f.Add(append(lst, lst...), uint16(len(lst)-1), uint64(5))
	f.Add(encoded(f, Listeners{Names: []string{"a"}}, 1), uint16(100), uint64(1))
	conn := encoded(f, Connection{State: []byte(`{"listener":"127.0.0.1:443","moves":1}`)}, 2)
	f.Add(conn, uint16(len(conn)), uint64(1))
	f.Add(append(conn, lst...), uint16(7), uint64(3))
	f.Add(encoded(f, Ping{Seq: 2}, 0), uint16(100), uint64(1))
	f.Add(hdr("SNIP", Version, byte(TypeConfig), 0, 0, MaxPayload), uint16(100), uint64(0))
	f.Add(hdr("SNIP", Version, byte(TypeConfig), 0, 0, MaxPayload+1), uint16(100), uint64(0))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), uint16(100), uint64(0))
	f.Add([]byte("SNIP\x02"), uint16(100), uint64(0))

	f.Fuzz(func(t *testing.T, data []byte, chunk uint16, fdMask uint64) {
		if len(data) > 256<<10 {
			return
		}
		size := int(chunk) + 1
		c, raw, closeRaw := rawPair(t)
		pr, pw := pipe(t)
		defer unix.Close(pw)

		sent := make(chan struct{})
		go func() {
			defer close(sent)
			defer unix.Close(pr)
			defer closeRaw()
			for i, off := 0, 0; off < len(data); i++ {
				end := min(off+size, len(data))
				var oob []byte
				if fdMask>>(i%64)&1 == 1 {
					oob = unix.UnixRights(pr)
				}
				// Blocks while the socket buffer is full; fails once
				// the receiver has given up and closed.
				if err := unix.Sendmsg(raw, data[off:end], oob, nil, unix.MSG_NOSIGNAL); err != nil {
					return
				}
				off = end
			}
		}()

		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		var err error
		for {
			var m Message
			m, err = c.Recv()
			if err != nil {
				break
			}
			checkMessage(t, m)
			m.CloseFiles()
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Fatalf("Recv hung: %v", err)
		case err == io.EOF, errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, ErrBadFrame),
			errors.Is(err, ErrVersion), errors.Is(err, ErrTooLarge):
		default:
			t.Fatalf("Recv error %v is none of the documented ones", err)
		}
		if _, again := c.Recv(); again == nil || again.Error() != err.Error() {
			t.Fatalf("second Recv error = %v; want the same %v", again, err)
		}
		c.Close()
		<-sent
		if !readersGone(t, pw) {
			t.Fatal("a received descriptor outlived the Conn")
		}
	})
}

// checkMessage checks what Recv promises of a message, and that a payload
// that decodes re-encodes to the same bytes.
func checkMessage(t *testing.T, m Message) {
	t.Helper()
	if !m.Type.valid() {
		t.Fatalf("Recv returned type %v", m.Type)
	}
	if len(m.Payload) > MaxPayload {
		t.Fatalf("Recv returned a %d-byte payload", len(m.Payload))
	}
	if len(m.Files) > 0 && !m.Type.carriesFiles() {
		t.Fatalf("Recv returned %d files with a %v", len(m.Files), m.Type)
	}
	for i, f := range m.Files {
		if f == nil {
			t.Fatalf("file %d is nil", i)
		}
		if !cloexec(t, f) {
			t.Fatalf("file %d is not close-on-exec", i)
		}
	}
	b, err := Decode(m)
	if err != nil {
		if !errors.Is(err, ErrBadPayload) && !errors.Is(err, ErrVersion) {
			t.Fatalf("Decode error %v is neither ErrBadPayload nor ErrVersion", err)
		}
		return
	}
	if b.Type() != m.Type {
		t.Fatalf("Decode of a %v returned a %v", m.Type, b.Type())
	}
	p, err := b.AppendBinary(nil)
	if err != nil {
		t.Fatalf("re-encoding %v: %v", m.Type, err)
	}
	if !bytes.Equal(p, m.Payload) {
		t.Fatalf("%v payload %x decodes to %v, which encodes to %x", m.Type, m.Payload, b, p)
	}
}

// FuzzPerIP decodes arbitrary PerIP and PerIPGrant payloads: never a
// panic, and whatever decodes re-encodes to the same bytes.
func FuzzPerIP(f *testing.F) {
	for _, b := range bodies() {
		switch b.(type) {
		case PerIP, PerIPGrant:
			p, err := b.AppendBinary(nil)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(byte(b.Type()), p)
		}
	}
	f.Add(byte(TypePerIP), []byte{1, 16, 0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0})
	f.Add(byte(TypePerIPGrant), []byte{4, 127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, typ byte, p []byte) {
		m := Message{Type: TypePerIP + Type(typ%2), Payload: p}
		b, err := Decode(m)
		if err != nil {
			if !errors.Is(err, ErrBadPayload) {
				t.Fatalf("decode %v % x: %v", m.Type, p, err)
			}
			return
		}
		again, err := b.AppendBinary(nil)
		if err != nil || !bytes.Equal(again, p) {
			t.Fatalf("%v % x decodes to %+v, re-encodes to % x (%v)", m.Type, p, b, again, err)
		}
	})
}
