package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
)

// Version is the protocol version. It is byte 4 of every frame header and
// the Proto of every Hello. Any change a peer built from other sources could
// misread (a new message type, a changed payload layout, a changed header)
// increments it; there are no minor versions. See the package doc.
const Version = 4

// Frame limits.
const (
	// HeaderSize is the size of a frame header in bytes.
	HeaderSize = 12
	// MaxPayload is the largest payload a frame may carry (64 MiB). Only
	// Config comes near it: the effective config of 100,000 routes is
	// 7 MB. A header claiming more is refused with ErrTooLarge before any
	// of the payload is read or allocated; below it, the payload buffer
	// grows with the bytes that actually arrive.
	MaxPayload = 64 << 20
	// MaxFiles is the most file descriptors one frame may carry: the
	// kernel's SCM_MAX_FD. Send more in several frames.
	MaxFiles = 253
)

// magic opens every frame: "SNIP".
var magic = [4]byte{'S', 'N', 'I', 'P'}

// Errors returned by Recv, Send, Encode and Decode. Each error these return
// wraps at most one of them (or io.EOF, io.ErrUnexpectedEOF, net.ErrClosed,
// os.ErrDeadlineExceeded or a syscall.Errno) and adds detail; test with
// errors.Is.
var (
	// ErrBadFrame means the peer sent bytes that are not a frame of this
	// protocol: a wrong magic, a non-zero reserved byte, an unknown message
	// type, or file descriptors that do not match the frame's count (also
	// when this process could not take them: MSG_CTRUNC at RLIMIT_NOFILE).
	// The connection is out of sync and unusable.
	ErrBadFrame = errors.New("ipc: malformed frame")
	// ErrVersion means the peer speaks another protocol version: it is a
	// different sniproxy build. The connection is unusable.
	ErrVersion = errors.New("ipc: protocol version mismatch")
	// ErrTooLarge means a frame's payload is over MaxPayload or it carries
	// more than MaxFiles descriptors. From Recv, the connection is unusable.
	ErrTooLarge = errors.New("ipc: frame too large")
	// ErrBadPayload means a well-formed frame's payload is not a valid
	// encoding of its message type (Decode), or a message cannot be encoded
	// (Encode). The connection itself is still in sync.
	ErrBadPayload = errors.New("ipc: malformed payload")
)

// Type is the type of a message: byte 5 of the frame header.
type Type uint8

// Message types. The comment says which way each one flows; the package
// does not enforce direction, the master and worker code do.
const (
	// TypeHello (worker → master) is a worker's first frame: Hello.
	TypeHello Type = iota + 1
	// TypeReady (worker → master): the worker has its config and listeners
	// and is accepting: Ready.
	TypeReady
	// TypeConfig (master → worker): the effective config: Config.
	TypeConfig
	// TypeLeaseRequest (worker → master): LeaseRequest.
	TypeLeaseRequest
	// TypeLeaseGrant (master → worker): LeaseGrant.
	TypeLeaseGrant
	// TypeLeaseReturn (worker → master): LeaseReturn.
	TypeLeaseReturn
	// TypeStats (worker → master): counter deltas: Stats.
	TypeStats
	// TypeRetire (master → worker): stop accepting, drain: Retire.
	TypeRetire
	// TypeStop (master → worker): close everything now and exit: Stop.
	TypeStop
	// TypePing (either way): Ping; the peer answers with a Pong.
	TypePing
	// TypePong (either way): Pong.
	TypePong
	// TypeListeners (master → worker): listening sockets, one file
	// descriptor per name: Listeners.
	TypeListeners
	// TypeMove (master → worker): hand every proxied connection back
	// to the master as Connection frames, close the rest and exit: Move.
	TypeMove
	// TypeConnection (worker → master, master → master, master →
	// worker): one proxied connection moving to another process, with its
	// client and backend sockets: Connection.
	TypeConnection
	// TypeRevoke (master → worker): the global pool ran dry; give spare
	// permits back now (LeaseReturn): Revoke.
	TypeRevoke
	// TypeStopped (worker → master): told to retire or move, the worker
	// has closed its listeners and accepts no more: Stopped.
	TypeStopped
	// TypeHealth (master → worker): the backends' health table, right
	// after the Config and whenever a backend goes up or down: Health.
	TypeHealth
	// TypeDialReport (worker → master): the outcomes of dials to pool
	// backends since the last report (passive health): DialReport.
	TypeDialReport
	// TypeBackendStats (worker → master): per-backend connection counter
	// deltas: BackendStats.
	TypeBackendStats
	// TypeLogFiles (master → worker): the log files to write to from now
	// on (at start, and after SIGUSR1 reopened them): LogFiles.
	TypeLogFiles
	// TypePerIP (worker → master): a request for, or a return of, a
	// client's per-client limit lease: PerIP.
	TypePerIP
	// TypePerIPGrant (master → worker): the answer to a PerIP request:
	// PerIPGrant.
	TypePerIPGrant

	numTypes // first invalid type
)

var typeNames = [numTypes]string{
	TypeHello:        "hello",
	TypeReady:        "ready",
	TypeConfig:       "config",
	TypeLeaseRequest: "lease_request",
	TypeLeaseGrant:   "lease_grant",
	TypeLeaseReturn:  "lease_return",
	TypeStats:        "stats",
	TypeRetire:       "retire",
	TypeStop:         "stop",
	TypePing:         "ping",
	TypePong:         "pong",
	TypeListeners:    "listeners",
	TypeMove:         "move",
	TypeConnection:   "connection",
	TypeRevoke:       "revoke",
	TypeStopped:      "stopped",
	TypeHealth:       "health",
	TypeDialReport:   "dial_report",
	TypeBackendStats: "backend_stats",
	TypeLogFiles:     "log_files",
	TypePerIP:        "per_ip",
	TypePerIPGrant:   "per_ip_grant",
}

// String returns the snake_case name of t, or "type(N)" for an unknown t.
func (t Type) String() string {
	if t.valid() {
		return typeNames[t]
	}
	return "type(" + strconv.Itoa(int(t)) + ")"
}

func (t Type) valid() bool { return t > 0 && t < numTypes && typeNames[t] != "" }

// carriesFiles reports whether frames of type t may carry descriptors.
func (t Type) carriesFiles() bool {
	return t == TypeListeners || t == TypeConnection || t == TypeLogFiles
}

// Message is one frame: its type, its payload and the descriptors that came
// with it.
//
// Ownership: Send neither keeps nor closes m.Payload or m.Files (it sends
// duplicates of the descriptors). Recv returns a Payload and Files that
// belong to the caller, who must close every one of Files, used or not
// (CloseFiles does that); only TypeListeners, TypeConnection and
// TypeLogFiles messages ever have Files.
type Message struct {
	Type    Type
	Payload []byte
	Files   []*os.File
}

// CloseFiles closes every file in m.Files.
func (m Message) CloseFiles() {
	for _, f := range m.Files {
		if f != nil {
			f.Close()
		}
	}
}

// check reports whether m can be sent.
func (m Message) check() error {
	if !m.Type.valid() {
		return fmt.Errorf("ipc: send %v: unknown message type: %w", m.Type, ErrBadFrame)
	}
	if len(m.Payload) > MaxPayload {
		return fmt.Errorf("ipc: send %v: payload of %d bytes, limit %d: %w", m.Type, len(m.Payload), MaxPayload, ErrTooLarge)
	}
	if len(m.Files) > MaxFiles {
		return fmt.Errorf("ipc: send %v: %d files, limit %d: %w", m.Type, len(m.Files), MaxFiles, ErrTooLarge)
	}
	if len(m.Files) > 0 && !m.Type.carriesFiles() {
		return fmt.Errorf("ipc: send %v: only %v, %v and %v frames carry files: %w", m.Type, TypeListeners, TypeConnection, TypeLogFiles, ErrBadFrame)
	}
	for i, f := range m.Files {
		if f == nil {
			return fmt.Errorf("ipc: send %v: file %d is nil: %w", m.Type, i, ErrBadFrame)
		}
	}
	return nil
}

// header is a decoded frame header.
type header struct {
	typ    Type
	nfds   int
	length int
}

// appendHeader appends the header of a frame to b.
func appendHeader(b []byte, t Type, nfds, length int) []byte {
	b = append(b, magic[:]...)
	b = append(b, Version, byte(t), byte(nfds), 0)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// checkPrefix checks the magic and version bytes among the first bytes of a
// frame, so that a peer sending garbage is refused without waiting for a
// whole header.
func checkPrefix(b []byte) error {
	for i := 0; i < len(b) && i < len(magic); i++ {
		if b[i] != magic[i] {
			return fmt.Errorf("ipc: recv: frame starts % x, want % x (%q): %w", b[:min(len(b), len(magic))], magic, magic[:], ErrBadFrame)
		}
	}
	if len(b) > 4 && b[4] != Version {
		return fmt.Errorf("ipc: recv: peer speaks protocol version %d, this binary %d (a different sniproxy build): %w", b[4], Version, ErrVersion)
	}
	return nil
}

// parseHeader decodes and checks a frame header; len(b) >= HeaderSize.
func parseHeader(b []byte) (header, error) {
	if err := checkPrefix(b[:5]); err != nil {
		return header{}, err
	}
	length := binary.BigEndian.Uint32(b[8:12])
	h := header{typ: Type(b[5]), nfds: int(b[6])}
	switch {
	case !h.typ.valid():
		return header{}, fmt.Errorf("ipc: recv: unknown message type %d: %w", b[5], ErrBadFrame)
	case b[7] != 0:
		return header{}, fmt.Errorf("ipc: recv: %v frame: reserved byte is %#x, want 0: %w", h.typ, b[7], ErrBadFrame)
	case length > MaxPayload:
		return header{}, fmt.Errorf("ipc: recv: %v frame claims %d payload bytes, limit %d: %w", h.typ, length, MaxPayload, ErrTooLarge)
	case h.nfds > MaxFiles:
		return header{}, fmt.Errorf("ipc: recv: %v frame claims %d files, limit %d: %w", h.typ, h.nfds, MaxFiles, ErrTooLarge)
	case h.nfds > 0 && !h.typ.carriesFiles():
		return header{}, fmt.Errorf("ipc: recv: %v frame claims %d files; only %v frames carry files: %w", h.typ, h.nfds, TypeListeners, ErrBadFrame)
	}
	h.length = int(length)
	return h, nil
}
