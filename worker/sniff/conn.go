package sniff

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrTimeout means the client did not send a complete hello before the
// sniff deadline.
var ErrTimeout = errors.New("sniff: timeout")

// h2Preface is what an h2c client with prior knowledge sends first.
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// Detect runs every parser over b, the bytes a client sent so far, and
// returns the first decision: a Result (nil error, or ErrNoName with the
// protocol set), ErrNeedMore while some protocol still fits, ErrMalformed
// from the protocol b belongs to, or ErrNotProtocol when none fits.
func Detect(b []byte) (Result, error) {
	var d detector
	return d.detect(b)
}

// detector is Detect over the growing bytes of one connection: each call
// of detect must get the bytes of the previous call and possibly more. It
// keeps each parser's progress and calls a parser again only once the
// bytes it waits for have arrived (see tlsState, h2cState, http1State), so
// that a client sending its hello a byte at a time costs work linear in
// the bytes, not in bytes times reads. Its decisions are Detect's, made on
// the same bytes, except that HTTP/1 reports a malformed byte when its
// line ends. The zero value starts at the first byte.
type detector struct {
	tls   tlsState
	h2c   h2cState
	http1 http1State
	// A parser that said ErrNotProtocol is not asked again: more bytes
	// cannot change that.
	notTLS, notH2C, notHTTP1 bool
	// calls counts parser calls, and fresh the bytes they got past the
	// point each resumes from: the work done, for tests.
	calls, fresh int
}

// detect is Detect on b, resuming each parser where it stopped. A parser
// that is not ready said ErrNeedMore and would again: Detect would return
// that without asking the parsers after it. (The three are called without
// an interface, which would move the detector to the heap.)
func (d *detector) detect(b []byte) (Result, error) {
	if len(b) == 0 {
		return Result{}, ErrNeedMore
	}
	if !d.notTLS {
		if !d.tls.ready(b) {
			return Result{}, ErrNeedMore
		}
		d.count(b, d.tls.resume())
		if r, err := d.tls.parse(b); !errors.Is(err, ErrNotProtocol) {
			return r, err
		}
		d.notTLS = true
	}
	if !d.notH2C {
		if !d.h2c.ready(b) {
			return Result{}, ErrNeedMore
		}
		d.count(b, d.h2c.resume())
		if r, err := d.h2c.parse(b); !errors.Is(err, ErrNotProtocol) {
			return r, err
		}
		d.notH2C = true
	}
	if !d.notHTTP1 {
		if !d.http1.ready(b) {
			return Result{}, ErrNeedMore
		}
		d.count(b, d.http1.resume())
		if r, err := d.http1.parse(b); !errors.Is(err, ErrNotProtocol) {
			return r, err
		}
		d.notHTTP1 = true
	}
	return Result{}, ErrNotProtocol
}

// count records a parser call on b that resumes at offset resume.
func (d *detector) count(b []byte, resume int) {
	d.calls++
	d.fresh += len(b) - resume
}

// limitFor returns how many bytes may be buffered while sniffing b.
func limitFor(b []byte) int {
	switch {
	case len(b) > 0 && b[0] == 0x16:
		return MaxTLSBytes
	case len(b) >= 4 && string(b[:4]) == h2Preface[:4]:
		return MaxH2CBytes
	default:
		return MaxHTTP1Bytes
	}
}

// startSize is the first buffer size: a typical ClientHello (1.5–2 KB with
// post-quantum key shares) or HTTP request fits without growing.
const startSize = 4096

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, startSize); return &b }}

// SmallBytes is what one sniffing connection may buffer on its own: every
// real ClientHello and request head fits (a browser's hello with
// post-quantum key shares is 1.5–2 KB; nginx's preread buffer and
// HAProxy's are 16 KiB). A buffer grows past it only with room in its
// Budget.
const SmallBytes = 16 << 10

// ErrBudget is the error of a hello or request head that needs more than
// SmallBytes while its Budget is spent: the connection is refused rather
// than let many such clients hold MaxTLSBytes each.
var ErrBudget = errors.New("sniff: over 16 KiB unfinished while the budget for large hellos is spent")

// Budget bounds the bytes that sniffing connections buffer beyond
// SmallBytes each, all of them together: the memory of N connections
// still sniffing is at most N × SmallBytes plus the budget, whatever they
// send, instead of N × MaxTLSBytes. A nil *Budget has no limit. It is
// safe for concurrent use.
type Budget struct {
	max  int64
	used atomic.Int64
}

// NewBudget returns a budget of max bytes.
func NewBudget(max int64) *Budget { return &Budget{max: max} }

// Used returns the bytes taken now.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

// take takes n bytes if there is room (always with a nil b).
func (b *Budget) take(n int64) bool {
	if b == nil {
		return true
	}
	if b.used.Add(n) > b.max {
		b.used.Add(-n)
		return false
	}
	return true
}

// give gives n bytes back.
func (b *Budget) give(n int64) {
	if b != nil && n > 0 {
		b.used.Add(-n)
	}
}

// Buffer holds the bytes read while sniffing. Release returns its memory to
// a pool (and what it took of its Budget); the bytes must not be used
// after.
type Buffer struct {
	p *[]byte
	b []byte
	// budget is what lends the capacity beyond SmallBytes; taken is how
	// much of it this buffer holds.
	budget *Budget
	taken  int64
}

// Bytes returns every byte read from the connection, in order.
func (b *Buffer) Bytes() []byte { return b.b }

// Release returns the buffer to the pool. It is safe to call twice.
func (b *Buffer) Release() {
	if b.p == nil {
		return
	}
	b.budget.give(b.taken)
	b.budget, b.taken = nil, 0
	if cap(b.b) <= 4*startSize {
		*b.p = b.b[:0]
		bufPool.Put(b.p)
	}
	b.p, b.b = nil, nil
}

// Sniffer is Read for a caller that reads the bytes itself, such as an
// event loop on non-blocking sockets: read into Space, then Advance by
// the count read, until Advance decides. It keeps the same bounds as
// Read (the byte cap of the protocol) and the same linear work. Start it
// with Init; Buffer holds every byte read, and the caller must Release
// it.
type Sniffer struct {
	d   detector
	buf Buffer
}

// Init starts s over with the bytes in start treated as already read;
// budget (nil: none) lends the capacity beyond SmallBytes. The bytes of
// start are taken from it whether it has room or not: they were read
// under a budget already (those after a PROXY header).
func (s *Sniffer) Init(start []byte, budget *Budget) {
	p := bufPool.Get().(*[]byte)
	s.d = detector{}
	s.buf = Buffer{p: p, b: append((*p)[:0], start...), budget: budget}
	if over := int64(cap(s.buf.b) - SmallBytes); over > 0 && budget != nil {
		budget.used.Add(over)
		s.buf.taken = over
	}
}

// Buffer returns the bytes read so far; it stays valid until Release.
func (s *Sniffer) Buffer() *Buffer { return &s.buf }

// Decide returns the decision on the bytes read so far: ErrNeedMore while
// none, ErrMalformed once the protocol's byte cap is reached undecided.
func (s *Sniffer) Decide() (Result, error) {
	b := s.buf.b
	if len(b) == 0 {
		return Result{}, ErrNeedMore
	}
	r, err := s.d.detect(b)
	if !errors.Is(err, ErrNeedMore) {
		return r, err
	}
	if limit := limitFor(b); len(b) >= limit {
		return Result{}, fmt.Errorf("%w: no decision within %d bytes", ErrMalformed, limit)
	}
	return Result{}, ErrNeedMore
}

// Space returns where the next bytes go, growing the buffer (doubling,
// up to the protocol's cap) when it is full: past SmallBytes only with
// room in the budget, else ErrBudget. Call it only while Decide says
// ErrNeedMore.
func (s *Sniffer) Space() ([]byte, error) {
	b := &s.buf
	if len(b.b) == cap(b.b) {
		limit := MaxTLSBytes
		if len(b.b) > 0 {
			limit = limitFor(b.b)
		}
		size := min(2*cap(b.b), limit)
		if over := int64(size - max(cap(b.b), SmallBytes)); over > 0 {
			if !b.budget.take(over) {
				return nil, fmt.Errorf("%w (%d bytes read, %d of the budget in use)", ErrBudget, len(b.b), b.budget.Used())
			}
			b.taken += over
		}
		nb := make([]byte, len(b.b), size)
		copy(nb, b.b)
		b.b = nb
	}
	return b.b[len(b.b):cap(b.b)], nil
}

// Grow records n bytes read into Space without deciding (bytes that come
// before the hello, such as a PROXY header, read into the same buffer).
func (s *Sniffer) Grow(n int) { s.buf.b = s.buf.b[:len(s.buf.b)+n] }

// Advance records n bytes read into Space and returns Decide.
func (s *Sniffer) Advance(n int) (Result, error) {
	s.buf.b = s.buf.b[:len(s.buf.b)+n]
	return s.Decide()
}

// Ended returns the error for a read that failed with err before a
// decision: ErrTimeout for a deadline, ErrMalformed for EOF, else err.
func (s *Sniffer) Ended(err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%w after %d bytes", ErrTimeout, len(s.buf.b))
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: connection closed after %d bytes", ErrMalformed, len(s.buf.b))
	default:
		return fmt.Errorf("sniff: read: %w", err)
	}
}

// Read reads from conn until Detect decides, the byte cap of the protocol
// is reached (ErrMalformed), or deadline passes (ErrTimeout). It does not
// run Detect over all the bytes after every read: a detector goes on where
// the last read left each parser and waits for the bytes that can change
// its answer, so a client sending its hello a byte at a time costs work
// linear in the hello's bytes. The bytes in
// start are treated as already read; budget (nil: none) lends the buffer
// what it needs beyond SmallBytes (ErrBudget when it has no room). The returned Buffer holds every byte
// read, whatever the outcome; the caller must Release it. Read sets conn's
// read deadline and clears it before returning.
func Read(conn net.Conn, start []byte, deadline time.Time, budget *Budget) (Result, *Buffer, error) {
	s := new(Sniffer)
	s.Init(start, budget)
	buf := s.Buffer()
	if err := conn.SetReadDeadline(deadline); err != nil {
		return Result{}, buf, fmt.Errorf("sniff: set deadline: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	r, err := s.Decide()
	for errors.Is(err, ErrNeedMore) {
		space, serr := s.Space()
		if serr != nil {
			return Result{}, buf, serr
		}
		n, rerr := conn.Read(space)
		r, err = s.Advance(n)
		if rerr != nil && errors.Is(err, ErrNeedMore) {
			return Result{}, buf, s.Ended(rerr)
		}
	}
	return r, buf, err
}

// HexPrefix returns up to max bytes of b in hex, for logging what arrived.
func HexPrefix(b []byte, max int) string {
	return hex.EncodeToString(b[:min(len(b), max)])
}
