package ipc

import (
	"encoding/binary"
	"fmt"
	"math"
	"time"
)

// Limits of the backend messages.
const (
	// MaxBackendEntries bounds the entries of one DialReport or
	// BackendStats; a worker sends more in several messages.
	MaxBackendEntries = 1 << 16
	// MaxBackendString bounds a key, a reason, a route or a backend label.
	MaxBackendString = 1024
)

// Health is the master's health table of pool backends, in package
// health's binary form (health.Table.MarshalBinary); package ipc keeps it
// opaque. The master sends it right after the Config (so a worker serves
// its first connection with it) and again whenever a backend goes up or
// down.
//
// Encoding: the table's bytes, at most MaxPayload.
type Health struct {
	Table []byte
}

// Type returns TypeHealth.
func (Health) Type() Type { return TypeHealth }

// AppendBinary implements encoding.BinaryAppender.
func (h Health) AppendBinary(b []byte) ([]byte, error) {
	if len(h.Table) > MaxPayload {
		return nil, fmt.Errorf("ipc: encode %v: %d bytes, limit %d: %w", TypeHealth, len(h.Table), MaxPayload, ErrTooLarge)
	}
	return append(b, h.Table...), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler; it copies p.
func (h *Health) UnmarshalBinary(p []byte) error {
	h.Table = append([]byte(nil), p...)
	return nil
}

// DialResult is a run of Count consecutive dial outcomes of one backend,
// all successes (OK) or all failures for Reason.
type DialResult struct {
	// Key is the backend's health key (1..MaxBackendString bytes).
	Key string
	// OK reports success; Reason is then empty.
	OK bool
	// Count is the length of the run, ≥ 1.
	Count uint32
	// Reason says why the dials failed ("connection refused", "timeout"),
	// at most MaxBackendString bytes.
	Reason string
	// Last is when the run's last dial ended: the master ignores a run
	// older than the backend's last change of state (another worker's
	// later result has been counted already).
	Last time.Time
}

// DialReport carries a worker's dial outcomes to pool backends since its
// last report, the passive half of health checking. Runs of one key are in
// the order the dials ended; runs of different keys are independent.
//
// Encoding: uint32 count (≤ MaxBackendEntries), then per result: uint16
// key length, key, one byte (1 if OK, else 0), uint32 Count (≥ 1), uint16
// reason length, reason (empty if OK), int64 Last in nanoseconds since the
// Unix epoch (0 for the zero time).
type DialReport struct {
	Results []DialResult
}

// Type returns TypeDialReport.
func (DialReport) Type() Type { return TypeDialReport }

// AppendBinary implements encoding.BinaryAppender.
func (r DialReport) AppendBinary(b []byte) ([]byte, error) {
	if len(r.Results) > MaxBackendEntries {
		return nil, fmt.Errorf("ipc: encode %v: %d results, limit %d: %w", TypeDialReport, len(r.Results), MaxBackendEntries, ErrTooLarge)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Results)))
	for i, res := range r.Results {
		switch {
		case res.Key == "" || len(res.Key) > MaxBackendString || len(res.Reason) > MaxBackendString:
			return nil, fmt.Errorf("ipc: encode %v: result %d: key of %d bytes, reason of %d: %w", TypeDialReport, i, len(res.Key), len(res.Reason), ErrBadPayload)
		case res.Count == 0:
			return nil, fmt.Errorf("ipc: encode %v: result %d: count 0: %w", TypeDialReport, i, ErrBadPayload)
		case res.OK && res.Reason != "":
			return nil, fmt.Errorf("ipc: encode %v: result %d: a success with a reason: %w", TypeDialReport, i, ErrBadPayload)
		}
		b = appendString16(b, res.Key)
		ok := byte(0)
		if res.OK {
			ok = 1
		}
		b = append(b, ok)
		b = binary.BigEndian.AppendUint32(b, res.Count)
		b = appendString16(b, res.Reason)
		var ns int64
		if !res.Last.IsZero() {
			ns = res.Last.UnixNano()
			if ns == 0 || !time.Unix(0, ns).Equal(res.Last) {
				return nil, fmt.Errorf("ipc: encode %v: result %d: time %v not representable: %w", TypeDialReport, i, res.Last, ErrBadPayload)
			}
		}
		b = binary.BigEndian.AppendUint64(b, uint64(ns))
	}
	return b, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (r *DialReport) UnmarshalBinary(p []byte) error {
	d := decoder{t: TypeDialReport, p: p}
	n := d.count()
	var out []DialResult
	for i := 0; i < n && d.err == nil; i++ {
		var res DialResult
		res.Key = d.string16(1)
		switch ok := d.byte(); ok {
		case 0:
		case 1:
			res.OK = true
		default:
			d.fail("result %d: ok byte %d", i, ok)
		}
		if res.Count = d.uint32(); res.Count == 0 {
			d.fail("result %d: count 0", i)
		}
		res.Reason = d.string16(0)
		if res.OK && res.Reason != "" {
			d.fail("result %d: a success with a reason", i)
		}
		if ns := int64(d.uint64()); ns != 0 {
			res.Last = time.Unix(0, ns)
		}
		out = append(out, res)
	}
	if err := d.end(); err != nil {
		return err
	}
	r.Results = out
	return nil
}

// BackendDelta is the change of one pool backend's connection counters in
// one worker: Connections made (a counter's increase) and Active
// connections (a gauge's change, may be negative). Route and Backend are
// the metric labels: the route's match and the backend's host:port, from
// the config.
type BackendDelta struct {
	Route       string
	Backend     string
	Connections uint64
	Active      int64
}

// BackendStats carries a worker's per-backend counter deltas since its
// previous BackendStats; the master adds them to its totals.
//
// Encoding: uint32 count (≤ MaxBackendEntries), then per delta: uint16
// route length, route (≥ 1 byte), uint16 backend length, backend (≥ 1
// byte), uint64 Connections, int64 Active.
type BackendStats struct {
	Deltas []BackendDelta
}

// Type returns TypeBackendStats.
func (BackendStats) Type() Type { return TypeBackendStats }

// AppendBinary implements encoding.BinaryAppender.
func (s BackendStats) AppendBinary(b []byte) ([]byte, error) {
	if len(s.Deltas) > MaxBackendEntries {
		return nil, fmt.Errorf("ipc: encode %v: %d deltas, limit %d: %w", TypeBackendStats, len(s.Deltas), MaxBackendEntries, ErrTooLarge)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(s.Deltas)))
	for i, d := range s.Deltas {
		if d.Route == "" || d.Backend == "" || len(d.Route) > MaxBackendString || len(d.Backend) > MaxBackendString {
			return nil, fmt.Errorf("ipc: encode %v: delta %d: route of %d bytes, backend of %d: %w", TypeBackendStats, i, len(d.Route), len(d.Backend), ErrBadPayload)
		}
		b = appendString16(b, d.Route)
		b = appendString16(b, d.Backend)
		b = binary.BigEndian.AppendUint64(b, d.Connections)
		b = binary.BigEndian.AppendUint64(b, uint64(d.Active))
	}
	return b, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (s *BackendStats) UnmarshalBinary(p []byte) error {
	d := decoder{t: TypeBackendStats, p: p}
	n := d.count()
	var out []BackendDelta
	for i := 0; i < n && d.err == nil; i++ {
		var bd BackendDelta
		bd.Route = d.string16(1)
		bd.Backend = d.string16(1)
		bd.Connections = d.uint64()
		bd.Active = int64(d.uint64())
		out = append(out, bd)
	}
	if err := d.end(); err != nil {
		return err
	}
	s.Deltas = out
	return nil
}

// appendString16 appends s with a uint16 length; callers check the length.
func appendString16(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// decoder reads a payload field by field; the first problem sticks in err
// and makes every later read return zero values.
type decoder struct {
	t   Type
	p   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("ipc: decode %v: %s: %w", d.t, fmt.Sprintf(format, args...), ErrBadPayload)
	}
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.p) < n {
		d.fail("truncated: %d bytes left, want %d", len(d.p), n)
		return nil
	}
	b := d.p[:n]
	d.p = d.p[n:]
	return b
}

func (d *decoder) byte() byte {
	if b := d.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) uint32() uint32 {
	if b := d.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) uint64() uint64 {
	if b := d.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// count reads an entry count of at most MaxBackendEntries.
func (d *decoder) count() int {
	n := d.uint32()
	if n > MaxBackendEntries || n > math.MaxInt32 {
		d.fail("%d entries, limit %d", n, MaxBackendEntries)
		return 0
	}
	return int(n)
}

// string16 reads a string with a uint16 length of minLen..MaxBackendString
// bytes.
func (d *decoder) string16(minLen int) string {
	b := d.take(2)
	if b == nil {
		return ""
	}
	n := int(binary.BigEndian.Uint16(b))
	if n < minLen || n > MaxBackendString {
		d.fail("string of %d bytes, want %d..%d", n, minLen, MaxBackendString)
		return ""
	}
	return string(d.take(n))
}

// end checks that the whole payload was read.
func (d *decoder) end() error {
	if d.err == nil && len(d.p) != 0 {
		d.fail("%d trailing bytes", len(d.p))
	}
	return d.err
}
