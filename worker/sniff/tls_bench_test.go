package sniff

import (
	"errors"
	"testing"
)

// BenchmarkParseTLS measures ParseTLS on every capture, whole, and on the
// worst cases of the call-after-every-read pattern.
//
//	go test -run XXX -bench ParseTLS -benchmem ./worker/sniff/
func BenchmarkParseTLS(b *testing.B) {
	caps := tlsReadCaptures(b)
	for _, tt := range tlsCaptures {
		in := caps[tt.file]
		b.Run(tt.file, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				if _, err := ParseTLS(in); err != nil && !errors.Is(err, ErrNoName) {
					b.Fatal(err)
				}
			}
		})
	}

	msg, vers := tlsHandshakeOf(b, caps["go-tls13-default.bin"])
	oneByte := tlsFrameEvery(vers, msg, 1)
	b.Run("go-tls13-default-1-byte-records", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ParseTLS(oneByte); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("go-tls13-default-1-byte-records-need-more", func(b *testing.B) {
		b.ReportAllocs()
		in := oneByte[:len(oneByte)-1]
		for b.Loop() {
			if _, err := ParseTLS(in); !errors.Is(err, ErrNeedMore) {
				b.Fatal(err)
			}
		}
	})
	// The most record headers one call can walk: a 64 KiB ClientHello in
	// 1-byte records, just under the point where it cannot fit MaxTLSBytes.
	huge := tlsFrameEvery([2]byte{3, 1}, tlsHandshakeMsg(1, make([]byte, tlsMaxHandshakeLen)), 1)
	worst := 0
	for n := 6; n <= MaxTLSBytes; n += 6 {
		if _, err := ParseTLS(huge[:n]); !errors.Is(err, ErrNeedMore) {
			break
		}
		worst = n
	}
	b.Run("worst-case-need-more", func(b *testing.B) {
		b.ReportAllocs()
		in := huge[:worst]
		for b.Loop() {
			if _, err := ParseTLS(in); !errors.Is(err, ErrNeedMore) {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(worst/6), "records/op")
	})
	b.Run("not-tls", func(b *testing.B) {
		b.ReportAllocs()
		in := []byte("GET / HTTP/1.1\r\n")
		for b.Loop() {
			if _, err := ParseTLS(in); !errors.Is(err, ErrNotProtocol) {
				b.Fatal(err)
			}
		}
	})
}
