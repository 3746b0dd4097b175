package health

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// The binary form of a Table, version 1:
//
//	'H' version(=1) uvarint(count)
//	count × entry, keys in strictly increasing byte order:
//	  uvarint(len key) key
//	  flags (bit 0: up; the other bits 0)
//	  varint(since) varint(last result)   Unix nanoseconds, 0 = zero time
//	  uvarint(successes) uvarint(failures) at most one non-zero, each ≤ 2^20
//	  uvarint(len last error) last error
//
// Every varint is in its shortest form and nothing follows the last entry,
// so a form decodes only if it is exactly what encoding the result gives.
const (
	magic   = 'H'
	version = 1

	// Bounds a decoder enforces, generous for config values.
	maxEntries = 1 << 16
	maxKeyLen  = 1024
	maxErrLen  = 1024

	flagUp = 1
)

// ErrFormat is wrapped by every error UnmarshalBinary returns for data
// that is not a Table in the binary form.
var ErrFormat = errors.New("health: bad table encoding")

// AppendBinary appends the Table's binary form to b. It implements
// encoding.BinaryAppender.
func (t *Table) AppendBinary(b []byte) ([]byte, error) {
	b = append(b, magic, version)
	b = binary.AppendUvarint(b, uint64(len(t.m)))
	for _, k := range t.Keys() {
		s := t.m[k]
		if len(k) == 0 || len(k) > maxKeyLen {
			return nil, fmt.Errorf("health: encode: key %.40q: length %d not in 1..%d", k, len(k), maxKeyLen)
		}
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
		var flags byte
		if s.Up {
			flags |= flagUp
		}
		b = append(b, flags)
		b = binary.AppendVarint(b, unixNano(s.Since))
		b = binary.AppendVarint(b, unixNano(s.LastResult))
		b = binary.AppendUvarint(b, uint64(s.Successes))
		b = binary.AppendUvarint(b, uint64(s.Failures))
		e := s.LastError
		if len(e) > maxErrLen {
			e = e[:maxErrLen]
		}
		b = binary.AppendUvarint(b, uint64(len(e)))
		b = append(b, e...)
	}
	return b, nil
}

// MarshalBinary returns the Table's binary form. It implements
// encoding.BinaryMarshaler.
func (t *Table) MarshalBinary() ([]byte, error) { return t.AppendBinary(nil) }

// UnmarshalBinary replaces the Table's contents with those of data, the
// binary form. It implements encoding.BinaryUnmarshaler. On error (which
// wraps ErrFormat) the Table is unchanged.
func (t *Table) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	if m, v := d.byte(), d.byte(); d.err == nil && (m != magic || v != version) {
		return fmt.Errorf("%w: header %q, version %d; want %q, version %d", ErrFormat, m, v, magic, version)
	}
	n := d.uvarint(maxEntries, "entry count")
	m := make(map[string]*State, min(n, uint64(len(data))))
	prev := ""
	for i := uint64(0); i < n && d.err == nil; i++ {
		k := d.bytes(maxKeyLen, "key")
		if d.err == nil && (k == "" || (i > 0 && k <= prev)) {
			d.fail("entry %d: key %.40q empty or not after %.40q", i, k, prev)
		}
		prev = k
		flags := d.byte()
		if flags&^flagUp != 0 {
			d.fail("entry %d: unknown flags %#x", i, flags)
		}
		s := &State{Up: flags&flagUp != 0}
		s.Since = fromUnixNano(d.varint())
		s.LastResult = fromUnixNano(d.varint())
		s.Successes = int(d.uvarint(maxCount, "successes"))
		s.Failures = int(d.uvarint(maxCount, "failures"))
		if s.Successes != 0 && s.Failures != 0 {
			d.fail("entry %d: both successes and failures", i)
		}
		s.LastError = d.bytes(maxErrLen, "last error")
		m[k] = s
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d bytes after the last entry", len(d.b))
	}
	if d.err != nil {
		return d.err
	}
	t.m = m
	return nil
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// decoder reads the binary form; after the first error every read returns
// a zero value and err stays the first error.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.fail("truncated")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

// raw reads one unsigned varint in its shortest form.
func (d *decoder) raw() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	switch {
	case n == 0:
		d.fail("truncated")
		return 0
	case n < 0:
		d.fail("varint overflows 64 bits")
		return 0
	case n > 1 && d.b[n-1] == 0:
		d.fail("varint not in its shortest form")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uvarint(limit uint64, what string) uint64 {
	v := d.raw()
	if v > limit {
		d.fail("%s %d over %d", what, v, limit)
		return 0
	}
	return v
}

func (d *decoder) varint() int64 {
	u := d.raw()
	// Zig-zag, as binary.Varint decodes it.
	x := int64(u >> 1)
	if u&1 != 0 {
		x = ^x
	}
	return x
}

func (d *decoder) bytes(limit int, what string) string {
	n := d.uvarint(uint64(limit), what+" length")
	if d.err != nil {
		return ""
	}
	if uint64(len(d.b)) < n {
		d.fail("truncated %s", what)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
