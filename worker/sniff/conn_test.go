package sniff

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestReadDripFedWork feeds each drip input to a detector one byte more at
// a time, as Read does for a client sending a byte per segment, and counts
// the work: the parser calls and the bytes those calls got past the point
// each parser resumes from. Parsing from scratch after every read, as Read
// did, hands the parsers n²/2 bytes for n bytes (about 134 million for 16
// KiB); the work must stay linear in n.
func TestReadDripFedWork(t *testing.T) {
	for _, in := range dripInputs(t) {
		t.Run(in.name, func(t *testing.T) {
			b := in.b
			want, wantErr := Detect(b)
			if wantErr != nil && !errors.Is(wantErr, ErrNoName) {
				t.Fatalf("Detect of the whole input: %+v, %v", want, wantErr)
			}
			var d detector
			for i := 1; i <= len(b); i++ {
				got, err := d.detect(b[:i])
				if errors.Is(err, ErrNeedMore) {
					continue
				}
				if i != len(b) || got != want || !tlsSameSentinel(err, wantErr) {
					t.Fatalf("after %d of %d bytes: %+v, %v; want %+v, %v after all of them", i, len(b), got, err, want, wantErr)
				}
				break
			}
			t.Logf("%d bytes: %d parser calls, %d bytes handed to them", len(b), d.calls, d.fresh)
			if limit := 4*len(b) + 4096; d.fresh > limit {
				t.Errorf("%d bytes a byte at a time handed %d bytes to the parsers; want at most %d", len(b), d.fresh, limit)
			}
		})
	}
}

// TestDetectorAgrees checks on the captures, each fed a byte more at a
// time, that the detector decides as Detect does on the same bytes: at the
// same byte for TLS and h2c; for HTTP/1 it may report a malformed line when
// the line ends.
func TestDetectorAgrees(t *testing.T) {
	var inputs [][]byte
	for _, dir := range []string{tlsCaptureDir, http1CaptureDir, h2cCaptureDir} {
		files, err := filepath.Glob(filepath.Join(dir, "*.bin"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			inputs = append(inputs, b)
		}
	}
	caps := tlsReadCaptures(t)
	msg, vers := tlsHandshakeOf(t, caps["go-tls13-default.bin"])
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\x01b\r\nX: y\r\n\r\n",
		"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
		"GET /\x00 HTTP/1.1\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
		"GET / HTTP/1.1\nHost: a\n\nbody",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x01\x00\x00\x00\x00\x00",
		"PRI /x HTTP/1.1\r\nHost: a\r\n\r\n",
		"SSH-2.0-OpenSSH_9.6\r\n",
		"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
		"\x16\x03\x01\x00\x02\x01\x00\x15\x03",
	} {
		inputs = append(inputs, []byte(s))
	}
	inputs = append(inputs, tlsFrameEvery(vers, msg, 1), tlsFrameEvery(vers, msg, 7),
		tlsFrame(vers, msg, 2, 3, 300))
	for _, b := range inputs {
		detectorCheck(t, b, 1)
		detectorCheck(t, b, 3)
	}
}

// detectorCheck feeds b to a detector chunk bytes more at a time and
// checks each answer against Detect's on the same bytes.
func detectorCheck(t *testing.T, b []byte, chunk int) {
	t.Helper()
	var (
		d       detector
		lateErr error // Detect's malformed HTTP/1 decision the detector has not made yet
	)
	for i := min(chunk, len(b)); ; i = min(i+chunk, len(b)) {
		got, err := d.detect(b[:i])
		want, wantErr := Detect(b[:i])
		switch {
		case errors.Is(err, ErrNeedMore) && errors.Is(wantErr, ErrNeedMore):
			// Both wait. The Result with ErrNeedMore means nothing.
		case lateErr == nil && got == want && tlsSameSentinel(err, wantErr):
			return // the same decision on the same bytes
		case errors.Is(err, ErrNeedMore) && errors.Is(wantErr, ErrMalformed) && want.Protocol == HTTP:
			// A malformed byte in an HTTP/1 line the detector waits to
			// see the end of.
			if lateErr == nil {
				lateErr = wantErr
			}
		case lateErr != nil && errors.Is(err, ErrMalformed) && got.Protocol == HTTP:
			return // that line ended
		default:
			t.Fatalf("% .40q after %d bytes in %d-byte reads: detector %+v, %v; Detect %+v, %v", b, i, chunk, got, err, want, wantErr)
		}
		if i == len(b) {
			if lateErr != nil && bytes.IndexByte(b[d.http1.line:], '\n') >= 0 {
				t.Fatalf("% .40q: the line of a malformed byte ended, the detector still waits", b)
			}
			return
		}
	}
}

// FuzzDetector checks that the detector, fed the input in reads of a
// size the input picks, decides as Detect does (see detectorCheck).
//
//	go test -run XXX -fuzz FuzzDetector -fuzztime 60s -parallel 1 ./worker/sniff
func FuzzDetector(f *testing.F) {
	caps := tlsReadCaptures(f)
	for _, tt := range tlsCaptures {
		f.Add(caps[tt.file], uint8(1))
	}
	for _, dir := range []string{http1CaptureDir, h2cCaptureDir} {
		files, err := filepath.Glob(filepath.Join(dir, "*.bin"))
		if err != nil {
			f.Fatal(err)
		}
		for _, p := range files {
			b, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b, uint8(2))
		}
	}
	msg, vers := tlsHandshakeOf(f, caps["go-tls13-default.bin"])
	f.Add(tlsFrameEvery(vers, msg, 3), uint8(1))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\x01b\r\nX: y\r\n\r\n"), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, chunk uint8) {
		detectorCheck(t, b, 1+int(chunk%16))
	})
}

// feed reads b into s in chunks of 1000 bytes until Decide decides or b
// is spent, as a loop reading a socket does; it returns the last error.
func feed(s *Sniffer, b []byte) error {
	for len(b) > 0 {
		space, err := s.Space()
		if err != nil {
			return err
		}
		n := copy(space, b[:min(len(b), 1000)])
		b = b[n:]
		if _, err := s.Advance(n); !errors.Is(err, ErrNeedMore) {
			return err
		}
	}
	return ErrNeedMore
}

// Buffers grow past SmallBytes only with room in their Budget, and give it
// back on Release; a hello the budget cannot hold is refused (ErrBudget),
// one it can is read whole.
func TestSnifferBudget(t *testing.T) {
	// A 60 KB hello (a padding extension), in records of 16 KiB.
	hello := tlsTestHello{exts: []tlsTestExt{tlsSNI("big.test"), {typ: 21, data: make([]byte, 60000)}}}.bytes()
	b := NewBudget(64 << 10)
	var s1, s2 Sniffer
	s1.Init(nil, b)
	// 40,000 bytes: a 64 KiB buffer, 48 KiB of it beyond SmallBytes.
	if err := feed(&s1, hello[:40000]); !errors.Is(err, ErrNeedMore) {
		t.Fatalf("first hello: %v", err)
	}
	if u := b.Used(); u != 48<<10 {
		t.Fatalf("budget used %d; want %d", u, 48<<10)
	}
	s2.Init(nil, b)
	if err := feed(&s2, hello[:40000]); !errors.Is(err, ErrBudget) {
		t.Fatalf("second hello with 16 KiB of the budget left: %v; want ErrBudget", err)
	}
	if n := len(s2.Buffer().Bytes()); n != 32<<10 {
		t.Errorf("second hello refused after %d bytes; want %d (its buffer full at 32 KiB)", n, 32<<10)
	}
	s2.Buffer().Release()
	s1.Buffer().Release()
	if u := b.Used(); u != 0 {
		t.Fatalf("budget used %d after both released; want 0", u)
	}
	// With room, the whole hello is read and decided.
	var s3 Sniffer
	s3.Init(nil, b)
	if err := feed(&s3, hello); err != nil {
		t.Fatalf("whole hello: %v", err)
	}
	if u := b.Used(); u != 48<<10 {
		t.Errorf("budget used %d by a 64 KiB buffer; want %d", u, 48<<10)
	}
	s3.Buffer().Release()
	// Bytes given at the start (after a PROXY header) are taken as they
	// are, room or not, and given back too.
	var s4 Sniffer
	s4.Init(hello[:20000], NewBudget(0))
	if u := s4.Buffer().budget.Used(); u != int64(cap(s4.Buffer().Bytes())-SmallBytes) {
		t.Errorf("start bytes took %d; want %d", u, cap(s4.Buffer().Bytes())-SmallBytes)
	}
	s4.Buffer().Release()
	// A nil budget has no limit.
	var s5 Sniffer
	s5.Init(nil, nil)
	if err := feed(&s5, hello); err != nil {
		t.Fatalf("whole hello without a budget: %v", err)
	}
	s5.Buffer().Release()
}
