package ipc

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

func TestDecodeRejects(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	statsOK, _ := Stats{}.AppendBinary(nil)
	statsLayout := bytes.Clone(statsOK)
	statsLayout[0]++
	helloV2, _ := Hello{Proto: Version}.AppendBinary(nil)
	helloV2[7] = Version + 1
	tests := []struct {
		name string
		m    Message
		want error
	}{
		{"hello short", Message{Type: TypeHello, Payload: make([]byte, 31)}, ErrBadPayload},
		{"hello long", Message{Type: TypeHello, Payload: make([]byte, 33)}, ErrBadPayload},
		{"hello version 0", Message{Type: TypeHello, Payload: make([]byte, 32)}, ErrVersion},
		{"hello next version", Message{Type: TypeHello, Payload: helloV2}, ErrVersion},
		{"ready with payload", Message{Type: TypeReady, Payload: []byte{0}}, ErrBadPayload},
		{"stop with payload", Message{Type: TypeStop, Payload: []byte{0}}, ErrBadPayload},
		{"lease request empty", Message{Type: TypeLeaseRequest}, ErrBadPayload},
		{"lease request urgent byte 2", Message{Type: TypeLeaseRequest, Payload: []byte{0, 0, 0, 1, 2}}, ErrBadPayload},
		{"lease request without urgent byte", Message{Type: TypeLeaseRequest, Payload: []byte{0, 0, 0, 1}}, ErrBadPayload},
		{"per_ip empty", Message{Type: TypePerIP}, ErrBadPayload},
		{"per_ip flags 2", Message{Type: TypePerIP, Payload: []byte{2, 4, 192, 0, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0}}, ErrBadPayload},
		{"per_ip key of 5 bytes", Message{Type: TypePerIP, Payload: []byte{0, 5, 192, 0, 2, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0}}, ErrBadPayload},
		{"per_ip truncated key", Message{Type: TypePerIP, Payload: []byte{0, 16, 0x20, 1}}, ErrBadPayload},
		{"per_ip trailing byte", Message{Type: TypePerIP, Payload: []byte{0, 4, 192, 0, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0}}, ErrBadPayload},
		{"per_ip negative count", Message{Type: TypePerIP, Payload: []byte{0, 4, 192, 0, 2, 1, 0x80, 0, 0, 0, 0, 0, 0, 0}}, ErrBadPayload},
		{"per_ip_grant short", Message{Type: TypePerIPGrant, Payload: []byte{4, 192, 0, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0}}, ErrBadPayload},
		{"per_ip_grant no key", Message{Type: TypePerIPGrant, Payload: make([]byte, 12)}, ErrBadPayload},
		{"lease grant 3 bytes", Message{Type: TypeLeaseGrant, Payload: []byte{0, 0, 1}}, ErrBadPayload},
		{"lease grant 8 bytes", Message{Type: TypeLeaseGrant, Payload: make([]byte, 8)}, ErrBadPayload},
		{"lease grant negative", Message{Type: TypeLeaseGrant, Payload: []byte{0x80, 0, 0, 0}}, ErrBadPayload},
		{"lease return negative", Message{Type: TypeLeaseReturn, Payload: []byte{0xff, 0xff, 0xff, 0xff}}, ErrBadPayload},
		{"stats short", Message{Type: TypeStats, Payload: statsOK[:len(statsOK)-1]}, ErrBadPayload},
		{"stats long", Message{Type: TypeStats, Payload: append(bytes.Clone(statsOK), 0)}, ErrBadPayload},
		{"stats other layout", Message{Type: TypeStats, Payload: statsLayout}, ErrBadPayload},
		{"stats empty", Message{Type: TypeStats}, ErrBadPayload},
		{"drain 4 bytes", Message{Type: TypeRetire, Payload: make([]byte, 4)}, ErrBadPayload},
		{"ping 7 bytes", Message{Type: TypePing, Payload: make([]byte, 7)}, ErrBadPayload},
		{"pong 9 bytes", Message{Type: TypePong, Payload: make([]byte, 9)}, ErrBadPayload},
		{"listeners empty payload", Message{Type: TypeListeners}, ErrBadPayload},
		{"listeners count over files", Message{Type: TypeListeners, Payload: []byte{0, 1, 0, 1, 'a'}}, ErrBadPayload},
		{"listeners files over count", Message{Type: TypeListeners, Payload: []byte{0, 0}, Files: []*os.File{pr}}, ErrBadPayload},
		{"listeners truncated name", Message{Type: TypeListeners, Payload: []byte{0, 1, 0, 5, 'a'}, Files: []*os.File{pr}}, ErrBadPayload},
		{"listeners truncated length", Message{Type: TypeListeners, Payload: []byte{0, 1, 0}, Files: []*os.File{pr}}, ErrBadPayload},
		{"listeners trailing byte", Message{Type: TypeListeners, Payload: []byte{0, 1, 0, 1, 'a', 'b'}, Files: []*os.File{pr}}, ErrBadPayload},
		{"listeners count over MaxFiles", Message{Type: TypeListeners, Payload: []byte{0xff, 0xff}}, ErrBadPayload},
		{"files on a ping", Message{Type: TypePing, Payload: make([]byte, 8), Files: []*os.File{pr}}, ErrBadFrame},
		{"move with payload", Message{Type: TypeMove, Payload: []byte{0}}, ErrBadPayload},
		{"connection without files", Message{Type: TypeConnection, Payload: []byte("{}")}, ErrBadPayload},
		{"connection with one file", Message{Type: TypeConnection, Files: []*os.File{pr}}, ErrBadPayload},
		{"connection state over the cap", Message{Type: TypeConnection, Payload: make([]byte, 1+MaxConnectionState+1), Files: []*os.File{pr, pw}}, ErrBadPayload},
		{"connection key of 5 bytes", Message{Type: TypeConnection, Payload: []byte{5, 192, 0, 2, 1, 1, '{', '}'}, Files: []*os.File{pr, pw}}, ErrBadPayload},
		{"connection truncated key", Message{Type: TypeConnection, Payload: []byte{16, 0x20, 1}, Files: []*os.File{pr, pw}}, ErrBadPayload},
		{"connection without key byte", Message{Type: TypeConnection, Files: []*os.File{pr, pw}}, ErrBadPayload},
		{"connection of an older version (no key)", Message{Type: TypeConnection, Payload: []byte(`{"moves":1}`), Files: []*os.File{pr, pw}}, ErrBadPayload},
		{"unknown type", Message{Type: numTypes}, ErrBadFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := Decode(tt.m)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Decode = %v, %v; want error %v", b, err, tt.want)
			}
			if b != nil {
				t.Fatalf("Decode returned %v with its error", b)
			}
		})
	}
	// Decode must not have closed the caller's file.
	if _, err := pr.Stat(); err != nil {
		t.Fatalf("Decode closed a file: %v", err)
	}
}

func TestEncodeRejects(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	tests := []struct {
		name  string
		b     Body
		files []*os.File
		want  error
	}{
		{"hello without Proto", Hello{Slot: 1}, nil, ErrBadPayload},
		{"negative grant", LeaseGrant{N: -1}, nil, ErrBadPayload},
		{"grant over int32", LeaseGrant{N: 1 << 31}, nil, ErrBadPayload},
		{"negative request", LeaseRequest{Want: -5}, nil, ErrBadPayload},
		{"negative return", LeaseReturn{N: -5}, nil, ErrBadPayload},
		{"drain at the epoch", Retire{Deadline: time.Unix(0, 0)}, nil, ErrBadPayload},
		{"drain in year 3000", Retire{Deadline: time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)}, nil, ErrBadPayload},
		{"config over the cap", Config{YAML: make([]byte, MaxPayload+1)}, nil, ErrTooLarge},
		{"listeners without files", Listeners{Names: []string{"a"}}, nil, ErrBadPayload},
		{"listeners files without names", Listeners{}, []*os.File{pr}, ErrBadPayload},
		{"files on a ping", Ping{}, []*os.File{pr}, ErrBadFrame},
		{"name too long", Listeners{Names: []string{string(make([]byte, 1<<16))}}, []*os.File{pr}, ErrBadPayload},
		{"too many listeners", Listeners{Names: make([]string, MaxFiles+1)}, make([]*os.File, MaxFiles+1), ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Encode(tt.b, tt.files...); !errors.Is(err, tt.want) {
				t.Fatalf("Encode = %v; want %v", err, tt.want)
			}
		})
	}
}

func TestTypeString(t *testing.T) {
	seen := map[string]bool{}
	for ty := Type(1); ty < numTypes; ty++ {
		if ty >= 17 && ty <= 19 && typeNames[ty] == "" {
			continue // reserved for the backend health messages
		}
		s := ty.String()
		if s == "" || strings.HasPrefix(s, "type(") || seen[s] {
			t.Errorf("Type(%d).String() = %q; want a name of its own", ty, s)
		}
		seen[s] = true
	}
	if got := Type(200).String(); got != "type(200)" {
		t.Errorf("Type(200).String() = %q; want %q", got, "type(200)")
	}
}
