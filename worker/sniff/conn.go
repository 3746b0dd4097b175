package sniff

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
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
	if len(b) == 0 {
		return Result{}, ErrNeedMore
	}
	r, err := ParseTLS(b)
	if !errors.Is(err, ErrNotProtocol) {
		return r, err
	}
	r, err = ParseH2C(b)
	if !errors.Is(err, ErrNotProtocol) {
		return r, err
	}
	r, err = ParseHTTP1(b)
	if !errors.Is(err, ErrNotProtocol) {
		return r, err
	}
	return Result{}, ErrNotProtocol
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

// Buffer holds the bytes read while sniffing. Release returns its memory to
// a pool; the bytes must not be used after.
type Buffer struct {
	p *[]byte
	b []byte
}

// Bytes returns every byte read from the connection, in order.
func (b *Buffer) Bytes() []byte { return b.b }

// Release returns the buffer to the pool. It is safe to call twice.
func (b *Buffer) Release() {
	if b.p == nil {
		return
	}
	if cap(b.b) <= 4*startSize {
		*b.p = b.b[:0]
		bufPool.Put(b.p)
	}
	b.p, b.b = nil, nil
}

// Read reads from conn until Detect decides, the byte cap of the protocol
// is reached (ErrMalformed), or deadline passes (ErrTimeout). The bytes in
// start are treated as already read. The returned Buffer holds every byte
// read, whatever the outcome; the caller must Release it. Read sets conn's
// read deadline and clears it before returning.
func Read(conn net.Conn, start []byte, deadline time.Time) (Result, *Buffer, error) {
	p := bufPool.Get().(*[]byte)
	buf := &Buffer{p: p, b: append((*p)[:0], start...)}
	if err := conn.SetReadDeadline(deadline); err != nil {
		return Result{}, buf, fmt.Errorf("sniff: set deadline: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	for {
		if len(buf.b) > 0 {
			r, err := Detect(buf.b)
			if !errors.Is(err, ErrNeedMore) {
				return r, buf, err
			}
			if limit := limitFor(buf.b); len(buf.b) >= limit {
				return Result{}, buf, fmt.Errorf("%w: no decision within %d bytes", ErrMalformed, limit)
			}
		}
		if len(buf.b) == cap(buf.b) {
			limit := MaxTLSBytes
			if len(buf.b) > 0 {
				limit = limitFor(buf.b)
			}
			nb := make([]byte, len(buf.b), min(2*cap(buf.b), limit))
			copy(nb, buf.b)
			buf.b = nb
		}
		n, err := conn.Read(buf.b[len(buf.b):cap(buf.b)])
		buf.b = buf.b[:len(buf.b)+n]
		if err != nil {
			if n > 0 {
				if r, derr := Detect(buf.b); !errors.Is(derr, ErrNeedMore) {
					return r, buf, derr
				}
			}
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				return Result{}, buf, fmt.Errorf("%w after %d bytes", ErrTimeout, len(buf.b))
			case errors.Is(err, io.EOF):
				return Result{}, buf, fmt.Errorf("%w: connection closed after %d bytes", ErrMalformed, len(buf.b))
			default:
				return Result{}, buf, fmt.Errorf("sniff: read: %w", err)
			}
		}
	}
}

// HexPrefix returns up to max bytes of b in hex, for logging what arrived.
func HexPrefix(b []byte, max int) string {
	return hex.EncodeToString(b[:min(len(b), max)])
}
