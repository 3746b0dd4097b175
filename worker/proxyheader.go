package worker

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/pires/go-proxyproto"
)

var (
	proxyV1Prefix = []byte("PROXY ")
	proxyV2Sig    = []byte{0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a}
)

const (
	proxyV1Max = 107 // the longest v1 line, CRLF included
	proxyV2Max = 16 + 1024
)

// errProxyHeader marks a missing or malformed PROXY protocol header.
var errProxyHeader = errors.New("worker: bad PROXY protocol header")

// proxyHeaderLen returns the length of the PROXY header at the start of b,
// 0 if more bytes are needed, or an error if b does not start with one.
func proxyHeaderLen(b []byte) (int, error) {
	switch {
	case len(b) >= len(proxyV2Sig) && bytes.Equal(b[:len(proxyV2Sig)], proxyV2Sig):
		if len(b) < 16 {
			return 0, nil
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > proxyV2Max {
			return 0, fmt.Errorf("%w: v2 header of %d bytes", errProxyHeader, n)
		}
		if len(b) < n {
			return 0, nil
		}
		return n, nil
	case bytes.HasPrefix(b, proxyV1Prefix):
		if i := bytes.Index(b, []byte("\r\n")); i >= 0 {
			return i + 2, nil
		}
		if len(b) >= proxyV1Max {
			return 0, fmt.Errorf("%w: v1 line longer than %d bytes", errProxyHeader, proxyV1Max)
		}
		return 0, nil
	case bytes.HasPrefix(proxyV1Prefix, b) || bytes.HasPrefix(proxyV2Sig, b):
		return 0, nil
	}
	return 0, fmt.Errorf("%w: missing", errProxyHeader)
}

// readProxyHeader reads a PROXY v1 or v2 header from conn before deadline.
// It returns the header and the bytes read after it, which belong to the
// client's stream.
func readProxyHeader(conn net.Conn, deadline time.Time) (*proxyproto.Header, []byte, error) {
	if err := conn.SetReadDeadline(deadline); err != nil {
		return nil, nil, fmt.Errorf("worker: set deadline: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 0, 256)
	for {
		n, err := proxyHeaderLen(buf)
		if err != nil {
			return nil, nil, err
		}
		if n > 0 {
			h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(buf[:n]), n))
			if err != nil {
				return nil, nil, fmt.Errorf("%w: %w", errProxyHeader, err)
			}
			return h, buf[n:], nil
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, cap(buf))...)[:len(buf)]
		}
		m, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		if err != nil && m == 0 {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, nil, fmt.Errorf("worker: PROXY header: %w", err)
			}
			if errors.Is(err, io.EOF) {
				return nil, nil, fmt.Errorf("%w: connection closed", errProxyHeader)
			}
			return nil, nil, fmt.Errorf("worker: read PROXY header: %w", err)
		}
	}
}
