package ipc

import (
	"encoding"
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"os"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
)

// Body is the typed content of a message. Every message type has one Body
// type (Hello for TypeHello, and so on); the value type implements Body and
// its pointer implements encoding.BinaryUnmarshaler.
//
// Encodings are big-endian and exact: a payload of any other length than
// its type's, a negative count, or a trailing byte is ErrBadPayload, and a
// payload that decodes re-encodes to the same bytes.
type Body interface {
	// Type returns the message type the body is sent as.
	Type() Type
	// AppendBinary appends the payload encoding of the body to b.
	AppendBinary(b []byte) ([]byte, error)
}

// Encode returns the message that carries b, with files attached. Only a
// Listeners body takes files, exactly one per name, a Connection body,
// exactly two (client, backend), and a LogFiles body, one per file it
// names.
func Encode(b Body, files ...*os.File) (Message, error) {
	p, err := b.AppendBinary(nil)
	if err != nil {
		return Message{}, err
	}
	m := Message{Type: b.Type(), Payload: p, Files: files}
	if l, ok := b.(Listeners); ok && len(l.Names) != len(files) {
		return Message{}, fmt.Errorf("ipc: encode %v: %d names, %d files: %w", m.Type, len(l.Names), len(files), ErrBadPayload)
	}
	if _, ok := b.(Connection); ok && len(files) != 2 {
		return Message{}, fmt.Errorf("ipc: encode %v: %d files, want 2: %w", m.Type, len(files), ErrBadPayload)
	}
	if l, ok := b.(LogFiles); ok && l.count() != len(files) {
		return Message{}, fmt.Errorf("ipc: encode %v: %d files, want %d: %w", m.Type, len(files), l.count(), ErrBadPayload)
	}
	if err := m.check(); err != nil {
		return Message{}, err
	}
	return m, nil
}

// Decode returns the body of m, as a value of m's Body type (Hello,
// LeaseGrant, ...), for a type switch. Decode neither closes nor keeps
// m.Files: the caller still owns them, even on error.
func Decode(m Message) (Body, error) {
	var b Body
	var err error
	switch m.Type {
	case TypeHello:
		b, err = decode[Hello](m.Payload)
	case TypeReady:
		b, err = decode[Ready](m.Payload)
	case TypeConfig:
		b, err = decode[Config](m.Payload)
	case TypeLeaseRequest:
		b, err = decode[LeaseRequest](m.Payload)
	case TypeLeaseGrant:
		b, err = decode[LeaseGrant](m.Payload)
	case TypeLeaseReturn:
		b, err = decode[LeaseReturn](m.Payload)
	case TypeStats:
		b, err = decode[Stats](m.Payload)
	case TypeRetire:
		b, err = decode[Retire](m.Payload)
	case TypeStop:
		b, err = decode[Stop](m.Payload)
	case TypePing:
		b, err = decode[Ping](m.Payload)
	case TypePong:
		b, err = decode[Pong](m.Payload)
	case TypeListeners:
		var l Listeners
		if err = l.UnmarshalBinary(m.Payload); err == nil && len(l.Names) != len(m.Files) {
			err = fmt.Errorf("ipc: decode %v: %d names, %d files: %w", m.Type, len(l.Names), len(m.Files), ErrBadPayload)
		}
		b = l
	case TypeMove:
		b, err = decode[Move](m.Payload)
	case TypeRevoke:
		b, err = decode[Revoke](m.Payload)
	case TypeStopped:
		b, err = decode[Stopped](m.Payload)
	case TypeHealth:
		b, err = decode[Health](m.Payload)
	case TypeDialReport:
		b, err = decode[DialReport](m.Payload)
	case TypeBackendStats:
		b, err = decode[BackendStats](m.Payload)
	case TypeConnection:
		b, err = decode[Connection](m.Payload)
		if err == nil && len(m.Files) != 2 {
			err = fmt.Errorf("ipc: decode %v: %d files, want 2: %w", m.Type, len(m.Files), ErrBadPayload)
		}
	case TypeLogFiles:
		var l LogFiles
		if err = l.UnmarshalBinary(m.Payload); err == nil && l.count() != len(m.Files) {
			err = fmt.Errorf("ipc: decode %v: %d files, want %d: %w", m.Type, len(m.Files), l.count(), ErrBadPayload)
		}
		b = l
	case TypePerIP:
		b, err = decode[PerIP](m.Payload)
	case TypePerIPGrant:
		b, err = decode[PerIPGrant](m.Payload)
	default:
		return nil, fmt.Errorf("ipc: decode: unknown message type %d: %w", m.Type, ErrBadFrame)
	}
	if err != nil {
		return nil, err
	}
	if len(m.Files) > 0 && !m.Type.carriesFiles() {
		return nil, fmt.Errorf("ipc: decode %v: carries %d files: %w", m.Type, len(m.Files), ErrBadFrame)
	}
	return b, nil
}

func decode[T Body, PT interface {
	*T
	encoding.BinaryUnmarshaler
}](p []byte) (Body, error) {
	var v T
	if err := PT(&v).UnmarshalBinary(p); err != nil {
		return nil, err
	}
	return v, nil
}

// badLength is the error for a payload of the wrong length.
func badLength(t Type, got, want int) error {
	return fmt.Errorf("ipc: decode %v: payload of %d bytes, want %d: %w", t, got, want, ErrBadPayload)
}

// Hello is a worker's first message. Proto must be Version; Slot is the
// worker's index (0..N-1) among its master's workers, Generation the
// master's generation, PID the worker's process ID.
//
// Encoding: four int64, 32 bytes.
type Hello struct {
	Proto      int
	Slot       int
	PID        int
	Generation int
}

// Type returns TypeHello.
func (Hello) Type() Type { return TypeHello }

// AppendBinary implements encoding.BinaryAppender. Proto must be Version.
func (h Hello) AppendBinary(b []byte) ([]byte, error) {
	if h.Proto != Version {
		return nil, fmt.Errorf("ipc: encode %v: Proto is %d, want Version (%d): %w", TypeHello, h.Proto, Version, ErrBadPayload)
	}
	for _, v := range [...]int{h.Proto, h.Slot, h.PID, h.Generation} {
		b = binary.BigEndian.AppendUint64(b, uint64(int64(v)))
	}
	return b, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler. A Proto other than
// Version is ErrVersion.
func (h *Hello) UnmarshalBinary(p []byte) error {
	if len(p) != 32 {
		return badLength(TypeHello, len(p), 32)
	}
	var v [4]int
	for i := range v {
		x := int64(binary.BigEndian.Uint64(p[8*i:]))
		if int64(int(x)) != x {
			return fmt.Errorf("ipc: decode %v: field %d overflows int: %w", TypeHello, i, ErrBadPayload)
		}
		v[i] = int(x)
	}
	if v[0] != Version {
		return fmt.Errorf("ipc: decode %v: peer speaks protocol version %d, this binary %d (a different sniproxy build): %w", TypeHello, v[0], Version, ErrVersion)
	}
	*h = Hello{Proto: v[0], Slot: v[1], PID: v[2], Generation: v[3]}
	return nil
}

// Ready tells the master the worker accepts connections. Empty payload.
type Ready struct{}

// Type returns TypeReady.
func (Ready) Type() Type { return TypeReady }

// AppendBinary implements encoding.BinaryAppender.
func (Ready) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (*Ready) UnmarshalBinary(p []byte) error { return empty(TypeReady, p) }

// Stop tells a worker to close everything at once and exit. Empty payload.
type Stop struct{}

// Type returns TypeStop.
func (Stop) Type() Type { return TypeStop }

// AppendBinary implements encoding.BinaryAppender.
func (Stop) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (*Stop) UnmarshalBinary(p []byte) error { return empty(TypeStop, p) }

func empty(t Type, p []byte) error {
	if len(p) != 0 {
		return badLength(t, len(p), 0)
	}
	return nil
}

// Config is the effective config the master validated, in the config
// package's own encoding (config.Config.YAML). Package ipc keeps it opaque.
// The payload is YAML itself, so a config is at most MaxPayload bytes.
type Config struct {
	YAML []byte
}

// Type returns TypeConfig.
func (Config) Type() Type { return TypeConfig }

// AppendBinary implements encoding.BinaryAppender.
func (c Config) AppendBinary(b []byte) ([]byte, error) {
	if len(c.YAML) > MaxPayload {
		return nil, fmt.Errorf("ipc: encode %v: %d bytes, limit %d: %w", TypeConfig, len(c.YAML), MaxPayload, ErrTooLarge)
	}
	return append(b, c.YAML...), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler; it copies p.
func (c *Config) UnmarshalBinary(p []byte) error {
	c.YAML = append([]byte(nil), p...)
	return nil
}

// appendCount appends n, a permit count, as a uint32.
func appendCount(b []byte, t Type, n int) ([]byte, error) {
	if n < 0 || n > math.MaxInt32 {
		return nil, fmt.Errorf("ipc: encode %v: count %d out of range [0, %d]: %w", t, n, math.MaxInt32, ErrBadPayload)
	}
	return binary.BigEndian.AppendUint32(b, uint32(n)), nil
}

// count decodes a permit count.
func count(t Type, p []byte) (int, error) {
	if len(p) != 4 {
		return 0, badLength(t, len(p), 4)
	}
	n := binary.BigEndian.Uint32(p)
	if n > math.MaxInt32 {
		return 0, fmt.Errorf("ipc: decode %v: count %d out of range [0, %d]: %w", t, n, math.MaxInt32, ErrBadPayload)
	}
	return int(n), nil
}

// LeaseRequest asks the master for Want more connection permits. Urgent
// says a connection is waiting with no spare permit left: if the pool is
// dry, the master asks the siblings for their spares (Revoke) before it
// answers.
//
// Encoding: uint32, 0 ≤ Want ≤ MaxInt32, then one byte: 1 if Urgent, 0 if
// not.
type LeaseRequest struct {
	Want   int
	Urgent bool
}

// Type returns TypeLeaseRequest.
func (LeaseRequest) Type() Type { return TypeLeaseRequest }

// AppendBinary implements encoding.BinaryAppender.
func (l LeaseRequest) AppendBinary(b []byte) ([]byte, error) {
	b, err := appendCount(b, TypeLeaseRequest, l.Want)
	if err != nil {
		return nil, err
	}
	if l.Urgent {
		return append(b, 1), nil
	}
	return append(b, 0), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (l *LeaseRequest) UnmarshalBinary(p []byte) (err error) {
	if len(p) != 5 {
		return badLength(TypeLeaseRequest, len(p), 5)
	}
	if p[4] > 1 {
		return fmt.Errorf("ipc: decode %v: urgent byte %d: %w", TypeLeaseRequest, p[4], ErrBadPayload)
	}
	l.Want, err = count(TypeLeaseRequest, p[:4])
	l.Urgent = p[4] == 1
	return err
}

// LeaseGrant gives a worker N permits (perhaps fewer than it asked for,
// perhaps 0).
//
// Encoding: uint32, 0 ≤ N ≤ MaxInt32.
type LeaseGrant struct {
	N int
}

// Type returns TypeLeaseGrant.
func (LeaseGrant) Type() Type { return TypeLeaseGrant }

// AppendBinary implements encoding.BinaryAppender.
func (l LeaseGrant) AppendBinary(b []byte) ([]byte, error) {
	return appendCount(b, TypeLeaseGrant, l.N)
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (l *LeaseGrant) UnmarshalBinary(p []byte) (err error) {
	l.N, err = count(TypeLeaseGrant, p)
	return err
}

// LeaseReturn gives N unused permits back to the master.
//
// Encoding: uint32, 0 ≤ N ≤ MaxInt32.
type LeaseReturn struct {
	N int
}

// Type returns TypeLeaseReturn.
func (LeaseReturn) Type() Type { return TypeLeaseReturn }

// AppendBinary implements encoding.BinaryAppender.
func (l LeaseReturn) AppendBinary(b []byte) ([]byte, error) {
	return appendCount(b, TypeLeaseReturn, l.N)
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (l *LeaseReturn) UnmarshalBinary(p []byte) (err error) {
	l.N, err = count(TypeLeaseReturn, p)
	return err
}

// Stats carries what a worker's counters did since its previous Stats: the
// master adds Delta to its totals.
//
// Encoding: three bytes giving the lengths of Delta's arrays (Conns,
// Rejected, ConnectBuckets), a zero byte, then every field of
// stats.Snapshot in declaration order as 8-byte integers. Array lengths
// other than this binary's are ErrBadPayload, so a change to
// stats.Snapshot shows up as an error, never as shifted counters; it must
// still come with a new Version.
type Stats struct {
	Delta stats.Snapshot
}

// Array lengths and payload size of a Stats.
const (
	statsConns    = len(stats.Snapshot{}.Conns)
	statsRejected = len(stats.Snapshot{}.Rejected)
	statsBuckets  = len(stats.Snapshot{}.ConnectBuckets)
	statsSize     = 4 + 8*(1+statsConns+statsRejected+2+statsBuckets+2)
)

// Type returns TypeStats.
func (Stats) Type() Type { return TypeStats }

// AppendBinary implements encoding.BinaryAppender.
func (s Stats) AppendBinary(b []byte) ([]byte, error) {
	d := &s.Delta
	b = append(b, byte(statsConns), byte(statsRejected), byte(statsBuckets), 0)
	b = binary.BigEndian.AppendUint64(b, uint64(d.Active))
	for _, v := range d.Conns {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	for _, v := range d.Rejected {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	b = binary.BigEndian.AppendUint64(b, d.BytesIn)
	b = binary.BigEndian.AppendUint64(b, d.BytesOut)
	for _, v := range d.ConnectBuckets {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	b = binary.BigEndian.AppendUint64(b, d.ConnectCount)
	b = binary.BigEndian.AppendUint64(b, d.ConnectNanos)
	return b, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (s *Stats) UnmarshalBinary(p []byte) error {
	if len(p) >= 4 && (int(p[0]) != statsConns || int(p[1]) != statsRejected || int(p[2]) != statsBuckets || p[3] != 0) {
		return fmt.Errorf("ipc: decode %v: layout %d/%d/%d/%d, this binary %d/%d/%d/0 (a different sniproxy build): %w",
			TypeStats, p[0], p[1], p[2], p[3], statsConns, statsRejected, statsBuckets, ErrBadPayload)
	}
	if len(p) != statsSize {
		return badLength(TypeStats, len(p), statsSize)
	}
	p = p[4:]
	next := func() uint64 {
		v := binary.BigEndian.Uint64(p)
		p = p[8:]
		return v
	}
	var d stats.Snapshot
	d.Active = int64(next())
	for i := range d.Conns {
		d.Conns[i] = next()
	}
	for i := range d.Rejected {
		d.Rejected[i] = next()
	}
	d.BytesIn = next()
	d.BytesOut = next()
	for i := range d.ConnectBuckets {
		d.ConnectBuckets[i] = next()
	}
	d.ConnectCount = next()
	d.ConnectNanos = next()
	s.Delta = d
	return nil
}

// Retire tells a worker to stop accepting and to close its connections once
// idle, or at Deadline at the latest. The zero Deadline means none. Deadline
// is wall-clock time: master and workers share the system clock.
//
// Encoding: int64 nanoseconds since the Unix epoch, 0 for the zero time.
type Retire struct {
	Deadline time.Time
}

// Type returns TypeRetire.
func (Retire) Type() Type { return TypeRetire }

// AppendBinary implements encoding.BinaryAppender. A non-zero Deadline must
// be a time UnixNano represents (years 1678 to 2262) other than the epoch.
func (d Retire) AppendBinary(b []byte) ([]byte, error) {
	var ns int64
	if !d.Deadline.IsZero() {
		ns = d.Deadline.UnixNano()
		if ns == 0 || !time.Unix(0, ns).Equal(d.Deadline) {
			return nil, fmt.Errorf("ipc: encode %v: deadline %v not representable: %w", TypeRetire, d.Deadline, ErrBadPayload)
		}
	}
	return binary.BigEndian.AppendUint64(b, uint64(ns)), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (d *Retire) UnmarshalBinary(p []byte) error {
	if len(p) != 8 {
		return badLength(TypeRetire, len(p), 8)
	}
	d.Deadline = time.Time{}
	if ns := int64(binary.BigEndian.Uint64(p)); ns != 0 {
		d.Deadline = time.Unix(0, ns)
	}
	return nil
}

// Ping asks the peer to answer Pong with the same Seq.
//
// Encoding: uint64.
type Ping struct {
	Seq uint64
}

// Type returns TypePing.
func (Ping) Type() Type { return TypePing }

// AppendBinary implements encoding.BinaryAppender.
func (p Ping) AppendBinary(b []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint64(b, p.Seq), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (p *Ping) UnmarshalBinary(b []byte) error {
	if len(b) != 8 {
		return badLength(TypePing, len(b), 8)
	}
	p.Seq = binary.BigEndian.Uint64(b)
	return nil
}

// Pong answers a Ping.
//
// Encoding: uint64.
type Pong struct {
	Seq uint64
}

// Type returns TypePong.
func (Pong) Type() Type { return TypePong }

// AppendBinary implements encoding.BinaryAppender.
func (p Pong) AppendBinary(b []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint64(b, p.Seq), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (p *Pong) UnmarshalBinary(b []byte) error {
	if len(b) != 8 {
		return badLength(TypePong, len(b), 8)
	}
	p.Seq = binary.BigEndian.Uint64(b)
	return nil
}

// Listeners names the listening sockets that come with the message, one
// name per file, in order: Message.Files[i] is Names[i]. Names are the
// listener keys, e.g. "reuseport/0.0.0.0:443/2" or "shared/0.0.0.0:443".
//
// Encoding: uint16 count, then per name a uint16 length and the bytes. At
// most MaxFiles names.
type Listeners struct {
	Names []string
}

// Type returns TypeListeners.
func (Listeners) Type() Type { return TypeListeners }

// AppendBinary implements encoding.BinaryAppender.
func (l Listeners) AppendBinary(b []byte) ([]byte, error) {
	if len(l.Names) > MaxFiles {
		return nil, fmt.Errorf("ipc: encode %v: %d names, limit %d: %w", TypeListeners, len(l.Names), MaxFiles, ErrTooLarge)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(l.Names)))
	for _, n := range l.Names {
		if len(n) > math.MaxUint16 {
			return nil, fmt.Errorf("ipc: encode %v: name of %d bytes, limit %d: %w", TypeListeners, len(n), math.MaxUint16, ErrBadPayload)
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(n)))
		b = append(b, n...)
	}
	return b, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (l *Listeners) UnmarshalBinary(p []byte) error {
	if len(p) < 2 {
		return badLength(TypeListeners, len(p), 2)
	}
	n := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if n > MaxFiles {
		return fmt.Errorf("ipc: decode %v: %d names, limit %d: %w", TypeListeners, n, MaxFiles, ErrBadPayload)
	}
	names := make([]string, 0, min(n, len(p)/2))
	for i := range n {
		if len(p) < 2 {
			return fmt.Errorf("ipc: decode %v: name %d of %d: truncated: %w", TypeListeners, i, n, ErrBadPayload)
		}
		k := int(binary.BigEndian.Uint16(p))
		if len(p)-2 < k {
			return fmt.Errorf("ipc: decode %v: name %d of %d: %d bytes, %d left: %w", TypeListeners, i, n, k, len(p)-2, ErrBadPayload)
		}
		names = append(names, string(p[2:2+k]))
		p = p[2+k:]
	}
	if len(p) != 0 {
		return fmt.Errorf("ipc: decode %v: %d trailing bytes: %w", TypeListeners, len(p), ErrBadPayload)
	}
	if n == 0 {
		names = nil
	}
	l.Names = names
	return nil
}

// Interface checks.
var (
	_ encoding.BinaryAppender    = Hello{}
	_ encoding.BinaryUnmarshaler = (*Hello)(nil)
	_ encoding.BinaryUnmarshaler = (*Listeners)(nil)
)

// Move tells a draining worker to move each of its proxied connections
// to the master (a Connection frame each), to close the connections it
// cannot move (not yet proxied, or stuck), and to exit. Empty payload.
type Move struct{}

// Type returns TypeMove.
func (Move) Type() Type { return TypeMove }

// AppendBinary implements encoding.BinaryAppender.
func (Move) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (*Move) UnmarshalBinary(p []byte) error { return empty(TypeMove, p) }

// MaxConnectionState bounds a Connection's State.
const MaxConnectionState = 64 << 10

// Connection is one proxied connection on its way to another process: the
// frame carries exactly two descriptors, the client socket then the
// backend socket. Key is the client key the connection counts under for
// limits.per_ip_connections where it comes from (the masters keep its
// client permit counted all the way: see perip.Table.Transfer), or, when
// it holds no client permit there, the client's address; invalid if
// unknown. State is what the worker package needs to go on serving it
// (opaque here; at most MaxConnectionState bytes). Masters pass it on
// without looking inside State.
//
// Encoding: the key's length (0, 4 or 16), then its bytes, then State.
type Connection struct {
	Key   netip.Addr
	State []byte
}

// Type returns TypeConnection.
func (Connection) Type() Type { return TypeConnection }

// AppendBinary implements encoding.BinaryAppender.
func (c Connection) AppendBinary(b []byte) ([]byte, error) {
	if len(c.State) > MaxConnectionState {
		return nil, fmt.Errorf("ipc: encode %v: %d bytes, limit %d: %w", TypeConnection, len(c.State), MaxConnectionState, ErrTooLarge)
	}
	if !c.Key.IsValid() {
		b = append(b, 0)
	} else {
		var err error
		if b, err = appendKey(b, TypeConnection, c.Key); err != nil {
			return nil, err
		}
	}
	return append(b, c.State...), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (c *Connection) UnmarshalBinary(p []byte) error {
	var key netip.Addr
	rest := p
	if len(p) > 0 && p[0] == 0 {
		rest = p[1:]
	} else {
		var err error
		if key, rest, err = readKey(TypeConnection, p); err != nil {
			return err
		}
	}
	if len(rest) > MaxConnectionState {
		return fmt.Errorf("ipc: decode %v: state of %d bytes, limit %d: %w", TypeConnection, len(rest), MaxConnectionState, ErrBadPayload)
	}
	*c = Connection{Key: key, State: append([]byte(nil), rest...)}
	return nil
}

// Revoke asks a worker to give its spare permits back to the master's pool
// at once (a LeaseReturn), because a sibling needs one and the pool has
// none. Empty payload.
type Revoke struct{}

// Type returns TypeRevoke.
func (Revoke) Type() Type { return TypeRevoke }

// AppendBinary implements encoding.BinaryAppender.
func (Revoke) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (*Revoke) UnmarshalBinary(p []byte) error { return empty(TypeRevoke, p) }

// Stopped tells the master that the worker, told to retire or move, has
// closed its listeners: it accepts no more connections. Empty payload.
type Stopped struct{}

// Type returns TypeStopped.
func (Stopped) Type() Type { return TypeStopped }

// AppendBinary implements encoding.BinaryAppender.
func (Stopped) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (*Stopped) UnmarshalBinary(p []byte) error { return empty(TypeStopped, p) }

// LogFiles gives a worker the log files its master opened (log.file,
// log.access_file), to write to from now on instead of the ones it had: at
// start, and after SIGUSR1 reopened them for logrotate. The master opens
// them so that a worker running as another user needs no access to the
// log directory. The files come with the frame, in order: the main log
// file if Main, then the access log file if Access.
//
// Encoding: one byte, bit 0 Main, bit 1 Access, no other bit set.
type LogFiles struct {
	Main   bool
	Access bool
}

// count is the number of files the message carries.
func (l LogFiles) count() int {
	n := 0
	if l.Main {
		n++
	}
	if l.Access {
		n++
	}
	return n
}

// Type returns TypeLogFiles.
func (LogFiles) Type() Type { return TypeLogFiles }

// AppendBinary implements encoding.BinaryAppender.
func (l LogFiles) AppendBinary(b []byte) ([]byte, error) {
	var flags byte
	if l.Main {
		flags |= 1
	}
	if l.Access {
		flags |= 2
	}
	return append(b, flags), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (l *LogFiles) UnmarshalBinary(p []byte) error {
	if len(p) != 1 {
		return badLength(TypeLogFiles, len(p), 1)
	}
	if p[0]&^3 != 0 {
		return fmt.Errorf("ipc: decode %v: flags %#x: %w", TypeLogFiles, p[0], ErrBadPayload)
	}
	l.Main, l.Access = p[0]&1 != 0, p[0]&2 != 0
	return nil
}
